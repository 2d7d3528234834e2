//! `config.OPTIMIZER`: the keys the optimizers read, with VISSL's defaults.yaml values.

use serde::de::IgnoredAny;
use serde::Deserialize;

use super::{OptimError, Result};

/// `OPTIMIZER.larc_config`: LARC (You, Gitman, Ginsburg, arXiv 1708.03888) as NVIDIA apex does it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LarcConfig {
    /// Clip mode: the effective rate is `min(local_lr, lr)`; otherwise it is `local_lr * lr`.
    pub clip: bool,
    /// Added to the denominator of the local rate.
    pub eps: f64,
    /// Scales the ratio of parameter norm to gradient norm.
    pub trust_coefficient: f64,
}

impl Default for LarcConfig {
    fn default() -> Self {
        Self {
            clip: false,
            eps: 1e-8,
            trust_coefficient: 0.001,
        }
    }
}

/// `OPTIMIZER.head_optimizer_params`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadOptimizerParams {
    /// Head parameters follow `lr_head` instead of `lr`.
    pub use_different_lr: bool,
    /// Head parameters decay with `weight_decay` below instead of the trunk's.
    pub use_different_wd: bool,
    /// The head's weight decay when `use_different_wd`.
    pub weight_decay: f64,
}

impl Default for HeadOptimizerParams {
    fn default() -> Self {
        Self {
            use_different_lr: false,
            use_different_wd: false,
            weight_decay: 1e-4,
        }
    }
}

/// `OPTIMIZER`: everything the optimizer and its parameter groups need. Learning rates are not
/// here: schedules are evaluated elsewhere and passed to each step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerParams {
    /// Registry name: `sgd`, `adamw` or `lars`.
    pub name: String,
    /// ZeRO optimizer-state sharding (not supported: must stay false).
    pub use_zero: bool,
    /// Wrap SGD in LARC.
    pub use_larc: bool,
    /// LARC's settings when `use_larc`.
    pub larc_config: LarcConfig,
    /// L2 penalty of regularized parameters (decoupled for AdamW).
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// LARS's trust coefficient.
    pub eta: f64,
    /// LARS: one-dimensional parameters (biases, normalisation) skip the trust ratio.
    pub exclude_bias_and_norm: bool,
    /// AdamW's moment decay rates.
    pub betas: [f64; 2],
    /// AdamW's denominator epsilon.
    pub eps: f64,
    /// AdamW's AMSGrad variant.
    pub amsgrad: bool,
    /// Apply weight decay to normalisation-layer parameters.
    pub regularize_bn: bool,
    /// Apply weight decay to biases.
    pub regularize_bias: bool,
    /// Parameters whose name contains one of these strings get no weight decay.
    pub non_regularized_parameters: Vec<String>,
    /// Separate learning rate / weight decay for the head.
    pub head_optimizer_params: HeadOptimizerParams,
    /// Put every parameter in one group (trunk LR and weight decay).
    pub construct_single_param_group_only: bool,
    /// `default` (VISSL's trunk/head x regularized/unregularized grouping) or `dino`.
    pub param_group_constructor: String,
    /// Read by the config loader (training length).
    pub num_epochs: IgnoredAny,
    /// Read by the config loader (learning-rate schedules).
    pub param_schedulers: IgnoredAny,
    /// Used by VISSL's `lr_decay` group constructor, which is not supported.
    pub layer_wise_lr_decay: IgnoredAny,
    /// Present in some VISSL benchmark configs; VISSL itself never reads it.
    pub linear_eval_heads: IgnoredAny,
}

impl Default for OptimizerParams {
    fn default() -> Self {
        Self {
            name: "sgd".to_string(),
            use_zero: false,
            use_larc: false,
            larc_config: LarcConfig::default(),
            weight_decay: 1e-4,
            momentum: 0.9,
            nesterov: false,
            eta: 0.001,
            exclude_bias_and_norm: false,
            betas: [0.9, 0.999],
            eps: 1e-8,
            amsgrad: false,
            regularize_bn: false,
            regularize_bias: true,
            non_regularized_parameters: Vec::new(),
            head_optimizer_params: HeadOptimizerParams::default(),
            construct_single_param_group_only: false,
            param_group_constructor: "default".to_string(),
            num_epochs: IgnoredAny,
            param_schedulers: IgnoredAny,
            layer_wise_lr_decay: IgnoredAny,
            linear_eval_heads: IgnoredAny,
        }
    }
}

impl OptimizerParams {
    /// Reads and checks the `OPTIMIZER` section; unknown keys are errors naming the key.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        let value = if value.is_null() {
            serde_yaml::Value::Mapping(Default::default())
        } else {
            value.clone()
        };
        let params: Self =
            serde_yaml::from_value(value).map_err(|e| config_error("", e.to_string()))?;
        params.validate()?;
        Ok(params)
    }

    /// The weight decay of regularized head parameters (the trunk's unless `use_different_wd`).
    pub fn head_weight_decay(&self) -> f64 {
        if self.head_optimizer_params.use_different_wd {
            self.head_optimizer_params.weight_decay
        } else {
            self.weight_decay
        }
    }

    /// Checks values the update rules rely on; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if !super::known_optimizers().contains(&self.name.as_str()) {
            return Err(OptimError::UnknownOptimizer {
                name: self.name.clone(),
                known: super::known_optimizers(),
            });
        }
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("momentum", self.momentum),
            ("eps", self.eps),
            ("eta", self.eta),
            ("larc_config.eps", self.larc_config.eps),
            (
                "larc_config.trust_coefficient",
                self.larc_config.trust_coefficient,
            ),
            (
                "head_optimizer_params.weight_decay",
                self.head_optimizer_params.weight_decay,
            ),
        ];
        for (key, value) in non_negative {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(config_error(
                    key,
                    format!("{value} must be a finite number >= 0"),
                ));
            }
        }
        for (i, beta) in self.betas.iter().enumerate() {
            if !(0.0..1.0).contains(beta) {
                return Err(config_error(
                    &format!("betas[{i}]"),
                    format!("{beta} is outside [0, 1)"),
                ));
            }
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(config_error(
                "nesterov",
                "Nesterov momentum needs momentum > 0",
            ));
        }
        if self.name == super::lars::NAME && self.momentum >= 1.0 {
            return Err(config_error(
                "momentum",
                format!("{} must be in [0, 1) for lars", self.momentum),
            ));
        }
        if self.use_larc && self.name != "sgd" {
            return Err(config_error(
                "use_larc",
                format!("LARC wraps sgd only, not `{}`", self.name),
            ));
        }
        if self.use_zero {
            return Err(config_error(
                "use_zero",
                "ZeRO optimizer-state sharding is not supported",
            ));
        }
        if !super::param_groups::CONSTRUCTORS.contains(&self.param_group_constructor.as_str()) {
            return Err(config_error(
                "param_group_constructor",
                format!(
                    "`{}` is not supported; known: {}",
                    self.param_group_constructor,
                    super::param_groups::CONSTRUCTORS.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

/// An error about `OPTIMIZER.<key>` (`key` empty: the section itself).
fn config_error(key: &str, reason: impl Into<String>) -> OptimError {
    let key = if key.is_empty() {
        "OPTIMIZER".to_string()
    } else {
        format!("OPTIMIZER.{key}")
    };
    OptimError::Config {
        key,
        reason: reason.into(),
    }
}
