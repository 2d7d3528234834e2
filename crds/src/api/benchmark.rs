//! `Benchmark`: the evaluation of a trained model (an SSLTraining's checkpoint or a checkpoint URL)
//! with a VISSL benchmark config on a group of pods.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    rules, ConfigSource, DatasetSpec, GroupStatus, NodeGroupSpec, RunPolicy, SchedulingSpec,
};

/// CEL rule of the spec: the model comes from exactly one place.
pub const ONE_MODEL_SOURCE: &str = "has(self.model.training) != has(self.model.checkpointUrl)";
/// Message of [`ONE_MODEL_SOURCE`].
pub const ONE_MODEL_SOURCE_MESSAGE: &str =
    "model takes exactly one of training (an SSLTraining in this namespace) or checkpointUrl";

/// Evaluates a model with a VISSL benchmark config (for example
/// `benchmark/nearest_neighbor/quick_cpu_fmnist_knn`) on `numNodes` pods. With `model.training` it
/// waits until that SSLTraining has succeeded and uses its checkpoint; the results land in the status
/// and, with `results.url`, as JSON in the object store.
// Each printcolumn(...) repeats the same keys (type_, priority), which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vissl.rs",
    version = "v1alpha1",
    kind = "Benchmark",
    plural = "benchmarks",
    singular = "benchmark",
    shortname = "bench",
    namespaced,
    status = "BenchmarkStatus",
    derive = "PartialEq",
    doc = "A VISSL benchmark (kNN) of a trained model on a group of pods (one per node).",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "where the benchmark stands"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".status.model",
        description = "the checkpoint evaluated (from the training or checkpointUrl)"
    ),
    printcolumn(
        name = "Top-1",
        type_ = "number",
        json_path = ".status.top1",
        description = "headline top-1 accuracy, percent"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new(rules::GPUS_MATCH_PROCS).message(rules::GPUS_MATCH_PROCS_MESSAGE),
    validation = Rule::new(rules::CONFIG_GIVEN).message(rules::CONFIG_GIVEN_MESSAGE),
    validation = Rule::new(rules::ONE_DATASET_VOLUME).message(rules::ONE_DATASET_VOLUME_MESSAGE),
    validation = Rule::new(ONE_MODEL_SOURCE).message(ONE_MODEL_SOURCE_MESSAGE)
)]
#[serde(rename_all = "camelCase")]
pub struct BenchmarkSpec {
    /// The pods: image, size, resources, placement.
    #[serde(flatten)]
    pub nodes: NodeGroupSpec,
    /// The benchmark's VISSL config: a built-in name (such as
    /// `benchmark/nearest_neighbor/quick_cpu_fmnist_knn`), an inline tree and override lines.
    pub config: ConfigSource,
    /// The model to evaluate.
    pub model: ModelSource,
    /// Which benchmark the trainer runs.
    #[serde(default)]
    pub benchmark: BenchmarkKind,
    /// The evaluation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetSpec>,
    /// Where the results JSON goes, besides the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<ResultsSpec>,
    /// Restarts, time limits, cleanup and suspension.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Gang scheduling of the pods (none by default), as for an SSLTraining.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
}

/// Where the weights come from: exactly one of `training` and `checkpointUrl`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSource {
    /// An SSLTraining in the same namespace: the benchmark waits until it has succeeded, then
    /// evaluates its newest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<String>,
    /// A checkpoint folder (the newest verified checkpoint in it is used) or weights file: an
    /// object-store URL (`s3://`, `gs://`, `az://`, `file://`) or a path in the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_url: Option<String>,
    /// A Secret in the same namespace whose keys become the trainer's environment to read the model
    /// (AWS_*, GOOGLE_*, AZURE_*). Default: the training's spec.checkpoint.credentialsSecret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Where the results JSON is written: `<url>/<namespace>/<name>/knn_results.json`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultsSpec {
    /// An object-store prefix (`s3://bucket/benchmarks`) or a folder on a shared volume.
    pub url: String,
    /// A Secret in the same namespace whose keys become the trainer's environment to write there;
    /// where it and the model's Secret set the same key, this one wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// The benchmark the trainer runs. Only `knn` is accepted now; linear, svm, fineTune and lowShot
/// join as the trainer gains them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BenchmarkKind {
    /// Weighted k-nearest-neighbour classification on frozen features (`vissl benchmark knn`).
    #[default]
    Knn,
}

impl BenchmarkKind {
    /// The name as the API and `vissl benchmark <name>` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            BenchmarkKind::Knn => "knn",
        }
    }
}

/// What the operator observed and decided, and the results.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BenchmarkStatus {
    /// Phase, conditions, restarts, attempt and times.
    #[serde(flatten)]
    pub group: GroupStatus,
    /// The checkpoint location the pods evaluate (set once the model is ready, then kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// One row per features/layer/k the benchmark measured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<BenchmarkResult>,
    /// The headline top-1 accuracy in percent (the trained model's first row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    /// Where the results JSON was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_url: Option<String>,
}

/// One measured accuracy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BenchmarkResult {
    /// Whose features: `trained`, or a baseline (`random_init`, `raw_pixels`).
    pub features: String,
    /// The layer the features come from (`res5avg`, `input`).
    pub layer: String,
    /// Neighbours voting.
    pub k: i64,
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
}
