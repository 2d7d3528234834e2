//! `lars`: VISSL's LARS (You, Gitman, Ginsburg, arXiv 1708.03888, in the form of Barlow Twins'
//! reference code), with our own named state.
//!
//! Unlike LARC (`use_larc`, a gradient rescaling before SGD), LARS is a rule of its own: the weight
//! decay enters the update before the trust ratio, the ratio has no epsilon, and the momentum
//! buffer starts from zero.

use tch::Tensor;

use super::buffers::SlotBuffers;
use super::{OptimizerParams, Result, SlotState, UpdateRule};

/// The registry name.
pub const NAME: &str = "lars";

/// VISSL keeps the buffer under this key.
const MOMENTUM_BUFFER: &str = "mu";

/// LARS: `d = g + wd * p`; unless `p` is excluded, `d *= eta * ||p|| / ||d||` when both norms are
/// positive; `mu = momentum * mu + d` (from `mu = 0`); `p -= lr * mu`. With
/// `exclude_bias_and_norm`, one-dimensional parameters (biases, normalisation scales and shifts)
/// skip the trust ratio but keep weight decay and momentum.
pub struct Lars {
    momentum: f64,
    eta: f64,
    exclude_bias_and_norm: bool,
    /// Per parameter; none until its first step with a gradient.
    buffers: SlotBuffers,
}

impl Lars {
    /// LARS for `num_params` parameters.
    pub fn new(cfg: &OptimizerParams, num_params: usize) -> Self {
        Self {
            momentum: cfg.momentum,
            eta: cfg.eta,
            exclude_bias_and_norm: cfg.exclude_bias_and_norm,
            buffers: SlotBuffers::new(MOMENTUM_BUFFER, num_params),
        }
    }

    /// The trust ratio `eta * ||p|| / ||d||`, or 1 when either norm is zero; a 0-d tensor, so
    /// the step needs no host synchronisation.
    fn trust_ratio(&self, param: &Tensor, update: &Tensor) -> Result<Tensor> {
        let param_norm = param.f_norm()?;
        let update_norm = update.f_norm()?;
        let ratio = param_norm.f_mul_scalar(self.eta)?.f_div(&update_norm)?;
        let defined = param_norm
            .f_gt(0.0)?
            .f_logical_and(&update_norm.f_gt(0.0)?)?;
        Ok(ratio.f_where_self(&defined, &param_norm.f_ones_like()?)?)
    }
}

impl UpdateRule for Lars {
    fn update(
        &mut self,
        slot: usize,
        param: &mut Tensor,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<()> {
        let mut step = grad.f_add(&param.f_mul_scalar(weight_decay)?)?;
        if !(self.exclude_bias_and_norm && param.dim() == 1) {
            step = step.f_mul(&self.trust_ratio(param, &step)?)?;
        }
        let buffer = match self.buffers.slot(slot) {
            Some(buffer) => buffer,
            empty => empty.insert(param.f_zeros_like()?),
        };
        let _ = buffer.f_mul_scalar_(self.momentum)?;
        let _ = buffer.f_add_(&step)?;
        let _ = param.f_sub_(&buffer.f_mul_scalar(lr)?)?;
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
