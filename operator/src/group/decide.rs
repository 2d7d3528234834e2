//! The pod-group lifecycle as a pure function: observed pods + spec policy + current status in,
//! new status + actions + events out. No API calls here, so every state is a unit test.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use vissl_crds::api::{CleanPodPolicy, Condition, ConditionStatus, GroupStatus, Phase, RunPolicy};

use super::observe::{Failure, ObservedPod, PodState};
use super::reasons;

/// Trainer exit codes that no restart can fix: 64 invalid config, 65 invalid data.
pub const PERMANENT_EXIT_CODES: [i32; 2] = [64, 65];

/// How soon to look again while old pods are going away (their deletion also triggers a reconcile).
const WAIT_FOR_DELETION: Duration = Duration::from_secs(5);

/// Everything the decision looks at.
#[derive(Debug, Clone)]
pub struct Observed<'a> {
    /// `metadata.generation` of the resource.
    pub generation: Option<i64>,
    /// Pods in a complete group.
    pub num_nodes: usize,
    /// The resource's run policy.
    pub policy: &'a RunPolicy,
    /// Why the spec cannot run (the config loader's message), if it cannot.
    pub spec_error: Option<String>,
    /// The status as last written.
    pub status: &'a GroupStatus,
    /// The group's pods as listed now (any attempt).
    pub pods: &'a [ObservedPod],
    /// The clock.
    pub now: Timestamp,
}

/// A change to make in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the pods of these node ranks for this attempt (with the Service and ConfigMap they need).
    CreatePods {
        /// Value of the attempt label and of VISSL_RUN_ID's suffix.
        attempt: i32,
        /// Node ranks whose pod is missing.
        ranks: Vec<usize>,
    },
    /// Delete these pods (by name).
    DeletePods(Vec<String>),
    /// Delete the resource itself (ttlSecondsAfterFinished); owner references take the children.
    DeleteResource,
}

/// A Kubernetes Event to emit about the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Warning (something failed) or Normal.
    pub warning: bool,
    /// PascalCase reason, one of [`reasons`].
    pub reason: &'static str,
    /// What the operator did, PascalCase.
    pub action: &'static str,
    /// For people.
    pub message: String,
}

/// What to do and what to report.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status to write (written only if it differs from the observed one).
    pub status: GroupStatus,
    /// Changes to make, in order.
    pub actions: Vec<Action>,
    /// Events to emit.
    pub notes: Vec<Note>,
    /// Look again after this long even without a watch event (timers: deadline, TTL, deletions).
    pub requeue_after: Option<Duration>,
    /// A group restart after a failure was decided (counted in the restart metric).
    pub restarted: bool,
}

/// Decides the next step of a pod group.
pub fn decide(obs: &Observed) -> Decision {
    let mut d = Decision {
        status: obs.status.clone(),
        actions: Vec::new(),
        notes: Vec::new(),
        requeue_after: None,
        restarted: false,
    };
    d.status.observed_generation = obs.generation;

    if d.status.phase.is_finished() {
        finished(obs, &mut d);
        return d;
    }
    if let Some(error) = &obs.spec_error {
        set_condition(
            &mut d.status,
            obs,
            reasons::CONFIG_VALID,
            ConditionStatus::False,
            reasons::INVALID_CONFIG,
            error,
        );
        fail(obs, &mut d, reasons::INVALID_CONFIG, error.clone());
        return d;
    }
    set_condition(
        &mut d.status,
        obs,
        reasons::CONFIG_VALID,
        ConditionStatus::True,
        reasons::CONFIG_RESOLVED,
        "the config resolved and validated for this group",
    );

    if obs.policy.suspend {
        suspend(obs, &mut d);
        return d;
    }
    if d.status.phase == Phase::Suspended {
        // A new attempt: the trainer resumes from the last checkpoint; the deadline counts anew.
        d.status.attempt += 1;
        d.status.start_time = Some(Time(obs.now));
        set_phase(
            obs,
            &mut d.status,
            Phase::Pending,
            reasons::RESUMED,
            "resumed",
        );
        set_condition(
            &mut d.status,
            obs,
            reasons::SUSPENDED,
            ConditionStatus::False,
            reasons::RESUMED,
            "runPolicy.suspend is false again",
        );
        d.notes.push(normal(
            reasons::RESUMED,
            "CreateGroup",
            format!(
                "resumed: starting attempt {} from the last checkpoint",
                d.status.attempt
            ),
        ));
    }
    let start = d.status.start_time.get_or_insert(Time(obs.now)).clone();
    if deadline_passed(obs, &start, &mut d) {
        return d;
    }
    run(obs, &mut d);
    d
}

/// Succeeded or Failed: clean up pods as the policy says, and delete the resource after its TTL.
fn finished(obs: &Observed, d: &mut Decision) {
    let doomed = cleanup(obs.pods, obs.policy.clean_pod_policy);
    if !doomed.is_empty() {
        d.actions.push(Action::DeletePods(doomed));
    }
    let (Some(ttl), Some(done)) = (
        obs.policy.ttl_seconds_after_finished,
        d.status.completion_time.as_ref(),
    ) else {
        return;
    };
    let elapsed = seconds_between(&done.0, &obs.now);
    if elapsed >= ttl {
        d.actions.push(Action::DeleteResource);
        d.notes.push(normal(
            reasons::TTL_EXPIRED,
            "Delete",
            format!("finished {elapsed} s ago; ttlSecondsAfterFinished is {ttl}"),
        ));
    } else {
        d.requeue_after = Some(Duration::from_secs((ttl - elapsed).unsigned_abs()));
    }
}

/// Pods to delete when the run has finished.
fn cleanup(pods: &[ObservedPod], policy: CleanPodPolicy) -> Vec<String> {
    pods.iter()
        .filter(|p| !p.deleting)
        .filter(|p| match policy {
            CleanPodPolicy::All => true,
            CleanPodPolicy::Running => !p.state.is_terminated(),
            CleanPodPolicy::None => false,
        })
        .map(|p| p.name.clone())
        .collect()
}

/// Moves to Failed with this reason, and cleans up at once.
pub(super) fn fail(obs: &Observed, d: &mut Decision, reason: &'static str, message: String) {
    set_phase(obs, &mut d.status, Phase::Failed, reason, &message);
    d.status.completion_time = Some(Time(obs.now));
    d.notes.push(warning(reason, "Fail", message));
    finished(obs, d);
}

fn suspend(obs: &Observed, d: &mut Decision) {
    let doomed: Vec<String> = obs
        .pods
        .iter()
        .filter(|p| !p.deleting)
        .map(|p| p.name.clone())
        .collect();
    if d.status.phase != Phase::Suspended {
        let message = format!("runPolicy.suspend is true: {} pod(s) deleted", doomed.len());
        set_phase(
            obs,
            &mut d.status,
            Phase::Suspended,
            reasons::SUSPENDED,
            &message,
        );
        d.notes
            .push(normal(reasons::SUSPENDED, "DeleteGroup", message));
    }
    if !doomed.is_empty() {
        d.actions.push(Action::DeletePods(doomed));
    }
}

/// Fails the run when activeDeadlineSeconds has passed since `start`; otherwise sets the timer.
fn deadline_passed(obs: &Observed, start: &Time, d: &mut Decision) -> bool {
    let Some(limit) = obs.policy.active_deadline_seconds else {
        return false;
    };
    let elapsed = seconds_between(&start.0, &obs.now);
    if elapsed >= limit {
        let message = format!(
            "ran {elapsed} s, longer than activeDeadlineSeconds ({limit}); pods deleted as cleanPodPolicy says"
        );
        fail(obs, d, reasons::DEADLINE_EXCEEDED, message);
        return true;
    }
    d.requeue_after = Some(Duration::from_secs((limit - elapsed).unsigned_abs()));
    false
}

/// The group runs (or should): restart on failure, wait for old pods, create missing ones, report.
fn run(obs: &Observed, d: &mut Decision) {
    let attempt = d.status.attempt;
    let mut current: BTreeMap<usize, &ObservedPod> = BTreeMap::new();
    let mut stale = Vec::new();
    for pod in obs.pods {
        match pod.node_rank {
            Some(rank) if pod.attempt == Some(attempt) && !pod.deleting && rank < obs.num_nodes => {
                current.insert(rank, pod);
            }
            _ => stale.push(pod),
        }
    }

    if let Some(failure) = first_failure(obs, d.status.phase, attempt, &current, &stale) {
        on_failure(obs, d, failure);
        return;
    }
    if !stale.is_empty() {
        let doomed: Vec<String> = stale
            .iter()
            .filter(|p| !p.deleting)
            .map(|p| p.name.clone())
            .collect();
        let message = format!(
            "waiting for {} pod(s) of an earlier attempt to go away",
            stale.len()
        );
        set_phase(
            obs,
            &mut d.status,
            Phase::Restarting,
            reasons::WAITING_FOR_OLD_PODS,
            &message,
        );
        if !doomed.is_empty() {
            d.actions.push(Action::DeletePods(doomed));
        }
        d.requeue_after = shortest(d.requeue_after, WAIT_FOR_DELETION);
        return;
    }

    let missing: Vec<usize> = (0..obs.num_nodes)
        .filter(|r| !current.contains_key(r))
        .collect();
    if !missing.is_empty() {
        d.notes.push(normal(
            reasons::CREATED_GROUP,
            "CreateGroup",
            format!(
                "creating {} of {} pod(s) (node ranks {}) for attempt {attempt}",
                missing.len(),
                obs.num_nodes,
                join(&missing)
            ),
        ));
        d.actions.push(Action::CreatePods {
            attempt,
            ranks: missing,
        });
        return;
    }

    if current.values().all(|p| p.state == PodState::Succeeded) {
        let message = format!("all {} pod(s) exited 0", obs.num_nodes);
        set_phase(
            obs,
            &mut d.status,
            Phase::Succeeded,
            reasons::SUCCEEDED,
            &message,
        );
        d.status.completion_time = Some(Time(obs.now));
        d.notes
            .push(normal(reasons::SUCCEEDED, "Complete", message));
        finished(obs, d);
        return;
    }
    let started = current
        .values()
        .all(|p| matches!(p.state, PodState::Running | PodState::Succeeded));
    if started && d.status.phase != Phase::Running {
        let message = format!(
            "all {} pod(s) are running (attempt {attempt})",
            obs.num_nodes
        );
        set_phase(
            obs,
            &mut d.status,
            Phase::Running,
            reasons::ALL_PODS_RUNNING,
            &message,
        );
        d.notes.push(normal(reasons::RUNNING, "Run", message));
    }
}

/// The failure that ends this attempt, if any: a failed pod of this attempt, or (once the group
/// ran) a pod of this attempt that was deleted or vanished.
fn first_failure(
    obs: &Observed,
    phase: Phase,
    attempt: i32,
    current: &BTreeMap<usize, &ObservedPod>,
    stale: &[&ObservedPod],
) -> Option<Failure> {
    // A failed pod of this attempt counts even while it is being deleted: its exit code matters.
    if let Some(failure) = obs
        .pods
        .iter()
        .filter(|p| p.attempt == Some(attempt))
        .find_map(|p| match &p.state {
            PodState::Failed(f) => Some(f.clone()),
            _ => None,
        })
    {
        return Some(failure);
    }
    // Before the group ran, a missing pod is one not created yet (or one an interrupted operator
    // did not finish creating); after, it was taken away under a running training.
    if phase != Phase::Running {
        return None;
    }
    if let Some(pod) = stale
        .iter()
        .find(|p| p.deleting && p.attempt == Some(attempt) && !p.state.is_terminated())
    {
        return Some(Failure::deleted(&pod.name));
    }
    (0..obs.num_nodes)
        .find(|r| !current.contains_key(r))
        .map(|r| Failure::deleted(&format!("of node rank {r}")))
}

fn on_failure(obs: &Observed, d: &mut Decision, failure: Failure) {
    if let Some(code) = failure
        .exit_code
        .filter(|c| PERMANENT_EXIT_CODES.contains(c))
    {
        let meaning = if code == 64 {
            "invalid config"
        } else {
            "invalid data"
        };
        let message = format!(
            "{}; exit code {code} means {meaning}, which a restart cannot fix",
            failure.describe()
        );
        fail(obs, d, reasons::PERMANENT_ERROR, message);
        return;
    }
    let limit = obs.policy.backoff_limit;
    if d.status.restarts >= limit {
        let message = format!(
            "{}; {} restart(s) used of backoffLimit {limit}",
            failure.describe(),
            d.status.restarts
        );
        fail(obs, d, reasons::BACKOFF_LIMIT_EXCEEDED, message);
        return;
    }
    d.status.restarts += 1;
    d.status.attempt += 1;
    d.restarted = true;
    let message = format!(
        "{}; restarting the whole group (restart {} of {limit}, attempt {}), resuming from the last checkpoint",
        failure.describe(),
        d.status.restarts,
        d.status.attempt
    );
    set_phase(
        obs,
        &mut d.status,
        Phase::Restarting,
        failure.reason_kind(),
        &message,
    );
    d.notes
        .push(warning(failure.reason_kind(), "RestartGroup", message));
    let doomed: Vec<String> = obs
        .pods
        .iter()
        .filter(|p| !p.deleting)
        .map(|p| p.name.clone())
        .collect();
    if !doomed.is_empty() {
        d.actions.push(Action::DeletePods(doomed));
    }
    d.requeue_after = shortest(d.requeue_after, WAIT_FOR_DELETION);
}

/// The condition types that mirror a phase (Pending has none).
const PHASE_CONDITIONS: [(Phase, &str); 5] = [
    (Phase::Running, reasons::RUNNING),
    (Phase::Restarting, reasons::RESTARTING),
    (Phase::Suspended, reasons::SUSPENDED),
    (Phase::Succeeded, reasons::SUCCEEDED),
    (Phase::Failed, reasons::FAILED),
];

/// Moves to `phase`: its condition becomes True, the other phase conditions that were True become
/// False with the same reason. Nothing changes when the phase is already `phase`.
pub(super) fn set_phase(
    obs: &Observed,
    status: &mut GroupStatus,
    phase: Phase,
    reason: &str,
    message: &str,
) {
    if status.phase == phase {
        return;
    }
    status.phase = phase;
    for (p, type_) in PHASE_CONDITIONS {
        if p == phase {
            set_condition(status, obs, type_, ConditionStatus::True, reason, message);
        } else if status
            .condition(type_)
            .is_some_and(|c| c.status == ConditionStatus::True)
        {
            set_condition(status, obs, type_, ConditionStatus::False, reason, message);
        }
    }
}

/// Sets a condition; its transition time changes only when its status does.
pub(super) fn set_condition(
    status: &mut GroupStatus,
    obs: &Observed,
    type_: &str,
    value: ConditionStatus,
    reason: &str,
    message: &str,
) {
    let fresh = Condition {
        type_: type_.to_string(),
        status: value,
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Some(Time(obs.now)),
        observed_generation: obs.generation,
    };
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) if existing.status == value => {
            existing.reason = fresh.reason;
            existing.message = fresh.message;
            existing.observed_generation = fresh.observed_generation;
        }
        Some(existing) => *existing = fresh,
        None => status.conditions.push(fresh),
    }
}

/// A Normal Event.
pub(super) fn normal(reason: &'static str, action: &'static str, message: String) -> Note {
    Note {
        warning: false,
        reason,
        action,
        message,
    }
}

/// A Warning Event.
pub(super) fn warning(reason: &'static str, action: &'static str, message: String) -> Note {
    Note {
        warning: true,
        reason,
        action,
        message,
    }
}

fn seconds_between(from: &Timestamp, to: &Timestamp) -> i64 {
    to.as_second() - from.as_second()
}

fn shortest(current: Option<Duration>, other: Duration) -> Option<Duration> {
    Some(current.map_or(other, |c| c.min(other)))
}

fn join(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
