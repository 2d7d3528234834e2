//! `config.OPTIMIZER`: the optimizer, its regularisation options and its parameter schedules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use super::schedulers::ParamSchedulerConfig;

/// `OPTIMIZER` (VISSL's lower-case keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Optimizer registry name (`vissl list optimizers`).
    pub name: String,
    /// Shard optimizer state across ranks (ZeRO).
    pub use_zero: bool,
    /// Layer-wise adaptive rate clipping.
    pub use_larc: bool,
    /// LARC options.
    pub larc_config: LarcConfig,
    /// L2 penalty of the trunk (and of the heads unless they have their own).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// LARS's trust coefficient.
    pub eta: f64,
    /// LARS: one-dimensional parameters (biases, normalisation) skip the trust ratio.
    pub exclude_bias_and_norm: bool,
    /// Training epochs.
    pub num_epochs: usize,
    /// Adam / AdamW betas.
    pub betas: Vec<f64>,
    /// Apply weight decay to normalisation parameters.
    pub regularize_bn: bool,
    /// Apply weight decay to biases.
    pub regularize_bias: bool,
    /// Parameter names containing any of these get no weight decay.
    pub non_regularized_parameters: Vec<String>,
    /// Different LR / weight decay for the heads.
    pub head_optimizer_params: HeadOptimizerParams,
    /// Schedules of the LR and other options.
    pub param_schedulers: ParamSchedulers,
    /// One parameter group for all parameters.
    pub construct_single_param_group_only: bool,
    /// `default` | `lr_decay`.
    pub param_group_constructor: String,
    /// Per-layer LR decay of the `lr_decay` constructor (not consumed).
    pub layer_wise_lr_decay: Value,
}

/// `OPTIMIZER.larc_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LarcConfig {
    /// Clip the local LR at the global LR instead of scaling it.
    pub clip: bool,
    /// Added to the denominators.
    pub eps: f64,
    /// LARC's trust ratio factor.
    pub trust_coefficient: f64,
}

/// `OPTIMIZER.head_optimizer_params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadOptimizerParams {
    /// Heads follow `param_schedulers.lr_head`.
    pub use_different_lr: bool,
    /// Heads use `weight_decay` below.
    pub use_different_wd: bool,
    /// Heads' weight decay (inferred as the trunk's unless `use_different_wd`).
    pub weight_decay: f64,
}

/// `OPTIMIZER.param_schedulers`: one schedule per optimizer option.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSchedulers {
    /// Learning rate.
    pub lr: ParamSchedulerConfig,
    /// Learning rate of the heads, when `head_optimizer_params.use_different_lr`.
    pub lr_head: ParamSchedulerConfig,
    /// Schedules of other options (for example `weight_decay`), by option name.
    #[serde(flatten)]
    pub others: BTreeMap<String, ParamSchedulerConfig>,
}
