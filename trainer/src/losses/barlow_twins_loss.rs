//! `barlow_twins_loss`: Barlow Twins (Zbontar et al., arXiv 2103.03230), redundancy reduction
//! between the embeddings of two views.
//!
//! A rank's batch holds `2 n` embeddings, all first views then all second views (what
//! `simclr_collator` produces). The embeddings are standardised per dimension over the *global*
//! batch (both views, every rank; biased variance plus `eps = 1e-5`, VISSL's
//! `SyncNormalizeFunction`), and the cross-correlation of the two views is
//! `c = mean over ranks of (a_r^T b_r / n)`, i.e. `A^T B / N` over the global batch. The loss is
//! `scale_loss * (sum_i (1 - c_ii)^2 + lambda_ * sum_{i != j} c_ij^2)`.
//!
//! Distributed gradients follow VISSL, so that DDP's gradient *average* yields the gradient of the
//! global loss: the mean over ranks is an all-reduce that acts as the identity for gradients (each
//! rank differentiates through its own `a_r^T b_r / n`, which is `world_size` times its share of
//! `c`), and the standardisation statistics come from the differentiable gather, whose backward
//! sums the other ranks' contributions (the synchronised batch-norm backward).

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::{config_error, parse_params, single_output, Loss, LossContext, LossError, Result};

/// The registry name.
pub const NAME: &str = "barlow_twins_loss";

/// The two views of each image.
const NUM_COPIES: i64 = 2;

/// Added to the variance before the square root, as VISSL does.
const NORMALIZE_EPS: f64 = 1e-5;

/// `LOSS.barlow_twins_loss`; defaults are VISSL's.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BarlowTwinsParams {
    /// Weight of the off-diagonal (redundancy) terms.
    pub lambda_: f64,
    /// Factor on the whole loss (from the reference implementation).
    pub scale_loss: f64,
    /// Width of the embeddings (inferred from the head by the config loader).
    pub embedding_dim: usize,
}

impl Default for BarlowTwinsParams {
    fn default() -> Self {
        Self {
            lambda_: 0.0051,
            scale_loss: 0.024,
            embedding_dim: 8192,
        }
    }
}

impl BarlowTwinsParams {
    /// Reads `LOSS.barlow_twins_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }
}

/// The Barlow Twins loss of one rank.
pub struct BarlowTwinsLoss {
    params: BarlowTwinsParams,
    ctx: LossContext,
}

impl BarlowTwinsLoss {
    /// Builds the loss for `ctx`'s rank.
    pub fn new(params: &BarlowTwinsParams, ctx: LossContext) -> Result<Self> {
        if params.embedding_dim == 0 {
            return Err(config_error(
                format!("{NAME}.embedding_dim"),
                "must be positive",
            ));
        }
        for (key, value) in [
            ("lambda_", params.lambda_),
            ("scale_loss", params.scale_loss),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(config_error(
                    format!("{NAME}.{key}"),
                    format!("must be a finite number >= 0, got {value}"),
                ));
            }
        }
        Ok(Self {
            params: params.clone(),
            ctx,
        })
    }

    /// The loss of this rank's `2n x embedding_dim` embeddings (views stacked view-major).
    pub fn loss_of(&self, embedding: &Tensor) -> Result<Tensor> {
        let size = embedding.size();
        let dim = self.params.embedding_dim as i64;
        if size.len() != 2 || size[1] != dim || size[0] < NUM_COPIES || size[0] % NUM_COPIES != 0 {
            return Err(input_error(format!(
                "expects embeddings of shape [2n, {dim}] (n >= 1 images x 2 views, \
                 LOSS.{NAME}.embedding_dim = {dim}), got {size:?}"
            )));
        }
        let n = size[0] / NUM_COPIES;
        let normed = self.standardize_globally(embedding)?;
        let a = normed.f_narrow(0, 0, n)?;
        let b = normed.f_narrow(0, n, n)?;
        let local = a.f_tr()?.f_mm(&b)?.f_div_scalar(n as f64)?;
        let correlation = self.mean_over_ranks(&local)?;

        let on_diag = correlation
            .f_diagonal(0, 0, 1)?
            .f_sub_scalar(1.0)?
            .f_square()?
            .f_sum(embedding.kind())?;
        let off_diag = off_diagonal(&correlation)?
            .f_square()?
            .f_sum(embedding.kind())?;
        Ok(on_diag
            .f_add(&off_diag.f_mul_scalar(self.params.lambda_)?)?
            .f_mul_scalar(self.params.scale_loss)?)
    }

    /// `(x - mean) / sqrt(var + eps)` per column, with mean and biased variance over every rank's
    /// rows; gradients reach the other ranks' rows through the gather's backward.
    fn standardize_globally(&self, embedding: &Tensor) -> Result<Tensor> {
        let all = (self.ctx.gather)(embedding)
            .map_err(|reason| LossError::Gather { loss: NAME, reason })?;
        let mean = all.f_mean_dim([0i64].as_slice(), true, None::<Kind>)?;
        let var =
            all.f_sub(&mean)?
                .f_square()?
                .f_mean_dim([0i64].as_slice(), true, None::<Kind>)?;
        Ok(embedding
            .f_sub(&mean)?
            .f_div(&var.f_add_scalar(NORMALIZE_EPS)?.f_sqrt()?)?)
    }

    /// The mean over ranks of `local`, differentiated as the identity on this rank's term.
    fn mean_over_ranks(&self, local: &Tensor) -> Result<Tensor> {
        if self.ctx.world_size == 1 {
            return Ok(local.shallow_clone());
        }
        let detached = local.f_detach()?;
        let sum = detached.copy();
        self.ctx.sum_across_ranks(NAME, &sum)?;
        let others = sum
            .f_div_scalar(self.ctx.world_size as f64)?
            .f_sub(&detached)?;
        Ok(local.f_add(&others)?)
    }
}

/// The off-diagonal entries of a square matrix, without copying (VISSL's flatten-and-shift view).
fn off_diagonal(x: &Tensor) -> Result<Tensor> {
    let d = x.size()[0];
    if d == 1 {
        return Ok(x.f_flatten(0, -1)?.f_narrow(0, 0, 0)?);
    }
    Ok(x.f_flatten(0, -1)?
        .f_narrow(0, 0, d * d - 1)?
        .f_view([d - 1, d + 1])?
        .f_narrow(1, 1, d)?)
}

fn input_error(reason: String) -> LossError {
    LossError::Input { loss: NAME, reason }
}

impl Loss for BarlowTwinsLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        self.loss_of(single_output(output, NAME)?)
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(BarlowTwinsLoss::new(
        &BarlowTwinsParams::from_yaml(params)?,
        ctx,
    )?))
}
