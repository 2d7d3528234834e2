//! The test node agent: plays the kubelet for pods bound to its Nodes by running them as local processes.
//!
//! It registers Nodes `vissl-test-node-<j>` (Ready, with capacity) and keeps their Leases fresh; the real
//! kube-scheduler binds pods to them. For each bound pod it materialises ConfigMap/Secret/emptyDir volumes
//! in a per-pod folder, resolves the environment, runs the init containers in order and then the main
//! containers, and writes the pod status back as a kubelet would. What a container image would provide is
//! replaced by local paths: see [`NodeAgentOptions::binaries`] and the mount-path rewriting in `prepare`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod images;
mod prepare;
mod service_account;
mod status;

use self::prepare::{prepare, PrepareError, PreparedContainer, PreparedPod};
use self::status::{exited, with_termination_message, State, StatusBook};
use crate::control_plane::tail_file;
use crate::reaper::{self, Registration};

const FIELD_MANAGER: &str = "vissl-test-node-agent";
/// The address every pod gets: all "nodes" are this machine.
const POD_IP: &str = "127.0.0.1";
/// Exit code reported when a container's command cannot be started (containerd reports the same).
const START_ERROR_EXIT_CODE: i32 = 128;

/// How the agent runs pods; [`Default`] suits the end-to-end tests.
#[derive(Debug, Clone)]
pub struct NodeAgentOptions {
    /// Node names are `<node_prefix>-<j>`.
    pub node_prefix: String,
    /// Where pod folders go; a temp folder (removed with the agent) when `None`.
    pub root: Option<PathBuf>,
    /// `command[0]` values replaced by a local binary; by default `vissl` maps to `$VISSL_BIN`, else
    /// `<repo>/target/release/vissl`, and the operator image's `/vissl-operator` to `$VISSL_OPERATOR_BIN`,
    /// else `<repo>/target/release/vissl-operator`. Other commands run as written (looked up in `PATH`).
    pub binaries: BTreeMap<String, PathBuf>,
    /// Host environment variables every container inherits (a container's own env wins).
    pub inherit_env: Vec<String>,
    /// Node capacity and allocatable resources.
    pub capacity: BTreeMap<String, String>,
    /// How often Leases and the Ready condition are renewed.
    pub heartbeat: Duration,
    /// The API server as containers see it (`KUBERNETES_SERVICE_HOST`/`_PORT`); unset when `None`.
    pub api_server: Option<SocketAddr>,
}

impl Default for NodeAgentOptions {
    fn default() -> Self {
        let capacity = [
            ("cpu", "64"),
            ("memory", "256Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "100Gi"),
        ];
        Self {
            node_prefix: "vissl-test-node".into(),
            root: None,
            binaries: images::default_binaries(),
            inherit_env: [
                "PATH",
                "LD_LIBRARY_PATH",
                "LIBTORCH",
                "RUST_BACKTRACE",
                "RUST_LOG",
            ]
            .map(String::from)
            .to_vec(),
            capacity: capacity
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            heartbeat: Duration::from_secs(3),
            api_server: None,
        }
    }
}

/// What a pod's task is asked to do besides running.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    Run,
    /// The pod got a deletion timestamp: SIGTERM, SIGKILL after the grace period, final status, delete.
    Delete {
        grace: Duration,
    },
    /// The pod is gone from the API: kill at once, write nothing.
    Gone,
    /// Its node failed: kill at once, write nothing (a dead kubelet reports nothing).
    Lost,
}

/// A pod the agent has taken on.
struct PodRun {
    namespace: String,
    name: String,
    node: String,
    dir: PathBuf,
    /// Larger for newer pods, so a recreated pod of the same name wins lookups.
    seq: u64,
    stop: watch::Sender<Stop>,
    /// Pids (= process groups) of the containers running now.
    processes: Vec<u32>,
    task: Option<JoinHandle<()>>,
}

struct Inner {
    client: Client,
    nodes: Vec<String>,
    lost: Mutex<BTreeSet<String>>,
    root: PathBuf,
    opts: NodeAgentOptions,
    pods: Mutex<HashMap<String, PodRun>>,
    next_seq: Mutex<u64>,
}

/// The running agent; dropping it kills every pod process it started.
pub struct NodeAgent {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
    runtime: tokio::runtime::Handle,
    _root_reap: Option<Registration>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null)
}

impl NodeAgent {
    /// Registers `nodes` Ready nodes and starts serving the pods bound to them, on the current tokio runtime
    /// (which must outlive the agent).
    pub async fn start(client: Client, nodes: usize, opts: NodeAgentOptions) -> Result<Self> {
        let (root, root_reap) = match &opts.root {
            Some(root) => (root.clone(), None),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("vissl-node-agent-")
                    .tempdir()
                    .context("creating the node agent's temp folder")?;
                let root = temp.keep();
                (root.clone(), Some(reaper::track_dir(root)))
            }
        };
        let inner = Arc::new(Inner {
            client,
            nodes: (0..nodes)
                .map(|j| format!("{}-{j}", opts.node_prefix))
                .collect(),
            lost: Mutex::new(BTreeSet::new()),
            root,
            opts,
            pods: Mutex::new(HashMap::new()),
            next_seq: Mutex::new(0),
        });
        for node in &inner.nodes {
            inner.register_node(node).await?;
        }
        let tasks = vec![
            tokio::spawn(inner.clone().watch_pods()),
            tokio::spawn(inner.clone().heartbeats()),
        ];
        Ok(Self {
            inner,
            tasks,
            runtime: tokio::runtime::Handle::current(),
            _root_reap: root_reap,
        })
    }

    /// The names of the Nodes this agent registered, index `j` = node `j`.
    pub fn node_names(&self) -> &[String] {
        &self.inner.nodes
    }

    /// The folder holding each pod's volumes and logs.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The pid (also the process group) of the container process now running for pod `namespace/pod`.
    pub fn pid_of(&self, namespace: &str, pod: &str) -> Option<u32> {
        self.inner
            .with_latest(namespace, pod, |run| run.processes.first().copied())
            .flatten()
    }

    /// Sends `signal` to the process groups of pod `namespace/pod`'s running containers, as if it crashed
    /// or was killed; the agent then reports the exit like any other (e.g. exit code 137 for SIGKILL).
    pub fn kill(&self, namespace: &str, pod: &str, signal: i32) -> Result<()> {
        let groups = self
            .inner
            .with_latest(namespace, pod, |run| run.processes.clone())
            .unwrap_or_default();
        if groups.is_empty() {
            bail!("pod {namespace}/{pod} has no running process on this agent");
        }
        for group in groups {
            reaper::signal_group(group as i32, signal);
        }
        Ok(())
    }

    /// Simulates losing node `j`: its processes are killed without any status report, its heartbeats stop
    /// and the Node is deleted. Its pods then go the way of pods on a vanished node: the controller
    /// manager's pod garbage collector marks them Failed and deletes them (about 40-60 s).
    pub async fn fail_node(&self, j: usize) -> Result<()> {
        let node =
            self.inner.nodes.get(j).with_context(|| {
                format!("no node {j}: the agent has {}", self.inner.nodes.len())
            })?;
        lock(&self.inner.lost).insert(node.clone());
        for run in lock(&self.inner.pods)
            .values()
            .filter(|run| &run.node == node)
        {
            run.stop.send_replace(Stop::Lost);
        }
        // Run the request on the agent's runtime: its client belongs there.
        let inner = self.inner.clone();
        let name = node.clone();
        self.runtime
            .spawn(async move {
                let nodes: Api<Node> = Api::all(inner.client.clone());
                nodes
                    .delete(&name, &DeleteParams::default())
                    .await
                    .map(|_| ())
            })
            .await
            .context("the node agent's runtime is gone")?
            .with_context(|| format!("deleting node {node}"))
    }

    /// The last `lines` lines of each container's stdout and stderr of pod `namespace/pod` (newest pod of
    /// that name), for failure messages.
    pub fn pod_logs(&self, namespace: &str, pod: &str, lines: usize) -> String {
        match self
            .inner
            .with_latest(namespace, pod, |run| run.dir.clone())
        {
            Some(dir) => logs_of(&dir, lines),
            None => format!("(pod {namespace}/{pod} never ran on this agent)\n"),
        }
    }

    /// The whole stdout of container `container` of pod `namespace/pod` (newest pod of that name).
    pub fn container_stdout(&self, namespace: &str, pod: &str, container: &str) -> Result<String> {
        let dir = self
            .inner
            .with_latest(namespace, pod, |run| run.dir.clone())
            .with_context(|| format!("pod {namespace}/{pod} never ran on this agent"))?;
        let path = dir.join("logs").join(format!("{container}.stdout"));
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// [`NodeAgent::pod_logs`] for every pod this agent ran in `namespace`, oldest first.
    pub fn namespace_logs(&self, namespace: &str, lines: usize) -> String {
        let mut runs: Vec<(u64, String, PathBuf)> = lock(&self.inner.pods)
            .values()
            .filter(|run| run.namespace == namespace)
            .map(|run| (run.seq, run.name.clone(), run.dir.clone()))
            .collect();
        runs.sort();
        let mut out = String::new();
        for (_, name, dir) in runs {
            let _ = write!(
                out,
                "=== pod {namespace}/{name} ({}) ===\n{}",
                dir.display(),
                logs_of(&dir, lines)
            );
        }
        out
    }
}

fn logs_of(dir: &Path, lines: usize) -> String {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join("logs"))
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = String::new();
    for file in files {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = writeln!(out, "--- {name} ---\n{}", tail_file(&file, lines));
    }
    out
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for run in lock(&self.inner.pods).values_mut() {
            if let Some(task) = run.task.take() {
                task.abort();
            }
            for &pid in &run.processes {
                reaper::signal_group(pid as i32, libc::SIGKILL);
            }
        }
        if self.inner.opts.root.is_none() {
            let _ = fs::remove_dir_all(&self.inner.root);
        }
    }
}

impl Inner {
    fn with_latest<T>(
        &self,
        namespace: &str,
        pod: &str,
        f: impl FnOnce(&PodRun) -> T,
    ) -> Option<T> {
        let pods = lock(&self.pods);
        pods.values()
            .filter(|run| run.namespace == namespace && run.name == pod)
            .max_by_key(|run| run.seq)
            .map(f)
    }

    fn node_json(&self, node: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "labels": {
                    "kubernetes.io/hostname": node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                },
            },
        })
    }

    fn node_status_json(&self, node: &str) -> Value {
        let beat = now();
        let condition = |kind: &str, status: &str, reason: &str| {
            json!({"type": kind, "status": status, "reason": reason, "message": "vissl test node agent",
                   "lastHeartbeatTime": beat, "lastTransitionTime": beat})
        };
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node},
            "status": {
                "capacity": self.opts.capacity,
                "allocatable": self.opts.capacity,
                "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": node}],
                "conditions": [
                    condition("Ready", "True", "KubeletReady"),
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
                "nodeInfo": {
                    "machineID": node, "systemUUID": node, "bootID": node, "kernelVersion": "",
                    "osImage": "vissl test node agent", "containerRuntimeVersion": "local-process://0",
                    "kubeletVersion": "v1.36.3", "kubeProxyVersion": "", "operatingSystem": "linux",
                    "architecture": std::env::consts::ARCH,
                },
            },
        })
    }

    async fn register_node(&self, node: &str) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        nodes
            .patch(node, &apply, &Patch::Apply(self.node_json(node)))
            .await
            .with_context(|| format!("registering node {node}"))?;
        self.report_node(node).await
    }

    /// Renews node `node`'s Lease and Ready condition (status apply also creates what is missing).
    async fn report_node(&self, node: &str) -> Result<()> {
        let apply = PatchParams::apply(FIELD_MANAGER).force();
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .patch_status(node, &apply, &Patch::Apply(self.node_status_json(node)))
            .await
            .with_context(|| format!("writing node {node}'s status"))?;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let renew = serde_json::to_value(MicroTime(Timestamp::now())).unwrap_or(Value::Null);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": renew},
        });
        leases
            .patch(node, &apply, &Patch::Apply(lease))
            .await
            .with_context(|| format!("renewing node {node}'s lease"))?;
        Ok(())
    }

    async fn heartbeats(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.opts.heartbeat).await;
            let lost = lock(&self.lost).clone();
            for node in self.nodes.iter().filter(|node| !lost.contains(*node)) {
                if let Err(err) = self.report_node(node).await {
                    tracing::warn!("node agent heartbeat: {err:#}");
                }
            }
        }
    }

    async fn watch_pods(self: Arc<Self>) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let mut events = watcher::watcher(pods, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Apply(pod) | Event::InitApply(pod)) => self.observe(pod),
                Ok(Event::Delete(pod)) => self.forget(&pod),
                Ok(Event::Init | Event::InitDone) => {}
                Err(err) => tracing::warn!("node agent pod watch: {err}"),
            }
        }
    }

    /// Takes on a newly bound pod, or passes a deletion request to the pod's task.
    fn observe(self: &Arc<Self>, pod: Pod) {
        let Some(node) = pod.spec.as_ref().and_then(|spec| spec.node_name.clone()) else {
            return;
        };
        if !self.nodes.contains(&node) || lock(&self.lost).contains(&node) {
            return;
        }
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let grace = Duration::from_secs(
            pod.metadata
                .deletion_grace_period_seconds
                .unwrap_or(0)
                .max(0) as u64,
        );
        let mut pods = lock(&self.pods);
        if let Some(run) = pods.get(&uid) {
            if deleting {
                run.stop.send_if_modified(|stop| {
                    let first = *stop == Stop::Run;
                    if first {
                        *stop = Stop::Delete { grace };
                    }
                    first
                });
            }
            return;
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            .unwrap_or("Pending");
        if phase == "Succeeded" || phase == "Failed" {
            // Finished before this agent started (the API server deletes terminal pods without us).
            return;
        }
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let seq = {
            let mut next = lock(&self.next_seq);
            *next += 1;
            *next
        };
        let dir = self
            .root
            .join(&namespace)
            .join(format!("{name}-{}", &uid[..uid.len().min(8)]));
        let (stop, stop_rx) = watch::channel(if deleting {
            Stop::Delete { grace }
        } else {
            Stop::Run
        });
        let task = tokio::spawn(self.clone().run_pod(pod, uid.clone(), dir.clone(), stop_rx));
        pods.insert(
            uid,
            PodRun {
                namespace,
                name,
                node,
                dir,
                seq,
                stop,
                processes: Vec::new(),
                task: Some(task),
            },
        );
    }

    fn forget(&self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return;
        };
        if let Some(run) = lock(&self.pods).get_mut(uid) {
            run.stop.send_if_modified(|stop| {
                let changed = !matches!(*stop, Stop::Gone | Stop::Lost);
                if changed {
                    *stop = Stop::Gone;
                }
                changed
            });
            run.task = None;
        }
    }

    fn set_processes(&self, uid: &str, processes: Vec<u32>) {
        if let Some(run) = lock(&self.pods).get_mut(uid) {
            run.processes = processes;
        }
    }

    async fn run_pod(
        self: Arc<Self>,
        pod: Pod,
        uid: String,
        dir: PathBuf,
        mut stop: watch::Receiver<Stop>,
    ) {
        let mut book = StatusBook::new(&pod);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), book.namespace.as_str());
        book.publish(&api).await;
        let prepared = loop {
            if *stop.borrow() != Stop::Run {
                break None;
            }
            match prepare(&self, &pod, &dir).await {
                Ok(prepared) => break Some(prepared),
                Err(PrepareError::Fatal(err)) => {
                    book.fail_all("UnsupportedPodSpec", &format!("{err:#}"));
                    book.publish(&api).await;
                    return;
                }
                Err(PrepareError::Retry(err)) => {
                    book.wait_all("CreateContainerConfigError", &format!("{err:#}"));
                    book.publish(&api).await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), stop.changed()).await;
                }
            }
        };
        if let Some(PreparedPod { init, main }) = prepared {
            let mut ok = true;
            for container in init {
                let outcome = self
                    .run_group(&uid, &mut book, &api, vec![container], true, &mut stop)
                    .await;
                if !outcome.all_zero || outcome.stopped {
                    ok = false;
                    break;
                }
            }
            if ok {
                book.initialized = true;
                self.run_group(&uid, &mut book, &api, main, false, &mut stop)
                    .await;
            }
        }
        let stop_now = *stop.borrow();
        match stop_now {
            Stop::Gone | Stop::Lost => {}
            Stop::Run | Stop::Delete { .. } => {
                book.finish();
                book.publish(&api).await;
            }
        }
        if let Stop::Delete { .. } = stop_now {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            if let Err(err) = api.delete(&book.name, &params).await {
                tracing::warn!(
                    "node agent: deleting pod {}/{}: {err}",
                    book.namespace,
                    book.name
                );
            }
        }
    }

    /// Runs `containers` together until all exit or the pod is stopped, keeping `book` and the API current.
    async fn run_group(
        &self,
        uid: &str,
        book: &mut StatusBook,
        api: &Api<Pod>,
        containers: Vec<PreparedContainer>,
        init: bool,
        stop: &mut watch::Receiver<Stop>,
    ) -> GroupOutcome {
        let mut children = Vec::new();
        for container in containers {
            let started = now();
            match container.spawn() {
                Ok(child) => {
                    book.set(
                        init,
                        &container.name,
                        State::Running {
                            started: started.clone(),
                        },
                    );
                    children.push((
                        container.name,
                        child,
                        started,
                        container.termination_message,
                    ));
                }
                Err(err) => book.set(
                    init,
                    &container.name,
                    State::Terminated {
                        code: START_ERROR_EXIT_CODE,
                        reason: "StartError".into(),
                        message: format!("{err:#}"),
                        started: started.clone(),
                        finished: started,
                    },
                ),
            }
        }
        let mut outcome = GroupOutcome {
            all_zero: book.all_zero(init),
            stopped: false,
        };
        let processes: Vec<u32> = children
            .iter()
            .filter_map(|(_, child, _, _)| child.id())
            .collect();
        let groups: Vec<i32> = processes.iter().map(|&pid| pid as i32).collect();
        let _reaps: Vec<Registration> = groups.iter().map(|&g| reaper::track_group(g)).collect();
        self.set_processes(uid, processes);
        if !children.is_empty() {
            if !init {
                book.running = true;
            }
            book.publish(api).await;
        }

        let mut waits: FuturesUnordered<_> = children
            .into_iter()
            .map(|(name, mut child, started, message)| async move {
                let status = child.wait().await;
                (name, status, started, message)
            })
            .collect();
        let mut kill_deadline: Option<tokio::time::Instant> = None;
        let mut stop_open = true;
        while !waits.is_empty() {
            let deadline = kill_deadline;
            tokio::select! {
                Some((name, status, started, message)) = waits.next() => {
                    let state = with_termination_message(exited(status, started), message.as_deref());
                    if !matches!(state, State::Terminated { code: 0, .. }) {
                        outcome.all_zero = false;
                    }
                    book.set(init, &name, state);
                    if !init && !waits.is_empty() {
                        book.publish(api).await;
                    }
                }
                changed = stop.changed(), if stop_open => {
                    if changed.is_err() {
                        stop_open = false;
                        continue;
                    }
                    let request = *stop.borrow();
                    outcome.stopped |= request != Stop::Run;
                    match request {
                        Stop::Run => {}
                        Stop::Delete { grace } => {
                            groups.iter().for_each(|&g| reaper::signal_group(g, libc::SIGTERM));
                            kill_deadline = Some(tokio::time::Instant::now() + grace);
                        }
                        Stop::Gone | Stop::Lost => groups.iter().for_each(|&g| reaper::signal_group(g, libc::SIGKILL)),
                    }
                }
                _ = async move {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    groups.iter().for_each(|&g| reaper::signal_group(g, libc::SIGKILL));
                    kill_deadline = None;
                }
            }
        }
        // The leaders are gone; nothing they started may linger.
        for &group in &groups {
            if reaper::group_alive(group) {
                reaper::signal_group(group, libc::SIGKILL);
            }
        }
        self.set_processes(uid, Vec::new());
        outcome
    }
}

struct GroupOutcome {
    all_zero: bool,
    stopped: bool,
}
