//! `MODEL.FEATURE_EVAL_SETTINGS`: evaluating a (frozen) trunk's features, and the pooling ops that
//! `LINEAR_EVAL_FEAT_POOL_OPS_MAP` attaches to them (`[["res5", ["AvgPool2d", [[6, 6], 1, 0]]], ...]`).

use super::trunks::FeatureShape;
use super::yaml::{as_bool, as_int, describe, Block};
use super::{shape_str, ModelError, Result};
use serde_yaml::Value;
use std::fmt;
use tch::Tensor;

/// A pooling op applied to one trunk feature, named and parameterised like its PyTorch module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolOp {
    /// `AdaptiveAvgPool2d(output_size)`.
    AdaptiveAvgPool2d { output_size: [i64; 2] },
    /// `AdaptiveMaxPool2d(output_size)`.
    AdaptiveMaxPool2d { output_size: [i64; 2] },
    /// `AvgPool2d(kernel_size, stride=kernel_size, padding=0, ceil_mode=False, count_include_pad=True)`.
    AvgPool2d {
        kernel: [i64; 2],
        stride: [i64; 2],
        padding: [i64; 2],
        ceil_mode: bool,
        count_include_pad: bool,
    },
    /// `MaxPool2d(kernel_size, stride=kernel_size, padding=0, dilation=1, return_indices=False, ceil_mode=False)`.
    MaxPool2d {
        kernel: [i64; 2],
        stride: [i64; 2],
        padding: [i64; 2],
        dilation: [i64; 2],
        ceil_mode: bool,
    },
    /// `Identity`: the feature unchanged.
    Identity,
}

/// Parses one op's positional arguments (the path names the op in errors).
type PoolOpParser = fn(&Args) -> Result<PoolOp>;

/// The pooling-op registry: PyTorch module name -> argument parser.
const POOL_OPS: &[(&str, PoolOpParser)] = &[
    ("AdaptiveAvgPool2d", |a| {
        Ok(PoolOp::AdaptiveAvgPool2d {
            output_size: a.required_pair(0, "output_size")?,
        })
    }),
    ("AdaptiveMaxPool2d", |a| {
        Ok(PoolOp::AdaptiveMaxPool2d {
            output_size: a.required_pair(0, "output_size")?,
        })
    }),
    ("AvgPool2d", |a| {
        let kernel = a.required_pair(0, "kernel_size")?;
        a.at_most(5)?;
        Ok(PoolOp::AvgPool2d {
            kernel,
            stride: a.pair(1, "stride", kernel)?,
            padding: a.pair(2, "padding", [0, 0])?,
            ceil_mode: a.flag(3, "ceil_mode", false)?,
            count_include_pad: a.flag(4, "count_include_pad", true)?,
        })
    }),
    ("MaxPool2d", |a| {
        let kernel = a.required_pair(0, "kernel_size")?;
        a.at_most(6)?;
        if a.flag(4, "return_indices", false)? {
            return Err(ModelError::invalid(
                a.path.clone(),
                "return_indices=True is not supported for features",
            ));
        }
        Ok(PoolOp::MaxPool2d {
            kernel,
            stride: a.pair(1, "stride", kernel)?,
            padding: a.pair(2, "padding", [0, 0])?,
            dilation: a.pair(3, "dilation", [1, 1])?,
            ceil_mode: a.flag(5, "ceil_mode", false)?,
        })
    }),
    // VISSL's Identity takes (and ignores) one optional argument.
    ("Identity", |a| a.at_most(1).map(|_| PoolOp::Identity)),
];

/// The registered pooling-op names.
pub fn pool_op_names() -> Vec<&'static str> {
    POOL_OPS.iter().map(|(name, _)| *name).collect()
}

/// Positional arguments of a pooling op.
struct Args<'a> {
    path: String,
    items: &'a [Value],
}

impl Args<'_> {
    fn at_most(&self, n: usize) -> Result<()> {
        if self.items.len() > n {
            return Err(ModelError::invalid(
                self.path.clone(),
                format!("takes at most {n} arguments, got {}", self.items.len()),
            ));
        }
        Ok(())
    }

    fn required_pair(&self, i: usize, name: &str) -> Result<[i64; 2]> {
        match self.items.get(i) {
            Some(v) => self.to_pair(v, name),
            None => Err(ModelError::invalid(
                self.path.clone(),
                format!("argument {name} is required"),
            )),
        }
    }

    fn pair(&self, i: usize, name: &str, default: [i64; 2]) -> Result<[i64; 2]> {
        match self.items.get(i) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => self.to_pair(v, name),
        }
    }

    fn flag(&self, i: usize, name: &str, default: bool) -> Result<bool> {
        match self.items.get(i) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => as_bool(v).ok_or_else(|| {
                ModelError::invalid(
                    self.path.clone(),
                    format!("argument {name} must be a boolean, found {}", describe(v)),
                )
            }),
        }
    }

    /// An int `k` means `(k, k)`, as in PyTorch.
    fn to_pair(&self, v: &Value, name: &str) -> Result<[i64; 2]> {
        let pair = match v {
            Value::Sequence(items) if items.len() == 2 => {
                match (as_int(&items[0]), as_int(&items[1])) {
                    (Some(a), Some(b)) => Some([a, b]),
                    _ => None,
                }
            }
            other => as_int(other).map(|k| [k, k]),
        };
        pair.filter(|p| p.iter().all(|&d| d >= 0)).ok_or_else(|| {
            ModelError::invalid(
                self.path.clone(),
                format!(
                    "argument {name} must be an int or [h, w], found {}",
                    describe(v)
                ),
            )
        })
    }
}

impl PoolOp {
    /// Parses `[OpName, [args...]]`.
    pub fn from_yaml(path: &str, value: &Value) -> Result<Self> {
        let (name, args) = match value {
            Value::Sequence(items) if (1..=2).contains(&items.len()) => {
                let name = match &items[0] {
                    Value::String(s) => s.as_str(),
                    other => {
                        return Err(ModelError::invalid(
                            path,
                            format!("op name must be a string, found {}", describe(other)),
                        ))
                    }
                };
                let args: &[Value] = match items.get(1) {
                    None | Some(Value::Null) => &[],
                    Some(Value::Sequence(args)) => args,
                    Some(other) => {
                        return Err(ModelError::invalid(
                            path,
                            format!("op arguments must be a list, found {}", describe(other)),
                        ))
                    }
                };
                (name, args)
            }
            other => {
                return Err(ModelError::invalid(
                    path,
                    format!("must be [OpName, [args]], found {}", describe(other)),
                ))
            }
        };
        let parse = POOL_OPS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, parse)| *parse)
            .ok_or_else(|| ModelError::unknown_name("pooling op", name, path, &pool_op_names()))?;
        parse(&Args {
            path: format!("{path}[{name}]"),
            items: args,
        })
    }

    /// The shape after this op.
    pub fn output_shape(&self, input: FeatureShape) -> FeatureShape {
        match (self, input) {
            (PoolOp::Identity, shape) => shape,
            (
                PoolOp::AdaptiveAvgPool2d {
                    output_size: [1, 1],
                }
                | PoolOp::AdaptiveMaxPool2d {
                    output_size: [1, 1],
                },
                FeatureShape::Map { channels },
            ) => FeatureShape::Vector(channels),
            (_, FeatureShape::Map { channels }) => FeatureShape::Map { channels },
            // Pooling a flat or N x D x 1 x 1 feature only makes sense as a no-op; leave it to run time.
            (_, shape) => shape,
        }
    }

    /// Applies the op to a 4-D feature; `feature` names it in errors.
    pub fn apply(&self, xs: &Tensor, feature: &str) -> Result<Tensor> {
        if *self == PoolOp::Identity {
            return Ok(xs.shallow_clone());
        }
        let size = xs.size();
        let layer = || format!("{self} on feature {feature}");
        if size.len() != 4 {
            return Err(ModelError::shape(layer(), "[N, C, H, W]", shape_str(&size)));
        }
        let pooled = match *self {
            PoolOp::AdaptiveAvgPool2d { output_size } => xs.f_adaptive_avg_pool2d(output_size),
            PoolOp::AdaptiveMaxPool2d { output_size } => xs
                .f_adaptive_max_pool2d(output_size)
                .map(|(values, _)| values),
            PoolOp::AvgPool2d {
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
            } => xs.f_avg_pool2d(
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
                None::<i64>,
            ),
            PoolOp::MaxPool2d {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => xs.f_max_pool2d(kernel, stride, padding, dilation, ceil_mode),
            PoolOp::Identity => Ok(xs.shallow_clone()),
        };
        pooled.map_err(|e| {
            let reason = e.to_string();
            let first_line = reason.lines().next().unwrap_or_default().to_string();
            ModelError::shape(
                layer(),
                "an input large enough for the pooling window",
                format!("{} ({first_line})", shape_str(&size)),
            )
        })
    }
}

impl fmt::Display for PoolOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolOp::AdaptiveAvgPool2d { output_size } => {
                write!(f, "AdaptiveAvgPool2d({output_size:?})")
            }
            PoolOp::AdaptiveMaxPool2d { output_size } => {
                write!(f, "AdaptiveMaxPool2d({output_size:?})")
            }
            PoolOp::AvgPool2d {
                kernel,
                stride,
                padding,
                ..
            } => {
                write!(
                    f,
                    "AvgPool2d(kernel {kernel:?}, stride {stride:?}, padding {padding:?})"
                )
            }
            PoolOp::MaxPool2d {
                kernel,
                stride,
                padding,
                ..
            } => {
                write!(
                    f,
                    "MaxPool2d(kernel {kernel:?}, stride {stride:?}, padding {padding:?})"
                )
            }
            PoolOp::Identity => write!(f, "Identity"),
        }
    }
}

/// `MODEL.FEATURE_EVAL_SETTINGS`; `Default` is VISSL's (everything off, flatten on).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureEvalSettings {
    /// `EVAL_MODE_ON`: the model is being evaluated (linear eval, extraction, kNN).
    pub eval_mode_on: bool,
    /// `FREEZE_TRUNK_ONLY`: trunk frozen (no grad, eval-mode batch norm), heads trained.
    pub freeze_trunk_only: bool,
    /// `FREEZE_TRUNK_AND_HEAD`: the whole model frozen.
    pub freeze_trunk_and_head: bool,
    /// `EXTRACT_TRUNK_FEATURES_ONLY`: forward returns trunk features, heads are not run.
    pub extract_trunk_features_only: bool,
    /// `EVAL_TRUNK_AND_HEAD`: initialise heads from the weights file as well.
    pub eval_trunk_and_head: bool,
    /// `ASSERT_HEAD_LAYER_SHAPE_INIT`: a head weight of another shape is an error (else it is skipped).
    pub assert_head_layer_shape_init: bool,
    /// `SHOULD_FLATTEN_FEATS`: flatten pooled features to `N x D`.
    pub should_flatten_feats: bool,
    /// `LINEAR_EVAL_FEAT_POOL_OPS_MAP`: (trunk feature, pooling op), one output per entry.
    pub linear_eval_feat_pool_ops_map: Vec<(String, PoolOp)>,
}

impl Default for FeatureEvalSettings {
    fn default() -> Self {
        FeatureEvalSettings {
            eval_mode_on: false,
            freeze_trunk_only: false,
            freeze_trunk_and_head: false,
            extract_trunk_features_only: false,
            eval_trunk_and_head: false,
            assert_head_layer_shape_init: true,
            should_flatten_feats: true,
            linear_eval_feat_pool_ops_map: Vec::new(),
        }
    }
}

impl FeatureEvalSettings {
    /// Reads a `MODEL.FEATURE_EVAL_SETTINGS` block.
    pub fn from_yaml(value: &Value) -> Result<Self> {
        let block = Block::new("MODEL.FEATURE_EVAL_SETTINGS", value)?;
        block.check_keys(&[
            "EVAL_MODE_ON",
            "FREEZE_TRUNK_ONLY",
            "FREEZE_TRUNK_AND_HEAD",
            "EXTRACT_TRUNK_FEATURES_ONLY",
            "EVAL_TRUNK_AND_HEAD",
            "ASSERT_HEAD_LAYER_SHAPE_INIT",
            "SHOULD_FLATTEN_FEATS",
            "LINEAR_EVAL_FEAT_POOL_OPS_MAP",
        ])?;
        let d = FeatureEvalSettings::default();
        let map_path = block.key_path("LINEAR_EVAL_FEAT_POOL_OPS_MAP");
        let linear_eval_feat_pool_ops_map = block
            .list("LINEAR_EVAL_FEAT_POOL_OPS_MAP")?
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let at = format!("{map_path}[{i}]");
                match entry {
                    Value::Sequence(pair) if pair.len() == 2 => match &pair[0] {
                        Value::String(feature) => {
                            Ok((feature.clone(), PoolOp::from_yaml(&at, &pair[1])?))
                        }
                        other => Err(ModelError::invalid(
                            at,
                            format!("feature name must be a string, found {}", describe(other)),
                        )),
                    },
                    other => Err(ModelError::invalid(
                        at,
                        format!(
                            "must be [feature, [OpName, [args]]], found {}",
                            describe(other)
                        ),
                    )),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(FeatureEvalSettings {
            eval_mode_on: block.bool("EVAL_MODE_ON", d.eval_mode_on)?,
            freeze_trunk_only: block.bool("FREEZE_TRUNK_ONLY", d.freeze_trunk_only)?,
            freeze_trunk_and_head: block.bool("FREEZE_TRUNK_AND_HEAD", d.freeze_trunk_and_head)?,
            extract_trunk_features_only: block
                .bool("EXTRACT_TRUNK_FEATURES_ONLY", d.extract_trunk_features_only)?,
            eval_trunk_and_head: block.bool("EVAL_TRUNK_AND_HEAD", d.eval_trunk_and_head)?,
            assert_head_layer_shape_init: block.bool(
                "ASSERT_HEAD_LAYER_SHAPE_INIT",
                d.assert_head_layer_shape_init,
            )?,
            should_flatten_feats: block.bool("SHOULD_FLATTEN_FEATS", d.should_flatten_feats)?,
            linear_eval_feat_pool_ops_map,
        })
    }

    /// VISSL's `is_feature_extractor_model`: eval mode, a frozen trunk, and pooled features to return.
    pub fn is_feature_extractor(&self) -> bool {
        self.eval_mode_on
            && (self.freeze_trunk_only || self.freeze_trunk_and_head)
            && !self.linear_eval_feat_pool_ops_map.is_empty()
    }

    /// Whether the trunk is frozen (no grad, batch norm in eval mode).
    pub fn trunk_frozen(&self) -> bool {
        self.eval_mode_on && (self.freeze_trunk_only || self.freeze_trunk_and_head)
    }

    /// Whether the heads are frozen as well.
    pub fn heads_frozen(&self) -> bool {
        self.eval_mode_on && self.freeze_trunk_and_head
    }

    /// Whether forward stops after the trunk.
    pub fn trunk_features_only(&self) -> bool {
        self.eval_mode_on && self.extract_trunk_features_only
    }

    /// VISSL's `should_init_head_weights`: heads load from weights when fine-tuning, or when
    /// evaluating with `EVAL_TRUNK_AND_HEAD`.
    pub fn should_init_head_weights(&self) -> bool {
        !self.eval_mode_on || self.eval_trunk_and_head
    }
}
