//! The command line: `vissl-operator [run] [flags]` and `vissl-operator crd`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use kube::{Api, Client};
use vissl_crds::api::SSLTraining;

use crate::group::{MANAGED_BY_LABEL, MANAGER};
use crate::http::{self, Endpoints};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::telemetry::{self, LogFormat};
use crate::training::{error_policy, reconcile, Context, Settings};

/// Reconciles SSLTraining resources into multi-node VISSL training pod groups.
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
    /// Print the SSLTraining CustomResourceDefinition as YAML.
    Crd,
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
        Some(Command::Crd) => {
            let yaml = vissl_crds::api::ssl_training_crd_yaml().context("cannot render the CRD")?;
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
        "starting the SSLTraining controller"
    );

    let (trainings, pods, services, config_maps) = match &args.namespace {
        Some(ns) => (
            Api::<SSLTraining>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let children = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let controller = Controller::new(trainings, watcher::Config::default())
        .owns(pods, children.clone())
        .owns(services, children.clone())
        .owns(config_maps, children)
        .with_config(ControllerConfig::default().concurrency(args.concurrency))
        .shutdown_on_signal();

    let store = controller.store();
    let phase_metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            phase_metrics.set_phases(
                store
                    .state()
                    .iter()
                    .map(|t| t.status.as_ref().map(|s| s.group.phase).unwrap_or_default()),
            );
        }
    });

    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
        settings: Settings {
            configs_root,
            default_image: args.default_image.clone(),
            poll_progress: true,
        },
    });
    let reconciling = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "controller event");
            }
        });
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
