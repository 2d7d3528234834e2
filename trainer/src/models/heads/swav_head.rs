//! The `swav_head`: a projection MLP, L2 normalisation of its output, then one bias-free linear
//! layer per set of prototypes (SwAV, Caron et al., arXiv 2006.09882).
//!
//! Its outputs are `[embedding, scores_0, scores_1, ...]` (the embedding only with
//! `return_embeddings: true`, VISSL's default), which is what `swav_loss` and
//! `swav_momentum_loss` read. Parameter names follow VISSL's module: `projection_head.<i>`
//! (numbered like `nn.Sequential`, activations take an index) and `prototypes<j>.weight`, so
//! `heads.0.prototypes0.weight` is the first prototype matrix (`num_clusters[0] x dims[-1]`).
//! Inside a sequence of heads, a following head receives the embedding.

use super::{linear, Head, HeadConfig, HeadSettings};
use crate::models::trunks::FeatureShape;
use crate::models::yaml::{positive_ints, Block};
use crate::models::{shape_str, ModelError, Result};
use std::sync::Arc;
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// The registry name.
pub const NAME: &str = "swav_head";

/// The activation after each hidden linear layer (`activation_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `ReLU` (the default).
    Relu,
    /// `GELU`.
    Gelu,
    /// Any other name: VISSL then adds no activation.
    None,
}

/// The kwargs of a `swav_head`; defaults are VISSL's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwavHeadParams {
    /// Projection sizes `[in, hidden..., out]`, at least two entries.
    pub dims: Vec<i64>,
    /// BatchNorm1d after each hidden linear layer.
    pub use_bn: bool,
    /// Prototype counts, one linear layer each (empty: the head returns the embedding only).
    pub num_clusters: Vec<i64>,
    /// Bias on the projection's linear layers (the prototypes never have one).
    pub use_bias: bool,
    /// Return the normalised embedding as the first output.
    pub return_embeddings: bool,
    /// No BN/activation after the last projection layer.
    pub skip_last_bn: bool,
    /// L2-normalise the embedding before the prototypes.
    pub normalize_feats: bool,
    /// Activation of the hidden layers.
    pub activation: Activation,
    /// Accepted for VISSL's configs; its only effect there is with weight-normalised prototypes,
    /// which are not supported (prototype normalisation is `swav_loss.normalize_last_layer`).
    pub normalize_last_layer: bool,
}

impl SwavHeadParams {
    /// A head with VISSL's defaults for everything but `dims` and `num_clusters`.
    pub fn new(dims: Vec<i64>, num_clusters: Vec<i64>) -> Self {
        SwavHeadParams {
            dims,
            use_bn: false,
            num_clusters,
            use_bias: true,
            return_embeddings: true,
            skip_last_bn: true,
            normalize_feats: true,
            activation: Activation::Relu,
            normalize_last_layer: false,
        }
    }

    fn embedding_dim(&self) -> i64 {
        self.dims[self.dims.len() - 1]
    }
}

/// Parses `swav_head` kwargs.
pub(crate) fn parse(kwargs: &Block) -> Result<Arc<dyn HeadConfig>> {
    kwargs.check_keys(&[
        "dims",
        "use_bn",
        "num_clusters",
        "use_bias",
        "return_embeddings",
        "skip_last_bn",
        "normalize_feats",
        "activation_name",
        "use_weight_norm_prototypes",
        "normalize_last_layer",
    ])?;
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
    let clusters_path = kwargs.key_path("num_clusters");
    let num_clusters = match kwargs.get("num_clusters") {
        Some(v) => positive_ints(&clusters_path, v)?,
        None => return Err(ModelError::invalid(clusters_path, "is required")),
    };
    if kwargs.bool("use_weight_norm_prototypes", false)? {
        return Err(ModelError::invalid(
            kwargs.key_path("use_weight_norm_prototypes"),
            "weight-normalised prototypes are not supported; normalise them with \
             LOSS.swav_loss.normalize_last_layer instead",
        ));
    }
    let activation = match kwargs.string("activation_name", "ReLU")?.as_str() {
        "ReLU" => Activation::Relu,
        "GELU" => Activation::Gelu,
        _ => Activation::None,
    };
    let d = SwavHeadParams::new(dims, num_clusters);
    Ok(Arc::new(SwavHeadParams {
        use_bn: kwargs.bool("use_bn", d.use_bn)?,
        use_bias: kwargs.bool("use_bias", d.use_bias)?,
        return_embeddings: kwargs.bool("return_embeddings", d.return_embeddings)?,
        skip_last_bn: kwargs.bool("skip_last_bn", d.skip_last_bn)?,
        normalize_feats: kwargs.bool("normalize_feats", d.normalize_feats)?,
        normalize_last_layer: kwargs.bool("normalize_last_layer", d.normalize_last_layer)?,
        activation,
        ..d
    }))
}

impl HeadConfig for SwavHeadParams {
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
        // What a following head would receive: the embedding.
        Ok(FeatureShape::Vector(self.embedding_dim()))
    }

    fn build(&self, p: nn::Path, layer: &str, settings: &HeadSettings) -> Result<Box<dyn Head>> {
        Ok(Box::new(SwavHead::new(p, layer, self, settings)?))
    }
}

#[derive(Debug)]
enum ProjectionLayer {
    Linear(nn::Linear),
    BatchNorm(crate::dist::sync_bn::BatchNorm),
    Relu,
    Gelu,
}

/// A built `swav_head`.
#[derive(Debug)]
pub struct SwavHead {
    layer: String,
    in_dim: i64,
    projection: Vec<ProjectionLayer>,
    prototypes: Vec<nn::Linear>,
    normalize_feats: bool,
    return_embeddings: bool,
}

impl SwavHead {
    /// Builds the head with its projection under `p / "projection_head"` and its prototypes
    /// under `p / "prototypes<j>"`.
    pub fn new(
        p: nn::Path,
        layer: &str,
        cfg: &SwavHeadParams,
        settings: &HeadSettings,
    ) -> Result<Self> {
        let seq = &p / "projection_head";
        let mut projection = Vec::new();
        let steps = cfg.dims.len() - 1;
        for (step, pair) in cfg.dims.windows(2).enumerate() {
            let (d_in, d_out) = (pair[0], pair[1]);
            projection.push(ProjectionLayer::Linear(linear(
                &seq / projection.len(),
                d_in,
                d_out,
                cfg.use_bias,
                settings,
            )?));
            if step == steps - 1 && cfg.skip_last_bn {
                break;
            }
            if cfg.use_bn {
                projection.push(ProjectionLayer::BatchNorm(
                    crate::dist::sync_bn::batch_norm1d(
                        &seq / projection.len(),
                        d_out,
                        settings.batch_norm(),
                    ),
                ));
            }
            match cfg.activation {
                Activation::Relu => projection.push(ProjectionLayer::Relu),
                Activation::Gelu => projection.push(ProjectionLayer::Gelu),
                Activation::None => {}
            }
        }
        let prototypes = cfg
            .num_clusters
            .iter()
            .enumerate()
            .map(|(j, &k)| {
                linear(
                    &p / format!("prototypes{j}"),
                    cfg.embedding_dim(),
                    k,
                    false,
                    settings,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SwavHead {
            layer: layer.to_string(),
            in_dim: cfg.dims[0],
            projection,
            prototypes,
            normalize_feats: cfg.normalize_feats,
            return_embeddings: cfg.return_embeddings,
        })
    }

    /// The (normalised) embedding of an `N x dims[0]` batch.
    fn embed(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let size = xs.size();
        let fits = size.len() >= 2 && size[1] == self.in_dim && size[2..].iter().all(|&d| d == 1);
        if !fits {
            let expected = format!("[N, {0}] or [N, {0}, 1, 1]", self.in_dim);
            return Err(ModelError::shape(&self.layer, expected, shape_str(&size)));
        }
        let has_bn = self
            .projection
            .iter()
            .any(|l| matches!(l, ProjectionLayer::BatchNorm(_)));
        if train && has_bn && size[0] < 2 {
            return Err(ModelError::shape(
                &self.layer,
                "a batch of at least 2 to train batch norm",
                shape_str(&size),
            ));
        }
        let xs = xs.reshape([size[0], size[1]]);
        let out = self.projection.iter().fold(xs, |out, layer| match layer {
            ProjectionLayer::Linear(l) => l.forward(&out),
            ProjectionLayer::BatchNorm(bn) => bn.forward_t(&out, train),
            ProjectionLayer::Relu => out.relu(),
            ProjectionLayer::Gelu => out.gelu("none"),
        });
        if self.normalize_feats {
            Ok(crate::losses::l2_normalize_rows(&out).map_err(|e| {
                ModelError::invalid(&self.layer, format!("normalising the embedding: {e}"))
            })?)
        } else {
            Ok(out)
        }
    }
}

impl Head for SwavHead {
    /// The embedding (what a following head in a sequence receives).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.embed(xs, train)
    }

    fn forward_outputs_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let embedding = self.embed(xs, train)?;
        let scores = self.prototypes.iter().map(|p| p.forward(&embedding));
        Ok(if self.return_embeddings {
            std::iter::once(embedding.shallow_clone())
                .chain(scores)
                .collect()
        } else {
            scores.collect()
        })
    }
}
