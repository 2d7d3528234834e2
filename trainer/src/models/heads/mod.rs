//! Heads (`MODEL.HEAD.PARAMS`): modules applied to trunk features, and the one table that maps
//! VISSL head names to their parameter parsers.
//!
//! `HEAD.PARAMS` is a list; each entry is either one module `[name, {kwargs}]` or a list of such
//! modules applied in sequence (VISSL's "list of lists"). A module's parameters live under
//! `heads.<i>` (a single module) or `heads.<i>.<j>` (module `j` of a sequence), as in VISSL.
//! Kwargs are checked when the config is read, so a bad head fails before anything runs.

pub mod dino_head;
pub mod identity;
pub mod linear_eval_mlp;
pub mod mlp;
pub mod swav_head;

use super::trunks::FeatureShape;
use super::yaml::{describe, Block};
use super::{ModelError, Result};
use serde_yaml::Value;
use std::sync::Arc;
use tch::{nn, Tensor};

/// `MODEL.HEAD` settings shared by every head; `Default` is VISSL's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSettings {
    /// `BATCHNORM_EPS` of the heads' batch norms.
    pub batchnorm_eps: f64,
    /// `BATCHNORM_MOMENTUM` of the heads' batch norms (PyTorch convention).
    pub batchnorm_momentum: f64,
    /// `PARAMS_MULTIPLIER`: scales the initial weights and biases of the heads' linear layers.
    pub params_multiplier: f64,
}

impl Default for HeadSettings {
    fn default() -> Self {
        HeadSettings {
            batchnorm_eps: 1e-5,
            batchnorm_momentum: 0.1,
            params_multiplier: 1.0,
        }
    }
}

impl HeadSettings {
    /// Reads the scalar settings of a `MODEL.HEAD` block (its `PARAMS` go to [`HeadParams::list_from_yaml`]).
    pub fn from_yaml(head: &Value) -> Result<Self> {
        let block = Block::new("MODEL.HEAD", head)?;
        block.check_keys(&[
            "PARAMS",
            "BATCHNORM_EPS",
            "BATCHNORM_MOMENTUM",
            "PARAMS_MULTIPLIER",
        ])?;
        let d = HeadSettings::default();
        Ok(HeadSettings {
            batchnorm_eps: block.float("BATCHNORM_EPS", d.batchnorm_eps)?,
            batchnorm_momentum: block.float("BATCHNORM_MOMENTUM", d.batchnorm_momentum)?,
            params_multiplier: block.float("PARAMS_MULTIPLIER", d.params_multiplier)?,
        })
    }

    /// A batch-norm config with these settings and PyTorch's initial weight 1, bias 0.
    pub(crate) fn batch_norm(&self) -> nn::BatchNormConfig {
        nn::BatchNormConfig {
            eps: self.batchnorm_eps,
            momentum: self.batchnorm_momentum,
            ws_init: nn::Init::Const(1.0),
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        }
    }
}

/// A built head module.
pub trait Head: std::fmt::Debug + Send {
    /// Applies the head; an input of the wrong shape fails naming the head and both shapes.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor>;

    /// Every output of the head when it ends the model (SwAV's embedding and prototype scores);
    /// heads with one output return [`Head::forward_t`]'s.
    fn forward_outputs_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        Ok(vec![self.forward_t(xs, train)?])
    }
}

/// The parsed kwargs of one head module: what it accepts and how to build it.
pub trait HeadConfig: std::fmt::Debug + Send + Sync {
    /// The shape this module produces from `input`, failing (naming `layer`) when it cannot take it.
    fn output_shape(&self, layer: &str, input: FeatureShape) -> Result<FeatureShape>;

    /// Builds the module with its parameters under `p`; `layer` names it in run-time errors.
    fn build(&self, p: nn::Path, layer: &str, settings: &HeadSettings) -> Result<Box<dyn Head>>;
}

/// One head module of `HEAD.PARAMS`: `[name, {kwargs}]`.
#[derive(Debug, Clone)]
pub struct HeadSpec {
    /// The registry name (`mlp`, `eval_mlp`, `identity`).
    pub name: String,
    /// The parsed kwargs.
    pub config: Arc<dyn HeadConfig>,
}

/// Parses a module's kwargs block, whose path is given for messages.
type HeadParser = fn(&Block) -> Result<Arc<dyn HeadConfig>>;

/// The head registry: VISSL name -> kwargs parser.
const HEADS: &[(&str, HeadParser)] = &[
    ("mlp", mlp::parse),
    ("eval_mlp", linear_eval_mlp::parse),
    ("identity", identity::parse),
    ("dino_head", dino_head::parse),
    (swav_head::NAME, swav_head::parse),
];

/// The registered head names.
pub fn head_names() -> Vec<&'static str> {
    HEADS.iter().map(|(name, _)| *name).collect()
}

impl HeadSpec {
    /// Parses `[name, {kwargs}]` (kwargs may be omitted when the head takes none).
    pub fn from_yaml(path: &str, value: &Value) -> Result<Self> {
        let items = match value {
            Value::Sequence(items) if (1..=2).contains(&items.len()) => items,
            other => {
                return Err(ModelError::invalid(
                    path,
                    format!(
                        "a head must be [name, {{kwargs}}], found {}",
                        describe(other)
                    ),
                ))
            }
        };
        let name = match &items[0] {
            Value::String(name) => name.clone(),
            other => {
                return Err(ModelError::invalid(
                    path,
                    format!("head name must be a string, found {}", describe(other)),
                ))
            }
        };
        let parse = HEADS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, parse)| *parse)
            .ok_or_else(|| ModelError::unknown_name("head", &name, path, &head_names()))?;
        let null = Value::Null;
        let kwargs = Block::new(&format!("{path}[{name}]"), items.get(1).unwrap_or(&null))?;
        Ok(HeadSpec {
            name,
            config: parse(&kwargs)?,
        })
    }

    /// Builds a spec directly from a parsed config, for code that assembles models without YAML.
    pub fn new(name: &str, config: Arc<dyn HeadConfig>) -> Self {
        HeadSpec {
            name: name.to_string(),
            config,
        }
    }
}

/// One entry of `HEAD.PARAMS`: a single module, or modules applied in sequence.
#[derive(Debug, Clone)]
pub enum HeadParams {
    /// `["mlp", {...}]`: parameters under `heads.<i>.`.
    Module(HeadSpec),
    /// `[["mlp", {...}], ["mlp", {...}]]`: module `j` under `heads.<i>.<j>.`.
    Sequential(Vec<HeadSpec>),
}

impl HeadParams {
    /// Parses `MODEL.HEAD.PARAMS`.
    pub fn list_from_yaml(params: &Value) -> Result<Vec<HeadParams>> {
        let path = "MODEL.HEAD.PARAMS";
        let entries = match params {
            Value::Null => return Ok(Vec::new()),
            Value::Sequence(entries) => entries,
            other => {
                return Err(ModelError::invalid(
                    path,
                    format!("must be a list of heads, found {}", describe(other)),
                ))
            }
        };
        entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let at = format!("{path}[{i}]");
                match entry {
                    // A list whose first element is itself a list is a sequence of modules.
                    Value::Sequence(items) if matches!(items.first(), Some(Value::Sequence(_))) => {
                        items
                            .iter()
                            .enumerate()
                            .map(|(j, item)| HeadSpec::from_yaml(&format!("{at}[{j}]"), item))
                            .collect::<Result<Vec<_>>>()
                            .map(HeadParams::Sequential)
                    }
                    other => HeadSpec::from_yaml(&at, other).map(HeadParams::Module),
                }
            })
            .collect()
    }

    /// The modules of this head, in application order.
    pub fn modules(&self) -> &[HeadSpec] {
        match self {
            HeadParams::Module(spec) => std::slice::from_ref(spec),
            HeadParams::Sequential(specs) => specs,
        }
    }

    /// VISSL's head name: the module name, or the module names joined by `->`.
    pub fn name(&self) -> String {
        let names: Vec<&str> = self.modules().iter().map(|m| m.name.as_str()).collect();
        names.join("->")
    }

    /// The shape this head produces from `input`; `layer` is the head's parameter prefix.
    pub fn output_shape(&self, layer: &str, input: FeatureShape) -> Result<FeatureShape> {
        self.modules_with_layers(layer)
            .try_fold(input, |shape, (spec, module_layer)| {
                spec.config.output_shape(&module_layer, shape)
            })
    }

    /// Builds the head under `p`, whose dotted name is `layer` (e.g. `heads.0`).
    pub fn build(&self, p: &nn::Path, layer: &str, settings: &HeadSettings) -> Result<BuiltHead> {
        let modules = match self {
            HeadParams::Module(spec) => {
                vec![spec
                    .config
                    .build(p.clone(), &format!("{layer} ({})", spec.name), settings)?]
            }
            HeadParams::Sequential(specs) => specs
                .iter()
                .enumerate()
                .map(|(j, spec)| {
                    spec.config
                        .build(p / j, &format!("{layer}.{j} ({})", spec.name), settings)
                })
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(BuiltHead {
            name: self.name(),
            layer: layer.to_string(),
            modules,
        })
    }

    fn modules_with_layers<'a>(
        &'a self,
        layer: &'a str,
    ) -> impl Iterator<Item = (&'a HeadSpec, String)> + 'a {
        let sequential = matches!(self, HeadParams::Sequential(_));
        self.modules().iter().enumerate().map(move |(j, spec)| {
            let at = if sequential {
                format!("{layer}.{j}")
            } else {
                layer.to_string()
            };
            (spec, format!("{at} ({})", spec.name))
        })
    }
}

/// A built head: its modules applied in order.
#[derive(Debug)]
pub struct BuiltHead {
    /// VISSL's head name (`mlp`, `mlp->mlp`).
    pub name: String,
    /// The parameter prefix (`heads.0`).
    pub layer: String,
    modules: Vec<Box<dyn Head>>,
}

impl BuiltHead {
    /// Applies the modules in sequence.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.modules
            .iter()
            .try_fold(xs.shallow_clone(), |out, module| {
                module.forward_t(&out, train)
            })
    }

    /// Applies the modules in sequence; the last one returns all its outputs.
    pub fn forward_outputs_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let Some((last, first)) = self.modules.split_last() else {
            return Ok(vec![xs.shallow_clone()]);
        };
        let hidden = first.iter().try_fold(xs.shallow_clone(), |out, module| {
            module.forward_t(&out, train)
        })?;
        last.forward_outputs_t(&hidden, train)
    }
}

/// Initialises a linear layer as PyTorch's `nn.Linear` does (weights and biases uniform in
/// ±1/sqrt(fan_in)), then scales both by `PARAMS_MULTIPLIER` as VISSL's heads do.
pub(crate) fn linear(
    p: nn::Path,
    d_in: i64,
    d_out: i64,
    bias: bool,
    settings: &HeadSettings,
) -> Result<nn::Linear> {
    let bound = 1.0 / (d_in as f64).sqrt();
    let init = nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let layer = nn::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            ws_init: init,
            bs_init: Some(init),
            bias,
        },
    );
    if settings.params_multiplier != 1.0 {
        let m = settings.params_multiplier;
        tch::no_grad(|| -> Result<()> {
            let _ = layer.ws.shallow_clone().f_mul_scalar_(m)?;
            if let Some(bs) = &layer.bs {
                let _ = bs.shallow_clone().f_mul_scalar_(m)?;
            }
            Ok(())
        })?;
    }
    Ok(layer)
}
