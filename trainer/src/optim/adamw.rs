//! `adamw`: PyTorch's `torch.optim.AdamW` update (Loshchilov & Hutter, arXiv 1711.05101), with our
//! own named state.

use tch::{Device, Kind, Tensor};

use super::{OptimizerParams, Result, SlotState, UpdateRule};

/// The registry name.
pub const NAME: &str = "adamw";

const STEP: &str = "step";
const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MAX_EXP_AVG_SQ: &str = "max_exp_avg_sq";

/// The moments of one parameter.
struct Moments {
    step: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// AMSGrad's running maximum of `exp_avg_sq`.
    max_exp_avg_sq: Option<Tensor>,
}

/// AdamW with decoupled weight decay: `p *= 1 - lr * wd`; `m = lerp(m, g, 1 - b1)`;
/// `v = b2 v + (1 - b2) g^2`; `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`,
/// with `v` replaced by its running maximum under AMSGrad.
pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    amsgrad: bool,
    moments: Vec<Option<Moments>>,
}

impl AdamW {
    /// AdamW for `num_params` parameters.
    pub fn new(cfg: &OptimizerParams, num_params: usize) -> Self {
        Self {
            beta1: cfg.betas[0],
            beta2: cfg.betas[1],
            eps: cfg.eps,
            amsgrad: cfg.amsgrad,
            moments: (0..num_params).map(|_| None).collect(),
        }
    }
}

impl UpdateRule for AdamW {
    fn update(
        &mut self,
        slot: usize,
        param: &mut Tensor,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<()> {
        let amsgrad = self.amsgrad;
        let zeros = || param.f_zeros_like();
        let m = match &mut self.moments[slot] {
            Some(m) => m,
            empty => empty.insert(Moments {
                step: 0,
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
                max_exp_avg_sq: if amsgrad { Some(zeros()?) } else { None },
            }),
        };
        m.step += 1;
        let _ = param.f_mul_scalar_(1.0 - lr * weight_decay)?;
        let _ = m.exp_avg.f_lerp_(grad, 1.0 - self.beta1)?;
        let _ = m.exp_avg_sq.f_mul_scalar_(self.beta2)?;
        let _ = m
            .exp_avg_sq
            .f_add_(&grad.f_mul(grad)?.f_mul_scalar(1.0 - self.beta2)?)?;
        let bias_correction1 = 1.0 - self.beta1.powf(m.step as f64);
        let bias_correction2_sqrt = (1.0 - self.beta2.powf(m.step as f64)).sqrt();
        let second_moment = match &mut m.max_exp_avg_sq {
            Some(max) => {
                let updated = max.f_maximum(&m.exp_avg_sq)?;
                max.f_copy_(&updated)?;
                updated
            }
            None => m.exp_avg_sq.shallow_clone(),
        };
        let denom = second_moment
            .f_sqrt()?
            .f_div_scalar(bias_correction2_sqrt)?
            .f_add_scalar(self.eps)?;
        let step_size = lr / bias_correction1;
        let _ = param.f_sub_(&m.exp_avg.f_div(&denom)?.f_mul_scalar(step_size)?)?;
        Ok(())
    }

    fn save(&self, slot: usize) -> Vec<(&'static str, Tensor)> {
        let Some(m) = &self.moments[slot] else {
            return Vec::new();
        };
        let mut state = vec![
            (
                STEP,
                Tensor::scalar_tensor(m.step, (Kind::Int64, Device::Cpu)),
            ),
            (EXP_AVG, m.exp_avg.copy()),
            (EXP_AVG_SQ, m.exp_avg_sq.copy()),
        ];
        if let Some(max) = &m.max_exp_avg_sq {
            state.push((MAX_EXP_AVG_SQ, max.copy()));
        }
        state
    }

    fn load(&mut self, slot: usize, mut state: SlotState) -> Result<()> {
        let moments = Moments {
            step: state.take_count(STEP)?,
            exp_avg: state.take_like_param(EXP_AVG)?,
            exp_avg_sq: state.take_like_param(EXP_AVG_SQ)?,
            max_exp_avg_sq: if self.amsgrad {
                Some(state.take_like_param(MAX_EXP_AVG_SQ)?)
            } else {
                None
            },
        };
        state.finish()?;
        self.moments[slot] = Some(moments);
        Ok(())
    }

    fn clear(&mut self, slot: usize) {
        self.moments[slot] = None;
    }
}
