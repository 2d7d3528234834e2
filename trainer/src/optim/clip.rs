//! `MODEL.GRAD_CLIP`: scaling all gradients together so that their joint norm stays below a bound
//! (`torch.nn.utils.clip_grad_norm_`, which VISSL's GradClipHook calls after the backward pass).

use tch::Tensor;
use vissl_crds::config::model::GradClipConfig;

use super::{OptimError, Result};

/// Added to the norm before dividing, as PyTorch does, so that a zero norm cannot divide by zero.
const NORM_EPS: f64 = 1e-6;

/// Gradient clipping by the joint `norm_type`-norm of all gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradClip {
    /// The largest joint norm kept.
    pub max_norm: f64,
    /// p of the p-norm; infinity for the largest absolute value.
    pub norm_type: f64,
}

impl GradClip {
    /// The clipping `MODEL.GRAD_CLIP` asks for, or none when `USE_GRAD_CLIP` is off.
    pub fn from_config(cfg: &GradClipConfig) -> Result<Option<Self>> {
        if !cfg.use_grad_clip {
            return Ok(None);
        }
        if !(cfg.max_norm.is_finite() && cfg.max_norm >= 0.0) {
            return Err(config_error(
                "MAX_NORM",
                format!("{} must be a finite number >= 0", cfg.max_norm),
            ));
        }
        if cfg.norm_type.is_nan() || cfg.norm_type <= 0.0 {
            return Err(config_error(
                "NORM_TYPE",
                format!("{} must be a number > 0 or \"inf\"", cfg.norm_type),
            ));
        }
        Ok(Some(Self {
            max_norm: cfg.max_norm,
            norm_type: cfg.norm_type,
        }))
    }

    /// Scales `grads` in place by `min(1, max_norm / (norm + 1e-6))`, where `norm` is the
    /// `norm_type`-norm of all their elements together; returns that norm before clipping (a
    /// 0-d float64 tensor, left on the device).
    pub fn clip(&self, grads: &[Tensor]) -> Result<Tensor> {
        let Some(first) = grads.first() else {
            return Ok(Tensor::from(0.0f64));
        };
        // The p-norm of the per-tensor p-norms is the p-norm of all elements, also for p = inf.
        let norms = grads
            .iter()
            .map(|g| -> Result<Tensor> {
                Ok(g.f_flatten(0, -1)?
                    .f_to_kind(tch::Kind::Double)?
                    .f_norm_scalaropt_dim(self.norm_type, [0i64], false)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let total =
            Tensor::f_stack(&norms, 0)?.f_norm_scalaropt_dim(self.norm_type, [0i64], false)?;
        let scale = total
            .f_add_scalar(NORM_EPS)?
            .f_reciprocal()?
            .f_mul_scalar(self.max_norm)?
            .f_clamp_max(1.0)?
            .f_to_device(first.device())?;
        for grad in grads {
            let _ = grad
                .shallow_clone()
                .f_mul_(&scale.f_to_kind(grad.kind())?)?;
        }
        Ok(total)
    }
}

fn config_error(key: &str, reason: String) -> OptimError {
    OptimError::Config {
        key: format!("MODEL.GRAD_CLIP.{key}"),
        reason,
    }
}
