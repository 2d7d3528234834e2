//! The operator against a real control plane (etcd, kube-apiserver, controller-manager, scheduler) with the
//! test node agent running each pod as a local `vissl` process: real 2-node CPU trainings over Gloo, a pod
//! killed mid-run, retry budgets, permanent errors, suspension, deletion and an operator restart.
//!
//! Each test runs its own `vissl-operator` process scoped to its own namespace, so tests do not see each
//! other's objects; trainings take a lock so that at most one trains at a time on the 2-core machine.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use vissl_crds::api::{Phase, SSLTraining};
use vissl_e2e::{free_port, http, wait_for, Operator, OperatorScenario, S3Server};

/// Trainings run one at a time: two 2-process trainings at once would only slow each other down.
static TRAINING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

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

    fn trainings(&self) -> Api<SSLTraining> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A 2-node x 1-process SimCLR training of the quickstart model on `images` Fashion-MNIST images per
    /// epoch, checkpointing every 4 steps into a local folder; `spec` is merged over it.
    async fn create_training(
        &self,
        name: &str,
        images: u32,
        epochs: u32,
        extra_overrides: &[&str],
        spec: serde_json::Value,
    ) -> Result<(SSLTraining, u16)> {
        let status_port = free_port()?;
        let checkpoints = self.dir.path().join(format!("{name}-checkpoints"));
        let mut overrides = vec![
            format!("config.DATA.TRAIN.DATA_LIMIT={images}"),
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64".into(),
            format!("config.OPTIMIZER.num_epochs={epochs}"),
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=4".into(),
            "config.LOG_FREQUENCY=4".into(),
            format!("config.HOOKS.PROMETHEUS_SETUP.PORT={status_port}"),
        ];
        overrides.extend(extra_overrides.iter().map(|s| s.to_string()));
        let mut training = json!({
            "apiVersion": "vissl.rs/v1alpha1",
            "kind": "SSLTraining",
            "metadata": {"name": name},
            "spec": {
                "numNodes": 2,
                "procsPerNode": 1,
                "masterPort": free_port()?,
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "config": {"name": "pretrain/simclr/quick_cpu_fmnist", "overrides": overrides},
                "checkpoint": {"url": checkpoints.to_string_lossy()},
                "runPolicy": {"backoffLimit": 2},
            },
        });
        merge(&mut training["spec"], &spec);
        let training: SSLTraining = serde_json::from_value(training)?;
        let created = self
            .trainings()
            .create(&PostParams::default(), &training)
            .await
            .with_context(|| format!("creating SSLTraining {name}"))?;
        Ok((created, status_port))
    }

    /// Waits until the training reaches `want`; a training that fails instead ends the wait at once.
    async fn wait_phase(&self, name: &str, want: Phase, timeout: Duration) -> Result<SSLTraining> {
        let trainings = self.trainings();
        let outcome = wait_for(
            &format!("SSLTraining {name} to be {want:?}"),
            timeout,
            || async {
                let t = trainings.get(name).await?;
                match t.status.as_ref().map(|s| s.group.phase) {
                    Some(p) if p == want => Ok(Ok(t)),
                    Some(Phase::Failed) => Ok(Err(anyhow!(
                        "SSLTraining {name} failed while waiting for {want:?}: {:#?}",
                        t.status
                    ))),
                    other => bail!("phase {other:?}, status {:?}", t.status),
                }
            },
        )
        .await?;
        outcome
    }

    /// The trainer's own `/status` (rank 0, served on the port the config sets).
    async fn trainer_status(port: u16) -> Result<serde_json::Value> {
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let (code, body) =
            tokio::task::spawn_blocking(move || http(address, "GET", "/status")).await??;
        ensure!(code == 200, "/status answered {code}");
        Ok(serde_json::from_str(&body)?)
    }

    async fn group_pods(&self, name: &str) -> Result<Vec<Pod>> {
        Ok(self
            .pods()
            .list(&ListParams::default().labels(&format!("vissl.rs/training={name}")))
            .await?
            .items)
    }

    async fn events(&self) -> Result<Vec<Event>> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(events.list(&ListParams::default()).await?.items)
    }

    async fn has_event(&self, reason: &str) -> Result<bool> {
        Ok(self
            .events()
            .await?
            .iter()
            .any(|e| e.reason.as_deref() == Some(reason)))
    }
}

fn merge(base: &mut serde_json::Value, extra: &serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

fn condition<'a>(t: &'a SSLTraining, type_: &str) -> Option<&'a vissl_crds::api::Condition> {
    t.status
        .as_ref()?
        .group
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

#[tokio::test]
async fn two_node_training_succeeds_with_progress_and_s3_checkpoint() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let s = Scenario::new("happy").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    let s3 = S3Server::start("ckpt").await?;
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.namespace);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "store"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": format!("http://{}", s3.address), "AWS_ALLOW_HTTP": "true",
        },
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    let (_, status_port) = s
        .create_training(
            "simclr",
            4096,
            3,
            &[],
            json!({"checkpoint": {"url": "s3://ckpt/runs/simclr", "credentialsSecret": "store"}}),
        )
        .await?;

    // The pod contract, as the operator wrote it.
    let pods = wait_for("two pods", Duration::from_secs(60), || async {
        let pods = s.group_pods("simclr").await?;
        ensure!(pods.len() == 2, "{} pods", pods.len());
        Ok(pods)
    })
    .await?;
    let node0 = pods
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("simclr-node-0"))
        .context("no pod simclr-node-0")?;
    let spec = node0.spec.as_ref().context("pod without spec")?;
    let env: Vec<(String, String)> = spec.containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(
        get("MASTER_ADDR"),
        Some(format!("simclr-node-0.simclr.{}.svc", s.namespace).as_str())
    );
    assert_eq!(get("NUM_NODES"), Some("2"));
    assert_eq!(get("NODE_RANK"), Some("0"));
    assert_eq!(get("WORLD_SIZE"), Some("2"));
    assert!(spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()));

    // Progress while it runs, read by the operator from rank 0.
    let trainings = s.trainings();
    let running = wait_for("progress in status", RUN_TIMEOUT, || async {
        let t = trainings.get("simclr").await?;
        let progress = t.status.as_ref().and_then(|s| s.progress.clone());
        match progress {
            Some(p) if p.iteration > 0 => Ok(t),
            _ => bail!("status {:?}", t.status),
        }
    })
    .await?;
    let progress = running
        .status
        .as_ref()
        .and_then(|s| s.progress.clone())
        .unwrap();
    assert_eq!(progress.num_epochs, 3);
    // 4096 images over 2 ranks in batches of 64 per rank, 3 epochs.
    assert_eq!(progress.total_iterations, 3 * 4096 / 2 / 64);
    assert!(progress.loss.is_some_and(f64::is_finite));
    let _ = status_port;

    let done = s
        .wait_phase("simclr", Phase::Succeeded, RUN_TIMEOUT)
        .await?;
    let status = done.status.as_ref().context("no status")?;
    assert_eq!(status.group.restarts, 0);
    assert!(status.group.completion_time.is_some() && status.group.start_time.is_some());
    let last = status
        .last_checkpoint
        .as_ref()
        .context("no lastCheckpoint")?;
    assert!(
        last.url.starts_with("s3://ckpt/runs/simclr"),
        "{}",
        last.url
    );
    assert!(condition(&done, "Succeeded").is_some_and(|c| c.reason == "Succeeded"));
    // The checkpoints really went to the S3 server through the Secret's credentials.
    let keys = s3.keys("ckpt", "runs/simclr").await?;
    assert!(
        keys.iter().any(|k| k.ends_with(".json")),
        "no checkpoint manifest in the bucket: {keys:?}"
    );
    assert!(s.has_event("CreatedGroup").await? && s.has_event("Succeeded").await?);
    let metrics = s.operator.metrics().await?;
    assert!(
        metrics.contains("vissl_operator_reconciles_total"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn killed_pod_restarts_the_group_which_resumes_from_its_checkpoint() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let s = Scenario::new("kill").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    let (_, status_port) = s.create_training("resume", 4096, 2, &[], json!({})).await?;
    // Kill node 1's trainer once node 0 has a checkpoint (the trainer's own /status says so).
    wait_for("a first checkpoint", RUN_TIMEOUT, || async {
        let st = Scenario::trainer_status(status_port).await?;
        match st["checkpoint"]["last_iteration"].as_u64() {
            Some(i) if i >= 4 => Ok(()),
            _ => bail!("trainer status {st}"),
        }
    })
    .await?;
    s.cluster
        .agent
        .kill(&s.namespace, "resume-node-1", libc::SIGKILL)?;
    let done = s
        .wait_phase("resume", Phase::Succeeded, RUN_TIMEOUT)
        .await?;
    let status = done.status.as_ref().context("no status")?;
    assert_eq!(status.group.restarts, 1, "{status:#?}");
    assert!(s.has_event("PodFailed").await?);
    // The second attempt resumed from the checkpoint instead of starting over.
    let log = s.cluster.agent.pod_logs(&s.namespace, "resume-node-0", 400);
    assert!(
        log.contains("resumed"),
        "node 0's second attempt did not resume:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn exhausted_backoff_fails_the_training_and_stops_its_running_pods() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let s = Scenario::new("backoff").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    s.create_training(
        "doomed",
        4096,
        50,
        &[],
        json!({"runPolicy": {"backoffLimit": 1}}),
    )
    .await?;
    for attempt in 0..2 {
        let trainings = s.trainings();
        wait_for(
            &format!("attempt {attempt} running"),
            RUN_TIMEOUT,
            || async {
                let t = trainings.get("doomed").await?;
                let g = &t.status.as_ref().context("no status")?.group;
                ensure!(g.attempt == attempt && g.phase == Phase::Running, "{g:?}");
                Ok(())
            },
        )
        .await?;
        s.cluster
            .agent
            .kill(&s.namespace, "doomed-node-0", libc::SIGKILL)?;
    }
    let failed = s.wait_phase("doomed", Phase::Failed, RUN_TIMEOUT).await;
    let failed = match failed {
        Ok(t) => t,
        Err(e) => return Err(e),
    };
    let cond = condition(&failed, "Failed").context("no Failed condition")?;
    assert_eq!(cond.reason, "BackoffLimitExceeded", "{cond:?}");
    assert_eq!(failed.status.as_ref().unwrap().group.restarts, 1);
    // cleanPodPolicy Running (the default): the pods still running go, the failed ones stay for their logs.
    wait_for(
        "the running pods to be removed",
        Duration::from_secs(60),
        || async {
            let pods = s.group_pods("doomed").await?;
            let live: Vec<_> = pods
                .iter()
                .filter(|p| {
                    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                    !matches!(phase, Some("Failed" | "Succeeded"))
                })
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            ensure!(live.is_empty(), "pods still live: {live:?}");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn invalid_data_fails_at_once_without_a_retry() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let s = Scenario::new("baddata").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    s.create_training(
        "nodata",
        256,
        1,
        &[
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            "config.DATA.TRAIN.DATA_PATHS=[/nonexistent/vissl-e2e]",
            "config.DATA.TRAIN.DATASET_NAMES=[missing]",
        ],
        json!({}),
    )
    .await?;
    let failed = s.wait_phase("nodata", Phase::Failed, RUN_TIMEOUT).await?;
    let cond = condition(&failed, "Failed").context("no Failed condition")?;
    assert_eq!(cond.reason, "PermanentError", "{cond:?}");
    assert!(cond.message.contains("65"), "{}", cond.message);
    assert_eq!(failed.status.as_ref().unwrap().group.restarts, 0);
    Ok(())
}

#[tokio::test]
async fn invalid_config_is_a_condition_and_an_event_and_creates_no_pods() -> Result<()> {
    let s = Scenario::new("badconfig").await?;
    s.create_training("typo", 256, 1, &["config.OPTIMIZER.num_epoch=3"], json!({}))
        .await
        .map(|_| ())
        .or_else(|e| {
            bail!("the API server should accept it (the operator judges configs): {e:#}")
        })?;
    let failed = s
        .wait_phase("typo", Phase::Failed, Duration::from_secs(60))
        .await?;
    let cond = condition(&failed, "ConfigValid").context("no ConfigValid condition")?;
    assert_eq!(cond.reason, "InvalidConfig");
    assert!(cond.message.contains("num_epochs"), "{}", cond.message);
    assert!(s.has_event("InvalidConfig").await?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.group_pods("typo").await?.is_empty());
    let configmaps: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.namespace);
    assert!(configmaps.get_opt("typo-config").await?.is_none());
    Ok(())
}

#[tokio::test]
async fn suspended_training_holds_no_pods_until_resumed() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let s = Scenario::new("suspend").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    s.create_training(
        "queued",
        512,
        1,
        &[],
        json!({"runPolicy": {"suspend": true}}),
    )
    .await?;
    s.wait_phase("queued", Phase::Suspended, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        s.group_pods("queued").await?.is_empty(),
        "a suspended training holds pods"
    );
    s.trainings()
        .patch(
            "queued",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runPolicy": {"suspend": false}}})),
        )
        .await?;
    let done = s
        .wait_phase("queued", Phase::Succeeded, RUN_TIMEOUT)
        .await?;
    assert_eq!(done.status.as_ref().unwrap().group.restarts, 0);
    assert!(s.has_event("Resumed").await?);
    Ok(())
}

#[tokio::test]
async fn deleted_training_takes_its_children_with_it() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let s = Scenario::new("delete").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    s.create_training("gone", 4096, 50, &[], json!({})).await?;
    s.wait_phase("gone", Phase::Running, RUN_TIMEOUT).await?;
    s.trainings()
        .delete("gone", &DeleteParams::default())
        .await?;
    let services: Api<Service> = Api::namespaced(s.client.clone(), &s.namespace);
    let configmaps: Api<ConfigMap> = Api::namespaced(s.client.clone(), &s.namespace);
    // The garbage collector needs up to ~40 s to discover a new CRD's type the first time.
    wait_for(
        "children to be garbage-collected",
        Duration::from_secs(120),
        || async {
            let pods = s.group_pods("gone").await?.len();
            let svc = services.get_opt("gone").await?.is_some();
            let cm = configmaps.get_opt("gone-config").await?.is_some();
            ensure!(
                pods == 0 && !svc && !cm,
                "pods {pods}, service {svc}, configmap {cm}"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn restarted_operator_converges_without_duplicates() -> Result<()> {
    let _one_at_a_time = TRAINING.lock().await;
    let mut s = Scenario::new("restart").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    s.create_training("steady", 2048, 2, &[], json!({})).await?;
    wait_for("the pods", Duration::from_secs(60), || async {
        let n = s.group_pods("steady").await?.len();
        ensure!(n == 2, "{n} pods");
        Ok(())
    })
    .await?;
    s.operator.kill();
    s.operator = Operator::start(s.cluster, &s.namespace, s.dir.path(), "operator-2")?;
    let done = s
        .wait_phase("steady", Phase::Succeeded, RUN_TIMEOUT)
        .await?;
    let status = done.status.as_ref().context("no status")?;
    assert_eq!(status.group.restarts, 0, "{status:#?}");
    assert_eq!(status.group.attempt, 0, "{status:#?}");
    // Exactly the one group: the same two pod names, one Service, one ConfigMap.
    let pods = s.group_pods("steady").await?;
    let mut names: Vec<String> = pods
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    names.sort();
    names.dedup();
    ensure!(names.len() <= 2, "pods {names:?}");
    let services: Api<Service> = Api::namespaced(s.client.clone(), &s.namespace);
    let svc = services
        .list(&ListParams::default().labels("vissl.rs/training=steady"))
        .await?;
    assert_eq!(svc.items.len(), 1);
    // The recorder folds repeats of an Event into a series: count those too.
    let created_events: i32 = s
        .events()
        .await?
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("CreatedGroup"))
        .map(|e| e.series.map_or(1, |series| series.count))
        .sum();
    assert_eq!(
        created_events, 1,
        "the restarted operator created the group again"
    );
    Ok(())
}
