//! Composition, in VISSL's (Hydra's) order: `defaults.yaml`, then the `config=` file, then each
//! `+config/<group>=<file>` component, then the dotted overrides in the order given.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use super::error::{nearest, ConfigError, Origin};
use super::overrides::{self, Override, SetMode};
use super::schema::{schema_tree, ALIASES};
use super::tree::{self, KeyPath, Origins, Seg};

/// Root key of a resolved config file listing the keys that were added with `+`, so that the file
/// loads again (see [`super::Config::to_yaml`]).
pub const ADDED_KEYS: &str = "_added_keys_";

/// The defaults compiled into the binary, used when the configs root has no `defaults.yaml`.
const BUILT_IN_DEFAULTS: &str = include_str!("../../../configs/defaults.yaml");

/// The merged document before validation.
#[derive(Debug, Clone)]
pub struct Composed {
    /// The whole document: `VERSION`, `engine_name`, ..., and `config`.
    pub tree: Value,
    /// The defaults with the teacher model completed from MODEL: the schema the tree is checked against.
    pub schema: Value,
    /// Which file or argument set each part.
    pub origins: Origins,
    /// Keys added with `+` / `++` (each the top of a new subtree); exempt from the schema.
    pub added: BTreeSet<KeyPath>,
}

/// Composes `defaults.yaml` (from `configs_root`, else the built-in copy) with the arguments.
pub fn compose(configs_root: &Path, args: &[String]) -> Result<Composed, ConfigError> {
    let parsed = args
        .iter()
        .map(|a| overrides::parse(a))
        .collect::<Result<Vec<_>, _>>()?;

    let (defaults, defaults_origin) = load_defaults(configs_root)?;
    let mut composed = Composed {
        schema: schema_tree(&defaults),
        tree: defaults,
        origins: Origins::default(),
        added: BTreeSet::new(),
    };
    record_top_level(&mut composed.origins, &composed.tree, &defaults_origin);

    let mut primaries = parsed.iter().filter_map(|o| match o {
        Override::Primary { arg, name } => Some((arg, name)),
        _ => None,
    });
    if let Some((_, name)) = primaries.next() {
        if let Some((arg, _)) = primaries.next() {
            return Err(ConfigError::BadOverride {
                arg: arg.clone(),
                reason: "only one `config=` file can be given; add components with `+config/<group>=<file>`".into(),
            });
        }
        let path = resolve_primary(configs_root, name)?;
        composed.merge_file(&path)?;
    }
    for o in &parsed {
        if let Override::Component { group, name, .. } = o {
            let path = resolve_component(configs_root, group, name)?;
            composed.merge_file(&path)?;
        }
    }
    for o in &parsed {
        if let Override::Set {
            arg,
            path,
            value,
            mode,
        } = o
        {
            composed.apply_set(arg, path, value.clone(), *mode)?;
        }
    }
    Ok(composed)
}

impl Composed {
    fn merge_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let origin = Origin::File(path.display().to_string());
        let (mut doc, added) = read_config_file(path)?;
        apply_aliases(&mut doc, &origin)?;
        self.added.extend(added);
        record_top_level(&mut self.origins, &doc, &origin);
        tree::deep_merge(&mut self.tree, doc);
        Ok(())
    }

    fn apply_set(
        &mut self,
        arg: &str,
        path: &KeyPath,
        value: Value,
        mode: SetMode,
    ) -> Result<(), ConfigError> {
        let path = tree::normalize(&self.tree, &alias_path(path));
        let exists = tree::get(&self.tree, path.segs()).is_some();
        // Keys the tree lacks but the schema declares (the teacher model's MODEL keys) can be set.
        let declared = exists || tree::get(&self.schema, path.segs()).is_some();
        let bad = |reason: String| ConfigError::BadOverride {
            arg: arg.to_string(),
            reason,
        };
        match (mode, exists) {
            (SetMode::Assign | SetMode::Force, false) if declared => {
                tree::merge_at(&mut self.tree, path.segs(), value.clone())
                    .map_err(|_| bad(format!("`{path}` cannot be set here")))?;
            }
            (SetMode::Assign | SetMode::Force, true) => {
                let node = tree::get_mut(&mut self.tree, path.segs())
                    .ok_or_else(|| bad(format!("`{path}` cannot be set")))?;
                if node.is_mapping() && value.is_mapping() {
                    tree::deep_merge(node, value.clone());
                } else {
                    *node = value.clone();
                }
            }
            (SetMode::Assign, false) => return Err(self.missing_key_error(arg, &path)),
            (SetMode::Add, true) => {
                return Err(bad(format!(
                    "`{path}` already exists, so it cannot be added; override it with `{path}=...`"
                )))
            }
            (SetMode::Add | SetMode::Force, false) => {
                let top = self.first_missing(&path);
                tree::merge_at(&mut self.tree, path.segs(), value.clone()).map_err(|_| {
                    bad(format!(
                        "cannot add `{path}`: `{}` is not a mapping",
                        top.parent()
                    ))
                })?;
                self.added.insert(top);
            }
        }
        self.origins
            .record(&path, &value, &Origin::CommandLine(arg.to_string()));
        Ok(())
    }

    /// The shortest prefix of `path` that does not exist in the tree.
    fn first_missing(&self, path: &KeyPath) -> KeyPath {
        let mut prefix = KeyPath::default();
        for seg in path.segs() {
            prefix = match seg {
                Seg::Key(k) => prefix.key(k),
                Seg::Index(i) => prefix.index(*i),
            };
            if tree::get(&self.tree, prefix.segs()).is_none() {
                break;
            }
        }
        prefix
    }

    /// A typo gets "did you mean"; a genuinely new key gets Hydra's advice to add it with `+`.
    fn missing_key_error(&self, arg: &str, path: &KeyPath) -> ConfigError {
        let missing = self.first_missing(path);
        let siblings: Vec<String> = match tree::get(&self.tree, missing.parent().segs()) {
            Some(Value::Mapping(m)) => m.keys().map(tree::key_text).collect(),
            _ => Vec::new(),
        };
        let leaf = missing.last_key().unwrap_or_default();
        match nearest(leaf, siblings.iter().map(String::as_str)) {
            Some(suggestion) => ConfigError::UnknownKey {
                path: missing.to_string(),
                origin: Origin::CommandLine(arg.to_string()),
                suggestion: Some(suggestion),
            },
            None => ConfigError::BadOverride {
                arg: arg.to_string(),
                reason: format!("`{missing}` does not exist; to add a new key write `+{arg}`"),
            },
        }
    }
}

fn record_top_level(origins: &mut Origins, doc: &Value, origin: &Origin) {
    if let Value::Mapping(map) = doc {
        for (key, value) in map {
            origins.record(&KeyPath::default().key(&tree::key_text(key)), value, origin);
        }
    }
}

fn load_defaults(configs_root: &Path) -> Result<(Value, Origin), ConfigError> {
    let path = configs_root.join("defaults.yaml");
    if path.is_file() {
        let (doc, _) = read_config_file(&path)?;
        return Ok((doc, Origin::File(path.display().to_string())));
    }
    let name = "built-in defaults.yaml";
    let doc = serde_yaml::from_str(BUILT_IN_DEFAULTS).map_err(|e| ConfigError::Parse {
        file: name.into(),
        message: e.to_string(),
    })?;
    Ok((doc, Origin::File(name.into())))
}

/// `config=<name>`: a path under the configs root (or its `config/` folder, VISSL's layout), `.yaml`
/// optional, or else a file system path.
fn resolve_primary(configs_root: &Path, name: &str) -> Result<PathBuf, ConfigError> {
    let mut searched = Vec::new();
    let as_path = Path::new(name);
    if !as_path.is_absolute() {
        if let Some(found) = search(
            &[configs_root.to_path_buf(), configs_root.join("config")],
            name,
            &mut searched,
        ) {
            return Ok(found);
        }
    }
    if let Some(found) = search(&[PathBuf::new()], name, &mut searched) {
        return Ok(found);
    }
    Err(ConfigError::NotFound {
        what: format!("config file `{name}`"),
        searched,
    })
}

/// `+config/<group>=<name>`: `<configs root>/<group>/<name>.yaml`.
fn resolve_component(configs_root: &Path, group: &str, name: &str) -> Result<PathBuf, ConfigError> {
    let mut searched = Vec::new();
    let rel = format!("{group}/{name}");
    search(
        &[configs_root.to_path_buf(), configs_root.join("config")],
        &rel,
        &mut searched,
    )
    .ok_or_else(|| ConfigError::NotFound {
        what: format!("config component `{rel}`"),
        searched,
    })
}

fn search(bases: &[PathBuf], rel: &str, searched: &mut Vec<String>) -> Option<PathBuf> {
    let has_ext = rel.ends_with(".yaml") || rel.ends_with(".yml");
    for base in bases {
        let mut candidates = Vec::new();
        if !has_ext {
            candidates.push(base.join(format!("{rel}.yaml")));
        }
        candidates.push(base.join(rel));
        for candidate in candidates {
            if candidate.is_file() {
                return Some(candidate);
            }
            searched.push(candidate.display().to_string());
        }
    }
    None
}

/// Reads a config file in VISSL's format and places its content at the document root.
///
/// With `# @package _global_` (VISSL's files) or a top-level `config:` key the file is rooted at the
/// document; `# @package a.b` places it at `a.b`; a file with neither holds `config:` content (what
/// Hydra does for the `config` group). `hydra:` settings are dropped. Returns the keys listed under
/// [`ADDED_KEYS`].
fn read_config_file(path: &Path) -> Result<(Value, Vec<KeyPath>), ConfigError> {
    let file = path.display().to_string();
    let parse_err = |message: String| ConfigError::Parse {
        file: file.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| parse_err(e.to_string()))?;
    let doc: Value = serde_yaml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
    let mut map = match doc {
        Value::Null => Mapping::new(),
        Value::Mapping(m) => m,
        other => {
            return Err(parse_err(format!(
                "expected keys at the top level, found {}",
                tree::kind_name(&other)
            )))
        }
    };
    map.remove("hydra");
    if map.contains_key("defaults") {
        return Err(ConfigError::Invalid {
            path: format!("{file}: defaults"),
            reason: "Hydra `defaults:` lists inside config files are not supported (VISSL's configs do not use \
                     them); compose with `+config/<group>=<file>` on the command line instead"
                .into(),
        });
    }
    let added = match map.remove(ADDED_KEYS) {
        None => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => {
                    KeyPath::parse(s).map_err(|e| parse_err(format!("{ADDED_KEYS}: {e}")))
                }
                other => Err(parse_err(format!(
                    "{ADDED_KEYS} must list key paths, found {}",
                    tree::kind_name(other)
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(parse_err(format!(
                "{ADDED_KEYS} must be a list, found {}",
                tree::kind_name(&other)
            )))
        }
    };
    let package = package_header(&text);
    let at = match package.as_deref() {
        Some("_global_") => KeyPath::default(),
        Some(pkg) => {
            KeyPath::parse(pkg).map_err(|e| parse_err(format!("bad `# @package` header: {e}")))?
        }
        None if map.contains_key("config") => KeyPath::default(),
        None => KeyPath::default().key("config"),
    };
    let mut placed = Value::Mapping(Mapping::new());
    tree::merge_at(&mut placed, at.segs(), Value::Mapping(map))
        .map_err(|_| parse_err(format!("cannot place the file at `{at}`")))?;
    Ok((placed, added))
}

/// The package of a `# @package <name>` comment at the top of the file, Hydra's directive.
fn package_header(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .take_while(|line| line.is_empty() || line.starts_with('#'))
        .find_map(|line| {
            line.trim_start_matches('#')
                .trim()
                .strip_prefix("@package")
                .map(|p| p.trim().to_string())
        })
}

/// Moves old spellings of keys to their current place (see [`ALIASES`]).
fn apply_aliases(doc: &mut Value, origin: &Origin) -> Result<(), ConfigError> {
    for (old, new) in ALIASES {
        let old = KeyPath::parse(old).map_err(|e| alias_table_error(old, e))?;
        let new = KeyPath::parse(new).map_err(|e| alias_table_error(new, e))?;
        if let Some(value) = tree::take(doc, old.segs()) {
            tree::merge_at(doc, new.segs(), value).map_err(|_| ConfigError::Invalid {
                path: new.to_string(),
                reason: format!("{origin} sets `{old}`, an alias of `{new}`, but `{new}` is not a mapping there"),
            })?;
        }
    }
    Ok(())
}

fn alias_table_error(path: &str, e: String) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_string(),
        reason: format!("bad alias table entry: {e}"),
    }
}

/// A command-line path with an old spelling rewritten to the current one.
fn alias_path(path: &KeyPath) -> KeyPath {
    for (old, new) in ALIASES {
        let (Ok(old), Ok(new)) = (KeyPath::parse(old), KeyPath::parse(new)) else {
            continue;
        };
        if path.starts_with(&old) {
            let mut rewritten = new;
            for seg in &path.segs()[old.segs().len()..] {
                rewritten = match seg {
                    Seg::Key(k) => rewritten.key(k),
                    Seg::Index(i) => rewritten.index(*i),
                };
            }
            return rewritten;
        }
    }
    path.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_header_is_read_from_leading_comments() {
        assert_eq!(
            package_header("# @package _global_\nconfig: {}"),
            Some("_global_".into())
        );
        assert_eq!(
            package_header("\n#   @package config.DATA\nA: 1"),
            Some("config.DATA".into())
        );
        assert_eq!(package_header("config: {}\n# @package _global_"), None);
    }

    #[test]
    fn old_spellings_move_to_their_current_place() {
        let mut doc: Value = serde_yaml::from_str(
            "config: {MODEL: {TRUNK: {NAME: resnet, TRUNK_PARAMS: {RESNETS: {DEPTH: 101}}}}, TENSORBOARD_SETUP: {USE_TENSORBOARD: true}}",
        )
        .unwrap();
        apply_aliases(&mut doc, &Origin::File("x.yaml".into())).unwrap();
        let expected: Value = serde_yaml::from_str(
            "config: {MODEL: {TRUNK: {NAME: resnet, RESNETS: {DEPTH: 101}}}, HOOKS: {TENSORBOARD_SETUP: {USE_TENSORBOARD: true}}}",
        )
        .unwrap();
        assert_eq!(doc, expected);
        let p =
            alias_path(&KeyPath::parse("config.MODEL.TRUNK.TRUNK_PARAMS.RESNETS.DEPTH").unwrap());
        assert_eq!(p.to_string(), "config.MODEL.TRUNK.RESNETS.DEPTH");
    }
}
