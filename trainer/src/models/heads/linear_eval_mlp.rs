//! The `eval_mlp` head ("Zhang et al. style" linear evaluation): BatchNorm2d over the feature's
//! channels, flatten, then an `mlp`. Parameters: `channel_bn.*` and `clf.clf.<k>.*`.

use super::mlp::{Mlp, MlpParams};
use super::{Head, HeadConfig, HeadSettings};
use crate::models::trunks::FeatureShape;
use crate::models::yaml::{positive_ints, Block};
use crate::models::{shape_str, ModelError, Result};
use std::sync::Arc;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// The kwargs of an `eval_mlp` head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearEvalMlpParams {
    /// Channels of the 4-D feature (the batch norm's size).
    pub in_channels: i64,
    /// The MLP after flattening: `dims[0]` is channels x height x width of the pooled feature.
    pub mlp: MlpParams,
}

/// Parses `eval_mlp` kwargs.
pub(crate) fn parse(kwargs: &Block) -> Result<Arc<dyn HeadConfig>> {
    kwargs.check_keys(&["in_channels", "dims", "use_bn", "use_relu", "use_residual"])?;
    let in_channels = kwargs.int("in_channels", 0)?;
    if in_channels < 1 {
        return Err(ModelError::invalid(
            kwargs.key_path("in_channels"),
            "is required and must be positive",
        ));
    }
    if kwargs.bool("use_residual", false)? {
        return Err(ModelError::invalid(
            kwargs.key_path("use_residual"),
            "residual MLPs are not supported",
        ));
    }
    let dims_path = kwargs.key_path("dims");
    let dims = match kwargs.get("dims") {
        Some(v) => positive_ints(&dims_path, v)?,
        None => return Err(ModelError::invalid(dims_path, "is required")),
    };
    if dims.len() < 2 {
        return Err(ModelError::invalid(
            dims_path,
            format!("needs at least [in, out], got {dims:?}"),
        ));
    }
    let mlp = MlpParams {
        use_bn: kwargs.bool("use_bn", false)?,
        use_relu: kwargs.bool("use_relu", false)?,
        ..MlpParams::new(dims)
    };
    Ok(Arc::new(LinearEvalMlpParams { in_channels, mlp }))
}

impl HeadConfig for LinearEvalMlpParams {
    fn output_shape(&self, layer: &str, input: FeatureShape) -> Result<FeatureShape> {
        let expected = || format!("[N, {}, H, W]", self.in_channels);
        match input {
            FeatureShape::Map { channels } if channels != self.in_channels => {
                return Err(ModelError::shape(
                    layer,
                    expected(),
                    format!("[N, {channels}, H, W]"),
                ))
            }
            FeatureShape::Vector(d) if d != self.in_channels => {
                return Err(ModelError::shape(
                    layer,
                    format!("[N, {}]", self.in_channels),
                    format!("[N, {d}]"),
                ))
            }
            FeatureShape::Vector(d) if d != self.mlp.dims[0] => {
                return Err(ModelError::shape(
                    layer,
                    format!("dims[0] = {d} for an [N, {d}] feature"),
                    format!("dims[0] = {}", self.mlp.dims[0]),
                ))
            }
            _ => {}
        }
        Ok(FeatureShape::Vector(self.mlp.dims[self.mlp.dims.len() - 1]))
    }

    fn build(&self, p: nn::Path, layer: &str, settings: &HeadSettings) -> Result<Box<dyn Head>> {
        Ok(Box::new(LinearEvalMlp::new(p, layer, self, settings)?))
    }
}

/// A built `eval_mlp` head.
#[derive(Debug)]
pub struct LinearEvalMlp {
    layer: String,
    in_channels: i64,
    flat_dim: i64,
    // dist-integration: syncable batch norm (SyncBatchNorm when MODEL.SYNC_BN_CONFIG installs a group).
    channel_bn: crate::dist::sync_bn::BatchNorm,
    clf: Mlp,
}

impl LinearEvalMlp {
    /// Builds the head under `p` (`channel_bn`, `clf.clf.<k>`).
    pub fn new(
        p: nn::Path,
        layer: &str,
        cfg: &LinearEvalMlpParams,
        settings: &HeadSettings,
    ) -> Result<Self> {
        Ok(LinearEvalMlp {
            layer: layer.to_string(),
            in_channels: cfg.in_channels,
            flat_dim: cfg.mlp.dims[0],
            channel_bn: crate::dist::sync_bn::batch_norm2d(
                &p / "channel_bn",
                cfg.in_channels,
                settings.batch_norm(),
            ),
            clf: Mlp::new(&p / "clf", layer, &cfg.mlp, settings)?,
        })
    }
}

impl Head for LinearEvalMlp {
    /// Accepts `N x C x H x W` (or `N x C`, read as `N x C x 1 x 1`).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let size = xs.size();
        let xs = if size.len() == 2 {
            xs.unsqueeze(2).unsqueeze(3)
        } else {
            xs.shallow_clone()
        };
        let size4 = xs.size();
        let spatial: i64 = size4.iter().skip(2).product();
        let fits =
            size4.len() == 4 && size4[1] == self.in_channels && size4[1] * spatial == self.flat_dim;
        if !fits {
            let expected = format!(
                "[N, {}, H, W] with {} x H x W = {}",
                self.in_channels, self.in_channels, self.flat_dim
            );
            return Err(ModelError::shape(&self.layer, expected, shape_str(&size)));
        }
        if train && size4[0] * spatial < 2 {
            return Err(ModelError::shape(
                &self.layer,
                "more than one value per channel to train batch norm",
                shape_str(&size),
            ));
        }
        let out = self.channel_bn.forward_t(&xs, train).flatten(1, -1);
        Ok(self.clf.forward_2d(&out, train))
    }
}
