//! Leader election with a coordination.k8s.io/v1 Lease, so two replicas never reconcile at once:
//! the leader renews the Lease; a standby takes it over only after it expired. Writes use the
//! Lease's resourceVersion, so two candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;

use crate::error::Result;

/// Which Lease, who we are, and the timing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica (pod name or host name plus process id).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the leader renews (well below `duration`).
    pub renew_every: Duration,
}

/// Whether `identity` may write itself into the Lease at `now`: it holds it already, nobody does,
/// or the holder stopped renewing.
pub fn may_take(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let (Some(renewed), Some(seconds)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return true;
    };
    renewed.0 + SignedDuration::from_secs(i64::from(seconds)) < now
}

fn lease_seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1)
}

/// One attempt to become (or stay) the leader; `Ok(false)`: someone else leads.
pub async fn try_lead(client: &Client, config: &LeaseConfig) -> Result<bool> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(lease_seconds(config.duration)),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(false),
            Err(e) => Err(e.into()),
        };
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if !may_take(&spec, &config.identity, now) {
        return Ok(false);
    }
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(lease_seconds(config.duration));
    lease.spec = Some(spec);
    // replace() sends the resourceVersion we read: a concurrent writer makes it fail with 409.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Waits until this replica leads.
pub async fn acquire(client: &Client, config: &LeaseConfig) {
    loop {
        match try_lead(client, config).await {
            Ok(true) => {
                tracing::info!(lease = %config.name, identity = %config.identity, "became the leader");
                return;
            }
            Ok(false) => tracing::debug!(lease = %config.name, "another replica leads; waiting"),
            Err(error) => {
                tracing::warn!(lease = %config.name, %error, "leader election failed; retrying")
            }
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

/// Renews the Lease until a renewal fails for longer than the Lease lasts; then returns (the
/// caller stops reconciling: another replica may lead by now).
pub async fn hold(client: &Client, config: &LeaseConfig) {
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        match try_lead(client, config).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %config.name, "lost the leadership to another replica");
                return;
            }
            Err(error) => {
                tracing::warn!(lease = %config.name, %error, "cannot renew the lease");
                if last_renewal.elapsed() >= config.duration {
                    tracing::error!(lease = %config.name, "lease expired without renewal");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_seconds_ago: i64) -> (LeaseSpec, Timestamp) {
        let now = Timestamp::from_second(1_800_000_000).expect("a valid time");
        let spec = LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(
                now - SignedDuration::from_secs(renewed_seconds_ago),
            )),
            ..LeaseSpec::default()
        };
        (spec, now)
    }

    #[test]
    fn a_live_lease_of_another_replica_is_respected() {
        let (spec, now) = lease("other", 5);
        assert!(!may_take(&spec, "me", now));
    }

    #[test]
    fn an_expired_lease_or_our_own_or_an_empty_one_can_be_taken() {
        let (spec, now) = lease("other", 16);
        assert!(may_take(&spec, "me", now));
        let (spec, now) = lease("me", 5);
        assert!(may_take(&spec, "me", now));
        assert!(may_take(&LeaseSpec::default(), "me", now));
    }
}
