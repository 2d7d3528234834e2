//! Which dataset indices a rank reads in an epoch, and in what order: PyTorch's
//! `DistributedSampler`, VISSL's `StatefulDistributedSampler` (resumable mid-epoch) and its
//! debugging `DeterministicDistributedSampler`. Pure index logic.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;
use vissl_crds::config::DataSplitConfig;

use super::{DataError, Result};

/// A permutation of `0..n` that depends only on `seed + epoch` (the seeding both PyTorch's and
/// VISSL's samplers use), so every rank computes the same one.
fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut Pcg64Mcg::seed_from_u64(seed.wrapping_add(epoch)));
    perm
}

fn check_rank(world_size: usize, rank: usize) -> Result<()> {
    if world_size == 0 || rank >= world_size {
        return Err(DataError::Config(format!(
            "sampler: rank {rank} is not in a world of size {world_size}"
        )));
    }
    Ok(())
}

/// PyTorch's `DistributedSampler`: shuffle the whole dataset (seed + epoch), pad it by repeating
/// its head to a multiple of the world size (or, with `drop_last`, cut the tail), and give rank
/// `r` every `world_size`-th index starting at `r`.
#[derive(Debug, Clone, PartialEq)]
pub struct DistributedSampler {
    pub dataset_len: usize,
    pub world_size: usize,
    pub rank: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub drop_last: bool,
}

impl DistributedSampler {
    /// A sampler for `rank` of `world_size`.
    pub fn new(
        dataset_len: usize,
        world_size: usize,
        rank: usize,
        shuffle: bool,
        seed: u64,
        drop_last: bool,
    ) -> Result<Self> {
        check_rank(world_size, rank)?;
        Ok(Self {
            dataset_len,
            world_size,
            rank,
            shuffle,
            seed,
            drop_last,
        })
    }

    /// Indices per rank per epoch.
    pub fn num_samples(&self) -> usize {
        let (n, w) = (self.dataset_len, self.world_size);
        if self.drop_last && n % w != 0 {
            n.saturating_sub(w).div_ceil(w)
        } else {
            n.div_ceil(w)
        }
    }

    /// Indices over all ranks per epoch.
    pub fn total_size(&self) -> usize {
        self.num_samples() * self.world_size
    }

    /// This rank's indices for `epoch`.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let mut all = if self.shuffle {
            permutation(self.dataset_len, self.seed, epoch)
        } else {
            (0..self.dataset_len).collect()
        };
        let total = self.total_size();
        if all.is_empty() {
            return Vec::new();
        }
        // Padding repeats the list from its start as many times as needed (tiny datasets).
        while all.len() < total {
            let missing = (total - all.len()).min(all.len());
            all.extend_from_within(..missing);
        }
        all.truncate(total);
        all.into_iter()
            .skip(self.rank)
            .step_by(self.world_size)
            .collect()
    }
}

/// VISSL's `StatefulDistributedSampler`: rank `r` owns the contiguous block
/// `[r * n, (r + 1) * n)` with `n = len / world_size` (the remainder is dropped), shuffled with
/// seed + epoch; iteration starts at `start_iter * batch_size`, so a resumed run continues at
/// the exact next sample. `shuffle: false` is VISSL's `DeterministicDistributedSampler`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatefulDistributedSampler {
    pub dataset_len: usize,
    pub world_size: usize,
    pub rank: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub start_iter: usize,
    pub shuffle: bool,
}

impl StatefulDistributedSampler {
    /// A sampler for `rank` of `world_size`, starting at iteration 0.
    pub fn new(
        dataset_len: usize,
        world_size: usize,
        rank: usize,
        seed: u64,
        batch_size: usize,
    ) -> Result<Self> {
        check_rank(world_size, rank)?;
        if batch_size == 0 {
            return Err(DataError::Config(
                "StatefulDistributedSampler: batch size must be positive".into(),
            ));
        }
        Ok(Self {
            dataset_len,
            world_size,
            rank,
            seed,
            batch_size,
            start_iter: 0,
            shuffle: true,
        })
    }

    /// Resume at iteration `start_iter` of the epoch.
    pub fn set_start_iter(&mut self, start_iter: usize) {
        self.start_iter = start_iter;
    }

    /// Indices per rank per epoch.
    pub fn num_samples(&self) -> usize {
        self.dataset_len / self.world_size
    }

    /// This rank's full epoch, ignoring `start_iter`.
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        let n = self.num_samples();
        let base = self.rank * n;
        if self.shuffle {
            permutation(n, self.seed, epoch)
                .into_iter()
                .map(|i| base + i)
                .collect()
        } else {
            (base..base + n).collect()
        }
    }

    /// What is left of the epoch from `start_iter` on (VISSL's `__iter__`).
    pub fn remaining_indices(&self, epoch: u64) -> Vec<usize> {
        let mut all = self.indices(epoch);
        let start = self
            .start_iter
            .saturating_mul(self.batch_size)
            .min(all.len());
        all.drain(..start);
        all
    }
}

/// The sampler a split uses, chosen as VISSL's `get_sampler` does.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampler {
    Distributed(DistributedSampler),
    Stateful(StatefulDistributedSampler),
}

impl Sampler {
    /// `USE_DEBUGGING_SAMPLER` -> deterministic, `USE_STATEFUL_DISTRIBUTED_SAMPLER` -> stateful,
    /// else PyTorch's shuffling `DistributedSampler` (it pads; the loader applies `DROP_LAST`).
    pub fn from_config(
        cfg: &DataSplitConfig,
        dataset_len: usize,
        world_size: usize,
        rank: usize,
        seed: u64,
    ) -> Result<Self> {
        let enabled = |v: &serde_yaml::Value| {
            v.get("ENABLED")
                .and_then(serde_yaml::Value::as_bool)
                .unwrap_or(false)
        };
        if enabled(&cfg.stratified_sampler) || enabled(&cfg.power_law_sampler) {
            return Err(DataError::Config(
                "STRATIFIED_SAMPLER and POWER_LAW_SAMPLER are not supported by this trainer".into(),
            ));
        }
        if cfg.use_debugging_sampler || cfg.use_stateful_distributed_sampler {
            let mut s = StatefulDistributedSampler::new(
                dataset_len,
                world_size,
                rank,
                seed,
                cfg.batchsize_per_replica,
            )?;
            s.shuffle = !cfg.use_debugging_sampler;
            Ok(Self::Stateful(s))
        } else {
            Ok(Self::Distributed(DistributedSampler::new(
                dataset_len,
                world_size,
                rank,
                true,
                seed,
                false,
            )?))
        }
    }

    /// This rank's full list of indices for `epoch` (from its first iteration).
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        match self {
            Self::Distributed(s) => s.indices(epoch),
            Self::Stateful(s) => s.indices(epoch),
        }
    }

    /// Indices per rank per epoch.
    pub fn num_samples(&self) -> usize {
        match self {
            Self::Distributed(s) => s.num_samples(),
            Self::Stateful(s) => s.num_samples(),
        }
    }
}
