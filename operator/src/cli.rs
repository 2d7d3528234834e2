//! The command line: `vissl-operator [run] [flags]` and `vissl-operator crd`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use vissl_crds::api::{Benchmark, SSLTraining};

use crate::group::{MANAGED_BY_LABEL, MANAGER};
use crate::http::{self, Endpoints};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::telemetry::{self, LogFormat};
use crate::training::{Context, Settings};
use crate::{benchmark, training};

/// Reconciles SSLTraining and Benchmark resources into multi-node VISSL pod groups.
#[derive(Debug, Parser)]
#[command(
    name = "vissl-operator",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Flags of `run` (accepted without the word `run`).
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (the kubeconfig comes from KUBECONFIG, ~/.kube/config or the pod's
    /// service account).
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (every one, as a multi-document stream, unless
    /// --kind names one).
    Crd {
        /// Only this resource's CRD.
        #[arg(long, value_enum)]
        kind: Option<CrdKind>,
    },
}

/// The resource kinds whose CRD `crd --kind` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CrdKind {
    /// `ssltrainings.vissl.rs`.
    Ssltraining,
    /// `benchmarks.vissl.rs`.
    Benchmark,
}

/// Flags of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "VISSL_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Resources reconciled at the same time.
    #[arg(long, env = "VISSL_OPERATOR_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(
        long,
        env = "VISSL_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub metrics_addr: SocketAddr,
    /// Trainer image of pods whose spec names none.
    #[arg(long, env = "VISSL_DEFAULT_IMAGE", default_value = concat!("ghcr.io/vissl-rs/vissl:", env!("CARGO_PKG_VERSION")))]
    pub default_image: String,
    /// The built-in configs (`configs/` with defaults.yaml), the same as the trainer image ships;
    /// default: next to the executable, else the source tree's.
    #[arg(long, env = "VISSL_CONFIGS_ROOT")]
    pub configs_root: Option<PathBuf>,
    /// Hold a coordination.k8s.io Lease before reconciling (for more than one replica).
    #[arg(long, env = "VISSL_OPERATOR_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(
        long,
        env = "VISSL_OPERATOR_LEASE_NAME",
        default_value = "vissl-operator"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (default: POD_NAMESPACE, else --namespace, else `default`).
    #[arg(long, env = "VISSL_OPERATOR_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Log format.
    #[arg(long, env = "VISSL_OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Parses the command line and runs it.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd { kind }) => {
            let yaml = match kind {
                None => vissl_crds::api::all_crds_yaml(),
                Some(CrdKind::Ssltraining) => vissl_crds::api::ssl_training_crd_yaml(),
                Some(CrdKind::Benchmark) => vissl_crds::api::benchmark_crd_yaml(),
            }
            .context("cannot render the CRDs")?;
            print!("{yaml}");
            Ok(())
        }
        Some(Command::Run(args)) => run(args).await,
        None => run(cli.run).await,
    }
}

fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "vissl-operator".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Runs the controller until SIGINT/SIGTERM or a lost leadership.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let metrics = Metrics::new().context("cannot register the operator's metrics")?;
    let ready = Arc::new(AtomicBool::new(false));
    let listener = http::bind(args.metrics_addr).await?;
    tokio::spawn(http::serve(
        listener,
        Endpoints {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));

    let client = Client::try_default()
        .await
        .context("cannot build a Kubernetes client (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    client
        .apiserver_version()
        .await
        .context("the Kubernetes API server does not answer")?;
    ready.store(true, Ordering::Relaxed);

    let lease = args.leader_election.then(|| LeaseConfig {
        name: args.lease_name.clone(),
        namespace: args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| args.namespace.clone())
            .unwrap_or_else(|| "default".into()),
        identity: identity(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    });
    if let Some(lease) = &lease {
        tracing::info!(lease = %lease.name, namespace = %lease.namespace, "waiting to lead");
        leader::acquire(&client, lease).await;
    }

    let configs_root = args
        .configs_root
        .clone()
        .unwrap_or_else(vissl_crds::config::default_configs_root);
    anyhow::ensure!(
        configs_root.join("defaults.yaml").is_file(),
        "{} has no defaults.yaml; pass --configs-root (or VISSL_CONFIGS_ROOT) pointing at vissl-rs' configs/",
        configs_root.display()
    );
    tracing::info!(
        namespace = args.namespace.as_deref().unwrap_or("(all)"),
        configs_root = %configs_root.display(),
        "starting the SSLTraining and Benchmark controllers"
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
        settings: Settings {
            configs_root,
            default_image: args.default_image.clone(),
            poll_progress: true,
        },
    });
    let reconciling = futures::future::join(
        run_trainings(&client, &args, ctx.clone()),
        run_benchmarks(&client, &args, ctx),
    );
    let reconciling = async move {
        reconciling.await;
    };
    match &lease {
        Some(lease) => {
            tokio::select! {
                () = reconciling => {}
                () = leader::hold(&client, lease) => {
                    anyhow::bail!("lost the leadership (lease {}/{}); exiting so a fresh start can wait for it", lease.namespace, lease.name);
                }
            }
        }
        None => reconciling.await,
    }
    tracing::info!("stopped");
    Ok(())
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Only the children this operator labelled (the controllers map them to owners by reference).
fn children_config() -> watcher::Config {
    watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"))
}

/// Refreshes a by-phase gauge from a controller's cache every 10 s.
fn count_phases_every<K>(
    store: kube::runtime::reflector::Store<K>,
    phase_of: fn(&K) -> vissl_crds::api::Phase,
    set: impl Fn(Vec<vissl_crds::api::Phase>) + Send + 'static,
) where
    K: kube::Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            set(store.state().iter().map(|o| phase_of(o)).collect());
        }
    });
}

/// The SSLTraining controller, until shutdown.
async fn run_trainings(client: &Client, args: &RunArgs, ctx: Arc<Context>) {
    let ns = args.namespace.as_deref();
    let controller = Controller::new(api::<SSLTraining>(client, ns), watcher::Config::default())
        .owns(api::<Pod>(client, ns), children_config())
        .owns(api::<Service>(client, ns), children_config())
        .owns(api::<ConfigMap>(client, ns), children_config())
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .shutdown_on_signal();
    let metrics = ctx.metrics.clone();
    count_phases_every(
        controller.store(),
        |t: &SSLTraining| t.status.as_ref().map(|s| s.group.phase).unwrap_or_default(),
        move |phases| metrics.set_phases(phases),
    );
    controller
        .run(training::reconcile, training::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "SSLTraining controller event");
            }
        })
        .await;
}

/// The Benchmark controller, until shutdown; a change of an SSLTraining requeues the Benchmarks
/// that evaluate it (so one waiting for it starts when it succeeds).
async fn run_benchmarks(client: &Client, args: &RunArgs, ctx: Arc<Context>) {
    let ns = args.namespace.as_deref();
    let controller = Controller::new(api::<Benchmark>(client, ns), watcher::Config::default());
    let benchmarks = controller.store();
    let controller = controller
        .owns(api::<Pod>(client, ns), children_config())
        .owns(api::<Service>(client, ns), children_config())
        .owns(api::<ConfigMap>(client, ns), children_config())
        .watches(
            api::<SSLTraining>(client, ns),
            watcher::Config::default(),
            move |training: SSLTraining| {
                let state = benchmarks.state();
                benchmark::requeue_for_training(&training, state.iter().map(|b| b.as_ref()))
            },
        )
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .shutdown_on_signal();
    let metrics = ctx.metrics.clone();
    count_phases_every(
        controller.store(),
        |b: &Benchmark| b.status.as_ref().map(|s| s.group.phase).unwrap_or_default(),
        move |phases| metrics.set_benchmark_phases(phases),
    );
    controller
        .run(benchmark::reconcile, benchmark::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "Benchmark controller event");
            }
        })
        .await;
}
