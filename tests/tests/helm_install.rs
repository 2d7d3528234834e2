//! `helm install` of the chart into the real control plane, exactly as the README's "Run on Kubernetes"
//! says, then a training through the operator it deploys: the Deployment's pod comes from the real
//! controller-manager's ReplicaSet, the test node agent runs it as the local `vissl-operator` binary with
//! its service-account token (TokenRequest, mounted where kube-rs' in-cluster config reads it), so every
//! API call the operator makes goes through the chart's ServiceAccount and RBAC. A training that reaches
//! Succeeded, with no "forbidden" in the operator's log, shows the RBAC grants what the operator needs;
//! `helm uninstall` then removes what the release made and keeps the CRD, as Helm does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, Resource};
use serde_json::json;
use vissl_crds::api::{Phase, SSLTraining};
use vissl_e2e::{create_namespace, helm_binary, repo_root, shared_cluster, wait_for, TestCluster};

const TIMEOUT: Duration = Duration::from_secs(60);

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET path` on 127.0.0.1:`port`: the HTTP status code.
fn http_status(port: u16, path: &str) -> Result<u16> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    raw.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status in {raw:?}"))
}

fn helm(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(helm_binary()?)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .context("running helm")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "helm {args:?} failed:\n{text}");
    Ok(text)
}

fn local_binary(env: &str, name: &str) -> Result<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release").join(name));
    ensure!(
        path.is_file(),
        "{} is missing: build it with `cargo build --release --bins` (make test does)",
        path.display()
    );
    Ok(path)
}

/// Shows every pod log of the namespace (the operator's first) in the test's output, which the harness
/// prints only when the test fails.
struct PodLogs<'a> {
    cluster: &'a TestCluster,
    namespace: String,
}

impl Drop for PodLogs<'_> {
    fn drop(&mut self) {
        eprintln!(
            "==== pod logs of namespace {} ====\n{}",
            self.namespace,
            self.cluster.agent.namespace_logs(&self.namespace, 60)
        );
    }
}

/// The release's operator pod once it runs.
async fn running_operator_pod(pods: &Api<Pod>, release: &str) -> Result<Pod> {
    wait_for("the operator pod to run", TIMEOUT, || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
            .await?;
        let phases: Vec<(Option<String>, Option<String>)> = list
            .items
            .iter()
            .map(|p| {
                (
                    p.metadata.name.clone(),
                    p.status.as_ref().and_then(|s| s.phase.clone()),
                )
            })
            .collect();
        match list
            .items
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        {
            Some(pod) => Ok(pod),
            None => bail!("pods (name, phase): {phases:?}"),
        }
    })
    .await
}

/// A 1-node SimCLR training of the quickstart model on 128 Fashion-MNIST images, 2 iterations.
fn quick_training(name: &str, checkpoints: &Path) -> Result<SSLTraining> {
    let training = json!({
        "apiVersion": "vissl.rs/v1alpha1",
        "kind": "SSLTraining",
        "metadata": {"name": name},
        "spec": {
            "numNodes": 1,
            "procsPerNode": 1,
            "masterPort": free_port()?,
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "config": {"name": "pretrain/simclr/quick_cpu_fmnist", "overrides": [
                "config.DATA.TRAIN.DATA_LIMIT=128",
                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64",
                "config.OPTIMIZER.num_epochs=1",
                "config.LOG_FREQUENCY=1",
                format!("config.HOOKS.PROMETHEUS_SETUP.PORT={}", free_port()?),
            ]},
            "checkpoint": {"url": checkpoints.to_string_lossy()},
            "runPolicy": {"backoffLimit": 0},
        },
    });
    Ok(serde_json::from_value(training)?)
}

/// A sign in the operator's log that the chart's RBAC refused it an API call.
fn refused_call(log: &str) -> Option<&str> {
    log.lines()
        .find(|line| line.to_lowercase().contains("forbidden"))
}

/// Waits until the training succeeded; a failed training or a refused API call ends the wait at once.
async fn wait_succeeded(
    trainings: &Api<SSLTraining>,
    name: &str,
    operator_log: impl Fn() -> String,
) -> Result<()> {
    let outcome = wait_for(
        &format!("SSLTraining {name} to succeed"),
        TIMEOUT,
        || async {
            if let Some(line) = refused_call(&operator_log()) {
                return Ok(Err(anyhow!(
                    "the operator was refused an API call: the chart's RBAC lacks a verb: {line}"
                )));
            }
            let training = trainings.get(name).await?;
            match training.status.as_ref().map(|s| s.group.phase) {
                Some(Phase::Succeeded) => Ok(Ok(())),
                Some(Phase::Failed) => Ok(Err(anyhow!(
                    "SSLTraining {name} failed: {:#?}",
                    training.status
                ))),
                other => bail!("phase {other:?}"),
            }
        },
    )
    .await?;
    outcome
}

/// Waits until the object `name` of `api` is gone.
async fn wait_gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let what = format!("{} {name} to be deleted", K::kind(&()));
    wait_for(&what, Duration::from_secs(30), || async {
        match api.get_opt(name).await? {
            None => Ok(()),
            Some(_) => bail!("still there"),
        }
    })
    .await
}

/// The operator's log (stdout and stderr) as the node agent captured it.
fn operator_log(cluster: &TestCluster, namespace: &str, pod: &str) -> String {
    cluster.agent.pod_logs(namespace, pod, usize::MAX)
}

/// The two ways to install the chart.
enum Mode {
    /// The README's command: release `vissl-operator` in `vissl-system`, watching the whole cluster.
    ClusterWide,
    /// `watchNamespace` set: the operator and its trainings in one namespace, RBAC a Role there.
    Namespaced,
}

/// Installs and uninstalls take turns: a cluster-wide operator would also reconcile the other test's
/// training.
static INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `helm install` in `mode`, a quick training to Succeeded, `helm uninstall`; returns how long it took.
async fn install_train_uninstall(mode: Mode) -> Result<Duration> {
    ensure!(
        euid() == 0,
        "the node agent mounts the operator pod's service-account token at \
         /var/run/secrets/kubernetes.io/serviceaccount in a private mount namespace, which needs root: \
         run the end-to-end tests as root"
    );
    local_binary("VISSL_OPERATOR_BIN", "vissl-operator")?;
    local_binary("VISSL_BIN", "vissl")?;
    let _turn = INSTALL.lock().await;
    let cluster = shared_cluster().await?;
    let client: Client = cluster.client().await?;
    let began = Instant::now();
    let chart = repo_root().join("charts/vissl-operator");
    let chart = chart.to_string_lossy().into_owned();
    // Every "node" of the agent is this machine: the operator's metrics port must be a free one.
    let metrics_port = free_port()?;
    let set_port = format!("metrics.port={metrics_port}");
    let (release, fullname, release_namespace, training_namespace, install) = match mode {
        Mode::ClusterWide => {
            let trainings = create_namespace(&client, "helm-cluster").await?;
            let install: Vec<String> = [
                "install",
                "vissl-operator",
                &chart,
                "-n",
                "vissl-system",
                "--create-namespace",
                "--set",
                &set_port,
            ]
            .map(String::from)
            .to_vec();
            (
                "vissl-operator",
                "vissl-operator",
                "vissl-system".to_string(),
                trainings,
                install,
            )
        }
        Mode::Namespaced => {
            let namespace = create_namespace(&client, "helm-namespaced").await?;
            let install: Vec<String> = [
                "install",
                "vissl",
                &chart,
                "-n",
                &namespace,
                "--set",
                &format!("watchNamespace={namespace}"),
                "--set",
                &set_port,
            ]
            .map(String::from)
            .to_vec();
            (
                "vissl",
                "vissl-vissl-operator",
                namespace.clone(),
                namespace,
                install,
            )
        }
    };
    let mut log_namespaces = vec![release_namespace.clone(), training_namespace.clone()];
    log_namespaces.dedup();
    let _logs: Vec<PodLogs> = log_namespaces
        .into_iter()
        .map(|namespace| PodLogs { cluster, namespace })
        .collect();
    let kubeconfig = cluster.control_plane.kubeconfig_path();
    let install: Vec<&str> = install.iter().map(String::as_str).collect();
    helm(kubeconfig, &install)?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &release_namespace);
    let operator = running_operator_pod(&pods, release).await?;
    let operator_name = operator.metadata.name.clone().unwrap_or_default();
    ensure!(
        operator
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|owners| owners.iter().any(|o| o.kind == "ReplicaSet")),
        "the operator pod {operator_name} was not made by the Deployment's ReplicaSet: {:?}",
        operator.metadata.owner_references
    );
    wait_for("the operator's /readyz", TIMEOUT, || async {
        let code =
            tokio::task::spawn_blocking(move || http_status(metrics_port, "/readyz")).await??;
        ensure!(code == 200, "/readyz answered {code}");
        Ok(())
    })
    .await?;

    let trainings: Api<SSLTraining> = Api::namespaced(client.clone(), &training_namespace);
    let scratch = tempfile::tempdir()?;
    let training = quick_training("helm-quick", &scratch.path().join("checkpoints"))?;
    trainings
        .create(&PostParams::default(), &training)
        .await
        .context("creating SSLTraining helm-quick")?;
    let log_of_operator = || operator_log(cluster, &release_namespace, &operator_name);
    wait_succeeded(&trainings, "helm-quick", log_of_operator).await?;
    let log = log_of_operator();
    if let Some(line) = refused_call(&log) {
        bail!("the operator was refused an API call: the chart's RBAC lacks a verb: {line}");
    }
    ensure!(
        log.contains("starting the SSLTraining and Benchmark controllers"),
        "the operator log does not show the controllers starting:\n{log}"
    );

    helm(
        kubeconfig,
        &["uninstall", release, "-n", &release_namespace, "--wait"],
    )?;
    let in_release = |ns: &str| -> (Api<Deployment>, Api<ServiceAccount>, Api<Service>) {
        (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        )
    };
    let (deployments, accounts, services) = in_release(&release_namespace);
    wait_gone(&deployments, fullname).await?;
    wait_gone(&accounts, fullname).await?;
    wait_gone(&services, &format!("{fullname}-metrics")).await?;
    match mode {
        Mode::ClusterWide => {
            wait_gone(&Api::<ClusterRole>::all(client.clone()), fullname).await?;
            wait_gone(&Api::<ClusterRoleBinding>::all(client.clone()), fullname).await?;
        }
        Mode::Namespaced => {
            wait_gone(
                &Api::<Role>::namespaced(client.clone(), &release_namespace),
                fullname,
            )
            .await?;
            wait_gone(
                &Api::<RoleBinding>::namespaced(client.clone(), &release_namespace),
                fullname,
            )
            .await?;
        }
    }
    wait_gone(&pods, &operator_name).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    ensure!(
        crds.get_opt("ssltrainings.vissl.rs").await?.is_some(),
        "helm uninstall removed the SSLTraining CRD; Helm keeps the CRDs of crds/"
    );
    Ok(began.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_install_runs_the_operator_cluster_wide_and_a_training_succeeds() -> Result<()> {
    let took = install_train_uninstall(Mode::ClusterWide).await?;
    eprintln!("cluster-wide: helm install -> training Succeeded -> uninstall in {took:.1?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_install_runs_the_operator_with_a_role_and_a_training_succeeds() -> Result<()> {
    let took = install_train_uninstall(Mode::Namespaced).await?;
    eprintln!("namespaced: helm install -> training Succeeded -> uninstall in {took:.1?}");
    Ok(())
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() }
}
