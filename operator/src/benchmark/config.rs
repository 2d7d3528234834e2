//! The VISSL config of a Benchmark: the shared resolution ([`crate::workload::config`]) with the
//! model's checkpoint as MODEL.WEIGHTS_INIT.PARAMS_FILE.

use std::path::Path;

use vissl_crds::api::BenchmarkSpec;

use crate::workload::config::{self, string_override, ResolvedConfig};

/// The loader arguments: the user's config, then the checkpoint location once it is known (before
/// that the config is still validated, with the config's own PARAMS_FILE).
pub fn loader_args(spec: &BenchmarkSpec, model: Option<&str>) -> Vec<String> {
    config::loader_args(&spec.config, &operator_args(model))
}

fn operator_args(model: Option<&str>) -> Vec<String> {
    model
        .map(|location| string_override("MODEL.WEIGHTS_INIT.PARAMS_FILE", location))
        .into_iter()
        .collect()
}

/// Loads and validates the spec's config for its world; the error is the loader's message.
pub fn resolve(
    spec: &BenchmarkSpec,
    model: Option<&str>,
    configs_root: &Path,
) -> Result<ResolvedConfig, String> {
    config::resolve(
        &spec.config,
        &spec.nodes,
        &operator_args(model),
        configs_root,
    )
}
