//! The c10d bridge on real multi-process Gloo runs: collectives, the differentiable gather with
//! VISSL's SimCLR masks, SyncBatchNorm against libtorch's batch norm, and failures that must become
//! errors (never hangs). Each test re-runs this binary once per rank (see `dist_common`).

mod dist_common;

use dist_common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};
use vissl_trainer::dist::autograd::gather_from_all;
use vissl_trainer::dist::sync_bn;
use vissl_trainer::dist::ReduceOp;
use vissl_trainer::losses::{self, Loss, LossContext};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn collectives_agree_across_ranks() {
    if let Some(ctx) = rank_ctx() {
        let group = ctx.connect(TIMEOUT).expect("connect");
        let r = ctx.rank as f64;
        let sum = Tensor::from_slice(&[r + 1.0, 10.0 * r]);
        group.all_reduce_sum_(&sum).expect("sum");
        let max = Tensor::from_slice(&[r, -r]);
        group
            .all_reduce(&max, ReduceOp::Max)
            .expect("max")
            .wait()
            .expect("max wait");
        let min = Tensor::from_slice(&[r, -r]);
        group
            .all_reduce(&min, ReduceOp::Min)
            .expect("min")
            .wait()
            .expect("min wait");
        let bcast = Tensor::from_slice(&[r * 7.0 + 1.0; 3]);
        group
            .broadcast(&bcast, 1)
            .expect("broadcast")
            .wait()
            .expect("wait");
        let coalesced = [
            Tensor::from_slice(&[r; 2]),
            Tensor::from_slice(&[r as i64 + 5]),
        ];
        group.broadcast_coalesced(&coalesced, 0).expect("coalesced");
        let gathered = group
            .all_gather(&Tensor::from_slice(&[r, r + 0.5]).view([1, 2]))
            .expect("gather");
        group.barrier().expect("barrier");
        let mean = group.mean_scalar(r * 2.0).expect("mean");
        ctx.write(
            "collectives",
            &json!({
                "sum": values(&sum), "max": values(&max), "min": values(&min),
                "bcast": values(&bcast), "coalesced0": values(&coalesced[0]),
                "coalesced1": values(&coalesced[1]), "gathered": values(&gathered),
                "gathered_shape": gathered.size(), "mean": mean,
            }),
        );
        return;
    }
    let out = run_ranks("collectives_agree_across_ranks", 3);
    for rank in 0..3 {
        let v = read(out.path(), "collectives", rank);
        // Ranks 0, 1, 2: sums of (r + 1) and 10 r; max / min of (r, -r); rank 1's 7 r + 1 = 8.
        assert_eq!(floats(&v["sum"]), vec![6.0, 30.0], "rank {rank}");
        assert_eq!(floats(&v["max"]), vec![2.0, 0.0]);
        assert_eq!(floats(&v["min"]), vec![0.0, -2.0]);
        assert_eq!(floats(&v["bcast"]), vec![8.0; 3]);
        assert_eq!(floats(&v["coalesced0"]), vec![0.0, 0.0]);
        assert_eq!(floats(&v["coalesced1"]), vec![5.0]);
        assert_eq!(floats(&v["gathered"]), vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        assert_eq!(v["gathered_shape"], json!([3, 2]));
        assert_eq!(v["mean"].as_f64(), Some(2.0));
    }
}

/// Deterministic embeddings of one rank, reproduced by the Python reference.
fn embeddings(rank: usize, rows: usize, dim: usize) -> Vec<f32> {
    (0..rows * dim)
        .map(|i| {
            let g = (rank * rows * dim + i) as f32;
            (0.37 * g + 1.0).sin() + 0.25 * (1.3 * g).cos()
        })
        .collect()
}

/// VISSL's SimCLR loss in float64 with the literal masks of VISSL's test (batch 4 per rank, world 2,
/// rank 0; rank 1's masks are VISSL's construction with the rank offset: the column halves swap),
/// plus central-difference gradients of the summed rank losses w.r.t. every embedding.
const SIMCLR_REFERENCE: &str = r#"
import json, sys
import numpy as np
inp = json.load(open(sys.argv[1]))
emb = np.array(inp["embeddings"], dtype=np.float32).astype(np.float64)  # [8, D], rank order
T = inp["temperature"]
pos0 = np.array([[0,0,1,0,0,0,0,0],[0,0,0,1,0,0,0,0],[1,0,0,0,0,0,0,0],[0,1,0,0,0,0,0,0]], float)
neg0 = np.array([[0,1,0,1,1,1,1,1],[1,0,1,0,1,1,1,1],[0,1,0,1,1,1,1,1],[1,0,1,0,1,1,1,1]], float)
swap = lambda m: np.concatenate([m[:, 4:], m[:, :4]], axis=1)
masks = [(pos0, neg0), (swap(pos0), swap(neg0))]
def rank_loss(e, r):
    z = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = np.exp(z[4*r:4*r+4] @ z.T / T)
    pos, neg = masks[r]
    p = (sim * pos).sum(1); n = (sim * neg).sum(1)
    return -np.mean(np.log(p / (p + n)))
losses = [rank_loss(emb, r) for r in range(2)]
h = 1e-6
grad = np.zeros_like(emb)
for i in range(emb.shape[0]):
    for j in range(emb.shape[1]):
        up = emb.copy(); up[i, j] += h
        dn = emb.copy(); dn[i, j] -= h
        grad[i, j] = (sum(rank_loss(up, r) for r in range(2)) - sum(rank_loss(dn, r) for r in range(2))) / (2 * h)
print(json.dumps({"losses": losses, "grad": grad.tolist(), "pos0": pos0.tolist(), "neg0": neg0.tolist()}))
"#;

const DIM: usize = 5;

#[test]
fn simclr_masks_and_gathered_gradients_match_vissl_on_two_ranks() {
    if let Some(ctx) = rank_ctx() {
        let group = Arc::new(ctx.connect(TIMEOUT).expect("connect"));
        let gather_group = group.clone();
        let loss_ctx = LossContext::distributed(
            ctx.rank,
            ctx.world,
            Box::new(move |t| gather_from_all(&gather_group, t).map_err(|e| e.to_string())),
        );
        // 2 images x 2 views per rank, world 2: VISSL's "batch 4, world size 2".
        let params: serde_yaml::Value = serde_yaml::from_str(&format!(
            "{{temperature: 0.1, buffer_params: {{world_size: 2, embedding_dim: {DIM}, effective_batch_size: 8}}}}"
        ))
        .expect("params");
        let loss_params =
            losses::simclr_info_nce_loss::SimclrInfoNceParams::from_yaml(&params).expect("params");
        let mut loss = losses::SimclrInfoNceLoss::new(&loss_params, loss_ctx).expect("simclr loss");
        let x = Tensor::from_slice(&embeddings(ctx.rank, 4, DIM))
            .view([4, DIM as i64])
            .set_requires_grad(true);
        let value = loss
            .forward(
                &[x.shallow_clone()],
                &Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
            )
            .expect("loss");
        value.backward();
        let masks = loss.masks();
        ctx.write(
            "simclr",
            &json!({
                "loss": value.double_value(&[]),
                "grad": values(&x.grad()),
                "pos": values(&masks.positives[0]),
                "neg": values(&masks.negatives),
            }),
        );
        return;
    }
    let out = run_ranks(
        "simclr_masks_and_gathered_gradients_match_vissl_on_two_ranks",
        2,
    );
    let all: Vec<f32> = (0..2).flat_map(|r| embeddings(r, 4, DIM)).collect();
    let all_rows: Vec<Vec<f32>> = all.chunks(DIM).map(<[f32]>::to_vec).collect();
    let reference = python_json(
        SIMCLR_REFERENCE,
        &json!({"embeddings": all_rows, "temperature": 0.1}),
    );
    let ref_grad: Vec<f64> = reference["grad"]
        .as_array()
        .expect("grad rows")
        .iter()
        .flat_map(floats)
        .collect();
    let swap = |m: &[f64]| -> Vec<f64> {
        m.chunks(8)
            .flat_map(|row| {
                row[4..]
                    .iter()
                    .chain(&row[..4])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let pos0: Vec<f64> = reference["pos0"]
        .as_array()
        .expect("pos0")
        .iter()
        .flat_map(floats)
        .collect();
    let neg0: Vec<f64> = reference["neg0"]
        .as_array()
        .expect("neg0")
        .iter()
        .flat_map(floats)
        .collect();
    for rank in 0..2 {
        let v = read(out.path(), "simclr", rank);
        let (pos, neg) = if rank == 0 {
            (pos0.clone(), neg0.clone())
        } else {
            (swap(&pos0), swap(&neg0))
        };
        assert_eq!(floats(&v["pos"]), pos, "rank {rank} positive mask");
        assert_eq!(floats(&v["neg"]), neg, "rank {rank} negative mask");
        let loss = v["loss"].as_f64().expect("loss");
        let want = reference["losses"][rank].as_f64().expect("reference loss");
        assert!(
            (loss - want).abs() < 1e-5 * want.abs(),
            "rank {rank}: loss {loss} vs {want}"
        );
        // Each rank's gradient is the gradient of the summed rank losses w.r.t. its own rows: the
        // gather's backward all-reduces what every rank's loss sent back.
        let grad = floats(&v["grad"]);
        let want = &ref_grad[rank * 4 * DIM..(rank + 1) * 4 * DIM];
        let diff = max_abs_diff(&grad, want);
        assert!(
            diff < 1e-4,
            "rank {rank}: gradient differs by {diff}: {grad:?} vs {want:?}"
        );
    }
}

/// The full batch of the SyncBN tests: 4 ranks' worth of [3, 3, 2, 2] inputs and output gradients.
fn bn_batch(ranks: usize) -> (Tensor, Tensor) {
    let n = (ranks * 3 * 3 * 2 * 2) as i64;
    let x = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.731).sin() * 2.0 + 0.5;
    let g = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 1.37).cos();
    (
        x.view([ranks as i64 * 3, 3, 2, 2]),
        g.view([ranks as i64 * 3, 3, 2, 2]),
    )
}

fn affine_bn(vs: &nn::VarStore) -> nn::BatchNorm {
    let bn = nn::batch_norm2d(vs.root() / "bn", 3, Default::default());
    tch::no_grad(|| {
        bn.ws
            .as_ref()
            .expect("weight")
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[1.5f32, 0.5, -1.0]));
        bn.bs
            .as_ref()
            .expect("bias")
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[0.1f32, 0.2, 0.3]));
    });
    bn
}

/// SyncBN on this rank's slice of [`bn_batch`] over `group`; writes output, gradients and stats.
fn sync_bn_rank(ctx: &RankCtx, group: &vissl_trainer::dist::ProcessGroup, name: &str) {
    let (x, g) = bn_batch(ctx.world);
    let x = x.narrow(0, 3 * ctx.rank as i64, 3).set_requires_grad(true);
    let g = g.narrow(0, 3 * ctx.rank as i64, 3);
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = affine_bn(&vs);
    let y = sync_bn::forward_synced(group, &bn, 1e-5, 0.1, &x).expect("sync bn");
    (&y * &g).sum(Kind::Float).backward();
    ctx.write(
        name,
        &json!({
            "y": values(&y), "dx": values(&x.grad()),
            "dw": values(&bn.ws.as_ref().expect("w").grad()),
            "db": values(&bn.bs.as_ref().expect("b").grad()),
            "mean": values(&bn.running_mean), "var": values(&bn.running_var),
        }),
    );
}

/// libtorch's own batch norm over ranks `first..first + count` of [`bn_batch`]: the reference.
fn bn_reference(world: usize, first: usize, count: usize) -> serde_json::Value {
    let (x, g) = bn_batch(world);
    let x = x
        .narrow(0, 3 * first as i64, 3 * count as i64)
        .set_requires_grad(true);
    let g = g.narrow(0, 3 * first as i64, 3 * count as i64);
    let vs = nn::VarStore::new(Device::Cpu);
    let bn = affine_bn(&vs);
    let y = bn.forward_t(&x, true);
    (&y * &g).sum(Kind::Float).backward();
    json!({
        "y": values(&y), "dx": values(&x.grad()),
        "dw": values(&bn.ws.as_ref().expect("w").grad()),
        "db": values(&bn.bs.as_ref().expect("b").grad()),
        "mean": values(&bn.running_mean), "var": values(&bn.running_var),
    })
}

/// Rank results of one SyncBN group against the reference batch norm over the group's whole batch.
fn check_group(out: &std::path::Path, name: &str, world: usize, members: std::ops::Range<usize>) {
    let reference = bn_reference(world, members.start, members.len());
    let per_rank = 3 * 3 * 2 * 2;
    let mut dw_sum = vec![0.0; 3];
    let mut db_sum = vec![0.0; 3];
    for (i, rank) in members.clone().enumerate() {
        let v = read(out, name, rank);
        let slice = |key: &str| floats(&reference[key])[i * per_rank..(i + 1) * per_rank].to_vec();
        let close = |key: &str, want: &[f64], tol: f64| {
            let diff = max_abs_diff(&floats(&v[key]), want);
            assert!(diff < tol, "rank {rank} {key} differs by {diff}");
        };
        close("y", &slice("y"), 1e-5);
        close("dx", &slice("dx"), 1e-5);
        // Running statistics: the group's batch mean and unbiased variance, as one batch norm.
        close("mean", &floats(&reference["mean"]), 1e-6);
        close("var", &floats(&reference["var"]), 1e-6);
        for (s, d) in dw_sum.iter_mut().zip(floats(&v["dw"])) {
            *s += d;
        }
        for (s, d) in db_sum.iter_mut().zip(floats(&v["db"])) {
            *s += d;
        }
    }
    // Weight and bias gradients stay local; their sum (what DDP averages) is the group's gradient.
    assert!(max_abs_diff(&dw_sum, &floats(&reference["dw"])) < 1e-4);
    assert!(max_abs_diff(&db_sum, &floats(&reference["db"])) < 1e-4);
}

#[test]
fn sync_batch_norm_equals_batch_norm_over_the_whole_batch() {
    if let Some(ctx) = rank_ctx() {
        let group = ctx.connect(TIMEOUT).expect("connect");
        sync_bn_rank(&ctx, &group, "syncbn");
        return;
    }
    let out = run_ranks("sync_batch_norm_equals_batch_norm_over_the_whole_batch", 2);
    check_group(out.path(), "syncbn", 2, 0..2);
    // And not merely local batch norm: rank 0's output differs from BN over its own slice.
    let local = bn_reference(2, 0, 1);
    let synced = read(out.path(), "syncbn", 0);
    assert!(max_abs_diff(&floats(&synced["y"]), &floats(&local["y"])) > 1e-2);
}

#[test]
fn sync_batch_norm_subgroups_sync_within_each_group() {
    if let Some(ctx) = rank_ctx() {
        let group = ctx.connect(TIMEOUT).expect("connect");
        // GROUP_SIZE 2 of 4 ranks: VISSL's split gives [[0, 1], [2, 3]].
        let groups = sync_bn::split_world_in_process_groups(ctx.world, 2);
        let index = ctx.rank / 2;
        assert_eq!(groups[index], vec![2 * index, 2 * index + 1]);
        let sub = group
            .subgroup(&format!("sync_bn_{index}"), ctx.rank % 2, 2)
            .expect("subgroup");
        sync_bn_rank(&ctx, &sub, "subgroups");
        return;
    }
    let out = run_ranks("sync_batch_norm_subgroups_sync_within_each_group", 4);
    check_group(out.path(), "subgroups", 4, 0..2);
    check_group(out.path(), "subgroups", 4, 2..4);
}

#[test]
fn a_vanished_peer_fails_the_collective_with_a_clear_error() {
    if let Some(ctx) = rank_ctx() {
        let group = ctx.connect(Duration::from_secs(30)).expect("connect");
        if ctx.rank == 1 {
            // Vanish without a word, as a killed process does.
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let err = group
            .all_reduce_sum_(&Tensor::from_slice(&[1.0f32]))
            .expect_err("the peer is gone");
        ctx.write(
            "vanished",
            &json!({"error": err.to_string(), "seconds": started.elapsed().as_secs_f64()}),
        );
        return;
    }
    let out = run_ranks("a_vanished_peer_fails_the_collective_with_a_clear_error", 2);
    let v = read(out.path(), "vanished", 0);
    let error = v["error"].as_str().expect("error text");
    assert!(
        error.contains("all_reduce failed on rank 0 of 2"),
        "{error}"
    );
    assert!(error.contains("VISSL_DIST_TIMEOUT_S"), "{error}");
    // Within the 30 s timeout (Gloo sees the closed connection).
    assert!(v["seconds"].as_f64().expect("seconds") < 30.0, "{v}");
}

#[test]
fn a_missing_peer_fails_the_rendezvous_at_the_timeout() {
    if let Some(ctx) = rank_ctx() {
        let started = Instant::now();
        let err = ctx
            .connect(Duration::from_secs(2))
            .expect_err("rank 1 never comes");
        ctx.write(
            "missing",
            &json!({"error": err.to_string(), "seconds": started.elapsed().as_secs_f64()}),
        );
        return;
    }
    // Only rank 0 of a world of 2 starts.
    let out = tempfile::tempdir().expect("tempdir");
    let children = spawn_ranks(
        "a_missing_peer_fails_the_rendezvous_at_the_timeout",
        &[0],
        2,
        free_port(),
        out.path(),
    );
    for child in children {
        assert!(wait_with_timeout(child, Duration::from_secs(60)).success());
    }
    let v = read(out.path(), "missing", 0);
    let error = v["error"].as_str().expect("error text");
    assert!(
        error.contains("rank 0 of 2 could not join the process group")
            && error.contains("within 2 s"),
        "{error}"
    );
    let seconds = v["seconds"].as_f64().expect("seconds");
    assert!((1.5..20.0).contains(&seconds), "failed after {seconds} s");
}

#[test]
fn a_hung_peer_fails_the_collective_at_the_timeout() {
    if let Some(ctx) = rank_ctx() {
        let group = ctx.connect(Duration::from_secs(2)).expect("connect");
        if ctx.rank == 1 {
            // Alive but never joining the collective, as a stuck process.
            std::thread::sleep(Duration::from_secs(8));
            return;
        }
        let started = Instant::now();
        let err = group
            .all_reduce_sum_(&Tensor::from_slice(&[1.0f32]))
            .expect_err("the peer never joins");
        ctx.write(
            "hung",
            &json!({"error": err.to_string(), "seconds": started.elapsed().as_secs_f64()}),
        );
        return;
    }
    let out = run_ranks("a_hung_peer_fails_the_collective_at_the_timeout", 2);
    let v = read(out.path(), "hung", 0);
    let error = v["error"].as_str().expect("error text");
    assert!(
        error.contains("all_reduce failed on rank 0 of 2"),
        "{error}"
    );
    assert!(error.contains("time out after 2 s"), "{error}");
    let seconds = v["seconds"].as_f64().expect("seconds");
    assert!((1.5..7.0).contains(&seconds), "failed after {seconds} s");
}
