//! The lifecycle decision over the states a group goes through.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use vissl_crds::api::{CleanPodPolicy, ConditionStatus, GroupStatus, Phase, RunPolicy};

use super::decide::{decide, Action, Decision, Observed};
use super::observe::{Failure, ObservedPod, PodState};
use super::reasons;

const NODES: usize = 2;

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("a valid fixed time")
}

fn ago(seconds: i64) -> Time {
    Time(now() - SignedDuration::from_secs(seconds))
}

fn pod(rank: usize, attempt: i32, state: PodState) -> ObservedPod {
    ObservedPod {
        name: format!("t-node-{rank}"),
        node_rank: Some(rank),
        attempt: Some(attempt),
        state,
        deleting: false,
    }
}

fn deleting(mut pod: ObservedPod) -> ObservedPod {
    pod.deleting = true;
    pod
}

fn exited(rank: usize, code: i32) -> PodState {
    PodState::Failed(Failure {
        pod: format!("t-node-{rank}"),
        container: Some("trainer".into()),
        exit_code: Some(code),
        reason: "Error".into(),
        message: String::new(),
    })
}

fn status(phase: Phase, restarts: i32, attempt: i32) -> GroupStatus {
    GroupStatus {
        phase,
        restarts,
        attempt,
        start_time: Some(ago(30)),
        ..GroupStatus::default()
    }
}

fn run(policy: &RunPolicy, status: &GroupStatus, pods: &[ObservedPod]) -> Decision {
    decide(&Observed {
        generation: Some(1),
        num_nodes: NODES,
        policy,
        spec_error: None,
        status,
        pods,
        now: now(),
    })
}

fn condition(d: &Decision, type_: &str) -> (ConditionStatus, String) {
    let c = d
        .status
        .condition(type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", d.status.conditions));
    (c.status, c.reason.clone())
}

fn reasons_of(d: &Decision) -> Vec<&'static str> {
    d.notes.iter().map(|n| n.reason).collect()
}

/// The status of a group that went Pending -> Running the way the operator sees it.
fn running(attempt: i32) -> GroupStatus {
    let d = run(
        &RunPolicy::default(),
        &status(Phase::Pending, 0, attempt),
        &running_pair(attempt),
    );
    assert_eq!(d.status.phase, Phase::Running);
    d.status
}

/// The status right after pod 1 of attempt 0 failed.
fn restarting() -> GroupStatus {
    let pods = [pod(0, 0, PodState::Running), pod(1, 0, exited(1, 1))];
    run(&RunPolicy::default(), &running(0), &pods).status
}

fn running_pair(attempt: i32) -> Vec<ObservedPod> {
    vec![
        pod(0, attempt, PodState::Running),
        pod(1, attempt, PodState::Running),
    ]
}

#[test]
fn first_reconcile_creates_every_pod_of_attempt_zero() {
    let d = run(&RunPolicy::default(), &GroupStatus::default(), &[]);
    assert_eq!(
        d.actions,
        vec![Action::CreatePods {
            attempt: 0,
            ranks: vec![0, 1]
        }]
    );
    assert_eq!(d.status.phase, Phase::Pending);
    assert_eq!(d.status.start_time, Some(Time(now())));
    assert_eq!(
        condition(&d, reasons::CONFIG_VALID),
        (ConditionStatus::True, reasons::CONFIG_RESOLVED.into())
    );
    assert_eq!(reasons_of(&d), vec![reasons::CREATED_GROUP]);
    assert_eq!(d.status.observed_generation, Some(1));
}

#[test]
fn an_interrupted_creation_is_completed_not_counted_as_a_failure() {
    let pods = [pod(0, 0, PodState::Pending)];
    let d = run(&RunPolicy::default(), &status(Phase::Pending, 0, 0), &pods);
    assert_eq!(
        d.actions,
        vec![Action::CreatePods {
            attempt: 0,
            ranks: vec![1]
        }]
    );
    assert_eq!(d.status.restarts, 0);
}

#[test]
fn pending_pods_keep_the_phase_and_running_pods_make_it_running() {
    let pending = [pod(0, 0, PodState::Running), pod(1, 0, PodState::Pending)];
    let d = run(
        &RunPolicy::default(),
        &status(Phase::Pending, 0, 0),
        &pending,
    );
    assert!(d.actions.is_empty());
    assert_eq!(d.status.phase, Phase::Pending);
    assert!(d.notes.is_empty());

    let d = run(
        &RunPolicy::default(),
        &status(Phase::Pending, 0, 0),
        &running_pair(0),
    );
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(
        condition(&d, reasons::RUNNING),
        (ConditionStatus::True, reasons::ALL_PODS_RUNNING.into())
    );
    assert_eq!(reasons_of(&d), vec![reasons::RUNNING]);
}

#[test]
fn a_steady_state_decides_the_same_status_again() {
    let first = run(
        &RunPolicy::default(),
        &status(Phase::Pending, 0, 0),
        &running_pair(0),
    );
    let second = run(&RunPolicy::default(), &first.status, &running_pair(0));
    assert_eq!(second.status, first.status);
    assert!(second.actions.is_empty() && second.notes.is_empty());
}

#[test]
fn a_failed_pod_restarts_the_whole_group() {
    let pods = [pod(0, 0, PodState::Running), pod(1, 0, exited(1, 1))];
    let d = run(&RunPolicy::default(), &running(0), &pods);
    assert_eq!(d.status.phase, Phase::Restarting);
    assert_eq!((d.status.restarts, d.status.attempt), (1, 1));
    assert!(d.restarted);
    assert_eq!(
        d.actions,
        vec![Action::DeletePods(vec![
            "t-node-0".into(),
            "t-node-1".into()
        ])]
    );
    assert_eq!(
        condition(&d, reasons::RESTARTING),
        (ConditionStatus::True, reasons::POD_FAILED.into())
    );
    assert_eq!(condition(&d, reasons::RUNNING).0, ConditionStatus::False);
    let note = &d.notes[0];
    assert!(note.warning);
    assert_eq!(note.reason, reasons::POD_FAILED);
    assert!(
        note.message.contains("t-node-1") && note.message.contains("exited with code 1"),
        "{}",
        note.message
    );
    assert!(d.requeue_after.is_some());
}

#[test]
fn an_evicted_pod_is_retryable() {
    let evicted = PodState::Failed(Failure {
        pod: "t-node-0".into(),
        container: None,
        exit_code: None,
        reason: "Evicted".into(),
        message: "The node was low on resource: memory.".into(),
    });
    let pods = [pod(0, 0, evicted), pod(1, 0, PodState::Running)];
    let d = run(&RunPolicy::default(), &status(Phase::Running, 0, 0), &pods);
    assert_eq!(d.status.phase, Phase::Restarting);
    assert_eq!(d.status.restarts, 1);
}

#[test]
fn a_pod_deleted_under_a_running_group_restarts_it() {
    let pods = [pod(0, 0, PodState::Running)];
    let d = run(&RunPolicy::default(), &status(Phase::Running, 0, 0), &pods);
    assert_eq!(d.status.restarts, 1);
    assert_eq!(
        condition(&d, reasons::RESTARTING).1,
        reasons::POD_DELETED.to_string()
    );

    let pods = [
        pod(0, 0, PodState::Running),
        deleting(pod(1, 0, PodState::Running)),
    ];
    let d = run(&RunPolicy::default(), &status(Phase::Running, 0, 0), &pods);
    assert_eq!(reasons_of(&d), vec![reasons::POD_DELETED]);
    assert_eq!(d.actions, vec![Action::DeletePods(vec!["t-node-0".into()])]);
}

#[test]
fn pods_of_the_old_attempt_are_waited_for_then_replaced() {
    let restarting = restarting();
    assert_eq!((restarting.restarts, restarting.attempt), (1, 1));
    let old = [
        deleting(pod(0, 0, PodState::Running)),
        pod(1, 0, exited(1, 1)),
    ];
    let d = run(&RunPolicy::default(), &restarting, &old);
    assert_eq!(d.status.phase, Phase::Restarting);
    assert_eq!(d.actions, vec![Action::DeletePods(vec!["t-node-1".into()])]);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(5)));
    assert_eq!(
        d.status.restarts, 1,
        "old pods' failures are not counted again"
    );

    let d = run(&RunPolicy::default(), &restarting, &[]);
    assert_eq!(
        d.actions,
        vec![Action::CreatePods {
            attempt: 1,
            ranks: vec![0, 1]
        }]
    );
    let d = run(&RunPolicy::default(), &restarting, &running_pair(1));
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(condition(&d, reasons::RESTARTING).0, ConditionStatus::False);
}

#[test]
fn exit_code_64_or_65_fails_at_once_and_stops_the_peers() {
    for code in [64, 65] {
        let pods = [pod(0, 0, exited(0, code)), pod(1, 0, PodState::Running)];
        let d = run(&RunPolicy::default(), &status(Phase::Running, 0, 0), &pods);
        assert_eq!(d.status.phase, Phase::Failed);
        assert_eq!(d.status.restarts, 0);
        let (value, reason) = condition(&d, reasons::FAILED);
        assert_eq!(
            (value, reason.as_str()),
            (ConditionStatus::True, reasons::PERMANENT_ERROR)
        );
        let message = &d
            .status
            .condition(reasons::FAILED)
            .map(|c| c.message.clone());
        let message = message.as_deref().unwrap_or_default();
        assert!(
            message.contains("t-node-0") && message.contains(&code.to_string()),
            "{message}"
        );
        assert_eq!(d.status.completion_time, Some(Time(now())));
        // cleanPodPolicy Running (the default): the running peer goes, the failed pod stays.
        assert_eq!(d.actions, vec![Action::DeletePods(vec!["t-node-1".into()])]);
        assert_eq!(reasons_of(&d), vec![reasons::PERMANENT_ERROR]);
    }
}

#[test]
fn a_failure_after_backoff_limit_restarts_fails_the_run() {
    let policy = RunPolicy {
        backoff_limit: 2,
        ..RunPolicy::default()
    };
    let pods = [pod(0, 2, PodState::Running), pod(1, 2, exited(1, 137))];
    let d = run(&policy, &status(Phase::Running, 2, 2), &pods);
    assert_eq!(d.status.phase, Phase::Failed);
    assert_eq!(d.status.restarts, 2);
    assert_eq!(
        condition(&d, reasons::FAILED).1,
        reasons::BACKOFF_LIMIT_EXCEEDED.to_string()
    );
    assert!(!d.restarted);

    let d = run(
        &policy,
        &status(Phase::Running, 1, 1),
        &[pod(0, 1, PodState::Running), pod(1, 1, exited(1, 137))],
    );
    assert_eq!((d.status.phase, d.status.restarts), (Phase::Restarting, 2));
}

#[test]
fn backoff_limit_zero_fails_on_the_first_failure() {
    let policy = RunPolicy {
        backoff_limit: 0,
        ..RunPolicy::default()
    };
    let pods = [pod(0, 0, exited(0, 1)), pod(1, 0, PodState::Running)];
    let d = run(&policy, &status(Phase::Running, 0, 0), &pods);
    assert_eq!(d.status.phase, Phase::Failed);
}

#[test]
fn suspend_deletes_the_pods_once_and_resume_starts_a_new_attempt() {
    let policy = RunPolicy {
        suspend: true,
        ..RunPolicy::default()
    };
    let d = run(&policy, &status(Phase::Running, 1, 3), &running_pair(3));
    assert_eq!(d.status.phase, Phase::Suspended);
    assert_eq!(
        d.actions,
        vec![Action::DeletePods(vec![
            "t-node-0".into(),
            "t-node-1".into()
        ])]
    );
    assert_eq!(reasons_of(&d), vec![reasons::SUSPENDED]);
    assert_eq!(condition(&d, reasons::SUSPENDED).0, ConditionStatus::True);

    let terminating: Vec<ObservedPod> = running_pair(3).into_iter().map(deleting).collect();
    let again = run(&policy, &d.status, &terminating);
    assert!(again.actions.is_empty() && again.notes.is_empty());
    assert_eq!(again.status, d.status);

    let resumed = run(&RunPolicy::default(), &d.status, &[]);
    assert_eq!(resumed.status.phase, Phase::Pending);
    assert_eq!(resumed.status.attempt, 4);
    assert_eq!(resumed.status.restarts, 1, "a resume is not a failure");
    assert_eq!(resumed.status.start_time, Some(Time(now())));
    assert_eq!(
        resumed.actions,
        vec![Action::CreatePods {
            attempt: 4,
            ranks: vec![0, 1]
        }]
    );
    assert_eq!(
        reasons_of(&resumed),
        vec![reasons::RESUMED, reasons::CREATED_GROUP]
    );
    assert_eq!(
        condition(&resumed, reasons::SUSPENDED),
        (ConditionStatus::False, reasons::RESUMED.into())
    );
    let running = run(&RunPolicy::default(), &resumed.status, &running_pair(4));
    assert_eq!(running.status.phase, Phase::Running);
}

#[test]
fn a_training_created_suspended_makes_no_pods() {
    let policy = RunPolicy {
        suspend: true,
        ..RunPolicy::default()
    };
    let d = run(&policy, &GroupStatus::default(), &[]);
    assert_eq!(d.status.phase, Phase::Suspended);
    assert!(d.actions.is_empty());
    assert_eq!(d.status.start_time, None);
}

#[test]
fn the_deadline_fails_the_run_and_removes_the_pods() {
    let policy = RunPolicy {
        active_deadline_seconds: Some(20),
        clean_pod_policy: CleanPodPolicy::All,
        ..RunPolicy::default()
    };
    let d = run(&policy, &status(Phase::Running, 0, 0), &running_pair(0));
    assert_eq!(d.status.phase, Phase::Failed);
    assert_eq!(
        condition(&d, reasons::FAILED).1,
        reasons::DEADLINE_EXCEEDED.to_string()
    );
    assert_eq!(
        d.actions,
        vec![Action::DeletePods(vec![
            "t-node-0".into(),
            "t-node-1".into()
        ])]
    );

    let later = RunPolicy {
        active_deadline_seconds: Some(100),
        ..RunPolicy::default()
    };
    let d = run(&later, &status(Phase::Running, 0, 0), &running_pair(0));
    assert_eq!(d.status.phase, Phase::Running);
    assert_eq!(d.requeue_after, Some(Duration::from_secs(70)));
}

#[test]
fn all_pods_exiting_zero_succeeds_and_keeps_finished_pods_by_default() {
    let done = [
        pod(0, 0, PodState::Succeeded),
        pod(1, 0, PodState::Succeeded),
    ];
    let d = run(&RunPolicy::default(), &status(Phase::Running, 0, 0), &done);
    assert_eq!(d.status.phase, Phase::Succeeded);
    assert_eq!(d.status.completion_time, Some(Time(now())));
    assert!(d.actions.is_empty());
    assert_eq!(reasons_of(&d), vec![reasons::SUCCEEDED]);

    let all = RunPolicy {
        clean_pod_policy: CleanPodPolicy::All,
        ..RunPolicy::default()
    };
    let d = run(&all, &status(Phase::Running, 0, 0), &done);
    assert_eq!(
        d.actions,
        vec![Action::DeletePods(vec![
            "t-node-0".into(),
            "t-node-1".into()
        ])]
    );
}

#[test]
fn node_zero_done_while_a_peer_still_runs_is_not_success_yet() {
    let pods = [pod(0, 0, PodState::Succeeded), pod(1, 0, PodState::Running)];
    let d = run(&RunPolicy::default(), &status(Phase::Running, 0, 0), &pods);
    assert_eq!(d.status.phase, Phase::Running);
}

#[test]
fn an_invalid_config_fails_without_pods() {
    let message =
        "unknown key `config.OPTIMIZER.num_epoch` in command line (did you mean `num_epochs`?)";
    let d = decide(&Observed {
        generation: Some(3),
        num_nodes: NODES,
        policy: &RunPolicy::default(),
        spec_error: Some(message.into()),
        status: &GroupStatus::default(),
        pods: &[],
        now: now(),
    });
    assert_eq!(d.status.phase, Phase::Failed);
    assert!(d.actions.is_empty());
    assert_eq!(
        condition(&d, reasons::CONFIG_VALID),
        (ConditionStatus::False, reasons::INVALID_CONFIG.into())
    );
    assert_eq!(
        condition(&d, reasons::FAILED).1,
        reasons::INVALID_CONFIG.to_string()
    );
    let note = &d.notes[0];
    assert!(note.warning && note.reason == reasons::INVALID_CONFIG);
    assert_eq!(note.message, message);
}

#[test]
fn a_finished_run_is_deleted_after_its_ttl() {
    let policy = RunPolicy {
        ttl_seconds_after_finished: Some(60),
        ..RunPolicy::default()
    };
    let mut finished = status(Phase::Succeeded, 0, 0);
    finished.completion_time = Some(ago(61));
    let d = run(&policy, &finished, &[]);
    assert_eq!(d.actions, vec![Action::DeleteResource]);
    assert_eq!(reasons_of(&d), vec![reasons::TTL_EXPIRED]);

    finished.completion_time = Some(ago(10));
    let d = run(&policy, &finished, &[]);
    assert!(d.actions.is_empty());
    assert_eq!(d.requeue_after, Some(Duration::from_secs(50)));
    assert_eq!(
        d.status,
        GroupStatus {
            observed_generation: Some(1),
            ..finished
        }
    );
}

#[test]
fn a_finished_run_ignores_later_pod_failures() {
    let mut finished = status(Phase::Succeeded, 0, 0);
    finished.completion_time = Some(ago(5));
    let pods = [pod(0, 0, exited(0, 1)), pod(1, 0, PodState::Succeeded)];
    let d = run(&RunPolicy::default(), &finished, &pods);
    assert_eq!(d.status.phase, Phase::Succeeded);
    assert!(d.notes.is_empty());
}
