//! LARC (You, Gitman, Ginsburg, arXiv 1708.03888) as NVIDIA apex implements it: a per-parameter
//! local learning rate applied by rescaling the gradient before plain SGD.

use tch::Tensor;

use super::{LarcConfig, Result};

/// The gradient LARC hands to SGD, which then must apply no weight decay of its own (LARC folds it
/// in). With `n_p = ||param||`, `n_g = ||grad||`:
/// `local = trust * n_p / (n_g + weight_decay * n_p + eps)`, clipped to `min(local / lr, 1)` in
/// clip mode, and the result is `(grad + weight_decay * param) * local`. When either norm is zero
/// the gradient passes unchanged and, as in apex, without weight decay.
///
/// Everything stays on the device: no host synchronisation per parameter.
pub fn larc_gradient(
    param: &Tensor,
    grad: &Tensor,
    weight_decay: f64,
    lr: f64,
    cfg: &LarcConfig,
) -> Result<Tensor> {
    let param_norm = param.f_norm()?;
    let grad_norm = grad.f_norm()?;
    let denominator = grad_norm
        .f_add(&param_norm.f_mul_scalar(weight_decay)?)?
        .f_add_scalar(cfg.eps)?;
    let mut local_lr = param_norm
        .f_mul_scalar(cfg.trust_coefficient)?
        .f_div(&denominator)?;
    if cfg.clip {
        local_lr = local_lr.f_div_scalar(lr)?.f_clamp_max(1.0)?;
    }
    let scaled = grad
        .f_add(&param.f_mul_scalar(weight_decay)?)?
        .f_mul(&local_lr)?;
    let active = param_norm.f_ne(0.0)?.f_logical_and(&grad_norm.f_ne(0.0)?)?;
    Ok(scaled.f_where_self(&active, grad)?)
}
