//! Validation of key names and value types against `defaults.yaml`, which is the schema.
//!
//! Rules, in one place:
//! - A key must exist in the defaults at the same place, unless it was added with `+config.KEY=value`
//!   (then anything goes below it). The error names the full path, the file or argument that set it,
//!   and the nearest sibling key.
//! - A value must have the type of its default: an integer is accepted where a float is declared
//!   (and becomes a float), a number where a string is declared (and becomes a string, for values
//!   like `RUN_ID: 8080`), anything where the default is null.
//! - Lists whose default holds scalars of one type are checked element by element; mappings are
//!   checked key by key.
//! - Free-form places accept any content: every default that is an empty mapping `{}` (for example
//!   `DATA.*.COLLATE_FUNCTION_PARAMS`, `MODEL.TRUNK.REGNET`, `SLURM.ADDITIONAL_PARAMETERS`), every
//!   default that is an empty list `[]` (for example `DATA.*.TRANSFORMS`, `MODEL.HEAD.PARAMS`,
//!   `MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP`), and the paths in [`RULES`].
//!   Registry names inside them (transforms, heads) are checked by `names.rs`.
//! - `OPTIMIZER.param_schedulers` holds one scheduler block per optimizer option (`lr`, `lr_head`,
//!   and others such as `weight_decay`); a block and each of its composite `schedulers` may use the
//!   keys of [`ParamSchedulerConfig`], typed like the `lr` block of the defaults where it has them.
//! - `DISTILLATION.TEACHER_MODEL` takes every key of `MODEL`.
//! - Old spellings in [`ALIASES`] are moved to their current place while composing.
//! - String keys with a closed set of values are listed in [`ALLOWED`].

use std::collections::BTreeSet;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_yaml::{Mapping, Value};

use super::error::{nearest, ConfigError};
use super::schedulers::ParamSchedulerConfig;
use super::tree::{self, KeyPath, Origins};

/// Old key spellings still found in VISSL's docs and configs, and where they live now.
pub const ALIASES: &[(&str, &str)] = &[
    // The docs' `MODEL.TRUNK.TRUNK_PARAMS.RESNETS` is today's `MODEL.TRUNK.RESNETS`.
    ("config.MODEL.TRUNK.TRUNK_PARAMS", "config.MODEL.TRUNK"),
    (
        "config.DISTILLATION.TEACHER_MODEL.TRUNK.TRUNK_PARAMS",
        "config.DISTILLATION.TEACHER_MODEL.TRUNK",
    ),
    // The docs' command lines use `config.TENSORBOARD_SETUP.*` and top-level perf-stat keys.
    ("config.TENSORBOARD_SETUP", "config.HOOKS.TENSORBOARD_SETUP"),
    (
        "config.MONITOR_PERF_STATS",
        "config.HOOKS.PERF_STATS.MONITOR_PERF_STATS",
    ),
    (
        "config.PERF_STAT_FREQUENCY",
        "config.HOOKS.PERF_STATS.PERF_STAT_FREQUENCY",
    ),
    (
        "config.ROLLING_BTIME_FREQ",
        "config.HOOKS.PERF_STATS.ROLLING_BTIME_FREQ",
    ),
];

/// How a path is checked when its default alone does not say enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Any content.
    FreeForm,
    /// Any scalar: a number, a string or a boolean.
    AnyScalar,
    /// An integer or a list of integers.
    IntOrIntList,
    /// A mapping of scheduler blocks.
    Schedulers,
}

/// Path patterns (`*` matches one key) with their special rule. Patterns under `config.MODEL` also
/// apply to `config.DISTILLATION.TEACHER_MODEL`.
const RULES: &[(&str, Rule)] = &[
    // Options of the AMP implementation, e.g. {opt_level: O3, keep_batchnorm_fp32: true, ...}.
    ("config.MODEL.AMP_PARAMS.AMP_ARGS", Rule::FreeForm),
    // A number or "inf".
    ("config.MODEL.GRAD_CLIP.NORM_TYPE", Rule::AnyScalar),
    // `False` or a float scale.
    ("config.MODEL.TRUNK.*.QK_SCALE", Rule::AnyScalar),
    ("config.MODEL.TRUNK.BEIT.INIT_VALUES", Rule::AnyScalar),
    // One k or several.
    ("config.NEAREST_NEIGHBOR.TOPK", Rule::IntOrIntList),
    ("config.OPTIMIZER.param_schedulers", Rule::Schedulers),
];

/// String keys with a closed set of values (patterns as in [`RULES`]).
const ALLOWED: &[(&str, &[&str])] = &[
    ("engine_name", &["train", "extract_features"]),
    ("config.MACHINE.DEVICE", &["gpu", "cpu"]),
    ("config.DISTRIBUTED.BACKEND", &["nccl", "gloo"]),
    ("config.DISTRIBUTED.INIT_METHOD", &["tcp", "env", "file"]),
    (
        "config.DATA.*.LABEL_TYPE",
        &["standard", "sample_index", "zero"],
    ),
    ("config.DATA.*.BASE_DATASET", &["generic_ssl"]),
    ("config.MODEL.INPUT_TYPE", &["rgb", "bgr", "lab"]),
    (
        "config.MODEL.TRUNK.RESNETS.NORM",
        &["BatchNorm", "LayerNorm", "GroupNorm"],
    ),
    (
        "config.MODEL.SYNC_BN_CONFIG.SYNC_BN_TYPE",
        &["apex", "pytorch"],
    ),
    ("config.MODEL.AMP_PARAMS.AMP_TYPE", &["apex", "pytorch"]),
];

/// Checks keys and types of the composed document, converting ints to floats and numbers to strings
/// where the defaults say so. Returns every problem found, in document order.
pub fn validate(
    doc: &mut Value,
    schema: &Value,
    origins: &Origins,
    added: &BTreeSet<KeyPath>,
) -> Vec<ConfigError> {
    let scheduler_template = tree::get(
        schema,
        KeyPath::parse("config.OPTIMIZER.param_schedulers.lr")
            .unwrap_or_default()
            .segs(),
    )
    .cloned()
    .unwrap_or(Value::Mapping(Mapping::new()));
    let mut validator = Validator {
        origins,
        added,
        errors: Vec::new(),
        scheduler_template,
        scheduler_keys: struct_fields::<ParamSchedulerConfig>(),
    };
    validator.walk(schema, doc, &KeyPath::default());
    validator.errors
}

/// The defaults with `DISTILLATION.TEACHER_MODEL` completed from `MODEL`, as VISSL completes it.
pub fn schema_tree(defaults: &Value) -> Value {
    let mut schema = defaults.clone();
    let model = KeyPath::parse("config.MODEL").unwrap_or_default();
    let teacher = KeyPath::parse("config.DISTILLATION.TEACHER_MODEL").unwrap_or_default();
    complete_from(&mut schema, &model, &teacher);
    schema
}

/// Replaces the mapping at `target` by the mapping at `base` merged with it (VISSL's teacher completion).
pub fn complete_from(doc: &mut Value, base: &KeyPath, target: &KeyPath) {
    let Some(base) = tree::get(doc, base.segs()).cloned() else {
        return;
    };
    if let Some(target) = tree::get_mut(doc, target.segs()) {
        if base.is_mapping() && target.is_mapping() {
            let mut full = base;
            tree::deep_merge(&mut full, std::mem::take(target));
            *target = full;
        }
    }
}

struct Validator<'a> {
    origins: &'a Origins,
    added: &'a BTreeSet<KeyPath>,
    errors: Vec<ConfigError>,
    scheduler_template: Value,
    scheduler_keys: &'static [&'static str],
}

impl Validator<'_> {
    fn walk(&mut self, schema: &Value, value: &mut Value, path: &KeyPath) {
        if self.added.contains(path) {
            return;
        }
        match rule_for(path) {
            Some(Rule::FreeForm) => return,
            Some(Rule::AnyScalar) => {
                if !is_scalar(value) {
                    self.wrong_type(path, "a number, a string or a boolean", value);
                }
                return;
            }
            Some(Rule::IntOrIntList) => {
                let ok = match &*value {
                    Value::Sequence(items) => items.iter().all(is_int),
                    other => is_int(other),
                };
                if !ok {
                    self.wrong_type(path, "an integer or a list of integers", value);
                }
                return;
            }
            Some(Rule::Schedulers) => {
                self.scheduler_map(value, path);
                return;
            }
            None => {}
        }
        match schema {
            Value::Null | Value::Tagged(_) => {}
            Value::Bool(_) => {
                if !value.is_bool() {
                    self.wrong_type(path, "a boolean", value);
                }
            }
            Value::Number(n) if n.is_f64() => match value {
                Value::Number(v) if v.is_f64() => {}
                Value::Number(v) => {
                    let as_float = v.as_f64().unwrap_or_default();
                    *value = Value::from(as_float);
                }
                _ => self.wrong_type(path, "a number", value),
            },
            Value::Number(_) => {
                if !is_int(value) {
                    self.wrong_type(path, "an integer", value);
                }
            }
            Value::String(_) => match value {
                Value::String(_) => self.check_allowed(path, value),
                Value::Number(n) => {
                    *value = Value::String(n.to_string());
                    self.check_allowed(path, value);
                }
                _ => self.wrong_type(path, "a string", value),
            },
            Value::Sequence(defaults) => match value {
                Value::Sequence(items) => {
                    if let Some(element) = homogeneous_scalar(defaults) {
                        for (i, item) in items.iter_mut().enumerate() {
                            self.walk(element, item, &path.index(i));
                        }
                    }
                }
                _ => self.wrong_type(path, "a list", value),
            },
            Value::Mapping(defaults) => match value {
                Value::Mapping(entries) => {
                    if defaults.is_empty() {
                        return;
                    }
                    for (key, child) in entries.iter_mut() {
                        let name = tree::key_text(key);
                        let child_path = path.key(&name);
                        match defaults.get(key) {
                            Some(child_schema) => self.walk(child_schema, child, &child_path),
                            None if self.added.contains(&child_path) => {}
                            None => {
                                let siblings: Vec<String> =
                                    defaults.keys().map(tree::key_text).collect();
                                self.unknown_key(
                                    &child_path,
                                    &name,
                                    siblings.iter().map(String::as_str),
                                );
                            }
                        }
                    }
                }
                _ => self.wrong_type(path, "a mapping", value),
            },
        }
    }

    /// `OPTIMIZER.param_schedulers`: option name -> scheduler block.
    fn scheduler_map(&mut self, value: &mut Value, path: &KeyPath) {
        let Value::Mapping(entries) = value else {
            self.wrong_type(path, "a mapping of option name to scheduler", value);
            return;
        };
        for (key, block) in entries.iter_mut() {
            let block_path = path.key(&tree::key_text(key));
            if !self.added.contains(&block_path) {
                self.scheduler_block(block, &block_path);
            }
        }
    }

    fn scheduler_block(&mut self, value: &mut Value, path: &KeyPath) {
        let Value::Mapping(entries) = value else {
            self.wrong_type(path, "a mapping (a scheduler block)", value);
            return;
        };
        let template = self.scheduler_template.clone();
        for (key, child) in entries.iter_mut() {
            let name = tree::key_text(key);
            let child_path = path.key(&name);
            if self.added.contains(&child_path) {
                continue;
            }
            if !self.scheduler_keys.contains(&name.as_str()) {
                let keys = self.scheduler_keys;
                self.unknown_key(&child_path, &name, keys.iter().copied());
            } else if name == "schedulers" {
                match child {
                    Value::Sequence(subs) => {
                        for (i, sub) in subs.iter_mut().enumerate() {
                            self.scheduler_block(sub, &child_path.index(i));
                        }
                    }
                    other => self.wrong_type(&child_path, "a list of scheduler blocks", other),
                }
            } else if let Some(child_schema) = template.get(key.clone()) {
                self.walk(child_schema, child, &child_path);
            }
            // Keys the defaults' lr block lacks (gamma, wave_type, ...) are typed by ParamSchedulerConfig.
        }
    }

    fn check_allowed(&mut self, path: &KeyPath, value: &Value) {
        let Some(text) = value.as_str() else { return };
        let Some((_, allowed)) = ALLOWED.iter().find(|(pattern, _)| matches(pattern, path)) else {
            return;
        };
        if allowed.contains(&text) {
            return;
        }
        let hint = nearest(text, allowed.iter().copied())
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        self.errors.push(ConfigError::Invalid {
            path: path.to_string(),
            reason: format!(
                "`{text}` is not one of {}{hint}; set in {}",
                allowed.join(", "),
                self.origins.of(path)
            ),
        });
    }

    fn wrong_type(&mut self, path: &KeyPath, expected: &str, found: &Value) {
        let found = match found {
            Value::Sequence(_) | Value::Mapping(_) | Value::Null => {
                tree::kind_name(found).to_string()
            }
            scalar => format!(
                "{} `{}`",
                tree::kind_name(scalar),
                tree::scalar_text(scalar)
            ),
        };
        self.errors.push(ConfigError::WrongType {
            path: path.to_string(),
            origin: self.origins.of(path),
            expected: expected.to_string(),
            found,
        });
    }

    fn unknown_key<'k>(
        &mut self,
        path: &KeyPath,
        name: &str,
        siblings: impl IntoIterator<Item = &'k str>,
    ) {
        self.errors.push(ConfigError::UnknownKey {
            path: path.to_string(),
            origin: self.origins.of(path),
            suggestion: nearest(name, siblings),
        });
    }
}

fn rule_for(path: &KeyPath) -> Option<Rule> {
    RULES
        .iter()
        .find(|(pattern, _)| matches(pattern, path))
        .map(|(_, rule)| *rule)
}

/// Whether `path` matches a dotted pattern in which `*` stands for any one key; the teacher model
/// matches the patterns of `config.MODEL`.
fn matches(pattern: &str, path: &KeyPath) -> bool {
    let teacher = ["config", "DISTILLATION", "TEACHER_MODEL"];
    let segs = path.segs();
    let is_teacher = segs.len() >= 3
        && segs[..3]
            .iter()
            .zip(teacher)
            .all(|(seg, t)| matches!(seg, tree::Seg::Key(k) if k == t));
    if is_teacher {
        let mut as_model = KeyPath::default().key("config").key("MODEL");
        for seg in &segs[3..] {
            as_model = match seg {
                tree::Seg::Key(k) => as_model.key(k),
                tree::Seg::Index(i) => as_model.index(*i),
            };
        }
        return matches_exactly(pattern, &as_model);
    }
    matches_exactly(pattern, path)
}

fn matches_exactly(pattern: &str, path: &KeyPath) -> bool {
    let segs = path.segs();
    let parts: Vec<&str> = pattern.split('.').collect();
    parts.len() == segs.len()
        && parts.iter().zip(segs).all(|(part, seg)| match seg {
            tree::Seg::Key(k) => *part == "*" || part == k,
            tree::Seg::Index(_) => false,
        })
}

fn is_int(value: &Value) -> bool {
    matches!(value, Value::Number(n) if !n.is_f64())
}

fn is_scalar(value: &Value) -> bool {
    matches!(value, Value::Bool(_) | Value::Number(_) | Value::String(_))
}

/// The element schema of a default list whose elements are scalars of one kind.
fn homogeneous_scalar(defaults: &[Value]) -> Option<&Value> {
    let first = defaults.first()?;
    let same = |v: &Value| tree::kind_name(v) == tree::kind_name(first) && is_scalar(v);
    defaults.iter().all(same).then_some(first)
}

/// The field names of a serde struct, read off its `Deserialize` impl: one list of scheduler keys,
/// owned by `schedulers.rs`, instead of a copy here.
fn struct_fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut probe = FieldProbe(&[]);
    // The probe always fails after recording the field list; that failure is the expected outcome.
    let _ = T::deserialize(&mut probe);
    probe.0
}

struct FieldProbe(&'static [&'static str]);

impl<'de> Deserializer<'de> for &mut FieldProbe {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        Err(de::Error::custom("field probe"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_one_key_per_star() {
        let p = KeyPath::parse("config.DATA.TRAIN.LABEL_TYPE").unwrap();
        assert!(matches("config.DATA.*.LABEL_TYPE", &p));
        assert!(!matches("config.DATA.*", &p));
        assert!(!matches("config.*.LABEL_TYPE", &p));
        let teacher =
            KeyPath::parse("config.DISTILLATION.TEACHER_MODEL.AMP_PARAMS.AMP_ARGS").unwrap();
        assert!(matches("config.MODEL.AMP_PARAMS.AMP_ARGS", &teacher));
    }

    #[test]
    fn scheduler_keys_come_from_the_scheduler_struct() {
        let keys = struct_fields::<ParamSchedulerConfig>();
        for key in [
            "name",
            "start_value",
            "end_value",
            "values",
            "milestones",
            "schedulers",
            "lengths",
            "auto_lr_scaling",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }
}
