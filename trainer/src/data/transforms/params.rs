//! Typed access to one transform's YAML parameters. Every getter records the key it was asked
//! for, so [`Params::finish`] can reject keys no getter asked for (typos like `sise:` fail loudly
//! instead of silently falling back to a default).

use std::cell::RefCell;

use serde_yaml::{Mapping, Value};

use crate::data::{DataError, Result};

/// Keys the pipeline itself handles for every transform (VISSL's SSLTransformsWrapper).
const WRAPPER_KEYS: &[&str] = &["name", "indices"];

/// The parameters of one `DATA.<split>.TRANSFORMS` entry.
pub(crate) struct Params<'a> {
    transform: &'a str,
    map: &'a Mapping,
    known: RefCell<Vec<&'static str>>,
}

impl<'a> Params<'a> {
    /// Wrap the mapping of the transform named `transform`.
    pub(crate) fn new(transform: &'a str, map: &'a Mapping) -> Self {
        Self {
            transform,
            map,
            known: RefCell::new(Vec::new()),
        }
    }

    /// The VISSL name of the transform these parameters belong to.
    pub(crate) fn transform(&self) -> &str {
        self.transform
    }

    /// A config error that names the transform.
    pub(crate) fn error(&self, reason: impl std::fmt::Display) -> DataError {
        DataError::Config(format!("transform {}: {reason}", self.transform))
    }

    /// A config error that names the transform and the parameter.
    pub(crate) fn bad(&self, key: &str, reason: impl std::fmt::Display) -> DataError {
        self.error(format_args!("parameter '{key}': {reason}"))
    }

    /// The raw value of `key`, if present (and records `key` as known).
    pub(crate) fn raw(&self, key: &'static str) -> Option<&'a Value> {
        self.known.borrow_mut().push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// An error for a required parameter that is missing.
    pub(crate) fn missing(&self, key: &str) -> DataError {
        self.bad(key, "is required")
    }

    /// A float parameter (YAML ints are accepted).
    pub(crate) fn opt_f64(&self, key: &'static str) -> Result<Option<f64>> {
        self.raw(key).map(|v| self.as_f64(key, v)).transpose()
    }

    /// A float parameter with a default.
    pub(crate) fn f64_or(&self, key: &'static str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// A probability in [0, 1] with a default.
    pub(crate) fn prob_or(&self, key: &'static str, default: f64) -> Result<f64> {
        let p = self.f64_or(key, default)?;
        if (0.0..=1.0).contains(&p) {
            Ok(p)
        } else {
            Err(self.bad(
                key,
                format_args!("must be a probability in [0, 1], got {p}"),
            ))
        }
    }

    /// A non-negative integer parameter.
    pub(crate) fn opt_usize(&self, key: &'static str) -> Result<Option<usize>> {
        self.raw(key).map(|v| self.as_usize(key, v)).transpose()
    }

    /// A non-negative integer parameter with a default.
    pub(crate) fn usize_or(&self, key: &'static str, default: usize) -> Result<usize> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// A boolean parameter with a default.
    pub(crate) fn bool_or(&self, key: &'static str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.bad(
                key,
                format_args!("expected true or false, found {}", show(v)),
            )),
        }
    }

    /// A string parameter.
    pub(crate) fn opt_str(&self, key: &'static str) -> Result<Option<&'a str>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(key, format_args!("expected a string, found {}", show(v)))),
        }
    }

    /// A list of numbers.
    pub(crate) fn opt_f64_list(&self, key: &'static str) -> Result<Option<Vec<f64>>> {
        self.raw(key).map(|v| self.as_f64_list(key, v)).transpose()
    }

    /// A list of non-negative integers.
    pub(crate) fn opt_usize_list(&self, key: &'static str) -> Result<Option<Vec<usize>>> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|v| self.as_usize(key, v))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(
                key,
                format_args!("expected a list of integers, found {}", show(v)),
            )),
        }
    }

    /// A `[low, high]` pair with `low <= high`, e.g. `scale: [0.08, 1.0]`.
    pub(crate) fn range_or(&self, key: &'static str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => self.as_range(key, v),
        }
    }

    /// Interpret `v` as a `[low, high]` pair.
    pub(crate) fn as_range(&self, key: &str, v: &Value) -> Result<(f64, f64)> {
        let list = self.as_f64_list(key, v)?;
        match list[..] {
            [lo, hi] if lo <= hi => Ok((lo, hi)),
            [lo, hi] => Err(self.bad(
                key,
                format_args!("expected [low, high] with low <= high, got [{lo}, {hi}]"),
            )),
            _ => Err(self.bad(
                key,
                format_args!("expected a [low, high] pair, found {}", show(v)),
            )),
        }
    }

    /// Interpret `v` as a number.
    pub(crate) fn as_f64(&self, key: &str, v: &Value) -> Result<f64> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.bad(key, format_args!("expected a number, found {}", show(v))))
    }

    /// Interpret `v` as a non-negative integer.
    pub(crate) fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| {
                self.bad(
                    key,
                    format_args!("expected a non-negative integer, found {}", show(v)),
                )
            })
    }

    fn as_f64_list(&self, key: &str, v: &Value) -> Result<Vec<f64>> {
        match v {
            Value::Sequence(items) => items.iter().map(|x| self.as_f64(key, x)).collect(),
            _ => Err(self.bad(
                key,
                format_args!("expected a list of numbers, found {}", show(v)),
            )),
        }
    }

    /// Fail on any key that no getter asked for, listing the accepted ones.
    pub(crate) fn finish(&self) -> Result<()> {
        let known = self.known.borrow();
        for key in self.map.keys() {
            let name = key.as_str().unwrap_or("");
            if WRAPPER_KEYS.contains(&name) || known.contains(&name) {
                continue;
            }
            let mut accepted: Vec<&str> = known.to_vec();
            accepted.sort_unstable();
            accepted.dedup();
            let list = if accepted.is_empty() {
                "none".to_string()
            } else {
                accepted.join(", ")
            };
            return Err(self.error(format_args!(
                "unknown parameter '{}' (accepted: {list}; plus name, indices)",
                show(key)
            )));
        }
        Ok(())
    }
}

/// A short rendering of a YAML value for error messages.
pub(crate) fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().replace('\n', " "))
            .unwrap_or_default(),
    }
}
