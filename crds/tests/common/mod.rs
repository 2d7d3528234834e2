//! Helpers shared by the config integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use vissl_crds::config::{check, load, Config, ConfigError, LoadOptions, World};

/// The repository's `configs/`.
pub fn configs_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// VISSL's own config files, laid out as in VISSL's repository (`config/...`), without a defaults.yaml.
pub fn upstream_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vissl_upstream")
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub fn opts(root: PathBuf, world: Option<World>) -> LoadOptions {
    LoadOptions {
        configs_root: root,
        world,
    }
}

/// Loads with the repository's configs; panics with every problem listed.
pub fn load_ok(list: &[&str]) -> Config {
    match check(&opts(configs_root(), None), &args(list)) {
        Ok(config) => config,
        Err(errors) => panic!(
            "{list:?} failed:\n{}",
            errors
                .iter()
                .map(|e| format!("  {e}\n"))
                .collect::<String>()
        ),
    }
}

/// Loads with the repository's configs and returns the (first) error.
pub fn load_err(list: &[&str]) -> ConfigError {
    match load(&opts(configs_root(), None), &args(list)) {
        Ok(_) => panic!("{list:?} loaded but should fail"),
        Err(e) => e,
    }
}

/// A config file in a fresh temporary folder.
pub fn temp_config(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("my_config.yaml");
    std::fs::write(&path, body).expect("write temp config");
    (dir, path)
}

/// A value under `config:` by dotted path.
pub fn raw<'a>(config: &'a Config, dotted: &str) -> &'a serde_yaml::Value {
    let mut node = &config.raw;
    for key in dotted.split('.') {
        node = match key.parse::<usize>() {
            Ok(i) if node.is_sequence() => &node[i],
            _ => &node[key],
        };
    }
    node
}
