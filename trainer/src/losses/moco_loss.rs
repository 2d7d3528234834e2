//! `moco_loss`: MoCo v2 (He et al., arXiv 1911.05722; Chen et al., arXiv 2003.04297).
//!
//! The batch comes from `moco_collator`: `data[0]` the query crops (through the trained model),
//! `data[1]` the key crops (through the momentum encoder). Before each step's keys are computed
//! the encoder follows the trained model, `k = m k + (1 - m) q` with `momentum` (0.999), and at the
//! first step it copies it. The loss is the cross-entropy of classifying each query's key among
//! the `queue_size` keys of earlier batches: logits `[<q, k>, <q, queue>] / temperature` on
//! L2-normalised vectors, target 0. After the step the keys of every rank (gathered in rank order)
//! replace the oldest queue entries, round robin, as VISSL does.
//!
//! Batch norm of the key encoder: VISSL shuffles the key images across ranks before the encoder
//! and unshuffles the keys after it (shuffle-BN, so a query's key is never normalised with the
//! same sub-batch statistics as the query), unless the model uses SyncBatchNorm
//! (`MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN`), where statistics are global anyway. We do the
//! same: with more than one rank and no SyncBN the key images are gathered, permuted with a
//! permutation every rank derives from the iteration (no broadcast needed, and a resumed run sees
//! the same one), encoded in slices, gathered back and unpermuted.
//!
//! State for checkpoints: `queue` (`embedding_dim x queue_size`, VISSL's layout), `queue_ptr`, and
//! the encoder's tensors under `moco_encoder.`.

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::momentum_encoder::MomentumEncoder;
use super::{
    config_error, l2_normalize_rows, parse_params, single_output, Loss, LossContext, LossError,
    Result, StepContext,
};
use crate::models::BaseSslModel;

/// The registry name.
pub const NAME: &str = "moco_loss";

const ENCODER_PREFIX: &str = "moco_encoder.";

/// `LOSS.moco_loss`; defaults are VISSL's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MocoParams {
    /// Width of the head output (inferred from the head by the config loader).
    pub embedding_dim: usize,
    /// Keys kept as negatives; a multiple of the global batch.
    pub queue_size: usize,
    /// EMA momentum of the key encoder.
    pub momentum: f64,
    /// Softmax temperature of the logits.
    pub temperature: f64,
}

impl Default for MocoParams {
    fn default() -> Self {
        Self {
            embedding_dim: 128,
            queue_size: 65536,
            momentum: 0.999,
            temperature: 0.2,
        }
    }
}

impl MocoParams {
    /// Reads `LOSS.moco_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }

    fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("{NAME}.{k}");
        if self.embedding_dim == 0 || self.queue_size == 0 {
            return Err(config_error(
                key(if self.embedding_dim == 0 {
                    "embedding_dim"
                } else {
                    "queue_size"
                }),
                "must be positive",
            ));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(config_error(
                key("momentum"),
                format!("must be in [0, 1], got {}", self.momentum),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(config_error(
                key("temperature"),
                format!("must be a positive number, got {}", self.temperature),
            ));
        }
        Ok(())
    }
}

/// MoCo's loss with its queue and key encoder.
pub struct MocoLoss {
    params: MocoParams,
    ctx: LossContext,
    /// `None` where no model copy can be built (unit tests of the criterion).
    encoder: Option<MomentumEncoder>,
    /// `embedding_dim x queue_size`, columns L2-normalised.
    queue: Tensor,
    queue_ptr: i64,
    /// This step's keys of every rank, enqueued once the step's backward is done.
    pending_keys: Option<Tensor>,
}

impl MocoLoss {
    /// Builds the loss; the queue starts as random unit vectors (VISSL), the encoder as a copy of
    /// the model's architecture that takes the trained weights at the first step.
    pub fn new(params: &MocoParams, ctx: LossContext) -> Result<Self> {
        params.validate()?;
        let encoder = match ctx.model_factory {
            Some(_) => Some(MomentumEncoder::new(&ctx, NAME)?),
            None => None,
        };
        let queue = Tensor::f_randn(
            [params.embedding_dim as i64, params.queue_size as i64],
            (Kind::Float, tch::Device::Cpu),
        )?;
        let queue = l2_normalize_rows(&queue.f_tr()?)?.f_tr()?.f_contiguous()?;
        Ok(Self {
            params: params.clone(),
            ctx,
            encoder,
            queue,
            queue_ptr: 0,
            pending_keys: None,
        })
    }

    /// The queue (`embedding_dim x queue_size`) and the column the next keys go to.
    pub fn queue(&self) -> (&Tensor, i64) {
        (&self.queue, self.queue_ptr)
    }

    /// Replaces the queue (tests, or a queue carried over from elsewhere).
    pub fn set_queue(&mut self, queue: &Tensor, ptr: i64) -> Result<()> {
        let expected = [
            self.params.embedding_dim as i64,
            self.params.queue_size as i64,
        ];
        if queue.size() != expected || !(0..expected[1]).contains(&ptr) {
            return Err(self.state_error(format!(
                "queue must be {expected:?} with a pointer in [0, {}), got {:?} and {ptr}",
                expected[1],
                queue.size()
            )));
        }
        self.queue = queue.detach().copy();
        self.queue_ptr = ptr;
        Ok(())
    }

    /// The contrastive loss of this rank's queries against their keys (both `n x embedding_dim`,
    /// keys already L2-normalised) and the queue; remembers the keys of all ranks (`keys_all`,
    /// rank order) for [`MocoLoss::enqueue_pending`].
    pub fn contrast(&mut self, query: &Tensor, keys: &Tensor, keys_all: &Tensor) -> Result<Tensor> {
        let dim = self.params.embedding_dim as i64;
        if query.dim() != 2 || query.size()[1] != dim || keys.size() != query.size() {
            return Err(input_error(format!(
                "queries and keys must both be [n, {dim}] (LOSS.{NAME}.embedding_dim), got {:?} and {:?}",
                query.size(),
                keys.size()
            )));
        }
        if self.queue.device() != query.device() || self.queue.kind() != query.kind() {
            self.queue = self
                .queue
                .f_to_device(query.device())?
                .f_to_kind(query.kind())?;
        }
        let q = l2_normalize_rows(query)?;
        let positive = q.f_mul(keys)?.f_sum_dim_intlist(1, true, q.kind())?;
        let negative = q.f_mm(&self.queue)?;
        let logits =
            Tensor::f_cat(&[positive, negative], 1)?.f_div_scalar(self.params.temperature)?;
        // Cross-entropy with target 0, in the log domain.
        let loss = logits
            .f_logsumexp([1i64], false)?
            .f_sub(&logits.f_select(1, 0)?)?
            .f_mean(q.kind())?;
        self.pending_keys = Some(keys_all.f_detach()?);
        Ok(loss)
    }

    /// Puts the remembered keys into the queue, replacing the oldest (round robin).
    pub fn enqueue_pending(&mut self) -> Result<()> {
        let Some(keys) = self.pending_keys.take() else {
            return Ok(());
        };
        let batch = keys.size()[0];
        let size = self.params.queue_size as i64;
        if size % batch != 0 {
            return Err(config_error(
                format!("{NAME}.queue_size"),
                format!(
                    "{size} is not a multiple of the global batch of {batch} keys \
                     (BATCHSIZE_PER_REPLICA x world size)"
                ),
            ));
        }
        let _guard = tch::no_grad_guard();
        self.queue
            .f_narrow(1, self.queue_ptr, batch)?
            .f_copy_(&keys.f_tr()?.f_to_kind(self.queue.kind())?)?;
        self.queue_ptr = (self.queue_ptr + batch) % size;
        Ok(())
    }

    /// This rank's L2-normalised keys and every rank's (in rank order), with shuffle-BN across
    /// ranks when it applies.
    fn keys(
        &self,
        encoder: &BaseSslModel,
        key_crops: &Tensor,
        iteration: u64,
    ) -> Result<(Tensor, Tensor)> {
        let _guard = tch::no_grad_guard();
        let encode = |x: &Tensor| -> Result<Tensor> {
            let out = encoder
                .forward_t(x, true)
                .map_err(|e| input_error(format!("momentum encoder forward failed: {e}")))?;
            l2_normalize_rows(single_output(&out, NAME)?)
        };
        let world = self.ctx.world_size;
        let gather = |t: &Tensor| {
            (self.ctx.gather)(t).map_err(|reason| LossError::Gather { loss: NAME, reason })
        };
        if world == 1 {
            let keys = encode(key_crops)?;
            return Ok((keys.shallow_clone(), keys));
        }
        if crate::dist::sync_bn::is_active() {
            let keys = encode(key_crops)?;
            let all = gather(&keys)?;
            return Ok((keys, all));
        }
        let n = key_crops.size()[0];
        let total = n * world as i64;
        let images = gather(key_crops)?;
        if images.size()[0] != total {
            return Err(input_error(format!(
                "ranks hold different batch sizes: gathered {} key crops, expected {world} x {n}",
                images.size()[0]
            )));
        }
        let permutation = shared_permutation(total as usize, iteration);
        let device = key_crops.device();
        let perm = Tensor::f_from_slice(&permutation)?.f_to_device(device)?;
        let rank = self.ctx.rank as i64;
        let mine = images.f_index_select(0, &perm.f_narrow(0, rank * n, n)?)?;
        let shuffled_keys = gather(&encode(&mine)?)?;
        let keys_all = shuffled_keys.f_index_select(0, &perm.f_argsort(0, false)?)?;
        Ok((keys_all.f_narrow(0, rank * n, n)?, keys_all))
    }

    fn state_error(&self, reason: String) -> LossError {
        LossError::State { loss: NAME, reason }
    }
}

/// A permutation of `0..len` that every rank computes alike from the iteration (Fisher-Yates over
/// a splitmix64 stream), so shuffle-BN needs no broadcast and is reproducible on resume.
fn shared_permutation(len: usize, iteration: u64) -> Vec<i64> {
    let mut state = iteration ^ 0x6D6F_636F_5F62_6E00;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut perm: Vec<i64> = (0..len as i64).collect();
    for i in (1..len).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

fn input_error(reason: String) -> LossError {
    LossError::Input { loss: NAME, reason }
}

impl Loss for MocoLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn model_crops(&self) -> Option<usize> {
        Some(1)
    }

    fn forward(&mut self, _output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        Err(input_error(
            "needs the training step (key crops and the momentum encoder); it has no \
             evaluation-only form"
                .into(),
        ))
    }

    fn forward_step(
        &mut self,
        output: &[Tensor],
        _target: &Tensor,
        step: &StepContext,
    ) -> Result<Tensor> {
        let Some(key_crops) = step.crops.get(1) else {
            return Err(input_error(
                "needs query and key crops: DATA.TRAIN.COLLATE_FUNCTION moco_collator with two \
                 copies of each image (ImgReplicatePil num_times: 2)"
                    .into(),
            ));
        };
        let n = key_crops.size()[0];
        let output = single_output(output, NAME)?;
        // The engine feeds the model the query crops only (`model_crops`).
        let query = match output.size().first() {
            Some(&rows) if rows == n => output.shallow_clone(),
            _ => {
                return Err(input_error(format!(
                    "model output has shape {:?}, expected {n} query rows (the model sees \
                     the query crops only)",
                    output.size()
                )))
            }
        };
        let momentum = self.params.momentum;
        let encoder = self.encoder.as_mut().ok_or_else(|| {
            input_error(
                "needs a momentum encoder, but no copy of the model can be built here".into(),
            )
        })?;
        encoder.update(step.model, momentum)?;
        let encoder = self
            .encoder
            .as_ref()
            .map(MomentumEncoder::model)
            .ok_or_else(|| input_error("momentum encoder missing".into()))?;
        let (keys, keys_all) = self.keys(encoder, key_crops, step.iteration)?;
        self.contrast(&query, &keys, &keys_all)
    }

    fn on_update(&mut self, _step: &StepContext) -> Result<()> {
        self.enqueue_pending()
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![
            ("queue".to_string(), self.queue.detach().copy()),
            (
                "queue_ptr".to_string(),
                Tensor::from_slice(&[self.queue_ptr]),
            ),
        ];
        if let Some(encoder) = self.encoder.as_ref().filter(|e| e.is_initialised()) {
            state.extend(encoder.state_tensors(ENCODER_PREFIX));
        }
        state
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let find = |name: &str| {
            state
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| LossError::State {
                    loss: NAME,
                    reason: format!("checkpoint has no `{name}`"),
                })
        };
        let ptr = find("queue_ptr")?.f_int64_value(&[0])?;
        let queue = find("queue")?.f_to_device(self.queue.device())?;
        self.set_queue(&queue, ptr)?;
        if let Some(encoder) = self.encoder.as_mut() {
            encoder.load_state(ENCODER_PREFIX, state)?;
        }
        self.pending_keys = None;
        Ok(())
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(MocoLoss::new(
        &MocoParams::from_yaml(params)?,
        ctx,
    )?))
}
