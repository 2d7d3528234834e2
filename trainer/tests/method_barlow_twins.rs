//! Barlow Twins: the loss against a float64 numpy reference (value and gradient, float64 and
//! float32), 2 simulated ranks against 1 rank on the global batch, the config's keys, and an exact
//! resume of a short training.
//!
//! Tolerances: float64 agrees with the reference to ~1e-10 relative (the reference's central
//! differences are accurate to ~1e-9); float32 runs are held to 1e-5 relative on the value and
//! 1e-4 relative (of the largest gradient entry) on gradients, float32 rounding of the D x D
//! correlation sums.

#[path = "reference/harness.rs"]
mod harness;
#[path = "reference/simulated_ranks.rs"]
mod simulated_ranks;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::json;
use simulated_ranks::run_ranks;
use tch::{Kind, Tensor};
use vissl_trainer::losses::barlow_twins_loss::{BarlowTwinsLoss, BarlowTwinsParams};
use vissl_trainer::losses::{build_loss, Loss, LossContext};

const LAMBDA: f64 = 0.3;
const SCALE: f64 = 0.5;

fn params(dim: usize) -> BarlowTwinsParams {
    BarlowTwinsParams {
        lambda_: LAMBDA,
        scale_loss: SCALE,
        embedding_dim: dim,
    }
}

fn target() -> Tensor {
    Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu))
}

/// Each rank's loss in a simulated world over `embeddings` (one `2n x D` tensor per rank), after
/// back-propagating the sum of the rank losses; returns the losses and each rank's gradient.
fn world_losses(embeddings: &[Tensor]) -> (Vec<f64>, Vec<Tensor>) {
    let dim = embeddings[0].size()[1] as usize;
    let inputs: Vec<Tensor> = embeddings
        .iter()
        .map(|e| e.detach().set_requires_grad(true))
        .collect();
    let losses = run_ranks(&inputs, |rank, ctx| {
        let mut loss = BarlowTwinsLoss::new(&params(dim), ctx).expect("valid params");
        loss.forward(&[inputs[rank].shallow_clone()], &target())
            .expect("forward")
    });
    let total = losses
        .iter()
        .skip(1)
        .fold(losses[0].shallow_clone(), |sum, l| sum + l);
    total.backward();
    (
        losses.iter().map(|l| l.double_value(&[])).collect(),
        inputs.iter().map(Tensor::grad).collect(),
    )
}

fn check_against_reference(embeddings: &[Tensor], rtol: f64) -> f64 {
    let (losses, grads) = world_losses(embeddings);
    let reference = run_reference(
        "barlow_twins.py",
        &json!({
            "embeddings": embeddings.iter().map(to_json).collect::<Vec<_>>(),
            "lambda_": LAMBDA,
            "scale_loss": SCALE,
        }),
    );
    let expected = reference["loss"].as_f64().expect("loss");
    let mut worst: f64 = 0.0;
    for (rank, loss) in losses.iter().enumerate() {
        worst = worst.max((loss - expected).abs());
        assert!(
            (loss - expected).abs() <= rtol * expected.abs(),
            "rank {rank}: loss {loss} vs reference {expected}"
        );
        let reference_grad = from_json(&reference["grads"][rank]);
        worst = worst.max(
            (grads[rank].to_kind(Kind::Double) - &reference_grad)
                .abs()
                .max()
                .double_value(&[]),
        );
        assert_close(
            &format!("rank {rank} gradient"),
            &grads[rank],
            &reference_grad,
            rtol * 10.0,
            1e-9,
        );
    }
    worst
}

#[test]
fn barlow_twins_matches_numpy_in_float64_and_float32() {
    for (kind, rtol) in [(Kind::Double, 1e-7), (Kind::Float, 1e-5)] {
        let worst = check_against_reference(&[uniform(&[8, 5], 31, kind)], rtol);
        println!("barlow_twins parity {kind:?}: max abs error {worst:e}");
    }
}

#[test]
fn barlow_twins_two_ranks_match_numpy() {
    let e = [
        uniform(&[6, 4], 32, Kind::Double),
        uniform(&[6, 4], 33, Kind::Double) * 2.0,
    ];
    let worst = check_against_reference(&e, 1e-7);
    println!("barlow_twins 2-rank parity: max abs error {worst:e}");
}

#[test]
fn barlow_twins_two_ranks_equal_one_rank_on_the_global_batch() {
    let n = 3;
    let ranks = [
        uniform(&[2 * n, 6], 34, Kind::Float),
        uniform(&[2 * n, 6], 35, Kind::Float),
    ];
    // One process with both ranks' images: all first views, then all second views.
    let global = Tensor::cat(
        &[
            ranks[0].narrow(0, 0, n),
            ranks[1].narrow(0, 0, n),
            ranks[0].narrow(0, n, n),
            ranks[1].narrow(0, n, n),
        ],
        0,
    );
    let (one, one_grad) = world_losses(&[global]);
    let (two, two_grads) = world_losses(&ranks);
    let mut worst: f64 = 0.0;
    for loss in &two {
        worst = worst.max((loss - one[0]).abs());
    }
    // Each rank's gradient is world_size x its share of the global gradient (DDP averages).
    let one_grad = &one_grad[0];
    for (rank, grad) in two_grads.iter().enumerate() {
        let grad = grad / 2.0;
        for (view, offset) in [(0, 0), (1, n)] {
            let mine = grad.narrow(0, offset, n);
            let global_rows = one_grad.narrow(0, view * 2 * n + rank as i64 * n, n);
            worst = worst.max((&mine - &global_rows).abs().max().double_value(&[]));
        }
    }
    println!("barlow_twins 2-rank vs 1-rank: max abs difference {worst:e}");
    assert!(worst < 1e-6, "2 ranks differ from 1 rank by {worst:e}");
}

#[test]
fn barlow_twins_reads_vissl_keys_and_rejects_bad_input() {
    let section: serde_yaml::Value = serde_yaml::from_str(
        "{name: barlow_twins_loss, barlow_twins_loss: {lambda_: 0.0051, scale_loss: 0.024, embedding_dim: 4}}",
    )
    .unwrap();
    let mut loss = build_loss(&section, LossContext::single_process()).expect("builds");
    assert_eq!(loss.name(), "barlow_twins_loss");
    let err = loss
        .forward(
            &[Tensor::zeros([5, 4], (Kind::Float, tch::Device::Cpu))],
            &target(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("[2n, 4]"), "{err}");
    let err = loss
        .forward(
            &[Tensor::zeros([4, 3], (Kind::Float, tch::Device::Cpu))],
            &target(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("embedding_dim = 4"), "{err}");

    let typo = serde_yaml::from_str("{name: barlow_twins_loss, barlow_twins_loss: {lambda: 0.1}}")
        .unwrap();
    let err = build_loss(&typo, LossContext::single_process())
        .err()
        .expect("unknown key");
    assert!(err.to_string().contains("lambda"), "{err}");
    let negative =
        serde_yaml::from_str("{name: barlow_twins_loss, barlow_twins_loss: {scale_loss: -1}}")
            .unwrap();
    let err = build_loss(&negative, LossContext::single_process())
        .err()
        .expect("negative scale");
    assert!(
        err.to_string().contains("barlow_twins_loss.scale_loss"),
        "{err}"
    );
}

#[test]
fn perfectly_correlated_decorrelated_views_have_zero_loss() {
    // Both views equal, dimensions uncorrelated with unit variance after standardisation:
    // c is the identity, so both terms vanish.
    let view = Tensor::from_slice(&[1.0f64, 1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0]).view([4, 2]);
    let e = Tensor::cat(&[&view, &view], 0);
    let mut loss = BarlowTwinsLoss::new(&params(2), LossContext::single_process()).unwrap();
    let value = loss.forward(&[e], &target()).unwrap().double_value(&[]);
    // Standardising with var = 1 divides by sqrt(1 + 1e-5), so c_ii = 1 / (1 + 1e-5).
    let diag = 1.0 / (1.0f64 + 1e-5);
    let expected = SCALE * 2.0 * (1.0 - diag).powi(2);
    assert!((value - expected).abs() < 1e-15, "{value} vs {expected}");
}
