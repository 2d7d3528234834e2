//! The VISSL config: schema, composition, overrides, validation and inference.

pub mod data;
pub mod error;

pub use data::{DataConfig, DataSplitConfig};
pub use error::{ConfigError, Origin};
