//! The hook that keeps [`Metrics`] current and serves them (`HOOKS.PROMETHEUS_SETUP`, rank 0 only).

use super::server::MetricsServer;
use super::{gpu, CheckpointStatus, Metrics, Status};
use crate::engine::hooks::Hook;
use crate::engine::{Phase, Task};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tch::Device;
use vissl_crds::config::PrometheusSetupConfig;

/// Publishes the task's progress at every step and serves it over HTTP.
pub struct MetricsHook {
    metrics: Arc<Metrics>,
    server: MetricsServer,
    step_started: Instant,
    /// Data-wait seconds in total, and the task's per-phase count when last seen (it restarts at 0 with
    /// each phase).
    data_wait_total: f64,
    phase_wait_seen: f64,
    /// Replaced images of finished train phases (the task reports them per phase).
    invalid_images: u64,
    gpu_index: Option<usize>,
    gpu_peak: Option<u64>,
}

impl MetricsHook {
    /// Start serving on the configured address; a port that cannot be bound is an error now, before
    /// training starts.
    pub fn start(cfg: &PrometheusSetupConfig, task: &Task) -> Result<Self> {
        let metrics = Arc::new(Metrics::new().context("creating the metric registry")?);
        let server = MetricsServer::start(&cfg.bind_address, cfg.port, metrics.clone())
            .with_context(|| format!("listening on {}:{}", cfg.bind_address, cfg.port))?;
        tracing::info!(
            address = %server.address(),
            "serving Prometheus metrics on /metrics, health on /healthz, progress on /status"
        );
        let gpu_index = match task.device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        let mut hook = Self {
            metrics,
            server,
            step_started: Instant::now(),
            data_wait_total: 0.0,
            phase_wait_seen: 0.0,
            invalid_images: 0,
            gpu_index,
            gpu_peak: None,
        };
        hook.publish(task, "starting", None);
        Ok(hook)
    }

    /// Where the metrics are served.
    pub fn address(&self) -> SocketAddr {
        self.server.address()
    }

    fn publish(&mut self, task: &Task, state: &str, step_seconds: Option<f64>) {
        let gpu_used = self.gpu_index.and_then(gpu::memory_used);
        if let Some(used) = gpu_used {
            self.gpu_peak = Some(self.gpu_peak.unwrap_or(0).max(used));
        }
        let phase_wait = task.stats.data_wait.as_secs_f64();
        self.data_wait_total += if phase_wait >= self.phase_wait_seen {
            phase_wait - self.phase_wait_seen
        } else {
            phase_wait
        };
        self.phase_wait_seen = phase_wait;
        let ckpt = &task.stats.checkpoints;
        let previous = self.metrics.status();
        let status = Status {
            state: state.to_string(),
            iteration: task.iteration,
            total_iterations: task.total_iterations(),
            epoch: task.epoch,
            num_epochs: task.num_epochs,
            loss: task.last_loss,
            learning_rate: task.lr,
            images_per_second: task.images_per_second(),
            eta_seconds: task.eta().as_secs_f64(),
            data_wait_seconds: self.data_wait_total,
            last_step_seconds: step_seconds.unwrap_or(previous.last_step_seconds),
            invalid_images: self.invalid_images,
            checkpoint: CheckpointStatus {
                last_iteration: ckpt.last_iteration,
                last_location: task.last_checkpoint.as_ref().map(|l| l.to_string()),
                save_seconds: ckpt.last_stall_seconds,
                write_seconds: ckpt.last_write_seconds,
                upload_seconds: ckpt.last_upload_seconds,
                bytes: ckpt.last_bytes,
                saved: ckpt.completed,
                failed: ckpt.failed,
            },
            gpu_memory_used_bytes: gpu_used,
            gpu_memory_peak_bytes: self.gpu_peak,
            run_id: std::env::var("VISSL_RUN_ID").unwrap_or_default(),
            config_hash: if previous.config_hash.is_empty() {
                task.config.hash()
            } else {
                previous.config_hash
            },
            updated_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        self.metrics.publish(status, step_seconds);
    }

    fn state(task: &Task) -> &'static str {
        match task.phase {
            Phase::Train => "training",
            Phase::Test => "testing",
        }
    }
}

impl Hook for MetricsHook {
    fn on_start(&mut self, task: &mut Task) -> Result<()> {
        self.publish(task, "training", None);
        Ok(())
    }

    fn on_phase_start(&mut self, task: &mut Task) -> Result<()> {
        self.step_started = Instant::now();
        self.publish(task, Self::state(task), None);
        Ok(())
    }

    fn on_step(&mut self, task: &mut Task) -> Result<()> {
        let seconds = self.step_started.elapsed().as_secs_f64();
        self.step_started = Instant::now();
        self.publish(task, Self::state(task), Some(seconds));
        Ok(())
    }

    fn on_phase_end(&mut self, task: &mut Task) -> Result<()> {
        if task.phase == Phase::Train {
            self.invalid_images += task.stats.images_replaced;
        }
        self.publish(task, Self::state(task), None);
        Ok(())
    }

    fn on_end(&mut self, task: &mut Task) -> Result<()> {
        self.publish(task, "finished", None);
        Ok(())
    }
}
