//! `swav_momentum_loss`: SwAV whose codes come from a momentum encoder (an EMA copy of the model,
//! as in MoCo) run on the assigning crops, VISSL's SwAVMomentumHook and
//! SwAVMomentumNormalizePrototypesHook included.
//!
//! At each forward the encoder first follows the model (`m * own + (1 - m) * model`, a plain copy
//! at the first step), then computes the assigning crops' embeddings and scores without gradient,
//! in evaluation mode from `momentum_eval_mode_iter_start` on. Its scores give the codes, its
//! prototypes score the queue (refreshed at every forward that uses it) and its embeddings enter
//! the queue. After each update both models' prototypes are normalised (`normalize_last_layer`).

use serde::Deserialize;
use tch::Tensor;

use super::momentum_encoder::MomentumEncoder;
use super::swav_loss::{
    normalize_prototypes, prototype_weights, CodeInputs, QueueParams, SwavCriterion, SwavLossParams,
};
use super::{parse_params, Loss, LossContext, LossError, Result, StepContext};

/// The registry name.
pub const NAME: &str = "swav_momentum_loss";

/// State keys of the momentum encoder start with this.
const ENCODER_PREFIX: &str = "momentum_encoder.";

/// `LOSS.swav_momentum_loss`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwavMomentumLossParams {
    /// EMA factor of the momentum encoder.
    pub momentum: f64,
    /// From this iteration on, the encoder runs in evaluation mode.
    pub momentum_eval_mode_iter_start: u64,
    /// Width of the embedding (inferred from the head).
    pub embedding_dim: usize,
    /// Temperature of the predicted distributions.
    pub temperature: f64,
    /// Sinkhorn-Knopp and the loss terms in float64 (VISSL reads but ignores it for this loss).
    pub use_double_precision: bool,
    /// L2-normalise the prototypes of the model and the encoder after each update.
    pub normalize_last_layer: bool,
    /// Sinkhorn-Knopp iterations.
    pub num_iters: usize,
    /// Temperature of the scores inside Sinkhorn-Knopp.
    pub epsilon: f64,
    /// Crops per image (inferred from the transforms).
    pub num_crops: usize,
    /// The crops the encoder sees and whose codes the other crops predict.
    pub crops_for_assign: Vec<usize>,
    /// Prototypes per set (inferred from the head).
    pub num_prototypes: Vec<usize>,
    /// The queue of past encoder embeddings.
    pub queue: QueueParams,
}

impl Default for SwavMomentumLossParams {
    fn default() -> Self {
        // VISSL's defaults.yaml values.
        Self {
            momentum: 0.99,
            momentum_eval_mode_iter_start: 0,
            embedding_dim: 128,
            temperature: 0.1,
            use_double_precision: false,
            normalize_last_layer: true,
            num_iters: 3,
            epsilon: 0.05,
            num_crops: 2,
            crops_for_assign: vec![0, 1],
            num_prototypes: vec![3000],
            queue: QueueParams::default(),
        }
    }
}

impl SwavMomentumLossParams {
    /// Reads `LOSS.swav_momentum_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }

    /// The SwAV part of the parameters.
    fn swav(&self) -> SwavLossParams {
        SwavLossParams {
            embedding_dim: self.embedding_dim,
            temperature: self.temperature,
            use_double_precision: false,
            normalize_last_layer: self.normalize_last_layer,
            num_iters: self.num_iters,
            epsilon: self.epsilon,
            num_crops: self.num_crops,
            crops_for_assign: self.crops_for_assign.clone(),
            num_prototypes: self.num_prototypes.clone(),
            queue: self.queue.clone(),
            ..SwavLossParams::default()
        }
    }
}

/// SwAV with a momentum encoder.
pub struct SwavMomentumLoss {
    params: SwavMomentumLossParams,
    criterion: SwavCriterion,
    encoder: MomentumEncoder,
}

impl SwavMomentumLoss {
    /// Builds the loss; `ctx` must be able to build a copy of the model.
    pub fn new(params: &SwavMomentumLossParams, ctx: LossContext) -> Result<Self> {
        if !(0.0..=1.0).contains(&params.momentum) {
            return Err(super::config_error(
                format!("{NAME}.momentum"),
                format!("{} must lie in [0, 1]", params.momentum),
            ));
        }
        let encoder = MomentumEncoder::new(&ctx, NAME)?.following_running_stats();
        let criterion =
            SwavCriterion::new(NAME, &params.swav(), ctx)?.refreshing_queue_when_in_use();
        Ok(Self {
            params: params.clone(),
            criterion,
            encoder,
        })
    }

    /// The momentum encoder.
    pub fn encoder(&self) -> &MomentumEncoder {
        &self.encoder
    }

    fn encoder_codes(&mut self, step: &StepContext) -> Result<CodeInputs> {
        self.encoder.update(step.model, self.params.momentum)?;
        let train = self.criterion.num_iteration() < self.params.momentum_eval_mode_iter_start;
        let crops = self
            .params
            .crops_for_assign
            .iter()
            .map(|&c| {
                step.crops
                    .get(c)
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| LossError::Input {
                        loss: NAME,
                        reason: format!(
                            "crop {c} of crops_for_assign missing: the batch has {} crops \
                         (swav_momentum_loss needs the multicrop_collator)",
                            step.crops.len()
                        ),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = tch::no_grad(|| self.encoder.model().forward_multi_res(&crops, train))
            .map_err(|e| LossError::Input {
                loss: NAME,
                reason: format!("momentum encoder forward: {e}"),
            })?;
        let (embedding, scores) = outputs.split_first().ok_or_else(|| LossError::Input {
            loss: NAME,
            reason: "the momentum encoder returned no output".into(),
        })?;
        Ok(CodeInputs {
            embedding: embedding.shallow_clone(),
            scores: scores.iter().map(Tensor::shallow_clone).collect(),
        })
    }
}

impl Loss for SwavMomentumLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, _output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        Err(LossError::Input {
            loss: NAME,
            reason: "needs the model and the crops of the step (forward_step)".into(),
        })
    }

    fn forward_step(
        &mut self,
        output: &[Tensor],
        _target: &Tensor,
        step: &StepContext,
    ) -> Result<Tensor> {
        let (embedding, scores) = output.split_first().ok_or_else(|| LossError::Input {
            loss: NAME,
            reason: "expects the swav_head's outputs [embedding, scores...], got none".into(),
        })?;
        let codes = self.encoder_codes(step)?;
        let prototypes = if self.criterion.queue_scores_due() {
            Some(prototype_weights(
                self.encoder.model(),
                self.params.num_prototypes.len(),
                NAME,
            )?)
        } else {
            None
        };
        self.criterion
            .step(embedding, scores, Some(&codes), prototypes.as_deref())
    }

    fn on_update(&mut self, step: &StepContext) -> Result<()> {
        if self.params.normalize_last_layer {
            let count = self.params.num_prototypes.len();
            normalize_prototypes(&prototype_weights(step.model, count, NAME)?)?;
            if self.encoder.is_initialised() {
                normalize_prototypes(&prototype_weights(self.encoder.model(), count, NAME)?)?;
            }
        }
        Ok(())
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = self.criterion.state_tensors("");
        state.extend(self.encoder.state_tensors(ENCODER_PREFIX));
        state
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.criterion.load_state("", state)?;
        self.encoder.load_state(ENCODER_PREFIX, state)
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(SwavMomentumLoss::new(
        &SwavMomentumLossParams::from_yaml(params)?,
        ctx,
    )?))
}
