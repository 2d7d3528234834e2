//! A resource's VISSL config, resolved with the same loader the trainer uses.

use std::path::Path;

use vissl_crds::api::{ConfigSource, NodeGroupSpec};
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

/// `config.<key>=<value>` with the value JSON-quoted, so a URL or path stays a string whatever
/// characters it holds.
pub fn string_override(key: &str, value: &str) -> String {
    format!(
        "config.{key}={}",
        serde_json::Value::String(value.to_string())
    )
}

/// The loader arguments: `config=<name>`, the inline tree as one override per leaf, the user's
/// override lines, then `operator_args` (what the operator must control, applied last).
pub fn loader_args(source: &ConfigSource, operator_args: &[String]) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(name) = &source.name {
        args.push(format!("config={name}"));
    }
    args.extend(inline_args(source));
    args.extend(source.overrides.iter().cloned());
    args.extend(operator_args.iter().cloned());
    args
}

fn inline_args(source: &ConfigSource) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(inline) = &source.inline {
        inline_leaves("config", inline, &mut args);
    }
    args
}

/// The loader names an argument's origin as `command line `<arg>``; in a resource the user wrote
/// spec fields, so name those instead.
fn name_spec_fields(message: String, source: &ConfigSource) -> String {
    let mut message = message;
    for arg in inline_args(source) {
        let key = arg.split_once('=').map_or(arg.as_str(), |(k, _)| k);
        message = message.replace(
            &format!("command line `{arg}`"),
            &format!("spec.config.inline (key `{key}`)"),
        );
    }
    for arg in &source.overrides {
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

/// Loads and validates a config for the group's world (numNodes x procsPerNode); the error is the
/// loader's message (key path, origin, reason) with spec fields named.
pub fn resolve(
    source: &ConfigSource,
    nodes: &NodeGroupSpec,
    operator_args: &[String],
    configs_root: &Path,
) -> Result<ResolvedConfig, String> {
    let world = World {
        num_nodes: usize::try_from(nodes.num_nodes.max(1)).unwrap_or(1),
        nproc_per_node: usize::try_from(nodes.procs_per_node.max(1)).unwrap_or(1),
    };
    let opts = LoadOptions {
        configs_root: configs_root.to_path_buf(),
        world: Some(world),
    };
    let config = load(&opts, &loader_args(source, operator_args))
        .map_err(|e| name_spec_fields(e.to_string(), source))?;
    Ok(ResolvedConfig {
        yaml: config.to_yaml(),
        metrics_port: config.hooks.prometheus_setup.port,
        hash: config.hash(),
    })
}
