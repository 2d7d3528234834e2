//! `multicrop_simclr_info_nce_loss`: SimCLR's loss over any number of crops per image (SwAV's
//! multi-crop, Caron et al., arXiv 2006.09882).

use serde::Deserialize;
use tch::Tensor;

use super::info_nce::{
    check_temperature, check_world, BufferParams, CropLayout, InfoNceCriterion, NceMasks,
    NegativeScope,
};
use super::{config_error, parse_params, single_output, Loss, LossContext, Result};

/// The registry name.
pub const NAME: &str = "multicrop_simclr_info_nce_loss";

/// `LOSS.multicrop_simclr_info_nce_loss`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiCropSimclrInfoNceParams {
    /// Softmax temperature of the similarities.
    pub temperature: f64,
    /// Crops per image (inferred from the transforms by the config loader).
    pub num_crops: usize,
    /// `effective_batch_size` counts images, not crops: images per rank x world size.
    pub buffer_params: BufferParams,
}

impl Default for MultiCropSimclrInfoNceParams {
    fn default() -> Self {
        Self {
            temperature: 0.1,
            num_crops: 2,
            buffer_params: BufferParams::default(),
        }
    }
}

impl MultiCropSimclrInfoNceParams {
    /// Reads `LOSS.multicrop_simclr_info_nce_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }
}

/// Multi-crop SimCLR: every other crop of an image is a positive, one term each; negatives are the
/// other images' crops on the anchor's own rank only, as in VISSL.
pub struct MultiCropSimclrInfoNceLoss {
    criterion: InfoNceCriterion,
}

impl MultiCropSimclrInfoNceLoss {
    /// Builds the loss for `ctx`'s rank; the buffer params must match `ctx`'s world size.
    pub fn new(params: &MultiCropSimclrInfoNceParams, ctx: LossContext) -> Result<Self> {
        check_temperature(NAME, params.temperature)?;
        if params.num_crops < 2 {
            return Err(config_error(
                format!("{NAME}.num_crops"),
                format!(
                    "{} leaves no positives; needs at least 2 crops per image",
                    params.num_crops
                ),
            ));
        }
        let buffer = &params.buffer_params;
        check_world(NAME, buffer, &ctx)?;
        let layout = CropLayout {
            images_per_rank: buffer.effective_batch_size / buffer.world_size,
            num_crops: params.num_crops,
            rank: ctx.rank,
            world_size: ctx.world_size,
        };
        let criterion = InfoNceCriterion::new(
            NAME,
            layout,
            NegativeScope::OwnRank,
            buffer.embedding_dim,
            params.temperature,
            ctx,
        )?;
        Ok(Self { criterion })
    }

    /// The precomputed masks (one positive mask per crop offset, one negative mask).
    pub fn masks(&self) -> &NceMasks {
        self.criterion.masks()
    }
}

impl Loss for MultiCropSimclrInfoNceLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        self.criterion.forward(single_output(output, NAME)?)
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(MultiCropSimclrInfoNceLoss::new(
        &MultiCropSimclrInfoNceParams::from_yaml(params)?,
        ctx,
    )?))
}
