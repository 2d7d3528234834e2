//! What every controller wraps around its reconcile: a span naming the object, the reconcile
//! metrics, and the retry policy after a failed reconcile.

use std::future::Future;
use std::time::{Duration, Instant};

use kube::runtime::controller::Action as Requeue;
use kube::{Resource, ResourceExt};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How often an object is looked at without any change (a safety net for missed events).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Retry delay after a transient error (API server unavailable, conflict).
pub const RETRY: Duration = Duration::from_secs(5);

/// Runs `reconcile` of `object` inside a `reconcile` span (kind, namespace, name), counted and
/// timed in `metrics`.
pub async fn instrumented<K, F>(object: &K, metrics: &Metrics, reconcile: F) -> Result<Requeue>
where
    K: Resource<DynamicType = ()>,
    F: Future<Output = Result<Requeue>>,
{
    let span = tracing::info_span!(
        "reconcile",
        kind = %K::kind(&()),
        namespace = %object.namespace().unwrap_or_default(),
        name = %object.name_any()
    );
    metrics.reconcile_started();
    let started = Instant::now();
    let result = reconcile.instrument(span).await;
    metrics.reconcile_finished(started.elapsed());
    result
}

/// What the Controller does after a failed reconcile of `object`: count and log it, retry soon
/// when the error is transient, else look again at the resync interval.
pub fn after_error<K>(object: &K, error: &Error, metrics: &Metrics) -> Requeue
where
    K: Resource<DynamicType = ()>,
{
    metrics.reconcile_failed(error);
    tracing::warn!(
        kind = %K::kind(&()),
        namespace = %object.namespace().unwrap_or_default(),
        name = %object.name_any(),
        %error,
        "reconcile failed"
    );
    if error.is_retryable() {
        Requeue::requeue(RETRY)
    } else {
        Requeue::requeue(RESYNC)
    }
}
