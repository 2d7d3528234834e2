//! The distributed Sinkhorn-Knopp iterations of SwAV (Caron et al., arXiv 2006.09882, after
//! Cuturi 2013 and Asano et al., arXiv 1911.05371): soft assignments of samples to prototypes
//! whose prototype marginals are uniform over the samples of every rank together.
//!
//! With `Q = exp(S / epsilon)^T` (prototypes x samples), alternately rescale the rows so that each
//! prototype holds `1 / K` of the mass (row sums are summed across ranks) and the columns so that
//! each sample holds `1 / N` (`N` = samples over all ranks); finally every column is scaled to sum
//! to 1. Only sums cross ranks, so `W` ranks with `B` samples each give exactly the assignments of
//! one rank with all `W x B` samples.

use tch::{Kind, Tensor};

use super::{LossContext, Result};

/// Added to `Q` when a prototype's mass underflows to zero, so that its row can be rescaled.
const UNDERFLOW_GUARD: f64 = 1e-12;

/// How to run the iterations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinkhornSettings {
    /// Number of row/column rescaling rounds (`num_iters`).
    pub num_iters: usize,
    /// Temperature of the scores before the exponential (`epsilon`).
    pub epsilon: f64,
    /// Compute in float64 (`use_double_precision`) instead of float32.
    pub double_precision: bool,
}

impl SinkhornSettings {
    /// The tensor kind the iterations (and the loss terms that use them) run in.
    pub fn kind(&self) -> Kind {
        if self.double_precision {
            Kind::Double
        } else {
            Kind::Float
        }
    }
}

/// Soft assignments (`samples x prototypes`, rows summing to 1) of this rank's `scores`
/// (`samples x prototypes`), balanced across the ranks of `ctx`; with `hard`, each row becomes
/// the one-hot vector of its largest entry (`temp_hard_assignment_iters`). Runs without gradient.
pub fn assignments(
    scores: &Tensor,
    settings: &SinkhornSettings,
    hard: bool,
    ctx: &LossContext,
    loss: &'static str,
) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let kind = settings.kind();
    let logits = scores
        .f_detach()?
        .f_to_kind(kind)?
        .f_div_scalar(settings.epsilon)?;
    // Subtracting one constant for all ranks leaves Q unchanged once it is normalised, and keeps
    // exp() finite at small epsilon (VISSL does so in float32 only; float64 overflows there too).
    let shift = max_across_ranks(&logits, ctx, loss)?;
    let mut q = logits.f_sub(&shift)?.f_exp()?.f_tr()?.f_contiguous()?;
    let total = q.f_sum(kind)?;
    ctx.sum_across_ranks(loss, &total)?;
    q = q.f_div(&total)?;

    let (prototypes, samples) = (q.size()[0], q.size()[1]);
    let row_mass = 1.0 / prototypes as f64;
    let column_mass = 1.0 / (ctx.world_size as i64 * samples) as f64;
    for _ in 0..settings.num_iters {
        let mut rows = row_sums(&q, ctx, loss)?;
        if rows.f_eq(0.0)?.f_any()?.int64_value(&[]) != 0 {
            q = q.f_add_scalar(UNDERFLOW_GUARD)?;
            rows = row_sums(&q, ctx, loss)?;
        }
        q = q.f_mul(
            &rows
                .f_reciprocal()?
                .f_mul_scalar(row_mass)?
                .f_unsqueeze(1)?,
        )?;
        let columns = q.f_sum_dim_intlist(&[0i64][..], false, kind)?;
        q = q.f_mul(
            &columns
                .f_reciprocal()?
                .f_mul_scalar(column_mass)?
                .f_unsqueeze(0)?,
        )?;
    }
    let columns = q.f_sum_dim_intlist(&[0i64][..], true, kind)?;
    let q = q.f_div(&columns)?.f_tr()?.f_contiguous()?;
    if !hard {
        return Ok(q);
    }
    let best = q.f_argmax(1, true)?;
    Ok(q.f_zeros_like()?.f_scatter_value(1, &best, 1.0)?)
}

fn row_sums(q: &Tensor, ctx: &LossContext, loss: &'static str) -> Result<Tensor> {
    let rows = q.f_sum_dim_intlist(&[1i64][..], false, q.kind())?;
    ctx.sum_across_ranks(loss, &rows)?;
    Ok(rows)
}

/// The largest entry of `t` over every rank, with the in-place sum as the only collective: each
/// rank writes its maximum into its own slot of a zero vector, the sum collects all slots.
pub(crate) fn max_across_ranks(
    t: &Tensor,
    ctx: &LossContext,
    loss: &'static str,
) -> Result<Tensor> {
    let local = t.f_max()?;
    if ctx.world_size == 1 {
        return Ok(local);
    }
    let slots = Tensor::f_zeros([ctx.world_size as i64], (t.kind(), t.device()))?;
    slots
        .f_narrow(0, ctx.rank as i64, 1)?
        .f_copy_(&local.f_view([1])?)?;
    ctx.sum_across_ranks(loss, &slots)?;
    Ok(slots.f_max()?)
}
