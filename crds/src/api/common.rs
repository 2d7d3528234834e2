//! Pieces every pod-group resource shares (`SSLTraining` now, `Benchmark` next): how the pods are
//! built and placed, where the VISSL config comes from, the dataset and checkpoint locations, the run
//! policy, and the status a user reads.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The extended resource name of NVIDIA GPUs, the one the GPU rule checks.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// CEL rules (`x-kubernetes-validations`) over a spec that flattens [`NodeGroupSpec`] and holds a
/// `config` [`ConfigSource`]; each resource kind attaches them to its spec so they read the same.
pub mod rules {
    /// One trainer process per GPU: a GPU limit must equal procsPerNode.
    pub const GPUS_MATCH_PROCS: &str = "!has(self.resources) || !has(self.resources.limits) || \
         !('nvidia.com/gpu' in self.resources.limits) || \
         int(self.resources.limits['nvidia.com/gpu']) == self.procsPerNode";
    /// Message of [`GPUS_MATCH_PROCS`].
    pub const GPUS_MATCH_PROCS_MESSAGE: &str =
        "resources.limits['nvidia.com/gpu'] must equal procsPerNode (one trainer process per GPU)";
    /// A config must come from somewhere: a built-in name, an inline tree, or both.
    pub const CONFIG_GIVEN: &str = "has(self.config.name) || has(self.config.inline)";
    /// Message of [`CONFIG_GIVEN`].
    pub const CONFIG_GIVEN_MESSAGE: &str =
        "config needs a built-in config name (config.name), an inline config tree (config.inline), or both";
    /// A dataset volume is one kind of volume.
    pub const ONE_DATASET_VOLUME: &str =
        "!has(self.dataset) || !(has(self.dataset.claimName) && has(self.dataset.hostPath))";
    /// Message of [`ONE_DATASET_VOLUME`].
    pub const ONE_DATASET_VOLUME_MESSAGE: &str =
        "dataset takes either claimName or hostPath, not both";
}

fn one() -> i32 {
    1
}

fn default_master_port() -> i32 {
    29500
}

/// When the kubelet pulls the image (Kubernetes' `imagePullPolicy`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every pod start.
    Always,
    /// Pull only when the node lacks the image.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in a container spec.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The pods of a group: one pod per node, each running `procsPerNode` trainer processes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeGroupSpec {
    /// Trainer image (it ships the `vissl` binary and the built-in `configs/`). Empty: the operator's
    /// --default-image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// When to pull the image; Kubernetes' default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Pods (machines) in the group; pod i is node rank i.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub num_nodes: i32,
    /// Trainer processes per pod; with GPUs, one per GPU (so it must equal the GPU limit).
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub procs_per_node: i32,
    /// CPU, memory and GPU requests/limits of each pod's trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables of the trainer container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Node labels a pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the pods (for preemption and queueing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// ServiceAccount the pods run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Rendezvous port of node 0 (MASTER_PORT).
    #[serde(default = "default_master_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub master_port: i32,
}

impl Default for NodeGroupSpec {
    fn default() -> Self {
        NodeGroupSpec {
            image: None,
            image_pull_policy: None,
            num_nodes: one(),
            procs_per_node: one(),
            resources: None,
            env: Vec::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
            priority_class_name: None,
            service_account_name: None,
            master_port: default_master_port(),
        }
    }
}

/// Where the VISSL config comes from, composed in this order: the built-in config `name`, then the
/// `inline` tree, then the `overrides` lines.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSource {
    /// A config shipped in the image under `configs/`, as `vissl train config=<name>` takes it
    /// (for example `pretrain/simclr/quick_cpu_fmnist`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A config tree with VISSL's keys as they appear under `config:` (DATA, MODEL, LOSS, OPTIMIZER,
    /// ...), merged over the named config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub inline: Option<serde_json::Value>,
    /// VISSL override lines applied last, as on the command line (`config.OPTIMIZER.num_epochs=10`,
    /// `+config.NEW.KEY=v`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
}

/// An object whose fields the API server keeps without checking them (the VISSL loader checks them).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn default_dataset_mount() -> String {
    "/data".into()
}

/// The training data: a volume mounted read-only into every pod, and/or a URL handed to the image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// A PersistentVolumeClaim (in the resource's namespace) holding the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// A folder on every node holding the data (pre-staged datasets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// Where the volume appears in the pods; point the config's DATA_PATHS there.
    #[serde(default = "default_dataset_mount")]
    pub mount_path: String,
    /// Where the data lives remotely (for example `s3://bucket/imagenet`); passed to the trainer as
    /// VISSL_DATASET_URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Where checkpoints go, so a restarted group resumes from the newest one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Checkpoint folder: an object-store URL (`s3://`, `gs://`, `az://`, `file://`) or a path on a
    /// shared volume. Becomes the config's CHECKPOINT.DIR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Secret in the same namespace whose keys become the trainer's environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT, GOOGLE_*, AZURE_*: what the object store reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Which pods to delete when the run finishes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CleanPodPolicy {
    /// Delete every pod.
    All,
    /// Delete the pods still running (peers of a failed node); keep finished ones for their logs.
    #[default]
    Running,
    /// Keep every pod.
    None,
}

fn default_backoff_limit() -> i32 {
    3
}

/// How failures, time limits and finished runs are handled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Group restarts allowed after retryable failures (one restart per group restart, whichever pod
    /// failed); the next failure fails the run. Exit codes 64 (invalid config) and 65 (invalid data)
    /// fail it at once.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0))]
    pub backoff_limit: i32,
    /// Seconds the run may take while not suspended (counted from the last start or resume); then
    /// it fails with reason DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds after finishing (Succeeded or Failed) before the resource and its children are deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Pods to delete when the run finishes.
    #[serde(default)]
    pub clean_pod_policy: CleanPodPolicy,
    /// True: hold no pods (queue admission, pausing); false again: start from the last checkpoint.
    #[serde(default)]
    pub suspend: bool,
}

impl Default for RunPolicy {
    fn default() -> Self {
        RunPolicy {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            clean_pod_policy: CleanPodPolicy::default(),
            suspend: false,
        }
    }
}

/// The gang scheduler that places a group's pods all at once or not at all.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum GangScheduler {
    /// No gang: the default scheduler places each pod on its own (a partly placed group waits
    /// holding its nodes).
    #[default]
    None,
    /// The coscheduling plugin of kubernetes-sigs/scheduler-plugins: a `scheduling.x-k8s.io/v1alpha1`
    /// PodGroup, pods labelled `scheduling.x-k8s.io/pod-group`, scheduler `scheduler-plugins-scheduler`.
    SchedulerPlugins,
    /// Volcano: a `scheduling.volcano.sh/v1beta1` PodGroup in a queue, pods annotated
    /// `scheduling.k8s.io/group-name`, scheduler `volcano`.
    Volcano,
}

impl GangScheduler {
    /// The value as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            GangScheduler::None => "None",
            GangScheduler::SchedulerPlugins => "SchedulerPlugins",
            GangScheduler::Volcano => "Volcano",
        }
    }
}

/// CEL rules of [`SchedulingSpec`]: settings that only one gang scheduler reads.
pub mod scheduling_rules {
    /// Only volcano has queues.
    pub const QUEUE_NEEDS_VOLCANO: &str = "!has(self.queue) || self.gang == 'Volcano'";
    /// Message of [`QUEUE_NEEDS_VOLCANO`].
    pub const QUEUE_NEEDS_VOLCANO_MESSAGE: &str =
        "scheduling.queue is a volcano queue: it needs gang: Volcano";
    /// Only scheduler-plugins' PodGroup has a schedule timeout.
    pub const TIMEOUT_NEEDS_SCHEDULER_PLUGINS: &str =
        "!has(self.scheduleTimeoutSeconds) || self.gang == 'SchedulerPlugins'";
    /// Message of [`TIMEOUT_NEEDS_SCHEDULER_PLUGINS`].
    pub const TIMEOUT_NEEDS_SCHEDULER_PLUGINS_MESSAGE: &str =
        "scheduling.scheduleTimeoutSeconds is scheduler-plugins' PodGroup timeout: it needs gang: SchedulerPlugins";
    /// A scheduler name or minimum resources without a gang would be silently ignored.
    pub const SETTINGS_NEED_GANG: &str =
        "self.gang != 'None' || (!has(self.schedulerName) && !has(self.minResources))";
    /// Message of [`SETTINGS_NEED_GANG`].
    pub const SETTINGS_NEED_GANG_MESSAGE: &str =
        "scheduling.schedulerName and scheduling.minResources belong to a gang: set gang to SchedulerPlugins or Volcano";
}

/// Gang scheduling of the group: a PodGroup the gang scheduler admits as a whole, so a group that
/// does not fit holds no nodes while it waits.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new(scheduling_rules::QUEUE_NEEDS_VOLCANO).message(scheduling_rules::QUEUE_NEEDS_VOLCANO_MESSAGE),
    validation = Rule::new(scheduling_rules::TIMEOUT_NEEDS_SCHEDULER_PLUGINS).message(scheduling_rules::TIMEOUT_NEEDS_SCHEDULER_PLUGINS_MESSAGE),
    validation = Rule::new(scheduling_rules::SETTINGS_NEED_GANG).message(scheduling_rules::SETTINGS_NEED_GANG_MESSAGE)
)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// None (default), SchedulerPlugins or Volcano. The operator creates the PodGroup (named like
    /// the resource) before any pod and creates pods only once it exists; the scheduler must be
    /// installed in the cluster.
    #[serde(default)]
    pub gang: GangScheduler,
    /// The pods' schedulerName; defaults to `scheduler-plugins-scheduler` (SchedulerPlugins) or
    /// `volcano` (Volcano), the names their Helm charts install.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub scheduler_name: Option<String>,
    /// The volcano queue of the PodGroup (Volcano only); volcano's default queue when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub queue: Option<String>,
    /// Seconds scheduler-plugins waits for the whole group to fit before it gives the group's
    /// reservations back and retries (SchedulerPlugins only); the plugin's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub schedule_timeout_seconds: Option<i32>,
    /// Resources the whole group needs before any pod is placed. Default: numNodes times one pod's
    /// requests (a limit counts where no request is given, as Kubernetes defaults requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_resources: Option<BTreeMap<String, Quantity>>,
}

/// Where a run stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Accepted; pods are being created or scheduled.
    #[default]
    Pending,
    /// Every pod of the group runs.
    Running,
    /// The group is being torn down and recreated (after a failure, or a resume).
    Restarting,
    /// Every pod exited 0.
    Succeeded,
    /// Finished without success; the conditions say why.
    Failed,
    /// `runPolicy.suspend` is true; no pods.
    Suspended,
}

impl Phase {
    /// Every phase, for metrics that report all of them.
    pub const ALL: [Phase; 6] = [
        Phase::Pending,
        Phase::Running,
        Phase::Restarting,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Suspended,
    ];

    /// The name as it appears in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Restarting => "Restarting",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Suspended => "Suspended",
        }
    }

    /// Succeeded or Failed: nothing runs any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// Kubernetes' condition status.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// It does not.
    False,
    /// Not known yet.
    Unknown,
}

/// One aspect of the state, with the reason and a message for people.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// ConfigValid, Running, Restarting, Suspended, Succeeded or Failed.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Machine-readable cause in PascalCase (InvalidConfig, PodFailed, BackoffLimitExceeded, ...).
    pub reason: String,
    /// What happened, for people.
    #[serde(default)]
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The resource generation the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The lifecycle part of a status, shared by every pod-group resource.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Pending, Running, Restarting, Succeeded, Failed or Suspended.
    #[serde(default)]
    pub phase: Phase,
    /// Why the run is in its phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Group restarts after failures (counted against runPolicy.backoffLimit).
    #[serde(default)]
    pub restarts: i32,
    /// Pod groups created so far minus one (restarts and resumes each start a new attempt); pods
    /// carry it as the label vissl.rs/attempt and in VISSL_RUN_ID.
    #[serde(default)]
    pub attempt: i32,
    /// When the current run (first start or last resume) began; activeDeadlineSeconds counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The resource generation this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl GroupStatus {
    /// The condition of this type, if set.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// Training progress as rank 0 reports it on `/status`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Current epoch, counted from 0.
    pub epoch: i64,
    /// Epochs in the run.
    pub num_epochs: i64,
    /// Training iterations done.
    pub iteration: i64,
    /// Training iterations in the run.
    pub total_iterations: i64,
    /// Iterations done, in percent of the total.
    pub percent: i32,
    /// Latest training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Source images per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_second: Option<f64>,
    /// Estimated seconds to the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<i64>,
    /// When rank 0 last updated these numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Time>,
}

/// The newest complete checkpoint, the one a restart resumes from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastCheckpoint {
    /// Where it is (a URL or path under CHECKPOINT.DIR).
    pub url: String,
    /// Training iteration it holds.
    pub iteration: i64,
    /// Epochs completed at that iteration, where the iterations per epoch are known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
}
