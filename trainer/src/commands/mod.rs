//! The `vissl` subcommands, one module each.

pub mod bench_data;
pub mod benchmark;
pub mod config;
pub mod list;
pub mod train;
pub mod wait;

use anyhow::Result;
use vissl_crds::config::Config;

/// Load and resolve a config from command-line overrides as `vissl train` does (`configs/` as the trainer
/// image ships it, the world of the pod contract's environment when set), so `config show` prints what runs.
pub fn load_config(args: &[String]) -> Result<Config> {
    crate::dist::launcher::load_config(args)
}
