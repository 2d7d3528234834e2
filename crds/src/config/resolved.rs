//! The resolved config: typed views of the groups the trainer reads, plus the whole tree.

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::compose::ADDED_KEYS;
use super::data::DataConfig;
use super::error::ConfigError;
use super::groups::{
    CheckpointConfig, DistributedConfig, EngineName, ExtractFeaturesConfig, HooksConfig,
    MachineConfig, MetersConfig, NearestNeighborConfig, ReproducibilityConfig, StorageConfig,
    SvmConfig, TrainerConfig,
};
use super::loss::LossConfig;
use super::model::ModelConfig;
use super::optimizer::OptimizerConfig;

/// A fully composed, validated and inferred config. `raw` is the authority; the typed fields are
/// views of it for the groups the trainer consumes.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Root `engine_name`.
    pub engine_name: EngineName,
    /// Extra diagnostics.
    pub verbose: bool,
    /// Iterations between progress log lines.
    pub log_frequency: usize,
    /// Evaluate only.
    pub test_only: bool,
    /// Also run the TEST split.
    pub test_model: bool,
    /// Evaluate after every N training epochs.
    pub test_every_num_epoch: usize,
    /// Base random seed.
    pub seed_value: u64,
    /// `forkserver` | `spawn` | `fork` (VISSL compatibility).
    pub multi_processing_method: String,
    /// `REPRODUCIBILITY`
    pub reproducibility: ReproducibilityConfig,
    /// `HOOKS`
    pub hooks: HooksConfig,
    /// `DATA`
    pub data: DataConfig,
    /// `METERS`
    pub meters: MetersConfig,
    /// `MACHINE`
    pub machine: MachineConfig,
    /// `MODEL`
    pub model: ModelConfig,
    /// `LOSS`
    pub loss: LossConfig,
    /// `OPTIMIZER`
    pub optimizer: OptimizerConfig,
    /// `EXTRACT_FEATURES`
    pub extract_features: ExtractFeaturesConfig,
    /// `TRAINER`
    pub trainer: TrainerConfig,
    /// `CHECKPOINT`
    pub checkpoint: CheckpointConfig,
    /// `STORAGE`
    pub storage: StorageConfig,
    /// `DISTRIBUTED`
    pub distributed: DistributedConfig,
    /// `NEAREST_NEIGHBOR`
    pub nearest_neighbor: NearestNeighborConfig,
    /// `SVM`
    pub svm: SvmConfig,
    /// The resolved tree under `config:` (every group, including those not typed above).
    pub raw: Value,
    /// Root keys other than `config` (`VERSION`, `node_id`, `engine_name`, `+`-added ones).
    root: Mapping,
    /// Keys added with `+`, as paths, so that [`Config::to_yaml`] output loads again.
    added_keys: Vec<String>,
}

impl Config {
    /// Builds the typed views from the resolved document (root mapping with `config:`).
    pub(crate) fn from_document(
        mut root: Mapping,
        added_keys: Vec<String>,
    ) -> Result<Config, ConfigError> {
        let raw = root.remove("config").ok_or_else(|| ConfigError::Invalid {
            path: "config".into(),
            reason: "the document has no `config:` block".into(),
        })?;
        let engine_name = typed(
            root.get("engine_name").cloned().unwrap_or(Value::Null),
            "engine_name",
        )?;
        Ok(Config {
            engine_name,
            verbose: group(&raw, "VERBOSE")?,
            log_frequency: group(&raw, "LOG_FREQUENCY")?,
            test_only: group(&raw, "TEST_ONLY")?,
            test_model: group(&raw, "TEST_MODEL")?,
            test_every_num_epoch: group(&raw, "TEST_EVERY_NUM_EPOCH")?,
            seed_value: group(&raw, "SEED_VALUE")?,
            multi_processing_method: group(&raw, "MULTI_PROCESSING_METHOD")?,
            reproducibility: group(&raw, "REPRODUCIBILITY")?,
            hooks: group(&raw, "HOOKS")?,
            data: group(&raw, "DATA")?,
            meters: group(&raw, "METERS")?,
            machine: group(&raw, "MACHINE")?,
            model: group(&raw, "MODEL")?,
            loss: group(&raw, "LOSS")?,
            optimizer: group(&raw, "OPTIMIZER")?,
            extract_features: group(&raw, "EXTRACT_FEATURES")?,
            trainer: group(&raw, "TRAINER")?,
            checkpoint: group(&raw, "CHECKPOINT")?,
            storage: group(&raw, "STORAGE")?,
            distributed: group(&raw, "DISTRIBUTED")?,
            nearest_neighbor: group(&raw, "NEAREST_NEIGHBOR")?,
            svm: group(&raw, "SVM")?,
            raw,
            root,
            added_keys,
        })
    }

    /// The fully resolved config as a VISSL-format file (`# @package _global_`, root keys, `config:`).
    /// Loading it with `config=<that file>` gives this config again; keys added with `+` are listed
    /// under `_added_keys_` so they are accepted on reload.
    pub fn to_yaml(&self) -> String {
        let mut doc = self.root.clone();
        if !self.added_keys.is_empty() {
            let keys = self.added_keys.iter().cloned().map(Value::String).collect();
            doc.insert(ADDED_KEYS.into(), Value::Sequence(keys));
        }
        doc.insert("config".into(), self.raw.clone());
        // Serialising a tree of plain YAML values cannot fail; an empty body would still be reported
        // by the checksum of any manifest that stores it.
        let body = serde_yaml::to_string(&doc).unwrap_or_default();
        format!("# @package _global_\n{body}")
    }

    /// Stable hex digest (FNV-1a, 64 bits) of [`Config::to_yaml`], for checkpoint manifests.
    pub fn hash(&self) -> String {
        format!("{:016x}", fnv1a64(self.to_yaml().as_bytes()))
    }
}

/// A value under `config:` deserialised into its typed view; errors name the key.
fn group<T: DeserializeOwned>(raw: &Value, key: &str) -> Result<T, ConfigError> {
    let value = raw.get(key).cloned().ok_or_else(|| ConfigError::Invalid {
        path: format!("config.{key}"),
        reason: "missing (defaults.yaml defines it)".into(),
    })?;
    typed(value, &format!("config.{key}"))
}

fn typed<T: DeserializeOwned>(value: Value, path: &str) -> Result<T, ConfigError> {
    serde_yaml::from_value(value).map_err(|e| ConfigError::Invalid {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// FNV-1a, 64-bit: small, dependency-free, and stable across platforms and releases.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_test_vectors() {
        // Vectors from the FNV reference page (Fowler/Noll/Vo): "" and "a" and "foobar".
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }
}
