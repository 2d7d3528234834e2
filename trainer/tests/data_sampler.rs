//! Samplers: partitions across ranks, padding, epoch shuffling, mid-epoch resume.

mod data_common;

use std::collections::BTreeMap;

use data_common::split_config;
use vissl_trainer::data::sampler::{DistributedSampler, Sampler, StatefulDistributedSampler};

fn counts(lists: &[Vec<usize>]) -> BTreeMap<usize, usize> {
    let mut c = BTreeMap::new();
    for &i in lists.iter().flatten() {
        *c.entry(i).or_insert(0) += 1;
    }
    c
}

#[test]
fn distributed_sampler_worked_examples_without_shuffle() {
    // PyTorch's DistributedSampler, len 10 over 4 ranks: pad with the list's head to 12,
    // then rank r takes positions r, r+4, r+8.
    let per_rank = |len, world, drop_last| -> Vec<Vec<usize>> {
        (0..world)
            .map(|r| {
                DistributedSampler::new(len, world, r, false, 0, drop_last)
                    .unwrap()
                    .indices(0)
            })
            .collect()
    };
    assert_eq!(
        per_rank(10, 4, false),
        vec![vec![0, 4, 8], vec![1, 5, 9], vec![2, 6, 0], vec![3, 7, 1]]
    );
    // drop_last cuts to 8 instead.
    assert_eq!(
        per_rank(10, 4, true),
        vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
    );
    // A dataset smaller than the world repeats itself.
    assert_eq!(
        per_rank(3, 4, false),
        vec![vec![0], vec![1], vec![2], vec![0]]
    );
    assert_eq!(
        per_rank(2, 5, false),
        vec![vec![0], vec![1], vec![0], vec![1], vec![0]]
    );
    assert!(DistributedSampler::new(10, 2, 2, false, 0, false).is_err());
}

#[test]
fn distributed_sampler_partitions_are_disjoint_complete_and_padded_from_the_permutation_head() {
    for len in [1usize, 7, 10, 64, 101] {
        for world in 1..=5 {
            for epoch in 0..3u64 {
                let samplers: Vec<_> = (0..world)
                    .map(|r| DistributedSampler::new(len, world, r, true, 17, false).unwrap())
                    .collect();
                let lists: Vec<Vec<usize>> = samplers.iter().map(|s| s.indices(epoch)).collect();
                let per_rank = len.div_ceil(world);
                assert!(lists.iter().all(|l| l.len() == per_rank));
                let c = counts(&lists);
                assert_eq!(
                    c.len(),
                    len,
                    "every index is seen (len {len}, world {world})"
                );
                let padding = per_rank * world - len;
                let repeated: usize = c.values().map(|&n| n - 1).sum();
                assert_eq!(repeated, padding, "only the padding repeats");
                // Interleaving the ranks back gives the permutation followed by its own head.
                let mut merged = vec![usize::MAX; per_rank * world];
                for (r, l) in lists.iter().enumerate() {
                    for (j, &i) in l.iter().enumerate() {
                        merged[r + j * world] = i;
                    }
                }
                for p in len..merged.len() {
                    assert_eq!(merged[p], merged[p % len]);
                }
            }
        }
    }
}

#[test]
fn epochs_reshuffle_and_the_same_epoch_repeats() {
    let s = DistributedSampler::new(1000, 2, 1, true, 3, false).unwrap();
    assert_eq!(s.indices(4), s.indices(4));
    assert_ne!(s.indices(4), s.indices(5));
    let other_seed = DistributedSampler::new(1000, 2, 1, true, 4, false).unwrap();
    assert_ne!(s.indices(4), other_seed.indices(4));

    let st = StatefulDistributedSampler::new(1000, 2, 0, 3, 8).unwrap();
    assert_eq!(st.indices(1), st.indices(1));
    assert_ne!(st.indices(1), st.indices(2));
}

#[test]
fn stateful_sampler_owns_contiguous_blocks_and_drops_the_remainder() {
    let (len, world) = (10, 3);
    let lists: Vec<Vec<usize>> = (0..world)
        .map(|r| {
            StatefulDistributedSampler::new(len, world, r, 0, 2)
                .unwrap()
                .indices(7)
        })
        .collect();
    for (r, l) in lists.iter().enumerate() {
        let mut sorted = l.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (3 * r..3 * r + 3).collect::<Vec<_>>());
    }
    assert!(!counts(&lists).contains_key(&9), "the remainder is dropped");

    // The debugging sampler keeps the block order.
    let cfg = split_config("{USE_DEBUGGING_SAMPLER: true, BATCHSIZE_PER_REPLICA: 2}");
    let s = Sampler::from_config(&cfg, len, world, 2, 0).unwrap();
    assert_eq!(s.indices(5), vec![6, 7, 8]);
}

#[test]
fn stateful_resume_continues_at_the_exact_next_sample() {
    let mut s = StatefulDistributedSampler::new(103, 4, 3, 9, 5).unwrap();
    let full = s.remaining_indices(2);
    assert_eq!(full, s.indices(2));
    for start_iter in [1usize, 3, 5, 6] {
        s.set_start_iter(start_iter);
        let rest = s.remaining_indices(2);
        let consumed = (start_iter * 5).min(full.len());
        assert_eq!(rest, full[consumed..].to_vec(), "start_iter {start_iter}");
    }
}

#[test]
fn sampler_choice_follows_the_config() {
    let plain = Sampler::from_config(&split_config("{}"), 10, 2, 0, 1).unwrap();
    assert!(matches!(plain, Sampler::Distributed(ref d) if d.shuffle && !d.drop_last));
    let stateful = Sampler::from_config(
        &split_config("{USE_STATEFUL_DISTRIBUTED_SAMPLER: true}"),
        10,
        2,
        0,
        1,
    )
    .unwrap();
    assert!(matches!(stateful, Sampler::Stateful(ref s) if s.shuffle && s.batch_size == 256));
    let strat = split_config("{STRATIFIED_SAMPLER: {ENABLED: true}}");
    assert!(Sampler::from_config(&strat, 10, 2, 0, 1).is_err());
}
