//! SwAV: the head's outputs and names, the loss against a float64 numpy reference (float64 and
//! float32, hard codes, the queue), simulated ranks against one rank with all the images, the
//! Sinkhorn marginals, and in training: frozen and normalised prototypes, exact resume with the queue.
//!
//! Tolerances: float64 runs agree with the reference to ~1e-12 relative (the reference's
//! gradients are central differences, good to ~1e-9), so 1e-8 is asked. In float32 the scores
//! are divided by epsilon = 0.05 before the exponential, which scales their rounding error by 20,
//! and Sinkhorn's normalisations add a few ulps each: 1e-5 relative is asked and ~1e-6 is seen.

#[path = "reference/harness.rs"]
mod harness;
#[path = "reference/simulated_world.rs"]
mod simulated_world;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::{json, Value};
use simulated_world::run_world;
use std::path::Path;
use std::sync::Arc;
use tch::{Kind, Tensor};
use vissl_crds::config::{load, Config, LoadOptions};
use vissl_trainer::checkpoint;
use vissl_trainer::engine::{RunOptions, RunSummary, Trainer};
use vissl_trainer::losses::sinkhorn::{self, SinkhornSettings};
use vissl_trainer::losses::swav_loss::{QueueParams, SwavCriterion, SwavLossParams};
use vissl_trainer::losses::swav_momentum_loss::{SwavMomentumLoss, SwavMomentumLossParams};
use vissl_trainer::losses::{build_loss, Loss, LossContext, ModelFactory, StepContext, SwavLoss};
use vissl_trainer::models::{BaseSslModel, ModelParams};

#[derive(Clone)]
struct Case {
    world: usize,
    images: i64,
    crops: usize,
    prototypes: Vec<usize>,
    double: bool,
    hard: bool,
    queue: usize,
}

const DIM: i64 = 6;

impl Case {
    fn params(&self) -> SwavLossParams {
        SwavLossParams {
            embedding_dim: DIM as usize,
            use_double_precision: self.double,
            num_crops: self.crops,
            crops_for_assign: vec![0, 1],
            num_prototypes: self.prototypes.clone(),
            temp_hard_assignment_iters: if self.hard { 1 } else { 0 },
            queue: QueueParams {
                queue_length: self.queue * self.world,
                start_iter: 0,
                local_queue_length: self.queue,
            },
            ..SwavLossParams::default()
        }
    }

    fn kind(&self) -> Kind {
        if self.double {
            Kind::Double
        } else {
            Kind::Float
        }
    }

    /// Rank `rank`'s scores, one matrix per set of prototypes: cosine-like values in [-1, 1).
    fn scores(&self, rank: usize) -> Vec<Tensor> {
        self.prototypes
            .iter()
            .enumerate()
            .map(|(j, &k)| {
                uniform(
                    &[self.crops as i64 * self.images, k as i64],
                    (rank * 10 + j + 1) as u64,
                    self.kind(),
                )
            })
            .collect()
    }
}

/// What one rank computed in one step: its loss, the gradients of its scores, the queues it used.
struct RankStep {
    loss: f64,
    grads: Vec<Tensor>,
    queues: Option<Vec<Tensor>>,
}

fn run_ranks(case: &Case) -> Vec<RankStep> {
    let case = case.clone();
    run_world(case.world, move |rank, ctx| {
        let mut criterion =
            SwavCriterion::new("swav_loss", &case.params(), ctx).expect("criterion");
        let queues = (case.queue > 0).then(|| {
            let state = criterion.state_tensors("");
            (0..case.prototypes.len())
                .map(|j| {
                    let key = format!("local_queue{j}");
                    state
                        .iter()
                        .find(|(k, _)| *k == key)
                        .expect("queue state")
                        .1
                        .shallow_clone()
                })
                .collect()
        });
        let scores: Vec<Tensor> = case
            .scores(rank)
            .into_iter()
            .map(|s| s.set_requires_grad(true))
            .collect();
        let embedding = Tensor::zeros(
            [case.crops as i64 * case.images, DIM],
            (case.kind(), tch::Device::Cpu),
        );
        let loss = criterion
            .step(&embedding, &scores, None, None)
            .expect("loss");
        loss.backward();
        RankStep {
            loss: loss.double_value(&[]),
            grads: scores.iter().map(|s| s.grad().copy()).collect(),
            queues,
        }
    })
}

fn reference(case: &Case, steps: &[RankStep]) -> Value {
    let scores: Vec<Vec<Value>> = (0..case.world)
        .map(|r| case.scores(r).iter().map(to_json).collect())
        .collect();
    let queues: Vec<Value> = steps
        .iter()
        .map(|s| match &s.queues {
            Some(q) => Value::Array(q.iter().map(to_json).collect()),
            None => Value::Null,
        })
        .collect();
    run_reference(
        "swav.py",
        &json!({
            "scores": scores,
            "queues": queues,
            "num_crops": case.crops,
            "crops_for_assign": [0, 1],
            "temperature": 0.1,
            "epsilon": 0.05,
            "num_iters": 3,
            "hard": case.hard,
        }),
    )
}

/// Runs `case` and compares every rank with the reference; returns the worst loss difference.
fn check_against_reference(case: &Case, rtol: f64) -> f64 {
    let steps = run_ranks(case);
    let expected = reference(case, &steps);
    let mut worst: f64 = 0.0;
    for (rank, step) in steps.iter().enumerate() {
        let want = expected["losses"][rank].as_f64().expect("loss");
        worst = worst.max((step.loss - want).abs());
        assert!(
            (step.loss - want).abs() <= rtol * want.abs(),
            "rank {rank}: loss {} vs reference {want}",
            step.loss
        );
        for (j, grad) in step.grads.iter().enumerate() {
            assert_close(
                &format!("rank {rank} gradient of prototype scores {j}"),
                grad,
                &from_json(&expected["grads"][rank][j]),
                rtol,
                1e-9,
            );
        }
    }
    println!("max abs loss error vs numpy float64: {worst:e}");
    worst
}

fn base_case() -> Case {
    Case {
        world: 1,
        images: 5,
        crops: 3,
        prototypes: vec![4, 7],
        double: true,
        hard: false,
        queue: 0,
    }
}

#[test]
fn loss_and_gradients_match_numpy_in_float64() {
    check_against_reference(&base_case(), 1e-8);
}

#[test]
fn loss_and_gradients_match_numpy_in_float32() {
    check_against_reference(
        &Case {
            double: false,
            ..base_case()
        },
        1e-5,
    );
}

#[test]
fn hard_assignments_of_the_first_iterations_match_numpy() {
    check_against_reference(
        &Case {
            hard: true,
            ..base_case()
        },
        1e-8,
    );
}

#[test]
fn queue_rows_join_the_codes_and_match_numpy() {
    check_against_reference(
        &Case {
            queue: 6,
            world: 2,
            ..base_case()
        },
        1e-8,
    );
}

/// Both ranks' scores as one rank's, crop by crop: rank 0's images, then rank 1's.
fn joined_scores(two: &Case) -> Vec<Tensor> {
    (0..two.prototypes.len())
        .map(|j| {
            let per_rank: Vec<Tensor> = (0..two.world).map(|r| two.scores(r).remove(j)).collect();
            let crops: Vec<Tensor> = (0..two.crops as i64)
                .flat_map(|c| {
                    per_rank
                        .iter()
                        .map(move |s| s.narrow(0, c * two.images, two.images))
                })
                .collect();
            Tensor::cat(&crops, 0)
        })
        .collect()
}

#[test]
fn two_ranks_match_numpy_and_one_rank_with_all_images() {
    for double in [true, false] {
        let two = Case {
            world: 2,
            double,
            ..base_case()
        };
        let rtol = if double { 1e-8 } else { 1e-5 };
        check_against_reference(&two, rtol);

        let ranks = run_ranks(&two);
        let one = Case {
            world: 1,
            images: two.images * 2,
            ..two.clone()
        };
        let whole = run_world(1, {
            let (two, one) = (two.clone(), one.clone());
            move |_, ctx| {
                let mut criterion =
                    SwavCriterion::new("swav_loss", &one.params(), ctx).expect("criterion");
                let joined = joined_scores(&two);
                let embedding = Tensor::zeros(
                    [one.crops as i64 * one.images, DIM],
                    (one.kind(), tch::Device::Cpu),
                );
                criterion
                    .step(&embedding, &joined, None, None)
                    .expect("loss")
                    .double_value(&[])
            }
        });
        // Each rank averages over its own images; DDP averages the ranks.
        let mean = (ranks[0].loss + ranks[1].loss) / 2.0;
        let error = (mean - whole[0]).abs();
        println!("2-rank equivalence (double {double}): |mean of ranks - one rank| = {error:e}");
        assert!(error <= rtol * whole[0].abs(), "{mean} vs {}", whole[0]);
    }
}

#[test]
fn sinkhorn_balances_prototypes_and_normalises_samples() {
    let scores = uniform(&[64, 8], 7, Kind::Double) * 3.0;
    let settings = SinkhornSettings {
        num_iters: 200,
        epsilon: 0.5,
        double_precision: true,
    };
    let q = sinkhorn::assignments(
        &scores,
        &settings,
        false,
        &LossContext::single_process(),
        "t",
    )
    .unwrap();
    let per_sample = q.sum_dim_intlist(&[1i64][..], false, Kind::Double);
    assert_close(
        "sample mass",
        &per_sample,
        &per_sample.ones_like(),
        0.0,
        1e-12,
    );
    // Balanced: every prototype receives N / K of the samples.
    let per_prototype = q.sum_dim_intlist(&[0i64][..], false, Kind::Double);
    assert_close(
        "prototype mass",
        &per_prototype,
        &(per_prototype.ones_like() * 8.0),
        0.0,
        1e-6,
    );
    // Without iterations it is the softmax of scores / epsilon.
    let plain = SinkhornSettings {
        num_iters: 0,
        ..settings
    };
    let q0 =
        sinkhorn::assignments(&scores, &plain, false, &LossContext::single_process(), "t").unwrap();
    assert_close(
        "no iterations",
        &q0,
        &(&scores / 0.5).softmax(1, Kind::Double),
        0.0,
        1e-12,
    );
}

fn swav_model(heads: &str) -> (tch::nn::VarStore, BaseSslModel) {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&format!(
        "TRUNK: {{NAME: resnet, RESNETS: {{DEPTH: 18, STEM: cifar, BASE_CHANNELS: 4}}}}\n\
         HEAD: {{PARAMS: {heads}}}"
    ))
    .unwrap();
    let params = ModelParams::from_yaml(&yaml).unwrap();
    // Building draws weights from libtorch's global generator, which training runs seed.
    let _turn = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = BaseSslModel::new(&vs, &params).unwrap();
    (vs, model)
}

#[test]
fn swav_head_returns_the_normalised_embedding_and_one_score_matrix_per_prototype_set() {
    let (_vs, model) =
        swav_model(r#"[["swav_head", {dims: [32, 16, 8], use_bn: true, num_clusters: [5, 3]}]]"#);
    let names: Vec<String> = model
        .named_variables()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for name in [
        "heads.0.projection_head.0.weight",
        "heads.0.projection_head.1.running_mean",
        "heads.0.projection_head.3.weight",
        "heads.0.prototypes0.weight",
        "heads.0.prototypes1.weight",
    ] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing in {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n == "heads.0.prototypes0.bias"));
    let crops = [
        uniform(&[4, 3, 28, 28], 1, Kind::Float),
        uniform(&[4, 3, 28, 28], 2, Kind::Float),
        uniform(&[4, 3, 16, 16], 3, Kind::Float),
    ];
    let out = model.forward_multi_res(&crops, true).unwrap();
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].size(), [12, 8]);
    assert_eq!(out[1].size(), [12, 5]);
    assert_eq!(out[2].size(), [12, 3]);
    let norms = out[0].norm_scalaropt_dim(2.0, [1i64], false);
    assert_close("unit embeddings", &norms, &norms.ones_like(), 0.0, 1e-5);
    let prototypes = model
        .named_variables()
        .into_iter()
        .find(|(n, _)| n == "heads.0.prototypes1.weight")
        .unwrap()
        .1;
    assert_close("scores", &out[2], &out[0].mm(&prototypes.tr()), 0.0, 1e-6);

    // Without embeddings, only the scores; a following head would receive the embedding.
    let (_vs, model) = swav_model(
        r#"[["swav_head", {dims: [32, 8], num_clusters: [5], return_embeddings: false}]]"#,
    );
    let out = model.forward_t(&crops[0], false).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].size(), [4, 5]);
}

#[test]
fn bad_head_and_loss_settings_fail_naming_the_key() {
    let yaml: serde_yaml::Value = serde_yaml::from_str(
        "TRUNK: {NAME: resnet, RESNETS: {DEPTH: 18, BASE_CHANNELS: 4}}\n\
         HEAD: {PARAMS: [[swav_head, {dims: [32, 8], num_clusters: [5], use_weight_norm_prototypes: true}]]}",
    )
    .unwrap();
    let err = ModelParams::from_yaml(&yaml).unwrap_err().to_string();
    assert!(err.contains("use_weight_norm_prototypes"), "{err}");

    let section: serde_yaml::Value = serde_yaml::from_str(
        "{name: swav_loss, swav_loss: {num_crops: 2, crops_for_assign: [0, 2]}}",
    )
    .unwrap();
    let err = build_loss(&section, LossContext::single_process())
        .err()
        .expect("crop 2 of 2")
        .to_string();
    assert!(err.contains("swav_loss.crops_for_assign"), "{err}");

    // Outputs that do not fit the config name the mismatch.
    let section: serde_yaml::Value = serde_yaml::from_str(
        "{name: swav_loss, swav_loss: {embedding_dim: 4, num_prototypes: [3]}}",
    )
    .unwrap();
    let mut loss = build_loss(&section, LossContext::single_process()).unwrap();
    let err = loss
        .forward(
            &[
                Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu)),
                Tensor::zeros([4, 5], (Kind::Float, tch::Device::Cpu)),
            ],
            &Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu)),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected [4, 3]"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// Training

/// A tiny SwAV run of the quick config: 64 images in batches of 16 (4 steps per epoch).
fn config(dir: &Path, extra: &[&str]) -> Config {
    let mut args: Vec<String> = vec![
        "config=pretrain/swav/quick_cpu_fmnist".into(),
        format!("config.CHECKPOINT.DIR={}", dir.display()),
        "config.DATA.TRAIN.DATA_LIMIT=64".into(),
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16".into(),
        "config.DATA.NUM_DATALOADER_WORKERS=1".into(),
        "config.OPTIMIZER.num_epochs=2".into(),
        "config.CHECKPOINT.KEEP_LAST_K=-1".into(),
        "config.LOSS.swav_loss.queue.queue_length=32".into(),
        "config.LOSS.swav_loss.queue.start_iter=2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
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

fn prototypes(dir: &Path) -> Tensor {
    latest_group(dir, "model")
        .into_iter()
        .find(|(n, _)| n == "heads.0.prototypes0.weight")
        .expect("prototypes in the checkpoint")
        .1
}

#[test]
fn prototypes_stay_put_while_frozen_and_are_normalised_after_every_update() {
    let frozen = tempfile::tempdir().unwrap();
    let freeze = "config.LOSS.swav_loss.freeze_prototypes_niters=3";
    run(config(frozen.path(), &[freeze]), Some(1));
    let after_one = prototypes(frozen.path());
    run(config(frozen.path(), &[freeze]), Some(3));
    let after_three = prototypes(frozen.path());
    let norms = after_three.norm_scalaropt_dim(2.0, [1i64], false);
    assert_close("unit prototypes", &norms, &norms.ones_like(), 0.0, 1e-6);
    assert_close("frozen prototypes", &after_three, &after_one, 0.0, 1e-6);
    run(config(frozen.path(), &[freeze]), Some(4));
    let moved = (prototypes(frozen.path()) - &after_three)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        moved > 1e-4,
        "prototypes did not move after the frozen iterations ({moved})"
    );
}

#[test]
fn resumed_runs_with_the_queue_equal_a_straight_run_bitwise() {
    let extra = ["config.LOSS.swav_loss.freeze_prototypes_niters=1"];
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(config(straight_dir.path(), &extra), None);
    assert_eq!(straight.iterations, 8);

    // Stopped mid-epoch after the queue started (step 3 of 4), then run to the end.
    let resumed_dir = tempfile::tempdir().unwrap();
    let first = run(config(resumed_dir.path(), &extra), Some(3));
    assert_eq!(first.iterations, 3);
    let second = run(config(resumed_dir.path(), &extra), None);
    let resumed: Vec<(u64, f64)> = [first.losses, second.losses].concat();
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
    let names: Vec<String> = latest_group(straight_dir.path(), "loss")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["local_emb_queue", "local_queue0", "num_iteration"]);
}

// ------------------------------------------------------------------------------------------------
// swav_momentum_loss

fn momentum_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "config.LOSS.name=swav_momentum_loss",
        "config.LOSS.swav_momentum_loss.queue.queue_length=32",
        "config.LOSS.swav_momentum_loss.queue.start_iter=2",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn momentum_codes_equal_the_models_at_the_first_step() {
    // At the first step the encoder is a copy of the model; in training mode, with the two crops
    // it assigns being all the crops, it sees the model's batch, so its codes and the loss are
    // plain SwAV's. (With small crops too, the model's head batch norm would also see those.)
    const HEADS: &str =
        r#"[["swav_head", {dims: [32, 16, 8], use_bn: true, num_clusters: [5, 3]}]]"#;
    let (_vs, model) = swav_model(HEADS);
    let factory: ModelFactory = Arc::new(|| Ok(swav_model(HEADS)));
    let mut momentum = SwavMomentumLoss::new(
        &SwavMomentumLossParams {
            embedding_dim: 8,
            num_prototypes: vec![5, 3],
            momentum_eval_mode_iter_start: 100,
            ..SwavMomentumLossParams::default()
        },
        LossContext::single_process().with_model_factory(factory),
    )
    .unwrap();
    let mut plain = SwavLoss::new(
        &SwavLossParams {
            embedding_dim: 8,
            num_prototypes: vec![5, 3],
            ..SwavLossParams::default()
        },
        LossContext::single_process(),
    )
    .unwrap();
    let crops = [
        uniform(&[6, 3, 28, 28], 1, Kind::Float),
        uniform(&[6, 3, 28, 28], 2, Kind::Float),
    ];
    let outputs = model.forward_multi_res(&crops, true).unwrap();
    let step = StepContext {
        model: &model,
        crops: &crops,
        iteration: 0,
        epoch: 0,
        iterations_per_epoch: 1,
        num_epochs: 1,
        train: true,
    };
    let target = Tensor::zeros([0], (Kind::Int64, tch::Device::Cpu));
    let a = plain.forward(&outputs, &target).unwrap().double_value(&[]);
    let b = momentum
        .forward_step(&outputs, &target, &step)
        .unwrap()
        .double_value(&[]);
    assert!(
        (a - b).abs() <= 1e-6 * a.abs(),
        "swav {a} vs swav_momentum {b}"
    );
    assert!(momentum.encoder().is_initialised());
    // Without the step (no model, no crops) the loss cannot run.
    let err = momentum.forward(&outputs, &target).unwrap_err().to_string();
    assert!(err.contains("forward_step"), "{err}");
}

#[test]
fn momentum_runs_resume_bitwise_with_encoder_and_queue() {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(config(straight_dir.path(), &momentum_args(&[])), None);
    assert_eq!(straight.iterations, 8);
    let resumed_dir = tempfile::tempdir().unwrap();
    let first = run(config(resumed_dir.path(), &momentum_args(&[])), Some(3));
    let second = run(config(resumed_dir.path(), &momentum_args(&[])), None);
    let resumed: Vec<(u64, f64)> = [first.losses, second.losses].concat();
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
    let state = latest_group(straight_dir.path(), "loss");
    let encoder = state
        .iter()
        .find(|(n, _)| n == "momentum_encoder.heads.0.prototypes0.weight")
        .expect("encoder in the loss state")
        .1
        .shallow_clone();
    let model = latest_group(straight_dir.path(), "model")
        .into_iter()
        .find(|(n, _)| n == "heads.0.prototypes0.weight")
        .unwrap()
        .1;
    // The encoder trails the model: normalised, close, but not equal.
    let norms = encoder.norm_scalaropt_dim(2.0, [1i64], false);
    assert_close(
        "unit encoder prototypes",
        &norms,
        &norms.ones_like(),
        0.0,
        1e-6,
    );
    let gap = (&encoder - &model).abs().max().double_value(&[]);
    assert!(gap > 0.0 && gap < 0.5, "encoder-model gap {gap}");
}
