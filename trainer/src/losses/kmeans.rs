//! Spherical k-means over a memory bank split across ranks (DeepClusterV2, Caron et al.,
//! arXiv 2006.09882, appendix): centroids start at `K` embeddings of rank 0, then each round
//! assigns every embedding to its most similar centroid (dot product) and moves each centroid
//! with members to the L2-normalised mean of its members over all ranks. A final assignment
//! follows the last round. Only sums cross ranks, so W ranks give the clusters of one rank
//! holding all their embeddings.

use tch::{Kind, Tensor};

use super::{l2_normalize_rows, LossContext, LossError, Result};

/// The centroids (`K x dim`) and this rank's assignment of each memory row (`rows`, int64).
pub struct Clusters {
    /// Unit-norm centroids.
    pub centroids: Tensor,
    /// The centroid index of each row of the local memory.
    pub assignments: Tensor,
}

/// Clusters `memory` (`rows x dim`, unit rows) into `k` clusters in `iterations` rounds; the
/// starting rows of rank 0 are drawn from `seed`.
pub fn cluster(
    memory: &Tensor,
    k: usize,
    iterations: usize,
    seed: u64,
    ctx: &LossContext,
    loss: &'static str,
) -> Result<Clusters> {
    let _guard = tch::no_grad_guard();
    let (rows, dim) = (memory.size()[0], memory.size()[1]);
    if (rows as usize) < k {
        return Err(LossError::Input {
            loss,
            reason: format!(
                "k-means needs at least as many memory rows per rank ({rows}) as clusters ({k}); \
                 reduce num_clusters or train on more images"
            ),
        });
    }
    let device = memory.device();
    // Broadcast from rank 0 as a sum with zeros from the others.
    let mut centroids = if ctx.rank == 0 {
        let picks: Vec<i64> = first_of_permutation(rows as usize, k, seed)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        memory.f_index_select(0, &Tensor::f_from_slice(&picks)?.f_to_device(device)?)?
    } else {
        Tensor::f_zeros([k as i64, dim], (memory.kind(), device))?
    };
    ctx.sum_across_ranks(loss, &centroids)?;
    let mut assignments = nearest(memory, &centroids)?;
    for _ in 0..iterations {
        let sums = Tensor::f_zeros([k as i64, dim], (memory.kind(), device))?.f_index_add(
            0,
            &assignments,
            memory,
        )?;
        let counts = Tensor::f_zeros([k as i64], (memory.kind(), device))?.f_index_add(
            0,
            &assignments,
            &Tensor::f_ones([rows], (memory.kind(), device))?,
        )?;
        ctx.sum_across_ranks(loss, &sums)?;
        ctx.sum_across_ranks(loss, &counts)?;
        let has_members = counts.f_gt(0.0)?.f_unsqueeze(1)?;
        let means = sums.f_div(&counts.f_clamp_min(1.0)?.f_unsqueeze(1)?)?;
        // A cluster that lost all its members keeps its centroid.
        centroids = l2_normalize_rows(&means.f_where_self(&has_members, &centroids)?)?;
        assignments = nearest(memory, &centroids)?;
    }
    Ok(Clusters {
        centroids,
        assignments,
    })
}

/// The index of the most similar centroid for each row.
fn nearest(memory: &Tensor, centroids: &Tensor) -> Result<Tensor> {
    Ok(memory
        .f_mm(&centroids.f_tr()?)?
        .f_argmax(1, false)?
        .f_to_kind(Kind::Int64)?)
}

/// The first `k` entries of a permutation of `0..n` drawn from `seed` (Fisher-Yates with
/// splitmix64), independent of libtorch's generator so that resumed runs draw the same rows.
pub fn first_of_permutation(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = super::seeded::SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        order.swap(i, j);
    }
    order.truncate(k.min(n));
    order
}
