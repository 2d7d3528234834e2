//! VISSL's hook events. Hooks observe and act on the task at nine points of a run; the train loop itself
//! only calls them, so logging, NaN checks, checkpointing and meters stay out of it.

use super::Task;
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
