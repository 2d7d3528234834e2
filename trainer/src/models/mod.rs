//! VISSL's model: a trunk that computes features and heads that turn them into outputs.
//!
//! * [`trunks`] - the trunk registry and the ResNe(X)t trunk (`resnet`), with torchvision's parameter
//!   names (`conv1.weight`, `layer1.0.downsample.0.weight`) under the `trunk.` prefix.
//! * [`heads`] - the head registry (`mlp`, `eval_mlp`, `identity`) and `MODEL.HEAD.PARAMS` parsing.
//! * [`feature_eval`] - `MODEL.FEATURE_EVAL_SETTINGS` and the pooling ops applied to trunk features.
//! * [`base_ssl_model`] - [`BaseSslModel`], VISSL's `BaseSSLMultiInputOutputModel` (trunk + heads,
//!   freezing, multi-resolution and multi-input forwards), built from [`ModelParams`].
//! * [`weights_init`] - `MODEL.WEIGHTS_INIT` (loading `.safetensors` weights with VISSL's prefix rules)
//!   and [`save_safetensors`].
//!
//! Parameter names inside one [`BaseSslModel`]'s `VarStore` are `trunk.<torchvision name>` and
//! `heads.<i>.<VISSL head name>`; VISSL's `trunk._feature_blocks.` and `trunk.base_model.` spellings
//! are mapped onto them when weights are loaded.

pub mod base_ssl_model;
pub mod feature_eval;
pub mod heads;
pub mod multi_input;
pub mod trunks;
pub mod weights_init;
mod yaml;

pub use base_ssl_model::{BaseSslModel, ModelParams};
pub use feature_eval::{FeatureEvalSettings, PoolOp};
pub use heads::{Head, HeadParams, HeadSettings, HeadSpec};
pub use multi_input::InputHeadMapping;
pub use trunks::resnext::{Norm, ResNet, ResNetParams, Stem};
pub use trunks::{FeatureShape, InputType, Trunk, TrunkParams};
pub use weights_init::{save_safetensors, LoadOptions, LoadReport, WeightsInit};

use std::fmt;

/// Errors of model building, forward passes and weight loading; each names the key, layer or file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A config key that this block does not know.
    #[error("unknown key `{path}`{}; known keys: {}", did_you_mean(.suggestion), .known.join(", "))]
    UnknownKey {
        path: String,
        suggestion: Option<String>,
        known: Vec<String>,
    },
    /// A registry name (trunk, head, pooling op, feature) that does not exist.
    #[error("unknown {kind} `{name}` at `{path}`{}; known {kind}s: {}", did_you_mean(.suggestion), .known.join(", "))]
    UnknownName {
        kind: &'static str,
        name: String,
        path: String,
        suggestion: Option<String>,
        known: Vec<String>,
    },
    /// A config value of the right key but an unacceptable value or type.
    #[error("invalid `{path}`: {reason}")]
    Invalid { path: String, reason: String },
    /// A tensor whose shape does not fit the layer that receives it.
    #[error("{layer}: shape mismatch, expected {expected}, got {actual}")]
    Shape {
        layer: String,
        expected: String,
        actual: String,
    },
    /// A weights file that cannot be read or does not fit the model.
    #[error("weights file {file}: {reason}")]
    Weights { file: String, reason: String },
    /// An error raised by libtorch.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result type of the models module.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

impl ModelError {
    /// An `UnknownName` error with the nearest known name as suggestion.
    pub(crate) fn unknown_name(kind: &'static str, name: &str, path: &str, known: &[&str]) -> Self {
        ModelError::UnknownName {
            kind,
            name: name.to_string(),
            path: path.to_string(),
            suggestion: vissl_crds::config::error::nearest(name, known.iter().copied()),
            known: known.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// An `Invalid` error for the config key `path`.
    pub(crate) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ModelError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A `Shape` error for `layer`.
    pub(crate) fn shape(
        layer: impl Into<String>,
        expected: impl fmt::Display,
        actual: impl fmt::Display,
    ) -> Self {
        ModelError::Shape {
            layer: layer.into(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}

/// A tensor shape written like PyTorch prints it, `[8, 2048, 7, 7]`.
pub(crate) fn shape_str(size: &[i64]) -> String {
    let dims: Vec<String> = size.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}
