//! `CrossEntropyLoss`: PyTorch's `torch.nn.CrossEntropyLoss`, which VISSL accepts by class name.

use serde::Deserialize;
use tch::{Kind, Reduction, Tensor};

use super::{config_error, parse_params, single_output, Loss, LossContext, LossError, Result};

/// The registry name (PyTorch's class name).
pub const NAME: &str = "CrossEntropyLoss";

/// How per-sample losses are reduced to the scalar a training step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalarReduction {
    /// Weighted mean over the non-ignored samples.
    Mean,
    /// Sum over the samples.
    Sum,
}

impl From<ScalarReduction> for Reduction {
    fn from(r: ScalarReduction) -> Self {
        match r {
            ScalarReduction::Mean => Reduction::Mean,
            ScalarReduction::Sum => Reduction::Sum,
        }
    }
}

/// `LOSS.CrossEntropyLoss`: PyTorch's keyword arguments, with PyTorch's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CrossEntropyLossParams {
    /// Samples with this target add nothing (VISSL's defaults.yaml sets -1).
    pub ignore_index: i64,
    /// Per-class rescaling weights.
    pub weight: Option<Vec<f64>>,
    /// `mean` or `sum` (`none` would not give a scalar to train on).
    pub reduction: ScalarReduction,
    /// PyTorch's label smoothing in [0, 1].
    pub label_smoothing: f64,
}

impl Default for CrossEntropyLossParams {
    fn default() -> Self {
        Self {
            ignore_index: -100,
            weight: None,
            reduction: ScalarReduction::Mean,
            label_smoothing: 0.0,
        }
    }
}

impl CrossEntropyLossParams {
    /// Reads `LOSS.CrossEntropyLoss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        let params: Self = parse_params(value, NAME)?;
        check_label_smoothing(NAME, params.label_smoothing)?;
        Ok(params)
    }
}

/// PyTorch's cross-entropy on the single model output, against class indices or class
/// probabilities.
pub struct CrossEntropyLoss {
    params: CrossEntropyLossParams,
}

impl CrossEntropyLoss {
    /// Builds the loss.
    pub fn new(params: CrossEntropyLossParams) -> Self {
        Self { params }
    }
}

impl Loss for CrossEntropyLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, output: &[Tensor], target: &Tensor) -> Result<Tensor> {
        let logits = single_output(output, NAME)?;
        let p = &self.params;
        hard_or_soft_cross_entropy(
            NAME,
            logits,
            target,
            p.weight.as_deref(),
            p.ignore_index,
            p.reduction,
            p.label_smoothing,
        )
    }
}

/// PyTorch's `F.cross_entropy` with validated inputs: class-index targets (1-D, integer) or
/// class-probability targets (same shape as `logits`).
pub(crate) fn hard_or_soft_cross_entropy(
    loss: &'static str,
    logits: &Tensor,
    target: &Tensor,
    weight: Option<&[f64]>,
    ignore_index: i64,
    reduction: ScalarReduction,
    label_smoothing: f64,
) -> Result<Tensor> {
    let num_classes = class_dim(loss, logits)?;
    let target = if target.size() == logits.size() {
        target.f_to_kind(logits.kind())?
    } else {
        check_class_targets(loss, logits, target, ignore_index)?
    };
    let weight = class_weights(loss, weight, num_classes, logits)?;
    Ok(logits.f_cross_entropy_loss(
        &target,
        weight.as_ref(),
        reduction.into(),
        ignore_index,
        label_smoothing,
    )?)
}

/// The number of classes of `(N, C)` logits.
pub(crate) fn class_dim(loss: &'static str, logits: &Tensor) -> Result<i64> {
    match logits.size()[..] {
        [_, classes] if classes > 0 => Ok(classes),
        ref other => Err(LossError::Input {
            loss,
            reason: format!("expects (batch, classes) logits, got {other:?}"),
        }),
    }
}

/// Checks class-index targets against `(N, C)` logits and returns them as int64. Done on the host
/// so a bad label fails with a message instead of a device-side assert.
pub(crate) fn check_class_targets(
    loss: &'static str,
    logits: &Tensor,
    target: &Tensor,
    ignore_index: i64,
) -> Result<Tensor> {
    let input_error = |reason: String| LossError::Input { loss, reason };
    let batch = logits.size()[0];
    if target.size() != [batch] {
        return Err(input_error(format!(
            "expects a target of shape [{batch}] (class indices) or {:?} (class probabilities), got {:?}",
            logits.size(),
            target.size()
        )));
    }
    if target.is_floating_point() {
        return Err(input_error(format!(
            "class-index targets must be integers, got {:?}",
            target.kind()
        )));
    }
    let target = target.f_to_kind(Kind::Int64)?;
    let num_classes = logits.size()[1];
    let kept = target.f_ne(ignore_index)?;
    let out_of_range = target
        .f_lt(0)?
        .f_logical_or(&target.f_ge(num_classes)?)?
        .f_logical_and(&kept)?;
    if out_of_range.f_any()?.f_int64_value(&[])? != 0 {
        let bad = target.f_masked_select(&out_of_range)?.f_int64_value(&[0])?;
        return Err(input_error(format!(
            "target {bad} is outside the {num_classes} classes of the output (ignore_index is {ignore_index})"
        )));
    }
    Ok(target)
}

/// The per-class weights as a tensor beside `like`, checked against the class count.
fn class_weights(
    loss: &'static str,
    weight: Option<&[f64]>,
    num_classes: i64,
    like: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(weight) = weight else {
        return Ok(None);
    };
    if weight.len() as i64 != num_classes {
        return Err(LossError::Input {
            loss,
            reason: format!(
                "weight has {} entries but the output has {num_classes} classes",
                weight.len()
            ),
        });
    }
    Ok(Some(
        Tensor::f_from_slice(weight)?
            .f_to_kind(like.kind())?
            .f_to_device(like.device())?,
    ))
}

/// Checks a label-smoothing factor of `LOSS.<section>`.
pub(crate) fn check_label_smoothing(section: &str, label_smoothing: f64) -> Result<()> {
    if (0.0..=1.0).contains(&label_smoothing) {
        Ok(())
    } else {
        Err(config_error(
            format!("{section}.label_smoothing"),
            format!("{label_smoothing} is outside [0, 1]"),
        ))
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, _ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(CrossEntropyLoss::new(
        CrossEntropyLossParams::from_yaml(params)?,
    )))
}
