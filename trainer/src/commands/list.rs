//! `vissl list <kind>`.

use anyhow::{anyhow, Result};
use vissl_crds::registry::{self, Kind};

/// Print every registered name of `kind`, one a line.
pub fn run(kind: &str) -> Result<()> {
    let kind: Kind = kind.parse().map_err(|e| anyhow!("{e}"))?;
    for name in registry::names(kind) {
        println!("{name}");
    }
    Ok(())
}
