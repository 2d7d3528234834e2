//! `MODEL.MULTI_INPUT_HEAD_MAPPING`: several kinds of input (PIRL's images and patches) share the
//! trunk, each read at its own features and sent to its own head.

use super::yaml::{describe, Block};
use super::{ModelError, Result};
use serde_yaml::Value;

/// One entry: which input, which trunk features, which head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputHeadMapping {
    /// The input key (`images`, `patches`).
    pub input_key: String,
    /// Trunk features the head consumes.
    pub feat_names: Vec<String>,
    /// Index into `HEAD.PARAMS`; defaults to the entry's position (capped at the last head).
    pub head_index: usize,
}

impl InputHeadMapping {
    /// Parses `MULTI_INPUT_HEAD_MAPPING`: entries `[key, [features]]` or
    /// `[key, {feat_names: [...], head_index: i}]`; `num_heads` is the length of `HEAD.PARAMS`.
    pub fn list_from_yaml(value: &Value, num_heads: usize) -> Result<Vec<InputHeadMapping>> {
        let path = "MODEL.MULTI_INPUT_HEAD_MAPPING";
        let entries = match value {
            Value::Null => return Ok(Vec::new()),
            Value::Sequence(entries) => entries,
            other => {
                return Err(ModelError::invalid(
                    path,
                    format!("must be a list, found {}", describe(other)),
                ))
            }
        };
        let mut mappings: Vec<InputHeadMapping> = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let (key, spec) = match entry {
                Value::Sequence(pair) if pair.len() == 2 => match &pair[0] {
                    Value::String(key) => (key.clone(), &pair[1]),
                    other => {
                        return Err(ModelError::invalid(
                            at,
                            format!("input key must be a string, found {}", describe(other)),
                        ))
                    }
                },
                other => {
                    return Err(ModelError::invalid(
                        at,
                        format!("must be [input_key, features], found {}", describe(other)),
                    ))
                }
            };
            if mappings.iter().any(|m| m.input_key == key) {
                return Err(ModelError::invalid(
                    at,
                    format!("duplicate input key `{key}`"),
                ));
            }
            let default_head = i.min(num_heads.saturating_sub(1));
            let (feat_names, head_index) = match spec {
                Value::Mapping(_) => {
                    let block = Block::new(&at, spec)?;
                    block.check_keys(&["feat_names", "head_index", "additional_keys"])?;
                    if !block.string_list("additional_keys", &[])?.is_empty() {
                        return Err(ModelError::invalid(
                            block.key_path("additional_keys"),
                            "extra trunk inputs are not supported by the trunks of this build",
                        ));
                    }
                    let head = block.int("head_index", default_head as i64)?;
                    let head = usize::try_from(head).map_err(|_| {
                        ModelError::invalid(block.key_path("head_index"), "must not be negative")
                    })?;
                    (block.string_list("feat_names", &[])?, head)
                }
                Value::Sequence(_) => (string_list(&at, spec)?, default_head),
                other => {
                    return Err(ModelError::invalid(
                        at,
                        format!("features must be a list, found {}", describe(other)),
                    ))
                }
            };
            if head_index >= num_heads {
                return Err(ModelError::invalid(
                    at,
                    format!("head index {head_index} but HEAD.PARAMS has {num_heads} heads"),
                ));
            }
            mappings.push(InputHeadMapping {
                input_key: key,
                feat_names,
                head_index,
            });
        }
        Ok(mappings)
    }
}

fn string_list(path: &str, value: &Value) -> Result<Vec<String>> {
    match value {
        Value::Sequence(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(ModelError::invalid(
                    path,
                    format!("feature names must be strings, found {}", describe(other)),
                )),
            })
            .collect(),
        other => Err(ModelError::invalid(
            path,
            format!("must be a list of feature names, found {}", describe(other)),
        )),
    }
}
