//! Reconcile of one SSLTraining: observe its pods, resolve its config, decide, act, poll rank 0,
//! and write the status only when it changed.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as Requeue;
use kube::{Client, Resource, ResourceExt};
use vissl_crds::api::{Phase, SSLTraining, SSLTrainingStatus};

use super::config::{resolve, ResolvedConfig};
use super::render::{self, RenderInput, TRAINER_CONTAINER};
use crate::error::{Error, Result};
use crate::group::apply::{namespace_of, publish};
use crate::group::controller::{after_error, instrumented, RESYNC};
use crate::group::{decide, Gang, GroupApi, Observed, ObservedPod, ATTEMPT_LABEL, NODE_RANK_LABEL};
use crate::metrics::Metrics;
use crate::progress;

/// Operator-wide settings from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `configs/` folder of built-in configs (same content as the trainer image's).
    pub configs_root: PathBuf,
    /// Image of pods whose spec names none.
    pub default_image: String,
    /// Poll rank 0's `/status` while running (off in tests that script every API call).
    pub poll_progress: bool,
}

/// Shared by every reconcile.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's series.
    pub metrics: Metrics,
    /// Command-line settings.
    pub settings: Settings,
}

/// Reconciles one SSLTraining (the kube-runtime Controller calls this).
pub async fn reconcile(training: Arc<SSLTraining>, ctx: Arc<Context>) -> Result<Requeue> {
    instrumented(
        &*training,
        &ctx.metrics,
        reconcile_training(&training, &ctx),
    )
    .await
}

/// What the Controller does after a failed reconcile.
pub fn error_policy(training: Arc<SSLTraining>, error: &Error, ctx: Arc<Context>) -> Requeue {
    after_error(&*training, error, &ctx.metrics)
}

async fn reconcile_training(training: &SSLTraining, ctx: &Context) -> Result<Requeue> {
    if training.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the children; creating any now would race it.
        return Ok(Requeue::await_change());
    }
    let namespace = namespace_of(training)?;
    let name = training.name_any();
    let group = GroupApi::new(ctx.client.clone(), &namespace);
    let pods = group.list_pods(&render::selector(&name)).await?;
    let observed: Vec<ObservedPod> = pods
        .iter()
        .map(|p| ObservedPod::from_pod(p, TRAINER_CONTAINER))
        .collect();
    let old = training.status.clone().unwrap_or_default();

    // A finished run needs no config; the others are validated on every pass, so a bad edit is
    // reported before it could reach a pod.
    let resolved: Option<Result<ResolvedConfig, String>> = (!old.group.phase.is_finished())
        .then(|| resolve(&training.spec, &ctx.settings.configs_root));
    let gang = Gang::plan(
        render::pod_group_meta(training)?,
        &training.spec.nodes,
        &training.spec.scheduling,
    );
    let spec_error = resolved
        .as_ref()
        .and_then(|r| r.as_ref().err().cloned())
        .or_else(|| gang.as_ref().err().cloned());
    let gang = gang.ok().flatten();
    let num_nodes = usize::try_from(training.spec.nodes.num_nodes.max(1)).unwrap_or(1);
    let observed = Observed {
        generation: training.metadata.generation,
        num_nodes,
        policy: &training.spec.run_policy,
        spec_error,
        status: &old.group,
        pods: &observed,
        now: Timestamp::now(),
    };
    let mut decision = decide(&observed);
    group
        .prepare_gang(gang.as_ref(), &observed, &mut decision)
        .await?;
    tracing::debug!(?decision.actions, phase = ?decision.status.phase, "decided");

    let config = resolved.and_then(Result::ok);
    group
        .execute(training, &decision.actions, |attempt, ranks| {
            // decide() asks for pods only when the config resolved.
            let config = config.as_ref().ok_or_else(|| Error::MissingField {
                object: format!("{namespace}/{name}"),
                field: "a valid config",
            })?;
            let mut children = render::children(
                training,
                ranks,
                &RenderInput {
                    attempt,
                    config_yaml: &config.yaml,
                    metrics_port: config.metrics_port,
                    default_image: &ctx.settings.default_image,
                },
            )?;
            if let Some(gang) = &gang {
                children.pods.iter_mut().for_each(|pod| gang.join(pod));
            }
            Ok(children)
        })
        .await?;
    publish(&ctx.client, &training.object_ref(&()), &decision.notes).await?;
    if decision.restarted {
        ctx.metrics.group_restarted();
    }

    let mut status = SSLTrainingStatus {
        group: decision.status.clone(),
        progress: old.progress.clone(),
        last_checkpoint: old.last_checkpoint.clone(),
    };
    let running = decision.status.phase == Phase::Running;
    if running && ctx.settings.poll_progress {
        if let (Some(config), Some(ip)) = (&config, rank0_ip(&pods, decision.status.attempt)) {
            if let Some(trainer) = progress::poll(ip, config.metrics_port).await {
                status.progress = Some(trainer.progress());
                if let Some(checkpoint) = trainer.last_checkpoint() {
                    status.last_checkpoint = Some(checkpoint);
                }
            }
        }
    }
    if training.status.as_ref() != Some(&status) {
        group.patch_status(training, &status).await?;
    }

    let mut next = decision.requeue_after;
    if running {
        next = Some(next.map_or(progress::POLL_INTERVAL, |d| d.min(progress::POLL_INTERVAL)));
    }
    Ok(Requeue::requeue(next.unwrap_or(RESYNC)))
}

/// The IP of node 0's pod of this attempt, once it has one.
fn rank0_ip(pods: &[Pod], attempt: i32) -> Option<IpAddr> {
    let attempt = attempt.to_string();
    pods.iter()
        .find(|p| {
            let labels = p.labels();
            labels.get(NODE_RANK_LABEL).map(String::as_str) == Some("0")
                && labels.get(ATTEMPT_LABEL) == Some(&attempt)
        })
        .and_then(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
}
