//! `cross_entropy_multiple_output_single_target`: the sum over all model outputs of the
//! cross-entropy of each output against the one target (e.g. linear heads on several layers).

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::cross_entropy_loss::{
    check_class_targets, check_label_smoothing, class_dim, hard_or_soft_cross_entropy,
    ScalarReduction,
};
use super::{config_error, l2_normalize_rows, parse_params, Loss, LossContext, LossError, Result};

/// The registry name.
pub const NAME: &str = "cross_entropy_multiple_output_single_target";

/// `LOSS.cross_entropy_multiple_output_single_target`, with VISSL's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrossEntropyMultipleOutputSingleTargetParams {
    /// Per-class rescaling weights (class-index targets without label smoothing only, as in VISSL).
    pub weight: Option<Vec<f64>>,
    /// Only `mean`: VISSL reads the key but always averages.
    pub reduction: String,
    /// Samples with this target add nothing (class-index targets without label smoothing only).
    pub ignore_index: i64,
    /// L2-normalise each output row before the softmax.
    pub normalize_output: bool,
    /// Softmax temperature: the logits are divided by it.
    pub temperature: f64,
    /// Label smoothing factor in [0, 1]: the target becomes `(1 - s) one_hot + s / C`.
    pub label_smoothing: f64,
}

impl Default for CrossEntropyMultipleOutputSingleTargetParams {
    fn default() -> Self {
        Self {
            weight: None,
            reduction: "mean".to_string(),
            ignore_index: -1,
            normalize_output: false,
            temperature: 1.0,
            label_smoothing: 0.0,
        }
    }
}

impl CrossEntropyMultipleOutputSingleTargetParams {
    /// Reads `LOSS.cross_entropy_multiple_output_single_target`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        let params: Self = parse_params(value, NAME)?;
        if params.reduction != "mean" {
            return Err(config_error(
                format!("{NAME}.reduction"),
                format!("`{}` is not supported: this loss always averages over the batch, as VISSL's does", params.reduction),
            ));
        }
        if !(params.temperature > 0.0 && params.temperature.is_finite()) {
            return Err(config_error(
                format!("{NAME}.temperature"),
                format!("{} must be positive", params.temperature),
            ));
        }
        check_label_smoothing(NAME, params.label_smoothing)?;
        Ok(params)
    }
}

/// Sums, over the model outputs, the cross-entropy of `output / temperature` against the target.
/// Targets are class indices, or class-probability rows (soft labels, e.g. from mixup).
pub struct CrossEntropyMultipleOutputSingleTargetLoss {
    params: CrossEntropyMultipleOutputSingleTargetParams,
}

impl CrossEntropyMultipleOutputSingleTargetLoss {
    /// Builds the loss.
    pub fn new(params: CrossEntropyMultipleOutputSingleTargetParams) -> Self {
        Self { params }
    }

    fn one_output(&self, output: &Tensor, target: &Tensor) -> Result<Tensor> {
        let p = &self.params;
        let num_classes = class_dim(NAME, output)?;
        let output = if p.normalize_output {
            l2_normalize_rows(output)?
        } else {
            output.shallow_clone()
        };
        let logits = output.f_div_scalar(p.temperature)?;
        if target.dim() == 2 {
            if p.label_smoothing > 0.0 {
                return Err(LossError::Input {
                    loss: NAME,
                    reason:
                        "label_smoothing needs class-index targets, got class-probability targets"
                            .into(),
                });
            }
            if target.size() != logits.size() {
                return Err(LossError::Input {
                    loss: NAME,
                    reason: format!(
                        "soft targets of shape {:?} do not match the output {:?}",
                        target.size(),
                        logits.size()
                    ),
                });
            }
            return soft_target_cross_entropy(&logits, &target.f_to_kind(logits.kind())?);
        }
        if p.label_smoothing > 0.0 {
            let target = check_class_targets(NAME, &logits, target, p.ignore_index)?;
            if target.f_lt(0)?.f_any()?.f_int64_value(&[])? != 0 {
                return Err(LossError::Input {
                    loss: NAME,
                    reason: "label_smoothing cannot skip ignore_index targets; every target must be a class".into(),
                });
            }
            let smoothed =
                apply_label_smoothing(&target, num_classes, p.label_smoothing, logits.kind())?;
            return soft_target_cross_entropy(&logits, &smoothed);
        }
        let weight = p.weight.as_deref();
        hard_or_soft_cross_entropy(
            NAME,
            &logits,
            target,
            weight,
            p.ignore_index,
            ScalarReduction::Mean,
            0.0,
        )
    }
}

impl Loss for CrossEntropyMultipleOutputSingleTargetLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, output: &[Tensor], target: &Tensor) -> Result<Tensor> {
        let mut losses = output.iter().map(|o| self.one_output(o, target));
        let first = losses.next().ok_or_else(|| LossError::Input {
            loss: NAME,
            reason: "got no model output".into(),
        })??;
        losses.try_fold(first, |sum, loss| Ok(sum.f_add(&loss?)?))
    }
}

/// The smoothed target rows `(1 - s) * one_hot(target) + s / num_classes`, of float kind `kind`.
pub fn apply_label_smoothing(
    target: &Tensor,
    num_classes: i64,
    label_smoothing: f64,
    kind: Kind,
) -> Result<Tensor> {
    let one_hot = target.f_one_hot(num_classes)?.f_to_kind(kind)?;
    Ok(one_hot
        .f_mul_scalar(1.0 - label_smoothing)?
        .f_add_scalar(label_smoothing / num_classes as f64)?)
}

/// `-mean_n sum_c target[n, c] * log_softmax(logits)[n, c]`.
fn soft_target_cross_entropy(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let log_probs = logits.f_log_softmax(1, None::<Kind>)?;
    let per_sample =
        log_probs
            .f_mul(target)?
            .f_sum_dim_intlist([1i64].as_slice(), false, None::<Kind>)?;
    Ok(per_sample.f_mean(None::<Kind>)?.f_neg()?)
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, _ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(CrossEntropyMultipleOutputSingleTargetLoss::new(
        CrossEntropyMultipleOutputSingleTargetParams::from_yaml(params)?,
    )))
}
