//! The one error type of config loading; every message names the key, where it came from, and a fix.

use std::fmt;

/// Where a value came from: a config file or the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `configs/defaults.yaml` or a composed config file.
    File(String),
    /// A `config.A.B=v` / `+config...` argument.
    CommandLine(String),
    /// Filled in by inference.
    Inferred,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{path}"),
            Origin::CommandLine(arg) => write!(f, "command line `{arg}`"),
            Origin::Inferred => write!(f, "inferred values"),
        }
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default()
}

/// Everything that can be wrong with a config.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A key that the schema does not know.
    #[error("unknown key `{path}` in {origin}{}", did_you_mean(.suggestion))]
    UnknownKey {
        path: String,
        origin: Origin,
        suggestion: Option<String>,
    },
    /// A value whose type does not match the schema.
    #[error("`{path}` in {origin} must be {expected}, found {found}")]
    WrongType {
        path: String,
        origin: Origin,
        expected: String,
        found: String,
    },
    /// A registry name (loss, trunk, transform, ...) that is not registered.
    #[error("unknown {kind} `{name}` at `{path}`{}; known {kind} names: {}", did_you_mean(.suggestion), .known.join(", "))]
    UnknownName {
        kind: String,
        name: String,
        path: String,
        known: Vec<String>,
        suggestion: Option<String>,
    },
    /// A YAML/JSON file that does not parse.
    #[error("cannot parse {file}: {message}")]
    Parse { file: String, message: String },
    /// A config file or component that was not found.
    #[error("{what} not found; searched: {}", .searched.join(", "))]
    NotFound { what: String, searched: Vec<String> },
    /// A command-line override that is malformed.
    #[error("bad override `{arg}`: {reason}")]
    BadOverride { arg: String, reason: String },
    /// A value that has the right type but is not acceptable (with the reason).
    #[error("invalid `{path}`: {reason}")]
    Invalid { path: String, reason: String },
}

/// The nearest candidate to `name` by edit distance, if it is close enough to be a plausible typo;
/// failing that, the shortest candidate that contains `name` (`mnist` -> `mnist_idx`).
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let lower = name.to_lowercase();
    let candidates: Vec<&str> = candidates.into_iter().collect();
    let by_distance = candidates
        .iter()
        .map(|c| (levenshtein(&lower, &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string());
    by_distance.or_else(|| {
        (lower.chars().count() >= 3)
            .then(|| {
                candidates
                    .iter()
                    .filter(|c| c.to_lowercase().contains(&lower))
                    .min_by_key(|c| c.len())
            })
            .flatten()
            .map(|c| c.to_string())
    })
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_finds_typos_and_rejects_strangers() {
        let keys = ["start_value", "end_value", "name"];
        assert_eq!(nearest("strat_value", keys), Some("start_value".into()));
        assert_eq!(nearest("END_VALUE", keys), Some("end_value".into()));
        assert_eq!(nearest("completely_different", keys), None);
        assert_eq!(
            nearest("mnist", ["disk_folder", "mnist_idx", "synthetic"]),
            Some("mnist_idx".into())
        );
        assert_eq!(nearest("x", ["x_long_name"]), None);
    }
}
