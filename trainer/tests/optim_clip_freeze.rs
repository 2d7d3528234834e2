//! `MODEL.GRAD_CLIP` and `MODEL.TEMP_FROZEN_PARAMS_ITER_MAP`: the clipped joint norm equals the
//! threshold (norms computed here from the raw numbers), frozen parameters stay bitwise equal for
//! their iterations and then move with a fresh optimizer state, and the train loop applies both.

use std::path::Path;

use tch::{Device, Kind, Tensor};
use vissl_crds::config::model::{GradClipConfig, TempFrozenParam};
use vissl_crds::config::{load, Config, LoadOptions};
use vissl_trainer::checkpoint;
use vissl_trainer::engine::{build_model, RunOptions, Trainer};
use vissl_trainer::optim::{GradClip, NamedParam, Optimizer, OptimizerParams};

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("tensor values")
}

/// Deterministic gradients with known entries: `[3, -4]`, `[[1, 2], [-2, 0.5]]`, `[12]`.
fn grads() -> Vec<Tensor> {
    vec![
        Tensor::from_slice(&[3.0f32, -4.0]),
        Tensor::from_slice(&[1.0f32, 2.0, -2.0, 0.5]).view([2, 2]),
        Tensor::from_slice(&[12.0f32]),
    ]
}

/// The p-norm of all entries, straight from the definition.
fn p_norm(entries: &[f64], p: f64) -> f64 {
    if p.is_infinite() {
        entries.iter().fold(0.0, |m, x| m.max(x.abs()))
    } else {
        entries
            .iter()
            .map(|x| x.abs().powf(p))
            .sum::<f64>()
            .powf(1.0 / p)
    }
}

fn all_entries(grads: &[Tensor]) -> Vec<f64> {
    grads.iter().flat_map(values).collect()
}

#[test]
fn clipping_scales_the_joint_norm_down_to_the_threshold() {
    for norm_type in [2.0, 1.0, 3.0, f64::INFINITY] {
        let grads = grads();
        let before = all_entries(&grads);
        let expected_norm = p_norm(&before, norm_type);
        let max_norm = 0.25 * expected_norm;
        let clip = GradClip {
            max_norm,
            norm_type,
        };
        let reported = clip.clip(&grads).expect("clips").double_value(&[]);
        assert!(
            (reported - expected_norm).abs() <= 1e-6 * expected_norm,
            "p={norm_type}: reported norm {reported}, expected {expected_norm}"
        );
        let after = all_entries(&grads);
        // PyTorch divides by norm + 1e-6, so the result sits just below the threshold.
        let clipped = p_norm(&after, norm_type);
        assert!(
            (clipped - max_norm).abs() <= 1e-6 * max_norm + 1e-6,
            "p={norm_type}: clipped norm {clipped}, threshold {max_norm}"
        );
        // One scale for every entry: the direction is kept.
        for (a, b) in after.iter().zip(&before) {
            assert!((a - b * max_norm / expected_norm).abs() <= 1e-5 * b.abs().max(1.0));
        }
    }
}

#[test]
fn gradients_below_the_threshold_are_left_bitwise_unchanged() {
    let grads = grads();
    let copies: Vec<Tensor> = grads.iter().map(Tensor::copy).collect();
    let norm = p_norm(&all_entries(&grads), 2.0);
    let _norm = GradClip {
        max_norm: 2.0 * norm,
        norm_type: 2.0,
    }
    .clip(&grads)
    .expect("clips");
    for (g, c) in grads.iter().zip(&copies) {
        assert!(g.equal(c));
    }
}

#[test]
fn grad_clip_config_is_read_and_checked() {
    let read = |yaml: &str| {
        let cfg: GradClipConfig = serde_yaml::from_str(yaml).expect("test YAML");
        GradClip::from_config(&cfg)
    };
    assert_eq!(
        read("{USE_GRAD_CLIP: false, NORM_TYPE: 2, MAX_NORM: 1}").unwrap(),
        None
    );
    assert_eq!(
        read("{USE_GRAD_CLIP: true, NORM_TYPE: inf, MAX_NORM: 3}").unwrap(),
        Some(GradClip {
            max_norm: 3.0,
            norm_type: f64::INFINITY
        })
    );
    let err = read("{USE_GRAD_CLIP: true, NORM_TYPE: 2, MAX_NORM: -1}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("MODEL.GRAD_CLIP.MAX_NORM"), "{err}");
    let err = read("{USE_GRAD_CLIP: true, NORM_TYPE: 0, MAX_NORM: 1}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("MODEL.GRAD_CLIP.NORM_TYPE"), "{err}");
}

/// SGD without momentum or decay at lr 1 moves each parameter by minus its (clipped) gradient.
#[test]
fn the_optimizer_step_applies_the_clipped_gradients() {
    let cfg = OptimizerParams::from_yaml(
        &serde_yaml::from_str("{name: sgd, momentum: 0.0, weight_decay: 0.0}").unwrap(),
    )
    .unwrap();
    let targets = grads();
    let params: Vec<NamedParam> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            NamedParam::new(
                format!("trunk.p{i}.weight"),
                t.zeros_like().set_requires_grad(true),
            )
        })
        .collect();
    let mut opt = Optimizer::new(params, &cfg).unwrap();
    let max_norm = 1.5;
    opt.set_grad_clip(Some(GradClip {
        max_norm,
        norm_type: 2.0,
    }));
    // Loss -sum(t * p): the gradient is -t.
    let loss = opt
        .params()
        .iter()
        .zip(&targets)
        .map(|(p, t)| -(t * &p.tensor).sum(Kind::Float))
        .fold(Tensor::from(0.0f32), |a, b| a + b);
    loss.backward();
    opt.step(1.0, 1.0).unwrap();
    let moved: Vec<f64> = opt
        .params()
        .iter()
        .flat_map(|p| values(&p.tensor))
        .collect();
    let norm = p_norm(&moved, 2.0);
    assert!(
        (norm - max_norm).abs() < 1e-5,
        "the step's norm {norm}, threshold {max_norm}"
    );
}

fn toy_optimizer(yaml: &str) -> Optimizer {
    let cfg = OptimizerParams::from_yaml(&serde_yaml::from_str(yaml).unwrap()).unwrap();
    let params = ["heads.0.prototypes0.weight", "trunk.fc.weight"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let init = Tensor::from_slice(&[0.5f64 + i as f64, -1.0, 2.0, 0.25]).view([2, 2]);
            NamedParam::new(*name, init.set_requires_grad(true))
        })
        .collect();
    Optimizer::new(params, &cfg).unwrap()
}

/// Gradient of `sum(c * p)`: the constant `c`.
const C: [f64; 4] = [0.3, -0.2, 0.1, 0.4];

fn step(opt: &mut Optimizer, iteration: u64, lr: f64) {
    opt.zero_grad();
    let c = Tensor::from_slice(&C).view([2, 2]);
    let loss = opt
        .params()
        .iter()
        .map(|p| (&c * &p.tensor).sum(Kind::Double))
        .fold(Tensor::from(0.0f64), |a, b| a + b);
    loss.backward();
    opt.step_at(iteration, lr, lr).unwrap();
}

#[test]
fn frozen_parameters_stay_bitwise_equal_then_move_from_a_fresh_state() {
    let (wd, lr, frozen_for) = (0.1, 0.5, 3u64);
    let mut opt = toy_optimizer("{name: sgd, momentum: 0.9, weight_decay: 0.1}");
    opt.set_temp_frozen(&[TempFrozenParam {
        name: "module.heads.0.prototypes0.weight".into(),
        iterations: frozen_for,
    }])
    .unwrap();
    assert_eq!(
        opt.temp_frozen(),
        vec![("heads.0.prototypes0.weight", frozen_for)]
    );
    let initial = opt.params()[0].tensor.detach().copy();
    let trunk_initial = opt.params()[1].tensor.detach().copy();
    for iteration in 0..frozen_for {
        step(&mut opt, iteration, lr);
        assert!(
            opt.params()[0].tensor.equal(&initial),
            "frozen parameter changed at iteration {iteration}"
        );
    }
    assert!(
        !opt.params()[1].tensor.equal(&trunk_initial),
        "the trunk trains meanwhile"
    );
    assert!(
        opt.state_dict()
            .iter()
            .all(|(k, _)| !k.starts_with("heads.")),
        "no momentum is gathered while frozen"
    );
    step(&mut opt, frozen_for, lr);
    // The first SGD step from an empty buffer: p - lr * (c + wd * p).
    let expected: Vec<f64> = values(&initial)
        .iter()
        .zip(C)
        .map(|(p, c)| p - lr * (c + wd * p))
        .collect();
    let got = values(&opt.params()[0].tensor);
    for (g, e) in got.iter().zip(&expected) {
        assert!(
            (g - e).abs() < 1e-15,
            "after unfreezing: {got:?}, expected {expected:?}"
        );
    }
}

#[test]
fn a_frozen_map_naming_no_parameter_fails_naming_the_key() {
    let mut opt = toy_optimizer("{name: sgd}");
    let err = opt
        .set_temp_frozen(&[TempFrozenParam {
            name: "module.heads.0.typo".into(),
            iterations: 5,
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("MODEL.TEMP_FROZEN_PARAMS_ITER_MAP"), "{err}");
    assert!(err.contains("module.heads.0.typo"), "{err}");
    // An empty map freezes nothing.
    opt.set_temp_frozen(&[]).unwrap();
    assert!(opt.temp_frozen().is_empty());
}

/// The quickstart SimCLR run, 16 images a step, with the second head's first layer frozen for 3
/// iterations and gradient clipping on.
fn quick_config(dir: &Path) -> Config {
    let args: Vec<String> = vec![
        "config=pretrain/simclr/quick_cpu_fmnist".into(),
        format!("config.CHECKPOINT.DIR={}", dir.display()),
        "config.DATA.TRAIN.DATA_LIMIT=96".into(),
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16".into(),
        "config.DATA.NUM_DATALOADER_WORKERS=1".into(),
        "config.OPTIMIZER.num_epochs=1".into(),
        "config.CHECKPOINT.KEEP_LAST_K=-1".into(),
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[['module.heads.1.clf.0.weight', 3]]".into(),
        "config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=true".into(),
        "config.MODEL.GRAD_CLIP.MAX_NORM=0.5".into(),
    ];
    load(&LoadOptions::default(), &args).expect("test config loads")
}

fn frozen_weight_after(iterations: u64) -> (Tensor, Tensor) {
    let dir = tempfile::tempdir().unwrap();
    let config = quick_config(dir.path());
    // The engine seeds libtorch with SEED_VALUE and then builds the model: the same initial weights.
    tch::manual_seed(config.seed_value as i64);
    let (_vs, model) = build_model(&config, Device::Cpu).unwrap();
    let initial = model
        .trainable_parameters()
        .into_iter()
        .find(|(n, _)| n == "heads.1.clf.0.weight")
        .expect("the quickstart's second head has clf.0")
        .1
        .detach()
        .copy();
    Trainer::new(
        config,
        RunOptions {
            stop_after_iterations: Some(iterations),
            ..RunOptions::default()
        },
    )
    .expect("trainer builds")
    .train()
    .expect("training runs");
    let ckpt = checkpoint::latest(dir.path())
        .unwrap()
        .expect("a checkpoint");
    let trained = ckpt
        .tensors("model")
        .unwrap()
        .into_iter()
        .find(|(n, _)| n == "heads.1.clf.0.weight")
        .expect("checkpointed")
        .1;
    (initial, trained)
}

#[test]
fn the_train_loop_keeps_a_frozen_parameter_for_its_iterations() {
    let (initial, after_two) = frozen_weight_after(2);
    assert!(
        after_two.equal(&initial),
        "frozen for 3 iterations, changed after 2"
    );
    let (initial, after_four) = frozen_weight_after(4);
    assert!(
        !after_four.equal(&initial),
        "unfrozen at iteration 3, unchanged after 4"
    );
}
