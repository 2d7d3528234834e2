//! A precondition outside the pod group (such as the model a Benchmark evaluates) that must hold
//! before [`decide`](super::decide()) may create pods: wait for it, or give up on it. Both keep the
//! lifecycle's vocabulary (phases, conditions, Events) in one place.

use vissl_crds::api::{ConditionStatus, GroupStatus, Phase};

use super::decide::{decide, fail, normal, set_condition, set_phase, warning, Decision, Observed};

/// Not ready yet: stay Pending (no pods) with condition `type_`=False; one Event when the reason or
/// message changes. A finished resource only gets its cleanup.
pub fn wait(obs: &Observed, type_: &str, reason: &'static str, message: &str) -> Decision {
    let unchanged = obs.status.condition(type_).is_some_and(|c| {
        c.status == ConditionStatus::False && c.reason == reason && c.message == message
    });
    let Some(mut d) = unmet(obs, type_, reason, message) else {
        return decide(obs);
    };
    set_phase(obs, &mut d.status, Phase::Pending, reason, message);
    if !unchanged {
        d.notes.push(normal(reason, "Wait", message.to_string()));
    }
    d
}

/// Can never be met: Failed with `reason`, condition `type_`=False, a Warning Event, and the pods
/// cleaned up as the policy says. A finished resource only gets its cleanup.
pub fn reject(obs: &Observed, type_: &str, reason: &'static str, message: &str) -> Decision {
    let Some(mut d) = unmet(obs, type_, reason, message) else {
        return decide(obs);
    };
    fail(obs, &mut d, reason, message.to_string());
    d
}

/// Sets condition `type_` on a status the lifecycle decided (its transition time moves only when
/// its value changes).
pub fn mark(
    status: &mut GroupStatus,
    obs: &Observed,
    type_: &str,
    value: ConditionStatus,
    reason: &str,
    message: &str,
) {
    set_condition(status, obs, type_, value, reason, message);
}

/// A Warning Event with this reason (for what a caller finds after the lifecycle decided).
pub fn warn(reason: &'static str, action: &'static str, message: String) -> super::Note {
    warning(reason, action, message)
}

/// A Normal Event with this reason.
pub fn inform(reason: &'static str, action: &'static str, message: String) -> super::Note {
    normal(reason, action, message)
}

/// What [`wait`] and [`reject`] start from: condition `type_`=False on the observed status, or
/// `None` for a finished resource (which only gets the lifecycle's cleanup).
fn unmet(obs: &Observed, type_: &str, reason: &str, message: &str) -> Option<Decision> {
    if obs.status.phase.is_finished() {
        return None;
    }
    let mut d = blank(obs);
    set_condition(
        &mut d.status,
        obs,
        type_,
        ConditionStatus::False,
        reason,
        message,
    );
    Some(d)
}

fn blank(obs: &Observed) -> Decision {
    let mut status = obs.status.clone();
    status.observed_generation = obs.generation;
    Decision {
        status,
        actions: Vec::new(),
        notes: Vec::new(),
        requeue_after: None,
        restarted: false,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;
    use vissl_crds::api::{Phase, RunPolicy};

    use super::*;
    use crate::group::decide::Action;

    fn observed<'a>(status: &'a GroupStatus, policy: &'a RunPolicy) -> Observed<'a> {
        Observed {
            generation: Some(3),
            num_nodes: 1,
            policy,
            spec_error: None,
            status,
            pods: &[],
            now: Timestamp::from_second(1_800_000_000).expect("a valid time"),
        }
    }

    #[test]
    fn waiting_stays_pending_with_a_false_condition_and_one_event() {
        let policy = RunPolicy::default();
        let fresh = GroupStatus::default();
        let first = wait(
            &observed(&fresh, &policy),
            "ModelReady",
            "WaitingForTraining",
            "waiting for t",
        );
        assert_eq!(first.status.phase, Phase::Pending);
        assert!(first.actions.is_empty(), "no pods while waiting");
        let condition = first
            .status
            .condition("ModelReady")
            .expect("ModelReady condition");
        assert_eq!(condition.status, ConditionStatus::False);
        assert_eq!(condition.reason, "WaitingForTraining");
        assert_eq!(first.status.observed_generation, Some(3));
        assert_eq!(first.notes.len(), 1);
        assert!(!first.notes[0].warning);

        let again = wait(
            &observed(&first.status, &policy),
            "ModelReady",
            "WaitingForTraining",
            "waiting for t",
        );
        assert!(again.notes.is_empty(), "the same wait is reported once");
        assert_eq!(again.status, first.status);
        let changed = wait(
            &observed(&first.status, &policy),
            "ModelReady",
            "WaitingForTraining",
            "t is Running",
        );
        assert_eq!(changed.notes.len(), 1, "a new message is reported");
    }

    #[test]
    fn rejecting_fails_with_the_reason_and_a_warning() {
        let policy = RunPolicy::default();
        let fresh = GroupStatus::default();
        let d = reject(
            &observed(&fresh, &policy),
            "ModelReady",
            "TrainingFailed",
            "t failed",
        );
        assert_eq!(d.status.phase, Phase::Failed);
        assert!(d.status.completion_time.is_some());
        let failed = d.status.condition("Failed").expect("Failed condition");
        assert_eq!(
            (failed.status, failed.reason.as_str()),
            (ConditionStatus::True, "TrainingFailed")
        );
        let model = d
            .status
            .condition("ModelReady")
            .expect("ModelReady condition");
        assert_eq!(model.status, ConditionStatus::False);
        assert!(d
            .notes
            .iter()
            .any(|n| n.warning && n.reason == "TrainingFailed"));
    }

    #[test]
    fn a_finished_resource_only_gets_cleanup() {
        let policy = RunPolicy {
            ttl_seconds_after_finished: Some(0),
            ..RunPolicy::default()
        };
        let mut done = GroupStatus {
            phase: Phase::Succeeded,
            ..GroupStatus::default()
        };
        done.completion_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::from_second(1_700_000_000).expect("a valid time"),
        ));
        let d = wait(
            &observed(&done, &policy),
            "ModelReady",
            "WaitingForTraining",
            "x",
        );
        assert_eq!(d.status.phase, Phase::Succeeded);
        assert!(d.actions.contains(&Action::DeleteResource));
        assert!(d.status.condition("ModelReady").is_none());
    }
}
