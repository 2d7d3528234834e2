//! The VISSL config of an SSLTraining: the shared resolution ([`crate::workload::config`]) plus what
//! a training needs the operator to control.

use std::path::Path;

use vissl_crds::api::SSLTrainingSpec;

pub use crate::workload::config::ResolvedConfig;
use crate::workload::config::{self, string_override};

/// What the operator sets over the user's config: metrics on (progress comes from rank 0's
/// `/status`) and the checkpoint folder the spec names.
fn operator_args(spec: &SSLTrainingSpec) -> Vec<String> {
    let mut args = vec!["config.HOOKS.PROMETHEUS_SETUP.USE_PROMETHEUS=true".to_string()];
    if let Some(url) = spec.checkpoint.as_ref().and_then(|c| c.url.as_ref()) {
        args.push(string_override("CHECKPOINT.DIR", url));
    }
    args
}

/// The loader arguments for a spec: `config=<name>`, the inline tree as one override per leaf, the
/// user's override lines, then what the operator must control.
pub fn loader_args(spec: &SSLTrainingSpec) -> Vec<String> {
    config::loader_args(&spec.config, &operator_args(spec))
}

/// Loads and validates the spec's config for its world (numNodes x procsPerNode); the error is the
/// loader's message (key path, origin, reason).
pub fn resolve(spec: &SSLTrainingSpec, configs_root: &Path) -> Result<ResolvedConfig, String> {
    let resolved = config::resolve(
        &spec.config,
        &spec.nodes,
        &operator_args(spec),
        configs_root,
    )?;
    if resolved.metrics_port == 0 {
        return Err("invalid `config.HOOKS.PROMETHEUS_SETUP.PORT`: 0 (a free port) cannot be declared on a pod; \
                    set a fixed port (the default is 9400)"
            .into());
    }
    Ok(resolved)
}
