//! Losses, keyed by VISSL's `LOSS.name`: one file per loss plus one line in [`REGISTRY`].
//!
//! A loss sees the model output (one tensor per head output) and the batch target, and returns a
//! scalar tensor to back-propagate. Losses that carry state between steps (queues, memory banks)
//! expose it through [`Loss::state_tensors`] / [`Loss::load_state`] so checkpoints hold it.
//! Contrastive losses that look at the embeddings of every rank get a [`LossContext`] with the rank
//! and a gather function, so the distributed engine only has to supply a different gather.

pub mod barlow_twins_loss;
pub mod cross_entropy_loss;
pub mod cross_entropy_multiple_output_single_target;
pub mod deepclusterv2_loss;
pub mod dino_loss;
pub mod info_nce;
pub mod kmeans;
pub mod moco_loss;
pub mod momentum_encoder;
pub mod multicrop_simclr_info_nce_loss;
pub mod seeded;
pub mod simclr_info_nce_loss;
pub mod sinkhorn;
pub mod swav_loss;
pub mod swav_momentum_loss;

use crate::models::BaseSslModel;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tch::{nn, Tensor};

pub use cross_entropy_loss::CrossEntropyLoss;
pub use cross_entropy_multiple_output_single_target::CrossEntropyMultipleOutputSingleTargetLoss;
pub use deepclusterv2_loss::DeepClusterV2Loss;
pub use multicrop_simclr_info_nce_loss::MultiCropSimclrInfoNceLoss;
pub use simclr_info_nce_loss::SimclrInfoNceLoss;
pub use swav_loss::SwavLoss;

/// Errors of building or evaluating a loss; each names the loss or the config key.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// `LOSS.name` is not a registered loss.
    #[error("unknown loss `{name}`; known losses: {}", known.join(", "))]
    UnknownLoss {
        name: String,
        known: Vec<&'static str>,
    },
    /// A config value is missing, unknown or out of range.
    #[error("LOSS.{key}: {reason}")]
    Config { key: String, reason: String },
    /// The model output or target does not fit what the loss was configured for.
    #[error("loss {loss}: {reason}")]
    Input { loss: &'static str, reason: String },
    /// The gather of embeddings across ranks failed.
    #[error("loss {loss}: gathering embeddings across ranks failed: {reason}")]
    Gather { loss: &'static str, reason: String },
    /// A checkpointed loss state does not match this loss.
    #[error("loss {loss}: cannot load state: {reason}")]
    State { loss: &'static str, reason: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result of this module.
pub type Result<T, E = LossError> = std::result::Result<T, E>;

/// Gathers a rank's embeddings from every rank, concatenated along dim 0 in rank order.
///
/// Must keep the autograd graph to the local slice (VISSL's `gather_from_all`), so gradients reach
/// this rank's embeddings through the gathered copy as well.
pub type GatherFn = Box<dyn Fn(&Tensor) -> Result<Tensor, String> + Send>;

/// Sums a tensor over every rank in place (no autograd): Sinkhorn sums, centers, cluster statistics.
pub type AllReduceSumFn = Box<dyn Fn(&Tensor) -> Result<(), String> + Send>;

/// Builds a fresh model of the trained model's architecture on its device (momentum encoders,
/// EMA teachers); its weights are then copied from the trained model by the loss.
pub type ModelFactory = Arc<dyn Fn() -> anyhow::Result<(nn::VarStore, BaseSslModel)> + Send + Sync>;

/// Where a loss runs: this process's rank, the world size and how to talk to the other ranks.
pub struct LossContext {
    /// Global rank of this process.
    pub rank: usize,
    /// Number of processes in the run.
    pub world_size: usize,
    /// The cross-rank gather; the identity for a single process.
    pub gather: GatherFn,
    /// The cross-rank in-place sum; a no-op for a single process.
    pub all_reduce_sum: AllReduceSumFn,
    /// How to build a second copy of the model; `None` where no model exists (loss unit tests).
    pub model_factory: Option<ModelFactory>,
}

impl LossContext {
    /// A single-process run: rank 0 of 1, gather is the identity.
    pub fn single_process() -> Self {
        Self::distributed(0, 1, Box::new(|t: &Tensor| Ok(t.shallow_clone())))
    }

    /// A rank of a multi-process run with the given gather (all-reduce a no-op until set).
    pub fn distributed(rank: usize, world_size: usize, gather: GatherFn) -> Self {
        Self {
            rank,
            world_size,
            gather,
            all_reduce_sum: Box::new(|_: &Tensor| Ok(())),
            model_factory: None,
        }
    }

    /// The same context with a cross-rank sum.
    pub fn with_all_reduce_sum(mut self, all_reduce_sum: AllReduceSumFn) -> Self {
        self.all_reduce_sum = all_reduce_sum;
        self
    }

    /// The same context with a way to build copies of the model.
    pub fn with_model_factory(mut self, factory: ModelFactory) -> Self {
        self.model_factory = Some(factory);
        self
    }

    /// Sums `t` over the ranks in place, naming the loss when the collective fails.
    pub fn sum_across_ranks(&self, loss: &'static str, t: &Tensor) -> Result<()> {
        (self.all_reduce_sum)(t).map_err(|reason| LossError::Gather { loss, reason })
    }

    /// A fresh model of the trained architecture, for losses that keep a second network.
    pub fn build_model_copy(&self, loss: &'static str) -> Result<(nn::VarStore, BaseSslModel)> {
        let factory = self
            .model_factory
            .as_ref()
            .ok_or_else(|| LossError::Input {
                loss,
                reason: "needs a copy of the model, but none can be built here".into(),
            })?;
        factory().map_err(|e| LossError::Input {
            loss,
            reason: format!("building the model copy failed: {e:#}"),
        })
    }
}

/// What a loss may look at in a training step besides the outputs: the model being trained, the
/// batch's input crops (on the model's device) and where the run stands. Methods with a second
/// network or a schedule (MoCo, DINO, SwAV's frozen prototypes) read it; the others ignore it.
pub struct StepContext<'a> {
    /// The model being trained.
    pub model: &'a BaseSslModel,
    /// The collated input crops of the batch (one tensor per resolution), on the model's device.
    pub crops: &'a [Tensor],
    /// Iterations done before this step (0 at the first step).
    pub iteration: u64,
    /// The epoch this step belongs to, from 0.
    pub epoch: u64,
    /// Iterations per epoch and epochs of the run, for schedules.
    pub iterations_per_epoch: u64,
    pub num_epochs: u64,
    /// Training (true) or a test phase (false).
    pub train: bool,
}

impl StepContext<'_> {
    /// Iterations of the whole run.
    pub fn total_iterations(&self) -> u64 {
        self.iterations_per_epoch * self.num_epochs
    }
}

/// A training loss (VISSL's `ClassyLoss`).
pub trait Loss: Send {
    /// The registry name (`LOSS.name`) this loss was built from.
    fn name(&self) -> &'static str;

    /// The scalar loss for one batch: `output` holds the model's outputs (one per head output),
    /// `target` the batch labels (ignored by self-supervised losses).
    fn forward(&mut self, output: &[Tensor], target: &Tensor) -> Result<Tensor>;

    /// The loss for one batch of a run: what the engine calls. Methods that need the model, the
    /// input crops or the step (momentum encoders, teachers, schedules) override it; the default is
    /// [`Loss::forward`].
    fn forward_step(
        &mut self,
        output: &[Tensor],
        target: &Tensor,
        _step: &StepContext,
    ) -> Result<Tensor> {
        self.forward(output, target)
    }

    /// How many leading crops of the batch the trained model sees in a training step (`None`: all
    /// of them). MoCo's model sees the query crop only; its key crop goes through the momentum
    /// encoder inside the loss, as in VISSL (the keys never enter the model's batch-norm statistics).
    fn model_crops(&self) -> Option<usize> {
        None
    }

    /// Whether the loss needs one pass over the training data, without gradients, before the
    /// first step of a run that does not resume (DeepClusterV2 fills its memory bank).
    fn needs_initial_pass(&self) -> bool {
        false
    }

    /// One batch of that pass: its target, and the model and crops in `step`.
    fn on_initial_pass_batch(&mut self, _target: &Tensor, _step: &StepContext) -> Result<()> {
        Ok(())
    }

    /// A train phase (epoch) starts: DeepClusterV2 clusters its memory here.
    fn on_phase_start(&mut self, _step: &StepContext) -> Result<()> {
        Ok(())
    }

    /// Gradients are computed, before the optimizer step: SwAV zeroes its prototypes' gradients
    /// while they are frozen.
    fn on_backward(&mut self, _step: &StepContext) -> Result<()> {
        Ok(())
    }

    /// The optimizer updated the parameters: EMA teachers follow, SwAV renormalises prototypes.
    fn on_update(&mut self, _step: &StepContext) -> Result<()> {
        Ok(())
    }

    /// The tensors a checkpoint must hold to resume this loss exactly (empty when stateless).
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// Restores what [`Loss::state_tensors`] returned.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        match state.first() {
            None => Ok(()),
            Some((key, _)) => Err(LossError::State {
                loss: self.name(),
                reason: format!("this loss keeps no state, but the checkpoint has `{key}`"),
            }),
        }
    }
}

/// Builds a loss from the params mapping `LOSS.<name>` and where it runs.
pub type LossConstructor = fn(&serde_yaml::Value, LossContext) -> Result<Box<dyn Loss>>;

/// Every loss by its VISSL name (`LOSS.name`), including PyTorch losses by exact class name.
pub const REGISTRY: &[(&str, LossConstructor)] = &[
    (barlow_twins_loss::NAME, barlow_twins_loss::build),
    (dino_loss::NAME, dino_loss::build),
    (moco_loss::NAME, moco_loss::build),
    (cross_entropy_loss::NAME, cross_entropy_loss::build),
    (
        cross_entropy_multiple_output_single_target::NAME,
        cross_entropy_multiple_output_single_target::build,
    ),
    (deepclusterv2_loss::NAME, deepclusterv2_loss::build),
    (
        multicrop_simclr_info_nce_loss::NAME,
        multicrop_simclr_info_nce_loss::build,
    ),
    (simclr_info_nce_loss::NAME, simclr_info_nce_loss::build),
    (swav_loss::NAME, swav_loss::build),
    (swav_momentum_loss::NAME, swav_momentum_loss::build),
];

/// The names `LOSS.name` accepts.
pub fn known_losses() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// Builds the loss a `LOSS` config section selects: `LOSS.name` picks the loss and `LOSS.<name>`
/// holds its params (absent: the loss's defaults). Other `LOSS.*` entries belong to other losses.
pub fn build_loss(loss_section: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    let name = loss_section
        .get("name")
        .ok_or_else(|| config_error("name", "missing"))?;
    let name = name
        .as_str()
        .ok_or_else(|| config_error("name", format!("expected a string, got {name:?}")))?;
    let empty = serde_yaml::Value::Mapping(Default::default());
    build_loss_by_name(name, loss_section.get(name).unwrap_or(&empty), ctx)
}

/// The `LOSS` section with `LOSS.<name>.num_train_samples` set to the training set's size where
/// the selected loss has that key (VISSL fills it when the task builds the loss).
pub fn with_num_train_samples(
    loss_section: &serde_yaml::Value,
    samples: usize,
) -> serde_yaml::Value {
    let mut section = loss_section.clone();
    let name = section
        .get("name")
        .and_then(|n| n.as_str())
        .map(str::to_string);
    if let Some(params) = name.and_then(|n| section.get_mut(n.as_str())) {
        if let Some(slot) = params.get_mut("num_train_samples") {
            *slot = serde_yaml::Value::from(samples as u64);
        }
    }
    section
}

/// Builds the loss registered as `name` from its params mapping.
pub fn build_loss_by_name(
    name: &str,
    params: &serde_yaml::Value,
    ctx: LossContext,
) -> Result<Box<dyn Loss>> {
    let (_, build) = REGISTRY
        .iter()
        .find(|(known, _)| *known == name)
        .ok_or_else(|| LossError::UnknownLoss {
            name: name.to_string(),
            known: known_losses(),
        })?;
    build(params, ctx)
}

/// Reads a loss's params struct from `LOSS.<section>`; serde rejects unknown keys by name.
pub(crate) fn parse_params<T: DeserializeOwned>(
    value: &serde_yaml::Value,
    section: &str,
) -> Result<T> {
    let value = if value.is_null() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        value.clone()
    };
    serde_yaml::from_value(value).map_err(|e| config_error(section, e.to_string()))
}

pub(crate) fn config_error(key: impl Into<String>, reason: impl Into<String>) -> LossError {
    LossError::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The one output tensor of a loss that takes a single head output.
pub(crate) fn single_output<'a>(output: &'a [Tensor], loss: &'static str) -> Result<&'a Tensor> {
    match output {
        [only] => Ok(only),
        _ => Err(LossError::Input {
            loss,
            reason: format!("expects exactly one model output, got {}", output.len()),
        }),
    }
}

/// Row-wise L2 normalisation as `torch.nn.functional.normalize(x, p=2, dim=1)`: rows with a norm
/// below 1e-12 are divided by 1e-12 instead, so a zero row stays zero rather than becoming NaN.
pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .f_norm_scalaropt_dim(2.0, [1i64], true)?
        .f_clamp_min(1e-12)?;
    Ok(x.f_div(&norm)?)
}
