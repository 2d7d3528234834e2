//! The `vissl` subcommands, one module each.

pub mod bench_data;
pub mod benchmark;
pub mod config;
pub mod list;
pub mod train;

use anyhow::Result;
use vissl_crds::config::{self as cfg, Config, LoadOptions};

/// Load and resolve a config from command-line overrides, with `configs/` found as the trainer image ships it.
pub fn load_config(args: &[String]) -> Result<Config> {
    let opts = LoadOptions {
        configs_root: cfg::default_configs_root(),
        world: None,
    };
    Ok(cfg::load(&opts, args)?)
}
