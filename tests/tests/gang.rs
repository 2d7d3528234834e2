//! Gang scheduling against the real control plane with the upstream PodGroup CRDs (scheduler-plugins'
//! and volcano's, from scripts/upstream-crds/fetch): the operator creates the PodGroup before any pod,
//! the pods join it, the garbage collector deletes it with the training, and a training whose PodGroup
//! CRD is not installed waits with a condition and no pods until the CRD appears.
//!
//! In most tests no gang scheduler runs, so the pods stay Pending (nothing binds pods whose
//! schedulerName is not `default-scheduler`): they check the objects and their order. The last one
//! runs scheduler-plugins' own scheduler (scripts/upstream-crds/build-scheduler) under a profile name
//! of its own and shows a 2-pod gang bind nothing while only one pod fits, and both once both fit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Api, ResourceExt};
use serde_json::json;
use vissl_crds::api::{ConditionStatus, SSLTraining};
use vissl_e2e::free_port;
use vissl_e2e::{
    apply_upstream_crd, repo_root, wait_for, NodeAgent, NodeAgentOptions, OperatorScenario,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The garbage collector needs up to ~40 s to discover a new CRD's type the first time.
const GC_TIMEOUT: Duration = Duration::from_secs(120);

fn pod_groups(group: &str, version: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: "PodGroup".into(),
        plural: "podgroups".into(),
    }
}

/// Everything one test needs: the shared harness (cluster, client, namespace, scratch folder, operator)
/// and this file's helpers.
struct Scenario(OperatorScenario);

impl std::ops::Deref for Scenario {
    type Target = OperatorScenario;

    fn deref(&self) -> &OperatorScenario {
        &self.0
    }
}

impl std::ops::DerefMut for Scenario {
    fn deref_mut(&mut self) -> &mut OperatorScenario {
        &mut self.0
    }
}

impl Scenario {
    async fn new(prefix: &str) -> Result<Self> {
        Ok(Self(OperatorScenario::start(prefix).await?))
    }

    fn groups(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, resource)
    }

    /// A 2-node training (requests 100m CPU per pod) with `scheduling`; it never gets to run here.
    async fn create_training(
        &self,
        name: &str,
        scheduling: serde_json::Value,
    ) -> Result<SSLTraining> {
        let training: SSLTraining = serde_json::from_value(json!({
            "apiVersion": "vissl.rs/v1alpha1",
            "kind": "SSLTraining",
            "metadata": {"name": name},
            "spec": {
                "numNodes": 2,
                "masterPort": free_port()?,
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                "config": {"name": "pretrain/simclr/quick_cpu_fmnist"},
                "scheduling": scheduling,
            },
        }))?;
        self.api::<SSLTraining>()
            .create(&PostParams::default(), &training)
            .await
            .with_context(|| format!("creating SSLTraining {name}"))
    }

    async fn training_pods(&self, name: &str) -> Result<Vec<Pod>> {
        let list = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&format!("vissl.rs/training={name}")))
            .await?;
        Ok(list.items)
    }

    /// Waits until condition PodGroupCreated has this status and reason.
    async fn wait_pod_group_condition(
        &self,
        name: &str,
        status: ConditionStatus,
        reason: &str,
    ) -> Result<SSLTraining> {
        let trainings = self.api::<SSLTraining>();
        wait_for(
            &format!("{name}: condition PodGroupCreated={status:?} ({reason})"),
            TIMEOUT,
            || async {
                let t = trainings.get(name).await?;
                let found = t
                    .status
                    .as_ref()
                    .and_then(|s| s.group.condition("PodGroupCreated"))
                    .map(|c| (c.status, c.reason.clone()));
                match found {
                    Some((s, r)) if s == status && r == reason => Ok(t),
                    other => bail!("PodGroupCreated is {other:?}"),
                }
            },
        )
        .await
    }
}

/// A watch starting after a list (the API server refuses a bare watch from "0" without its
/// WatchList storage feature), so every object created from now on arrives as ADDED.
async fn watch_from_now(
    api: Api<DynamicObject>,
) -> Result<futures::stream::BoxStream<'static, kube::Result<WatchEvent<DynamicObject>>>> {
    let list = api.list(&ListParams::default()).await?;
    let version = list.metadata.resource_version.unwrap_or_default();
    Ok(api.watch(&WatchParams::default(), &version).await?.boxed())
}

/// ADDED events of one namespace's PodGroups and Pods, in the order they arrived, each with the
/// object's resourceVersion at creation (etcd's revision: a global creation order).
#[derive(Clone, Default)]
struct Added(Arc<Mutex<Vec<(String, String, u64)>>>);

impl Added {
    /// Starts both watches and returns once the API server has accepted them.
    async fn watch(s: &Scenario, groups: &ApiResource) -> Result<Self> {
        let added = Added::default();
        let group_events = watch_from_now(s.groups(groups)).await?;
        let pod_events = watch_from_now(s.groups(&ApiResource::erase::<Pod>(&()))).await?;
        for (kind, stream) in [("PodGroup", group_events), ("Pod", pod_events)] {
            let sink = added.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                loop {
                    let entry = match stream.try_next().await {
                        Ok(Some(WatchEvent::Added(object))) => {
                            let rv = object
                                .metadata
                                .resource_version
                                .as_deref()
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(u64::MAX);
                            (kind.to_string(), object.name_any(), rv)
                        }
                        Ok(Some(WatchEvent::Error(e))) => {
                            (format!("{kind} watch error: {e:?}"), String::new(), 0)
                        }
                        Ok(Some(_)) => continue,
                        Ok(None) => (format!("{kind} watch ended"), String::new(), 0),
                        Err(e) => (format!("{kind} watch failed: {e}"), String::new(), 0),
                    };
                    let done = entry.2 == 0;
                    if let Ok(mut list) = sink.0.lock() {
                        list.push(entry);
                    }
                    if done {
                        break;
                    }
                }
            });
        }
        Ok(added)
    }

    fn seen(&self) -> Vec<(String, String, u64)> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// The PodGroup was created before either pod: a lower creation revision than both. Returns the
/// events in arrival order.
async fn assert_group_created_first(added: &Added) -> Result<Vec<(String, String, u64)>> {
    let seen = wait_for(
        "ADDED events of the PodGroup and both pods",
        TIMEOUT,
        || async {
            let seen = added.seen();
            ensure!(seen.len() >= 3, "{seen:?}");
            Ok(seen)
        },
    )
    .await?;
    let group_rv = seen
        .iter()
        .find(|(kind, _, _)| kind == "PodGroup")
        .map(|(_, _, rv)| *rv)
        .context("no PodGroup ADDED event")?;
    let pod_rvs: Vec<u64> = seen
        .iter()
        .filter(|(kind, _, _)| kind == "Pod")
        .map(|(_, _, rv)| *rv)
        .collect();
    assert_eq!(pod_rvs.len(), 2, "{seen:?}");
    assert!(
        pod_rvs.iter().all(|rv| *rv > group_rv),
        "creation revisions (PodGroup first): {seen:?}"
    );
    Ok(seen)
}

#[tokio::test]
async fn scheduler_plugins_pod_group_comes_first_and_goes_with_the_training() -> Result<()> {
    let s = Scenario::new("gang-sp").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    apply_upstream_crd(&s.client, "scheduling.x-k8s.io_podgroups.yaml").await?;
    let resource = pod_groups("scheduling.x-k8s.io", "v1alpha1");
    let added = Added::watch(&s, &resource).await?;

    let training = s
        .create_training(
            "sp",
            json!({"gang": "SchedulerPlugins", "scheduleTimeoutSeconds": 90}),
        )
        .await?;
    let uid = training.uid().context("the created training has no uid")?;
    let pods = wait_for("2 pods", TIMEOUT, || async {
        let pods = s.training_pods("sp").await?;
        ensure!(pods.len() == 2, "{} pod(s)", pods.len());
        Ok(pods)
    })
    .await?;
    for pod in &pods {
        assert_eq!(
            pod.labels()
                .get("scheduling.x-k8s.io/pod-group")
                .map(String::as_str),
            Some("sp"),
            "pod {} joins the PodGroup",
            pod.name_any()
        );
        assert_eq!(
            pod.spec.as_ref().and_then(|p| p.scheduler_name.as_deref()),
            Some("scheduler-plugins-scheduler")
        );
    }

    let group = s.groups(&resource).get("sp").await?;
    assert_eq!(group.data["spec"]["minMember"], 2);
    assert_eq!(
        group.data["spec"]["minResources"],
        json!({"cpu": "200m", "memory": "128Mi"})
    );
    assert_eq!(group.data["spec"]["scheduleTimeoutSeconds"], 90);
    let owner = group
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.first())
        .context("the PodGroup has no owner reference")?;
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("SSLTraining", uid.as_str(), Some(true))
    );
    s.wait_pod_group_condition("sp", ConditionStatus::True, "PodGroupApplied")
        .await?;

    let seen = assert_group_created_first(&added).await?;
    assert_eq!(seen[0].0, "PodGroup", "arrival order: {seen:?}");

    s.api::<SSLTraining>()
        .delete("sp", &DeleteParams::default())
        .await?;
    let groups = s.groups(&resource);
    wait_for(
        "the PodGroup to be garbage-collected",
        GC_TIMEOUT,
        || async {
            ensure!(
                groups.get_opt("sp").await?.is_none(),
                "PodGroup sp still exists"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn volcano_gang_waits_for_its_crd_then_creates_the_group_before_pods() -> Result<()> {
    let s = Scenario::new("gang-volcano").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    // Nothing in this test binary installs volcano's CRD before this point.
    let resource = pod_groups("scheduling.volcano.sh", "v1beta1");
    s.create_training("vc", json!({"gang": "Volcano", "queue": "research"}))
        .await?;

    let held = s
        .wait_pod_group_condition("vc", ConditionStatus::False, "PodGroupUnavailable")
        .await?;
    let message = held
        .status
        .as_ref()
        .and_then(|st| st.group.condition("PodGroupCreated"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("podgroups.scheduling.volcano.sh") && message.contains("install volcano"),
        "{message}"
    );
    let events: Api<Event> = s.api();
    let warnings = events.list(&ListParams::default()).await?;
    assert!(
        warnings
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("PodGroupUnavailable")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("vc")),
        "a PodGroupUnavailable Warning Event about vc"
    );
    // Held back: no pod and none of the group's other children.
    assert_eq!(s.training_pods("vc").await?.len(), 0);
    assert!(s.api::<Service>().get_opt("vc").await?.is_none());
    assert!(s.api::<ConfigMap>().get_opt("vc-config").await?.is_none());

    // Once the CRD is installed the operator's retry (every 30 s) creates the PodGroup, then the pods.
    apply_upstream_crd(&s.client, "scheduling.volcano.sh_podgroups.yaml").await?;
    let added = Added::watch(&s, &resource).await?;
    let pods = wait_for("2 pods after the CRD appeared", TIMEOUT, || async {
        let pods = s.training_pods("vc").await?;
        ensure!(pods.len() == 2, "{} pod(s)", pods.len());
        Ok(pods)
    })
    .await?;
    for pod in &pods {
        assert_eq!(
            pod.annotations()
                .get("scheduling.k8s.io/group-name")
                .map(String::as_str),
            Some("vc"),
            "pod {} joins the PodGroup",
            pod.name_any()
        );
        assert_eq!(
            pod.spec.as_ref().and_then(|p| p.scheduler_name.as_deref()),
            Some("volcano")
        );
    }
    let group = s.groups(&resource).get("vc").await?;
    assert_eq!(group.data["spec"]["minMember"], 2);
    assert_eq!(group.data["spec"]["queue"], "research");
    assert_eq!(
        group.data["spec"]["minResources"],
        json!({"cpu": "200m", "memory": "128Mi"})
    );
    s.wait_pod_group_condition("vc", ConditionStatus::True, "PodGroupApplied")
        .await?;
    assert_group_created_first(&added).await?;
    Ok(())
}

#[tokio::test]
async fn the_api_server_refuses_settings_of_another_gang() -> Result<()> {
    let s = Scenario::new("gang-cel").await?;
    for (scheduling, message) in [
        (
            json!({"gang": "SchedulerPlugins", "queue": "research"}),
            "scheduling.queue is a volcano queue",
        ),
        (
            json!({"gang": "Volcano", "scheduleTimeoutSeconds": 60}),
            "scheduling.scheduleTimeoutSeconds is scheduler-plugins' PodGroup timeout",
        ),
        (
            json!({"schedulerName": "volcano"}),
            "scheduling.schedulerName and scheduling.minResources belong to a gang",
        ),
        (
            json!({"minResources": {"cpu": "4"}}),
            "scheduling.schedulerName and scheduling.minResources belong to a gang",
        ),
    ] {
        let refused = s.create_training("nonsense", scheduling.clone()).await;
        let error = match refused {
            Ok(_) => bail!("the API server accepted scheduling {scheduling}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            error.contains(message) && error.contains("422"),
            "scheduling {scheduling}: {error}"
        );
    }
    // Each gang's own settings pass.
    s.create_training(
        "fine",
        json!({"gang": "Volcano", "queue": "research", "schedulerName": "volcano",
               "minResources": {"cpu": "4"}}),
    )
    .await?;
    Ok(())
}

/// A process killed (SIGKILL) and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// scheduler-plugins' kube-scheduler, built by scripts/upstream-crds/build-scheduler.
fn coscheduling_scheduler_binary() -> Result<std::path::PathBuf> {
    let script = repo_root().join("scripts/upstream-crds/build-scheduler");
    let out = std::process::Command::new(&script)
        .arg("--print-bin")
        .output()
        .with_context(|| format!("running {} --print-bin", script.display()))?;
    let binary = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ensure!(
        out.status.success() && binary.is_file(),
        "scheduler-plugins' scheduler is missing ({}): run scripts/setup (or scripts/upstream-crds/build-scheduler)",
        binary.display()
    );
    Ok(binary)
}

/// The extended resource each gang pod requests once; a node offering one fits one pod.
const SLOT: &str = "vissl.rs/gang-slot";
/// The scheduler profile of this test only, so no other test's pods are placed by it.
const COSCHEDULER: &str = "vissl-test-coscheduling";

fn slot_nodes(prefix: &str) -> NodeAgentOptions {
    let mut options = NodeAgentOptions {
        node_prefix: prefix.into(),
        ..NodeAgentOptions::default()
    };
    options.capacity.insert(SLOT.into(), "1".into());
    options
}

#[tokio::test]
async fn coscheduling_binds_a_gang_only_when_all_of_it_fits() -> Result<()> {
    let binary = coscheduling_scheduler_binary()?;
    let s = Scenario::new("gang-fit").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    apply_upstream_crd(&s.client, "scheduling.x-k8s.io_podgroups.yaml").await?;

    let dir = tempfile::tempdir()?;
    let kubeconfig = s.cluster.control_plane.kubeconfig_path();
    let config = dir.path().join("scheduler.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection: {{leaderElect: false}}
clientConnection: {{kubeconfig: \"{}\"}}
profiles:
- schedulerName: {COSCHEDULER}
  plugins:
    multiPoint: {{enabled: [{{name: Coscheduling}}]}}
    queueSort: {{enabled: [{{name: Coscheduling}}], disabled: [{{name: \"*\"}}]}}
  pluginConfig:
  - name: Coscheduling
    args: {{permitWaitingTimeSeconds: 10}}
",
            kubeconfig.display()
        ),
    )?;
    let log = dir.path().join("scheduler.log");
    let out = std::fs::File::create(&log)?;
    let _scheduler = KillOnDrop(
        std::process::Command::new(&binary)
            .arg(format!("--config={}", config.display()))
            .arg(format!(
                "--authentication-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg(format!(
                "--authorization-kubeconfig={}",
                kubeconfig.display()
            ))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={}", free_port()?))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?,
    );
    let scheduler_log = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };

    // Room for one pod of the gang: one node offering one slot.
    let _first = NodeAgent::start(s.client.clone(), 1, slot_nodes("gang-fit-a")).await?;
    // One slot and a little CPU per pod. minResources names only the CPU, so the plugin's up-front
    // check passes and the all-or-nothing decision is the Permit stage's (pods wait there for the
    // whole group; a lone pod is rejected after permitWaitingTimeSeconds instead of being bound).
    let per_pod = json!({SLOT: "1", "cpu": "100m"});
    let mut training: SSLTraining = serde_json::from_value(json!({
        "apiVersion": "vissl.rs/v1alpha1",
        "kind": "SSLTraining",
        "metadata": {"name": "fit"},
        "spec": {
            "numNodes": 2,
            "masterPort": free_port()?,
            "resources": {"requests": per_pod, "limits": per_pod},
            "config": {"name": "pretrain/simclr/quick_cpu_fmnist"},
            "scheduling": {"gang": "SchedulerPlugins", "schedulerName": COSCHEDULER,
                           "minResources": {"cpu": "200m"}},
        },
    }))?;
    training = s
        .api::<SSLTraining>()
        .create(&PostParams::default(), &training)
        .await?;
    wait_for("2 pods", TIMEOUT, || async {
        let n = s.training_pods("fit").await?.len();
        ensure!(n == 2, "{n} pod(s)");
        Ok(())
    })
    .await?;
    // Twice the scheduler's permit wait: a partial gang would have been bound by now.
    let bound = |pods: &[Pod]| -> Vec<String> {
        pods.iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect()
    };
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        let pods = s.training_pods("fit").await?;
        let nodes = bound(&pods);
        assert!(
            nodes.is_empty(),
            "a gang that does not fit bound pods to {nodes:?}\n{}",
            scheduler_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Room for the whole gang: a second one-slot node. Both pods bind, one per node.
    let _second = NodeAgent::start(s.client.clone(), 1, slot_nodes("gang-fit-b")).await?;
    let nodes = wait_for("both pods to be bound", Duration::from_secs(90), || async {
        let mut nodes = bound(&s.training_pods("fit").await?);
        ensure!(nodes.len() == 2, "bound to {nodes:?}\n{}", scheduler_log());
        nodes.sort();
        Ok(nodes)
    })
    .await?;
    assert_eq!(nodes, vec!["gang-fit-a-0", "gang-fit-b-0"]);
    s.api::<SSLTraining>()
        .delete(&training.name_any(), &DeleteParams::default())
        .await?;
    Ok(())
}
