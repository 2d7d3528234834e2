//! `vissl config show|validate`.

use anyhow::Result;

/// Print the resolved config as YAML.
pub fn show(args: &[String]) -> Result<()> {
    let config = super::load_config(args)?;
    print!("{}", config.to_yaml());
    Ok(())
}

/// Load, check and say so; the error (key, file, reason) is the exit message otherwise.
pub fn validate(args: &[String]) -> Result<()> {
    let config = super::load_config(args)?;
    println!("config is valid (hash {})", config.hash());
    Ok(())
}
