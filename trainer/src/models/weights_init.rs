//! `MODEL.WEIGHTS_INIT`: initialise a model from a `.safetensors` weights file with VISSL's
//! name rules, and [`save_safetensors`] to write one.
//!
//! Nested checkpoints are stored flattened with dots, so VISSL's `state_dict["classy_state_dict"]
//! ["base_model"]["model"]["trunk"]["_feature_blocks.conv1.weight"]` is the safetensors name
//! `classy_state_dict.base_model.model.trunk._feature_blocks.conv1.weight`. The steps, as in VISSL:
//! 1. `STATE_DICT_KEY_NAME` selects a namespace (`""`: the whole file; a list joins with dots).
//!    `classy_state_dict` reads VISSL's `base_model.model.{trunk,heads}` and ignores the prefix
//!    settings; a file that holds model names directly (`trunk.`, `heads.`, as [`save_safetensors`]
//!    writes them) is read as is under that default key.
//! 2. `REMOVE_PREFIX` is stripped from names that start with it, then `APPEND_PREFIX` is prepended.
//! 3. VISSL's trunk spellings `trunk._feature_blocks.`, `trunk.base_model.` and
//!    `trunk.base_model._feature_blocks.` all become this model's `trunk.`.
//!
//! A model layer whose name contains one of `SKIP_LAYERS` is left alone; a shape mismatch names the
//! parameter and both shapes and loads nothing.

use super::yaml::{describe, Block};
use super::{shape_str, ModelError, Result};
use serde_yaml::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tch::{nn, Device, Tensor};

/// `MODEL.WEIGHTS_INIT`; `Default` is VISSL's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsInit {
    /// `PARAMS_FILE`: the `.safetensors` file ("" for none).
    pub params_file: String,
    /// `STATE_DICT_KEY_NAME`: the namespace inside the file, as a path of keys (empty: the whole file).
    pub state_dict_key_name: Vec<String>,
    /// `SKIP_LAYERS`: model layers whose name contains any of these are not loaded.
    pub skip_layers: Vec<String>,
    /// `REMOVE_PREFIX`: stripped from the start of file names (applied first).
    pub remove_prefix: String,
    /// `APPEND_PREFIX`: prepended to every file name (applied second).
    pub append_prefix: String,
}

impl Default for WeightsInit {
    fn default() -> Self {
        WeightsInit {
            params_file: String::new(),
            state_dict_key_name: vec![CLASSY_STATE_DICT.to_string()],
            skip_layers: vec!["num_batches_tracked".to_string()],
            remove_prefix: String::new(),
            append_prefix: String::new(),
        }
    }
}

const CLASSY_STATE_DICT: &str = "classy_state_dict";

impl WeightsInit {
    /// Reads a `MODEL.WEIGHTS_INIT` block.
    pub fn from_yaml(value: &Value) -> Result<Self> {
        let block = Block::new("MODEL.WEIGHTS_INIT", value)?;
        block.check_keys(&[
            "PARAMS_FILE",
            "STATE_DICT_KEY_NAME",
            "SKIP_LAYERS",
            "REMOVE_PREFIX",
            "APPEND_PREFIX",
        ])?;
        let d = WeightsInit::default();
        let state_dict_key_name = match block.get("STATE_DICT_KEY_NAME") {
            None => d.state_dict_key_name,
            Some(Value::String(s)) if s.is_empty() => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Sequence(_)) => block.string_list("STATE_DICT_KEY_NAME", &[])?,
            Some(other) => {
                return Err(ModelError::invalid(
                    block.key_path("STATE_DICT_KEY_NAME"),
                    format!(
                        "must be a string or a list of strings, found {}",
                        describe(other)
                    ),
                ))
            }
        };
        Ok(WeightsInit {
            params_file: block.string("PARAMS_FILE", &d.params_file)?,
            state_dict_key_name,
            skip_layers: block.string_list("SKIP_LAYERS", &["num_batches_tracked"])?,
            remove_prefix: block.string("REMOVE_PREFIX", "")?,
            append_prefix: block.string("APPEND_PREFIX", "")?,
        })
    }
}

/// How strictly to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Load `heads.*` layers (VISSL's `should_init_head_weights`); when false they are skipped.
    pub init_heads: bool,
    /// A head layer of another shape is an error; when false it is skipped.
    pub assert_head_shapes: bool,
    /// A model layer the file lacks (and that is not skipped) is an error.
    pub strict: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            init_heads: true,
            assert_head_shapes: true,
            strict: false,
        }
    }
}

/// What a load did, by model parameter name (file names for `unexpected`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Model layers copied from the file.
    pub loaded: Vec<String>,
    /// Model layers left alone on purpose (`SKIP_LAYERS`, heads not initialised, tolerated head
    /// shape mismatches), and skipped file entries.
    pub skipped: Vec<String>,
    /// Model layers the file does not have.
    pub missing: Vec<String>,
    /// File entries (after renaming) that match no model layer.
    pub unexpected: Vec<String>,
    /// The namespace actually read (`classy_state_dict.base_model.model`, a custom key, or "" for the whole file).
    pub namespace: String,
}

impl LoadReport {
    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        format!(
            "loaded {}, skipped {}, missing {}, unexpected {}",
            self.loaded.len(),
            self.skipped.len(),
            self.missing.len(),
            self.unexpected.len()
        )
    }
}

/// Reads all tensors of a `.safetensors` file.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    Tensor::read_safetensors(path).map_err(|e| ModelError::Weights {
        file: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Writes every variable of `vs` (parameters and batch-norm statistics) to a `.safetensors` file,
/// under the names the var store uses.
pub fn save_safetensors(vs: &nn::VarStore, path: impl AsRef<Path>) -> Result<()> {
    let named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    save_named_safetensors(&named, path)
}

/// Writes named tensors to a `.safetensors` file (sorted by name; copied to CPU first).
pub fn save_named_safetensors(named: &[(String, Tensor)], path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let file = || path.display().to_string();
    let mut tensors: Vec<(&str, Tensor)> = named
        .iter()
        .map(|(name, t)| {
            Ok((
                name.as_str(),
                t.f_to_device(Device::Cpu)?.f_contiguous()?.detach(),
            ))
        })
        .collect::<Result<_, tch::TchError>>()
        .map_err(|e| ModelError::Weights {
            file: file(),
            reason: e.to_string(),
        })?;
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    Tensor::write_safetensors(&tensors, path).map_err(|e| ModelError::Weights {
        file: file(),
        reason: e.to_string(),
    })
}

/// Applies `STATE_DICT_KEY_NAME`, `REMOVE_PREFIX`, `APPEND_PREFIX` and VISSL's trunk spellings to
/// the tensors of a file, returning model-named tensors and the namespace read. `file` names the
/// source in errors.
pub fn to_model_names(
    tensors: Vec<(String, Tensor)>,
    init: &WeightsInit,
    file: &str,
) -> Result<(Vec<(String, Tensor)>, String)> {
    let err = |reason: String| ModelError::Weights {
        file: file.to_string(),
        reason,
    };
    let key = init.state_dict_key_name.join(".");
    let (selected, namespace, rename) = if key == CLASSY_STATE_DICT {
        let namespace = format!("{CLASSY_STATE_DICT}.base_model.model");
        let inner = strip_namespace(&tensors, &namespace);
        if !inner.is_empty() {
            (inner, namespace, false)
        } else if tensors
            .iter()
            .any(|(n, _)| n.starts_with("trunk.") || n.starts_with("heads."))
        {
            // A vissl-rs model file: already model names.
            (tensors, String::new(), false)
        } else {
            return Err(err(format!(
                "STATE_DICT_KEY_NAME is `{CLASSY_STATE_DICT}` but the file has no `{namespace}.` entries (top-level names: {}); \
                 for a plain state dict (e.g. torchvision) set STATE_DICT_KEY_NAME: \"\" and APPEND_PREFIX",
                top_level_names(&tensors)
            )));
        }
    } else if key.is_empty() {
        (tensors, String::new(), true)
    } else {
        let inner = strip_namespace(&tensors, &key);
        if inner.is_empty() {
            return Err(err(format!(
                "STATE_DICT_KEY_NAME `{key}` is not in the file (top-level names: {})",
                top_level_names(&tensors)
            )));
        }
        (inner, key, true)
    };
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut renamed = Vec::with_capacity(selected.len());
    for (original, tensor) in selected {
        let mut name = original.clone();
        if rename {
            if !init.remove_prefix.is_empty() {
                if let Some(rest) = name.strip_prefix(&init.remove_prefix) {
                    name = rest.to_string();
                }
            }
            name = format!("{}{name}", init.append_prefix);
        }
        let name = canonical_trunk_name(&name);
        if let Some(first) = seen.insert(name.clone(), original.clone()) {
            return Err(err(format!(
                "`{first}` and `{original}` both map to model layer `{name}`"
            )));
        }
        renamed.push((name, tensor));
    }
    if !renamed
        .iter()
        .any(|(n, _)| n.starts_with("trunk.") || n.starts_with("heads."))
    {
        let examples: Vec<&str> = renamed.iter().take(3).map(|(n, _)| n.as_str()).collect();
        return Err(err(format!(
            "no layer name starts with `trunk.` or `heads.` after STATE_DICT_KEY_NAME, REMOVE_PREFIX and APPEND_PREFIX \
             (names look like: {}); for torchvision weights set APPEND_PREFIX: \"trunk._feature_blocks.\"",
            examples.join(", ")
        )));
    }
    Ok((renamed, namespace))
}

/// Copies model-named tensors into `vars` (the model's named variables). Shapes are checked for
/// every layer before anything is copied.
pub fn load_state_dict(
    vars: &[(String, Tensor)],
    state: Vec<(String, Tensor)>,
    skip_layers: &[String],
    opts: &LoadOptions,
    file: &str,
) -> Result<LoadReport> {
    let skipped_by_config = |name: &str| {
        skip_layers
            .iter()
            .any(|s| !s.is_empty() && name.contains(s.as_str()))
    };
    let state: HashMap<String, Tensor> = state.into_iter().collect();
    let mut sorted: Vec<&(String, Tensor)> = vars.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut report = LoadReport::default();
    let mut copies: Vec<(&Tensor, &Tensor)> = Vec::new();
    for (name, var) in sorted {
        let is_head = name.starts_with("heads.");
        if skipped_by_config(name) || (is_head && !opts.init_heads) {
            report.skipped.push(name.clone());
            continue;
        }
        let Some(src) = state.get(name) else {
            report.missing.push(name.clone());
            continue;
        };
        if src.size() != var.size() {
            if is_head && !opts.assert_head_shapes {
                report.skipped.push(name.clone());
                continue;
            }
            return Err(ModelError::shape(
                format!("{name} (weights file {file})"),
                format!("{} (model)", shape_str(&var.size())),
                format!("{} (file)", shape_str(&src.size())),
            ));
        }
        copies.push((var, src));
        report.loaded.push(name.clone());
    }
    if opts.strict && !report.missing.is_empty() {
        return Err(ModelError::Weights {
            file: file.to_string(),
            reason: format!("layers not initialised: {}", report.missing.join(", ")),
        });
    }
    tch::no_grad(|| -> Result<()> {
        for (var, src) in copies {
            var.shallow_clone().f_copy_(src)?;
        }
        Ok(())
    })?;
    let model_names: BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut extra: Vec<&String> = state
        .keys()
        .filter(|n| !model_names.contains(n.as_str()))
        .collect();
    extra.sort();
    for name in extra {
        if skipped_by_config(name) {
            report.skipped.push(name.clone());
        } else {
            report.unexpected.push(name.clone());
        }
    }
    Ok(report)
}

/// Loads `init.params_file` into `vars` with all of VISSL's renaming rules.
pub fn init_from_file(
    vars: &[(String, Tensor)],
    init: &WeightsInit,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    if init.params_file.is_empty() {
        return Err(ModelError::invalid(
            "MODEL.WEIGHTS_INIT.PARAMS_FILE",
            "is empty: no weights file to load",
        ));
    }
    let tensors = read_safetensors(&init.params_file)?;
    let (state, namespace) = to_model_names(tensors, init, &init.params_file)?;
    let mut report = load_state_dict(vars, state, &init.skip_layers, opts, &init.params_file)?;
    report.namespace = namespace;
    tracing::info!(file = %init.params_file, "initialised model weights: {}", report.summary());
    Ok(report)
}

/// Loads `init.params_file` into every variable of `vs`.
pub fn init_var_store(
    vs: &nn::VarStore,
    init: &WeightsInit,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    init_from_file(&vars, init, opts)
}

/// The entries under `namespace.`, with that prefix removed.
fn strip_namespace(tensors: &[(String, Tensor)], namespace: &str) -> Vec<(String, Tensor)> {
    let prefix = format!("{namespace}.");
    tensors
        .iter()
        .filter_map(|(n, t)| {
            n.strip_prefix(&prefix)
                .map(|rest| (rest.to_string(), t.shallow_clone()))
        })
        .collect()
}

/// VISSL's trunk prefixes (`_feature_blocks.`, feature-extractor `base_model.`) -> this model's `trunk.`.
fn canonical_trunk_name(name: &str) -> String {
    match name.strip_prefix("trunk.") {
        Some(rest) => {
            let rest = rest.strip_prefix("base_model.").unwrap_or(rest);
            let rest = rest.strip_prefix("_feature_blocks.").unwrap_or(rest);
            format!("trunk.{rest}")
        }
        None => name.to_string(),
    }
}

/// The distinct first name components, for "what is in this file" messages.
fn top_level_names(tensors: &[(String, Tensor)]) -> String {
    let firsts: BTreeSet<&str> = tensors
        .iter()
        .map(|(n, _)| n.split('.').next().unwrap_or(n))
        .collect();
    let mut shown: Vec<&str> = firsts.iter().take(8).copied().collect();
    if firsts.len() > shown.len() {
        shown.push("...");
    }
    shown.join(", ")
}
