//! Strict reading of the model's YAML blocks: typed getters that name the full key on error,
//! and an unknown-key check that suggests the nearest known key.

use super::{ModelError, Result};
use serde_yaml::{Mapping, Value};

/// One YAML mapping with the dotted path it sits at (`MODEL.TRUNK.RESNETS`), for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Block<'a> {
    path: String,
    map: Option<&'a Mapping>,
}

static EMPTY: Option<&Mapping> = None;

impl<'a> Block<'a> {
    /// Wraps `value`, which must be a mapping or null (an absent block reads as all defaults).
    pub(crate) fn new(path: &str, value: &'a Value) -> Result<Self> {
        match value {
            Value::Mapping(map) => Ok(Block {
                path: path.to_string(),
                map: Some(map),
            }),
            Value::Null => Ok(Block {
                path: path.to_string(),
                map: EMPTY,
            }),
            other => Err(ModelError::invalid(
                path,
                format!("must be a mapping, found {}", kind_of(other)),
            )),
        }
    }

    /// The dotted path of `key` inside this block.
    pub(crate) fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Fails on the first key that is not in `known`, naming it and the nearest known key.
    pub(crate) fn check_keys(&self, known: &[&str]) -> Result<()> {
        for key in self.map.into_iter().flat_map(|m| m.keys()) {
            let name = key_name(key);
            if !known.contains(&name.as_str()) {
                return Err(ModelError::UnknownKey {
                    path: self.key_path(&name),
                    suggestion: vissl_crds::config::error::nearest(&name, known.iter().copied()),
                    known: known.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
        Ok(())
    }

    /// The raw value of `key`, if present and not null.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key)).filter(|v| !v.is_null())
    }

    /// A nested block (absent reads as empty).
    pub(crate) fn block(&self, key: &str) -> Result<Block<'a>> {
        match self.get(key) {
            Some(v) => Block::new(&self.key_path(key), v),
            None => Ok(Block {
                path: self.key_path(key),
                map: EMPTY,
            }),
        }
    }

    /// A boolean, also accepting the strings `True`/`False` that older YAML writers emit.
    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_bool(v).ok_or_else(|| self.wrong_type(key, "a boolean", v)),
        }
    }

    /// An integer.
    pub(crate) fn int(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_int(v).ok_or_else(|| self.wrong_type(key, "an integer", v)),
        }
    }

    /// A number; strings such as `"1e-5"` (how YAML 1.1 reads them) are accepted too.
    pub(crate) fn float(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_float(v).ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    /// A string.
    pub(crate) fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    /// A list of strings.
    pub(crate) fn string_list(&self, key: &str, default: &[&str]) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(default.iter().map(|s| s.to_string()).collect()),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(self.wrong_type(key, "a list of strings", other)),
                })
                .collect(),
            Some(v) => Err(self.wrong_type(key, "a list of strings", v)),
        }
    }

    /// A list (empty when absent).
    pub(crate) fn list(&self, key: &str) -> Result<&'a [Value]> {
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Sequence(items)) => Ok(items.as_slice()),
            Some(v) => Err(self.wrong_type(key, "a list", v)),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> ModelError {
        ModelError::invalid(
            self.key_path(key),
            format!("must be {expected}, found {}", describe(found)),
        )
    }
}

/// The text of a mapping key (non-string keys are printed as YAML).
pub(crate) fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => describe(other),
    }
}

pub(crate) fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "True" || s == "true" => Some(true),
        Value::String(s) if s == "False" || s == "false" => Some(false),
        _ => None,
    }
}

pub(crate) fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

pub(crate) fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A short rendering of a value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("`{s}`"),
        other => serde_yaml::to_string(other)
            .map(|s| format!("`{}`", s.trim_end()))
            .unwrap_or_else(|_| kind_of(other).to_string()),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Reads a list of positive integers (`dims: [2048, 128]`), naming `path` on error.
pub(crate) fn positive_ints(path: &str, v: &Value) -> Result<Vec<i64>> {
    let items = match v {
        Value::Sequence(items) => items,
        other => {
            return Err(ModelError::invalid(
                path,
                format!("must be a list of integers, found {}", describe(other)),
            ))
        }
    };
    items
        .iter()
        .map(|item| match as_int(item) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(ModelError::invalid(
                path,
                format!("must hold positive integers, found {}", describe(item)),
            )),
        })
        .collect()
}
