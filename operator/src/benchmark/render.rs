//! The children of a Benchmark for one attempt: the shared rendering
//! ([`crate::workload::render`]) with `vissl benchmark <kind>`, the benchmark label, a termination
//! message for the results, and the Secrets to read the model and write the results.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use vissl_crds::api::Benchmark;

use crate::error::Result;
use crate::group::Children;
use crate::workload::render::{self, Attempt, Workload, CONFIG_DIR, CONFIG_KEY};

/// The label naming the Benchmark a child belongs to.
pub const BENCHMARK_LABEL: &str = "vissl.rs/benchmark";

/// Everything rendering needs besides the resource.
#[derive(Debug, Clone, Copy)]
pub struct RenderInput<'a> {
    /// The attempt the pods belong to.
    pub attempt: i32,
    /// The resolved config file.
    pub config_yaml: &'a str,
    /// Image when the spec names none (--default-image).
    pub default_image: &'a str,
    /// The Secret to read the model with (the spec's, else the training's checkpoint Secret).
    pub model_secret: Option<&'a str>,
}

/// The label selector of every child of a benchmark.
pub fn selector(benchmark: &str) -> String {
    render::selector(BENCHMARK_LABEL, benchmark)
}

/// `<results.url>/<namespace>/<name>/<kind>_results.json`, when the spec asks for a copy.
pub fn output_url(benchmark: &Benchmark) -> Option<String> {
    let results = benchmark.spec.results.as_ref()?;
    let namespace = benchmark.metadata.namespace.as_deref().unwrap_or_default();
    let name = benchmark.metadata.name.as_deref().unwrap_or_default();
    Some(format!(
        "{}/{namespace}/{name}/{}_results.json",
        results.url.trim_end_matches('/'),
        benchmark.spec.benchmark.as_str()
    ))
}

/// `vissl benchmark <kind> [--output <url>] config=/etc/vissl/config.yaml`.
pub fn command(benchmark: &Benchmark) -> Vec<String> {
    let mut command = vec![
        "vissl".to_string(),
        "benchmark".to_string(),
        benchmark.spec.benchmark.as_str().to_string(),
    ];
    if let Some(url) = output_url(benchmark) {
        command.extend(["--output".to_string(), url]);
    }
    command.push(format!("config={CONFIG_DIR}/{CONFIG_KEY}"));
    command
}

/// Metadata of the benchmark's PodGroup (gang scheduling).
pub fn pod_group_meta(benchmark: &Benchmark) -> Result<ObjectMeta> {
    render::pod_group_meta(benchmark, BENCHMARK_LABEL)
}

/// The Service, the ConfigMap and the pods of `ranks` for one attempt.
pub fn children(benchmark: &Benchmark, ranks: &[usize], input: &RenderInput) -> Result<Children> {
    let spec = &benchmark.spec;
    // The results Secret last: where both set a key, writing the results needs it.
    let secrets = input
        .model_secret
        .map(str::to_string)
        .into_iter()
        .chain(
            spec.results
                .as_ref()
                .and_then(|r| r.credentials_secret.clone()),
        )
        .collect();
    let workload = Workload {
        owner_label: BENCHMARK_LABEL,
        nodes: &spec.nodes,
        dataset: spec.dataset.as_ref(),
        command: command(benchmark),
        secrets,
        metrics_port: None,
        termination_message: true,
    };
    render::children(
        benchmark,
        &workload,
        ranks,
        &Attempt {
            attempt: input.attempt,
            config_yaml: input.config_yaml,
            default_image: input.default_image,
        },
    )
}
