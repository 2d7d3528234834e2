//! The `dino_head`: DINO's projection head (Caron et al., arXiv 2104.14294).
//!
//! An MLP (`num_layers` Linear layers, GELU between them, optional BatchNorm1d) down to
//! `bottleneck_dim`, L2 normalisation, then a weight-normalised linear layer without bias onto the
//! `num_clusters[0]` prototypes: `weight = g * v / ||v||` per prototype. With
//! `normalize_last_layer` (default) `g` is fixed at 1 (a buffer), otherwise it is trained.
//! Parameter names are VISSL's: `mlp.<i>` (numbered as `nn.Sequential`, GELU taking an index; a
//! single layer is just `mlp`), `prototypes0.weight_g`, `prototypes0.weight_v`. The MLP's linear
//! weights start as N(0, 0.02) with zero biases; `weight_v` as PyTorch's `nn.Linear`.

use super::{Head, HeadConfig, HeadSettings};
use crate::models::trunks::FeatureShape;
use crate::models::yaml::{positive_ints, Block};
use crate::models::{shape_str, ModelError, Result};
use std::sync::Arc;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// The kwargs of a `dino_head`; defaults are VISSL's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DinoHeadParams {
    /// Width of the trunk feature.
    pub in_dim: i64,
    /// Prototype counts; DINO uses exactly one.
    pub num_clusters: Vec<i64>,
    /// BatchNorm1d after each hidden linear layer.
    pub use_bn: bool,
    /// Keep the prototypes' norms fixed at 1.
    pub normalize_last_layer: bool,
    /// Linear layers of the MLP (at least 1).
    pub num_layers: i64,
    /// Width of the hidden layers.
    pub hidden_dim: i64,
    /// Width of the L2-normalised bottleneck.
    pub bottleneck_dim: i64,
}

/// Parses `dino_head` kwargs.
pub(crate) fn parse(kwargs: &Block) -> Result<Arc<dyn HeadConfig>> {
    kwargs.check_keys(&[
        "in_dim",
        "num_clusters",
        "use_bn",
        "normalize_last_layer",
        "num_layers",
        "hidden_dim",
        "bottleneck_dim",
    ])?;
    let required = |key: &str| {
        kwargs
            .get(key)
            .ok_or_else(|| ModelError::invalid(kwargs.key_path(key), "is required"))
    };
    required("in_dim")?;
    let in_dim = kwargs.int("in_dim", 0)?;
    if in_dim < 1 {
        return Err(ModelError::invalid(
            kwargs.key_path("in_dim"),
            format!("must be positive, got {in_dim}"),
        ));
    }
    let clusters_path = kwargs.key_path("num_clusters");
    let num_clusters = positive_ints(&clusters_path, required("num_clusters")?)?;
    if num_clusters.len() != 1 {
        return Err(ModelError::invalid(
            clusters_path,
            format!("DINO's head takes exactly one set of prototypes, got {num_clusters:?}"),
        ));
    }
    let params = DinoHeadParams {
        in_dim,
        num_clusters,
        use_bn: kwargs.bool("use_bn", false)?,
        normalize_last_layer: kwargs.bool("normalize_last_layer", true)?,
        num_layers: kwargs.int("num_layers", 3)?,
        hidden_dim: kwargs.int("hidden_dim", 2048)?,
        bottleneck_dim: kwargs.int("bottleneck_dim", 256)?,
    };
    for (key, value) in [
        ("num_layers", params.num_layers),
        ("hidden_dim", params.hidden_dim),
        ("bottleneck_dim", params.bottleneck_dim),
    ] {
        if value < 1 {
            return Err(ModelError::invalid(
                kwargs.key_path(key),
                format!("must be at least 1, got {value}"),
            ));
        }
    }
    Ok(Arc::new(params))
}

impl HeadConfig for DinoHeadParams {
    fn output_shape(&self, layer: &str, input: FeatureShape) -> Result<FeatureShape> {
        if let FeatureShape::Vector(d) = input {
            if d != self.in_dim {
                return Err(ModelError::shape(
                    layer,
                    format!("[N, {}]", self.in_dim),
                    format!("[N, {d}]"),
                ));
            }
        }
        Ok(FeatureShape::Vector(self.num_clusters[0]))
    }

    fn build(&self, p: nn::Path, layer: &str, settings: &HeadSettings) -> Result<Box<dyn Head>> {
        Ok(Box::new(DinoHead::new(p, layer, self, settings)))
    }
}

#[derive(Debug)]
enum MlpLayer {
    Linear(nn::Linear),
    BatchNorm(crate::dist::sync_bn::BatchNorm),
    Gelu,
}

/// A built `dino_head`.
#[derive(Debug)]
pub struct DinoHead {
    layer: String,
    in_dim: i64,
    mlp: Vec<MlpLayer>,
    /// `num_clusters x 1`: fixed at 1 or trained.
    weight_g: Tensor,
    /// `num_clusters x bottleneck_dim`.
    weight_v: Tensor,
}

fn normal_linear(p: nn::Path, d_in: i64, d_out: i64) -> nn::Linear {
    nn::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

impl DinoHead {
    /// Builds the head under `p`.
    pub fn new(p: nn::Path, layer: &str, cfg: &DinoHeadParams, settings: &HeadSettings) -> Self {
        let mlp_path = &p / "mlp";
        let mut mlp = Vec::new();
        if cfg.num_layers == 1 {
            mlp.push(MlpLayer::Linear(normal_linear(
                mlp_path.clone(),
                cfg.in_dim,
                cfg.bottleneck_dim,
            )));
        } else {
            let mut d_in = cfg.in_dim;
            for _ in 0..cfg.num_layers - 1 {
                mlp.push(MlpLayer::Linear(normal_linear(
                    &mlp_path / mlp.len(),
                    d_in,
                    cfg.hidden_dim,
                )));
                if cfg.use_bn {
                    mlp.push(MlpLayer::BatchNorm(crate::dist::sync_bn::batch_norm1d(
                        &mlp_path / mlp.len(),
                        cfg.hidden_dim,
                        settings.batch_norm(),
                    )));
                }
                mlp.push(MlpLayer::Gelu);
                d_in = cfg.hidden_dim;
            }
            mlp.push(MlpLayer::Linear(normal_linear(
                &mlp_path / mlp.len(),
                d_in,
                cfg.bottleneck_dim,
            )));
        }
        let protos = &p / "prototypes0";
        let clusters = cfg.num_clusters[0];
        let bound = 1.0 / (cfg.bottleneck_dim as f64).sqrt();
        let weight_v = protos.var(
            "weight_v",
            &[clusters, cfg.bottleneck_dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let weight_g = if cfg.normalize_last_layer {
            protos.ones_no_train("weight_g", &[clusters, 1])
        } else {
            protos.var("weight_g", &[clusters, 1], nn::Init::Const(1.0))
        };
        DinoHead {
            layer: layer.to_string(),
            in_dim: cfg.in_dim,
            mlp,
            weight_g,
            weight_v,
        }
    }
}

impl Head for DinoHead {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let size = xs.size();
        if size.len() != 2 || size[1] != self.in_dim {
            return Err(ModelError::shape(
                &self.layer,
                format!("[N, {}]", self.in_dim),
                shape_str(&size),
            ));
        }
        let x = self
            .mlp
            .iter()
            .fold(xs.shallow_clone(), |out, layer| match layer {
                MlpLayer::Linear(l) => l.forward(&out),
                MlpLayer::BatchNorm(bn) => bn.forward_t(&out, train),
                MlpLayer::Gelu => out.gelu("none"),
            });
        let x = crate::losses::l2_normalize_rows(&x)
            .map_err(|e| ModelError::invalid(&self.layer, e.to_string()))?;
        let v_norm = self
            .weight_v
            .norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
        let weight = &self.weight_g * &self.weight_v / v_norm;
        Ok(x.matmul(&weight.tr()))
    }
}
