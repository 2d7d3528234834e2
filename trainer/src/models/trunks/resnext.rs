//! The ResNe(X)t trunk (`resnet`), torchvision's ResNet with VISSL's options.
//!
//! Parameter names are torchvision's (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`,
//! `layer2.0.downsample.0.weight`; no `fc`), so weights convert both ways. Initialisation is
//! torchvision's: Kaiming-normal (fan-out, ReLU) convolutions, norm weights 1 and biases 0, and with
//! `ZERO_INIT_RESIDUAL` the last norm of every residual branch starts at 0.
//!
//! vissl-rs additions under `RESNETS` (absent in VISSL, defaults reproduce VISSL):
//! * `STEM: imagenet | cifar`: `cifar` replaces the 7x7 stride-2 convolution and the max-pool by a
//!   3x3 stride-1 convolution, for 28x28 / 32x32 inputs.
//! * `BASE_CHANNELS: 64`: channels of the stem and of `layer1` before `WIDTH_MULTIPLIER`
//!   (the later stages double it), to build narrow networks for quick runs.

use super::{deepest_feature, FeatureShape, InputType, Trunk};
use crate::dist::sync_bn;
use crate::models::yaml::Block;
use crate::models::{shape_str, ModelError, Result};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// `RESNETS.NORM`: the normalisation after every convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `BatchNorm2d`.
    BatchNorm,
    /// VISSL's `LayerNorm2d`: a `GroupNorm` with one group.
    LayerNorm,
    /// `GroupNorm` with `RESNETS.GROUPNORM_GROUPS` groups.
    GroupNorm { groups: i64 },
}

/// The stem (vissl-rs addition `RESNETS.STEM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stem {
    /// torchvision's: 7x7 stride-2 convolution, then a 3x3 stride-2 max-pool.
    #[default]
    ImageNet,
    /// 3x3 stride-1 convolution and no max-pool, for small images.
    Cifar,
}

/// `MODEL.TRUNK.RESNETS`; `Default` is VISSL's default (ResNet-50).
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetParams {
    /// `DEPTH`: 18, 34 (basic blocks), 50, 101, 152, 200 (bottleneck blocks).
    pub depth: i64,
    /// `WIDTH_MULTIPLIER`: scales every stage's width (ResNet-50-w2 is 2).
    pub width_multiplier: i64,
    /// `NORM` (with `GROUPNORM_GROUPS`).
    pub norm: Norm,
    /// `GROUPS`: groups of the 3x3 convolution (ResNeXt cardinality).
    pub groups: i64,
    /// `WIDTH_PER_GROUP`: channels per group at the first stage (64 for plain ResNets).
    pub width_per_group: i64,
    /// `ZERO_INIT_RESIDUAL`: start every residual branch's last norm weight at zero.
    pub zero_init_residual: bool,
    /// `LAYER4_STRIDE`: 2 (torchvision) or 1 (keeps resolution, as colorization does).
    pub layer4_stride: i64,
    /// `STEM` (vissl-rs addition).
    pub stem: Stem,
    /// `BASE_CHANNELS` (vissl-rs addition): stem / first-stage width before the multiplier.
    pub base_channels: i64,
}

impl Default for ResNetParams {
    fn default() -> Self {
        ResNetParams {
            depth: 50,
            width_multiplier: 1,
            norm: Norm::BatchNorm,
            groups: 1,
            width_per_group: 64,
            zero_init_residual: false,
            layer4_stride: 2,
            stem: Stem::ImageNet,
            base_channels: 64,
        }
    }
}

fn with_depth(depth: i64) -> ResNetParams {
    ResNetParams {
        depth,
        ..ResNetParams::default()
    }
}

/// torchvision's `resnet18`.
pub fn resnet18() -> ResNetParams {
    with_depth(18)
}

/// torchvision's `resnet34`.
pub fn resnet34() -> ResNetParams {
    with_depth(34)
}

/// torchvision's `resnet50`.
pub fn resnet50() -> ResNetParams {
    with_depth(50)
}

/// torchvision's `resnet101`.
pub fn resnet101() -> ResNetParams {
    with_depth(101)
}

/// torchvision's `resnet152`.
pub fn resnet152() -> ResNetParams {
    with_depth(152)
}

/// VISSL's ResNet-200.
pub fn resnet200() -> ResNetParams {
    with_depth(200)
}

/// torchvision's `resnext50_32x4d`.
pub fn resnext50_32x4d() -> ResNetParams {
    ResNetParams {
        groups: 32,
        width_per_group: 4,
        ..with_depth(50)
    }
}

/// torchvision's `resnext101_32x8d`.
pub fn resnext101_32x8d() -> ResNetParams {
    ResNetParams {
        groups: 32,
        width_per_group: 8,
        ..with_depth(101)
    }
}

/// The residual block kind and how many blocks each of the four stages has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The supported depths: (depth, block kind, blocks per stage).
const DEPTHS: &[(i64, BlockKind, [usize; 4])] = &[
    (18, BlockKind::Basic, [2, 2, 2, 2]),
    (34, BlockKind::Basic, [3, 4, 6, 3]),
    (50, BlockKind::Bottleneck, [3, 4, 6, 3]),
    (101, BlockKind::Bottleneck, [3, 4, 23, 3]),
    (152, BlockKind::Bottleneck, [3, 8, 36, 3]),
    (200, BlockKind::Bottleneck, [3, 24, 36, 3]),
];

const KEYS: &[&str] = &[
    "DEPTH",
    "WIDTH_MULTIPLIER",
    "NORM",
    "GROUPNORM_GROUPS",
    "STANDARDIZE_CONVOLUTIONS",
    "GROUPS",
    "ZERO_INIT_RESIDUAL",
    "WIDTH_PER_GROUP",
    "LAYER4_STRIDE",
    "STEM",
    "BASE_CHANNELS",
];

impl ResNetParams {
    /// Reads a `MODEL.TRUNK.RESNETS` block (missing keys keep VISSL's defaults).
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        Self::from_yaml_at("MODEL.TRUNK.RESNETS", value)
    }

    /// Reads a `RESNETS` block found at `path`.
    pub fn from_yaml_at(path: &str, value: &serde_yaml::Value) -> Result<Self> {
        let block = Block::new(path, value)?;
        block.check_keys(KEYS)?;
        let d = ResNetParams::default();
        let groupnorm_groups = block.int("GROUPNORM_GROUPS", 32)?;
        let norm = match block.string("NORM", "BatchNorm")?.as_str() {
            "BatchNorm" => Norm::BatchNorm,
            "LayerNorm" => Norm::LayerNorm,
            "GroupNorm" => Norm::GroupNorm {
                groups: groupnorm_groups,
            },
            other => {
                return Err(ModelError::unknown_name(
                    "norm",
                    other,
                    &block.key_path("NORM"),
                    &["BatchNorm", "LayerNorm", "GroupNorm"],
                ))
            }
        };
        let stem = match block.string("STEM", "imagenet")?.as_str() {
            "imagenet" => Stem::ImageNet,
            "cifar" => Stem::Cifar,
            other => {
                return Err(ModelError::unknown_name(
                    "stem",
                    other,
                    &block.key_path("STEM"),
                    &["imagenet", "cifar"],
                ))
            }
        };
        // VISSL's ResNeXt ignores this key; refusing `true` avoids a silently different model.
        if block.bool("STANDARDIZE_CONVOLUTIONS", false)? {
            return Err(ModelError::invalid(
                block.key_path("STANDARDIZE_CONVOLUTIONS"),
                "weight-standardised convolutions are not supported by the resnet trunk",
            ));
        }
        let params = ResNetParams {
            depth: block.int("DEPTH", d.depth)?,
            width_multiplier: block.int("WIDTH_MULTIPLIER", d.width_multiplier)?,
            norm,
            groups: block.int("GROUPS", d.groups)?,
            width_per_group: block.int("WIDTH_PER_GROUP", d.width_per_group)?,
            zero_init_residual: block.bool("ZERO_INIT_RESIDUAL", d.zero_init_residual)?,
            layer4_stride: block.int("LAYER4_STRIDE", d.layer4_stride)?,
            stem,
            base_channels: block.int("BASE_CHANNELS", d.base_channels)?,
        };
        params.validate(path)?;
        Ok(params)
    }

    /// Checks the combination of values; `path` prefixes the key names in errors.
    pub fn validate(&self, path: &str) -> Result<()> {
        let key = |k: &str| format!("{path}.{k}");
        let kind = self.block_kind().ok_or_else(|| {
            let depths: Vec<String> = DEPTHS.iter().map(|(d, _, _)| d.to_string()).collect();
            ModelError::invalid(
                key("DEPTH"),
                format!("{} is not one of {}", self.depth, depths.join(", ")),
            )
        })?;
        for (name, value) in [
            ("WIDTH_MULTIPLIER", self.width_multiplier),
            ("GROUPS", self.groups),
            ("WIDTH_PER_GROUP", self.width_per_group),
            ("BASE_CHANNELS", self.base_channels),
        ] {
            if value < 1 {
                return Err(ModelError::invalid(
                    key(name),
                    format!("must be at least 1, got {value}"),
                ));
            }
        }
        if kind == BlockKind::Basic && (self.groups != 1 || self.width_per_group != 64) {
            return Err(ModelError::invalid(
                key("GROUPS"),
                format!(
                    "depth {} uses basic blocks, which need GROUPS=1 and WIDTH_PER_GROUP=64 (got {} and {})",
                    self.depth, self.groups, self.width_per_group
                ),
            ));
        }
        if !matches!(self.layer4_stride, 1 | 2) {
            return Err(ModelError::invalid(
                key("LAYER4_STRIDE"),
                format!("must be 1 or 2, got {}", self.layer4_stride),
            ));
        }
        if let Norm::GroupNorm { groups } = self.norm {
            let widths = self.stage_widths();
            let mut all_channels = std::iter::once(self.stem_channels())
                .chain(widths.iter().flat_map(|w| w.iter().copied()));
            if groups < 1 || all_channels.any(|c| c % groups != 0) {
                return Err(ModelError::invalid(
                    key("GROUPNORM_GROUPS"),
                    format!("{groups} groups must divide every layer's channel count"),
                ));
            }
        }
        Ok(())
    }

    fn block_kind(&self) -> Option<BlockKind> {
        DEPTHS
            .iter()
            .find(|(d, _, _)| *d == self.depth)
            .map(|(_, kind, _)| *kind)
    }

    fn blocks_per_stage(&self) -> [usize; 4] {
        DEPTHS
            .iter()
            .find(|(d, _, _)| *d == self.depth)
            .map(|(_, _, n)| *n)
            .unwrap_or([0; 4])
    }

    fn stem_channels(&self) -> i64 {
        self.base_channels * self.width_multiplier
    }

    /// Per stage: (inner width of the grouped 3x3 convolution, output channels).
    fn stage_widths(&self) -> [[i64; 2]; 4] {
        let expansion = self.block_kind().map_or(1, BlockKind::expansion);
        let mut widths = [[0; 2]; 4];
        for (stage, w) in widths.iter_mut().enumerate() {
            let planes = self.stem_channels() << stage;
            // torchvision: width = planes * (width_per_group / 64) * groups.
            let inner = planes * self.width_per_group / 64 * self.groups;
            *w = [inner, planes * expansion];
        }
        widths
    }

    /// Channels of the trunk's final feature (`res5`, `res5avg`, `flatten`).
    pub fn output_channels(&self) -> i64 {
        self.stage_widths()[3][1]
    }
}

/// A normalisation layer as chosen by `NORM`.
#[derive(Debug)]
enum Norm2d {
    // dist-integration: syncable batch norm (SyncBatchNorm when MODEL.SYNC_BN_CONFIG installs a group).
    Batch(sync_bn::BatchNorm),
    Group(nn::GroupNorm),
}

impl Norm2d {
    /// Weight 1 (or 0 for a zero-initialised residual end) and bias 0, as torchvision initialises.
    fn new(p: nn::Path, channels: i64, norm: Norm, weight: f64) -> Self {
        let ws_init = nn::Init::Const(weight);
        match norm {
            Norm::BatchNorm => Norm2d::Batch(sync_bn::batch_norm2d(
                p,
                channels,
                nn::BatchNormConfig {
                    ws_init,
                    bs_init: nn::Init::Const(0.),
                    ..Default::default()
                },
            )),
            Norm::LayerNorm => Norm2d::Group(group_norm(p, 1, channels, ws_init)),
            Norm::GroupNorm { groups } => Norm2d::Group(group_norm(p, groups, channels, ws_init)),
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Norm2d::Batch(bn) => bn.forward_t(xs, train),
            Norm2d::Group(gn) => gn.forward(xs),
        }
    }
}

fn group_norm(p: nn::Path, groups: i64, channels: i64, ws_init: nn::Init) -> nn::GroupNorm {
    nn::group_norm(
        p,
        groups,
        channels,
        nn::GroupNormConfig {
            ws_init,
            bs_init: nn::Init::Const(0.),
            ..Default::default()
        },
    )
}

/// A bias-free convolution with torchvision's Kaiming-normal (fan-out, ReLU) initialisation.
fn conv(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64, groups: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride,
        padding: kernel / 2,
        groups,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(p, c_in, c_out, kernel, config)
}

/// A convolution followed by its norm: `conv{i}` + `bn{i}` in a block, `downsample.0` + `.1`.
#[derive(Debug)]
struct ConvNorm {
    conv: nn::Conv2D,
    norm: Norm2d,
}

impl ConvNorm {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.norm.forward_t(&self.conv.forward(xs), train)
    }
}

/// One residual block: torchvision's `BasicBlock` (3x3, 3x3) or `Bottleneck` (1x1, 3x3, 1x1),
/// each convolution followed by a norm, ReLU between them and after the residual sum.
#[derive(Debug)]
struct ResidualBlock {
    branch: Vec<ConvNorm>,
    downsample: Option<ConvNorm>,
}

impl ResidualBlock {
    fn new(
        p: nn::Path,
        kind: BlockKind,
        c_in: i64,
        widths: [i64; 2],
        stride: i64,
        cfg: &ResNetParams,
    ) -> Self {
        let [inner, c_out] = widths;
        // (kernel, stride, groups, output channels) of each convolution; the stride sits on the
        // 3x3 convolution, as in torchvision's ResNet v1.5.
        let convs: Vec<(i64, i64, i64, i64)> = match kind {
            BlockKind::Basic => vec![(3, stride, 1, c_out), (3, 1, 1, c_out)],
            BlockKind::Bottleneck => vec![
                (1, 1, 1, inner),
                (3, stride, cfg.groups, inner),
                (1, 1, 1, c_out),
            ],
        };
        let last = convs.len() - 1;
        let mut channels = c_in;
        let branch = convs
            .into_iter()
            .enumerate()
            .map(|(i, (kernel, s, groups, out))| {
                let n = i + 1;
                let weight = if i == last && cfg.zero_init_residual {
                    0.0
                } else {
                    1.0
                };
                let layer = ConvNorm {
                    conv: conv(&p / format!("conv{n}"), channels, out, kernel, s, groups),
                    norm: Norm2d::new(&p / format!("bn{n}"), out, cfg.norm, weight),
                };
                channels = out;
                layer
            })
            .collect();
        let downsample = (stride != 1 || c_in != c_out).then(|| {
            let ds = &p / "downsample";
            ConvNorm {
                conv: conv(&ds / "0", c_in, c_out, 1, stride, 1),
                norm: Norm2d::new(&ds / "1", c_out, cfg.norm, 1.0),
            }
        });
        ResidualBlock { branch, downsample }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.branch.len() - 1;
        let mut out = xs.shallow_clone();
        for (i, layer) in self.branch.iter().enumerate() {
            out = layer.forward_t(&out, train);
            if i < last {
                out = out.relu();
            }
        }
        let shortcut = match &self.downsample {
            Some(ds) => ds.forward_t(xs, train),
            None => xs.shallow_clone(),
        };
        (out + shortcut).relu()
    }
}

/// VISSL's feature names for the ResNe(X)t trunk, in forward order.
const FEATURES: &[&str] = &[
    "conv1", "res1", "res2", "res3", "res4", "res5", "res5avg", "flatten",
];

/// The ResNe(X)t trunk. Build it with [`ResNet::new`]; run it with [`Trunk::forward_features`]
/// or [`ResNet::forward_t`] (the flattened, average-pooled output).
#[derive(Debug)]
pub struct ResNet {
    stem: ConvNorm,
    stem_kind: Stem,
    stages: Vec<Vec<ResidualBlock>>,
    input_type: InputType,
    stem_channels: i64,
    stage_channels: [i64; 4],
}

impl ResNet {
    /// Builds the trunk with its parameters directly under `p` (torchvision's names).
    pub fn new(p: nn::Path, cfg: &ResNetParams, input_type: InputType) -> Result<Self> {
        cfg.validate("MODEL.TRUNK.RESNETS")?;
        let kind = cfg
            .block_kind()
            .ok_or_else(|| ModelError::invalid("MODEL.TRUNK.RESNETS.DEPTH", "unsupported"))?;
        let stem_channels = cfg.stem_channels();
        let (kernel, stride) = match cfg.stem {
            Stem::ImageNet => (7, 2),
            Stem::Cifar => (3, 1),
        };
        let stem = ConvNorm {
            conv: conv(
                &p / "conv1",
                input_type.trunk_channels(),
                stem_channels,
                kernel,
                stride,
                1,
            ),
            norm: Norm2d::new(&p / "bn1", stem_channels, cfg.norm, 1.0),
        };
        let widths = cfg.stage_widths();
        let mut c_in = stem_channels;
        let mut stages = Vec::with_capacity(4);
        for (stage, n_blocks) in cfg.blocks_per_stage().into_iter().enumerate() {
            let stride = match stage {
                0 => 1,
                3 => cfg.layer4_stride,
                _ => 2,
            };
            let sp = &p / format!("layer{}", stage + 1);
            let blocks: Vec<ResidualBlock> = (0..n_blocks)
                .map(|b| {
                    let block = ResidualBlock::new(
                        &sp / b,
                        kind,
                        c_in,
                        widths[stage],
                        if b == 0 { stride } else { 1 },
                        cfg,
                    );
                    c_in = widths[stage][1];
                    block
                })
                .collect();
            stages.push(blocks);
        }
        Ok(ResNet {
            stem,
            stem_kind: cfg.stem,
            stages,
            input_type,
            stem_channels,
            stage_channels: widths.map(|w| w[1]),
        })
    }

    /// The trunk output (`flatten`): `N x C`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut out = self.forward_features(xs, &["flatten"], train)?;
        Ok(out.remove(0))
    }

    fn check_input(&self, xs: &Tensor) -> Result<()> {
        let size = xs.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(ModelError::shape(
                "trunk.conv1",
                "[N, 3, H, W]",
                shape_str(&size),
            ));
        }
        Ok(())
    }

    /// Runs feature block `index` (of [`FEATURES`]) on the previous block's output.
    fn run_block(&self, index: usize, xs: &Tensor, train: bool) -> Tensor {
        match index {
            0 => self
                .stem
                .forward_t(&self.input_type.convert(xs), train)
                .relu(),
            1 => match self.stem_kind {
                Stem::ImageNet => xs.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false),
                Stem::Cifar => xs.shallow_clone(),
            },
            2..=5 => self.stages[index - 2]
                .iter()
                .fold(xs.shallow_clone(), |out, block| {
                    block.forward_t(&out, train)
                }),
            6 => xs.adaptive_avg_pool2d([1, 1]),
            _ => xs.flatten(1, -1),
        }
    }
}

impl Trunk for ResNet {
    fn feature_names(&self) -> &'static [&'static str] {
        FEATURES
    }

    fn feature_shape(&self, name: &str) -> Result<FeatureShape> {
        let index = deepest_feature(&[name], FEATURES)?;
        Ok(match index {
            0 | 1 => FeatureShape::Map {
                channels: self.stem_channels,
            },
            2..=5 => FeatureShape::Map {
                channels: self.stage_channels[index - 2],
            },
            _ => FeatureShape::Vector(self.stage_channels[3]),
        })
    }

    fn forward_features(&self, xs: &Tensor, names: &[&str], train: bool) -> Result<Vec<Tensor>> {
        let deepest = deepest_feature(names, FEATURES)?;
        self.check_input(xs)?;
        let wanted: Vec<&str> = if names.is_empty() {
            vec![FEATURES[deepest]]
        } else {
            names.to_vec()
        };
        // Keep only the requested features alive, so eval-mode extraction does not hold every stage.
        let mut kept: Vec<Option<Tensor>> = (0..=deepest).map(|_| None).collect();
        let mut out = xs.shallow_clone();
        for (index, slot) in kept.iter_mut().enumerate() {
            out = self.run_block(index, &out, train);
            if wanted.contains(&FEATURES[index]) {
                *slot = Some(out.shallow_clone());
            }
        }
        wanted
            .iter()
            .map(|name| {
                FEATURES
                    .iter()
                    .position(|f| f == name)
                    .and_then(|i| kept[i].as_ref())
                    .map(Tensor::shallow_clone)
                    .ok_or_else(|| {
                        ModelError::unknown_name("trunk feature", name, "trunk output", FEATURES)
                    })
            })
            .collect()
    }
}
