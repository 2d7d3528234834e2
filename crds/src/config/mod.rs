//! The VISSL config: schema (`configs/defaults.yaml`), composition, overrides, validation,
//! inference and the typed views the trainer reads.
//!
//! ```no_run
//! use vissl_crds::config::{load, LoadOptions};
//! let args = vec!["config=test/integration_test/quick_simclr".to_string(), "config.OPTIMIZER.num_epochs=1".to_string()];
//! let config = load(&LoadOptions::default(), &args)?;
//! println!("{}", config.to_yaml());
//! # Ok::<(), vissl_crds::config::ConfigError>(())
//! ```

mod compose;
pub mod data;
pub mod error;
pub mod groups;
pub mod infer;
mod loader;
pub mod loss;
pub mod model;
mod names;
pub mod optimizer;
mod overrides;
mod resolved;
pub mod schedulers;
mod schema;
mod tree;

pub use data::{DataConfig, DataSplitConfig};
pub use error::{ConfigError, Origin};
pub use groups::{
    Backend, CheckpointConfig, Device, DistributedConfig, EngineName, HooksConfig, MachineConfig,
    MetersConfig, NearestNeighborConfig, PrometheusSetupConfig, StorageConfig, SvmConfig,
    TensorboardSetupConfig, TrainerConfig,
};
pub use infer::World;
pub use loader::{check, default_configs_root, load, LoadOptions};
pub use loss::LossConfig;
pub use model::ModelConfig;
pub use optimizer::OptimizerConfig;
pub use resolved::Config;
pub use schedulers::ParamSchedulerConfig;
