//! The custom resources (API group `vissl.rs`, version `v1alpha1`).
//!
//! [`common`] holds what every pod-group resource shares (node group, config source, dataset,
//! checkpoint, run policy, status pieces); [`ssl_training`] is the `SSLTraining` kind, [`benchmark`]
//! the `Benchmark` kind.

pub mod benchmark;
pub mod common;
pub mod ssl_training;

pub use benchmark::{
    Benchmark, BenchmarkKind, BenchmarkResult, BenchmarkSpec, BenchmarkStatus, ModelSource,
    ResultsSpec,
};
pub use common::{
    CheckpointSpec, CleanPodPolicy, Condition, ConditionStatus, ConfigSource, DatasetSpec,
    GangScheduler, GroupStatus, LastCheckpoint, NodeGroupSpec, Phase, Progress, RunPolicy,
    SchedulingSpec,
};
pub use ssl_training::{SSLTraining, SSLTrainingSpec, SSLTrainingStatus};

/// The API group of every vissl-rs custom resource.
pub const GROUP: &str = "vissl.rs";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// The SSLTraining CustomResourceDefinition, with descriptions unwrapped (see [`unwrap_descriptions`]).
pub fn ssl_training_crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    crd_of::<SSLTraining>()
}

/// The Benchmark CustomResourceDefinition, with descriptions unwrapped.
pub fn benchmark_crd(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    crd_of::<Benchmark>()
}

fn crd_of<K: kube::CustomResourceExt>(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    let mut crd = K::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            unwrap_descriptions(schema);
        }
    }
    crd
}

/// Doc comments are wrapped at the source's line width and the schema keeps those line breaks;
/// `kubectl explain` wraps text itself, so single line breaks become spaces (paragraph breaks stay).
fn unwrap_descriptions(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    if let Some(text) = schema.description.as_mut() {
        *text = text
            .split("\n\n")
            .map(|paragraph| paragraph.replace('\n', " "))
            .collect::<Vec<_>>()
            .join("\n\n");
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        unwrap_descriptions(child);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(items)) =
        schema.items.as_mut()
    {
        unwrap_descriptions(items);
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrBool::Schema(extra)) =
        schema.additional_properties.as_mut()
    {
        unwrap_descriptions(extra);
    }
}

/// The SSLTraining CustomResourceDefinition as YAML (what `vissl-operator crd` prints and
/// `crds/manifests/ssltrainings.vissl.rs.yaml` holds).
pub fn ssl_training_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&ssl_training_crd())
}

/// The Benchmark CustomResourceDefinition as YAML (`crds/manifests/benchmarks.vissl.rs.yaml`).
pub fn benchmark_crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&benchmark_crd())
}

/// Every CustomResourceDefinition of vissl-rs as one multi-document YAML stream.
pub fn all_crds_yaml() -> Result<String, serde_yaml::Error> {
    Ok([ssl_training_crd_yaml()?, benchmark_crd_yaml()?].join("---\n"))
}
