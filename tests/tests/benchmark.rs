//! The Benchmark resource against a real control plane with the test node agent running each pod as a local
//! `vissl` process: a Benchmark that waits for its SSLTraining and then runs the real `vissl benchmark knn`
//! on its checkpoint, a checkpoint that is not there, and a training that failed.
//!
//! Each test runs its own `vissl-operator` process scoped to its own namespace; trainings and benchmarks
//! take a lock so that at most one computes at a time on the 2-core machine.

use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::Api;
use serde_json::json;
use vissl_crds::api::{Benchmark, Condition, ConditionStatus, Phase, SSLTraining};
use vissl_e2e::{free_port, wait_for, OperatorScenario, S3Server};

/// One computing group at a time: they would only slow each other down.
static COMPUTE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The images of each kNN split: enough for a meaningful vote, few enough to take seconds.
const KNN_IMAGES: u32 = 500;

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

    fn benchmarks(&self) -> Api<Benchmark> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// A 1-node SimCLR training of the quickstart model on 512 Fashion-MNIST images for one epoch
    /// (8 steps, a checkpoint every 4), checkpointing to `checkpoint` (merged into spec.checkpoint).
    async fn create_training(
        &self,
        name: &str,
        checkpoint: serde_json::Value,
        extra_overrides: &[&str],
    ) -> Result<SSLTraining> {
        let mut overrides = vec![
            "config.DATA.TRAIN.DATA_LIMIT=512".to_string(),
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64".into(),
            "config.OPTIMIZER.num_epochs=1".into(),
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=4".into(),
            format!("config.HOOKS.PROMETHEUS_SETUP.PORT={}", free_port()?),
        ];
        overrides.extend(extra_overrides.iter().map(|s| s.to_string()));
        let training: SSLTraining = serde_json::from_value(json!({
            "apiVersion": "vissl.rs/v1alpha1",
            "kind": "SSLTraining",
            "metadata": {"name": name},
            "spec": {
                "numNodes": 1,
                "masterPort": free_port()?,
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "config": {"name": "pretrain/simclr/quick_cpu_fmnist", "overrides": overrides},
                "checkpoint": checkpoint,
                "runPolicy": {"backoffLimit": 1},
            },
        }))?;
        self.trainings()
            .create(&PostParams::default(), &training)
            .await
            .with_context(|| format!("creating SSLTraining {name}"))
    }

    /// A 1-node kNN Benchmark of `model` on 500 + 500 Fashion-MNIST images; `extra` is merged into the spec.
    async fn create_benchmark(
        &self,
        name: &str,
        model: serde_json::Value,
        extra: serde_json::Value,
    ) -> Result<Benchmark> {
        let mut spec = json!({
            "numNodes": 1,
            "masterPort": free_port()?,
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "benchmark": "knn",
            "model": model,
            "config": {
                "name": "benchmark/nearest_neighbor/quick_cpu_fmnist_knn",
                "overrides": [
                    format!("config.DATA.TRAIN.DATA_LIMIT={KNN_IMAGES}"),
                    format!("config.DATA.TEST.DATA_LIMIT={KNN_IMAGES}"),
                ],
            },
            "runPolicy": {"backoffLimit": 1},
        });
        merge(&mut spec, &extra);
        let benchmark: Benchmark = serde_json::from_value(json!({
            "apiVersion": "vissl.rs/v1alpha1",
            "kind": "Benchmark",
            "metadata": {"name": name},
            "spec": spec,
        }))?;
        self.benchmarks()
            .create(&PostParams::default(), &benchmark)
            .await
            .with_context(|| format!("creating Benchmark {name}"))
    }

    async fn wait_training(&self, name: &str, want: Phase) -> Result<SSLTraining> {
        let trainings = self.trainings();
        wait_for(
            &format!("SSLTraining {name} to be {want:?}"),
            RUN_TIMEOUT,
            || async {
                let t = trainings.get(name).await?;
                match t.status.as_ref().map(|s| s.group.phase) {
                    Some(p) if p == want => Ok(Ok(t)),
                    Some(p) if p.is_finished() => Ok(Err(anyhow!(
                        "SSLTraining {name} ended {p:?} while waiting for {want:?}: {:#?}",
                        t.status
                    ))),
                    other => bail!("phase {other:?}, status {:?}", t.status),
                }
            },
        )
        .await?
    }

    /// Waits until the benchmark is finished; an error if it finished in another phase than `want`.
    async fn wait_benchmark(&self, name: &str, want: Phase) -> Result<Benchmark> {
        let benchmarks = self.benchmarks();
        wait_for(
            &format!("Benchmark {name} to be {want:?}"),
            RUN_TIMEOUT,
            || async {
                let b = benchmarks.get(name).await?;
                match b.status.as_ref().map(|s| s.group.phase) {
                    Some(p) if p == want => Ok(Ok(b)),
                    Some(p) if p.is_finished() => Ok(Err(anyhow!(
                        "Benchmark {name} ended {p:?} while waiting for {want:?}: {:#?}",
                        b.status
                    ))),
                    other => bail!("phase {other:?}, status {:?}", b.status),
                }
            },
        )
        .await?
    }

    async fn benchmark_pods(&self, name: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(pods
            .list(&ListParams::default().labels(&format!("vissl.rs/benchmark={name}")))
            .await?
            .items)
    }

    async fn event_reasons(&self) -> Result<Vec<String>> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.namespace);
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect())
    }

    /// A Secret with moto's endpoint and dummy keys, as the trainer's object store reads them.
    async fn create_store_secret(&self, name: &str, s3: &S3Server) -> Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": format!("http://{}", s3.address), "AWS_ALLOW_HTTP": "true",
            },
        }))?;
        secrets.create(&PostParams::default(), &secret).await?;
        Ok(())
    }

    /// `kubectl get bench <name>` as a user sees it.
    fn kubectl_get_bench(&self, name: &str) -> Result<String> {
        let output = self
            .cluster
            .control_plane
            .kubectl()?
            .args(["get", "bench", name, "-n", &self.namespace])
            .output()
            .context("running kubectl get bench")?;
        ensure!(
            output.status.success(),
            "kubectl get bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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

fn condition<'a>(b: &'a Benchmark, type_: &str) -> Option<&'a Condition> {
    b.status.as_ref()?.group.condition(type_)
}

/// Where a succeeded training's model is: its last checkpoint, else its checkpoint folder.
fn checkpoint_of(training: &SSLTraining) -> Result<String> {
    training
        .status
        .as_ref()
        .and_then(|s| s.last_checkpoint.as_ref().map(|c| c.url.clone()))
        .or_else(|| training.spec.checkpoint.as_ref()?.url.clone())
        .context("the training reports no checkpoint")
}

/// The benchmark waits (Pending, ModelReady=False/WaitingForTraining, no pods) for a training that does not
/// exist yet, starts by itself once it has succeeded, and evaluates its checkpoint with the real trainer.
/// Local checkpoint and results folders: this runs with the trainer as it is on any branch.
#[tokio::test]
async fn benchmark_waits_for_its_training_then_evaluates_its_checkpoint() -> Result<()> {
    let s = Scenario::new("bench-wait").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    let results = s.dir.path().join("results");
    s.create_benchmark(
        "knn",
        json!({"training": "quick"}),
        json!({"results": {"url": results.to_string_lossy()}}),
    )
    .await?;

    let benchmarks = s.benchmarks();
    let waiting = wait_for(
        "the benchmark to wait for its training",
        Duration::from_secs(60),
        || async {
            let b = benchmarks.get("knn").await?;
            match condition(&b, "ModelReady") {
                Some(c)
                    if c.status == ConditionStatus::False && c.reason == "WaitingForTraining" =>
                {
                    Ok(b)
                }
                _ => bail!("status {:?}", b.status),
            }
        },
    )
    .await?;
    let status = waiting.status.as_ref().context("no status")?;
    assert_eq!(status.group.phase, Phase::Pending);
    let message = &condition(&waiting, "ModelReady")
        .context("no ModelReady")?
        .message;
    assert!(
        message.contains("quick"),
        "the message names the training: {message}"
    );
    assert!(
        s.benchmark_pods("knn").await?.is_empty(),
        "no pods while waiting"
    );
    assert!(s
        .event_reasons()
        .await?
        .iter()
        .any(|r| r == "WaitingForTraining"));

    let _one_at_a_time = COMPUTE.lock().await;
    let checkpoints = s.dir.path().join("quick-checkpoints");
    s.create_training("quick", json!({"url": checkpoints.to_string_lossy()}), &[])
        .await?;
    let trained = s.wait_training("quick", Phase::Succeeded).await?;

    let done = s.wait_benchmark("knn", Phase::Succeeded).await?;
    let status = done.status.as_ref().context("no status")?;
    assert_eq!(status.model, Some(checkpoint_of(&trained)?));
    let model = condition(&done, "ModelReady").context("no ModelReady")?;
    assert_eq!(
        (model.status, model.reason.as_str()),
        (ConditionStatus::True, "TrainingSucceeded")
    );
    assert_eq!(status.group.restarts, 0);

    // The pod ran the real benchmark on that checkpoint and wrote the results where the spec said.
    let pods = s.benchmark_pods("knn").await?;
    let pod = pods
        .first()
        .context("the benchmark's pod is kept (cleanPodPolicy Running)")?;
    let command = pod.spec.as_ref().context("a pod spec")?.containers[0]
        .command
        .clone()
        .unwrap_or_default();
    let output = results
        .join(&s.namespace)
        .join("knn")
        .join("knn_results.json");
    assert_eq!(
        command,
        [
            "vissl",
            "benchmark",
            "knn",
            "--output",
            output.to_string_lossy().as_ref(),
            "config=/etc/vissl/config.yaml"
        ]
    );
    let text = std::fs::read_to_string(&output)
        .with_context(|| format!("the results file {}", output.display()))?;
    let rows: serde_json::Value = serde_json::from_str(&text)?;
    let rows = rows.get("results").unwrap_or(&rows);
    let trained_row = rows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["features"] == "trained"))
        .with_context(|| format!("no row of the trained model in {text}"))?;
    let top1 = trained_row["top1"].as_f64().context("a top-1 number")?;
    // Ten balanced classes: a working pipeline is far above chance.
    assert!(top1 > 30.0 && top1 <= 100.0, "top-1 {top1}");
    Ok(())
}

/// The full path with object storage and the trainer's termination message: the training checkpoints to
/// S3, the benchmark reads the model from there with the training's Secret, writes its results JSON to S3,
/// and its status holds the rows rank 0 reported. Needs the trainer of branch wip-bench-trainer (S3 weights,
/// `--output` URLs, VISSL_TERMINATION_MESSAGE_PATH).
#[tokio::test]
async fn benchmark_of_an_s3_training_records_its_results() -> Result<()> {
    let s = Scenario::new("bench-s3").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    let s3 = S3Server::start("store").await?;
    s.create_store_secret("store-keys", &s3).await?;
    s.create_benchmark(
        "knn",
        json!({"training": "quick"}),
        json!({"results": {"url": "s3://store/benchmarks", "credentialsSecret": "store-keys"}}),
    )
    .await?;

    let _one_at_a_time = COMPUTE.lock().await;
    s.create_training(
        "quick",
        json!({"url": "s3://store/runs/quick", "credentialsSecret": "store-keys"}),
        &[],
    )
    .await?;
    let trained = s.wait_training("quick", Phase::Succeeded).await?;
    let done = s.wait_benchmark("knn", Phase::Succeeded).await?;
    let status = done.status.as_ref().context("no status")?;
    assert_eq!(status.model, Some(checkpoint_of(&trained)?));
    let recorded = condition(&done, "ResultsRecorded").context("no ResultsRecorded")?;
    assert_eq!(
        (recorded.status, recorded.reason.as_str()),
        (ConditionStatus::True, "ResultsRead"),
        "{}",
        recorded.message
    );
    let trained_row = status
        .results
        .iter()
        .find(|r| r.features == "trained")
        .context("no trained row in status.results")?;
    assert_eq!(trained_row.layer, "res5avg");
    assert_eq!(trained_row.k, 200);
    assert!(
        trained_row.top1 > 30.0 && trained_row.top1 <= 100.0,
        "{trained_row:?}"
    );
    assert_eq!(status.top1, Some(trained_row.top1));
    let key = format!("benchmarks/{}/knn/knn_results.json", s.namespace);
    assert_eq!(status.results_url, Some(format!("s3://store/{key}")));

    // The same numbers in the object store (the report's rows, under `results`).
    let stored: serde_json::Value = serde_json::from_str(&s3.object("store", &key).await?)?;
    let rows = stored.get("results").unwrap_or(&stored);
    let stored_top1 = rows
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["features"] == "trained"))
        .and_then(|r| r["top1"].as_f64())
        .with_context(|| format!("no trained top-1 in {stored}"))?;
    // The termination message rounds to two decimals to fit more rows in 4 kB.
    assert!(
        (stored_top1 - trained_row.top1).abs() <= 0.005 + 1e-9,
        "{stored_top1} vs {trained_row:?}"
    );

    let table = s.kubectl_get_bench("knn")?;
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "MODEL", "TOP-1", "AGE"] {
        assert!(header.contains(column), "column {column} in {table}");
    }
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(row.contains("Succeeded"), "{table}");
    assert!(
        row.contains(&trained_row.top1.to_string()),
        "the Top-1 column shows {}: {table}",
        trained_row.top1
    );
    assert!(s.event_reasons().await?.iter().any(|r| r == "ResultsRead"));
    Ok(())
}

/// A checkpoint that is not there is a permanent error of the trainer: Failed at once, no retry. Needs the
/// trainer of branch wip-bench-trainer (a missing model exits with a permanent code).
#[tokio::test]
async fn a_missing_checkpoint_fails_the_benchmark_without_a_retry() -> Result<()> {
    let s = Scenario::new("bench-nowhere").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    let nowhere = s.dir.path().join("no-such-checkpoint");
    let _one_at_a_time = COMPUTE.lock().await;
    s.create_benchmark(
        "knn",
        json!({"checkpointUrl": nowhere.to_string_lossy()}),
        json!({}),
    )
    .await?;
    let failed = s.wait_benchmark("knn", Phase::Failed).await?;
    let status = failed.status.as_ref().context("no status")?;
    let reason = &condition(&failed, "Failed")
        .context("no Failed condition")?
        .reason;
    assert_eq!(reason, "PermanentError", "{status:#?}");
    assert_eq!(status.group.restarts, 0, "no retry");
    assert_eq!(
        status.model.as_deref(),
        Some(nowhere.to_string_lossy().as_ref())
    );
    let model = condition(&failed, "ModelReady").context("no ModelReady")?;
    assert_eq!(
        (model.status, model.reason.as_str()),
        (ConditionStatus::True, "CheckpointGiven")
    );
    Ok(())
}

/// A training that failed fails the benchmark that waits for it (reason TrainingFailed), with no pods.
#[tokio::test]
async fn a_failed_training_fails_its_benchmark() -> Result<()> {
    let s = Scenario::new("bench-failed").await?;
    let _logs = s.cluster.logs_on_failure(&s.namespace);
    s.create_benchmark("knn", json!({"training": "broken"}), json!({}))
        .await?;
    // An invalid config fails the training before any pod exists.
    s.create_training(
        "broken",
        json!({"url": s.dir.path().join("broken").to_string_lossy()}),
        &["config.OPTIMIZER.no_such_option=1"],
    )
    .await?;
    let failed = s.wait_benchmark("knn", Phase::Failed).await?;
    let reason = &condition(&failed, "Failed")
        .context("no Failed condition")?
        .reason;
    assert_eq!(reason, "TrainingFailed");
    let model = condition(&failed, "ModelReady").context("no ModelReady")?;
    assert_eq!(model.status, ConditionStatus::False);
    assert!(
        model.message.contains("broken") && model.message.contains("InvalidConfig"),
        "{}",
        model.message
    );
    assert!(s.benchmark_pods("knn").await?.is_empty());
    assert!(s
        .event_reasons()
        .await?
        .iter()
        .any(|r| r == "TrainingFailed"));
    Ok(())
}
