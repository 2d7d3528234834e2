//! The custom resources (API group `vissl.rs`, version `v1alpha1`).
//!
//! [`common`] holds what every pod-group resource shares (node group, config source, dataset,
//! checkpoint, run policy, status pieces); [`ssl_training`] is the `SSLTraining` kind.

pub mod common;
pub mod ssl_training;

pub use common::{
    CheckpointSpec, CleanPodPolicy, Condition, ConditionStatus, ConfigSource, DatasetSpec,
    GroupStatus, LastCheckpoint, NodeGroupSpec, Phase, Progress, RunPolicy,
};
pub use ssl_training::{SSLTraining, SSLTrainingSpec, SSLTrainingStatus};

/// The API group of every vissl-rs custom resource.
pub const GROUP: &str = "vissl.rs";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// The SSLTraining CustomResourceDefinition as YAML (what `vissl-operator crd` prints and
/// `crds/manifests/ssltrainings.vissl.rs.yaml` holds).
pub fn ssl_training_crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&SSLTraining::crd())
}
