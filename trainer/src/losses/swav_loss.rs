//! `swav_loss`: SwAV's swapped prediction (Caron et al., arXiv 2006.09882).
//!
//! The model ends in a `swav_head`, whose outputs are `[embedding, scores_0, ...]` with one score
//! matrix per set of prototypes, rows crop-major (all images' crop 0, then crop 1, ...). For each
//! set of prototypes and each crop `c` of `crops_for_assign`, Sinkhorn-Knopp turns crop `c`'s
//! scores (plus the queue's, once it runs) into balanced soft codes `q`; every other crop `p`
//! predicts them: `-mean_rows sum_k q * log_softmax(scores_p / T)`. Terms are averaged over the
//! predicting crops, the assigning crops and the prototype sets, so neither changes the scale.
//!
//! Method state lives here: the iteration counter (queue start, hard assignments), the queue of
//! past embeddings and their scores, the prototype normalisation after each update
//! (`normalize_last_layer`, VISSL's NormalizePrototypesHook) and the frozen prototypes of the first
//! iterations (`freeze_prototypes_niters`).

use serde::Deserialize;
use tch::Tensor;

use super::seeded::SplitMix64;
use super::sinkhorn::{self, SinkhornSettings};
use super::{
    config_error, l2_normalize_rows, parse_params, Loss, LossContext, LossError, Result,
    StepContext,
};
use crate::models::BaseSslModel;

/// The registry name.
pub const NAME: &str = "swav_loss";

/// Seed of the queue's start values (xored with the rank).
const QUEUE_SEED: u64 = 0x5EA5_0000_5A5A;

/// `LOSS.swav_loss.queue`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct QueueParams {
    /// Global queue length (rounded to whole global batches by the config loader).
    pub queue_length: usize,
    /// The first iteration whose assignments use the queue.
    pub start_iter: u64,
    /// This rank's share, `queue_length / world_size` (inferred); 0 disables the queue.
    pub local_queue_length: usize,
}

/// `LOSS.swav_loss` (also the SwAV part of `LOSS.swav_momentum_loss`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwavLossParams {
    /// Width of the embedding (inferred from the head's last `dims`).
    pub embedding_dim: usize,
    /// Temperature of the predicted distributions.
    pub temperature: f64,
    /// Sinkhorn and the loss terms in float64.
    pub use_double_precision: bool,
    /// L2-normalise every prototype after each optimizer step.
    pub normalize_last_layer: bool,
    /// Sinkhorn-Knopp iterations.
    pub num_iters: usize,
    /// Temperature of the scores inside Sinkhorn-Knopp.
    pub epsilon: f64,
    /// Crops per image (inferred from the transforms).
    pub num_crops: usize,
    /// The crops whose codes the other crops predict.
    pub crops_for_assign: Vec<usize>,
    /// Prototypes per set (inferred from the head's `num_clusters`).
    pub num_prototypes: Vec<usize>,
    /// Hard (one-hot) codes for the first iterations.
    pub temp_hard_assignment_iters: u64,
    /// Where VISSL dumps scores when the loss turns NaN (inferred: the checkpoint folder); here a
    /// NaN loss is an error naming the prototype set and crop instead.
    pub output_dir: String,
    /// The queue of past embeddings.
    pub queue: QueueParams,
    /// vissl-rs: the prototypes get no update for this many iterations (SwAV's
    /// `freeze_prototypes_niters`; VISSL expresses it as MODEL.TEMP_FROZEN_PARAMS_ITER_MAP).
    pub freeze_prototypes_niters: u64,
}

impl Default for SwavLossParams {
    fn default() -> Self {
        // VISSL's defaults.yaml values.
        Self {
            embedding_dim: 128,
            temperature: 0.1,
            use_double_precision: false,
            normalize_last_layer: true,
            num_iters: 3,
            epsilon: 0.05,
            num_crops: 2,
            crops_for_assign: vec![0, 1],
            num_prototypes: vec![3000],
            temp_hard_assignment_iters: 0,
            output_dir: ".".into(),
            queue: QueueParams::default(),
            freeze_prototypes_niters: 0,
        }
    }
}

impl SwavLossParams {
    /// Reads `LOSS.swav_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }

    /// Checks the values; `section` names the config block in errors.
    pub fn validate(&self, section: &str) -> Result<()> {
        let key = |k: &str| format!("{section}.{k}");
        for (name, value) in [("temperature", self.temperature), ("epsilon", self.epsilon)] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(config_error(key(name), format!("{value} must be positive")));
            }
        }
        if self.num_crops < 2 {
            return Err(config_error(
                key("num_crops"),
                format!("{} leaves no crop to predict the codes", self.num_crops),
            ));
        }
        if self.crops_for_assign.is_empty() {
            return Err(config_error(key("crops_for_assign"), "must name a crop"));
        }
        if let Some(bad) = self.crops_for_assign.iter().find(|&&c| c >= self.num_crops) {
            return Err(config_error(
                key("crops_for_assign"),
                format!("crop {bad} is outside num_crops {}", self.num_crops),
            ));
        }
        if self.num_prototypes.is_empty() || self.num_prototypes.contains(&0) {
            return Err(config_error(
                key("num_prototypes"),
                format!(
                    "{:?}: needs at least one set of prototypes, each non-empty",
                    self.num_prototypes
                ),
            ));
        }
        if self.embedding_dim == 0 {
            return Err(config_error(key("embedding_dim"), "must be positive"));
        }
        Ok(())
    }

    fn sinkhorn(&self) -> SinkhornSettings {
        SinkhornSettings {
            num_iters: self.num_iters,
            epsilon: self.epsilon,
            double_precision: self.use_double_precision,
        }
    }
}

/// What the codes of a step are computed from, rows of the `crops_for_assign` crops only, in
/// their order (`crops_for_assign x images`): plain SwAV takes them from the model's own outputs,
/// `swav_momentum_loss` from its momentum encoder's.
pub struct CodeInputs {
    /// The embeddings of those rows (they enter the queue).
    pub embedding: Tensor,
    /// Per set of prototypes, the scores of those rows.
    pub scores: Vec<Tensor>,
}

/// The swapped-prediction criterion with its queue: shared by `swav_loss` and
/// `swav_momentum_loss` (which takes the codes from its momentum encoder's scores).
pub struct SwavCriterion {
    loss: &'static str,
    params: SwavLossParams,
    ctx: LossContext,
    /// Forward passes so far (VISSL's `num_iteration` buffer).
    num_iteration: u64,
    /// Past embeddings per assigning crop: `crops_for_assign x local_queue_length x embedding_dim`.
    embedding_queue: Option<Tensor>,
    /// Their scores per set of prototypes: `crops_for_assign x local_queue_length x K_j`.
    score_queues: Vec<Tensor>,
    /// Recompute the queue's scores at every forward that uses the queue (`swav_momentum_loss`)
    /// instead of after a forward that used it (VISSL's SwAV hook order).
    refresh_when_in_use: bool,
}

impl SwavCriterion {
    /// Builds the criterion; `loss` names the owning loss in errors and state keys.
    pub fn new(loss: &'static str, params: &SwavLossParams, ctx: LossContext) -> Result<Self> {
        params.validate(loss)?;
        let assign = params.crops_for_assign.len() as i64;
        let length = params.queue.local_queue_length as i64;
        let (embedding_queue, score_queues) = if length > 0 {
            // VISSL's start values: scores uniform in [-1, 1), embeddings in +-1/sqrt(dim / 3);
            // drawn from a generator of their own, seeded by the rank, so resumed runs agree.
            let bound = 1.0 / (params.embedding_dim as f64 / 3.0).sqrt();
            let mut rng = SplitMix64::new(QUEUE_SEED ^ ctx.rank as u64);
            let embeddings = rng.uniform(
                &[assign, length, params.embedding_dim as i64],
                -bound,
                bound,
            )?;
            let scores = params
                .num_prototypes
                .iter()
                .map(|&k| rng.uniform(&[assign, length, k as i64], -1.0, 1.0))
                .collect::<Result<Vec<_>, _>>()?;
            (Some(embeddings), scores)
        } else {
            (None, Vec::new())
        };
        Ok(Self {
            loss,
            params: params.clone(),
            ctx,
            num_iteration: 0,
            embedding_queue,
            score_queues,
            refresh_when_in_use: false,
        })
    }

    /// The same criterion refreshing the queue's scores at every forward that uses the queue.
    pub fn refreshing_queue_when_in_use(mut self) -> Self {
        self.refresh_when_in_use = true;
        self
    }

    /// The parameters.
    pub fn params(&self) -> &SwavLossParams {
        &self.params
    }

    /// Forward passes seen so far.
    pub fn num_iteration(&self) -> u64 {
        self.num_iteration
    }

    /// Whether this forward's codes use the queue.
    fn queue_in_use(&self) -> bool {
        self.embedding_queue.is_some() && self.num_iteration >= self.params.queue.start_iter
    }

    /// Whether the queue's scores are recomputed before this forward (the caller then passes the
    /// prototypes to [`SwavCriterion::step`]): VISSL does it in the
    /// forward hook only once the previous forward used the queue.
    pub fn queue_scores_due(&self) -> bool {
        if self.refresh_when_in_use {
            return self.queue_in_use();
        }
        self.embedding_queue.is_some()
            && self.num_iteration > 0
            && self.num_iteration > self.params.queue.start_iter
    }

    /// Recomputes the queue's scores with the current prototypes (`prototypes[j]`: `K_j x dim`).
    pub fn refresh_queue_scores(&mut self, prototypes: &[Tensor]) -> Result<()> {
        let Some(embeddings) = &self.embedding_queue else {
            return Ok(());
        };
        let _guard = tch::no_grad_guard();
        for (queue, weight) in self.score_queues.iter_mut().zip(prototypes) {
            let weight = weight.f_detach()?.f_to_device(embeddings.device())?;
            *queue = embeddings.f_matmul(&weight.f_tr()?)?;
        }
        Ok(())
    }

    /// The loss of one step: `embedding` (`crops x images` rows) and, per set of prototypes, the
    /// predicting scores; the codes come from `codes` (`None`: from these outputs' assigning
    /// crops). Advances the iteration counter and, once the queue runs, pushes the code rows'
    /// embeddings into it.
    pub fn step(
        &mut self,
        embedding: &Tensor,
        predicting: &[Tensor],
        codes: Option<&CodeInputs>,
        prototypes: Option<&[Tensor]>,
    ) -> Result<Tensor> {
        self.check_outputs(embedding, predicting)?;
        let own;
        let codes = match codes {
            Some(codes) => codes,
            None => {
                own = self.own_code_inputs(embedding, predicting)?;
                &own
            }
        };
        self.check_code_inputs(embedding, codes)?;
        self.move_queue_to(embedding.device())?;
        if self.queue_scores_due() {
            let prototypes = prototypes.ok_or_else(|| {
                self.input_error(
                    "the queue's scores need the model's prototypes (call forward_step)".into(),
                )
            })?;
            self.refresh_queue_scores(prototypes)?;
        }
        let use_queue = self.queue_in_use();
        let mut total: Option<Tensor> = None;
        for (head, (scores, codes_from)) in predicting.iter().zip(&codes.scores).enumerate() {
            let queue = if use_queue {
                Some(self.score_queues[head].shallow_clone())
            } else {
                None
            };
            let term = self.head_loss(head, scores, codes_from, queue.as_ref())?;
            total = Some(match total {
                None => term,
                Some(sum) => sum.f_add(&term)?,
            });
        }
        let total = total
            .ok_or_else(|| self.input_error("no prototype scores".into()))?
            .f_div_scalar(predicting.len() as f64)?;
        self.num_iteration += 1;
        if use_queue {
            self.push_embeddings(&codes.embedding)?;
        }
        Ok(total)
    }

    /// The assigning crops' rows of the model's own outputs.
    fn own_code_inputs(&self, embedding: &Tensor, scores: &[Tensor]) -> Result<CodeInputs> {
        let images = embedding.size()[0] / self.params.num_crops as i64;
        let rows = |t: &Tensor| -> Result<Tensor> {
            let parts = self
                .params
                .crops_for_assign
                .iter()
                .map(|&c| Ok(t.f_detach()?.f_narrow(0, c as i64 * images, images)?))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::f_cat(&parts, 0)?)
        };
        Ok(CodeInputs {
            embedding: rows(embedding)?,
            scores: scores.iter().map(rows).collect::<Result<_>>()?,
        })
    }

    fn check_code_inputs(&self, embedding: &Tensor, codes: &CodeInputs) -> Result<()> {
        let images = embedding.size()[0] / self.params.num_crops as i64;
        let rows = images * self.params.crops_for_assign.len() as i64;
        let dim = self.params.embedding_dim as i64;
        if codes.embedding.size() != [rows, dim]
            || codes.scores.len() != self.params.num_prototypes.len()
        {
            return Err(self.input_error(format!(
                "code inputs: expected an embedding of [{rows}, {dim}] and {} score matrices, got {:?} and {}",
                self.params.num_prototypes.len(),
                codes.embedding.size(),
                codes.scores.len()
            )));
        }
        for (j, (s, &k)) in codes
            .scores
            .iter()
            .zip(&self.params.num_prototypes)
            .enumerate()
        {
            if s.size() != [rows, k as i64] {
                return Err(self.input_error(format!(
                    "code scores {j}: expected [{rows}, {k}], got {:?}",
                    s.size()
                )));
            }
        }
        Ok(())
    }

    /// Swapped prediction for one set of prototypes.
    fn head_loss(
        &self,
        head: usize,
        scores: &Tensor,
        codes_from: &Tensor,
        queue: Option<&Tensor>,
    ) -> Result<Tensor> {
        let p = &self.params;
        let images = scores.size()[0] / p.num_crops as i64;
        let settings = p.sinkhorn();
        let kind = settings.kind();
        let hard = self.num_iteration < p.temp_hard_assignment_iters;
        let mut total: Option<Tensor> = None;
        for (slot, &crop) in p.crops_for_assign.iter().enumerate() {
            let codes = {
                let _guard = tch::no_grad_guard();
                let mut own = codes_from
                    .f_narrow(0, slot as i64 * images, images)?
                    .f_detach()?;
                if let Some(queue) = queue {
                    own = Tensor::f_cat(
                        &[own, queue.f_get(slot as i64)?.f_to_kind(scores.kind())?],
                        0,
                    )?;
                }
                sinkhorn::assignments(&own, &settings, hard, &self.ctx, self.loss)?
                    .f_narrow(0, 0, images)?
            };
            let mut crop_loss: Option<Tensor> = None;
            for other in (0..p.num_crops).filter(|&c| c != crop) {
                let log_probs = scores
                    .f_narrow(0, other as i64 * images, images)?
                    .f_to_kind(kind)?
                    .f_div_scalar(p.temperature)?
                    .f_log_softmax(1, kind)?;
                let term = codes
                    .f_mul(&log_probs)?
                    .f_sum_dim_intlist(&[1i64][..], false, kind)?
                    .f_mean(kind)?
                    .f_neg()?;
                crop_loss = Some(match crop_loss {
                    None => term,
                    Some(sum) => sum.f_add(&term)?,
                });
            }
            let crop_loss = crop_loss
                .ok_or_else(|| self.input_error("no crop to predict the codes".into()))?
                .f_div_scalar((p.num_crops - 1) as f64)?;
            if crop_loss.f_isnan()?.int64_value(&[]) != 0 {
                return Err(self.input_error(format!(
                    "loss is NaN for prototypes {head}, assigning crop {crop} on rank {} at \
                     iteration {} (scores of output_dir {} not dumped)",
                    self.ctx.rank, self.num_iteration, p.output_dir
                )));
            }
            total = Some(match total {
                None => crop_loss,
                Some(sum) => sum.f_add(&crop_loss)?,
            });
        }
        let total = total.ok_or_else(|| self.input_error("crops_for_assign is empty".into()))?;
        Ok(total.f_div_scalar(p.crops_for_assign.len() as f64)?)
    }

    /// Keeps the queue where the model computes (it starts on the CPU).
    fn move_queue_to(&mut self, device: tch::Device) -> Result<()> {
        if let Some(queue) = &self.embedding_queue {
            if queue.device() != device {
                self.embedding_queue = Some(queue.f_to_device(device)?);
                for scores in &mut self.score_queues {
                    *scores = scores.f_to_device(device)?;
                }
            }
        }
        Ok(())
    }

    /// Shifts the queue by one batch and puts this batch's assigning crops in front.
    fn push_embeddings(&mut self, embedding: &Tensor) -> Result<()> {
        let Some(queue) = &self.embedding_queue else {
            return Ok(());
        };
        let _guard = tch::no_grad_guard();
        let images = embedding.size()[0] / self.params.crops_for_assign.len() as i64;
        let length = queue.size()[1];
        let kept = (length - images).max(0);
        let mut rows = Vec::new();
        for slot in 0..self.params.crops_for_assign.len() {
            let fresh = embedding
                .f_narrow(0, slot as i64 * images, images.min(length))?
                .f_detach()?
                .f_to_kind(queue.kind())?
                .f_to_device(queue.device())?;
            let old = queue.f_get(slot as i64)?.f_narrow(0, 0, kept)?;
            rows.push(Tensor::f_cat(&[fresh, old], 0)?);
        }
        self.embedding_queue = Some(Tensor::f_stack(&rows, 0)?);
        Ok(())
    }

    fn check_outputs(&self, embedding: &Tensor, scores: &[Tensor]) -> Result<()> {
        let p = &self.params;
        let rows = embedding.size().first().copied().unwrap_or(0);
        let crops = p.num_crops as i64;
        if embedding.dim() != 2
            || embedding.size()[1] != p.embedding_dim as i64
            || rows == 0
            || rows % crops != 0
        {
            return Err(self.input_error(format!(
                "expects an embedding of shape [num_crops ({crops}) x images, embedding_dim ({})], \
                 got {:?}",
                p.embedding_dim,
                embedding.size()
            )));
        }
        if scores.len() != p.num_prototypes.len() {
            return Err(self.input_error(format!(
                "expects {} prototype score outputs (num_prototypes {:?}), got {}",
                p.num_prototypes.len(),
                p.num_prototypes,
                scores.len()
            )));
        }
        for (j, (s, &k)) in scores.iter().zip(&p.num_prototypes).enumerate() {
            if s.size() != [rows, k as i64] {
                return Err(self.input_error(format!(
                    "prototype scores {j}: expected [{rows}, {k}], got {:?}",
                    s.size()
                )));
            }
        }
        Ok(())
    }

    /// The checkpointed state, keys prefixed with `prefix`.
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut state = vec![(
            format!("{prefix}num_iteration"),
            Tensor::from_slice(&[self.num_iteration as i64]),
        )];
        if let Some(queue) = &self.embedding_queue {
            state.push((format!("{prefix}local_emb_queue"), queue.detach().copy()));
            for (j, scores) in self.score_queues.iter().enumerate() {
                state.push((format!("{prefix}local_queue{j}"), scores.detach().copy()));
            }
        }
        state
    }

    /// Restores [`SwavCriterion::state_tensors`]; every entry must be present with its shape.
    pub fn load_state(&mut self, prefix: &str, state: &[(String, Tensor)]) -> Result<()> {
        let find = |key: String| -> Result<&Tensor> {
            state
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, t)| t)
                .ok_or_else(|| LossError::State {
                    loss: self.loss,
                    reason: format!("checkpoint has no `{key}`"),
                })
        };
        let counter = find(format!("{prefix}num_iteration"))?;
        let num_iteration = counter.f_int64_value(&[0])?;
        let mut embedding_queue = None;
        let mut score_queues = Vec::new();
        if let Some(queue) = &self.embedding_queue {
            let restored = find(format!("{prefix}local_emb_queue"))?;
            self.check_shape("local_emb_queue", restored, queue)?;
            embedding_queue = Some(restored.f_to_kind(queue.kind())?.copy());
            for (j, scores) in self.score_queues.iter().enumerate() {
                let restored = find(format!("{prefix}local_queue{j}"))?;
                self.check_shape(&format!("local_queue{j}"), restored, scores)?;
                score_queues.push(restored.f_to_kind(scores.kind())?.copy());
            }
        }
        self.num_iteration = u64::try_from(num_iteration).map_err(|_| LossError::State {
            loss: self.loss,
            reason: format!("negative num_iteration {num_iteration}"),
        })?;
        self.embedding_queue = embedding_queue;
        self.score_queues = score_queues;
        Ok(())
    }

    fn check_shape(&self, what: &str, restored: &Tensor, own: &Tensor) -> Result<()> {
        if restored.size() == own.size() {
            return Ok(());
        }
        Err(LossError::State {
            loss: self.loss,
            reason: format!(
                "`{what}` has shape {:?} in the checkpoint but {:?} here (queue.local_queue_length, \
                 crops_for_assign and num_prototypes must match)",
                restored.size(),
                own.size()
            ),
        })
    }

    fn input_error(&self, reason: String) -> LossError {
        LossError::Input {
            loss: self.loss,
            reason,
        }
    }
}

/// The prototype matrices (`prototypes<j>.weight`) of the model's last head, in order.
pub fn prototype_weights(
    model: &BaseSslModel,
    count: usize,
    loss: &'static str,
) -> Result<Vec<Tensor>> {
    (0..count)
        .map(|j| {
            let suffix = format!(".prototypes{j}.weight");
            let mut found = model
                .head_variables()
                .iter()
                .filter(|v| v.name.ends_with(&suffix));
            match (found.next(), found.next()) {
                (Some(v), None) => Ok(v.tensor.shallow_clone()),
                (None, _) => Err(LossError::Input {
                    loss,
                    reason: format!(
                        "the model has no `heads.*{suffix}`: {loss} needs a swav_head with \
                         {count} sets of prototypes"
                    ),
                }),
                (Some(_), Some(_)) => Err(LossError::Input {
                    loss,
                    reason: format!("several heads have `{suffix}`; use one swav_head"),
                }),
            }
        })
        .collect()
}

/// Scales every prototype (row) to unit L2 norm in place (VISSL's NormalizePrototypesHook).
pub fn normalize_prototypes(prototypes: &[Tensor]) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for weight in prototypes {
        let normalized = l2_normalize_rows(weight)?;
        weight.shallow_clone().f_copy_(&normalized)?;
    }
    Ok(())
}

/// Zeroes the prototypes' gradients, so that the optimizer leaves their direction unchanged.
///
/// VISSL drops these gradients instead (`grad = None`), which also skips weight decay and
/// momentum; with `normalize_last_layer` both give the same prototypes, because weight decay alone
/// only rescales each row and the normalisation undoes that.
pub fn freeze_prototypes(prototypes: &[Tensor]) {
    for weight in prototypes {
        weight.shallow_clone().zero_grad();
    }
}

/// SwAV's loss.
pub struct SwavLoss {
    criterion: SwavCriterion,
}

impl SwavLoss {
    /// Builds the loss for `ctx`'s rank.
    pub fn new(params: &SwavLossParams, ctx: LossContext) -> Result<Self> {
        Ok(Self {
            criterion: SwavCriterion::new(NAME, params, ctx)?,
        })
    }

    /// The criterion (queue, iteration counter).
    pub fn criterion(&self) -> &SwavCriterion {
        &self.criterion
    }

    fn split<'a>(&self, output: &'a [Tensor]) -> Result<(&'a Tensor, &'a [Tensor])> {
        output.split_first().ok_or_else(|| LossError::Input {
            loss: NAME,
            reason: "expects the swav_head's outputs [embedding, scores...], got none".into(),
        })
    }

    fn prototypes(&self, model: &BaseSslModel) -> Result<Vec<Tensor>> {
        prototype_weights(model, self.criterion.params.num_prototypes.len(), NAME)
    }
}

impl Loss for SwavLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The loss without access to the model: fails once the queue's scores must be recomputed.
    fn forward(&mut self, output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        let (embedding, scores) = self.split(output)?;
        self.criterion.step(embedding, scores, None, None)
    }

    fn forward_step(
        &mut self,
        output: &[Tensor],
        _target: &Tensor,
        step: &StepContext,
    ) -> Result<Tensor> {
        let (embedding, scores) = self.split(output)?;
        let prototypes = if self.criterion.queue_scores_due() {
            Some(self.prototypes(step.model)?)
        } else {
            None
        };
        self.criterion
            .step(embedding, scores, None, prototypes.as_deref())
    }

    fn on_backward(&mut self, step: &StepContext) -> Result<()> {
        if step.iteration < self.criterion.params.freeze_prototypes_niters {
            freeze_prototypes(&self.prototypes(step.model)?);
        }
        Ok(())
    }

    fn on_update(&mut self, step: &StepContext) -> Result<()> {
        if self.criterion.params.normalize_last_layer {
            normalize_prototypes(&self.prototypes(step.model)?)?;
        }
        Ok(())
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.criterion.state_tensors("")
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.criterion.load_state("", state)
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(SwavLoss::new(
        &SwavLossParams::from_yaml(params)?,
        ctx,
    )?))
}
