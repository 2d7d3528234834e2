//! `SSLTraining`: one self-supervised pretraining run of a VISSL config on a group of pods.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    rules, CheckpointSpec, ConfigSource, DatasetSpec, GroupStatus, LastCheckpoint, NodeGroupSpec,
    Progress, RunPolicy, SchedulingSpec,
};

/// A VISSL pretraining run on `numNodes` pods with `procsPerNode` trainer processes each. The operator
/// validates the config, creates a headless Service, a ConfigMap with the resolved config and one pod
/// per node, restarts the whole group after a failure (resuming from the last checkpoint), and
/// reports progress from rank 0.
// Each printcolumn(...) repeats the same keys (type_, priority), which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vissl.rs",
    version = "v1alpha1",
    kind = "SSLTraining",
    plural = "ssltrainings",
    singular = "ssltraining",
    shortname = "sslt",
    namespaced,
    status = "SSLTrainingStatus",
    derive = "PartialEq",
    doc = "A VISSL self-supervised pretraining run on a group of pods (one per node).",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "where the run stands"
    ),
    printcolumn(
        name = "Progress",
        type_ = "integer",
        json_path = ".status.progress.percent",
        description = "iterations done, percent"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.progress.epoch",
        description = "current epoch",
        priority = 1
    ),
    printcolumn(
        name = "Loss",
        type_ = "number",
        json_path = ".status.progress.loss",
        description = "latest loss",
        priority = 1
    ),
    printcolumn(
        name = "Restarts",
        type_ = "integer",
        json_path = ".status.restarts",
        description = "group restarts after failures"
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
    validation = Rule::new(rules::ONE_DATASET_VOLUME).message(rules::ONE_DATASET_VOLUME_MESSAGE)
)]
#[serde(rename_all = "camelCase")]
pub struct SSLTrainingSpec {
    /// The pods: image, size, resources, placement.
    #[serde(flatten)]
    pub nodes: NodeGroupSpec,
    /// The VISSL config: a built-in name, an inline tree and override lines.
    pub config: ConfigSource,
    /// The training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetSpec>,
    /// Where checkpoints go and the credentials to write them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointSpec>,
    /// Restarts, time limits, cleanup and suspension.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Gang scheduling of the pods (none by default).
    #[serde(default)]
    pub scheduling: SchedulingSpec,
}

/// What the operator observed and decided: phase, conditions, restarts, progress, last checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SSLTrainingStatus {
    /// Phase, conditions, restarts, attempt and times.
    #[serde(flatten)]
    pub group: GroupStatus,
    /// Training progress from rank 0, while it runs (kept after it stops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The newest complete checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<LastCheckpoint>,
}
