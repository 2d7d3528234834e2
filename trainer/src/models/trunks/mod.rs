//! Trunks (`MODEL.TRUNK.NAME`): the feature extractors, and the one table that maps VISSL trunk
//! names to constructors.

pub mod resnext;
pub mod vision_transformer;

use super::yaml::Block;
use super::{ModelError, Result};
use resnext::{ResNet, ResNetParams};
use tch::{nn, Tensor};
use vision_transformer::{VisionTransformer, VisionTransformerParams};

/// What a trunk feature looks like, known without running the model; used to check heads at build time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureShape {
    /// `N x C x H x W`, with `H`, `W` depending on the input resolution.
    Map { channels: i64 },
    /// `N x D`, or `N x D x 1 x 1`.
    Vector(i64),
    /// `N x D` with `D` only known at run time (a flattened map).
    Flat,
}

/// `MODEL.INPUT_TYPE`: the colour layout the trunk sees. Batches arrive as RGB; the trunk converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputType {
    /// Unchanged RGB.
    #[default]
    Rgb,
    /// Channels reversed.
    Bgr,
    /// The first ("L") channel of an LAB image only, as colorization models use.
    Lab,
}

impl InputType {
    /// Parses VISSL's `rgb` / `bgr` / `lab`.
    pub fn parse(path: &str, name: &str) -> Result<Self> {
        match name {
            "rgb" => Ok(InputType::Rgb),
            "bgr" => Ok(InputType::Bgr),
            "lab" => Ok(InputType::Lab),
            other => Err(ModelError::unknown_name(
                "input type",
                other,
                path,
                &["rgb", "bgr", "lab"],
            )),
        }
    }

    /// Number of channels the first convolution receives.
    pub fn trunk_channels(self) -> i64 {
        match self {
            InputType::Lab => 1,
            InputType::Rgb | InputType::Bgr => 3,
        }
    }

    /// Converts an RGB(-ordered) batch into what the trunk expects.
    pub fn convert(self, xs: &Tensor) -> Tensor {
        match self {
            InputType::Rgb => xs.shallow_clone(),
            InputType::Bgr => xs.flip([1]),
            InputType::Lab => xs.narrow(1, 0, 1),
        }
    }
}

/// A trunk: computes VISSL's named features from an image batch.
pub trait Trunk: std::fmt::Debug + Send {
    /// The feature names this trunk can return, in forward order; the last one is the default output.
    fn feature_names(&self) -> &'static [&'static str];

    /// The shape of feature `name` (one of [`Trunk::feature_names`]).
    fn feature_shape(&self, name: &str) -> Result<FeatureShape>;

    /// Runs the trunk only as far as the deepest requested feature and returns the features in
    /// the order asked (duplicates allowed; an empty list means the last feature).
    fn forward_features(&self, xs: &Tensor, names: &[&str], train: bool) -> Result<Vec<Tensor>>;
}

/// `MODEL.TRUNK` plus `MODEL.INPUT_TYPE`: which trunk to build and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrunkParams {
    /// `NAME`, a key of the trunk registry.
    pub name: String,
    /// `MODEL.INPUT_TYPE`.
    pub input_type: InputType,
    /// `RESNETS` (also read from VISSL's older `TRUNK_PARAMS.RESNETS`).
    pub resnets: ResNetParams,
    /// `VISION_TRANSFORMERS`.
    pub vision_transformers: VisionTransformerParams,
}

impl Default for TrunkParams {
    fn default() -> Self {
        TrunkParams {
            name: "resnet".into(),
            input_type: InputType::Rgb,
            resnets: ResNetParams::default(),
            vision_transformers: VisionTransformerParams::default(),
        }
    }
}

/// Trunk-specific parameter blocks VISSL's defaults carry for trunks this build does not have;
/// they are accepted (and ignored) so a merged VISSL config reads cleanly.
const OTHER_TRUNK_BLOCKS: &[&str] = &[
    "RESNETS_SK",
    "EFFICIENT_NETS",
    "MOBILE_NET",
    "REGNET",
    "XCIT",
    "SWIN_TRANSFORMER",
    "BEIT",
    "CONVNEXT",
    "CONVIT",
];

impl TrunkParams {
    /// Reads a `MODEL.TRUNK` block; `path` is where it sits (for messages).
    pub fn from_yaml(path: &str, trunk: &serde_yaml::Value, input_type: InputType) -> Result<Self> {
        let block = Block::new(path, trunk)?;
        let mut known = vec!["NAME", "RESNETS", "VISION_TRANSFORMERS", "TRUNK_PARAMS"];
        known.extend_from_slice(OTHER_TRUNK_BLOCKS);
        block.check_keys(&known)?;
        let name = block.string("NAME", "resnet")?;
        if !trunk_names().contains(&name.as_str()) {
            return Err(ModelError::unknown_name(
                "trunk",
                &name,
                &block.key_path("NAME"),
                &trunk_names(),
            ));
        }
        // VISSL's docs nest the per-trunk blocks under TRUNK_PARAMS; its defaults.yaml does not.
        let legacy = block.block("TRUNK_PARAMS")?;
        legacy.check_keys(&["RESNETS"])?;
        let resnets = match (block.get("RESNETS"), legacy.get("RESNETS")) {
            (Some(_), Some(_)) => {
                return Err(ModelError::invalid(
                    block.key_path("TRUNK_PARAMS.RESNETS"),
                    format!(
                        "give RESNETS once, either as {0}.RESNETS or {0}.TRUNK_PARAMS.RESNETS",
                        path
                    ),
                ))
            }
            (Some(v), None) => ResNetParams::from_yaml_at(&block.key_path("RESNETS"), v)?,
            (None, Some(v)) => ResNetParams::from_yaml_at(&legacy.key_path("RESNETS"), v)?,
            (None, None) => ResNetParams::default(),
        };
        let vision_transformers = match block.get("VISION_TRANSFORMERS") {
            Some(v) => {
                VisionTransformerParams::from_yaml_at(&block.key_path("VISION_TRANSFORMERS"), v)?
            }
            None => VisionTransformerParams::default(),
        };
        Ok(TrunkParams {
            name,
            input_type,
            resnets,
            vision_transformers,
        })
    }
}

type TrunkBuilder = fn(nn::Path, &TrunkParams) -> Result<Box<dyn Trunk>>;

fn build_resnet(p: nn::Path, params: &TrunkParams) -> Result<Box<dyn Trunk>> {
    Ok(Box::new(ResNet::new(
        p,
        &params.resnets,
        params.input_type,
    )?))
}

fn build_vision_transformer(p: nn::Path, params: &TrunkParams) -> Result<Box<dyn Trunk>> {
    Ok(Box::new(VisionTransformer::new(
        p,
        &params.vision_transformers,
        params.input_type,
    )?))
}

/// The trunk registry: VISSL name -> constructor.
const TRUNKS: &[(&str, TrunkBuilder)] = &[
    ("resnet", build_resnet),
    ("vision_transformer", build_vision_transformer),
];

/// The registered trunk names.
pub fn trunk_names() -> Vec<&'static str> {
    TRUNKS.iter().map(|(name, _)| *name).collect()
}

/// Builds the trunk `params.name` under `p`.
pub fn build_trunk(p: nn::Path, params: &TrunkParams) -> Result<Box<dyn Trunk>> {
    match TRUNKS.iter().find(|(name, _)| *name == params.name) {
        Some((_, build)) => build(p, params),
        None => Err(ModelError::unknown_name(
            "trunk",
            &params.name,
            "MODEL.TRUNK.NAME",
            &trunk_names(),
        )),
    }
}

/// Checks requested feature names against `known` and returns the index of the deepest one
/// (an empty request means the last feature).
pub(crate) fn deepest_feature(names: &[&str], known: &[&str]) -> Result<usize> {
    if names.is_empty() {
        return Ok(known.len() - 1);
    }
    let mut deepest = 0;
    for name in names {
        match known.iter().position(|k| k == name) {
            Some(i) => deepest = deepest.max(i),
            None => {
                return Err(ModelError::unknown_name(
                    "trunk feature",
                    name,
                    "trunk output",
                    known,
                ))
            }
        }
    }
    Ok(deepest)
}
