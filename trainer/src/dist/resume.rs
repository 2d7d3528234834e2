//! Which checkpoints a run may resume from when its process layout differs from the writer's.
//!
//! A checkpoint records the layout that wrote it ([`RunLayout`], in the manifest's `extra`). At an
//! epoch boundary any layout can continue: the next epoch starts from a fresh permutation, and only the
//! iteration count is re-expressed in the new run's iterations per epoch. Mid-epoch, the position must
//! name the same samples: with PyTorch's `DistributedSampler` rank `r` reads every `world`-th index of
//! one shared permutation, so after `k` iterations exactly the first `k x global batch` indices are
//! consumed whatever the world size; the same global batch (and iterations per epoch) therefore
//! resumes exactly. VISSL's `StatefulDistributedSampler` gives each rank a contiguous block, which
//! depends on the world size, so it resumes mid-epoch only under the same layout.

use super::{DistError, Result};
use crate::checkpoint::Position;
use serde::{Deserialize, Serialize};
use vissl_crds::config::Config;

/// The key of the layout inside a checkpoint manifest's `extra`.
const EXTRA_KEY: &str = "dist_layout";

/// How a run splits its data over processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLayout {
    /// Ranks.
    pub world_size: usize,
    /// `DATA.TRAIN.BATCHSIZE_PER_REPLICA`.
    pub batch_size_per_replica: usize,
    /// VISSL's stateful (contiguous-block) sampler rather than PyTorch's interleaving one.
    pub stateful_sampler: bool,
    /// Iterations of one epoch.
    pub iterations_per_epoch: u64,
}

impl RunLayout {
    /// The layout of a run of `config` on `world_size` processes.
    pub fn of(config: &Config, world_size: usize, iterations_per_epoch: u64) -> Self {
        let train = &config.data.train;
        Self {
            world_size,
            batch_size_per_replica: train.batchsize_per_replica,
            stateful_sampler: train.use_stateful_distributed_sampler || train.use_debugging_sampler,
            iterations_per_epoch,
        }
    }

    /// Images per iteration over all ranks.
    pub fn global_batch(&self) -> usize {
        self.world_size * self.batch_size_per_replica
    }

    /// The manifest `extra` value that records this layout.
    pub fn to_extra(&self) -> serde_json::Value {
        serde_json::json!({ EXTRA_KEY: self })
    }

    /// The layout recorded in a manifest's `extra` (none for checkpoints written before it was).
    pub fn from_extra(extra: &serde_json::Value) -> Option<Self> {
        serde_json::from_value(extra.get(EXTRA_KEY)?.clone()).ok()
    }

    fn describe(&self) -> String {
        format!(
            "world size {} x batch {} per replica ({} sampler, {} iterations per epoch)",
            self.world_size,
            self.batch_size_per_replica,
            if self.stateful_sampler {
                "stateful"
            } else {
                "distributed"
            },
            self.iterations_per_epoch
        )
    }
}

/// Where this run (`current`) continues from a checkpoint at `position` written under `saved`; an
/// error explains why it cannot.
pub fn resume_position(
    current: &RunLayout,
    saved: Option<&RunLayout>,
    position: &Position,
) -> Result<Position> {
    let Some(saved) = saved.filter(|s| *s != current) else {
        return Ok(position.clone());
    };
    if position.iteration_in_epoch == 0 {
        return Ok(Position {
            iteration: position.epoch * current.iterations_per_epoch,
            epoch: position.epoch,
            iteration_in_epoch: 0,
        });
    }
    let same_samples = !saved.stateful_sampler
        && !current.stateful_sampler
        && saved.global_batch() == current.global_batch()
        && saved.iterations_per_epoch == current.iterations_per_epoch;
    if same_samples {
        return Ok(position.clone());
    }
    Err(DistError::Inconsistent(format!(
        "cannot resume in the middle of epoch {} (iteration {}): the checkpoint was written by {}, this run \
         is {}; mid-epoch resume needs the same global batch with the distributed sampler, or the same \
         layout; resume from an end-of-epoch checkpoint or run with the checkpoint's DISTRIBUTED.* and \
         BATCHSIZE_PER_REPLICA",
        position.epoch,
        position.iteration,
        saved.describe(),
        current.describe()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(world_size: usize, batch: usize, stateful: bool, per_epoch: u64) -> RunLayout {
        RunLayout {
            world_size,
            batch_size_per_replica: batch,
            stateful_sampler: stateful,
            iterations_per_epoch: per_epoch,
        }
    }

    fn pos(iteration: u64, epoch: u64, iteration_in_epoch: u64) -> Position {
        Position {
            iteration,
            epoch,
            iteration_in_epoch,
        }
    }

    #[test]
    fn same_global_batch_resumes_mid_epoch_exactly() {
        let saved = layout(2, 8, false, 4);
        let current = layout(1, 16, false, 4);
        let p = pos(6, 1, 2);
        assert_eq!(resume_position(&current, Some(&saved), &p).ok(), Some(p));
    }

    #[test]
    fn epoch_boundary_resumes_under_any_layout() {
        // Two epochs of 4 iterations (world 2 x 8) continue as epoch 2 of a 2 iterations-per-epoch run.
        let saved = layout(2, 8, true, 4);
        let current = layout(4, 8, false, 2);
        let got = resume_position(&current, Some(&saved), &pos(8, 2, 0)).expect("resumes");
        assert_eq!(got, pos(4, 2, 0));
    }

    #[test]
    fn mid_epoch_with_another_split_is_refused_with_both_layouts() {
        let err = resume_position(
            &layout(1, 8, false, 8),
            Some(&layout(2, 8, false, 4)),
            &pos(2, 0, 2),
        )
        .expect_err("different global batch");
        let msg = err.to_string();
        assert!(msg.contains("world size 2 x batch 8"), "{msg}");
        assert!(msg.contains("world size 1 x batch 8"), "{msg}");
        // The stateful sampler's blocks depend on the world size even at the same global batch.
        assert!(resume_position(
            &layout(1, 16, true, 4),
            Some(&layout(2, 8, true, 4)),
            &pos(2, 0, 2)
        )
        .is_err());
    }

    #[test]
    fn layout_round_trips_through_the_manifest_extra() {
        let l = layout(2, 8, false, 4);
        assert_eq!(RunLayout::from_extra(&l.to_extra()), Some(l));
        assert_eq!(RunLayout::from_extra(&serde_json::Value::Null), None);
    }
}
