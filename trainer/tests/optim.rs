//! Optimizers against float64 numpy re-implementations of PyTorch's / apex's documented update
//! rules, VISSL's parameter grouping, LARC on hand-worked numbers, and exact checkpoint resume.

#[path = "reference/harness.rs"]
mod harness;

use std::collections::HashMap;

use harness::{assert_close, from_json, run_reference, to_json, uniform};
use serde_json::json;
use tch::{nn, Device, Kind, Tensor};
use vissl_trainer::optim::{GroupKind, NamedParam, OptimError, Optimizer, OptimizerParams};

fn params_from(yaml: &str) -> OptimizerParams {
    OptimizerParams::from_yaml(&serde_yaml::from_str(yaml).expect("yaml")).expect("valid OPTIMIZER")
}

/// A parameter of the toy problem: gradient `c * p - b` (of `0.5 c p^2 - b p`), or none at all.
struct Toy {
    name: &'static str,
    shape: Vec<i64>,
    has_grad: bool,
}

fn toy_params() -> Vec<Toy> {
    let p = |name, shape: &[i64], has_grad| Toy {
        name,
        shape: shape.to_vec(),
        has_grad,
    };
    vec![
        p("trunk.conv.weight", &[2, 3], true),
        p("trunk.conv.bias", &[2], true),
        p("trunk.bn.weight", &[3], true),
        p("trunk.bn.bias", &[3], true),
        p("heads.0.fc.weight", &[2, 2], true),
        p("heads.0.fc.bias", &[2], true),
        p("trunk.unused.weight", &[2, 2], false),
    ]
}

/// Fresh leaf tensors for the toy parameters (same values for the same kind every time).
fn fresh(kind: Kind) -> Vec<NamedParam> {
    toy_params()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            NamedParam::new(
                t.name,
                uniform(&t.shape, 100 + i as u64, kind).set_requires_grad(true),
            )
        })
        .collect()
}

fn coefficients(kind: Kind) -> Vec<(Tensor, Tensor)> {
    toy_params()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                uniform(&t.shape, 200 + i as u64, kind).abs() + 0.5,
                uniform(&t.shape, 300 + i as u64, kind),
            )
        })
        .collect()
}

const LRS: [(f64, f64); 4] = [(0.1, 0.3), (0.05, 0.2), (0.2, 0.1), (0.1, 0.05)];

/// Runs `steps` of the toy problem and returns the parameter values after each step.
fn run_steps(
    opt: &mut Optimizer,
    coeffs: &[(Tensor, Tensor)],
    steps: &[(f64, f64)],
) -> Vec<Vec<Tensor>> {
    let mut trajectory = Vec::new();
    for &(lr, lr_head) in steps {
        opt.zero_grad();
        let terms: Vec<Tensor> = toy_params()
            .iter()
            .zip(opt.params().iter().zip(coeffs))
            .filter(|(spec, _)| spec.has_grad)
            .map(|(_, (p, (c, b)))| {
                (c * &p.tensor * &p.tensor * 0.5 - b * &p.tensor).sum(None::<Kind>)
            })
            .collect();
        let loss = Tensor::stack(&terms, 0).sum(None::<Kind>);
        loss.backward();
        opt.step(lr, lr_head).expect("step");
        trajectory.push(
            opt.params()
                .iter()
                .map(|p| p.tensor.detach().copy())
                .collect(),
        );
    }
    trajectory
}

/// Compares a trajectory of the optimizer built from `yaml` with the numpy reference.
/// `weight_decays` are the decays VISSL's groups give the toy parameters under that config.
fn check_trajectory(yaml: &str, weight_decays: [f64; 7], kind: Kind, rtol: f64) {
    let cfg = params_from(yaml);
    let mut opt = Optimizer::new(fresh(kind), &cfg).expect("optimizer");
    let initial: Vec<Tensor> = opt
        .params()
        .iter()
        .map(|p| p.tensor.detach().copy())
        .collect();
    let coeffs = coefficients(kind);
    let trajectory = run_steps(&mut opt, &coeffs, &LRS);

    let params: Vec<_> = toy_params()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "init": to_json(&initial[i]), "c": to_json(&coeffs[i].0), "b": to_json(&coeffs[i].1),
                "weight_decay": weight_decays[i],
                "head": t.name.contains("head") && cfg.head_optimizer_params.use_different_lr,
                "has_grad": t.has_grad,
            })
        })
        .collect();
    let larc = cfg.use_larc.then(|| {
        json!({"clip": cfg.larc_config.clip, "eps": cfg.larc_config.eps, "trust_coefficient": cfg.larc_config.trust_coefficient})
    });
    let reference = run_reference(
        "optim.py",
        &json!({
            "rule": cfg.name, "momentum": cfg.momentum, "nesterov": cfg.nesterov, "betas": cfg.betas,
            "eps": cfg.eps, "amsgrad": cfg.amsgrad, "larc": larc, "params": params,
            "steps": LRS.iter().map(|(lr, lr_head)| json!({"lr": lr, "lr_head": lr_head})).collect::<Vec<_>>(),
        }),
    );
    for (step, values) in trajectory.iter().enumerate() {
        for (i, value) in values.iter().enumerate() {
            let expected = from_json(&reference["trajectory"][step][i]);
            assert_close(
                &format!("{yaml}: step {step} {}", toy_params()[i].name),
                value,
                &expected,
                rtol,
                0.0,
            );
        }
    }
}

const HEAD_OWN: &str =
    "head_optimizer_params: {use_different_lr: true, use_different_wd: true, weight_decay: 0.05}";
/// Decays under HEAD_OWN with weight_decay 0.01 and VISSL's default regularize_bn false /
/// regularize_bias true: conv weight+bias 0.01, BN 0, head weight+bias 0.05.
const DECAYS: [f64; 7] = [0.01, 0.01, 0.0, 0.0, 0.05, 0.05, 0.01];

#[test]
fn sgd_momentum_matches_pytorch_rule() {
    let yaml = format!("{{name: sgd, momentum: 0.9, weight_decay: 0.01, {HEAD_OWN}}}");
    check_trajectory(&yaml, DECAYS, Kind::Double, 1e-12);
    check_trajectory(&yaml, DECAYS, Kind::Float, 1e-5);
}

#[test]
fn sgd_nesterov_and_plain_match_pytorch_rule() {
    check_trajectory(
        &format!("{{name: sgd, momentum: 0.8, nesterov: true, weight_decay: 0.01, {HEAD_OWN}}}"),
        DECAYS,
        Kind::Double,
        1e-12,
    );
    check_trajectory(
        &format!("{{name: sgd, momentum: 0.0, weight_decay: 0.01, {HEAD_OWN}}}"),
        DECAYS,
        Kind::Double,
        1e-12,
    );
}

#[test]
fn head_follows_trunk_unless_configured() {
    // Without use_different_lr/wd the head takes lr and the trunk's weight decay.
    let decays = [0.01, 0.01, 0.0, 0.0, 0.01, 0.01, 0.01];
    check_trajectory(
        "{name: sgd, momentum: 0.9, weight_decay: 0.01}",
        decays,
        Kind::Double,
        1e-12,
    );
}

#[test]
fn sgd_with_larc_matches_apex_rule() {
    // With trust 0.5 the local rate exceeds lr for some parameters, so clipping engages.
    for (clip, trust) in [(false, 0.02), (true, 0.02), (true, 0.5)] {
        let yaml = format!(
            "{{name: sgd, momentum: 0.9, weight_decay: 0.01, use_larc: true, \
             larc_config: {{clip: {clip}, eps: 1.0e-8, trust_coefficient: {trust}}}, {HEAD_OWN}}}"
        );
        check_trajectory(&yaml, DECAYS, Kind::Double, 1e-12);
    }
}

#[test]
fn adamw_matches_pytorch_rule() {
    for amsgrad in [false, true] {
        let yaml = format!(
            "{{name: adamw, betas: [0.8, 0.95], eps: 1.0e-6, amsgrad: {amsgrad}, weight_decay: 0.01, {HEAD_OWN}}}"
        );
        check_trajectory(&yaml, DECAYS, Kind::Double, 1e-12);
    }
    check_trajectory(
        &format!("{{name: adamw, weight_decay: 0.01, {HEAD_OWN}}}"),
        DECAYS,
        Kind::Float,
        1e-5,
    );
}

/// One step of LARC + SGD (no momentum) on p = [[3, 4]] (norm 5), g = [[0.6, 0.8]] (norm 1), wd 0.1.
fn larc_step(clip: bool, lr: f64, param: [f64; 2]) -> Vec<f64> {
    let cfg = params_from(&format!(
        "{{name: sgd, momentum: 0.0, weight_decay: 0.1, use_larc: true, \
         larc_config: {{clip: {clip}, eps: 0.0, trust_coefficient: 0.02}}}}"
    ));
    let p = Tensor::from_slice(&param)
        .view([1, 2])
        .set_requires_grad(true);
    let mut opt = Optimizer::new(
        vec![NamedParam::new("trunk.fc.weight", p.shallow_clone())],
        &cfg,
    )
    .unwrap();
    (&p * Tensor::from_slice(&[0.6f64, 0.8]).view([1, 2]))
        .sum(None::<Kind>)
        .backward();
    opt.step(lr, lr).unwrap();
    Vec::<f64>::try_from(p.detach().flatten(0, -1)).unwrap()
}

#[test]
fn larc_local_rate_on_a_hand_example() {
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12);
    // local = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; update = (g + 0.1 p) / 15 = [0.06, 0.08] at lr 1.
    let scaled = larc_step(false, 1.0, [3.0, 4.0]);
    assert!(close(&scaled, &[2.94, 3.92]), "{scaled:?}");
    // Clip at lr 0.01: min((1/15) / 0.01, 1) = 1, so plain SGD with decay: p - 0.01 [0.9, 1.2].
    let clipped = larc_step(true, 0.01, [3.0, 4.0]);
    assert!(close(&clipped, &[2.991, 3.988]), "{clipped:?}");
    // Clip at lr 1: min(1/15, 1) = 1/15, same as the scaled case.
    assert!(close(&larc_step(true, 1.0, [3.0, 4.0]), &[2.94, 3.92]));
    // A zero parameter: apex leaves the gradient (and skips weight decay): p - lr g.
    let zero = larc_step(false, 0.5, [0.0, 0.0]);
    assert!(close(&zero, &[-0.3, -0.4]), "{zero:?}");
}

fn tiny_model() -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let trunk = &root / "trunk";
    nn::conv2d(&trunk / "conv1", 3, 4, 3, Default::default());
    nn::batch_norm2d(&trunk / "bn1", 4, Default::default());
    nn::linear(&trunk / "fc", 4, 5, Default::default());
    nn::layer_norm(&trunk / "ln", vec![5], Default::default());
    let _class_token = trunk.var("class_token", &[1, 1, 5], nn::Init::Const(0.0));
    let head = &root / "heads" / 0;
    nn::linear(&head / "proj", 5, 3, Default::default());
    nn::batch_norm1d(&head / "bn", 3, Default::default());
    vs
}

fn groups_of(yaml: &str) -> (HashMap<String, GroupKind>, Vec<(GroupKind, f64)>) {
    let vs = tiny_model();
    let opt = Optimizer::new(NamedParam::trainable(vs.variables()), &params_from(yaml)).unwrap();
    let mut kinds = HashMap::new();
    for group in opt.param_groups() {
        for &i in &group.params {
            kinds.insert(opt.params()[i].name.clone(), group.kind);
        }
    }
    (
        kinds,
        opt.param_groups()
            .iter()
            .map(|g| (g.kind, g.weight_decay))
            .collect(),
    )
}

fn expect_groups(yaml: &str, expected: &[(&str, GroupKind)]) {
    let (kinds, _) = groups_of(yaml);
    assert_eq!(
        kinds.len(),
        expected.len(),
        "{yaml}: trainable parameters {kinds:?}"
    );
    for (name, kind) in expected {
        assert_eq!(kinds.get(*name), Some(kind), "{yaml}: {name}");
    }
}

#[test]
fn param_groups_follow_vissl_rules() {
    use GroupKind::*;
    // VISSL defaults: regularize_bn false, regularize_bias true. BN running stats are not trainable.
    expect_groups(
        "{}",
        &[
            ("trunk.conv1.weight", TrunkRegularized),
            ("trunk.conv1.bias", TrunkRegularized),
            ("trunk.bn1.weight", TrunkUnregularized),
            ("trunk.bn1.bias", TrunkUnregularized),
            ("trunk.fc.weight", TrunkRegularized),
            ("trunk.fc.bias", TrunkRegularized),
            ("trunk.ln.weight", TrunkUnregularized),
            ("trunk.ln.bias", TrunkUnregularized),
            ("trunk.class_token", RemainingRegularized),
            ("heads.0.proj.weight", HeadRegularized),
            ("heads.0.proj.bias", HeadRegularized),
            ("heads.0.bn.weight", HeadUnregularized),
            ("heads.0.bn.bias", HeadUnregularized),
        ],
    );
    // Norm biases need both regularize_bn and regularize_bias.
    expect_groups(
        "{regularize_bn: true, regularize_bias: false}",
        &[
            ("trunk.conv1.weight", TrunkRegularized),
            ("trunk.conv1.bias", TrunkUnregularized),
            ("trunk.bn1.weight", TrunkRegularized),
            ("trunk.bn1.bias", TrunkUnregularized),
            ("trunk.fc.weight", TrunkRegularized),
            ("trunk.fc.bias", TrunkUnregularized),
            ("trunk.ln.weight", TrunkRegularized),
            ("trunk.ln.bias", TrunkUnregularized),
            ("trunk.class_token", RemainingRegularized),
            ("heads.0.proj.weight", HeadRegularized),
            ("heads.0.proj.bias", HeadUnregularized),
            ("heads.0.bn.weight", HeadRegularized),
            ("heads.0.bn.bias", HeadUnregularized),
        ],
    );
    let (kinds, _) = groups_of("{regularize_bn: true, regularize_bias: true}");
    assert_eq!(kinds["trunk.bn1.bias"], TrunkRegularized);
    assert_eq!(kinds["heads.0.bn.bias"], HeadRegularized);
    // non_regularized_parameters moves regularized matches to the remaining unregularized group
    // (trunk LR, even for head parameters, as VISSL does); unregularized ones stay where they are.
    let (kinds, _) = groups_of("{non_regularized_parameters: [class_token, proj.weight, bn1]}");
    assert_eq!(kinds["trunk.class_token"], RemainingUnregularized);
    assert_eq!(kinds["heads.0.proj.weight"], RemainingUnregularized);
    assert_eq!(kinds["trunk.bn1.weight"], TrunkUnregularized);
    assert_eq!(kinds["trunk.conv1.weight"], TrunkRegularized);
    // One group for everything.
    let (kinds, groups) = groups_of("{construct_single_param_group_only: true, weight_decay: 0.3}");
    assert!(kinds.values().all(|k| *k == All) && kinds.len() == 13);
    assert_eq!(groups, vec![(All, 0.3)]);
}

#[test]
fn group_weight_decays_and_learning_rates() {
    let (_, groups) = groups_of(&format!("{{weight_decay: 0.01, {HEAD_OWN}}}"));
    let decay = |kind| groups.iter().find(|(k, _)| *k == kind).map(|(_, wd)| *wd);
    assert_eq!(decay(GroupKind::TrunkRegularized), Some(0.01));
    assert_eq!(decay(GroupKind::RemainingRegularized), Some(0.01));
    assert_eq!(decay(GroupKind::HeadRegularized), Some(0.05));
    assert_eq!(decay(GroupKind::TrunkUnregularized), Some(0.0));
    assert_eq!(decay(GroupKind::HeadUnregularized), Some(0.0));
    assert!(
        GroupKind::HeadRegularized.uses_head_lr()
            && !GroupKind::RemainingRegularized.uses_head_lr()
    );
}

fn state_map(opt: &Optimizer) -> Vec<(String, Tensor)> {
    let mut state = opt.state_dict();
    state.sort_by(|a, b| a.0.cmp(&b.0));
    state
}

fn resume_is_bitwise(yaml: &str) {
    let cfg = params_from(yaml);
    let coeffs = coefficients(Kind::Float);
    let mut straight = Optimizer::new(fresh(Kind::Float), &cfg).unwrap();
    let expected = run_steps(&mut straight, &coeffs, &LRS).pop().unwrap();

    let mut first = Optimizer::new(fresh(Kind::Float), &cfg).unwrap();
    run_steps(&mut first, &coeffs, &LRS[..2]);
    let saved = first.state_dict();
    // A "restarted process": new parameter tensors with the saved values, a new optimizer.
    let restored: Vec<NamedParam> = first
        .params()
        .iter()
        .map(|p| {
            NamedParam::new(
                p.name.clone(),
                p.tensor.detach().copy().set_requires_grad(true),
            )
        })
        .collect();
    drop(first);
    let mut resumed = Optimizer::new(restored, &cfg).unwrap();
    resumed.load_state_dict(&saved).unwrap();
    let actual = run_steps(&mut resumed, &coeffs, &LRS[2..]).pop().unwrap();

    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert!(
            a.equal(e),
            "{yaml}: parameter {} differs after resume",
            toy_params()[i].name
        );
    }
    let (a, e) = (state_map(&resumed), state_map(&straight));
    assert_eq!(
        a.iter().map(|s| &s.0).collect::<Vec<_>>(),
        e.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in a.iter().zip(&e) {
        assert!(x.equal(y), "{yaml}: state {name} differs after resume");
    }
}

#[test]
fn state_dict_round_trip_resumes_bitwise() {
    resume_is_bitwise(&format!("{{name: sgd, momentum: 0.9, nesterov: true, weight_decay: 0.01, use_larc: true, {HEAD_OWN}}}"));
    resume_is_bitwise(&format!(
        "{{name: adamw, amsgrad: true, weight_decay: 0.01, {HEAD_OWN}}}"
    ));
}

#[test]
fn state_dict_names_entries_per_parameter() {
    let mut opt = Optimizer::new(
        fresh(Kind::Float),
        &params_from("{name: adamw, amsgrad: true}"),
    )
    .unwrap();
    run_steps(&mut opt, &coefficients(Kind::Float), &LRS[..3]);
    let state: HashMap<String, Tensor> = opt.state_dict().into_iter().collect();
    assert_eq!(state["trunk.conv.weight.step"].int64_value(&[]), 3);
    for key in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"] {
        assert_eq!(state[&format!("heads.0.fc.bias.{key}")].size(), vec![2]);
    }
    assert!(
        !state.keys().any(|k| k.starts_with("trunk.unused.weight")),
        "a parameter without gradients has no state"
    );
    assert_eq!(state.len(), 6 * 4);

    let mut sgd = Optimizer::new(fresh(Kind::Float), &params_from("{name: sgd}")).unwrap();
    run_steps(&mut sgd, &coefficients(Kind::Float), &LRS[..1]);
    let names: Vec<String> = state_map(&sgd).into_iter().map(|(n, _)| n).collect();
    assert!(
        names.contains(&"trunk.bn.bias.momentum_buffer".to_string()),
        "{names:?}"
    );
}

#[test]
fn load_state_dict_rejects_foreign_state() {
    let mut opt = Optimizer::new(fresh(Kind::Float), &params_from("{name: sgd}")).unwrap();
    let err = opt
        .load_state_dict(&[(
            "trunk.other.weight.momentum_buffer".into(),
            Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        )])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("trunk.other.weight.momentum_buffer"),
        "{err}"
    );
    let err = opt
        .load_state_dict(&[(
            "trunk.conv.weight.momentum_buffer".into(),
            Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
        )])
        .unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
    let err = opt
        .load_state_dict(&[(
            "trunk.conv.weight.exp_avg".into(),
            Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        )])
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("trunk.conv.weight.momentum_buffer"),
        "missing entry named: {err}"
    );
}

#[test]
fn optimizer_config_errors_name_the_key() {
    let simclr = OptimizerParams::from_yaml(
        &serde_yaml::from_str(
            r#"
name: sgd
use_larc: True
larc_config: {clip: False, trust_coefficient: 0.001, eps: 0.00000001}
weight_decay: 0.000001
momentum: 0.9
nesterov: False
num_epochs: 100
regularize_bn: True
regularize_bias: True
param_schedulers:
  lr: {auto_lr_scaling: {auto_scale: true, base_value: 0.3, base_lr_batch_size: 256}, name: composite}
"#,
        )
        .unwrap(),
    )
    .expect("VISSL's SimCLR optimizer section parses");
    assert!(simclr.use_larc && simclr.regularize_bn && simclr.weight_decay == 1e-6);

    let err =
        |yaml: &str| OptimizerParams::from_yaml(&serde_yaml::from_str(yaml).unwrap()).unwrap_err();
    assert!(err("{momentun: 0.9}").to_string().contains("momentun"));
    assert!(err("{name: adamw, use_larc: true}")
        .to_string()
        .contains("OPTIMIZER.use_larc"));
    assert!(err("{momentum: 0.0, nesterov: true}")
        .to_string()
        .contains("OPTIMIZER.nesterov"));
    assert!(err("{weight_decay: -1.0}")
        .to_string()
        .contains("OPTIMIZER.weight_decay"));
    let unknown = err("{name: lamb}");
    assert!(matches!(unknown, OptimError::UnknownOptimizer { .. }));
    assert!(
        unknown.to_string().contains("sgd") && unknown.to_string().contains("adamw"),
        "{unknown}"
    );
}
