//! VISSL's hook events. Hooks observe and act on the task at nine points of a run; the train loop itself
//! only calls them, so logging, NaN checks, checkpointing and meters stay out of it.

use super::progress::{Progress, StepStats};
use super::{Phase, Task};
use anyhow::Result;

/// A hook at VISSL's nine events; every method defaults to doing nothing.
pub trait Hook {
    /// The run starts (after resume).
    fn on_start(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// A train or test phase starts.
    fn on_phase_start(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// The model produced its outputs for a batch.
    fn on_forward(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// The loss and meters are computed for a batch.
    fn on_loss_and_meter(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// Gradients are computed.
    fn on_backward(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// The optimizer updated the parameters.
    fn on_update(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// A step is complete.
    fn on_step(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// A phase ended.
    fn on_phase_end(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
    /// The run ends.
    fn on_end(&mut self, _task: &mut Task) -> Result<()> {
        Ok(())
    }
}

/// `HOOKS.CHECK_NAN`: stop at the first non-finite loss, naming the iteration.
pub struct CheckNanHook;

impl Hook for CheckNanHook {
    fn on_loss_and_meter(&mut self, task: &mut Task) -> Result<()> {
        if !task.last_loss.is_finite() {
            anyhow::bail!(
                "loss is {} at iteration {} (epoch {}, {} phase): stopping (HOOKS.CHECK_NAN)",
                task.last_loss,
                task.iteration,
                task.epoch,
                task.phase.name()
            );
        }
        Ok(())
    }
}

/// The hooks the engine installs, by their registry names (`vissl list hooks`).
pub fn names() -> Vec<&'static str> {
    vec![
        "check_nan",
        "log_loss_lr_eta",
        "checkpoint",
        "prometheus",
        "tensorboard",
    ]
}

/// Loss, learning rate, images/s and ETA every LOG_FREQUENCY steps (a live bar on a terminal).
pub struct LogLossLrEtaHook {
    progress: Progress,
}

impl LogLossLrEtaHook {
    /// Log every `log_frequency` steps when not on a terminal.
    pub fn new(log_frequency: u64) -> Self {
        Self {
            progress: Progress::new(log_frequency),
        }
    }
}

impl Hook for LogLossLrEtaHook {
    fn on_step(&mut self, task: &mut Task) -> Result<()> {
        if !task.is_primary() {
            return Ok(());
        }
        let stats = &task.stats;
        let phase_secs = stats.phase_started.elapsed().as_secs_f64().max(1e-9);
        self.progress.step(&StepStats {
            iteration: task.iteration,
            total_iterations: task.total_iterations(),
            epoch: task.epoch,
            num_epochs: task.num_epochs,
            loss: task.last_loss,
            lr: task.lr,
            images_per_s: task.images_per_second(),
            data_wait_fraction: stats.data_wait.as_secs_f64() / phase_secs,
            eta: task.eta(),
        });
        Ok(())
    }

    fn on_phase_end(&mut self, task: &mut Task) -> Result<()> {
        if task.phase == Phase::Train && task.is_primary() {
            self.progress.finish();
            let stats = &task.stats;
            tracing::info!(
                epoch = task.epoch + 1,
                loss = task.last_loss,
                images_per_s = task.images_per_second(),
                data_wait_s = stats.data_wait.as_secs_f64(),
                "train phase done"
            );
        }
        Ok(())
    }

    fn on_end(&mut self, task: &mut Task) -> Result<()> {
        self.progress.finish();
        tracing::info!(
            iterations = task.iteration,
            seconds = task.stats.run_started.elapsed().as_secs_f64(),
            "run finished"
        );
        Ok(())
    }
}

/// CHECKPOINT_FREQUENCY (epochs), CHECKPOINT_ITER_FREQUENCY (steps), and a checkpoint before a planned stop.
pub struct CheckpointHook;

impl Hook for CheckpointHook {
    fn on_step(&mut self, task: &mut Task) -> Result<()> {
        task.poll_checkpoint();
        let epoch_done = task.iteration_in_epoch >= task.iterations_per_epoch;
        if epoch_done {
            // The phase-end checkpoint covers it.
            return Ok(());
        }
        let every = task.config.checkpoint.checkpoint_iter_frequency;
        if (every > 0 && task.iteration.is_multiple_of(every as u64)) || task.stop_requested {
            task.save_checkpoint()?;
        }
        Ok(())
    }

    fn on_phase_end(&mut self, task: &mut Task) -> Result<()> {
        if task.phase != Phase::Train {
            return Ok(());
        }
        let done = task.epoch + 1;
        let every = task.config.checkpoint.checkpoint_frequency.max(1) as u64;
        if done.is_multiple_of(every) || done == task.num_epochs || task.stop_requested {
            task.save_checkpoint()?;
        }
        Ok(())
    }

    fn on_end(&mut self, task: &mut Task) -> Result<()> {
        // A run ends only once its last checkpoint is complete (or known to have failed).
        task.finish_checkpoints()
    }
}
