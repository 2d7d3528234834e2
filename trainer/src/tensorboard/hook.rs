//! `HOOKS.TENSORBOARD_SETUP`: VISSL's TensorBoard scalars and parameter/gradient histograms (rank 0).
//!
//! Scalars every LOG_FREQUENCY iterations (and every 5 of the first 100), as VISSL: `Training/Loss`,
//! `Training/Learning_rate`, `Speed/Batch_processing_time_ms`, `Speed/img_per_sec_per_gpu`,
//! `Speed/Batch_size_per_gpu`, `Speed/ETA_hours`, and `Memory/Peak_GPU_Memory_used_MiB` with a GPU.
//! Histograms `Parameters/<name>` (LOG_PARAMS) and `Gradients/<name>` (LOG_PARAMS_GRADIENTS) before
//! training, at each train phase end and every LOG_PARAMS_EVERY_N_ITERS iterations.

use super::{EventWriter, Histogram, Value};
use crate::engine::hooks::Hook;
use crate::engine::{Phase, Task};
use crate::metrics::gpu;
use crate::storage::{Location, Storage};
use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Buckets of each histogram.
const HISTOGRAM_BINS: usize = 30;

/// Writes the run's event file.
pub struct TensorboardHook {
    writer: EventWriter,
    log_frequency: u64,
    log_params: bool,
    log_gradients: bool,
    params_every: Option<u64>,
    flush_every: Duration,
    last_flush: Instant,
    step_started: Instant,
    batch_size: usize,
    gpu_index: Option<usize>,
    gpu_peak: u64,
    /// Step of the last histograms written, so a phase end on a LOG_PARAMS_EVERY_N_ITERS step logs once.
    histograms_at: Option<i64>,
}

/// `LOG_DIR/EXPERIMENT_LOG_DIR`, where LOG_DIR `.` (the default) means CHECKPOINT.DIR, as VISSL puts
/// TensorBoard logs next to the checkpoints.
pub fn log_dir(task: &Task) -> Result<Location> {
    let cfg = &task.config.hooks.tensorboard_setup;
    let base = if cfg.log_dir.is_empty() || cfg.log_dir == "." {
        task.checkpoint_dir.clone()
    } else {
        Location::parse(&cfg.log_dir).context("HOOKS.TENSORBOARD_SETUP.LOG_DIR")?
    };
    Ok(if cfg.experiment_log_dir.is_empty() {
        base
    } else {
        base.join(&cfg.experiment_log_dir)
    })
}

impl TensorboardHook {
    /// Open the event file (an object-store LOG_DIR is checked for access now).
    pub fn new(task: &Task) -> Result<Self> {
        let cfg = &task.config.hooks.tensorboard_setup;
        let dir = log_dir(task)?;
        let storage = Storage::open(&dir)?;
        storage.check_access()?;
        let writer = EventWriter::create(storage)?;
        tracing::info!(file = %writer.location(), "writing TensorBoard events");
        Ok(Self {
            writer,
            log_frequency: (task.config.log_frequency as u64).max(1),
            log_params: cfg.log_params,
            log_gradients: cfg.log_params_gradients,
            params_every: u64::try_from(cfg.log_params_every_n_iters)
                .ok()
                .filter(|n| *n > 0),
            flush_every: Duration::from_secs(cfg.flush_every_n_min.max(1) * 60),
            last_flush: Instant::now(),
            step_started: Instant::now(),
            batch_size: task.config.data.train.batchsize_per_replica,
            gpu_index: match task.device {
                Device::Cuda(i) => Some(i),
                _ => None,
            },
            gpu_peak: 0,
            histograms_at: None,
        })
    }

    fn histograms(&mut self, task: &Task, step: i64, params: bool, gradients: bool) {
        if self.histograms_at == Some(step) {
            return;
        }
        self.histograms_at = Some(step);
        let mut variables: Vec<(String, Tensor)> = task
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in variables {
            if params {
                self.histogram(&format!("Parameters/{name}"), step, &tensor);
            }
            let grad = tensor.grad();
            if gradients && grad.defined() {
                self.histogram(&format!("Gradients/{name}"), step, &grad);
            }
        }
    }

    fn histogram(&mut self, tag: &str, step: i64, tensor: &Tensor) {
        let flat = tensor.detach().to_kind(Kind::Double).flatten(0, -1);
        match Vec::<f64>::try_from(&flat.to_device(Device::Cpu)) {
            Ok(values) => {
                let histogram = Histogram::from_values(&values, HISTOGRAM_BINS);
                self.writer.add(tag, step, Value::Histogram(&histogram));
            }
            Err(err) => tracing::debug!("no histogram for {tag}: {err}"),
        }
    }

    fn scalar(&mut self, tag: &str, step: i64, value: f64) {
        self.writer.add(tag, step, Value::Scalar(value as f32));
    }

    fn flush(&mut self) -> Result<()> {
        self.last_flush = Instant::now();
        self.writer
            .flush()
            .with_context(|| format!("writing TensorBoard events to {}", self.writer.location()))
    }
}

impl Hook for TensorboardHook {
    fn on_phase_start(&mut self, task: &mut Task) -> Result<()> {
        self.step_started = Instant::now();
        // Parameters as initialised (or resumed), once before training, at step -1 as VISSL.
        if task.phase == Phase::Train && self.log_params && task.stats.losses.is_empty() {
            self.histograms(task, -1, true, false);
        }
        Ok(())
    }

    fn on_step(&mut self, task: &mut Task) -> Result<()> {
        let step_seconds = self.step_started.elapsed().as_secs_f64();
        self.step_started = Instant::now();
        let iteration = task.iteration;
        let step = i64::try_from(iteration).unwrap_or(i64::MAX);
        if let Some(used) = self.gpu_index.and_then(gpu::memory_used) {
            self.gpu_peak = self.gpu_peak.max(used);
        }
        if iteration.is_multiple_of(self.log_frequency)
            || (iteration <= 100 && iteration.is_multiple_of(5))
        {
            self.scalar("Training/Loss", step, task.last_loss);
            self.scalar("Training/Learning_rate", step, task.lr);
            self.scalar(
                "Speed/Batch_processing_time_ms",
                step,
                1000.0 * step_seconds,
            );
            self.scalar("Speed/img_per_sec_per_gpu", step, task.images_per_second());
            self.scalar("Speed/Batch_size_per_gpu", step, self.batch_size as f64);
            self.scalar("Speed/ETA_hours", step, task.eta().as_secs_f64() / 3600.0);
            if self.gpu_index.is_some() {
                let mib = self.gpu_peak as f64 / (1u64 << 20) as f64;
                self.scalar("Memory/Peak_GPU_Memory_used_MiB", step, mib);
            }
        }
        if let Some(every) = self.params_every {
            if iteration.is_multiple_of(every) {
                self.histograms(task, step, self.log_params, self.log_gradients);
            }
        }
        if self.last_flush.elapsed() >= self.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    fn on_phase_end(&mut self, task: &mut Task) -> Result<()> {
        if task.phase != Phase::Train {
            return Ok(());
        }
        let step = i64::try_from(task.iteration).unwrap_or(i64::MAX);
        self.histograms(task, step, self.log_params, self.log_gradients);
        self.flush()
    }

    fn on_end(&mut self, _task: &mut Task) -> Result<()> {
        self.flush()
    }
}
