//! Training metrics for people and machines: a Prometheus registry (`vissl_*` series) and the same numbers
//! as a JSON status, served by rank 0 over HTTP (`/metrics`, `/healthz`, `/status`; see [`server`]) and fed
//! by [`hook::MetricsHook`] at every step.
//!
//! One [`Status`] value is the source of truth: the hook fills it, and [`Metrics::publish`] copies it into
//! the Prometheus series, so `/status` and `/metrics` never disagree.

pub mod gpu;
pub mod hook;
pub mod server;

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use serde::Serialize;
use std::sync::Mutex;

/// Where a run stands, as `/status` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    /// `starting`, `training`, `testing` or `finished`.
    pub state: String,
    pub iteration: u64,
    pub total_iterations: u64,
    /// Epochs completed plus the one in progress, counted from 0.
    pub epoch: u64,
    pub num_epochs: u64,
    pub loss: f64,
    pub learning_rate: f64,
    /// Source images per second since the phase started.
    pub images_per_second: f64,
    pub eta_seconds: f64,
    /// Time spent waiting for the next batch, in total.
    pub data_wait_seconds: f64,
    /// Wall time of the last step (data wait included).
    pub last_step_seconds: f64,
    /// Images replaced after a load failure, in total.
    pub invalid_images: u64,
    pub checkpoint: CheckpointStatus,
    /// Device memory in use and the most seen, where a GPU is present.
    pub gpu_memory_used_bytes: Option<u64>,
    pub gpu_memory_peak_bytes: Option<u64>,
    /// VISSL_RUN_ID, when the operator set it.
    pub run_id: String,
    pub config_hash: String,
    /// Seconds since the Unix epoch of the last update.
    pub updated_at: f64,
}

/// Checkpoint part of [`Status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckpointStatus {
    /// Iteration of the newest complete checkpoint.
    pub last_iteration: Option<u64>,
    /// Where it is.
    pub last_location: Option<String>,
    /// Time the last save held up training.
    pub save_seconds: f64,
    /// Serialising and uploading the last completed checkpoint.
    pub write_seconds: f64,
    pub upload_seconds: f64,
    pub bytes: u64,
    pub saved: u64,
    pub failed: u64,
}

/// The metric series, with their names, help and labels in one place (README "Metrics" lists them).
pub struct Metrics {
    registry: Registry,
    status: Mutex<Status>,
    loss: Gauge,
    learning_rate: Gauge,
    images_per_second: Gauge,
    iteration: IntGauge,
    epoch: IntGauge,
    total_iterations: IntGauge,
    eta_seconds: Gauge,
    data_wait_seconds: Counter,
    step_seconds: Histogram,
    last_step_seconds: Gauge,
    checkpoint_save_seconds: Gauge,
    checkpoint_write_seconds: Gauge,
    checkpoint_upload_seconds: Gauge,
    checkpoint_bytes: IntGauge,
    checkpoint_last_iteration: IntGauge,
    checkpoints_saved: IntCounter,
    checkpoints_failed: IntCounter,
    invalid_images: IntCounter,
    gpu_memory_used: IntGauge,
    gpu_memory_peak: IntGauge,
    state: IntGaugeVec,
    info: IntGaugeVec,
}

/// The values `state` takes.
const STATES: [&str; 4] = ["starting", "training", "testing", "finished"];

fn register<T: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<T>,
) -> prometheus::Result<T> {
    let metric = metric?;
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    /// A registry holding every `vissl_*` series.
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let gauge = |name: &str, help: &str| register(&r, Gauge::new(name, help));
        let int_gauge = |name: &str, help: &str| register(&r, IntGauge::new(name, help));
        let int_counter = |name: &str, help: &str| register(&r, IntCounter::new(name, help));
        let metrics = Self {
            loss: gauge("vissl_loss", "Training loss of the last step.")?,
            learning_rate: gauge("vissl_learning_rate", "Learning rate of the last step.")?,
            images_per_second: gauge(
                "vissl_images_per_second",
                "Source images per second since the phase started (this rank).",
            )?,
            iteration: int_gauge("vissl_iteration", "Training iterations done.")?,
            epoch: int_gauge("vissl_epoch", "Epoch in progress, counted from 0.")?,
            total_iterations: int_gauge("vissl_total_iterations", "Iterations of the whole run.")?,
            eta_seconds: gauge(
                "vissl_eta_seconds",
                "Estimated seconds to the end of training.",
            )?,
            data_wait_seconds: register(
                &r,
                Counter::new(
                    "vissl_data_wait_seconds_total",
                    "Seconds spent waiting for the next batch.",
                ),
            )?,
            step_seconds: register(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new("vissl_step_seconds", "Wall time of a training step.")
                        .buckets(prometheus::exponential_buckets(0.01, 2.0, 14)?),
                ),
            )?,
            last_step_seconds: gauge(
                "vissl_last_step_seconds",
                "Wall time of the last training step.",
            )?,
            checkpoint_save_seconds: gauge(
                "vissl_checkpoint_save_seconds",
                "Seconds the last checkpoint save held up training.",
            )?,
            checkpoint_write_seconds: gauge(
                "vissl_checkpoint_write_seconds",
                "Seconds serialising the last completed checkpoint.",
            )?,
            checkpoint_upload_seconds: gauge(
                "vissl_checkpoint_upload_seconds",
                "Seconds writing or uploading the last completed checkpoint.",
            )?,
            checkpoint_bytes: int_gauge(
                "vissl_checkpoint_bytes",
                "Size of the last completed checkpoint.",
            )?,
            checkpoint_last_iteration: int_gauge(
                "vissl_checkpoint_last_iteration",
                "Iteration of the newest complete checkpoint (-1: none).",
            )?,
            checkpoints_saved: int_counter(
                "vissl_checkpoints_saved_total",
                "Checkpoints saved by this process.",
            )?,
            checkpoints_failed: int_counter(
                "vissl_checkpoint_failures_total",
                "Checkpoint saves that failed in this process.",
            )?,
            invalid_images: int_counter(
                "vissl_invalid_images_total",
                "Images that could not be loaded and were replaced.",
            )?,
            gpu_memory_used: int_gauge(
                "vissl_gpu_memory_used_bytes",
                "GPU memory in use on this rank's device (0 without a GPU).",
            )?,
            gpu_memory_peak: int_gauge(
                "vissl_gpu_memory_peak_bytes",
                "Most GPU memory seen in use on this rank's device (0 without a GPU).",
            )?,
            state: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("vissl_state", "1 for the state the run is in."),
                    &["state"],
                ),
            )?,
            info: register(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "vissl_run_info",
                        "Constant 1, labelled with the run's identity.",
                    ),
                    &["run_id", "config_hash"],
                ),
            )?,
            registry: r,
            status: Mutex::new(Status {
                state: "starting".into(),
                ..Status::default()
            }),
        };
        metrics.checkpoint_last_iteration.set(-1);
        metrics.state.with_label_values(&["starting"]).set(1);
        Ok(metrics)
    }

    /// Make `status` the current one: the JSON status and every series at once. `step_seconds` adds an
    /// observation to the step-time histogram.
    pub fn publish(&self, status: Status, step_seconds: Option<f64>) {
        let mut current = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.loss.set(status.loss);
        self.learning_rate.set(status.learning_rate);
        self.images_per_second.set(status.images_per_second);
        self.iteration.set(as_i64(status.iteration));
        self.epoch.set(as_i64(status.epoch));
        self.total_iterations.set(as_i64(status.total_iterations));
        self.eta_seconds.set(status.eta_seconds);
        self.last_step_seconds.set(status.last_step_seconds);
        if let Some(s) = step_seconds {
            self.step_seconds.observe(s);
        }
        // Counters only grow: add what is new since the last status.
        let wait = status.data_wait_seconds - current.data_wait_seconds;
        if wait > 0.0 {
            self.data_wait_seconds.inc_by(wait);
        }
        self.invalid_images
            .inc_by(status.invalid_images.saturating_sub(current.invalid_images));
        let (new, old) = (&status.checkpoint, &current.checkpoint);
        self.checkpoints_saved
            .inc_by(new.saved.saturating_sub(old.saved));
        self.checkpoints_failed
            .inc_by(new.failed.saturating_sub(old.failed));
        self.checkpoint_save_seconds.set(new.save_seconds);
        self.checkpoint_write_seconds.set(new.write_seconds);
        self.checkpoint_upload_seconds.set(new.upload_seconds);
        self.checkpoint_bytes.set(as_i64(new.bytes));
        self.checkpoint_last_iteration
            .set(new.last_iteration.map_or(-1, as_i64));
        self.gpu_memory_used
            .set(as_i64(status.gpu_memory_used_bytes.unwrap_or(0)));
        self.gpu_memory_peak
            .set(as_i64(status.gpu_memory_peak_bytes.unwrap_or(0)));
        for state in STATES {
            self.state
                .with_label_values(&[state])
                .set(i64::from(state == status.state));
        }
        if (&status.run_id, &status.config_hash) != (&current.run_id, &current.config_hash) {
            self.info.reset();
            self.info
                .with_label_values(&[status.run_id.as_str(), status.config_hash.as_str()])
                .set(1);
        }
        *current = status;
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail except on malformed metrics, which
        // registration already rejected.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!("encoding metrics: {err}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an unlabelled series in a text exposition.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn publish_sets_gauges_and_grows_counters_by_the_difference() {
        let metrics = Metrics::new().unwrap();
        let mut status = Status {
            state: "training".into(),
            iteration: 10,
            loss: 2.5,
            data_wait_seconds: 1.5,
            invalid_images: 3,
            run_id: "r1".into(),
            config_hash: "abc".into(),
            ..Status::default()
        };
        status.checkpoint.saved = 1;
        status.checkpoint.last_iteration = Some(8);
        metrics.publish(status.clone(), Some(0.2));
        status.iteration = 11;
        status.loss = 2.25;
        status.data_wait_seconds = 2.0;
        status.invalid_images = 5;
        metrics.publish(status.clone(), Some(0.3));
        let text = metrics.render();
        assert_eq!(sample(&text, "vissl_loss"), 2.25);
        assert_eq!(sample(&text, "vissl_iteration"), 11.0);
        assert_eq!(sample(&text, "vissl_data_wait_seconds_total"), 2.0);
        assert_eq!(sample(&text, "vissl_invalid_images_total"), 5.0);
        assert_eq!(sample(&text, "vissl_checkpoints_saved_total"), 1.0);
        assert_eq!(sample(&text, "vissl_checkpoint_last_iteration"), 8.0);
        assert_eq!(sample(&text, "vissl_step_seconds_count"), 2.0);
        assert!((sample(&text, "vissl_step_seconds_sum") - 0.5).abs() < 1e-12);
        assert!(text.contains("vissl_state{state=\"training\"} 1"));
        assert!(text.contains("vissl_state{state=\"starting\"} 0"));
        assert!(text.contains("vissl_run_info{config_hash=\"abc\",run_id=\"r1\"} 1"));
        assert_eq!(metrics.status(), status);
    }
}
