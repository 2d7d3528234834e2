//! The pod status the node agent writes back, in the shape a kubelet gives it.

use std::process::ExitStatus;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde_json::{json, Value};

use super::{now, POD_IP, START_ERROR_EXIT_CODE};

pub(super) fn exited(status: std::io::Result<ExitStatus>, started: Value) -> State {
    use std::os::unix::process::ExitStatusExt;
    let finished = now();
    match status {
        Ok(status) => {
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            let reason = if code == 0 { "Completed" } else { "Error" };
            State::Terminated {
                code,
                reason: reason.into(),
                message: String::new(),
                started,
                finished,
            }
        }
        Err(err) => State::Terminated {
            code: START_ERROR_EXIT_CODE,
            reason: "Error".into(),
            message: format!("waiting for the process: {err}"),
            started,
            finished,
        },
    }
}

/// A container's state as the pod status shows it.
#[derive(Debug, Clone)]
pub(super) enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started: Value,
    },
    Terminated {
        code: i32,
        reason: String,
        message: String,
        started: Value,
        finished: Value,
    },
}

impl State {
    pub(super) fn to_json(&self) -> Value {
        match self {
            State::Waiting { reason, message } => {
                json!({"waiting": {"reason": reason, "message": message}})
            }
            State::Running { started } => json!({"running": {"startedAt": started}}),
            State::Terminated {
                code,
                reason,
                message,
                started,
                finished,
            } => json!({"terminated": {
                "exitCode": code, "reason": reason, "message": message, "startedAt": started, "finishedAt": finished,
            }}),
        }
    }
}

/// The pod status the agent maintains and publishes.
pub(super) struct StatusBook {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) started: Value,
    pub(super) init: Vec<(String, String, State)>,
    pub(super) main: Vec<(String, String, State)>,
    pub(super) initialized: bool,
    pub(super) running: bool,
    pub(super) phase: &'static str,
}

impl StatusBook {
    pub(super) fn new(pod: &Pod) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let waiting = |reason: &str| State::Waiting {
            reason: reason.into(),
            message: String::new(),
        };
        let list = |containers: &[Container], reason: &str| {
            containers
                .iter()
                .map(|c| {
                    (
                        c.name.clone(),
                        c.image.clone().unwrap_or_default(),
                        waiting(reason),
                    )
                })
                .collect()
        };
        let init_containers = spec.init_containers.unwrap_or_default();
        let main_reason = if init_containers.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            started: now(),
            init: list(&init_containers, "PodInitializing"),
            main: list(&spec.containers, main_reason),
            initialized: init_containers.is_empty(),
            running: false,
            phase: "Pending",
        }
    }

    pub(super) fn set(&mut self, init: bool, name: &str, state: State) {
        let list = if init { &mut self.init } else { &mut self.main };
        if let Some(entry) = list.iter_mut().find(|(n, _, _)| n == name) {
            entry.2 = state;
        }
    }

    pub(super) fn all_zero(&self, init: bool) -> bool {
        let list = if init { &self.init } else { &self.main };
        !list
            .iter()
            .any(|(_, _, state)| matches!(state, State::Terminated { code, .. } if *code != 0))
    }

    pub(super) fn wait_all(&mut self, reason: &str, message: &str) {
        for (_, _, state) in self.init.iter_mut().chain(self.main.iter_mut()) {
            *state = State::Waiting {
                reason: reason.into(),
                message: message.into(),
            };
        }
    }

    /// The pod cannot run at all: every container is reported as failed to start, the pod as Failed.
    pub(super) fn fail_all(&mut self, reason: &str, message: &str) {
        let at = now();
        for (_, _, state) in self.init.iter_mut().chain(self.main.iter_mut()) {
            *state = State::Terminated {
                code: START_ERROR_EXIT_CODE,
                reason: reason.into(),
                message: message.into(),
                started: at.clone(),
                finished: at.clone(),
            };
        }
        self.finish();
    }

    /// Final phase once nothing runs: Succeeded only when every container ran and exited 0.
    pub(super) fn finish(&mut self) {
        self.running = false;
        let init_done = self
            .init
            .iter()
            .all(|(_, _, s)| matches!(s, State::Terminated { code: 0, .. }));
        let main_done = self
            .main
            .iter()
            .all(|(_, _, s)| matches!(s, State::Terminated { code: 0, .. }));
        self.phase = if init_done && main_done {
            "Succeeded"
        } else {
            "Failed"
        };
        // A container that never started is reported as terminated, so nothing stays "waiting" forever.
        let at = now();
        for (_, _, state) in self.init.iter_mut().chain(self.main.iter_mut()) {
            if !matches!(state, State::Terminated { .. }) {
                *state = State::Terminated {
                    code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    message: "the pod stopped before this container finished".into(),
                    started: at.clone(),
                    finished: at.clone(),
                };
            }
        }
    }

    pub(super) fn to_json(&self) -> Value {
        let phase = if self.running { "Running" } else { self.phase };
        let statuses = |list: &[(String, String, State)], ready_when_running: bool| -> Vec<Value> {
            list.iter()
                .map(|(name, image, state)| {
                    let running = matches!(state, State::Running { .. });
                    // A main container is ready while it runs; an init container once it succeeded.
                    let ready = if ready_when_running {
                        running
                    } else {
                        matches!(state, State::Terminated { code: 0, .. })
                    };
                    json!({
                        "name": name, "image": image, "imageID": "", "restartCount": 0,
                        "ready": ready, "started": running, "state": state.to_json(),
                    })
                })
                .collect()
        };
        let at = now();
        let condition = |kind: &str, ok: bool, reason: &str| {
            let mut c = json!({"type": kind, "status": if ok { "True" } else { "False" }, "lastTransitionTime": at});
            if !ok && !reason.is_empty() {
                c["reason"] = json!(reason);
            }
            c
        };
        let terminal = phase == "Succeeded" || phase == "Failed";
        let not_ready = if terminal {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        json!({"status": {
            "phase": phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.started,
            "conditions": [
                condition("PodReadyToStartContainers", !terminal, ""),
                condition("Initialized", self.initialized, "ContainersNotInitialized"),
                condition("ContainersReady", self.running, not_ready),
                condition("Ready", self.running, not_ready),
            ],
            "initContainerStatuses": statuses(&self.init, false),
            "containerStatuses": statuses(&self.main, true),
        }})
    }

    /// Writes the status; retried because a lost final status would leave the pod Running for good.
    pub(super) async fn publish(&self, api: &Api<Pod>) {
        const ATTEMPTS: u32 = 5;
        let patch = Patch::Strategic(self.to_json());
        for attempt in 1..=ATTEMPTS {
            match api
                .patch_status(&self.name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(status)) if status.is_not_found() => return,
                Err(err) if attempt == ATTEMPTS => tracing::warn!(
                    "node agent: writing the status of pod {}/{}: {err}",
                    self.namespace,
                    self.name
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(200) * attempt).await,
            }
        }
    }
}
