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
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::control_plane::tail_file;
use crate::reaper::{self, Registration};
use crate::repo_root;

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
    /// `<repo>/target/release/vissl`. Other commands run as written (looked up in `PATH`).
    pub binaries: BTreeMap<String, PathBuf>,
    /// Host environment variables every container inherits (a container's own env wins).
    pub inherit_env: Vec<String>,
    /// Node capacity and allocatable resources.
    pub capacity: BTreeMap<String, String>,
    /// How often Leases and the Ready condition are renewed.
    pub heartbeat: Duration,
}

impl Default for NodeAgentOptions {
    fn default() -> Self {
        let vissl = std::env::var_os("VISSL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/release/vissl"));
        let capacity = [
            ("cpu", "64"),
            ("memory", "256Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "100Gi"),
        ];
        Self {
            node_prefix: "vissl-test-node".into(),
            root: None,
            binaries: BTreeMap::from([("vissl".to_string(), vissl)]),
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
                    children.push((container.name, child, started));
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
            .filter_map(|(_, child, _)| child.id())
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
            .map(|(name, mut child, started)| async move {
                let status = child.wait().await;
                (name, status, started)
            })
            .collect();
        let mut kill_deadline: Option<tokio::time::Instant> = None;
        let mut stop_open = true;
        while !waits.is_empty() {
            let deadline = kill_deadline;
            tokio::select! {
                Some((name, status, started)) = waits.next() => {
                    let state = exited(status, started);
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

fn exited(status: std::io::Result<ExitStatus>, started: Value) -> State {
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
enum State {
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
    fn to_json(&self) -> Value {
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
struct StatusBook {
    namespace: String,
    name: String,
    started: Value,
    init: Vec<(String, String, State)>,
    main: Vec<(String, String, State)>,
    initialized: bool,
    running: bool,
    phase: &'static str,
}

impl StatusBook {
    fn new(pod: &Pod) -> Self {
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

    fn set(&mut self, init: bool, name: &str, state: State) {
        let list = if init { &mut self.init } else { &mut self.main };
        if let Some(entry) = list.iter_mut().find(|(n, _, _)| n == name) {
            entry.2 = state;
        }
    }

    fn all_zero(&self, init: bool) -> bool {
        let list = if init { &self.init } else { &self.main };
        !list
            .iter()
            .any(|(_, _, state)| matches!(state, State::Terminated { code, .. } if *code != 0))
    }

    fn wait_all(&mut self, reason: &str, message: &str) {
        for (_, _, state) in self.init.iter_mut().chain(self.main.iter_mut()) {
            *state = State::Waiting {
                reason: reason.into(),
                message: message.into(),
            };
        }
    }

    /// The pod cannot run at all: every container is reported as failed to start, the pod as Failed.
    fn fail_all(&mut self, reason: &str, message: &str) {
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
    fn finish(&mut self) {
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

    fn to_json(&self) -> Value {
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

    async fn publish(&self, api: &Api<Pod>) {
        let patch = Patch::Strategic(self.to_json());
        if let Err(err) = api
            .patch_status(&self.name, &PatchParams::default(), &patch)
            .await
        {
            tracing::warn!(
                "node agent: writing the status of pod {}/{}: {err}",
                self.namespace,
                self.name
            );
        }
    }
}

/// Why a pod could not be prepared: `Retry` as a kubelet retries (a ConfigMap not created yet), `Fatal`
/// for what this agent cannot do at all.
enum PrepareError {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for PrepareError {
    fn from(err: anyhow::Error) -> Self {
        PrepareError::Retry(err)
    }
}

/// A container ready to start: everything from the API resolved into local terms.
struct PreparedContainer {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    workdir: PathBuf,
    logs: PathBuf,
}

struct PreparedPod {
    init: Vec<PreparedContainer>,
    main: Vec<PreparedContainer>,
}

impl PreparedContainer {
    fn spawn(&self) -> Result<tokio::process::Child> {
        let open = |stream: &str| -> Result<fs::File> {
            let path = self.logs.join(format!("{}.{stream}", self.name));
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(open("stdout")?)
            .stderr(open("stderr")?)
            .kill_on_drop(true);
        reaper::isolate_tokio(&mut cmd);
        cmd.spawn().with_context(|| {
            format!(
                "starting container {}: {}",
                self.name,
                self.program.display()
            )
        })
    }
}

/// Fetches a ConfigMap's or Secret's data as bytes; `None` when it is absent and `optional`.
async fn source_data(
    client: &Client,
    namespace: &str,
    kind: SourceKind,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let found = match kind {
        SourceKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name)
                .await
                .with_context(|| format!("reading configmap {namespace}/{name}"))?
                .map(|cm| {
                    let mut data: BTreeMap<String, Vec<u8>> = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    data.extend(
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                    data
                })
        }
        SourceKind::Secret => {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name)
                .await
                .with_context(|| format!("reading secret {namespace}/{name}"))?
                .map(|secret| {
                    secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect()
                })
        }
    };
    match found {
        Some(data) => Ok(Some(data)),
        None if optional => Ok(None),
        None => bail!("{} {namespace}/{name} not found", kind.label()),
    }
}

#[derive(Debug, Clone, Copy)]
enum SourceKind {
    ConfigMap,
    Secret,
}

impl SourceKind {
    fn label(self) -> &'static str {
        match self {
            SourceKind::ConfigMap => "configmap",
            SourceKind::Secret => "secret",
        }
    }
}

/// Writes `data` into `dir`, all keys or only the listed `items` (key -> relative path).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[(String, String)]>,
    what: &str,
) -> Result<()> {
    let selected: Vec<(String, String)> = match items {
        Some(items) => items.to_vec(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    for (key, rel) in selected {
        let bytes = data
            .get(&key)
            .with_context(|| format!("{what} has no key {key:?}"))?;
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Materialises the pod's volumes and resolves every container, retrying as a kubelet would on missing refs.
async fn prepare(agent: &Inner, pod: &Pod, dir: &Path) -> Result<PreparedPod, PrepareError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let client = &agent.client;
    let logs = dir.join("logs");
    let work = dir.join("work");
    let tmp = dir.join("tmp");
    for folder in [&logs, &work, &tmp] {
        fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
    }

    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for volume in spec.volumes.clone().unwrap_or_default() {
        let path = dir.join("volumes").join(&volume.name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let what = format!("volume {:?} of pod {namespace}/{name}", volume.name);
        let items_of = |items: Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
            items.map(|items| {
                items
                    .into_iter()
                    .map(|i| (i.key, i.path))
                    .collect::<Vec<_>>()
            })
        };
        if let Some(source) = volume.config_map {
            if let Some(data) = source_data(
                client,
                &namespace,
                SourceKind::ConfigMap,
                &source.name,
                source.optional.unwrap_or(false),
            )
            .await?
            {
                write_keys(&path, &data, items_of(source.items).as_deref(), &what)?;
            }
        } else if let Some(source) = volume.secret {
            let secret = source.secret_name.clone().unwrap_or_default();
            if let Some(data) = source_data(
                client,
                &namespace,
                SourceKind::Secret,
                &secret,
                source.optional.unwrap_or(false),
            )
            .await?
            {
                write_keys(&path, &data, items_of(source.items).as_deref(), &what)?;
            }
        } else if volume.empty_dir.is_some() {
        } else if let Some(host) = volume.host_path {
            volumes.insert(volume.name, PathBuf::from(host.path));
            continue;
        } else if let Some(projected) = volume.projected {
            // The service-account token volume every pod gets: its ConfigMap and namespace parts are
            // materialised; the token itself is not (nothing here calls the API from inside a pod).
            for source in projected.sources.unwrap_or_default() {
                if let Some(cm) = source.config_map {
                    if let Some(data) = source_data(
                        client,
                        &namespace,
                        SourceKind::ConfigMap,
                        &cm.name,
                        cm.optional.unwrap_or(false),
                    )
                    .await?
                    {
                        write_keys(&path, &data, items_of(cm.items).as_deref(), &what)?;
                    }
                }
                if let Some(secret) = source.secret {
                    if let Some(data) = source_data(
                        client,
                        &namespace,
                        SourceKind::Secret,
                        &secret.name,
                        secret.optional.unwrap_or(false),
                    )
                    .await?
                    {
                        write_keys(&path, &data, items_of(secret.items).as_deref(), &what)?;
                    }
                }
                if let Some(downward) = source.downward_api {
                    for item in downward.items.unwrap_or_default() {
                        if let Some(field) = item.field_ref {
                            let value =
                                field_value(pod, &field.field_path).map_err(PrepareError::Fatal)?;
                            write_keys(
                                &path,
                                &BTreeMap::from([(item.path.clone(), value.into_bytes())]),
                                None,
                                &what,
                            )?;
                        }
                    }
                }
            }
        } else {
            return Err(PrepareError::Fatal(anyhow!(
                "{what}: only configMap, secret, emptyDir, hostPath and projected volumes can be run by the test node agent"
            )));
        }
        volumes.insert(volume.name, path);
    }

    let mut prepared = PreparedPod {
        init: Vec::new(),
        main: Vec::new(),
    };
    for (init, containers) in [
        (true, spec.init_containers.clone().unwrap_or_default()),
        (false, spec.containers.clone()),
    ] {
        for container in containers {
            let resolved = resolve_container(agent, pod, &container, &volumes, dir).await?;
            if init {
                prepared.init.push(resolved);
            } else {
                prepared.main.push(resolved);
            }
        }
    }
    Ok(prepared)
}

/// The value of a downward-API field path for `pod`.
fn field_value(pod: &Pod, path: &str) -> Result<String> {
    let meta = &pod.metadata;
    let labelled = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default(),
        )
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.hostIP" => POD_IP.into(),
        "status.podIPs" | "status.hostIPs" => POD_IP.into(),
        _ => labelled("metadata.labels['", &meta.labels)
            .or_else(|| labelled("metadata.annotations['", &meta.annotations))
            .with_context(|| {
                format!("fieldRef {path:?} is not supported by the test node agent")
            })?,
    };
    Ok(value)
}

/// Looks up `key` of a ConfigMap or Secret for an env var; `None` when optional and missing.
async fn key_value(
    client: &Client,
    namespace: &str,
    kind: SourceKind,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<String>> {
    let Some(data) = source_data(client, namespace, kind, name, optional).await? else {
        return Ok(None);
    };
    match data.get(key) {
        Some(bytes) => Ok(Some(String::from_utf8_lossy(bytes).into_owned())),
        None if optional => Ok(None),
        None => bail!("{} {namespace}/{name} has no key {key:?}", kind.label()),
    }
}

async fn env_var_value(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    var: &EnvVar,
) -> Result<Option<String>, PrepareError> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    if let Some(field) = &from.field_ref {
        return field_value(pod, &field.field_path)
            .map(Some)
            .map_err(PrepareError::Fatal);
    }
    if let Some(sel) = &from.config_map_key_ref {
        return Ok(key_value(
            client,
            namespace,
            SourceKind::ConfigMap,
            &sel.name,
            &sel.key,
            sel.optional.unwrap_or(false),
        )
        .await?);
    }
    if let Some(sel) = &from.secret_key_ref {
        return Ok(key_value(
            client,
            namespace,
            SourceKind::Secret,
            &sel.name,
            &sel.key,
            sel.optional.unwrap_or(false),
        )
        .await?);
    }
    Err(PrepareError::Fatal(anyhow!(
        "env {:?}: only fieldRef, configMapKeyRef and secretKeyRef are supported",
        var.name
    )))
}

/// Sets `key` in an ordered environment, replacing an earlier value.
fn set_env(env: &mut Vec<(String, String)>, key: String, value: String) {
    match env.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key, value)),
    }
}

async fn resolve_container(
    agent: &Inner,
    pod: &Pod,
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    dir: &Path,
) -> Result<PreparedContainer, PrepareError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let client = &agent.client;
    let what = format!(
        "container {:?} of pod {namespace}/{}",
        container.name,
        pod.metadata.name.clone().unwrap_or_default()
    );

    // Longest mount path first, so /etc/vissl/extra is rewritten before /etc/vissl.
    let mut mounts: Vec<(String, String)> = Vec::new();
    for mount in container.volume_mounts.clone().unwrap_or_default() {
        let base = volumes
            .get(&mount.name)
            .with_context(|| format!("{what} mounts unknown volume {:?}", mount.name))
            .map_err(PrepareError::Fatal)?;
        let local = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => base.join(sub),
            None => base.clone(),
        };
        mounts.push((
            mount.mount_path.trim_end_matches('/').to_string(),
            local.display().to_string(),
        ));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let localize = |value: &str| localize_service_host(&rewrite_mounts(value, &mounts));

    let mut env: Vec<(String, String)> = Vec::new();
    for key in &agent.opts.inherit_env {
        if let Ok(value) = std::env::var(key) {
            env.push((key.clone(), value));
        }
    }
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    set_env(&mut env, "HOSTNAME".into(), hostname);
    set_env(
        &mut env,
        "HOME".into(),
        dir.join("work").display().to_string(),
    );
    set_env(
        &mut env,
        "TMPDIR".into(),
        dir.join("tmp").display().to_string(),
    );
    for from in container.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            source_data(
                client,
                &namespace,
                SourceKind::ConfigMap,
                &r.name,
                r.optional.unwrap_or(false),
            )
            .await?
        } else if let Some(r) = &from.secret_ref {
            source_data(
                client,
                &namespace,
                SourceKind::Secret,
                &r.name,
                r.optional.unwrap_or(false),
            )
            .await?
        } else {
            None
        };
        for (key, value) in data.unwrap_or_default() {
            set_env(
                &mut env,
                format!("{prefix}{key}"),
                localize(&String::from_utf8_lossy(&value)),
            );
        }
    }
    for var in container.env.clone().unwrap_or_default() {
        if let Some(value) = env_var_value(client, pod, &namespace, &var).await? {
            let expanded = expand_refs(&value, &env);
            set_env(&mut env, var.name.clone(), localize(&expanded));
        }
    }

    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    argv.extend(container.args.clone().unwrap_or_default());
    let argv: Vec<String> = argv
        .iter()
        .map(|arg| localize(&expand_refs(arg, &env)))
        .collect();
    let Some((first, args)) = argv.split_first() else {
        return Err(PrepareError::Fatal(anyhow!(
            "{what} has no command: the test node agent cannot run an image's entrypoint"
        )));
    };
    let program = agent
        .opts
        .binaries
        .get(first)
        .cloned()
        .unwrap_or_else(|| PathBuf::from(first));
    let workdir = match container.working_dir.as_deref() {
        Some(wd) if !wd.is_empty() => PathBuf::from(rewrite_mounts(wd, &mounts)),
        _ => dir.join("work"),
    };
    Ok(PreparedContainer {
        name: container.name.clone(),
        program,
        args: args.to_vec(),
        env,
        workdir,
        logs: dir.join("logs"),
    })
}

/// Replaces each mount path (as a whole path prefix) in `value` by its local folder.
fn rewrite_mounts(value: &str, mounts: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (mount, local) in mounts {
        if mount.is_empty() {
            continue;
        }
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(mount.as_str()) {
            let after = &rest[at + mount.len()..];
            let before_ok = rest[..at].chars().last().is_none_or(|c| !is_path_char(c));
            let after_ok = after
                .chars()
                .next()
                .is_none_or(|c| c == '/' || !is_path_char(c));
            result.push_str(&rest[..at]);
            result.push_str(if before_ok && after_ok { local } else { mount });
            rest = after;
        }
        result.push_str(rest);
        out = result;
    }
    out
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// A cluster-internal service host name (`*.svc`, `*.svc.cluster.local`) becomes 127.0.0.1: every pod
/// runs on this machine.
fn localize_service_host(value: &str) -> String {
    let is_host = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && (value.ends_with(".svc") || value.ends_with(".svc.cluster.local"));
    if is_host {
        POD_IP.to_string()
    } else {
        value.to_string()
    }
}

/// Kubernetes' `$(VAR)` expansion: defined variables are substituted, `$$` escapes, others stay as written.
fn expand_refs(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_rewritten_only_as_whole_path_prefixes() {
        let mounts = vec![(
            "/etc/vissl".to_string(),
            "/tmp/p/volumes/config".to_string(),
        )];
        assert_eq!(
            rewrite_mounts("config=/etc/vissl/config.yaml", &mounts),
            "config=/tmp/p/volumes/config/config.yaml"
        );
        assert_eq!(
            rewrite_mounts("/etc/vissl", &mounts),
            "/tmp/p/volumes/config"
        );
        assert_eq!(rewrite_mounts("/etc/vissl2/x", &mounts), "/etc/vissl2/x");
        assert_eq!(
            rewrite_mounts("/data/etc/vissl", &mounts),
            "/data/etc/vissl"
        );
    }

    #[test]
    fn service_host_names_become_loopback() {
        assert_eq!(localize_service_host("job-node-0.job.ns.svc"), "127.0.0.1");
        assert_eq!(
            localize_service_host("job-node-0.job.ns.svc.cluster.local"),
            "127.0.0.1"
        );
        assert_eq!(
            localize_service_host("http://job.ns.svc:80"),
            "http://job.ns.svc:80"
        );
        assert_eq!(localize_service_host("example.com"), "example.com");
    }

    #[test]
    fn variable_references_expand_like_kubernetes() {
        let env = vec![("RANK".to_string(), "3".to_string())];
        assert_eq!(expand_refs("node-$(RANK)", &env), "node-3");
        assert_eq!(
            expand_refs("$$(RANK) $(MISSING)", &env),
            "$(RANK) $(MISSING)"
        );
        assert_eq!(expand_refs("cost $5", &env), "cost $5");
    }
}
