//! The pod status the node agent writes back, in the shape a kubelet gives it.

use std::path::Path;
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

/// At most this much of a termination message reaches the pod status (the kubelet's limit).
pub(super) const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The container's termination message, as the kubelet reads it: the file's first 4096 bytes
/// (cut back to whole UTF-8 characters); `None` when the file is missing or empty.
pub(super) fn termination_message(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let head = &bytes[..bytes.len().min(TERMINATION_MESSAGE_LIMIT)];
    let text = match std::str::from_utf8(head) {
        Ok(text) => text.to_string(),
        Err(err) => String::from_utf8_lossy(&head[..err.valid_up_to()]).into_owned(),
    };
    (!text.is_empty()).then_some(text)
}

/// Puts the termination message from `path` (if any) into a terminated state.
pub(super) fn with_termination_message(mut state: State, path: Option<&Path>) -> State {
    if let (State::Terminated { message, .. }, Some(text)) =
        (&mut state, path.and_then(termination_message))
    {
        *message = text;
    }
    state
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

#[cfg(test)]
mod tests {
    use super::*;

    fn terminated(message: &str) -> State {
        State::Terminated {
            code: 0,
            reason: "Completed".into(),
            message: message.into(),
            started: Value::Null,
            finished: Value::Null,
        }
    }

    fn message_of(state: &State) -> &str {
        match state {
            State::Terminated { message, .. } => message,
            other => panic!("a terminated state, not {other:?}"),
        }
    }

    #[test]
    fn the_termination_message_file_becomes_the_terminated_message() {
        let dir = std::env::temp_dir().join(format!("vissl-agent-msg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a folder");
        let path = dir.join("trainer");
        std::fs::write(&path, r#"{"benchmark":"knn"}"#).expect("writable");
        let state = with_termination_message(terminated(""), Some(&path));
        assert_eq!(message_of(&state), r#"{"benchmark":"knn"}"#);

        // Empty or missing: the state keeps its own message.
        std::fs::write(&path, b"").expect("writable");
        let state = with_termination_message(terminated("kept"), Some(&path));
        assert_eq!(message_of(&state), "kept");
        let state = with_termination_message(terminated("kept"), Some(&dir.join("missing")));
        assert_eq!(message_of(&state), "kept");
        let state = with_termination_message(terminated("kept"), None);
        assert_eq!(message_of(&state), "kept");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn long_messages_are_cut_at_4096_bytes_on_a_character_boundary() {
        let dir = std::env::temp_dir().join(format!("vissl-agent-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a folder");
        let path = dir.join("trainer");
        std::fs::write(&path, "x".repeat(5000)).expect("writable");
        assert_eq!(termination_message(&path).map(|m| m.len()), Some(4096));
        // 4095 ASCII bytes then a 2-byte character across the limit: the character is dropped whole.
        let text = format!("{}é and more", "y".repeat(4095));
        std::fs::write(&path, text).expect("writable");
        let cut = termination_message(&path).expect("a message");
        assert_eq!(cut.len(), 4095);
        assert!(cut.chars().all(|c| c == 'y'));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
