//! The operator's Prometheus series (served on `/metrics` by [`crate::http`]).

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use vissl_crds::api::Phase;

use crate::error::Error;

/// Every series, with names, help and labels in one place.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounter,
    errors: IntCounterVec,
    duration: Histogram,
    trainings: IntGaugeVec,
    benchmarks: IntGaugeVec,
    restarts: IntCounter,
}

impl Metrics {
    /// Builds and registers the series (fails only if a definition is invalid: a bug).
    pub fn new() -> prometheus::Result<Self> {
        let reconciles = IntCounter::new(
            "vissl_operator_reconciles_total",
            "Reconciles started, of every resource.",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "vissl_operator_reconcile_errors_total",
                "Reconciles that ended in an error, by error kind.",
            ),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "vissl_operator_reconcile_duration_seconds",
                "Time one reconcile took (API calls and the progress poll included).",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )?;
        let trainings = IntGaugeVec::new(
            Opts::new(
                "vissl_operator_trainings",
                "SSLTrainings the operator watches, by phase.",
            ),
            &["phase"],
        )?;
        let benchmarks = IntGaugeVec::new(
            Opts::new(
                "vissl_operator_benchmarks",
                "Benchmarks the operator watches, by phase.",
            ),
            &["phase"],
        )?;
        let restarts = IntCounter::new(
            "vissl_operator_group_restarts_total",
            "Pod groups torn down and recreated after a failure.",
        )?;
        let registry = Registry::new();
        for collector in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(trainings.clone()),
            Box::new(benchmarks.clone()),
            Box::new(restarts.clone()),
        ] {
            registry.register(collector)?;
        }
        for phase in Phase::ALL {
            trainings.with_label_values(&[phase.as_str()]).set(0);
            benchmarks.with_label_values(&[phase.as_str()]).set(0);
        }
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            duration,
            trainings,
            benchmarks,
            restarts,
        })
    }

    /// A reconcile started.
    pub fn reconcile_started(&self) {
        self.reconciles.inc();
    }

    /// A reconcile finished after `elapsed`.
    pub fn reconcile_finished(&self, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// A reconcile failed.
    pub fn reconcile_failed(&self, error: &Error) {
        self.errors.with_label_values(&[error.metric_label()]).inc();
    }

    /// A group was restarted after a failure.
    pub fn group_restarted(&self) {
        self.restarts.inc();
    }

    /// Sets the trainings-by-phase gauge from the watched objects' phases.
    pub fn set_phases(&self, phases: impl IntoIterator<Item = Phase>) {
        count_phases(&self.trainings, phases);
    }

    /// Sets the benchmarks-by-phase gauge from the watched objects' phases.
    pub fn set_benchmark_phases(&self, phases: impl IntoIterator<Item = Phase>) {
        count_phases(&self.benchmarks, phases);
    }

    /// The Prometheus text format of every series.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into memory fails only on invalid metric families, which static ones are not.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

/// Sets a by-phase gauge: every phase gets its count, zero included.
fn count_phases(gauge: &IntGaugeVec, phases: impl IntoIterator<Item = Phase>) {
    let mut counts = [0i64; Phase::ALL.len()];
    for phase in phases {
        if let Some(i) = Phase::ALL.iter().position(|p| *p == phase) {
            counts[i] += 1;
        }
    }
    for (phase, count) in Phase::ALL.iter().zip(counts) {
        gauge.with_label_values(&[phase.as_str()]).set(count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_series_is_exported_with_its_labels() {
        let m = Metrics::new().expect("metrics");
        m.reconcile_started();
        m.reconcile_started();
        m.reconcile_finished(Duration::from_millis(20));
        m.reconcile_failed(&Error::MissingField {
            object: "ns/x".into(),
            field: "metadata.uid",
        });
        m.group_restarted();
        m.set_phases([Phase::Running, Phase::Running, Phase::Failed]);
        m.set_benchmark_phases([Phase::Succeeded]);
        let text = m.render();
        assert_eq!(value(&text, "vissl_operator_reconciles_total"), Some(2.0));
        assert_eq!(
            value(
                &text,
                "vissl_operator_reconcile_errors_total{kind=\"missing_field\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_reconcile_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_trainings{phase=\"Running\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_trainings{phase=\"Failed\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_trainings{phase=\"Pending\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_benchmarks{phase=\"Succeeded\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_benchmarks{phase=\"Running\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "vissl_operator_group_restarts_total"),
            Some(1.0)
        );
    }
}
