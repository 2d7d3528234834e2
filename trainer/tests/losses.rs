//! Losses against VISSL's pinned masks, worked examples and float64 numpy references.

#[path = "reference/harness.rs"]
mod harness;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::json;
use tch::{Kind, Tensor};
use vissl_trainer::losses::cross_entropy_multiple_output_single_target::apply_label_smoothing;
use vissl_trainer::losses::info_nce::BufferParams;
use vissl_trainer::losses::multicrop_simclr_info_nce_loss::MultiCropSimclrInfoNceParams;
use vissl_trainer::losses::simclr_info_nce_loss::SimclrInfoNceParams;
use vissl_trainer::losses::{
    build_loss, known_losses, l2_normalize_rows, Loss, LossContext, LossError,
    MultiCropSimclrInfoNceLoss, SimclrInfoNceLoss,
};

fn mask_rows(t: &Tensor) -> Vec<Vec<f32>> {
    Vec::<Vec<f32>>::try_from(t).expect("2-D float mask")
}

fn simclr(
    rank: usize,
    world: usize,
    per_rank: usize,
    dim: usize,
    temperature: f64,
    ctx: LossContext,
) -> SimclrInfoNceLoss {
    let params = SimclrInfoNceParams {
        temperature,
        buffer_params: BufferParams {
            world_size: world,
            embedding_dim: dim,
            effective_batch_size: per_rank * world,
        },
    };
    assert_eq!((ctx.rank, ctx.world_size), (rank, world));
    SimclrInfoNceLoss::new(&params, ctx).expect("valid simclr params")
}

fn multicrop(
    world: usize,
    images: usize,
    crops: usize,
    dim: usize,
    temperature: f64,
    ctx: LossContext,
) -> MultiCropSimclrInfoNceLoss {
    let params = MultiCropSimclrInfoNceParams {
        temperature,
        num_crops: crops,
        buffer_params: BufferParams {
            world_size: world,
            embedding_dim: dim,
            effective_batch_size: images * world,
        },
    };
    MultiCropSimclrInfoNceLoss::new(&params, ctx).expect("valid multicrop params")
}

/// A rank of a simulated world whose gather concatenates every rank's normalised embeddings,
/// the local slice being the tensor the loss passes (so gradients flow to all ranks' inputs).
fn simulated_rank(rank: usize, all: &[Tensor]) -> LossContext {
    let others: Vec<Tensor> = all.iter().map(|t| t.shallow_clone()).collect();
    LossContext::distributed(
        rank,
        all.len(),
        Box::new(move |local: &Tensor| {
            let parts: Vec<Tensor> = others
                .iter()
                .enumerate()
                .map(|(r, e)| {
                    if r == rank {
                        local.shallow_clone()
                    } else {
                        l2_normalize_rows(e).expect("normalize")
                    }
                })
                .collect();
            Ok(Tensor::cat(&parts, 0))
        }),
    )
}

#[test]
fn simclr_masks_match_vissl_test_for_batch_4_world_2() {
    // VISSL tests/test_losses.py pins rank 0 (the rank of an uninitialised process group).
    let rank0 = simclr(
        0,
        2,
        4,
        128,
        0.1,
        LossContext::distributed(0, 2, Box::new(|t: &Tensor| Ok(t.shallow_clone()))),
    );
    let masks = rank0.masks();
    assert_eq!(masks.positives.len(), 1);
    assert_eq!(
        mask_rows(&masks.positives[0]),
        vec![
            vec![0., 0., 1., 0., 0., 0., 0., 0.],
            vec![0., 0., 0., 1., 0., 0., 0., 0.],
            vec![1., 0., 0., 0., 0., 0., 0., 0.],
            vec![0., 1., 0., 0., 0., 0., 0., 0.],
        ]
    );
    assert_eq!(
        mask_rows(&masks.negatives),
        vec![
            vec![0., 1., 0., 1., 1., 1., 1., 1.],
            vec![1., 0., 1., 0., 1., 1., 1., 1.],
            vec![0., 1., 0., 1., 1., 1., 1., 1.],
            vec![1., 0., 1., 0., 1., 1., 1., 1.],
        ]
    );
    // Rank 1 by VISSL's formula: its rows are gathered columns 4..8, so positives sit at
    // 4 + (other view) and its own image pairs {4, 6}, {5, 7} are excluded from the negatives.
    let rank1 = simclr(
        1,
        2,
        4,
        128,
        0.1,
        LossContext::distributed(1, 2, Box::new(|t: &Tensor| Ok(t.shallow_clone()))),
    );
    let masks = rank1.masks();
    assert_eq!(
        mask_rows(&masks.positives[0]),
        vec![
            vec![0., 0., 0., 0., 0., 0., 1., 0.],
            vec![0., 0., 0., 0., 0., 0., 0., 1.],
            vec![0., 0., 0., 0., 1., 0., 0., 0.],
            vec![0., 0., 0., 0., 0., 1., 0., 0.],
        ]
    );
    assert_eq!(
        mask_rows(&masks.negatives),
        vec![
            vec![1., 1., 1., 1., 0., 1., 0., 1.],
            vec![1., 1., 1., 1., 1., 0., 1., 0.],
            vec![1., 1., 1., 1., 0., 1., 0., 1.],
            vec![1., 1., 1., 1., 1., 0., 1., 0.],
        ]
    );
}

#[test]
fn multicrop_masks_for_three_crops() {
    // 2 images x 3 crops, crop-major rows (crop c of image i at row 2c + i). Offset 1 pairs each
    // crop with the next crop of the same image; negatives skip every crop of the same image.
    let loss = multicrop(1, 2, 3, 8, 0.1, LossContext::single_process());
    let masks = loss.masks();
    assert_eq!(masks.positives.len(), 2);
    assert_eq!(
        mask_rows(&masks.positives[0]),
        vec![
            vec![0., 0., 1., 0., 0., 0.],
            vec![0., 0., 0., 1., 0., 0.],
            vec![0., 0., 0., 0., 1., 0.],
            vec![0., 0., 0., 0., 0., 1.],
            vec![1., 0., 0., 0., 0., 0.],
            vec![0., 1., 0., 0., 0., 0.],
        ]
    );
    assert_eq!(
        mask_rows(&masks.negatives),
        vec![
            vec![0., 1., 0., 1., 0., 1.],
            vec![1., 0., 1., 0., 1., 0.],
            vec![0., 1., 0., 1., 0., 1.],
            vec![1., 0., 1., 0., 1., 0.],
            vec![0., 1., 0., 1., 0., 1.],
            vec![1., 0., 1., 0., 1., 0.],
        ]
    );
}

/// Loss values and d(sum of rank losses)/d(embeddings) of a simulated world vs the reference.
fn check_world_against_reference(
    embeddings: &[Tensor],
    crops: usize,
    temperature: f64,
    negatives: &str,
    build: impl Fn(usize, LossContext) -> Box<dyn Loss>,
    rtol: f64,
) {
    let inputs: Vec<Tensor> = embeddings
        .iter()
        .map(|e| e.detach().set_requires_grad(true))
        .collect();
    let mut total: Option<Tensor> = None;
    let mut losses = Vec::new();
    for rank in 0..inputs.len() {
        let mut loss = build(rank, simulated_rank(rank, &inputs));
        let value = loss
            .forward(
                &[inputs[rank].shallow_clone()],
                &Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu)),
            )
            .expect("forward");
        losses.push(value.double_value(&[]));
        total = Some(match total {
            None => value,
            Some(sum) => sum + value,
        });
    }
    total.expect("at least one rank").backward();

    let reference = run_reference(
        "info_nce.py",
        &json!({
            "embeddings": inputs.iter().map(to_json).collect::<Vec<_>>(),
            "temperature": temperature,
            "num_crops": crops,
            "negatives": negatives,
        }),
    );
    for (rank, loss) in losses.iter().enumerate() {
        let expected = reference["losses"][rank].as_f64().expect("loss");
        assert!(
            (loss - expected).abs() <= rtol * expected.abs(),
            "rank {rank}: loss {loss} vs reference {expected}"
        );
        assert_close(
            &format!("rank {rank} gradient"),
            &inputs[rank].grad(),
            &from_json(&reference["grads"][rank]),
            rtol,
            1e-9,
        );
    }
}

#[test]
fn simclr_world_1_matches_numpy_in_float64_and_float32() {
    for (kind, rtol) in [(Kind::Double, 1e-6), (Kind::Float, 1e-5)] {
        let e = uniform(&[6, 5], 1, kind);
        check_world_against_reference(
            &[e],
            2,
            0.1,
            "all_ranks",
            |rank, ctx| Box::new(simclr(rank, 1, 6, 5, 0.1, ctx)),
            rtol,
        );
    }
}

#[test]
fn simclr_world_2_matches_numpy() {
    let e = [
        uniform(&[4, 5], 2, Kind::Double),
        uniform(&[4, 5], 3, Kind::Double),
    ];
    check_world_against_reference(
        &e,
        2,
        0.2,
        "all_ranks",
        |rank, ctx| Box::new(simclr(rank, 2, 4, 5, 0.2, ctx)),
        1e-6,
    );
}

#[test]
fn multicrop_world_2_matches_numpy_with_own_rank_negatives() {
    let e = [
        uniform(&[6, 4], 4, Kind::Double),
        uniform(&[6, 4], 5, Kind::Double),
    ];
    check_world_against_reference(
        &e,
        3,
        0.5,
        "own_rank",
        |_rank, ctx| Box::new(multicrop(2, 2, 3, 4, 0.5, ctx)),
        1e-6,
    );
}

#[test]
fn multicrop_with_two_crops_equals_simclr_on_one_rank() {
    let e = uniform(&[8, 6], 6, Kind::Double);
    let target = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
    let a = simclr(0, 1, 8, 6, 0.1, LossContext::single_process())
        .forward(&[e.shallow_clone()], &target)
        .unwrap();
    let b = multicrop(1, 4, 2, 6, 0.1, LossContext::single_process())
        .forward(&[e], &target)
        .unwrap();
    assert!((a.double_value(&[]) - b.double_value(&[])).abs() < 1e-12);
}

#[test]
fn simclr_vissl_backward_example_descends_and_matches_numpy() {
    // VISSL's test_simclr_backward input: two identical pairs of views.
    let e = Tensor::from_slice(&[1.0f32, 0., 1., 0., 1., 0., 1., 0., 1., 0., 1., 0.]).view([4, 3]);
    for (kind, rtol) in [(Kind::Double, 1e-6), (Kind::Float, 1e-4)] {
        let e = e.to_kind(kind);
        check_world_against_reference(
            &[e],
            2,
            0.1,
            "all_ranks",
            |rank, ctx| Box::new(simclr(rank, 1, 4, 3, 0.1, ctx)),
            rtol,
        );
    }
    let target = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
    let mut loss = simclr(0, 1, 4, 3, 0.1, LossContext::single_process());
    let x = e.set_requires_grad(true);
    let before = loss.forward(&[x.shallow_clone()], &target).unwrap();
    before.backward();
    let next = (&x - x.grad()).detach();
    let after = loss.forward(&[next], &target).unwrap();
    assert!(after.double_value(&[]) < before.double_value(&[]));
}

#[test]
fn small_temperature_stays_finite_and_exact_in_float32() {
    // exp(1 / 0.01) overflows float32, so exp-then-divide would give inf / NaN here.
    let e = uniform(&[6, 5], 7, Kind::Float);
    check_world_against_reference(
        &[e],
        2,
        0.01,
        "all_ranks",
        |rank, ctx| Box::new(simclr(rank, 1, 6, 5, 0.01, ctx)),
        1e-5,
    );
}

#[test]
fn simclr_rejects_wrong_shapes_and_mismatched_world() {
    let mut loss = simclr(0, 1, 4, 3, 0.1, LossContext::single_process());
    let target = Tensor::zeros([1], (Kind::Int64, tch::Device::Cpu));
    let err = loss
        .forward(
            &[Tensor::zeros([6, 3], (Kind::Float, tch::Device::Cpu))],
            &target,
        )
        .unwrap_err();
    assert!(err.to_string().contains("[4, 3]"), "{err}");
    let err = loss.forward(&[], &target).unwrap_err();
    assert!(
        err.to_string().contains("exactly one model output"),
        "{err}"
    );

    let params = SimclrInfoNceParams::from_yaml(
        &serde_yaml::from_str(
            "buffer_params: {world_size: 64, embedding_dim: 3, effective_batch_size: 256}",
        )
        .unwrap(),
    )
    .unwrap();
    let err = SimclrInfoNceLoss::new(&params, LossContext::single_process())
        .err()
        .expect("world mismatch");
    assert!(
        err.to_string()
            .contains("simclr_info_nce_loss.buffer_params.world_size"),
        "{err}"
    );
}

#[test]
fn multicrop_needs_another_image_on_the_rank() {
    // One image per rank: multi-crop's own-rank negatives are empty, so there is nothing to learn.
    let params = MultiCropSimclrInfoNceParams::from_yaml(
        &serde_yaml::from_str("{num_crops: 4, buffer_params: {world_size: 1, embedding_dim: 8, effective_batch_size: 1}}").unwrap(),
    )
    .unwrap();
    let err = MultiCropSimclrInfoNceLoss::new(&params, LossContext::single_process())
        .err()
        .expect("rejected");
    assert!(
        err.to_string()
            .contains("multicrop_simclr_info_nce_loss.buffer_params.effective_batch_size"),
        "{err}"
    );
}

#[test]
fn registry_builds_from_a_vissl_loss_section() {
    let section: serde_yaml::Value = serde_yaml::from_str(
        r#"
name: simclr_info_nce_loss
CrossEntropyLoss: {ignore_index: -1}
swav_loss: {temperature: 0.1, epsilon: 0.05}
simclr_info_nce_loss:
  temperature: 0.1
  buffer_params: {world_size: 1, embedding_dim: 16, effective_batch_size: 8}
"#,
    )
    .unwrap();
    let loss = build_loss(&section, LossContext::single_process()).expect("simclr builds");
    assert_eq!(loss.name(), "simclr_info_nce_loss");
    for name in [
        "CrossEntropyLoss",
        "cross_entropy_multiple_output_single_target",
        "simclr_info_nce_loss",
        "multicrop_simclr_info_nce_loss",
    ] {
        assert!(known_losses().contains(&name), "{name}");
    }

    let unknown = serde_yaml::from_str("name: no_such_loss").unwrap();
    let err = build_loss(&unknown, LossContext::single_process())
        .err()
        .expect("unknown loss");
    assert!(matches!(err, LossError::UnknownLoss { .. }));
    assert!(
        err.to_string().contains("simclr_info_nce_loss"),
        "lists known losses: {err}"
    );

    let typo = serde_yaml::from_str(
        "{name: simclr_info_nce_loss, simclr_info_nce_loss: {temprature: 0.2}}",
    )
    .unwrap();
    let err = build_loss(&typo, LossContext::single_process())
        .err()
        .expect("unknown key");
    assert!(err.to_string().contains("temprature"), "{err}");
}

#[test]
fn label_smoothing_matches_vissl_worked_example() {
    // VISSL test_label_smoothing_target_transformation: 0.1 over 4 classes.
    let smoothed =
        apply_label_smoothing(&Tensor::from_slice(&[0i64, 1, 2]), 4, 0.1, Kind::Float).unwrap();
    let expected = Tensor::from_slice(&[
        0.925f32, 0.025, 0.025, 0.025, 0.025, 0.925, 0.025, 0.025, 0.025, 0.025, 0.925, 0.025,
    ])
    .view([3, 4]);
    assert!(
        smoothed.allclose(&expected, 1e-6, 1e-7, false),
        "{smoothed}"
    );
}

fn cross_entropy_case(
    section: &str,
    mode: &str,
    outputs: &[Tensor],
    target: &Tensor,
    extra: serde_json::Value,
) {
    let section: serde_yaml::Value = serde_yaml::from_str(section).unwrap();
    let mut loss = build_loss(&section, LossContext::single_process()).expect("builds");
    let inputs: Vec<Tensor> = outputs
        .iter()
        .map(|o| o.detach().set_requires_grad(true))
        .collect();
    let value = loss.forward(&inputs, target).expect("forward");
    value.backward();

    let mut input = json!({
        "mode": mode,
        "outputs": inputs.iter().map(to_json).collect::<Vec<_>>(),
        "target": to_json(target),
        "weight": null, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0,
        "temperature": 1.0, "normalize_output": false,
    });
    for (k, v) in extra.as_object().unwrap() {
        input[k] = v.clone();
    }
    let reference = run_reference("cross_entropy.py", &input);
    let expected = reference["loss"].as_f64().unwrap();
    let actual = value.double_value(&[]);
    assert!(
        (actual - expected).abs() <= 1e-9 * expected.abs().max(1.0),
        "{mode} {input}: loss {actual} vs {expected}"
    );
    for (k, x) in inputs.iter().enumerate() {
        assert_close(
            &format!("{mode} gradient {k}"),
            &x.grad(),
            &from_json(&reference["grads"][k]),
            1e-6,
            1e-9,
        );
    }
}

#[test]
fn cross_entropy_loss_matches_pytorch_definition() {
    let logits = uniform(&[5, 4], 11, Kind::Double) * 3.0;
    let labels = Tensor::from_slice(&[0i64, 3, -1, 2, 1]);
    cross_entropy_case(
        "{name: CrossEntropyLoss, CrossEntropyLoss: {ignore_index: -1}}",
        "pytorch",
        &[logits.shallow_clone()],
        &labels,
        json!({"ignore_index": -1}),
    );
    cross_entropy_case(
        "{name: CrossEntropyLoss, CrossEntropyLoss: {ignore_index: -1, weight: [1.0, 2.0, 0.5, 3.0], reduction: sum}}",
        "pytorch",
        &[logits.shallow_clone()],
        &labels,
        json!({"ignore_index": -1, "weight": [1.0, 2.0, 0.5, 3.0], "reduction": "sum"}),
    );
    cross_entropy_case(
        "{name: CrossEntropyLoss, CrossEntropyLoss: {ignore_index: -1, weight: [1.0, 2.0, 0.5, 3.0], label_smoothing: 0.2}}",
        "pytorch",
        &[logits.shallow_clone()],
        &labels,
        json!({"ignore_index": -1, "weight": [1.0, 2.0, 0.5, 3.0], "label_smoothing": 0.2}),
    );
    let soft = uniform(&[5, 4], 12, Kind::Double).abs();
    let soft = &soft / soft.sum_dim_intlist([1i64].as_slice(), true, Kind::Double);
    cross_entropy_case(
        "{name: CrossEntropyLoss}",
        "pytorch",
        &[logits],
        &soft,
        json!({}),
    );
}

#[test]
fn cross_entropy_multiple_output_matches_vissl_definition() {
    let outputs = [
        uniform(&[4, 3], 21, Kind::Double) * 2.0,
        uniform(&[4, 3], 22, Kind::Double),
    ];
    let labels = Tensor::from_slice(&[2i64, 0, 1, -1]);
    let name = "name: cross_entropy_multiple_output_single_target";
    cross_entropy_case(
        &format!("{{{name}}}"),
        "vissl_multi",
        &outputs,
        &labels,
        json!({"ignore_index": -1}),
    );
    cross_entropy_case(
        &format!("{{{name}, cross_entropy_multiple_output_single_target: {{temperature: 0.5, normalize_output: true, weight: [1.0, 0.5, 2.0]}}}}"),
        "vissl_multi",
        &outputs,
        &labels,
        json!({"ignore_index": -1, "temperature": 0.5, "normalize_output": true, "weight": [1.0, 0.5, 2.0]}),
    );
    let labels = Tensor::from_slice(&[2i64, 0, 1, 1]);
    cross_entropy_case(
        &format!("{{{name}, cross_entropy_multiple_output_single_target: {{temperature: 2.0, label_smoothing: 0.5}}}}"),
        "vissl_multi",
        &outputs,
        &labels,
        json!({"temperature": 2.0, "label_smoothing": 0.5}),
    );
}

#[test]
fn cross_entropy_rejects_out_of_range_labels_by_name() {
    let section =
        serde_yaml::from_str("{name: CrossEntropyLoss, CrossEntropyLoss: {ignore_index: -1}}")
            .unwrap();
    let mut loss = build_loss(&section, LossContext::single_process()).unwrap();
    let err = loss
        .forward(
            &[Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu))],
            &Tensor::from_slice(&[0i64, 3]),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("CrossEntropyLoss") && err.to_string().contains("target 3"),
        "{err}"
    );
    let bad = serde_yaml::from_str("{name: cross_entropy_multiple_output_single_target, cross_entropy_multiple_output_single_target: {reduction: sum}}").unwrap();
    let err = build_loss(&bad, LossContext::single_process())
        .err()
        .expect("sum rejected");
    assert!(
        err.to_string()
            .contains("cross_entropy_multiple_output_single_target.reduction"),
        "{err}"
    );
}
