//! `sgd`: PyTorch's `torch.optim.SGD` update (dampening 0), with our own named state.

use tch::Tensor;

use super::buffers::SlotBuffers;
use super::{OptimizerParams, Result, SlotState, UpdateRule};

/// The registry name.
pub const NAME: &str = "sgd";

const MOMENTUM_BUFFER: &str = "momentum_buffer";

/// SGD with optional (Nesterov) momentum and coupled L2 weight decay:
/// `d = g + wd * p`; `buf = momentum * buf + d` (the first step: `buf = d`);
/// `d = d + momentum * buf` (Nesterov) or `d = buf`; `p -= lr * d`.
pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    /// Per parameter; none until its first step with a gradient (or when momentum is 0).
    buffers: SlotBuffers,
}

impl Sgd {
    /// SGD for `num_params` parameters.
    pub fn new(cfg: &OptimizerParams, num_params: usize) -> Self {
        Self {
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            buffers: SlotBuffers::new(MOMENTUM_BUFFER, num_params),
        }
    }
}

impl UpdateRule for Sgd {
    fn update(
        &mut self,
        slot: usize,
        param: &mut Tensor,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<()> {
        let mut step = if weight_decay != 0.0 {
            grad.f_add(&param.f_mul_scalar(weight_decay)?)?
        } else {
            grad.shallow_clone()
        };
        if self.momentum != 0.0 {
            let buffer = match self.buffers.slot(slot) {
                Some(buffer) => {
                    let _ = buffer.f_mul_scalar_(self.momentum)?;
                    let _ = buffer.f_add_(&step)?;
                    buffer.shallow_clone()
                }
                empty => empty.insert(step.f_detach()?.copy()).shallow_clone(),
            };
            step = if self.nesterov {
                step.f_add(&buffer.f_mul_scalar(self.momentum)?)?
            } else {
                buffer
            };
        }
        let _ = param.f_sub_(&step.f_mul_scalar(lr)?)?;
        Ok(())
    }

    fn save(&self, slot: usize) -> Vec<(&'static str, Tensor)> {
        self.buffers.save(slot)
    }

    fn load(&mut self, slot: usize, state: SlotState) -> Result<()> {
        self.buffers.load(slot, state)
    }

    fn clear(&mut self, slot: usize) {
        self.buffers.clear(slot)
    }
}
