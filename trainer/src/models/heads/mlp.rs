//! The `mlp` head: Linear [-> BatchNorm1d] [-> ReLU] [-> Dropout], repeated for each step of `dims`.
//!
//! Parameters sit in VISSL's `clf` sequence, numbered like `nn.Sequential` (ReLU and Dropout take
//! an index too): `dims: [2048, 2048, 128], use_bn: true, use_relu: true` gives
//! `clf.0` Linear, `clf.1` BatchNorm1d, (`clf.2` ReLU), `clf.3` Linear.

use super::{linear, Head, HeadConfig, HeadSettings};
use crate::models::trunks::FeatureShape;
use crate::models::yaml::{positive_ints, Block};
use crate::models::{shape_str, ModelError, Result};
use std::sync::Arc;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// The kwargs of an `mlp` head; defaults are VISSL's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpParams {
    /// Layer sizes: `[in, hidden..., out]`, at least two entries.
    pub dims: Vec<i64>,
    /// Add BatchNorm1d after each linear layer.
    pub use_bn: bool,
    /// Add ReLU after each linear layer (and its norm).
    pub use_relu: bool,
    /// Add Dropout(0.5) after each linear layer (and its norm/ReLU).
    pub use_dropout: bool,
    /// Give the linear layers a bias.
    pub use_bias: bool,
    /// Leave the last linear layer bare (no BN/ReLU/Dropout after it).
    pub skip_last_layer_relu_bn: bool,
}

impl MlpParams {
    /// A plain MLP (linear layers only) with these dims.
    pub fn new(dims: Vec<i64>) -> Self {
        MlpParams {
            dims,
            use_bn: false,
            use_relu: false,
            use_dropout: false,
            use_bias: true,
            skip_last_layer_relu_bn: true,
        }
    }

    /// Checks `dims` (named `path` in errors).
    fn validate(&self, path: &str) -> Result<()> {
        if self.dims.len() < 2 {
            return Err(ModelError::invalid(
                path,
                format!("needs at least [in, out], got {:?}", self.dims),
            ));
        }
        Ok(())
    }
}

/// Parses `mlp` kwargs.
pub(crate) fn parse(kwargs: &Block) -> Result<Arc<dyn HeadConfig>> {
    kwargs.check_keys(&[
        "dims",
        "use_bn",
        "use_relu",
        "use_dropout",
        "use_bias",
        "skip_last_layer_relu_bn",
    ])?;
    let dims_path = kwargs.key_path("dims");
    let dims = match kwargs.get("dims") {
        Some(v) => positive_ints(&dims_path, v)?,
        None => return Err(ModelError::invalid(dims_path, "is required")),
    };
    let d = MlpParams::new(dims);
    let params = MlpParams {
        use_bn: kwargs.bool("use_bn", d.use_bn)?,
        use_relu: kwargs.bool("use_relu", d.use_relu)?,
        use_dropout: kwargs.bool("use_dropout", d.use_dropout)?,
        use_bias: kwargs.bool("use_bias", d.use_bias)?,
        skip_last_layer_relu_bn: kwargs
            .bool("skip_last_layer_relu_bn", d.skip_last_layer_relu_bn)?,
        ..d
    };
    params.validate(&dims_path)?;
    Ok(Arc::new(params))
}

impl HeadConfig for MlpParams {
    fn output_shape(&self, layer: &str, input: FeatureShape) -> Result<FeatureShape> {
        if let FeatureShape::Vector(d) = input {
            if d != self.dims[0] {
                return Err(ModelError::shape(
                    layer,
                    format!("[N, {}]", self.dims[0]),
                    format!("[N, {d}]"),
                ));
            }
        }
        Ok(FeatureShape::Vector(self.dims[self.dims.len() - 1]))
    }

    fn build(&self, p: nn::Path, layer: &str, settings: &HeadSettings) -> Result<Box<dyn Head>> {
        Ok(Box::new(Mlp::new(p, layer, self, settings)?))
    }
}

#[derive(Debug)]
enum MlpLayer {
    Linear(nn::Linear),
    // dist-integration: syncable batch norm (SyncBatchNorm when MODEL.SYNC_BN_CONFIG installs a group).
    BatchNorm(crate::dist::sync_bn::BatchNorm),
    Relu,
    Dropout,
}

/// A built `mlp` head.
#[derive(Debug)]
pub struct Mlp {
    layer: String,
    in_dim: i64,
    layers: Vec<MlpLayer>,
}

impl Mlp {
    /// Builds the MLP with its layers under `p / "clf"`.
    pub fn new(p: nn::Path, layer: &str, cfg: &MlpParams, settings: &HeadSettings) -> Result<Self> {
        cfg.validate(&format!("{layer} dims"))?;
        let clf = &p / "clf";
        let mut layers = Vec::new();
        let steps = cfg.dims.len() - 1;
        for (step, pair) in cfg.dims.windows(2).enumerate() {
            let (d_in, d_out) = (pair[0], pair[1]);
            layers.push(MlpLayer::Linear(linear(
                &clf / layers.len(),
                d_in,
                d_out,
                cfg.use_bias,
                settings,
            )?));
            if step == steps - 1 && cfg.skip_last_layer_relu_bn {
                break;
            }
            if cfg.use_bn {
                layers.push(MlpLayer::BatchNorm(crate::dist::sync_bn::batch_norm1d(
                    &clf / layers.len(),
                    d_out,
                    settings.batch_norm(),
                )));
            }
            if cfg.use_relu {
                layers.push(MlpLayer::Relu);
            }
            if cfg.use_dropout {
                layers.push(MlpLayer::Dropout);
            }
        }
        Ok(Mlp {
            layer: layer.to_string(),
            in_dim: cfg.dims[0],
            layers,
        })
    }

    /// Applies the layers to an `N x dims[0]` batch (shape already checked).
    pub(crate) fn forward_2d(&self, xs: &Tensor, train: bool) -> Tensor {
        self.layers
            .iter()
            .fold(xs.shallow_clone(), |out, layer| match layer {
                MlpLayer::Linear(l) => l.forward(&out),
                MlpLayer::BatchNorm(bn) => bn.forward_t(&out, train),
                MlpLayer::Relu => out.relu(),
                MlpLayer::Dropout => out.dropout(0.5, train),
            })
    }
}

impl Head for Mlp {
    /// Accepts `N x D` or `N x D x 1 x 1` (VISSL's contract).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let size = xs.size();
        let fits = size.len() >= 2 && size[1] == self.in_dim && size[2..].iter().all(|&d| d == 1);
        if !fits {
            let expected = format!("[N, {0}] or [N, {0}, 1, 1]", self.in_dim);
            return Err(ModelError::shape(&self.layer, expected, shape_str(&size)));
        }
        let has_bn = self
            .layers
            .iter()
            .any(|l| matches!(l, MlpLayer::BatchNorm(_)));
        if train && has_bn && size[0] < 2 {
            return Err(ModelError::shape(
                &self.layer,
                "a batch of at least 2 to train batch norm",
                shape_str(&size),
            ));
        }
        Ok(self.forward_2d(&xs.reshape([size[0], size[1]]), train))
    }
}
