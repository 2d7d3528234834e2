//! The InfoNCE core shared by `simclr_info_nce_loss` and `multicrop_simclr_info_nce_loss`.
//!
//! Each rank holds `num_crops` crops of `images_per_rank` images, crop-major (all images' crop 0,
//! then all crop 1, ...), which is what `simclr_collator` / multi-crop collation produce. The
//! embeddings of all ranks are gathered in rank order; fixed 0/1 masks over the gathered columns
//! pick, for each local anchor, its positive for every other crop and its negatives.
//!
//! For anchor `a` and one positive `p` the term is `-log(e_ap / (e_ap + sum_neg e_an))` with
//! `e_xy = exp(<x, y> / T)` on L2-normalised embeddings; the loss is the mean over all
//! (anchor, positive) pairs. The other crops of the anchor's image are neither positives nor
//! negatives of a term, as in VISSL.

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::{l2_normalize_rows, GatherFn, LossContext, LossError, Result};

/// `LOSS.<name>.buffer_params` of both SimCLR losses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferParams {
    /// Number of processes (inferred by the config loader).
    pub world_size: usize,
    /// Width of the projection head output.
    pub embedding_dim: usize,
    /// Global batch; its meaning differs per loss (crops for SimCLR, images for multi-crop).
    pub effective_batch_size: usize,
}

impl Default for BufferParams {
    fn default() -> Self {
        // VISSL's defaults.yaml values.
        Self {
            world_size: 64,
            embedding_dim: 128,
            effective_batch_size: 4096,
        }
    }
}

/// Which gathered embeddings are negatives for an anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NegativeScope {
    /// Every other image on every rank (`simclr_info_nce_loss`).
    AllRanks,
    /// Only the other images of the anchor's own rank (VISSL's `multicrop_simclr_info_nce_loss`
    /// masks out other ranks' columns, although it gathers them).
    OwnRank,
}

/// How one rank's batch of crops sits inside the gathered embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropLayout {
    /// Distinct images per rank.
    pub images_per_rank: usize,
    /// Crops (views) per image; at least 2.
    pub num_crops: usize,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
}

impl CropLayout {
    /// Embeddings one rank contributes (rows of the local batch).
    pub fn rows_per_rank(&self) -> usize {
        self.images_per_rank * self.num_crops
    }

    /// Rows of the gathered embeddings.
    pub fn total_rows(&self) -> usize {
        self.rows_per_rank() * self.world_size
    }

    /// Whether the layout poses a contrastive task: two crops to pair, and another image to
    /// contrast with (otherwise VISSL's loss is identically zero).
    pub fn check(&self, scope: NegativeScope) -> Result<(), String> {
        let other_images =
            self.images_per_rank > 1 || (scope == NegativeScope::AllRanks && self.world_size > 1);
        if self.num_crops < 2
            || self.images_per_rank == 0
            || self.rank >= self.world_size
            || !other_images
        {
            return Err(format!(
                "no contrastive task for {self:?} with {scope:?} negatives: needs >= 2 crops, \
                 rank < world size, and another image to contrast with"
            ));
        }
        Ok(())
    }
}

/// VISSL's precomputed positive and negative masks for one rank (rows: local anchors, columns:
/// gathered embeddings), as float 0/1 tensors on the CPU.
#[derive(Debug)]
pub struct NceMasks {
    /// One mask per crop offset `d = 1..num_crops`: anchor crop `c` of image `i` -> crop
    /// `(c + d) mod num_crops` of image `i` on the same rank.
    pub positives: Vec<Tensor>,
    /// The negatives of every anchor.
    pub negatives: Tensor,
    /// The column of each row's positive, per offset, as `(rows, 1)` int64 (the masks' ones).
    pub positive_columns: Vec<Tensor>,
}

impl NceMasks {
    /// Builds the masks for `layout`, with negatives drawn from `scope`.
    pub fn new(layout: &CropLayout, scope: NegativeScope) -> Result<Self> {
        layout.check(scope).map_err(|reason| LossError::Input {
            loss: "info_nce",
            reason,
        })?;
        let (n, k) = (layout.images_per_rank, layout.num_crops);
        let rows = layout.rows_per_rank();
        let cols = layout.total_rows();
        let own = layout.rank * rows;
        let mask_tensor = |data: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(&data)?.f_view([rows as i64, cols as i64])?)
        };

        let mut positives = Vec::new();
        let mut positive_columns = Vec::new();
        for d in 1..k {
            let columns: Vec<i64> = (0..rows)
                .map(|row| (own + ((row / n + d) % k) * n + row % n) as i64)
                .collect();
            let mut mask = vec![0f32; rows * cols];
            for (row, &col) in columns.iter().enumerate() {
                mask[row * cols + col as usize] = 1.0;
            }
            positives.push(mask_tensor(mask)?);
            positive_columns.push(Tensor::f_from_slice(&columns)?.f_view([rows as i64, 1])?);
        }

        let (first, last) = match scope {
            NegativeScope::AllRanks => (0, cols),
            NegativeScope::OwnRank => (own, own + rows),
        };
        let mut negatives = vec![0f32; rows * cols];
        for (row, values) in negatives.chunks_mut(cols).enumerate() {
            values[first..last].fill(1.0);
            // Every crop of the anchor's own image (itself included) is not a negative.
            for same_image in 0..k {
                values[own + same_image * n + row % n] = 0.0;
            }
        }
        Ok(Self {
            positives,
            negatives: mask_tensor(negatives)?,
            positive_columns,
        })
    }
}

/// What the loss computation needs of the masks, on the embeddings' device.
struct DeviceMasks {
    device: Device,
    positive_columns: Vec<Tensor>,
    /// True where a column is not a negative of the row.
    not_negative: Tensor,
}

impl DeviceMasks {
    fn new(masks: &NceMasks, device: Device) -> Result<Self> {
        Ok(Self {
            device,
            positive_columns: masks
                .positive_columns
                .iter()
                .map(|c| c.f_to_device(device))
                .collect::<Result<_, _>>()?,
            not_negative: masks.negatives.f_eq(0.0)?.f_to_device(device)?,
        })
    }
}

/// The InfoNCE loss over fixed masks: normalises a rank's embeddings, gathers them from all ranks
/// and averages `-log(pos / (pos + neg))` over every (anchor, positive) pair.
pub struct InfoNceCriterion {
    loss: &'static str,
    layout: CropLayout,
    embedding_dim: usize,
    temperature: f64,
    masks: NceMasks,
    /// The masks on the device of the last embeddings seen.
    device_masks: DeviceMasks,
    gather: GatherFn,
}

impl InfoNceCriterion {
    /// A criterion for `layout`; `loss` names the owning loss in error messages.
    pub fn new(
        loss: &'static str,
        layout: CropLayout,
        scope: NegativeScope,
        embedding_dim: usize,
        temperature: f64,
        ctx: LossContext,
    ) -> Result<Self> {
        layout.check(scope).map_err(|reason| {
            super::config_error(format!("{loss}.buffer_params.effective_batch_size"), reason)
        })?;
        let masks = NceMasks::new(&layout, scope)?;
        Ok(Self {
            loss,
            layout,
            embedding_dim,
            temperature,
            device_masks: DeviceMasks::new(&masks, Device::Cpu)?,
            masks,
            gather: ctx.gather,
        })
    }

    /// The masks in VISSL's layout.
    pub fn masks(&self) -> &NceMasks {
        &self.masks
    }

    /// The loss of one rank's raw (unnormalised) embeddings, `rows_per_rank x embedding_dim`.
    pub fn forward(&mut self, embedding: &Tensor) -> Result<Tensor> {
        let expected = [
            self.layout.rows_per_rank() as i64,
            self.embedding_dim as i64,
        ];
        if embedding.size() != expected {
            return Err(self.input_error(format!(
                "expects embeddings of shape {expected:?} (rows: {} images x {} crops on this rank; \
                 columns: buffer_params.embedding_dim), got {:?}",
                self.layout.images_per_rank,
                self.layout.num_crops,
                embedding.size()
            )));
        }
        let anchors = l2_normalize_rows(embedding)?;
        let gathered = (self.gather)(&anchors).map_err(|reason| LossError::Gather {
            loss: self.loss,
            reason,
        })?;
        let gathered_expected = [self.layout.total_rows() as i64, self.embedding_dim as i64];
        if gathered.size() != gathered_expected {
            return Err(self.input_error(format!(
                "gathered embeddings have shape {:?}, expected {gathered_expected:?} \
                 ({} ranks x {} rows)",
                gathered.size(),
                self.layout.world_size,
                self.layout.rows_per_rank()
            )));
        }
        if self.device_masks.device != anchors.device() {
            self.device_masks = DeviceMasks::new(&self.masks, anchors.device())?;
        }
        nce_from_masks(&anchors, &gathered, &self.device_masks, self.temperature)
    }

    fn input_error(&self, reason: String) -> LossError {
        LossError::Input {
            loss: self.loss,
            reason,
        }
    }
}

/// The mean over (anchor, positive) of `-log(e_p / (e_p + sum_neg e_n))`, evaluated in the log
/// domain as `softplus(logsumexp_neg(l) - l_p)` on the logits `l = <a, x> / T`: the same value as
/// VISSL's exp-then-divide, but finite at any temperature and accurate when the loss is tiny.
fn nce_from_masks(
    anchors: &Tensor,
    gathered: &Tensor,
    masks: &DeviceMasks,
    temperature: f64,
) -> Result<Tensor> {
    let logits = anchors.f_mm(&gathered.f_tr()?)?.f_div_scalar(temperature)?;
    let negatives_lse = logits
        .f_masked_fill(&masks.not_negative, f64::NEG_INFINITY)?
        .f_logsumexp([1i64], true)?;
    let terms = masks
        .positive_columns
        .iter()
        .map(|columns| {
            Ok(negatives_lse
                .f_sub(&logits.f_gather(1, columns, false)?)?
                .f_softplus()?)
        })
        .collect::<Result<Vec<_>>>()?;
    // Every anchor has exactly one positive per offset, so the mean runs over all terms.
    Ok(Tensor::f_cat(&terms, 0)?.f_mean(None::<Kind>)?)
}

/// Checks the buffer params against where the loss runs; `section` is `LOSS.<name>`'s name.
pub(crate) fn check_world(section: &str, buffer: &BufferParams, ctx: &LossContext) -> Result<()> {
    let key = |k: &str| format!("{section}.buffer_params.{k}");
    if buffer.world_size != ctx.world_size {
        return Err(super::config_error(
            key("world_size"),
            format!(
                "is {} but the run has {} process(es); the config loader infers it from \
                 DISTRIBUTED.NUM_NODES x NUM_PROC_PER_NODE",
                buffer.world_size, ctx.world_size
            ),
        ));
    }
    if ctx.rank >= ctx.world_size {
        return Err(super::config_error(
            key("world_size"),
            format!("rank {} is outside a world of {}", ctx.rank, ctx.world_size),
        ));
    }
    if buffer.embedding_dim == 0 {
        return Err(super::config_error(
            key("embedding_dim"),
            "must be positive",
        ));
    }
    if buffer.effective_batch_size == 0
        || !buffer
            .effective_batch_size
            .is_multiple_of(buffer.world_size)
    {
        return Err(super::config_error(
            key("effective_batch_size"),
            format!(
                "{} must be a positive multiple of world_size {}",
                buffer.effective_batch_size, buffer.world_size
            ),
        ));
    }
    Ok(())
}

/// Checks a temperature; `section` is `LOSS.<name>`'s name.
pub(crate) fn check_temperature(section: &str, temperature: f64) -> Result<()> {
    if temperature > 0.0 && temperature.is_finite() {
        Ok(())
    } else {
        Err(super::config_error(
            format!("{section}.temperature"),
            format!("{temperature} must be positive"),
        ))
    }
}
