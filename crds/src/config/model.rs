//! `config.MODEL`: trunk, heads, and how the model is initialised, frozen and run.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_yaml::{Mapping, Value};

/// `MODEL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ModelConfig {
    /// The model wrapper; `multi_input_output_model` is the only one.
    pub base_model_name: String,
    /// Periodic clearing of the CUDA allocator cache.
    pub cuda_cache: CudaCacheConfig,
    /// Parameter names never trained.
    pub non_trainable_params: Vec<String>,
    /// `[[parameter name, iterations frozen], ...]`.
    pub temp_frozen_params_iter_map: Vec<TempFrozenParam>,
    /// `rgb` | `bgr` | `lab`.
    pub input_type: String,
    /// `[[input key, [feature names]], ...]`.
    pub multi_input_head_mapping: Vec<Value>,
    /// Forward each crop on its own instead of grouping crops of one resolution.
    pub single_pass_every_crop: bool,
    /// Recompute activations in the backward pass to save memory.
    pub activation_checkpointing: ActivationCheckpointingConfig,
    /// ZeRO-2 sharded data parallel (not consumed).
    pub sharded_ddp_setup: Value,
    /// Fully sharded data parallel (not consumed).
    pub fsdp_config: Value,
    /// Frozen-feature evaluation.
    pub feature_eval_settings: FeatureEvalSettings,
    /// Gradient-norm clipping.
    pub grad_clip: GradClipConfig,
    /// The backbone.
    pub trunk: TrunkConfig,
    /// Heads on top of the trunk.
    pub head: HeadConfig,
    /// Synchronised BatchNorm.
    pub sync_bn_config: SyncBnConfig,
    /// Mixed precision.
    pub amp_params: AmpParams,
    /// Initialisation from a weights file.
    pub weights_init: WeightsInitConfig,
}

/// `MODEL.CUDA_CACHE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct CudaCacheConfig {
    /// Empty the CUDA cache periodically.
    pub clear_cuda_cache: bool,
    /// Iterations between two clears.
    pub clear_freq: usize,
}

/// `MODEL.ACTIVATION_CHECKPOINTING`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ActivationCheckpointingConfig {
    pub use_activation_checkpointing: bool,
    /// Segments the trunk is cut into.
    pub num_activation_checkpointing_splits: usize,
}

/// `MODEL.FEATURE_EVAL_SETTINGS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct FeatureEvalSettings {
    /// Evaluation of features is on.
    pub eval_mode_on: bool,
    /// Train heads on a frozen trunk (linear probes).
    pub freeze_trunk_only: bool,
    /// Freeze trunk and heads.
    pub freeze_trunk_and_head: bool,
    /// Extract trunk features only.
    pub extract_trunk_features_only: bool,
    /// Evaluate trunk and heads together (loads head weights too).
    pub eval_trunk_and_head: bool,
    /// Head shapes in the weights file must match exactly.
    pub assert_head_layer_shape_init: bool,
    /// Flatten features to `N x D`.
    pub should_flatten_feats: bool,
    /// Which trunk layers are evaluated and how they are pooled.
    pub linear_eval_feat_pool_ops_map: Vec<FeatPoolOp>,
}

/// One `[layer, [pool op, [args]]]` entry of `LINEAR_EVAL_FEAT_POOL_OPS_MAP`, e.g.
/// `["res5avg", ["Identity", []]]` or `["conv1", ["AvgPool2d", [[10, 10], 10, 4]]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatPoolOp {
    /// Trunk feature name (`conv1`, `res2`, ..., `res5avg`).
    pub layer: String,
    /// Pooling module name (`AvgPool2d`, `AdaptiveAvgPool2d`, `Identity`, ...).
    pub op: String,
    /// The pooling module's positional arguments.
    pub args: Value,
}

impl<'de> Deserialize<'de> for FeatPoolOp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (layer, (op, args)) = <(String, (String, Value))>::deserialize(deserializer)?;
        Ok(FeatPoolOp { layer, op, args })
    }
}

impl Serialize for FeatPoolOp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.layer, (&self.op, &self.args)).serialize(serializer)
    }
}

/// One `[parameter name, iterations]` entry of `TEMP_FROZEN_PARAMS_ITER_MAP`, e.g.
/// `["module.heads.0.prototypes0.weight_v", 1251]`: the parameter is not updated before that
/// iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct TempFrozenParam {
    /// The parameter's path, with or without DDP's `module.` prefix.
    pub name: String,
    /// Iterations (counted from 0) during which the parameter keeps its value.
    pub iterations: u64,
}

impl<'de> Deserialize<'de> for TempFrozenParam {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (name, iterations) = <(String, u64)>::deserialize(deserializer).map_err(|e| {
            serde::de::Error::custom(format!(
                "an entry is [parameter name, iterations], e.g. \
                 [\"module.heads.0.prototypes0.weight_v\", 1251]: {e}"
            ))
        })?;
        Ok(TempFrozenParam { name, iterations })
    }
}

impl Serialize for TempFrozenParam {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.name, self.iterations).serialize(serializer)
    }
}

/// `MODEL.GRAD_CLIP`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct GradClipConfig {
    pub use_grad_clip: bool,
    /// p of the p-norm; `"inf"` reads as infinity (the max norm).
    #[serde(deserialize_with = "number_or_inf")]
    pub norm_type: f64,
    /// Largest gradient norm kept.
    pub max_norm: f64,
}

fn number_or_inf<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    match Value::deserialize(deserializer)? {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| serde::de::Error::custom("NORM_TYPE is not a number")),
        Value::String(s) if s.eq_ignore_ascii_case("inf") => Ok(f64::INFINITY),
        other => Err(serde::de::Error::custom(format!(
            "NORM_TYPE must be a number or \"inf\", found {other:?}"
        ))),
    }
}

/// `MODEL.TRUNK` (also accepted as `MODEL.TRUNK.TRUNK_PARAMS.<FAMILY>`, the docs' older spelling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct TrunkConfig {
    /// Trunk registry name (`vissl list trunks`).
    pub name: String,
    /// ResNe(X)t parameters.
    pub resnets: ResNetsConfig,
    /// Selective-kernel ResNets (not consumed).
    pub resnets_sk: Value,
    /// EfficientNet parameters (not consumed).
    pub efficient_nets: Value,
    /// MobileNet parameters (not consumed).
    pub mobile_net: Value,
    /// RegNet parameters (not consumed).
    pub regnet: Value,
    /// ViT / DeiT parameters (not consumed).
    pub vision_transformers: Value,
    /// XCiT parameters (not consumed).
    pub xcit: Value,
    /// Swin parameters (not consumed).
    pub swin_transformer: Value,
    /// BEiT parameters (not consumed).
    pub beit: Value,
    /// ConvNeXt parameters (not consumed).
    pub convnext: Value,
    /// ConViT parameters (not consumed).
    pub convit: Value,
}

/// `MODEL.TRUNK.RESNETS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ResNetsConfig {
    /// 18, 34, 50, 101, 152 or 200 layers.
    pub depth: usize,
    /// Channel multiplier (ResNet-50 w2, w4, ...).
    pub width_multiplier: usize,
    /// Normalisation layers.
    pub norm: ResNetNorm,
    /// Groups of GroupNorm.
    pub groupnorm_groups: usize,
    /// Weight-standardised convolutions.
    pub standardize_convolutions: bool,
    /// Convolution groups (ResNeXt cardinality).
    pub groups: usize,
    /// Zero-initialise the last BN of each residual branch.
    pub zero_init_residual: bool,
    /// Channels per group in the bottleneck (64 for ResNet).
    pub width_per_group: usize,
    /// 2 as torchvision; 1 keeps layer4 at layer3's resolution.
    pub layer4_stride: usize,
    /// vissl-rs: `imagenet` (7x7/2 + max-pool) or `cifar` (3x3/1, no max-pool) stem.
    pub stem: String,
    /// vissl-rs: stem and layer1 width before WIDTH_MULTIPLIER.
    pub base_channels: usize,
}

/// Normalisation layers of a ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResNetNorm {
    /// Batch normalisation (torchvision's default).
    BatchNorm,
    /// Layer normalisation.
    LayerNorm,
    /// Group normalisation with GROUPNORM_GROUPS groups.
    GroupNorm,
}

/// `MODEL.HEAD`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct HeadConfig {
    /// As VISSL writes it: a list of `[name, {kwargs}]` modules, or of lists of them (several heads).
    pub params: Vec<HeadEntry>,
    /// Epsilon of the heads' BatchNorm.
    pub batchnorm_eps: f64,
    /// Momentum of the heads' BatchNorm.
    pub batchnorm_momentum: f64,
    /// Factor applied to the heads' initial parameters.
    pub params_multiplier: f64,
}

/// One entry of `MODEL.HEAD.PARAMS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeadEntry {
    /// `["mlp", {"dims": [2048, 128]}]`
    Module(HeadModule),
    /// `[["mlp", {...}], ["mlp", {...}]]`: one head of several modules, next to other heads.
    Chain(Vec<HeadModule>),
}

/// A head module: registry name and constructor arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "(String, Mapping)", into = "(String, Mapping)")]
pub struct HeadModule {
    /// Head registry name (`vissl list heads`).
    pub name: String,
    /// Keyword arguments, e.g. `dims`, `use_bn`, `use_relu`.
    pub params: Mapping,
}

impl From<(String, Mapping)> for HeadModule {
    fn from((name, params): (String, Mapping)) -> Self {
        HeadModule { name, params }
    }
}

impl From<HeadModule> for (String, Mapping) {
    fn from(m: HeadModule) -> Self {
        (m.name, m.params)
    }
}

/// `MODEL.SYNC_BN_CONFIG`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct SyncBnConfig {
    /// Replace BatchNorm by SyncBatchNorm.
    pub convert_bn_to_sync_bn: bool,
    /// `apex` | `pytorch`; both mean libtorch's SyncBatchNorm here.
    pub sync_bn_type: String,
    /// -1: the ranks of one node; 0: all ranks; N: groups of N ranks.
    pub group_size: i64,
}

/// `MODEL.AMP_PARAMS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct AmpParams {
    pub use_amp: bool,
    /// Options of the AMP implementation (free-form).
    pub amp_args: Mapping,
    /// `apex` | `pytorch`.
    pub amp_type: String,
}

/// `MODEL.WEIGHTS_INIT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct WeightsInitConfig {
    /// Weights file; empty: no initialisation.
    pub params_file: String,
    /// Key of the state dict inside the file; empty: the file is the state dict.
    pub state_dict_key_name: String,
    /// Parameter names containing any of these are not loaded.
    pub skip_layers: Vec<String>,
    /// Prefix stripped from the file's parameter names ...
    pub remove_prefix: String,
    /// ... then this one is prepended.
    pub append_prefix: String,
}

impl HeadConfig {
    /// The heads as chains of modules: a list of pairs is one chain, a list of lists is several.
    pub fn chains(&self) -> Vec<Vec<&HeadModule>> {
        if self
            .params
            .iter()
            .all(|e| matches!(e, HeadEntry::Module(_)))
        {
            let chain: Vec<&HeadModule> = self
                .params
                .iter()
                .filter_map(|e| match e {
                    HeadEntry::Module(m) => Some(m),
                    HeadEntry::Chain(_) => None,
                })
                .collect();
            return if chain.is_empty() {
                Vec::new()
            } else {
                vec![chain]
            };
        }
        self.params
            .iter()
            .map(|e| match e {
                HeadEntry::Module(m) => vec![m],
                HeadEntry::Chain(c) => c.iter().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_params_read_as_chains() {
        let single: HeadConfig = serde_yaml::from_str(
            r#"{PARAMS: [["mlp", {"dims": [2048, 2048]}], ["mlp", {"dims": [2048, 128]}]],
                BATCHNORM_EPS: 1.0e-5, BATCHNORM_MOMENTUM: 0.1, PARAMS_MULTIPLIER: 1.0}"#,
        )
        .unwrap();
        let chains = single.chains();
        assert_eq!(chains.len(), 1);
        assert_eq!(chains[0].len(), 2);
        assert_eq!(
            chains[0][1].params.get("dims"),
            Some(&serde_yaml::from_str::<Value>("[2048, 128]").unwrap())
        );

        let multi: HeadConfig = serde_yaml::from_str(
            r#"{PARAMS: [[["mlp", {}], ["mlp", {}]], [["eval_mlp", {}]]],
                BATCHNORM_EPS: 1.0e-5, BATCHNORM_MOMENTUM: 0.1, PARAMS_MULTIPLIER: 1.0}"#,
        )
        .unwrap();
        let names: Vec<Vec<&str>> = multi
            .chains()
            .iter()
            .map(|c| c.iter().map(|m| m.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["mlp", "mlp"], vec!["eval_mlp"]]);
    }

    #[test]
    fn temp_frozen_entries_read_name_and_iterations() {
        let entries: Vec<TempFrozenParam> = serde_yaml::from_str(
            "[['module.heads.0.prototypes0.weight_v', 1251], ['heads.0.prototypes0.weight_g', 2]]",
        )
        .unwrap();
        assert_eq!(entries[0].name, "module.heads.0.prototypes0.weight_v");
        assert_eq!(entries[0].iterations, 1251);
        assert_eq!(entries[1].iterations, 2);
        let wrong = serde_yaml::from_str::<Vec<TempFrozenParam>>("[['heads.0.x']]").unwrap_err();
        assert!(
            wrong.to_string().contains("[parameter name, iterations]"),
            "{wrong}"
        );
    }

    #[test]
    fn grad_clip_norm_accepts_inf() {
        let clip: GradClipConfig =
            serde_yaml::from_str("{USE_GRAD_CLIP: true, NORM_TYPE: inf, MAX_NORM: 1.0}").unwrap();
        assert!(clip.norm_type.is_infinite());
    }

    #[test]
    fn pool_ops_read_layer_op_and_args() {
        let op: FeatPoolOp =
            serde_yaml::from_str(r#"["conv1", ["AvgPool2d", [[10, 10], 10, 4]]]"#).unwrap();
        assert_eq!((op.layer.as_str(), op.op.as_str()), ("conv1", "AvgPool2d"));
        assert_eq!(
            op.args,
            serde_yaml::from_str::<Value>("[[10, 10], 10, 4]").unwrap()
        );
    }
}
