//! The public entry point: compose, validate, infer, and type a config.

use std::path::PathBuf;

use serde_yaml::Value;

use super::compose::compose;
use super::error::ConfigError;
use super::infer::{infer, World};
use super::names::check_names;
use super::resolved::Config;
use super::schema::{complete_from, validate};
use super::tree::KeyPath;

/// Where configs live and what the launcher knows about the process layout.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The `configs/` folder: `defaults.yaml`, `pretrain/...`, `benchmark/...`, `dataset_catalog.json`.
    pub configs_root: PathBuf,
    /// Nodes and processes per node as launched; `None`: take them from `config.DISTRIBUTED`.
    pub world: Option<World>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            configs_root: default_configs_root(),
            world: None,
        }
    }
}

/// Loads a config from command-line arguments as VISSL users type them
/// (`config=pretrain/simclr/simclr_8node_resnet config.OPTIMIZER.num_epochs=10 ...`).
/// Returns the first problem; [`check`] returns all of them.
pub fn load(opts: &LoadOptions, args: &[String]) -> Result<Config, ConfigError> {
    check(opts, args).map_err(|errors| {
        errors
            .into_iter()
            .next()
            .unwrap_or_else(|| ConfigError::Invalid {
                path: "config".into(),
                reason: "rejected without a reason (a bug in the config checks)".into(),
            })
    })
}

/// Like [`load`], but reports every unknown key, wrong type and unknown registry name at once
/// (composition and inference errors stop the load and come alone).
pub fn check(opts: &LoadOptions, args: &[String]) -> Result<Config, Vec<ConfigError>> {
    let mut composed = compose(&opts.configs_root, args).map_err(|e| vec![e])?;
    check_version(&composed.tree).map_err(|e| vec![e])?;
    let mut errors = validate(
        &mut composed.tree,
        &composed.schema,
        &composed.origins,
        &composed.added,
    );
    errors.extend(check_names(&composed.tree));
    if !errors.is_empty() {
        return Err(errors);
    }
    // VISSL completes the teacher of distillation from MODEL before inferring anything.
    let model = KeyPath::default().key("config").key("MODEL");
    let teacher = KeyPath::default()
        .key("config")
        .key("DISTILLATION")
        .key("TEACHER_MODEL");
    complete_from(&mut composed.tree, &model, &teacher);

    let Value::Mapping(mut root) = composed.tree else {
        return Err(vec![ConfigError::Invalid {
            path: "config".into(),
            reason: "the document is not a mapping".into(),
        }]);
    };
    let config = root.get_mut("config").ok_or_else(|| {
        vec![ConfigError::Invalid {
            path: "config".into(),
            reason: "the document has no `config:` block".into(),
        }]
    })?;
    infer(config, opts.world.as_ref()).map_err(|e| vec![e])?;
    let added = composed.added.iter().map(ToString::to_string).collect();
    Config::from_document(root, added).map_err(|e| vec![e])
}

/// The only config format version (VISSL's current one).
const VERSION: u64 = 1;

fn check_version(doc: &Value) -> Result<(), ConfigError> {
    match doc.get("VERSION") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => Ok(()),
        other => Err(ConfigError::Invalid {
            path: "VERSION".into(),
            reason: format!(
                "config version {} is not supported; this release reads version {VERSION}",
                other.map_or("(missing)".to_string(), super::tree::scalar_text)
            ),
        }),
    }
}

/// The `configs/` folder: `$VISSL_CONFIGS`, else a `configs/` (with `defaults.yaml`) next to the
/// executable or one of its parent folders, else this source tree's `configs/`.
pub fn default_configs_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("VISSL_CONFIGS") {
        return PathBuf::from(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join("configs");
            if candidate.join("defaults.yaml").is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs"))
}
