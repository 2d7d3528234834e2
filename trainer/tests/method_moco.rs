//! MoCo v2: the contrastive loss against a float64 numpy reference (value and gradient, float64 and
//! float32), the queue's round robin, 2 simulated ranks against 1 rank, a training step with the
//! momentum encoder, and the state round trip.
//!
//! Tolerances: float64 within 1e-7 relative of the reference (central differences are accurate to
//! ~1e-9); float32 within 1e-5 relative on the value and 1e-4 relative on gradients.

#[path = "reference/harness.rs"]
mod harness;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::json;
use std::sync::Arc;
use tch::{nn, Device, Kind, Tensor};
use vissl_trainer::losses::moco_loss::{MocoLoss, MocoParams};
use vissl_trainer::losses::momentum_encoder::MomentumEncoder;
use vissl_trainer::losses::{build_loss, l2_normalize_rows, LossContext, StepContext};
use vissl_trainer::models::{BaseSslModel, ModelParams};

const TEMPERATURE: f64 = 0.2;

fn params(dim: usize, queue: usize) -> MocoParams {
    MocoParams {
        embedding_dim: dim,
        queue_size: queue,
        momentum: 0.9,
        temperature: TEMPERATURE,
    }
}

fn unit_rows(t: &Tensor) -> Tensor {
    l2_normalize_rows(t).unwrap()
}

/// A queue with unit columns.
fn queue(dim: i64, size: i64, seed: u64, kind: Kind) -> Tensor {
    unit_rows(&uniform(&[size, dim], seed, kind))
        .tr()
        .contiguous()
}

#[test]
fn moco_loss_matches_numpy_in_float64_and_float32() {
    for (kind, rtol) in [(Kind::Double, 1e-7), (Kind::Float, 1e-5)] {
        let query = uniform(&[4, 5], 41, kind).set_requires_grad(true);
        let keys = unit_rows(&uniform(&[4, 5], 42, kind));
        let q = queue(5, 8, 43, kind);
        let mut loss = MocoLoss::new(&params(5, 8), LossContext::single_process()).unwrap();
        loss.set_queue(&q, 0).unwrap();
        let value = loss.contrast(&query, &keys, &keys).unwrap();
        value.backward();
        let reference = run_reference(
            "moco.py",
            &json!({
                "query": to_json(&query), "keys": to_json(&keys), "queue": to_json(&q),
                "temperature": TEMPERATURE,
            }),
        );
        let expected = reference["loss"].as_f64().unwrap();
        let actual = value.double_value(&[]);
        let grad_error = (query.grad().to_kind(Kind::Double) - from_json(&reference["grad"]))
            .abs()
            .max()
            .double_value(&[]);
        println!(
            "moco parity {kind:?}: loss error {:e}, gradient error {grad_error:e}",
            (actual - expected).abs()
        );
        assert!(
            (actual - expected).abs() <= rtol * expected.abs(),
            "{kind:?}: {actual} vs {expected}"
        );
        assert_close(
            "query gradient",
            &query.grad(),
            &from_json(&reference["grad"]),
            rtol * 10.0,
            1e-9,
        );
    }
}

#[test]
fn keys_of_every_rank_enter_the_queue_round_robin() {
    let start = queue(3, 8, 44, Kind::Float);
    let query = uniform(&[2, 3], 45, Kind::Float);
    let keys_all = unit_rows(&uniform(&[4, 3], 46, Kind::Float));
    let mut loss = MocoLoss::new(&params(3, 8), LossContext::single_process()).unwrap();
    loss.set_queue(&start, 4).unwrap();
    let _ = loss
        .contrast(&query, &keys_all.narrow(0, 0, 2), &keys_all)
        .unwrap();
    loss.enqueue_pending().unwrap();
    let (q, ptr) = loss.queue();
    assert_eq!(ptr, 0);
    assert!(q.narrow(1, 4, 4).equal(&keys_all.tr()), "new keys at 4..8");
    assert!(
        q.narrow(1, 0, 4).equal(&start.narrow(1, 0, 4)),
        "older keys kept"
    );

    let mut odd = MocoLoss::new(&params(3, 6), LossContext::single_process()).unwrap();
    let _ = odd
        .contrast(&query, &keys_all.narrow(0, 0, 2), &keys_all)
        .unwrap();
    let err = odd.enqueue_pending().unwrap_err();
    assert!(err.to_string().contains("moco_loss.queue_size"), "{err}");
}

#[test]
fn two_ranks_equal_one_rank_on_the_global_batch() {
    let n = 3;
    let dim = 4;
    let q = queue(dim, 12, 47, Kind::Float);
    let queries = uniform(&[2 * n, dim], 48, Kind::Float);
    let keys = unit_rows(&uniform(&[2 * n, dim], 49, Kind::Float));

    let one_query = queries.detach().set_requires_grad(true);
    let mut one = MocoLoss::new(&params(dim as usize, 12), LossContext::single_process()).unwrap();
    one.set_queue(&q, 6).unwrap();
    let one_loss = one.contrast(&one_query, &keys, &keys).unwrap();
    one_loss.backward();
    one.enqueue_pending().unwrap();

    let mut worst: f64 = 0.0;
    let mut mean = 0.0;
    for rank in 0..2 {
        let ctx = LossContext::distributed(rank, 2, Box::new(|t: &Tensor| Ok(t.shallow_clone())));
        let mut loss = MocoLoss::new(&params(dim as usize, 12), ctx).unwrap();
        loss.set_queue(&q, 6).unwrap();
        let mine = queries
            .narrow(0, rank as i64 * n, n)
            .detach()
            .set_requires_grad(true);
        let value = loss
            .contrast(&mine, &keys.narrow(0, rank as i64 * n, n), &keys)
            .unwrap();
        value.backward();
        mean += value.double_value(&[]) / 2.0;
        // DDP averages the ranks' gradients: half of this rank's is its rows' global gradient.
        let global_rows = one_query.grad().narrow(0, rank as i64 * n, n);
        worst = worst.max(
            (mine.grad() / 2.0 - global_rows)
                .abs()
                .max()
                .double_value(&[]),
        );
        loss.enqueue_pending().unwrap();
        assert!(
            loss.queue().0.equal(one.queue().0),
            "rank {rank}: same queue"
        );
        assert_eq!(loss.queue().1, one.queue().1);
    }
    worst = worst.max((mean - one_loss.double_value(&[])).abs());
    println!("moco 2-rank vs 1-rank: max abs difference {worst:e}");
    assert!(worst < 1e-6, "{worst:e}");
}

fn tiny_model() -> anyhow::Result<(nn::VarStore, BaseSslModel)> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(
        "TRUNK: {NAME: resnet, RESNETS: {DEPTH: 18, STEM: cifar, BASE_CHANNELS: 4}}\n\
         HEAD: {PARAMS: [[mlp, {dims: [32, 8]}]]}",
    )?;
    let params = ModelParams::from_yaml(&yaml)?;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = BaseSslModel::new(&vs, &params)?;
    Ok((vs, model))
}

fn step<'a>(model: &'a BaseSslModel, crops: &'a [Tensor], iteration: u64) -> StepContext<'a> {
    StepContext {
        model,
        crops,
        iteration,
        epoch: 0,
        iterations_per_epoch: 10,
        num_epochs: 1,
        train: true,
    }
}

#[test]
fn a_training_step_encodes_keys_with_the_momentum_encoder_and_state_round_trips() {
    tch::manual_seed(0);
    let (_vs, model) = tiny_model().unwrap();
    let ctx = || LossContext::single_process().with_model_factory(Arc::new(tiny_model));
    let section: serde_yaml::Value = serde_yaml::from_str(
        "{name: moco_loss, moco_loss: {embedding_dim: 8, queue_size: 8, momentum: 0.5, temperature: 0.2}}",
    )
    .unwrap();
    let mut loss = build_loss(&section, ctx()).unwrap();
    let crops = [
        uniform(&[4, 3, 8, 8], 50, Kind::Float),
        uniform(&[4, 3, 8, 8], 51, Kind::Float),
    ];
    let target = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let query = model.forward_t(&crops[0], true).unwrap();
    let value = loss
        .forward_step(&query, &target, &step(&model, &crops, 0))
        .unwrap();
    assert!(value.double_value(&[]).is_finite());
    value.backward();
    loss.on_update(&step(&model, &crops, 0)).unwrap();

    // At the first step the encoder is a copy of the model: the enqueued keys are the model's
    // normalised outputs on the key crops (train-mode batch norm in both).
    let state = loss.state_tensors();
    let get = |name: &str| {
        state
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("state has {name}"))
    };
    let expected_keys = unit_rows(&model.forward_t(&crops[1], true).unwrap()[0]).detach();
    let queue_state = get("queue");
    assert_close(
        "enqueued keys",
        &queue_state.narrow(1, 0, 4).tr(),
        &expected_keys.to_kind(Kind::Double),
        1e-5,
        1e-6,
    );
    assert_eq!(get("queue_ptr").int64_value(&[0]), 4);
    assert!(state
        .iter()
        .any(|(n, _)| n.starts_with("moco_encoder.trunk.")));

    // The engine feeds the model the query crop only; an output over both crops is refused.
    assert_eq!(loss.model_crops(), Some(1));
    let both = model.forward_multi_res(&crops, true).unwrap();
    let err = loss
        .forward_step(&both, &target, &step(&model, &crops, 1))
        .unwrap_err();
    assert!(err.to_string().contains("query crops only"), "{err}");

    let mut restored = build_loss(&section, ctx()).unwrap();
    restored.load_state(&state).unwrap();
    let again = restored.state_tensors();
    assert_eq!(again.len(), state.len());
    for ((na, ta), (nb, tb)) in state.iter().zip(&again) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} round trips");
    }

    let err = loss
        .forward_step(&query, &target, &step(&model, &crops[..1], 2))
        .unwrap_err();
    assert!(err.to_string().contains("moco_collator"), "{err}");
}

/// VISSL's MoCo and DINO hooks blend only the parameters: after the first step the copy's batch-norm
/// statistics are its own. SwAV's momentum hook also copies the model's running statistics.
#[test]
fn the_copys_batch_norm_statistics_are_its_own_unless_it_follows_the_model() {
    let running = |m: &BaseSslModel| -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = m
            .named_variables()
            .into_iter()
            .filter(|(n, _)| n.contains("running_mean"))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    for follow in [false, true] {
        tch::manual_seed(0);
        let (_vs, model) = tiny_model().unwrap();
        let (vs, copy) = tiny_model().unwrap();
        let mut encoder = MomentumEncoder::from_model(vs, copy, "test");
        if follow {
            encoder = encoder.following_running_stats();
        }
        encoder.init_from(&model).unwrap();
        let initial: Vec<(String, Tensor)> = running(encoder.model())
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        assert!(!initial.is_empty());
        // A training-mode forward moves the model's statistics; then the copy follows the model.
        let _ = model
            .forward_t(&uniform(&[4, 3, 8, 8], 60, Kind::Float), true)
            .unwrap();
        encoder.update(&model, 0.9).unwrap();
        let (ours, theirs) = (running(encoder.model()), running(&model));
        for (((name, own), (_, trained)), (_, before)) in ours.iter().zip(&theirs).zip(&initial) {
            assert!(
                !trained.equal(before),
                "{name}: the forward moved the model's statistics"
            );
            assert_eq!(own.equal(trained), follow, "{name}, following: {follow}");
            assert_eq!(own.equal(before), !follow, "{name}, following: {follow}");
        }
    }
}
