//! DeepClusterV2: k-means over a memory bank split across simulated ranks and across 2 real Gloo
//! processes, and the loss against a float64 numpy reference of the whole memory; the memory's
//! bookkeeping; and in training: the initial pass, clustering at each epoch start and exact resume
//! with the memory and clusters.
//!
//! Tolerance: the loss runs in float32 (as VISSL's) against float64; memory rows are drawn around
//! well-separated centres so that no assignment is a near tie that rounding could flip. Centroids
//! and losses agree to ~1e-7 relative; 1e-5 is asked.

mod dist_common;
#[path = "reference/harness.rs"]
mod harness;
#[path = "reference/simulated_world.rs"]
mod simulated_world;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::json;
use simulated_world::run_world;
use std::path::Path;
use tch::{Kind, Tensor};
use vissl_crds::config::{load, Config, LoadOptions};
use vissl_trainer::checkpoint;
use vissl_trainer::engine::{RunOptions, RunSummary, Trainer};
use vissl_trainer::losses::deepclusterv2_loss::{
    clustering_seed, DeepClusterV2Loss, DeepClusterV2Params, MemoryParams,
};
use vissl_trainer::losses::{kmeans, l2_normalize_rows, Loss, LossContext};

const DIM: i64 = 6;
const SAMPLES: usize = 24;
const BATCH: usize = 4;
const CROPS: usize = 2;
const IMAGES: i64 = 3;
const SEED: u64 = 5;

fn params() -> DeepClusterV2Params {
    DeepClusterV2Params {
        drop_last: true,
        batchsize_per_replica: BATCH,
        num_crops: CROPS,
        temperature: 0.1,
        num_clusters: vec![3, 4],
        kmeans_iters: 5,
        memory_params: MemoryParams {
            crops_for_mb: vec![0, 1],
            embedding_dim: DIM as usize,
        },
        num_train_samples: SAMPLES as i64,
    }
}

/// Rank `rank`'s memory bank `bank`: unit rows around four well-separated centres.
fn memory(rank: usize, bank: usize, rows: i64) -> Tensor {
    let centres = l2_normalize_rows(&uniform(&[4, DIM], 99, Kind::Float)).unwrap();
    let pick: Vec<i64> = (0..rows)
        .map(|i| (i * 7 + rank as i64 + bank as i64) % 4)
        .collect();
    let noise = uniform(&[rows, DIM], (rank * 10 + bank + 1) as u64, Kind::Float) * 0.15;
    l2_normalize_rows(&(centres.index_select(0, &Tensor::from_slice(&pick)) + noise)).unwrap()
}

/// The dataset indices rank `rank` holds: every `world`-th sample, as a distributed sampler deals them.
fn indices(rank: usize, world: usize, rows: i64) -> Vec<i64> {
    (0..rows).map(|i| i * world as i64 + rank as i64).collect()
}

fn outputs(rank: usize) -> Tensor {
    uniform(
        &[CROPS as i64 * IMAGES, DIM],
        (50 + rank) as u64,
        Kind::Float,
    )
}

/// Crop-major sample indices of a batch of this rank's first images.
fn targets(rank: usize, world: usize) -> Vec<i64> {
    let own = indices(rank, world, IMAGES);
    (0..CROPS).flat_map(|_| own.clone()).collect()
}

struct RankResult {
    loss: f64,
    grad: Tensor,
    centroids: Vec<Tensor>,
    assignments: Tensor,
}

/// One rank's part: fill the memory with its share, cluster (across ranks through `ctx`), and
/// take the loss and its gradient on a batch of its own images.
fn rank_body(rank: usize, world: usize, ctx: LossContext) -> RankResult {
    let rows = params().memory_rows(world) as i64;
    let mut loss = DeepClusterV2Loss::new(&params(), ctx).expect("loss");
    let banks: Vec<Tensor> = (0..2).map(|b| memory(rank, b, rows)).collect();
    let idx: Vec<i64> = indices(rank, world, rows)
        .into_iter()
        .cycle()
        .take(CROPS * rows as usize)
        .collect();
    loss.remember(&banks, &Tensor::from_slice(&idx))
        .expect("remember");
    loss.cluster_memory(SEED).expect("k-means");
    let output = outputs(rank).set_requires_grad(true);
    let value = loss
        .forward(
            &[output.shallow_clone()],
            &Tensor::from_slice(&targets(rank, world)),
        )
        .expect("loss");
    value.backward();
    RankResult {
        loss: value.double_value(&[]),
        grad: output.grad().copy(),
        centroids: loss.centroids().iter().map(|c| c.copy()).collect(),
        assignments: loss.assignments().copy(),
    }
}

fn check_world(world: usize) -> f64 {
    let results = run_world(world, move |rank, ctx| rank_body(rank, world, ctx));
    compare_with_numpy(world, &results)
}

/// The ranks' clusters, losses and gradients against numpy float64 k-means of the whole memory
/// (from rank 0's starting rows); returns the largest loss error.
fn compare_with_numpy(world: usize, results: &[RankResult]) -> f64 {
    let rows = params().memory_rows(world) as i64;
    let clusterings: Vec<_> = params()
        .num_clusters
        .iter()
        .enumerate()
        .map(|(c, &k)| {
            json!({
                "bank": c % 2,
                "init_rows": kmeans::first_of_permutation(rows as usize, k, clustering_seed(SEED, c)),
            })
        })
        .collect();
    let expected = run_reference(
        "deepclusterv2.py",
        &json!({
            "memories": (0..world).map(|r| (0..2).map(|b| to_json(&memory(r, b, rows))).collect::<Vec<_>>()).collect::<Vec<_>>(),
            "indices": (0..world).map(|r| indices(r, world, rows)).collect::<Vec<_>>(),
            "clusterings": clusterings,
            "iters": 5,
            "num_samples": SAMPLES,
            "temperature": 0.1,
            "outputs": (0..world).map(|r| to_json(&outputs(r))).collect::<Vec<_>>(),
            "targets": (0..world).map(|r| targets(r, world)).collect::<Vec<_>>(),
        }),
    );
    let mut worst: f64 = 0.0;
    for (rank, result) in results.iter().enumerate() {
        for (c, centroids) in result.centroids.iter().enumerate() {
            assert_close(
                &format!("rank {rank} centroids {c}"),
                centroids,
                &from_json(&expected["centroids"][c]),
                0.0,
                1e-5,
            );
            let want: Vec<i64> =
                serde_json::from_value(expected["assignments"][c].clone()).unwrap();
            let got: Vec<i64> = Vec::try_from(&result.assignments.get(c as i64)).unwrap();
            assert_eq!(got, want, "rank {rank} assignments of clustering {c}");
            // Every sample of the memory got a cluster (2 ranks x 12 rows cover all 24).
            assert!(got.iter().all(|&a| a >= 0), "{got:?}");
        }
        let want = expected["losses"][rank].as_f64().unwrap();
        worst = worst.max((result.loss - want).abs());
        assert!(
            (result.loss - want).abs() <= 1e-5 * want.abs(),
            "rank {rank}: loss {} vs reference {want}",
            result.loss
        );
        assert_close(
            &format!("rank {rank} gradient"),
            &result.grad,
            &from_json(&expected["grads"][rank]),
            1e-4,
            1e-7,
        );
    }
    println!("world {world}: max abs loss error vs numpy float64 of the whole memory: {worst:e}");
    worst
}

#[test]
fn one_rank_matches_numpy() {
    check_world(1);
}

#[test]
fn two_ranks_cluster_their_joint_memory_as_numpy_does() {
    check_world(2);
}

/// The same check on 2 real Gloo processes: the sums and counts of k-means are all-reduced, the
/// starting centroids broadcast from rank 0 and the assignments gathered over Gloo, and both ranks end
/// with numpy's clusters of the joint memory.
#[test]
fn two_gloo_ranks_cluster_their_joint_memory_as_numpy_does() {
    const NAME: &str = "two_gloo_ranks_cluster_their_joint_memory_as_numpy_does";
    if let Some(rank) = dist_common::rank_ctx() {
        let group = std::sync::Arc::new(
            rank.connect(std::time::Duration::from_secs(60))
                .expect("joining the process group"),
        );
        let reduce_group = group.clone();
        let ctx = LossContext::distributed(
            rank.rank,
            rank.world,
            Box::new(move |t| {
                vissl_trainer::dist::autograd::gather_from_all(&group, t).map_err(|e| e.to_string())
            }),
        )
        .with_all_reduce_sum(Box::new(move |t| {
            reduce_group.all_reduce_sum_(t).map_err(|e| e.to_string())
        }));
        let result = rank_body(rank.rank, rank.world, ctx);
        rank.write(
            "result",
            &json!({
                "loss": result.loss,
                "grad": to_json(&result.grad),
                "centroids": result.centroids.iter().map(to_json).collect::<Vec<_>>(),
                "assignments": to_json(&result.assignments),
            }),
        );
        return;
    }
    let out = dist_common::run_ranks(NAME, 2);
    let results: Vec<RankResult> = (0..2)
        .map(|r| {
            let v = dist_common::read(out.path(), "result", r);
            RankResult {
                loss: v["loss"].as_f64().expect("loss"),
                grad: from_json(&v["grad"]).to_kind(Kind::Float),
                centroids: v["centroids"]
                    .as_array()
                    .expect("centroids")
                    .iter()
                    .map(|c| from_json(c).to_kind(Kind::Float))
                    .collect(),
                assignments: from_json(&v["assignments"]).to_kind(Kind::Int64),
            }
        })
        .collect();
    let worst = compare_with_numpy(2, &results);
    println!("2 Gloo ranks: max abs loss error vs numpy float64 of the whole memory: {worst:e}");
}

#[test]
fn memory_bookkeeping_and_bad_targets_fail_with_the_reason() {
    let mut loss = DeepClusterV2Loss::new(&params(), LossContext::single_process()).unwrap();
    // 24 samples, batches of 4: a 24-row memory; a 7th batch of 4 does not fit.
    let rows = params().memory_rows(1);
    assert_eq!(rows, 24);
    let batch = |start: i64| -> Vec<i64> { (0..2).flat_map(|_| start..start + 4).collect() };
    for b in 0..6 {
        let emb = l2_normalize_rows(&uniform(&[4, DIM], b as u64, Kind::Float)).unwrap();
        loss.remember(
            &[emb.shallow_clone(), emb],
            &Tensor::from_slice(&batch(b * 4)),
        )
        .unwrap();
    }
    let (_, index) = loss.memory();
    assert_eq!(
        Vec::<i64>::try_from(index).unwrap(),
        (0..24).collect::<Vec<i64>>()
    );
    let emb = uniform(&[4, DIM], 9, Kind::Float);
    let err = loss
        .remember(&[emb.shallow_clone(), emb], &Tensor::from_slice(&batch(0)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("memory holds 24 samples"), "{err}");

    let err = loss
        .forward(&[outputs(0)], &Tensor::from_slice(&[0i64, 1, 2, 0, 1, 99]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("LABEL_TYPE must be sample_index"), "{err}");
    let unfilled = DeepClusterV2Params {
        num_train_samples: -1,
        ..params()
    };
    let err = DeepClusterV2Loss::new(&unfilled, LossContext::single_process())
        .err()
        .expect("no dataset size")
        .to_string();
    assert!(err.contains("num_train_samples"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Training

/// A tiny run of the quick config: 64 images in batches of 16 (4 steps per epoch), 2 clusterings of 8.
fn config(dir: &Path) -> Config {
    let args: Vec<String> = vec![
        "config=pretrain/deepcluster_v2/quick_cpu_fmnist".into(),
        format!("config.CHECKPOINT.DIR={}", dir.display()),
        "config.DATA.TRAIN.DATA_LIMIT=64".into(),
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16".into(),
        "config.OPTIMIZER.num_epochs=2".into(),
        "config.CHECKPOINT.KEEP_LAST_K=-1".into(),
        "config.LOSS.deepclusterv2_loss.num_clusters=[8,8]".into(),
    ];
    load(&LoadOptions::default(), &args).expect("test config loads")
}

/// Training runs seed libtorch's global generator and draw the model's weights from it, so
/// runs of parallel tests in this binary take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(config: Config, stop_after: Option<u64>) -> RunSummary {
    let _turn = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Trainer::new(
        config,
        RunOptions {
            stop_after_iterations: stop_after,
            ..RunOptions::default()
        },
    )
    .expect("trainer builds")
    .train()
    .expect("training runs")
}

fn latest_group(dir: &Path, group: &str) -> Vec<(String, Tensor)> {
    let ckpt = checkpoint::latest(dir)
        .unwrap()
        .expect("a checkpoint exists");
    let mut tensors = ckpt.tensors(group).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn resumed_runs_with_memory_and_clusters_equal_a_straight_run_bitwise() {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(config(straight_dir.path()), None);
    assert_eq!(straight.iterations, 8);
    assert!(
        straight.losses.iter().all(|(_, l)| l.is_finite()),
        "{:?}",
        straight.losses
    );
    let state = latest_group(straight_dir.path(), "loss");
    let assignments = &state.iter().find(|(n, _)| n == "assignments").unwrap().1;
    assert_eq!(assignments.size(), [2, 64]);
    // The initial pass and the clustering at each epoch start gave every sample a cluster.
    assert_eq!(assignments.lt(0).sum(Kind::Int64).int64_value(&[]), 0);
    assert!(assignments.max().int64_value(&[]) < 8);

    // Stopped mid-epoch (step 3 of 4, so no re-clustering on resume), then run to the end.
    let resumed_dir = tempfile::tempdir().unwrap();
    let first = run(config(resumed_dir.path()), Some(3));
    let second = run(config(resumed_dir.path()), Some(4));
    let third = run(config(resumed_dir.path()), None);
    let resumed: Vec<(u64, f64)> = [first.losses, second.losses, third.losses].concat();
    assert_eq!(
        resumed, straight.losses,
        "per-iteration losses must match bitwise"
    );
    for group in ["model", "loss"] {
        let (a, b) = (
            latest_group(straight_dir.path(), group),
            latest_group(resumed_dir.path(), group),
        );
        assert_eq!(a.len(), b.len(), "{group}");
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ta.equal(tb), "{group} tensor {na} differs after resume");
        }
    }
}

#[test]
fn registry_builds_with_the_dataset_size_filled_in() {
    let section: serde_yaml::Value = serde_yaml::from_str(
        "{name: deepclusterv2_loss, deepclusterv2_loss: {num_train_samples: -1, BATCHSIZE_PER_REPLICA: 4, \
          num_clusters: [2], memory_params: {embedding_dim: 6}}}",
    )
    .unwrap();
    let filled = vissl_trainer::losses::with_num_train_samples(&section, 40);
    assert_eq!(
        filled["deepclusterv2_loss"]["num_train_samples"],
        serde_yaml::Value::from(40u64)
    );
    let loss = vissl_trainer::losses::build_loss(&filled, LossContext::single_process()).unwrap();
    assert_eq!(loss.name(), "deepclusterv2_loss");
    assert!(loss.needs_initial_pass());
    // Other losses' sections are left alone.
    let other: serde_yaml::Value =
        serde_yaml::from_str("{name: swav_loss, deepclusterv2_loss: {num_train_samples: -1}}")
            .unwrap();
    assert_eq!(
        vissl_trainer::losses::with_num_train_samples(&other, 40),
        other
    );
}
