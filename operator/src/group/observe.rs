//! What the decision needs to know about a pod, read from the Pod object.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;

use super::{reasons, ATTEMPT_LABEL, NODE_RANK_LABEL};

/// Why a pod of the group failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The pod (or the missing node rank).
    pub pod: String,
    /// The container that exited non-zero, when one did.
    pub container: Option<String>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// Kubernetes' reason (Error, OOMKilled, Evicted, DisruptionTarget, Deleted, ...).
    pub reason: String,
    /// Kubernetes' message, when it gave one.
    pub message: String,
}

impl Failure {
    /// A pod of a running group that was deleted or has vanished.
    pub fn deleted(pod: &str) -> Self {
        Failure {
            pod: pod.to_string(),
            container: None,
            exit_code: None,
            reason: "Deleted".into(),
            message: String::new(),
        }
    }

    /// The condition/Event reason for a restart after this failure.
    pub fn reason_kind(&self) -> &'static str {
        if self.reason == "Deleted" {
            reasons::POD_DELETED
        } else {
            reasons::POD_FAILED
        }
    }

    /// One line for messages: `pod x-node-1 failed: exit code 1 (Error)`.
    pub fn describe(&self) -> String {
        let mut text = if self.reason == "Deleted" {
            format!("pod {} was deleted", self.pod)
        } else {
            match (&self.container, self.exit_code) {
                (Some(container), Some(code)) => format!(
                    "pod {} failed: container {container} exited with code {code} ({})",
                    self.pod, self.reason
                ),
                _ => format!("pod {} failed: {}", self.pod, self.reason),
            }
        };
        if !self.message.is_empty() {
            text.push_str(": ");
            text.push_str(&self.message);
        }
        text
    }
}

/// A pod's lifecycle state as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not running yet (scheduling, pulling, init containers).
    Pending,
    /// Its containers run.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, or was evicted or disrupted.
    Failed(Failure),
    /// The node stopped reporting.
    Unknown,
}

impl PodState {
    /// Succeeded or failed: nothing runs in it any more.
    pub fn is_terminated(&self) -> bool {
        matches!(self, PodState::Succeeded | PodState::Failed(_))
    }
}

/// One pod of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPod {
    /// metadata.name.
    pub name: String,
    /// The vissl.rs/node-rank label.
    pub node_rank: Option<usize>,
    /// The vissl.rs/attempt label.
    pub attempt: Option<i32>,
    /// Where it stands.
    pub state: PodState,
    /// A deletion was requested (it is terminating).
    pub deleting: bool,
}

impl ObservedPod {
    /// Reads a Pod; `main_container` is the container whose exit code is the trainer's.
    pub fn from_pod(pod: &Pod, main_container: &str) -> Self {
        let labels = pod.labels();
        ObservedPod {
            name: pod.name_any(),
            node_rank: labels.get(NODE_RANK_LABEL).and_then(|v| v.parse().ok()),
            attempt: labels.get(ATTEMPT_LABEL).and_then(|v| v.parse().ok()),
            state: pod_state(pod, main_container),
            deleting: pod.metadata.deletion_timestamp.is_some(),
        }
    }
}

fn pod_state(pod: &Pod, main_container: &str) -> PodState {
    let name = pod.name_any();
    let Some(status) = &pod.status else {
        return PodState::Pending;
    };
    let disrupted = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True");
    match status.phase.as_deref() {
        Some("Succeeded") => PodState::Succeeded,
        Some("Failed") => PodState::Failed(failure_of(pod, main_container)),
        // Preemption, eviction, taint manager or graceful node shutdown is about to kill it.
        _ if disrupted.is_some() => PodState::Failed(Failure {
            pod: name,
            container: None,
            exit_code: None,
            reason: disrupted
                .and_then(|c| c.reason.clone())
                .unwrap_or_else(|| "DisruptionTarget".into()),
            message: disrupted
                .and_then(|c| c.message.clone())
                .unwrap_or_default(),
        }),
        Some("Running") => PodState::Running,
        Some("Pending") | None => PodState::Pending,
        Some(_) => PodState::Unknown,
    }
}

/// The first container that exited non-zero (init containers first, then the main one), else the
/// pod's own reason (Evicted, Shutdown, ...).
fn failure_of(pod: &Pod, main_container: &str) -> Failure {
    let name = pod.name_any();
    let status = pod.status.clone().unwrap_or_default();
    let terminated = |c: &ContainerStatus| {
        c.state
            .as_ref()
            .and_then(|s| s.terminated.clone())
            .filter(|t| t.exit_code != 0)
    };
    let init = status.init_container_statuses.iter().flatten();
    let main = status
        .container_statuses
        .iter()
        .flatten()
        .filter(|c| c.name == main_container);
    if let Some((container, t)) = init
        .chain(main)
        .find_map(|c| terminated(c).map(|t| (c.name.clone(), t)))
    {
        return Failure {
            pod: name,
            container: Some(container),
            exit_code: Some(t.exit_code),
            reason: t.reason.unwrap_or_else(|| "Error".into()),
            message: t.message.unwrap_or_default(),
        };
    }
    Failure {
        pod: name,
        container: None,
        exit_code: None,
        reason: status.reason.unwrap_or_else(|| "Failed".into()),
        message: status.message.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "t-node-1", "labels": {"vissl.rs/node-rank": "1", "vissl.rs/attempt": "3"}},
            "status": status,
        }))
        .expect("a valid pod")
    }

    fn terminated(name: &str, code: i32, reason: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                           "state": {"terminated": {"exitCode": code, "reason": reason}}})
    }

    #[test]
    fn reads_rank_attempt_and_plain_phases() {
        let running =
            ObservedPod::from_pod(&pod(serde_json::json!({"phase": "Running"})), "trainer");
        assert_eq!(running.node_rank, Some(1));
        assert_eq!(running.attempt, Some(3));
        assert_eq!(running.state, PodState::Running);
        assert!(!running.deleting);
        let done =
            ObservedPod::from_pod(&pod(serde_json::json!({"phase": "Succeeded"})), "trainer");
        assert_eq!(done.state, PodState::Succeeded);
        let fresh = ObservedPod::from_pod(&pod(serde_json::json!({})), "trainer");
        assert_eq!(fresh.state, PodState::Pending);
    }

    #[test]
    fn the_trainer_exit_code_is_the_failure() {
        let p = pod(serde_json::json!({"phase": "Failed",
            "containerStatuses": [terminated("sidecar", 2, "Error"), terminated("trainer", 64, "Error")]}));
        let PodState::Failed(f) = ObservedPod::from_pod(&p, "trainer").state else {
            panic!("a failed pod");
        };
        assert_eq!(f.exit_code, Some(64));
        assert!(
            f.describe().contains("t-node-1") && f.describe().contains("64"),
            "{}",
            f.describe()
        );
    }

    #[test]
    fn an_init_container_failure_counts() {
        let p = pod(serde_json::json!({"phase": "Failed",
            "initContainerStatuses": [terminated("wait-for-master", 1, "Error")]}));
        let PodState::Failed(f) = ObservedPod::from_pod(&p, "trainer").state else {
            panic!("a failed pod");
        };
        assert_eq!(f.exit_code, Some(1));
        assert_eq!(f.container.as_deref(), Some("wait-for-master"));
        assert!(
            f.describe()
                .contains("container wait-for-master exited with code 1"),
            "{}",
            f.describe()
        );
    }

    #[test]
    fn eviction_and_disruption_are_failures_without_exit_code() {
        let p = pod(
            serde_json::json!({"phase": "Failed", "reason": "Evicted", "message": "low on memory"}),
        );
        let PodState::Failed(f) = ObservedPod::from_pod(&p, "trainer").state else {
            panic!("a failed pod");
        };
        assert_eq!((f.exit_code, f.reason.as_str()), (None, "Evicted"));

        let p = pod(serde_json::json!({"phase": "Running", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
             "message": "node shutdown"}]}));
        let PodState::Failed(f) = ObservedPod::from_pod(&p, "trainer").state else {
            panic!("a disrupted pod");
        };
        assert_eq!(f.reason, "TerminationByKubelet");
        assert_eq!(f.reason_kind(), reasons::POD_FAILED);
    }
}
