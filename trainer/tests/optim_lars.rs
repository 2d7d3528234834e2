//! `OPTIMIZER.name: lars` against a float64 numpy re-implementation of the published LARS update
//! (the form of Barlow Twins' reference code that VISSL's `lars` follows), run at test time with
//! the venv's python (override with VISSL_PYTHON); its exact resume; and VISSL's own configs that
//! use it, LARC, frozen prototypes or gradient clipping, loaded and built into an optimizer.
//!
//! Tolerances: float64 runs agree with the reference to 1e-12 of the largest value (only the
//! order of floating-point sums differs); float32 runs to 2e-5 (a few float32 roundings per step
//! over six steps).

#[path = "reference/harness.rs"]
#[allow(dead_code)] // the shared harness; this file runs its own inline reference
mod harness;

use std::io::Write;
use std::process::{Command, Stdio};

use harness::{assert_close, from_json, python, to_json, uniform};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use vissl_crds::config::{check, default_configs_root, LoadOptions};
use vissl_trainer::engine::{build_model, raw_group};
use vissl_trainer::optim::{GradClip, GroupKind, NamedParam, Optimizer, OptimizerParams};

/// The LARS update, written from the paper and Barlow Twins' `LARS.step`: weight decay first,
/// then the trust ratio `eta * |p| / |d|` (1 when a norm is 0) unless the parameter is 1-D and
/// excluded, then heavy-ball momentum from a zero buffer.
const REFERENCE: &str = r#"
import json, sys
import numpy as np

inp = json.load(sys.stdin)
arr = lambda v: np.array(v["data"], dtype=np.float64).reshape(v["shape"])
params = [arr(p["init"]) for p in inp["params"]]
mu = [np.zeros_like(p) for p in params]
trajectory = []
for lr in inp["lrs"]:
    for k, spec in enumerate(inp["params"]):
        if not spec["has_grad"]:
            continue
        p = params[k]
        d = arr(spec["c"]) * p - arr(spec["b"]) + spec["weight_decay"] * p
        if not (inp["exclude_bias_and_norm"] and p.ndim == 1):
            pn, dn = np.linalg.norm(p), np.linalg.norm(d)
            if pn > 0 and dn > 0:
                d = d * (inp["eta"] * pn / dn)
        mu[k] = inp["momentum"] * mu[k] + d
        params[k] = p - lr * mu[k]
    trajectory.append([{"shape": list(p.shape), "data": p.ravel().tolist()} for p in params])
json.dump({"trajectory": trajectory}, sys.stdout)
"#;

fn run_python(input: &Value) -> Value {
    let mut child = Command::new(python())
        .args(["-B", "-c", REFERENCE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {} (run scripts/setup, or set VISSL_PYTHON to a python with numpy): {e}",
                python()
            )
        });
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(input.to_string().as_bytes())
        .expect("write reference input");
    drop(stdin);
    let out = child.wait_with_output().expect("reference runs");
    assert!(
        out.status.success(),
        "LARS reference failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

/// A toy parameter: gradient `c * p - b` (of `0.5 c p^2 - b p`), or none at all.
struct Toy {
    name: &'static str,
    shape: &'static [i64],
    has_grad: bool,
    /// Starts at zero (the trust ratio's `|p| = 0` case).
    zero: bool,
}

const TOYS: &[Toy] = &[
    Toy {
        name: "trunk.conv.weight",
        shape: &[4, 3],
        has_grad: true,
        zero: false,
    },
    Toy {
        name: "trunk.conv.bias",
        shape: &[4],
        has_grad: true,
        zero: false,
    },
    Toy {
        name: "trunk.bn.weight",
        shape: &[3],
        has_grad: true,
        zero: false,
    },
    Toy {
        name: "trunk.bn.bias",
        shape: &[3],
        has_grad: true,
        zero: false,
    },
    Toy {
        name: "trunk.fresh.weight",
        shape: &[2, 2],
        has_grad: true,
        zero: true,
    },
    Toy {
        name: "heads.0.fc.weight",
        shape: &[2, 4],
        has_grad: true,
        zero: false,
    },
    Toy {
        name: "heads.0.fc.bias",
        shape: &[2],
        has_grad: true,
        zero: false,
    },
    Toy {
        name: "trunk.unused.weight",
        shape: &[2, 2],
        has_grad: false,
        zero: false,
    },
];

const LRS: [f64; 6] = [0.2, 0.4, 0.3, 0.1, 0.5, 0.05];

fn initial(kind: Kind) -> Vec<Tensor> {
    TOYS.iter()
        .enumerate()
        .map(|(i, t)| {
            let values = uniform(t.shape, 10 + i as u64, kind);
            if t.zero {
                values.zeros_like()
            } else {
                values
            }
        })
        .collect()
}

fn coefficients(kind: Kind) -> Vec<(Tensor, Tensor)> {
    TOYS.iter()
        .enumerate()
        .map(|(i, t)| {
            (
                uniform(t.shape, 20 + i as u64, kind).abs() + 0.5,
                uniform(t.shape, 30 + i as u64, kind),
            )
        })
        .collect()
}

fn optimizer(yaml: &str, kind: Kind) -> Optimizer {
    let cfg = OptimizerParams::from_yaml(&serde_yaml::from_str(yaml).expect("test YAML"))
        .expect("valid OPTIMIZER");
    let params = TOYS
        .iter()
        .zip(initial(kind))
        .map(|(t, v)| NamedParam::new(t.name, v.set_requires_grad(true)))
        .collect();
    Optimizer::new(params, &cfg).expect("optimizer builds")
}

/// Steps `opt` at `lrs` on the toy problem; the parameters after each step.
fn run(opt: &mut Optimizer, coeffs: &[(Tensor, Tensor)], lrs: &[f64]) -> Vec<Vec<Tensor>> {
    lrs.iter()
        .map(|&lr| {
            opt.zero_grad();
            let terms: Vec<Tensor> = TOYS
                .iter()
                .zip(opt.params().iter().zip(coeffs))
                .filter(|(t, _)| t.has_grad)
                .map(|(_, (p, (c, b)))| {
                    (c * &p.tensor * &p.tensor * 0.5 - b * &p.tensor).sum(None::<Kind>)
                })
                .collect();
            Tensor::stack(&terms, 0).sum(None::<Kind>).backward();
            opt.step(lr, lr).expect("step");
            opt.params()
                .iter()
                .map(|p| p.tensor.detach().copy())
                .collect()
        })
        .collect()
}

/// Compares a LARS trajectory with the reference; `decays` are the weight decays VISSL's groups
/// give the toy parameters under `yaml` (worked out by hand from its regularize_* options).
fn check_against_reference(yaml: &str, decays: [f64; 8], exclude: bool, kind: Kind, rtol: f64) {
    let (momentum, eta) = (0.9, 0.02);
    let mut opt = optimizer(yaml, kind);
    let coeffs = coefficients(kind);
    let trajectory = run(&mut opt, &coeffs, &LRS);
    let params: Vec<Value> = TOYS
        .iter()
        .zip(initial(kind).iter().zip(&coeffs))
        .zip(decays)
        .map(|((t, (init, (c, b))), wd)| {
            json!({"init": to_json(init), "c": to_json(c), "b": to_json(b),
                   "weight_decay": wd, "has_grad": t.has_grad})
        })
        .collect();
    let reference = run_python(&json!({
        "params": params, "lrs": LRS, "momentum": momentum, "eta": eta,
        "exclude_bias_and_norm": exclude,
    }));
    for (step, values) in trajectory.iter().enumerate() {
        for (i, value) in values.iter().enumerate() {
            assert_close(
                &format!("{yaml} ({kind:?}): step {step}, {}", TOYS[i].name),
                value,
                &from_json(&reference["trajectory"][step][i]),
                rtol,
                0.0,
            );
        }
    }
    // The reference moved every parameter with a gradient; a silent no-op would fail above, but
    // make the point explicit for the zero-initialised one (trust ratio 1 at |p| = 0).
    let fresh = &trajectory[0][4];
    assert!(fresh.abs().sum(Kind::Double).double_value(&[]) > 0.0);
}

/// Barlow Twins' settings: biases and norms neither decayed nor adapted.
const BARLOW: &str = "{name: lars, momentum: 0.9, eta: 0.02, weight_decay: 0.01, \
    exclude_bias_and_norm: true, regularize_bn: false, regularize_bias: false}";
/// Weights decay 0.01; conv/bn/head biases and bn weight do not.
const BARLOW_DECAYS: [f64; 8] = [0.01, 0.0, 0.0, 0.0, 0.01, 0.01, 0.0, 0.01];

/// Every parameter adapted; biases decayed (VISSL's default regularize_bias), norms not.
const ALL_ADAPTED: &str = "{name: lars, momentum: 0.9, eta: 0.02, weight_decay: 0.01}";
const ALL_ADAPTED_DECAYS: [f64; 8] = [0.01, 0.01, 0.0, 0.0, 0.01, 0.01, 0.01, 0.01];

#[test]
fn lars_matches_the_reference_with_bias_and_norm_excluded() {
    check_against_reference(BARLOW, BARLOW_DECAYS, true, Kind::Double, 1e-12);
    check_against_reference(BARLOW, BARLOW_DECAYS, true, Kind::Float, 2e-5);
}

#[test]
fn lars_matches_the_reference_with_every_parameter_adapted() {
    check_against_reference(ALL_ADAPTED, ALL_ADAPTED_DECAYS, false, Kind::Double, 1e-12);
    check_against_reference(ALL_ADAPTED, ALL_ADAPTED_DECAYS, false, Kind::Float, 2e-5);
}

#[test]
fn lars_defaults_are_vissls() {
    let cfg = OptimizerParams::from_yaml(&serde_yaml::from_str("{name: lars}").unwrap()).unwrap();
    assert_eq!(cfg.eta, 0.001);
    assert!(!cfg.exclude_bias_and_norm);
    let err =
        OptimizerParams::from_yaml(&serde_yaml::from_str("{name: lars, momentum: 1.0}").unwrap())
            .unwrap_err()
            .to_string();
    assert!(err.contains("OPTIMIZER.momentum"), "{err}");
    let err = OptimizerParams::from_yaml(&serde_yaml::from_str("{name: lars, eta: -1}").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("OPTIMIZER.eta"), "{err}");
}

#[test]
fn lars_resumes_bitwise_from_its_state() {
    let coeffs = coefficients(Kind::Float);
    let mut straight = optimizer(BARLOW, Kind::Float);
    let expected = run(&mut straight, &coeffs, &LRS).pop().expect("steps");

    let mut first = optimizer(BARLOW, Kind::Float);
    run(&mut first, &coeffs, &LRS[..3]);
    let state = first.state_dict();
    assert!(
        state.iter().any(|(k, _)| k == "trunk.conv.weight.mu"),
        "LARS keeps VISSL's `mu` buffer: {:?}",
        state.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let mut resumed = optimizer(BARLOW, Kind::Float);
    for (param, saved) in resumed.params().iter().zip(first.params()) {
        tch::no_grad(|| param.tensor.shallow_clone().copy_(&saved.tensor));
    }
    resumed.load_state_dict(&state).expect("state loads");
    let got = run(&mut resumed, &coeffs, &LRS[3..]).pop().expect("steps");
    for ((a, b), toy) in got.iter().zip(&expected).zip(TOYS) {
        assert!(a.equal(b), "{} differs after resume", toy.name);
    }
}

fn upstream_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/tests/fixtures/vissl_upstream")
}

/// Loads VISSL config `name` (from the upstream fixtures, or ours when `ours`), builds its model
/// and optimizer as the engine does, and returns them.
fn build(name: &str, ours: bool, extra: &[&str]) -> (OptimizerParams, Optimizer, Option<GradClip>) {
    let opts = LoadOptions {
        configs_root: if ours {
            default_configs_root()
        } else {
            upstream_root()
        },
        ..LoadOptions::default()
    };
    let mut args = vec![format!("config={name}")];
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = check(&opts, &args).unwrap_or_else(|errors| {
        panic!(
            "{name}: {}",
            errors
                .iter()
                .map(|e| format!("\n  {e}"))
                .collect::<String>()
        )
    });
    let cfg = OptimizerParams::from_yaml(raw_group(&config, "OPTIMIZER").expect("OPTIMIZER"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (_vs, model) =
        build_model(&config, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mut opt = Optimizer::new(NamedParam::trainable(model.trainable_parameters()), &cfg)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    opt.set_temp_frozen(&config.model.temp_frozen_params_iter_map)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let clip =
        GradClip::from_config(&config.model.grad_clip).unwrap_or_else(|e| panic!("{name}: {e}"));
    (cfg, opt, clip)
}

#[test]
fn vissl_barlow_twins_configs_build_a_lars_optimizer() {
    // The ResNet-50 of the 4-node config is built in full; its 8192-wide head is shrunk, which
    // leaves the optimizer options untouched.
    let smaller_head = r#"config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [2048, 64, 64], "use_relu": true, "use_bn": true}]]"#;
    for (name, extra) in [
        ("test/integration_test/quick_barlow_twins", vec![]),
        (
            "pretrain/barlow_twins/barlow_twins_4node_resnet",
            vec![smaller_head],
        ),
    ] {
        let (cfg, opt, clip) = build(name, false, &extra);
        assert_eq!(cfg.name, "lars", "{name}");
        assert!(cfg.exclude_bias_and_norm, "{name}");
        assert_eq!(cfg.eta, 0.001, "{name}: VISSL's default trust coefficient");
        assert!(clip.is_none(), "{name}");
        let kinds: Vec<GroupKind> = opt.param_groups().iter().map(|g| g.kind).collect();
        assert!(
            kinds.contains(&GroupKind::TrunkRegularized),
            "{name}: {kinds:?}"
        );
        assert!(
            kinds.contains(&GroupKind::TrunkUnregularized),
            "{name}: {kinds:?}"
        );
    }
}

#[test]
fn vissl_dino_configs_build_with_frozen_prototypes_and_clipping() {
    // (config, iterations the prototypes stay frozen, MAX_NORM when clipping is on)
    for (name, frozen_for, clip_norm) in [
        ("test/integration_test/quick_dino", 2, Some(3.0)),
        ("pretrain/dino/dino_16gpus_deits16", 1251, None),
    ] {
        let (cfg, opt, clip) = build(name, false, &[]);
        assert_eq!(cfg.name, "adamw", "{name}");
        assert_eq!(cfg.param_group_constructor, "dino", "{name}");
        assert_eq!(clip.map(|c| c.max_norm), clip_norm, "{name}");
        let frozen = opt.temp_frozen();
        assert!(
            frozen.contains(&("heads.0.prototypes0.weight_v", frozen_for)),
            "{name}: {frozen:?}"
        );
        assert!(
            frozen
                .iter()
                .all(|(p, _)| p.starts_with("heads.0.prototypes0.")),
            "{name}: {frozen:?}"
        );
        let groups: Vec<(GroupKind, f64)> = opt
            .param_groups()
            .iter()
            .map(|g| (g.kind, g.weight_decay))
            .collect();
        assert_eq!(
            groups,
            vec![
                (GroupKind::Regularized, cfg.weight_decay),
                (GroupKind::Unregularized, 0.0)
            ],
            "{name}"
        );
        for group in opt.param_groups() {
            for &slot in &group.params {
                let pname = &opt.params()[slot].name;
                let unregularized = pname.ends_with(".bias") || pname.contains("norm");
                assert_eq!(
                    group.kind == GroupKind::Unregularized,
                    unregularized,
                    "{name}: {pname}"
                );
            }
        }
    }
}

#[test]
fn vissl_configs_with_larc_build_it_over_sgd() {
    let (cfg, _opt, _) = build(
        "pretrain/swav/swav_8node_resnet",
        true,
        &[
            r#"config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [2048, 64, 32], "use_bn": true, "num_clusters": [50]}]]"#,
        ],
    );
    assert!(cfg.use_larc);
    assert_eq!(cfg.name, "sgd");
    assert_eq!(
        (cfg.larc_config.clip, cfg.larc_config.trust_coefficient),
        (false, 0.001)
    );
}
