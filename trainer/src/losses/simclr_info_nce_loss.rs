//! `simclr_info_nce_loss`: SimCLR's NT-Xent loss (Chen et al., arXiv 2002.05709) over two views.

use serde::Deserialize;
use tch::Tensor;

use super::info_nce::{
    check_temperature, check_world, BufferParams, CropLayout, InfoNceCriterion, NceMasks,
    NegativeScope,
};
use super::{config_error, parse_params, single_output, Loss, LossContext, Result};

/// The registry name.
pub const NAME: &str = "simclr_info_nce_loss";

/// SimCLR always contrasts two views of each image.
const NUM_POSITIVES: usize = 2;

/// `LOSS.simclr_info_nce_loss`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimclrInfoNceParams {
    /// Softmax temperature of the similarities.
    pub temperature: f64,
    /// `effective_batch_size` counts views: 2 x images per rank x world size.
    pub buffer_params: BufferParams,
}

impl Default for SimclrInfoNceParams {
    fn default() -> Self {
        Self {
            temperature: 0.1,
            buffer_params: BufferParams::default(),
        }
    }
}

impl SimclrInfoNceParams {
    /// Reads `LOSS.simclr_info_nce_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }
}

/// SimCLR's loss: each view's positive is the other view of its image, its negatives are all other
/// images' views on every rank.
pub struct SimclrInfoNceLoss {
    criterion: InfoNceCriterion,
}

impl SimclrInfoNceLoss {
    /// Builds the loss for `ctx`'s rank; the buffer params must match `ctx`'s world size.
    pub fn new(params: &SimclrInfoNceParams, ctx: LossContext) -> Result<Self> {
        check_temperature(NAME, params.temperature)?;
        let buffer = &params.buffer_params;
        check_world(NAME, buffer, &ctx)?;
        let per_rank = buffer.effective_batch_size / buffer.world_size;
        if !per_rank.is_multiple_of(NUM_POSITIVES) {
            return Err(config_error(
                format!("{NAME}.buffer_params.effective_batch_size"),
                format!("{per_rank} views per rank is not a multiple of {NUM_POSITIVES}"),
            ));
        }
        let layout = CropLayout {
            images_per_rank: per_rank / NUM_POSITIVES,
            num_crops: NUM_POSITIVES,
            rank: ctx.rank,
            world_size: ctx.world_size,
        };
        let criterion = InfoNceCriterion::new(
            NAME,
            layout,
            NegativeScope::AllRanks,
            buffer.embedding_dim,
            params.temperature,
            ctx,
        )?;
        Ok(Self { criterion })
    }

    /// The precomputed masks (VISSL's `pos_mask` / `neg_mask`).
    pub fn masks(&self) -> &NceMasks {
        self.criterion.masks()
    }
}

impl Loss for SimclrInfoNceLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        self.criterion.forward(single_output(output, NAME)?)
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(SimclrInfoNceLoss::new(
        &SimclrInfoNceParams::from_yaml(params)?,
        ctx,
    )?))
}
