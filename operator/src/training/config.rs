//! The VISSL config of an SSLTraining, resolved with the same loader the trainer uses.

use std::path::Path;

use vissl_crds::api::SSLTrainingSpec;
use vissl_crds::config::{load, LoadOptions, World};

/// A config ready for the ConfigMap.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedConfig {
    /// The fully resolved config file (`Config::to_yaml`).
    pub yaml: String,
    /// HOOKS.PROMETHEUS_SETUP.PORT: where rank 0 serves `/status` and `/metrics`.
    pub metrics_port: u16,
    /// The config's hash, as checkpoint manifests record it.
    pub hash: String,
}

/// The loader arguments for a spec: `config=<name>`, the inline tree as one override per leaf, the
/// user's override lines, then what the operator must control (metrics on for progress, the
/// checkpoint folder the spec names).
pub fn loader_args(spec: &SSLTrainingSpec) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(name) = &spec.config.name {
        args.push(format!("config={name}"));
    }
    args.extend(inline_args(spec));
    args.extend(spec.config.overrides.iter().cloned());
    args.push("config.HOOKS.PROMETHEUS_SETUP.USE_PROMETHEUS=true".into());
    if let Some(url) = spec.checkpoint.as_ref().and_then(|c| c.url.as_ref()) {
        // JSON quoting keeps a URL a string whatever characters it holds.
        args.push(format!(
            "config.CHECKPOINT.DIR={}",
            serde_json::Value::String(url.clone())
        ));
    }
    args
}

fn inline_args(spec: &SSLTrainingSpec) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(inline) = &spec.config.inline {
        inline_leaves("config", inline, &mut args);
    }
    args
}

/// The loader names an argument's origin as `command line `<arg>``; in a resource the user wrote
/// spec fields, so name those instead.
fn name_spec_fields(message: String, spec: &SSLTrainingSpec) -> String {
    let mut message = message;
    for arg in inline_args(spec) {
        let key = arg.split_once('=').map_or(arg.as_str(), |(k, _)| k);
        message = message.replace(
            &format!("command line `{arg}`"),
            &format!("spec.config.inline (key `{key}`)"),
        );
    }
    for arg in &spec.config.overrides {
        message = message.replace(
            &format!("command line `{arg}`"),
            &format!("spec.config.overrides line `{arg}`"),
        );
    }
    message
}

/// `config.A.B=<JSON value>` for every non-mapping value (and empty mapping) of the tree, so the
/// inline tree merges over the named config key by key and errors name the key.
fn inline_leaves(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                inline_leaves(&format!("{prefix}.{key}"), child, out);
            }
        }
        leaf => out.push(format!("{prefix}={leaf}")),
    }
}

/// Loads and validates the spec's config for its world (numNodes x procsPerNode); the error is the
/// loader's message (key path, origin, reason).
pub fn resolve(spec: &SSLTrainingSpec, configs_root: &Path) -> Result<ResolvedConfig, String> {
    let world = World {
        num_nodes: usize::try_from(spec.nodes.num_nodes.max(1)).unwrap_or(1),
        nproc_per_node: usize::try_from(spec.nodes.procs_per_node.max(1)).unwrap_or(1),
    };
    let opts = LoadOptions {
        configs_root: configs_root.to_path_buf(),
        world: Some(world),
    };
    let config =
        load(&opts, &loader_args(spec)).map_err(|e| name_spec_fields(e.to_string(), spec))?;
    let metrics_port = config.hooks.prometheus_setup.port;
    if metrics_port == 0 {
        return Err("invalid `config.HOOKS.PROMETHEUS_SETUP.PORT`: 0 (a free port) cannot be declared on a pod; \
                    set a fixed port (the default is 9400)"
            .into());
    }
    Ok(ResolvedConfig {
        yaml: config.to_yaml(),
        metrics_port,
        hash: config.hash(),
    })
}
