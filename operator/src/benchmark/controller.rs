//! Reconcile of one Benchmark: find the model (waiting for its SSLTraining), resolve the config,
//! run the shared pod-group lifecycle, and read the results rank 0 reports when it succeeds.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use vissl_crds::api::{
    Benchmark, BenchmarkStatus, ConditionStatus, GroupStatus, Phase, SSLTraining,
};

use super::config::resolve;
use super::render::{self, RenderInput};
use super::results;
use crate::error::{Error, Result};
use crate::group::apply::{namespace_of, publish};
use crate::group::controller::{after_error, instrumented, RESYNC};
use crate::group::{decide, gate, Gang, GroupApi, Note, Observed, ObservedPod};
use crate::training::Context;
use crate::workload::render::TRAINER_CONTAINER;

/// Condition type: the model to evaluate is known and available.
pub const MODEL_READY: &str = "ModelReady";
/// ModelReady=False while the SSLTraining is missing or has not succeeded yet.
pub const WAITING_FOR_TRAINING: &str = "WaitingForTraining";
/// ModelReady=False and Failed: the SSLTraining failed.
pub const TRAINING_FAILED: &str = "TrainingFailed";
/// ModelReady=False and Failed: the SSLTraining succeeded but names no checkpoint location.
pub const NO_CHECKPOINT: &str = "NoCheckpoint";
/// ModelReady=True: the SSLTraining succeeded; its checkpoint is used.
pub const TRAINING_SUCCEEDED: &str = "TrainingSucceeded";
/// ModelReady=True: spec.model.checkpointUrl is used.
pub const CHECKPOINT_GIVEN: &str = "CheckpointGiven";
/// Condition type: the results from rank 0 are in the status.
pub const RESULTS_RECORDED: &str = "ResultsRecorded";
/// ResultsRecorded=True and a Normal Event.
pub const RESULTS_READ: &str = "ResultsRead";
/// ResultsRecorded=False and a Warning Event: rank 0's termination message held no results.
pub const INVALID_RESULTS: &str = "InvalidResults";

/// Where the model stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Model {
    /// Known: evaluate `location`, reading it with `secret`.
    Ready {
        /// The checkpoint folder or file (MODEL.WEIGHTS_INIT.PARAMS_FILE).
        location: String,
        /// The Secret whose keys let the trainer read it.
        secret: Option<String>,
        /// ModelReady's reason.
        reason: &'static str,
        /// ModelReady's message.
        message: String,
    },
    /// Not yet (the message says what it waits for).
    Waiting(String),
    /// Never: the benchmark fails with this reason.
    Unavailable(&'static str, String),
}

/// Decides the model from the spec, the recorded status and the referenced SSLTraining (`None`:
/// it does not exist). Pure, so every case is a unit test.
pub fn model_of(benchmark: &Benchmark, training: Option<&SSLTraining>) -> Model {
    let source = &benchmark.spec.model;
    let spec_secret = source.credentials_secret.clone();
    let namespace = benchmark.namespace().unwrap_or_default();
    if let Some(url) = &source.checkpoint_url {
        return Model::Ready {
            location: url.clone(),
            secret: spec_secret,
            reason: CHECKPOINT_GIVEN,
            message: format!("evaluating spec.model.checkpointUrl {url}"),
        };
    }
    let Some(name) = &source.training else {
        // The CEL rule rejects this; an object stored before the rule existed still gets a reason.
        return Model::Unavailable(
            NO_CHECKPOINT,
            "spec.model names neither training nor checkpointUrl".into(),
        );
    };
    let training_secret = training
        .and_then(|t| t.spec.checkpoint.as_ref())
        .and_then(|c| c.credentials_secret.clone());
    let secret = spec_secret.or(training_secret);
    // Once chosen, the model stays: a restarted group evaluates the same checkpoint even if the
    // training has been deleted since.
    if let Some(location) = benchmark.status.as_ref().and_then(|s| s.model.clone()) {
        return Model::Ready {
            location,
            secret,
            reason: TRAINING_SUCCEEDED,
            message: format!("SSLTraining {name} succeeded; evaluating its checkpoint"),
        };
    }
    let Some(training) = training else {
        return Model::Waiting(format!(
            "waiting for SSLTraining {name} (not found in namespace {namespace}) to succeed"
        ));
    };
    let status = training.status.clone().unwrap_or_default();
    match status.group.phase {
        Phase::Succeeded => {
            let location = status.last_checkpoint.map(|c| c.url).or_else(|| {
                training
                    .spec
                    .checkpoint
                    .as_ref()
                    .and_then(|c| c.url.clone())
            });
            match location {
                Some(location) => Model::Ready {
                    message: format!("SSLTraining {name} succeeded; evaluating {location}"),
                    location,
                    secret,
                    reason: TRAINING_SUCCEEDED,
                },
                None => Model::Unavailable(
                    NO_CHECKPOINT,
                    format!(
                        "SSLTraining {name} succeeded but has no status.lastCheckpoint and no \
                         spec.checkpoint.url: its checkpoints stayed inside its pods"
                    ),
                ),
            }
        }
        Phase::Failed => {
            let why = status
                .group
                .condition(crate::group::reasons::FAILED)
                .map(|c| format!(": {} ({})", c.message, c.reason))
                .unwrap_or_default();
            Model::Unavailable(TRAINING_FAILED, format!("SSLTraining {name} failed{why}"))
        }
        phase => Model::Waiting(format!(
            "waiting for SSLTraining {name} to succeed (it is {})",
            phase.as_str()
        )),
    }
}

/// The Benchmarks (among `benchmarks`) that evaluate `training`: they are looked at again when it
/// changes.
pub fn requeue_for_training<'a>(
    training: &SSLTraining,
    benchmarks: impl IntoIterator<Item = &'a Benchmark>,
) -> Vec<ObjectRef<Benchmark>> {
    let name = training.name_any();
    let namespace = training.namespace();
    benchmarks
        .into_iter()
        .filter(|b| b.namespace() == namespace)
        .filter(|b| b.spec.model.training.as_deref() == Some(name.as_str()))
        .map(ObjectRef::from_obj)
        .collect()
}

/// Reconciles one Benchmark (the kube-runtime Controller calls this).
pub async fn reconcile(benchmark: Arc<Benchmark>, ctx: Arc<Context>) -> Result<Requeue> {
    instrumented(
        &*benchmark,
        &ctx.metrics,
        reconcile_benchmark(&benchmark, &ctx),
    )
    .await
}

/// What the Controller does after a failed reconcile.
pub fn error_policy(benchmark: Arc<Benchmark>, error: &Error, ctx: Arc<Context>) -> Requeue {
    after_error(&*benchmark, error, &ctx.metrics)
}

async fn reconcile_benchmark(benchmark: &Benchmark, ctx: &Context) -> Result<Requeue> {
    if benchmark.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes the children; creating any now would race it.
        return Ok(Requeue::await_change());
    }
    let namespace = namespace_of(benchmark)?;
    let name = benchmark.name_any();
    let group = GroupApi::new(ctx.client.clone(), &namespace);
    let pods = group.list_pods(&render::selector(&name)).await?;
    let observed: Vec<ObservedPod> = pods
        .iter()
        .map(|p| ObservedPod::from_pod(p, TRAINER_CONTAINER))
        .collect();
    let old = benchmark.status.clone().unwrap_or_default();
    let finished = old.group.phase.is_finished();

    let training = match (&benchmark.spec.model.training, finished) {
        (Some(training), false) => {
            Api::<SSLTraining>::namespaced(ctx.client.clone(), &namespace)
                .get_opt(training)
                .await?
        }
        _ => None,
    };
    let model = (!finished).then(|| model_of(benchmark, training.as_ref()));
    let location = match &model {
        Some(Model::Ready { location, .. }) => Some(location.as_str()),
        _ => None,
    };
    // Validated on every pass, before the model is known too, so a bad config is reported at once.
    let resolved =
        (!finished).then(|| resolve(&benchmark.spec, location, &ctx.settings.configs_root));
    let gang = Gang::plan(
        render::pod_group_meta(benchmark)?,
        &benchmark.spec.nodes,
        &benchmark.spec.scheduling,
    );
    let spec_error = resolved
        .as_ref()
        .and_then(|r| r.as_ref().err().cloned())
        .or_else(|| gang.as_ref().err().cloned());
    let gang = gang.ok().flatten();
    let num_nodes = usize::try_from(benchmark.spec.nodes.num_nodes.max(1)).unwrap_or(1);
    let obs = Observed {
        generation: benchmark.metadata.generation,
        num_nodes,
        policy: &benchmark.spec.run_policy,
        spec_error: spec_error.clone(),
        status: &old.group,
        pods: &observed,
        now: Timestamp::now(),
    };
    // The lifecycle decides a finished, misconfigured or suspended benchmark by itself; otherwise
    // the model must be ready before it may create pods.
    let gated = spec_error.is_none() && !benchmark.spec.run_policy.suspend;
    let mut decision = match &model {
        Some(Model::Waiting(message)) if gated => {
            gate::wait(&obs, MODEL_READY, WAITING_FOR_TRAINING, message)
        }
        Some(Model::Unavailable(reason, message)) if gated => {
            gate::reject(&obs, MODEL_READY, reason, message)
        }
        _ => decide(&obs),
    };
    group
        .prepare_gang(gang.as_ref(), &obs, &mut decision)
        .await?;
    let mut status = BenchmarkStatus {
        group: decision.status.clone(),
        ..old.clone()
    };
    let mut secret = None;
    if let Some(Model::Ready {
        location,
        secret: model_secret,
        reason,
        message,
    }) = &model
    {
        gate::mark(
            &mut decision.status,
            &obs,
            MODEL_READY,
            ConditionStatus::True,
            reason,
            message,
        );
        status.model = Some(location.clone());
        secret = model_secret.clone();
    }
    tracing::debug!(?decision.actions, phase = ?decision.status.phase, "decided");

    let config = resolved.and_then(Result::ok);
    group
        .execute(benchmark, &decision.actions, |attempt, ranks| {
            // decide() asks for pods only when the config resolved and the model is ready.
            let config = config.as_ref().ok_or_else(|| Error::MissingField {
                object: format!("{namespace}/{name}"),
                field: "a valid config",
            })?;
            let mut children = render::children(
                benchmark,
                ranks,
                &RenderInput {
                    attempt,
                    config_yaml: &config.yaml,
                    default_image: &ctx.settings.default_image,
                    model_secret: secret.as_deref(),
                },
            )?;
            if let Some(gang) = &gang {
                children.pods.iter_mut().for_each(|pod| gang.join(pod));
            }
            Ok(children)
        })
        .await?;
    if decision.restarted {
        ctx.metrics.group_restarted();
    }

    if decision.status.phase == Phase::Succeeded && !finished {
        let message = results::termination_message(&pods, decision.status.attempt);
        let note = record_results(&mut status, &mut decision.status, &obs, message.as_deref());
        decision.notes.push(note);
    }
    status.group = decision.status.clone();
    publish(&ctx.client, &benchmark.object_ref(&()), &decision.notes).await?;
    if benchmark.status.as_ref() != Some(&status) {
        group.patch_status(benchmark, &status).await?;
    }
    Ok(Requeue::requeue(decision.requeue_after.unwrap_or(RESYNC)))
}

/// Puts rank 0's results into the status (with condition ResultsRecorded) and returns the Event
/// to emit; an unusable message leaves the phase Succeeded (the pods did their work) but says why.
pub(crate) fn record_results(
    status: &mut BenchmarkStatus,
    group: &mut GroupStatus,
    obs: &Observed,
    message: Option<&str>,
) -> Note {
    match results::parse(message.unwrap_or_default()) {
        Ok(report) => {
            status.top1 = report.top1();
            status.results_url = report.output.clone();
            status.results = report.results;
            let mut text = match status.top1 {
                Some(top1) => format!("top-1 {top1:.2}%"),
                None => "results recorded".to_string(),
            };
            if let Some(url) = &status.results_url {
                text.push_str(&format!("; all results in {url}"));
            }
            if report.truncated {
                text.push_str(" (the status holds the first rows only)");
            }
            gate::mark(
                group,
                obs,
                RESULTS_RECORDED,
                ConditionStatus::True,
                RESULTS_READ,
                &text,
            );
            gate::inform(RESULTS_READ, "RecordResults", text)
        }
        Err(why) => {
            gate::mark(
                group,
                obs,
                RESULTS_RECORDED,
                ConditionStatus::False,
                INVALID_RESULTS,
                &why,
            );
            gate::warn(INVALID_RESULTS, "RecordResults", why)
        }
    }
}
