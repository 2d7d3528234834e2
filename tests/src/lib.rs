//! End-to-end test harness: a real Kubernetes control plane on 127.0.0.1 ([`ControlPlane`]), a test node
//! agent that runs bound pods as local processes ([`NodeAgent`]), and the helpers scenario tests share
//! ([`shared_cluster`], [`wait_for`], [`apply_crd_file`]).

pub mod control_plane;
pub mod node_agent;
pub mod processes;
mod reaper;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

pub use control_plane::ControlPlane;
pub use node_agent::{NodeAgent, NodeAgentOptions};
pub use processes::{free_port, http, Operator, OperatorScenario, S3Server};

/// Nodes the shared cluster's agent registers (a 2-node training fits).
pub const SHARED_NODES: usize = 2;

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The `helm` binary: `$VISSL_HELM`, else the one `scripts/setup` builds into the cache.
pub fn helm_binary() -> Result<PathBuf> {
    let helm = std::env::var_os("VISSL_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("VISSL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/vissl-rs")
                });
            cache.join("helm/v3.22.0/bin/helm")
        });
    if !helm.is_file() {
        bail!(
            "helm not found at {}: run scripts/setup (it builds helm from the Go module proxy)",
            helm.display()
        );
    }
    Ok(helm)
}

/// Polls `check` every 200 ms until it returns `Ok`, for at most `timeout`.
///
/// An `Err` from `check` means "not yet" and should say what was seen (e.g. `bail!("phase is Pending")`);
/// the last one ends up in the timeout error, together with `what` and how long it waited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let began = Instant::now();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(last) if began.elapsed() >= timeout => {
                bail!(
                    "timed out after {:.1?} waiting for {what}; last seen: {last:#}",
                    began.elapsed()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Creates (server-side applies) the CRD in the YAML file `path` and waits until it is Established.
pub async fn apply_crd_file(client: &Client, path: &Path) -> Result<CustomResourceDefinition> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
        .with_context(|| format!("parsing {} as a CustomResourceDefinition", path.display()))?;
    let name = crd
        .metadata
        .name
        .clone()
        .with_context(|| format!("{} has no metadata.name", path.display()))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &name,
        &PatchParams::apply("vissl-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("applying CRD {name} from {}", path.display()))?;
    wait_crd_established(client, &name, Duration::from_secs(30)).await
}

/// The folder of the upstream CRDs (PodGroups, prometheus-operator's monitors) that
/// `scripts/upstream-crds/fetch` (run by scripts/setup) keeps; an error says how to get them.
pub fn upstream_crds_dir() -> Result<PathBuf> {
    let script = repo_root().join("scripts/upstream-crds/fetch");
    let out = std::process::Command::new(&script)
        .arg("--print-dir")
        .output()
        .with_context(|| format!("running {} --print-dir", script.display()))?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !out.status.success() || !dir.is_dir() {
        bail!(
            "the upstream CRDs are missing ({}): run scripts/setup (or scripts/upstream-crds/fetch)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Applies the upstream CRD file `file` (a name in [`upstream_crds_dir`]) and waits until it is
/// Established.
pub async fn apply_upstream_crd(client: &Client, file: &str) -> Result<CustomResourceDefinition> {
    let path = upstream_crds_dir()?.join(file);
    if !path.is_file() {
        bail!(
            "{} is missing: run scripts/setup (or scripts/upstream-crds/fetch --force)",
            path.display()
        );
    }
    apply_crd_file(client, &path).await
}

/// Waits until CRD `name` has condition Established=True.
pub async fn wait_crd_established(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<CustomResourceDefinition> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for(
        &format!("CRD {name} to be Established"),
        timeout,
        || async {
            let crd = crds
                .get(name)
                .await
                .with_context(|| format!("reading CRD {name}"))?;
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conds| {
                    conds
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                Ok(crd)
            } else {
                Err(anyhow!(
                    "conditions {:?}",
                    crd.status.as_ref().and_then(|s| s.conditions.as_ref())
                ))
            }
        },
    )
    .await
}

/// Creates a namespace with a server-generated name `<prefix>-xxxxx`, one per test, and waits for its
/// `default` ServiceAccount: until the controller manager makes it, creating a pod there is refused.
pub async fn create_namespace(client: &Client, prefix: &str) -> Result<String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.generate_name = Some(format!("{prefix}-"));
    let created = namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating a namespace named {prefix}-*"))?;
    let name = created
        .metadata
        .name
        .context("the API server returned a namespace without a name")?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
    wait_for(
        &format!("the default ServiceAccount of namespace {name}"),
        Duration::from_secs(30),
        || async {
            match accounts.get_opt("default").await? {
                Some(_) => Ok(()),
                None => bail!("not created yet"),
            }
        },
    )
    .await?;
    Ok(name)
}

/// A control plane plus a node agent with [`SHARED_NODES`] nodes, shared by every test of a test binary.
pub struct TestCluster {
    /// The control plane (logs, kubeconfig, kubectl).
    pub control_plane: ControlPlane,
    /// The node agent serving the cluster's nodes.
    pub agent: NodeAgent,
}

impl TestCluster {
    /// A new client; make one per test (a client is bound to the tokio runtime it was made on).
    pub async fn client(&self) -> Result<Client> {
        self.control_plane.client().await
    }

    /// Prints the pod logs of `namespace` and the control plane's log tails if the current thread is
    /// panicking when the returned guard drops: `let _logs = cluster.logs_on_failure(&ns);`.
    pub fn logs_on_failure<'a>(&'a self, namespace: &str) -> LogsOnFailure<'a> {
        LogsOnFailure {
            cluster: self,
            namespace: namespace.to_string(),
        }
    }
}

/// See [`TestCluster::logs_on_failure`].
pub struct LogsOnFailure<'a> {
    cluster: &'a TestCluster,
    namespace: String,
}

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== pod logs in namespace {} ====\n{}\n==== control plane logs ====\n{}",
                self.namespace,
                self.cluster.agent.namespace_logs(&self.namespace, 40),
                self.cluster.control_plane.log_tails(15)
            );
        }
    }
}

static SHARED: tokio::sync::OnceCell<std::result::Result<TestCluster, String>> =
    tokio::sync::OnceCell::const_new();

/// The test binary's shared cluster, started on first use (10-20 s). It runs on its own thread and tokio
/// runtime, so it outlives each test's runtime; its processes are killed when the test binary exits.
/// A start-up failure is remembered and returned to every test.
pub async fn shared_cluster() -> Result<&'static TestCluster> {
    let cluster = SHARED
        .get_or_init(|| async { start_shared().await.map_err(|err| format!("{err:#}")) })
        .await;
    cluster
        .as_ref()
        .map_err(|err| anyhow!("the shared test cluster did not start: {err}"))
}

async fn start_shared() -> Result<TestCluster> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vissl-test-cluster".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = sender.send(Err(
                        anyhow!(err).context("building the cluster's tokio runtime")
                    ));
                    return;
                }
            };
            runtime.block_on(async move {
                let started = async {
                    let control_plane = ControlPlane::start().await?;
                    let client = control_plane.client().await?;
                    let api_server = control_plane
                        .server()
                        .trim_start_matches("https://")
                        .parse()
                        .with_context(|| {
                            format!("the API server's URL {}", control_plane.server())
                        })?;
                    let opts = NodeAgentOptions {
                        api_server: Some(api_server),
                        ..NodeAgentOptions::default()
                    };
                    let agent = NodeAgent::start(client, SHARED_NODES, opts).await?;
                    Ok(TestCluster {
                        control_plane,
                        agent,
                    })
                }
                .await;
                let ok = started.is_ok();
                let _ = sender.send(started);
                if ok {
                    // This thread started every child process (they die with it) and drives the agent.
                    std::future::pending::<()>().await;
                }
            });
        })
        .context("starting the cluster thread")?;
    receiver
        .await
        .context("the cluster thread ended while starting the cluster")?
}
