//! DINO: the loss and center update against a float64 numpy reference (float64 and float32),
//! 2 simulated ranks against 1 rank, the temperature and momentum schedules, a training step with
//! the teacher on a small vision transformer with `dino_head`, and the state round trip; the
//! trunk's and head's parameter names and sizes.
//!
//! Tolerances: float64 within 1e-7 relative of the reference; float32 within 1e-5 relative on the
//! value and 1e-4 relative on gradients (softmax over K logits in float32).

#[path = "reference/harness.rs"]
mod harness;
#[path = "reference/simulated_ranks.rs"]
mod simulated_ranks;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::json;
use simulated_ranks::run_ranks;
use tch::{nn, Device, Kind, Tensor};
use vissl_trainer::losses::dino_loss::{DinoLoss, DinoParams};
use vissl_trainer::losses::{build_loss, Loss, LossContext, StepContext};
use vissl_trainer::models::trunks::vision_transformer::{vit_base, vit_small, vit_tiny};
use vissl_trainer::models::{BaseSslModel, ModelParams};

const STUDENT_TEMP: f64 = 0.1;
const TEACHER_TEMP: f64 = 0.05;
const EMA: f64 = 0.9;

fn params(k: usize, crops: usize) -> DinoParams {
    DinoParams {
        student_temp: STUDENT_TEMP,
        output_dim: k,
        num_crops: crops,
        crops_for_teacher: vec![0, 1],
        ema_center: EMA,
        ..DinoParams::default()
    }
}

/// The rank losses of a simulated world (students and teachers per rank) after back-propagating
/// their sum, the students' gradients and each rank's center afterwards.
fn world(
    students: &[Tensor],
    teachers: &[Tensor],
    center: &Tensor,
    crops: usize,
) -> (Vec<f64>, Vec<Tensor>, Vec<Tensor>) {
    let k = students[0].size()[1] as usize;
    let inputs: Vec<Tensor> = students
        .iter()
        .map(|s| s.detach().set_requires_grad(true))
        .collect();
    let results = run_ranks(teachers, |rank, ctx| {
        let mut loss = DinoLoss::new(&params(k, crops), ctx).unwrap();
        let mut state = loss.state_tensors();
        state[0].1 = center.shallow_clone();
        loss.load_state(&state).unwrap();
        let value = loss
            .distill(&inputs[rank], &teachers[rank], TEACHER_TEMP)
            .unwrap();
        (value, loss.center().shallow_clone())
    });
    let total = results
        .iter()
        .skip(1)
        .fold(results[0].0.shallow_clone(), |sum, (l, _)| sum + l);
    total.backward();
    (
        results.iter().map(|(l, _)| l.double_value(&[])).collect(),
        inputs.iter().map(Tensor::grad).collect(),
        results.into_iter().map(|(_, c)| c).collect(),
    )
}

fn check_against_reference(
    students: &[Tensor],
    teachers: &[Tensor],
    center: &Tensor,
    crops: usize,
    rtol: f64,
) -> f64 {
    let (losses, grads, centers) = world(students, teachers, center, crops);
    let reference = run_reference(
        "dino.py",
        &json!({
            "students": students.iter().map(to_json).collect::<Vec<_>>(),
            "teachers": teachers.iter().map(to_json).collect::<Vec<_>>(),
            "center": to_json(center),
            "student_temp": STUDENT_TEMP, "teacher_temp": TEACHER_TEMP, "ema_center": EMA,
            "num_crops": crops, "teacher_crops": 2,
        }),
    );
    let mut worst: f64 = 0.0;
    for (rank, loss) in losses.iter().enumerate() {
        let expected = reference["losses"][rank].as_f64().unwrap();
        worst = worst.max((loss - expected).abs());
        assert!(
            (loss - expected).abs() <= rtol * expected.abs(),
            "rank {rank}: {loss} vs {expected}"
        );
        let expected_grad = from_json(&reference["grads"][rank]);
        worst = worst.max(
            (grads[rank].to_kind(Kind::Double) - &expected_grad)
                .abs()
                .max()
                .double_value(&[]),
        );
        assert_close(
            "student gradient",
            &grads[rank],
            &expected_grad,
            rtol * 10.0,
            1e-9,
        );
        assert_close(
            "center",
            &centers[rank],
            &from_json(&reference["center"]),
            rtol,
            1e-9,
        );
    }
    worst
}

#[test]
fn dino_loss_matches_numpy_in_float64_and_float32() {
    for (kind, rtol) in [(Kind::Double, 1e-7), (Kind::Float, 1e-5)] {
        let (n, k, crops) = (3, 6, 4);
        let students = [uniform(&[crops * n, k], 61, kind) * 2.0];
        let teachers = [uniform(&[2 * n, k], 62, kind)];
        let center = uniform(&[1, k], 63, kind) * 0.1;
        let worst = check_against_reference(&students, &teachers, &center, crops as usize, rtol);
        println!("dino parity {kind:?}: max abs error {worst:e}");
    }
}

#[test]
fn dino_two_ranks_match_numpy_and_one_rank_on_the_global_batch() {
    let (n, k, crops) = (2i64, 5i64, 3i64);
    let students = [
        uniform(&[crops * n, k], 64, Kind::Double),
        uniform(&[crops * n, k], 65, Kind::Double),
    ];
    let teachers = [
        uniform(&[2 * n, k], 66, Kind::Double),
        uniform(&[2 * n, k], 67, Kind::Double),
    ];
    let center = Tensor::zeros([1, k], (Kind::Double, Device::Cpu));
    let worst = check_against_reference(&students, &teachers, &center, crops as usize, 1e-7);
    println!("dino 2-rank parity: max abs error {worst:e}");

    // One process with both ranks' images, crop-major over the global batch.
    let interleave = |parts: &[Tensor], chunks: i64| {
        let mut rows = Vec::new();
        for c in 0..chunks {
            for p in parts {
                rows.push(p.narrow(0, c * n, n));
            }
        }
        Tensor::cat(&rows, 0)
    };
    let f32s = |t: &[Tensor]| t.iter().map(|x| x.to_kind(Kind::Float)).collect::<Vec<_>>();
    let (students, teachers) = (f32s(&students), f32s(&teachers));
    let center = center.to_kind(Kind::Float);
    let (one, one_grad, one_center) = world(
        &[interleave(&students, crops)],
        &[interleave(&teachers, 2)],
        &center,
        crops as usize,
    );
    let (two, two_grads, two_centers) = world(&students, &teachers, &center, crops as usize);
    let mut worst = ((two[0] + two[1]) / 2.0 - one[0]).abs();
    for rank in 0..2 {
        worst = worst.max(
            (&two_centers[rank] - &one_center[0])
                .abs()
                .max()
                .double_value(&[]),
        );
        for c in 0..crops {
            let mine = two_grads[rank].narrow(0, c * n, n) / 2.0;
            let global_rows = one_grad[0].narrow(0, (c * 2 + rank as i64) * n, n);
            worst = worst.max((mine - global_rows).abs().max().double_value(&[]));
        }
    }
    println!("dino 2-rank vs 1-rank: max abs difference {worst:e}");
    assert!(worst < 1e-6, "{worst:e}");
}

#[test]
fn teacher_temperature_warms_up_linearly_and_momentum_follows_a_cosine() {
    let p = DinoParams {
        teacher_temp_min: 0.04,
        teacher_temp_max: 0.07,
        teacher_temp_warmup_iters: 4,
        momentum: 0.996,
        ..DinoParams::default()
    };
    // torch.linspace(0.04, 0.07, 4) = [0.04, 0.05, 0.06, 0.07], then 0.07.
    let temps: Vec<f64> = (0..6).map(|i| p.teacher_temp(i)).collect();
    for (got, want) in temps.iter().zip([0.04, 0.05, 0.06, 0.07, 0.07, 0.07]) {
        assert!((got - want).abs() < 1e-12, "{temps:?}");
    }
    assert!((p.teacher_momentum(0, 100) - 0.996).abs() < 1e-12);
    assert!((p.teacher_momentum(50, 100) - 0.998).abs() < 1e-12);
    assert!((p.teacher_momentum(100, 100) - 1.0).abs() < 1e-12);
}

fn tiny_vit(drop_path: f64) -> anyhow::Result<(nn::VarStore, BaseSslModel)> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&format!(
        "TRUNK: {{NAME: vision_transformer, VISION_TRANSFORMERS: {{IMAGE_SIZE: 16, PATCH_SIZE: 4, \
         NUM_LAYERS: 2, NUM_HEADS: 2, HIDDEN_DIM: 8, MLP_DIM: 16, QKV_BIAS: true, \
         DROP_PATH_RATE: {drop_path}}}}}\n\
         HEAD: {{PARAMS: [[dino_head, {{in_dim: 8, num_clusters: [10], hidden_dim: 12, \
         bottleneck_dim: 6}}]]}}"
    ))?;
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
        iterations_per_epoch: 5,
        num_epochs: 2,
        train: true,
    }
}

fn by_name(state: &[(String, Tensor)], name: &str) -> Tensor {
    state
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.shallow_clone())
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn a_training_step_distills_from_an_ema_teacher_and_state_round_trips() {
    tch::manual_seed(1);
    let (_vs, model) = tiny_vit(0.5).unwrap();
    let section: serde_yaml::Value = serde_yaml::from_str(
        "{name: dino_loss, dino_loss: {output_dim: 10, num_crops: 4, teacher_temp_warmup_iters: 3, momentum: 0.9}}",
    )
    .unwrap();
    let mut loss = build_loss(&section, LossContext::single_process()).unwrap();
    // Two global crops at 16 and two local crops at 8 (position embeddings resized).
    let crops = [
        uniform(&[2, 3, 16, 16], 70, Kind::Float),
        uniform(&[2, 3, 16, 16], 71, Kind::Float),
        uniform(&[2, 3, 8, 8], 72, Kind::Float),
        uniform(&[2, 3, 8, 8], 73, Kind::Float),
    ];
    let target = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let output = model.forward_multi_res(&crops, true).unwrap();
    assert_eq!(output[0].size(), [8, 10]);
    let value = loss
        .forward_step(&output, &target, &step(&model, &crops, 0))
        .unwrap();
    assert!(value.double_value(&[]).is_finite());
    value.backward();

    // The teacher starts as the student's copy; after the update it is an EMA with the cosine
    // momentum of iteration 1 of 10.
    let name = "heads.0.mlp.0.weight";
    let before = by_name(&loss.state_tensors(), &format!("momentum_teacher.{name}"));
    let student = by_name(&model.named_variables(), name).detach().copy();
    assert!(before.equal(&student));
    {
        let _g = tch::no_grad_guard();
        for (n, mut t) in model.named_variables() {
            if n == name {
                t.copy_(&(t.ones_like() * 2.0));
            }
        }
    }
    loss.on_update(&step(&model, &crops, 0)).unwrap();
    let m = 1.0 - 0.5 * 0.1 * ((std::f64::consts::PI * 0.1).cos() + 1.0);
    let after = by_name(&loss.state_tensors(), &format!("momentum_teacher.{name}"));
    assert_close(
        "teacher EMA",
        &after,
        &(&student * m + 2.0 * (1.0 - m)).to_kind(Kind::Double),
        1e-6,
        1e-7,
    );

    // The teacher was built without stochastic depth: in training mode it is deterministic.
    let state = loss.state_tensors();
    let center = by_name(&state, "center");
    assert_eq!(center.size(), [1, 10]);
    assert!(
        center.abs().sum(Kind::Double).double_value(&[]) > 0.0,
        "center moved"
    );

    // A checkpoint loaded before the first step is applied when the teacher is built.
    let mut restored = build_loss(&section, LossContext::single_process()).unwrap();
    restored.load_state(&state).unwrap();
    let pending = restored.state_tensors();
    assert_eq!(pending.len(), state.len());
    let _ = restored
        .forward_step(&output, &target, &step(&model, &crops, 1))
        .unwrap();
    let built = restored.state_tensors();
    assert!(by_name(&built, &format!("momentum_teacher.{name}")).equal(&after));

    let err = loss
        .forward_step(&output, &target, &step(&model, &crops[..1], 1))
        .unwrap_err();
    assert!(err.to_string().contains("multicrop_collator"), "{err}");
}

#[test]
fn teacher_runs_without_stochastic_depth() {
    tch::manual_seed(2);
    let (_vs, model) = tiny_vit(0.9).unwrap();
    let section: serde_yaml::Value =
        serde_yaml::from_str("{name: dino_loss, dino_loss: {output_dim: 10, num_crops: 2}}")
            .unwrap();
    let crops = [
        uniform(&[2, 3, 16, 16], 74, Kind::Float),
        uniform(&[2, 3, 16, 16], 75, Kind::Float),
    ];
    let target = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let output = tch::no_grad(|| model.forward_multi_res(&crops, false)).unwrap();
    // Same student output and teacher weights twice: equal losses only if the teacher forward
    // is deterministic (the student's drop path rate 0.9 would make it random).
    let mut a = build_loss(&section, LossContext::single_process()).unwrap();
    let mut b = build_loss(&section, LossContext::single_process()).unwrap();
    let la = a
        .forward_step(&output, &target, &step(&model, &crops, 0))
        .unwrap();
    let lb = b
        .forward_step(&output, &target, &step(&model, &crops, 0))
        .unwrap();
    assert!(la.equal(&lb), "{la} vs {lb}");
}

#[test]
fn vision_transformer_presets_have_deits_parameter_counts_and_vissl_names() {
    // DeiT-Tiny/Small/Base without their 1000-class classifier (timm: 5,717,416, 22,050,664 and
    // 86,567,656 parameters with it).
    for (preset, expected) in [
        (vit_tiny(), 5_524_416i64),
        (vit_small(), 21_665_664),
        (vit_base(), 85_798_656),
    ] {
        let mut params = ModelParams::default();
        params.trunk.name = "vision_transformer".into();
        params.trunk.vision_transformers = preset.clone();
        params.trunk.vision_transformers.qkv_bias = true;
        let vs = nn::VarStore::new(Device::Cpu);
        let model = BaseSslModel::new(&vs, &params).unwrap();
        let count: i64 = model
            .trainable_parameters()
            .iter()
            .map(|(_, t)| t.numel() as i64)
            .sum();
        assert_eq!(count, expected, "{preset:?}");
        let names: Vec<String> = model
            .named_variables()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for name in [
            "trunk.cls_token",
            "trunk.pos_embed",
            "trunk.patch_embed.proj.weight",
            "trunk.blocks.11.attn.qkv.bias",
            "trunk.blocks.0.mlp.fc2.weight",
            "trunk.norm.bias",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
        }
        let out = tch::no_grad(|| {
            model.forward_t(
                &Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu)),
                false,
            )
        })
        .unwrap();
        assert_eq!(out[0].size(), [1, preset.hidden_dim]);
    }
}

#[test]
fn dino_head_names_and_frozen_prototype_norms() {
    let (_vs, model) = tiny_vit(0.0).unwrap();
    let vars = model.named_variables();
    let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "heads.0.mlp.0.weight",
        "heads.0.mlp.2.weight",
        "heads.0.mlp.4.bias",
        "heads.0.prototypes0.weight_v",
        "heads.0.prototypes0.weight_g",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let trainable: Vec<String> = model
        .trainable_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        !trainable.iter().any(|n| n.ends_with("weight_g")),
        "weight_g fixed at 1"
    );
    // The prototypes are unit vectors and the bottleneck is normalised: |logits| <= 1.
    let out = tch::no_grad(|| model.forward_t(&uniform(&[3, 3, 16, 16], 76, Kind::Float), false))
        .unwrap();
    assert!(out[0].abs().max().double_value(&[]) <= 1.0 + 1e-6);

    let bad: serde_yaml::Value = serde_yaml::from_str(
        "TRUNK: {NAME: vision_transformer}\nHEAD: {PARAMS: [[dino_head, {in_dim: 768, num_clusters: [10, 20]}]]}",
    )
    .unwrap();
    let err = ModelParams::from_yaml(&bad).unwrap_err();
    assert!(err.to_string().contains("num_clusters"), "{err}");
}

#[test]
fn a_weight_decay_schedule_sets_the_regularized_groups_only() {
    use vissl_trainer::optim::{GroupKind, NamedParam, Optimizer, OptimizerParams};
    let (_vs, model) = tiny_vit(0.0).unwrap();
    let build = |yaml: &str| {
        let cfg = OptimizerParams::from_yaml(&serde_yaml::from_str(yaml).unwrap()).unwrap();
        Optimizer::new(NamedParam::trainable(model.trainable_parameters()), &cfg).unwrap()
    };
    let decay_of = |opt: &Optimizer, kind: GroupKind| {
        opt.param_groups()
            .iter()
            .find(|g| g.kind == kind)
            .map(|g| g.weight_decay)
            .unwrap_or_else(|| panic!("a {kind:?} group"))
    };
    let mut opt = build("{name: adamw, weight_decay: 0.04, num_epochs: 1}");
    opt.set_weight_decay(0.4);
    assert_eq!(decay_of(&opt, GroupKind::TrunkRegularized), 0.4);
    assert_eq!(decay_of(&opt, GroupKind::HeadRegularized), 0.4);
    assert_eq!(decay_of(&opt, GroupKind::TrunkUnregularized), 0.0);

    let mut own_head = build(
        "{name: adamw, weight_decay: 0.04, num_epochs: 1, head_optimizer_params: \
         {use_different_lr: false, use_different_wd: true, weight_decay: 0.1}}",
    );
    own_head.set_weight_decay(0.4);
    assert_eq!(decay_of(&own_head, GroupKind::TrunkRegularized), 0.4);
    assert_eq!(decay_of(&own_head, GroupKind::HeadRegularized), 0.1);
}
