//! Tests of the models module: ResNe(X)t trunk, heads, BaseSslModel, feature evaluation.
//!
//! Independent references: torchvision's parameter names are enumerated here from torchvision's
//! ResNet structure; parameter counts are torchvision's published ones; numerical outputs come from
//! `models_reference.py`, a float64 numpy implementation run at test time with the venv's python
//! (override with VISSL_PYTHON).

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};
use vissl_trainer::models::heads::{HeadParams, HeadSettings};
use vissl_trainer::models::trunks::resnext::{resnet101, resnet152, resnet18, resnet34, resnet50};
use vissl_trainer::models::{
    BaseSslModel, InputType, ModelError, ModelParams, PoolOp, ResNet, ResNetParams, Stem, Trunk,
    TrunkParams,
};

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("test YAML parses")
}

fn python() -> String {
    std::env::var("VISSL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python").to_string())
}

/// Runs `models_reference.py` on the given weights and input; returns its float64 outputs.
fn reference(
    spec: serde_json::Value,
    weights: &[(String, Tensor)],
    input: &Tensor,
) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("spec.json"), spec.to_string()).expect("write spec");
    let detached: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().copy()))
        .collect();
    Tensor::write_npz(&detached, dir.path().join("weights.npz")).expect("write weights");
    input
        .write_npy(dir.path().join("input.npy"))
        .expect("write input");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/models_reference.py");
    let out = Command::new(python())
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("run python reference");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Tensor::read_npz(dir.path().join("out.npz"))
        .expect("read reference output")
        .into_iter()
        .collect()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.size(), want.size(), "{name}: shape");
    let got = got.detach().to_kind(Kind::Double);
    let diff = (&got - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    assert!(
        diff <= 2e-4 * scale,
        "{name}: max abs diff {diff} (scale {scale})"
    );
}

fn variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Gives every norm non-trivial statistics and affine parameters, so evaluation-mode tests see them.
fn randomize_norms(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, t) in vs.variables() {
            if t.dim() != 1 {
                continue;
            }
            let mut t = t;
            if name.ends_with("running_var") || name.ends_with("weight") {
                let _ = t.uniform_(0.5, 1.5);
            } else {
                t.copy_(&(Tensor::randn_like(&t) * 0.1));
            }
        }
    });
}

/// torchvision's `state_dict()` names for resnet18/resnet50 without `fc` and `num_batches_tracked`,
/// split into parameters and buffers, enumerated from torchvision's ResNet definition.
fn torchvision_names(depth: i64) -> (BTreeSet<String>, BTreeSet<String>) {
    let (blocks, bottleneck) = match depth {
        18 => ([2, 2, 2, 2], false),
        50 => ([3, 4, 6, 3], true),
        other => panic!("no enumeration for depth {other}"),
    };
    let mut params = BTreeSet::new();
    let mut buffers = BTreeSet::new();
    let mut norm = |p: &str, params: &mut BTreeSet<String>| {
        params.insert(format!("{p}.weight"));
        params.insert(format!("{p}.bias"));
        buffers.insert(format!("{p}.running_mean"));
        buffers.insert(format!("{p}.running_var"));
    };
    params.insert("conv1.weight".to_string());
    norm("bn1", &mut params);
    for (stage, n) in blocks.iter().enumerate() {
        for b in 0..*n {
            let p = format!("layer{}.{b}", stage + 1);
            let convs = if bottleneck { 3 } else { 2 };
            for i in 1..=convs {
                params.insert(format!("{p}.conv{i}.weight"));
                norm(&format!("{p}.bn{i}"), &mut params);
            }
            // A stage's first block downsamples when its stride is 2 (stages 2-4) or, for
            // bottlenecks, when the 4x expansion changes the channel count (stage 1 too).
            if b == 0 && (stage > 0 || bottleneck) {
                params.insert(format!("{p}.downsample.0.weight"));
                norm(&format!("{p}.downsample.1"), &mut params);
            }
        }
    }
    (params, buffers)
}

#[test]
fn resnet18_and_resnet50_names_and_counts_match_torchvision() {
    // torchvision's published parameter counts include fc: 512*1000+1000 and 2048*1000+1000.
    for (depth, params, published, fc) in [
        (18, resnet18(), 11_689_512_i64, 513_000_i64),
        (50, resnet50(), 25_557_032, 2_049_000),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
        let (want_params, want_buffers) = torchvision_names(depth);
        let vars = vs.variables();
        let got_params: BTreeSet<String> = vars
            .iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, _)| n.clone())
            .collect();
        let got_buffers: BTreeSet<String> = vars
            .iter()
            .filter(|(_, t)| !t.requires_grad())
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(got_params, want_params, "resnet{depth} parameters");
        assert_eq!(got_buffers, want_buffers, "resnet{depth} buffers");
        let count: i64 = vars
            .values()
            .filter(|t| t.requires_grad())
            .map(|t| t.numel() as i64)
            .sum();
        assert_eq!(count, published - fc, "resnet{depth} parameter count");
    }
}

/// (channels, spatial size) of conv1, res1..res5 for a 224 input: the stem halves twice, every
/// later stage but the first halves once.
fn expected_224(expansion: i64) -> Vec<(&'static str, Vec<i64>)> {
    vec![
        ("conv1", vec![1, 64, 112, 112]),
        ("res1", vec![1, 64, 56, 56]),
        ("res2", vec![1, 64 * expansion, 56, 56]),
        ("res3", vec![1, 128 * expansion, 28, 28]),
        ("res4", vec![1, 256 * expansion, 14, 14]),
        ("res5", vec![1, 512 * expansion, 7, 7]),
        ("res5avg", vec![1, 512 * expansion, 1, 1]),
        ("flatten", vec![1, 512 * expansion]),
    ]
}

#[test]
fn every_depth_gives_torchvision_shapes_at_224() {
    for (params, expansion) in [
        (resnet18(), 1),
        (resnet34(), 1),
        (resnet50(), 4),
        (resnet101(), 4),
        (resnet152(), 4),
    ] {
        let vs = nn::VarStore::new(Device::Cpu);
        let net = ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
        let expected = expected_224(expansion);
        let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
        let x = Tensor::randn([1, 3, 224, 224], (Kind::Float, Device::Cpu));
        let feats = tch::no_grad(|| net.forward_features(&x, &names, false)).expect("forward");
        for ((name, shape), feat) in expected.iter().zip(&feats) {
            assert_eq!(&feat.size(), shape, "depth {} feature {name}", params.depth);
        }
    }
}

#[test]
fn cifar_stem_keeps_small_inputs_large_and_layer4_stride_one_keeps_res4_size() {
    let params = ResNetParams {
        stem: Stem::Cifar,
        ..resnet18()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
    let x = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let names = ["conv1", "res1", "res2", "res3", "res4", "res5", "flatten"];
    let feats = net.forward_features(&x, &names, false).expect("forward");
    let spatial: Vec<i64> = feats[..6].iter().map(|f| f.size()[2]).collect();
    assert_eq!(spatial, vec![32, 32, 32, 16, 8, 4]);
    assert_eq!(feats[6].size(), vec![2, 512]);
    assert_eq!(
        vs.variables()["conv1.weight"].size(),
        vec![64, 3, 3, 3],
        "cifar stem is a 3x3 convolution"
    );

    let params = ResNetParams {
        stem: Stem::Cifar,
        layer4_stride: 1,
        base_channels: 16,
        ..resnet50()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
    let feats = net
        .forward_features(&x, &["res4", "res5"], false)
        .expect("forward");
    assert_eq!(feats[0].size(), vec![2, 16 * 4 * 4, 8, 8]);
    assert_eq!(feats[1].size(), vec![2, 16 * 8 * 4, 8, 8]);
    assert_eq!(
        net.feature_shape("res5avg").expect("shape"),
        vissl_trainer::models::FeatureShape::Vector(512)
    );
}

#[test]
fn resnet18_cifar_eval_matches_numpy_reference() {
    let params = ResNetParams {
        stem: Stem::Cifar,
        base_channels: 8,
        ..resnet18()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
    randomize_norms(&vs);
    let x = Tensor::randn([2, 3, 12, 12], (Kind::Float, Device::Cpu));
    let names = ["conv1", "res2", "res3", "res5", "flatten"];
    let want = reference(
        serde_json::json!({"kind": "resnet", "depth": 18, "stem": "cifar", "prefix": "", "features": names}),
        &variables(&vs),
        &x,
    );
    let got = net.forward_features(&x, &names, false).expect("forward");
    for (name, feat) in names.iter().zip(&got) {
        assert_close(name, feat, &want[*name]);
    }
}

#[test]
fn resnext50_train_mode_matches_numpy_including_running_stats() {
    let params = ResNetParams {
        base_channels: 16,
        groups: 2,
        width_per_group: 16,
        ..resnet50()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
    randomize_norms(&vs);
    let x = Tensor::randn([3, 3, 40, 40], (Kind::Float, Device::Cpu));
    let before = variables(&vs);
    let want = reference(
        serde_json::json!({"kind": "resnet", "depth": 50, "groups": 2, "prefix": "", "train": true,
                           "features": ["res3", "flatten"]}),
        &before,
        &x,
    );
    assert_eq!(
        vs.variables()["layer1.0.conv2.weight"].size(),
        vec![8, 4, 3, 3],
        "grouped 3x3 convolution"
    );
    let got = net
        .forward_features(&x, &["res3", "flatten"], true)
        .expect("forward");
    assert_close("res3", &got[0], &want["res3"]);
    assert_close("flatten", &got[1], &want["flatten"]);
    let after = vs.variables();
    for name in [
        "bn1.running_mean",
        "layer2.0.bn2.running_var",
        "layer4.2.bn3.running_mean",
        "layer3.0.downsample.1.running_var",
    ] {
        assert_close(name, &after[name], &want[name]);
    }
}

#[test]
fn layer_norm_is_a_single_group_norm() {
    let yaml_block = yaml("{DEPTH: 18, NORM: LayerNorm, STEM: cifar, BASE_CHANNELS: 8}");
    let params = ResNetParams::from_yaml(&yaml_block).expect("parse");
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
    assert!(
        !vs.variables().contains_key("bn1.running_mean"),
        "layer norm keeps no running statistics"
    );
    randomize_norms(&vs);
    let x = Tensor::randn([2, 3, 10, 10], (Kind::Float, Device::Cpu));
    let want = reference(
        serde_json::json!({"kind": "resnet", "depth": 18, "stem": "cifar", "norm": "LayerNorm", "prefix": "",
                           "features": ["res3"]}),
        &variables(&vs),
        &x,
    );
    let got = net.forward_features(&x, &["res3"], true).expect("forward");
    assert_close("res3", &got[0], &want["res3"]);
}

#[test]
fn initialisation_follows_torchvision() {
    let params = ResNetParams {
        zero_init_residual: true,
        ..resnet50()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    ResNet::new(vs.root(), &params, InputType::Rgb).expect("build");
    let vars = vs.variables();
    // kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (out_channels * k * k)).
    let w = &vars["layer4.0.conv2.weight"];
    let want_std = (2.0 / (512.0 * 9.0f64)).sqrt();
    let std = w.std(true).double_value(&[]);
    assert!(
        (std / want_std - 1.0).abs() < 0.02,
        "conv std {std} vs {want_std}"
    );
    let all = |name: &str, value: f64| {
        let t = &vars[name];
        assert!(
            t.eq(value).all().int64_value(&[]) == 1,
            "{name} should be all {value}"
        );
    };
    all("bn1.weight", 1.0);
    all("bn1.bias", 0.0);
    all("bn1.running_mean", 0.0);
    all("bn1.running_var", 1.0);
    all("layer1.0.bn1.weight", 1.0);
    all("layer1.0.bn3.weight", 0.0);
    all("layer3.5.bn3.weight", 0.0);
    all("layer1.0.downsample.1.weight", 1.0);

    let vs = nn::VarStore::new(Device::Cpu);
    ResNet::new(
        vs.root(),
        &ResNetParams {
            zero_init_residual: true,
            ..resnet18()
        },
        InputType::Rgb,
    )
    .expect("build");
    let vars = vs.variables();
    assert!(
        vars["layer2.1.bn2.weight"].eq(0.0).all().int64_value(&[]) == 1,
        "basic block's bn2 starts at 0"
    );
    assert!(vars["layer2.1.bn1.weight"].eq(1.0).all().int64_value(&[]) == 1);
}

#[test]
fn resnets_block_reads_vissl_keys_and_names_bad_ones() {
    let params = ResNetParams::from_yaml(&yaml(
        "{DEPTH: 101, WIDTH_MULTIPLIER: 2, NORM: GroupNorm, GROUPNORM_GROUPS: 32, STANDARDIZE_CONVOLUTIONS: False,
          GROUPS: 32, ZERO_INIT_RESIDUAL: True, WIDTH_PER_GROUP: 8, LAYER4_STRIDE: 1, STEM: cifar, BASE_CHANNELS: 32}",
    ))
    .expect("parse");
    assert_eq!(params.depth, 101);
    assert_eq!(params.width_multiplier, 2);
    assert_eq!(params.groups, 32);
    assert_eq!(params.width_per_group, 8);
    assert!(params.zero_init_residual);
    assert_eq!(params.layer4_stride, 1);
    assert_eq!(params.stem, Stem::Cifar);
    assert_eq!(params.base_channels, 32);
    assert_eq!(
        params.norm,
        vissl_trainer::models::Norm::GroupNorm { groups: 32 }
    );
    assert_eq!(
        ResNetParams::from_yaml(&yaml("{}")).expect("defaults"),
        ResNetParams::default()
    );
    assert_eq!(ResNetParams::default().depth, 50);

    let err = ResNetParams::from_yaml(&yaml("{DEPHT: 50}")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::UnknownKey { .. }), "{msg}");
    assert!(
        msg.contains("MODEL.TRUNK.RESNETS.DEPHT") && msg.contains("did you mean `DEPTH`"),
        "{msg}"
    );

    let msg = ResNetParams::from_yaml(&yaml("{NORM: InstanceNorm}"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MODEL.TRUNK.RESNETS.NORM") && msg.contains("BatchNorm, LayerNorm, GroupNorm"),
        "{msg}"
    );
    let msg = ResNetParams::from_yaml(&yaml("{DEPTH: 18, GROUPS: 32}"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("GROUPS") && msg.contains("basic blocks"),
        "{msg}"
    );
    let msg = ResNetParams::from_yaml(&yaml("{DEPTH: 42}"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("DEPTH") && msg.contains("18, 34, 50"), "{msg}");
    let msg = ResNetParams::from_yaml(&yaml("{LAYER4_STRIDE: 3}"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("LAYER4_STRIDE"), "{msg}");
    let msg = ResNetParams::from_yaml(&yaml("{DEPTH: fifty}"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MODEL.TRUNK.RESNETS.DEPTH") && msg.contains("integer"),
        "{msg}"
    );

    // VISSL's docs nest RESNETS under TRUNK_PARAMS; both spellings read the same.
    let nested = TrunkParams::from_yaml(
        "MODEL.TRUNK",
        &yaml("{NAME: resnet, TRUNK_PARAMS: {RESNETS: {DEPTH: 18}}}"),
        InputType::Rgb,
    )
    .expect("parse");
    assert_eq!(nested.resnets.depth, 18);
    let msg = TrunkParams::from_yaml("MODEL.TRUNK", &yaml("{NAME: resnxt}"), InputType::Rgb)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown trunk `resnxt`") && msg.contains("known trunks: resnet"),
        "{msg}"
    );
}

#[test]
fn trunk_rejects_unknown_features_and_wrong_inputs() {
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(
        vs.root(),
        &ResNetParams {
            stem: Stem::Cifar,
            base_channels: 8,
            ..resnet18()
        },
        InputType::Rgb,
    )
    .expect("build");
    let x = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let msg = net
        .forward_features(&x, &["res6"], false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("res6")
            && msg.contains("conv1, res1, res2, res3, res4, res5, res5avg, flatten"),
        "{msg}"
    );
    let gray = Tensor::randn([1, 1, 8, 8], (Kind::Float, Device::Cpu));
    let msg = net
        .forward_features(&gray, &[], false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("trunk.conv1") && msg.contains("[N, 3, H, W]") && msg.contains("[1, 1, 8, 8]"),
        "{msg}"
    );
    // Duplicates are allowed and the default output is the last feature.
    let feats = net
        .forward_features(&x, &["res5avg", "res2", "res5avg"], false)
        .expect("forward");
    assert_eq!(feats.len(), 3);
    assert_eq!(feats[0].size(), feats[2].size());
    assert_eq!(
        net.forward_features(&x, &[], false).expect("forward")[0].size(),
        vec![1, 64]
    );
}

fn build_head(
    spec: &str,
    settings: &HeadSettings,
) -> (nn::VarStore, vissl_trainer::models::heads::BuiltHead) {
    let heads = HeadParams::list_from_yaml(&yaml(spec)).expect("parse heads");
    let vs = nn::VarStore::new(Device::Cpu);
    let head = heads[0]
        .build(&vs.root(), "heads.0", settings)
        .expect("build head");
    (vs, head)
}

fn names(vs: &nn::VarStore) -> BTreeSet<String> {
    vs.variables().into_keys().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn mlp_head_has_vissl_layout_and_matches_numpy_in_training() {
    let settings = HeadSettings {
        batchnorm_eps: 1e-3,
        batchnorm_momentum: 0.3,
        params_multiplier: 1.0,
    };
    let (vs, head) = build_head(
        r#"[["mlp", {"dims": [16, 32, 8], "use_bn": true, "use_relu": true}]]"#,
        &settings,
    );
    // Sequential indices: 0 Linear, 1 BatchNorm1d, 2 ReLU, 3 Linear (last layer bare).
    assert_eq!(
        names(&vs),
        set(&[
            "clf.0.weight",
            "clf.0.bias",
            "clf.1.weight",
            "clf.1.bias",
            "clf.1.running_mean",
            "clf.1.running_var",
            "clf.3.weight",
            "clf.3.bias",
        ])
    );
    randomize_norms(&vs);
    let x = Tensor::randn([6, 16], (Kind::Float, Device::Cpu));
    let want = reference(
        serde_json::json!({"kind": "mlp", "prefix": "", "train": true, "momentum": 0.3, "eps": 1e-3,
                           "mlp": {"dims": [16, 32, 8], "use_bn": true, "use_relu": true}}),
        &variables(&vs),
        &x,
    );
    let got = head
        .forward_t(&x.view([6, 16, 1, 1]), true)
        .expect("forward");
    assert_close("mlp out", &got, &want["out"]);
    assert_close(
        "clf.1.running_mean",
        &vs.variables()["clf.1.running_mean"],
        &want["clf.1.running_mean"],
    );
    assert_close(
        "clf.1.running_var",
        &vs.variables()["clf.1.running_var"],
        &want["clf.1.running_var"],
    );

    let (vs, _) = build_head(
        r#"[["mlp", {"dims": [16, 32, 8], "use_bn": true, "use_relu": true, "skip_last_layer_relu_bn": false}]]"#,
        &settings,
    );
    assert!(
        names(&vs).contains("clf.4.running_var"),
        "BN after the last linear when not skipped"
    );
    let (vs, _) = build_head(
        r#"[["mlp", {"dims": [16, 32, 8], "use_bn": true, "use_relu": true, "use_dropout": true, "use_bias": false}]]"#,
        &settings,
    );
    assert_eq!(
        names(&vs),
        set(&[
            "clf.0.weight",
            "clf.1.weight",
            "clf.1.bias",
            "clf.1.running_mean",
            "clf.1.running_var",
            "clf.4.weight"
        ])
    );
}

#[test]
fn eval_mlp_head_is_batchnorm_then_linear() {
    let (vs, head) = build_head(
        r#"[["eval_mlp", {"in_channels": 8, "dims": [72, 5]}]]"#,
        &HeadSettings::default(),
    );
    assert_eq!(
        names(&vs),
        set(&[
            "channel_bn.weight",
            "channel_bn.bias",
            "channel_bn.running_mean",
            "channel_bn.running_var",
            "clf.clf.0.weight",
            "clf.clf.0.bias",
        ])
    );
    randomize_norms(&vs);
    let x = Tensor::randn([4, 8, 3, 3], (Kind::Float, Device::Cpu));
    let want = reference(
        serde_json::json!({"kind": "eval_mlp", "prefix": "", "mlp": {"dims": [72, 5]}}),
        &variables(&vs),
        &x,
    );
    assert_close(
        "eval_mlp out",
        &head.forward_t(&x, false).expect("forward"),
        &want["out"],
    );
    let msg = head
        .forward_t(
            &Tensor::randn([4, 8, 2, 2], (Kind::Float, Device::Cpu)),
            false,
        )
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("heads.0 (eval_mlp)") && msg.contains("[4, 8, 2, 2]") && msg.contains("= 72"),
        "{msg}"
    );
}

#[test]
fn linear_layers_start_like_pytorch_scaled_by_params_multiplier() {
    for multiplier in [1.0, 2.0] {
        let settings = HeadSettings {
            params_multiplier: multiplier,
            ..HeadSettings::default()
        };
        let (vs, _) = build_head(r#"[["mlp", {"dims": [400, 300]}]]"#, &settings);
        // nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) = U(-0.05, 0.05) for in = 400.
        let bound = multiplier * 0.05;
        let max = vs.variables()["clf.0.weight"].abs().max().double_value(&[]);
        assert!(
            max <= bound + 1e-6 && max > 0.95 * bound,
            "multiplier {multiplier}: max |w| {max}"
        );
    }
}

#[test]
fn head_config_errors_name_the_entry() {
    let msg = HeadParams::list_from_yaml(&yaml(r#"[["mpl", {"dims": [2, 2]}]]"#))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown head `mpl`")
            && msg.contains("did you mean `mlp`")
            && msg.contains("eval_mlp"),
        "{msg}"
    );
    let msg = HeadParams::list_from_yaml(&yaml(r#"[["mlp", {"dims": [2, 2], "use_bnn": true}]]"#))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MODEL.HEAD.PARAMS[0][mlp].use_bnn") && msg.contains("use_bn"),
        "{msg}"
    );
    let msg = HeadParams::list_from_yaml(&yaml(r#"[[["mlp", {"dims": [2, 2]}], ["mlp", {}]]]"#))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MODEL.HEAD.PARAMS[0][1][mlp].dims") && msg.contains("required"),
        "{msg}"
    );
    let heads = HeadParams::list_from_yaml(&yaml(
        r#"[[["mlp", {"dims": [2, 3]}], ["identity", {}], ["mlp", {"dims": [3, 1]}]]]"#,
    ))
    .expect("sequence parses");
    assert_eq!(heads[0].name(), "mlp->identity->mlp");
    let (_, head) = build_head(r#"[["mlp", {"dims": [4, 2]}]]"#, &HeadSettings::default());
    let msg = head
        .forward_t(&Tensor::zeros([3, 5], (Kind::Float, Device::Cpu)), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("heads.0 (mlp)") && msg.contains("[N, 4]") && msg.contains("[3, 5]"),
        "{msg}"
    );
}

fn build_model(model_yaml: &str) -> Result<(nn::VarStore, BaseSslModel), ModelError> {
    let params = ModelParams::from_yaml(&yaml(model_yaml))?;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = BaseSslModel::new(&vs, &params)?;
    Ok((vs, model))
}

const SMALL_TRUNK: &str =
    "TRUNK: {NAME: resnet, RESNETS: {DEPTH: 18, STEM: cifar, BASE_CHANNELS: 16}}";

#[test]
fn simclr_style_model_chains_heads_on_the_trunk_output() {
    let (vs, model) = build_model(&format!(
        "{{{SMALL_TRUNK}, HEAD: {{PARAMS: [
            [\"mlp\", {{\"dims\": [128, 128], \"use_relu\": true, \"skip_last_layer_relu_bn\": false}}],
            [\"mlp\", {{\"dims\": [128, 32]}}]]}}}}"
    ))
    .expect("build");
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out = model.forward_t(&x, true).expect("forward");
    assert_eq!(
        out.len(),
        1,
        "one trunk feature and two heads: the heads run in sequence"
    );
    assert_eq!(out[0].size(), vec![4, 32]);
    assert_eq!(model.head_names(), vec!["mlp", "mlp"]);
    let names = names(&vs);
    assert!(
        names.contains("trunk.layer4.1.bn2.running_var") && names.contains("heads.1.clf.0.weight")
    );
    assert_eq!(
        model.trainable_parameters().len(),
        model
            .trunk_variables()
            .iter()
            .filter(|v| v.is_param)
            .count()
            + 4
    );
}

#[test]
fn head_size_mismatch_fails_at_build_with_layer_and_sizes() {
    let err = build_model(&format!(
        "{{{SMALL_TRUNK}, HEAD: {{PARAMS: [[\"mlp\", {{\"dims\": [2048, 128]}}]]}}}}"
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("heads.0 (mlp)") && msg.contains("[N, 2048]") && msg.contains("[N, 128]"),
        "{msg}"
    );
    let msg = build_model(&format!(
        "{{{SMALL_TRUNK}, HEAD: {{PARAMS: [[[\"mlp\", {{\"dims\": [128, 64]}}], [\"mlp\", {{\"dims\": [32, 8]}}]]]}}}}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("heads.0.1 (mlp)") && msg.contains("[N, 32]") && msg.contains("[N, 64]"),
        "{msg}"
    );
}

const LINEAR_EVAL: &str = "FEATURE_EVAL_SETTINGS: {EVAL_MODE_ON: True, FREEZE_TRUNK_ONLY: True, SHOULD_FLATTEN_FEATS: False,
    LINEAR_EVAL_FEAT_POOL_OPS_MAP: [[\"res4\", [\"AvgPool2d\", [[4, 4], 2, 0]]], [\"res5\", [\"AdaptiveAvgPool2d\", [[1, 1]]]],
                                    [\"res5avg\", [\"Identity\", []]]]}";

#[test]
fn linear_eval_trains_heads_on_a_frozen_trunk() {
    let (vs, model) = build_model(&format!(
        "{{{SMALL_TRUNK}, {LINEAR_EVAL}, HEAD: {{PARAMS: [
            [\"eval_mlp\", {{\"in_channels\": 64, \"dims\": [576, 10]}}],
            [\"eval_mlp\", {{\"in_channels\": 128, \"dims\": [128, 10]}}],
            [\"mlp\", {{\"dims\": [128, 10]}}]]}}}}"
    ))
    .expect("build");
    assert!(model.is_trunk_frozen());
    let stats_before = vs.variables()["trunk.bn1.running_mean"].copy();
    let head_stats_before = vs.variables()["heads.0.channel_bn.running_mean"].copy();
    let x = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let out = model.forward_t(&x, true).expect("forward");
    assert_eq!(
        out.iter().map(|o| o.size()).collect::<Vec<_>>(),
        vec![vec![4, 10]; 3]
    );
    let loss = out
        .iter()
        .map(|o| o.sum(Kind::Float))
        .fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b);
    loss.backward();
    for var in model.trunk_variables() {
        assert!(
            !var.tensor.grad().defined(),
            "frozen trunk parameter {} got a gradient",
            var.name
        );
        assert!(
            !var.tensor.requires_grad(),
            "{} still requires grad",
            var.name
        );
    }
    for var in model.head_variables().iter().filter(|v| v.is_param) {
        assert!(
            var.tensor.grad().defined(),
            "head parameter {} has no gradient",
            var.name
        );
    }
    let vars = vs.variables();
    assert!(
        vars["trunk.bn1.running_mean"].equal(&stats_before),
        "frozen trunk ran batch norm in training mode"
    );
    assert!(
        !vars["heads.0.channel_bn.running_mean"].equal(&head_stats_before),
        "heads train their batch norm"
    );
    assert!(!model.is_fully_frozen());
}

#[test]
fn freezing_trunk_and_head_freezes_everything() {
    let (_, model) = build_model(&format!(
        "{{{SMALL_TRUNK}, FEATURE_EVAL_SETTINGS: {{EVAL_MODE_ON: True, FREEZE_TRUNK_AND_HEAD: True, EVAL_TRUNK_AND_HEAD: True}},
           HEAD: {{PARAMS: [[\"mlp\", {{\"dims\": [128, 16], \"use_bn\": true, \"skip_last_layer_relu_bn\": false}}]]}}}}"
    ))
    .expect("build");
    assert!(model.is_fully_frozen());
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let out = model.forward_t(&x, true).expect("forward");
    assert!(!out[0].requires_grad());
    let extracted = model.extract_features(&x).expect("extract");
    assert_eq!(extracted[0].0, "heads");
    assert!(
        extracted[0].1.allclose(&out[0], 1e-5, 1e-6, false),
        "frozen model is deterministic (eval-mode BN)"
    );
}

#[test]
fn extract_trunk_features_only_returns_pooled_features_with_vissl_names() {
    let (_, model) = build_model(&format!(
        "{{{SMALL_TRUNK}, FEATURE_EVAL_SETTINGS: {{EVAL_MODE_ON: True, FREEZE_TRUNK_ONLY: True, EXTRACT_TRUNK_FEATURES_ONLY: True,
            LINEAR_EVAL_FEAT_POOL_OPS_MAP: [[\"res4\", [\"AvgPool2d\", [[4, 4], 2, 0]]], [\"res5avg\", [\"Identity\", []]],
                                            [\"res5avg\", [\"Identity\", []]]]}}}}"
    ))
    .expect("build");
    let x = Tensor::randn([3, 3, 32, 32], (Kind::Float, Device::Cpu));
    let feats = model.extract_features(&x).expect("extract");
    let names: Vec<&str> = feats.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["res4", "res5avg", "res5avg_1"]);
    // res4 of a 32x32 input with the cifar stem is 8x8 with 64 channels; a 4x4 window at stride 2
    // leaves 3x3; SHOULD_FLATTEN_FEATS defaults to true.
    assert_eq!(feats[0].1.size(), vec![3, 64 * 3 * 3]);
    assert_eq!(feats[1].1.size(), vec![3, 128]);
}

#[test]
fn pooling_ops_match_numpy() {
    let op = PoolOp::from_yaml("op", &yaml(r#"["AvgPool2d", [[3, 3], 2, 1]]"#)).expect("parse");
    let x = Tensor::randn([2, 4, 9, 9], (Kind::Float, Device::Cpu));
    let unused = [(
        "unused".to_string(),
        Tensor::zeros([1], (Kind::Float, Device::Cpu)),
    )];
    let want = reference(
        serde_json::json!({"kind": "avgpool", "kernel": 3, "stride": 2, "padding": 1}),
        &unused,
        &x,
    );
    assert_close(
        "AvgPool2d",
        &op.apply(&x, "res2").expect("pool"),
        &want["out"],
    );
    let adaptive =
        PoolOp::from_yaml("op", &yaml(r#"["AdaptiveAvgPool2d", [[1, 1]]]"#)).expect("parse");
    let pooled = adaptive.apply(&x, "res5").expect("pool");
    assert_eq!(pooled.size(), vec![2, 4, 1, 1]);
    let mean = x.mean_dim([2i64, 3].as_slice(), true, Kind::Float);
    assert!(pooled.allclose(&mean, 1e-5, 1e-6, false));
    let too_big =
        PoolOp::from_yaml("op", &yaml(r#"["AvgPool2d", [[6, 6], 1, 0]]"#)).expect("parse");
    let msg = too_big
        .apply(
            &Tensor::randn([2, 4, 3, 3], (Kind::Float, Device::Cpu)),
            "res5",
        )
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("AvgPool2d") && msg.contains("res5") && msg.contains("[2, 4, 3, 3]"),
        "{msg}"
    );
    let msg = PoolOp::from_yaml("MAP[0]", &yaml(r#"["AvgPool3d", [2]]"#))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("AvgPool3d") && msg.contains("AvgPool2d"),
        "{msg}"
    );
}

#[test]
fn multi_resolution_crops_share_one_head_pass() {
    let (_, model) = build_model(&format!(
        "{{{SMALL_TRUNK}, HEAD: {{PARAMS: [[\"mlp\", {{\"dims\": [128, 16]}}]]}}}}"
    ))
    .expect("build");
    let crop = |size: i64| Tensor::randn([2, 3, size, size], (Kind::Float, Device::Cpu));
    let crops = [crop(32), crop(32), crop(16), crop(16), crop(16)];
    let out = model.forward_multi_res(&crops, false).expect("forward");
    assert_eq!(out[0].size(), vec![10, 16]);
    let first = model
        .forward_t(&Tensor::cat(&crops[..2], 0), false)
        .expect("forward");
    assert!(
        out[0]
            .narrow(0, 0, 4)
            .allclose(&first[0], 1e-4, 1e-5, false),
        "crop order is kept"
    );
}

#[test]
fn multi_input_mapping_routes_each_input_to_its_head() {
    let (_, model) = build_model(&format!(
        "{{{SMALL_TRUNK}, MULTI_INPUT_HEAD_MAPPING: [[\"images\", [\"res5avg\"]], [\"patches\", [\"res4\"]]],
           HEAD: {{PARAMS: [[\"mlp\", {{\"dims\": [128, 10]}}], [\"eval_mlp\", {{\"in_channels\": 64, \"dims\": [1024, 7]}}]]}}}}"
    ))
    .expect("build");
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let patches = Tensor::randn([5, 3, 16, 16], (Kind::Float, Device::Cpu));
    let out = model
        .forward_multi_input(
            &[
                ("patches", &patches),
                ("images", &images),
                ("label", &images),
            ],
            true,
        )
        .expect("forward");
    assert_eq!(out.len(), 2);
    assert_eq!(out[0][0].size(), vec![2, 10]);
    assert_eq!(out[1][0].size(), vec![5, 7]);
    assert!(
        model.forward_t(&images, false).is_err(),
        "a mapped model needs inputs by key"
    );
}

#[test]
fn model_config_errors_name_keys_and_known_values() {
    let msg = build_model(&format!("{{{SMALL_TRUNK}, FEATURE_EVAL_SETTING: {{}}}}"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MODEL.FEATURE_EVAL_SETTING")
            && msg.contains("did you mean `FEATURE_EVAL_SETTINGS`"),
        "{msg}"
    );
    let msg = build_model(&format!(
        "{{{SMALL_TRUNK}, FEATURE_EVAL_SETTINGS: {{EVAL_MODE_ON: True, FREEZE_TRUNK_ONLY: True,
            LINEAR_EVAL_FEAT_POOL_OPS_MAP: [[\"res6\", [\"Identity\", []]]]}}}}"
    ))
    .unwrap_err()
    .to_string();
    assert!(msg.contains("res6") && msg.contains("res5avg"), "{msg}");
    let msg = build_model(&format!(
        "{{{SMALL_TRUNK}, {LINEAR_EVAL}, HEAD: {{PARAMS: [[\"mlp\", {{\"dims\": [128, 10]}}], [\"mlp\", {{\"dims\": [128, 10]}}]]}}}}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("MODEL.HEAD.PARAMS") && msg.contains("2 head(s) for 3 trunk feature(s)"),
        "{msg}"
    );
    let msg = build_model("{INPUT_TYPE: yuv}").unwrap_err().to_string();
    assert!(
        msg.contains("MODEL.INPUT_TYPE") && msg.contains("rgb, bgr, lab"),
        "{msg}"
    );
    let msg = build_model(&format!(
        "{{{SMALL_TRUNK}, HEAD: {{BATCHNORM_EPS: small}}}}"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("MODEL.HEAD.BATCHNORM_EPS") && msg.contains("number"),
        "{msg}"
    );
}

#[test]
fn model_block_defaults_are_vissls() {
    let params = ModelParams::from_yaml(&yaml("{}")).expect("empty MODEL block");
    assert_eq!(params.trunk.name, "resnet");
    assert_eq!(params.trunk.resnets, ResNetParams::default());
    assert!(params.heads.is_empty());
    assert_eq!(
        params.head_settings,
        HeadSettings {
            batchnorm_eps: 1e-5,
            batchnorm_momentum: 0.1,
            params_multiplier: 1.0
        }
    );
    assert!(
        params.feature_eval.should_flatten_feats
            && params.feature_eval.assert_head_layer_shape_init
    );
    assert_eq!(
        params.weights_init.state_dict_key_name,
        vec!["classy_state_dict"]
    );
    assert_eq!(params.weights_init.skip_layers, vec!["num_batches_tracked"]);
    // A VISSL default MODEL block carries keys owned elsewhere; they are accepted.
    ModelParams::from_yaml(&yaml("{AMP_PARAMS: {USE_AMP: False}, SYNC_BN_CONFIG: {}, HEAD: {BATCHNORM_EPS: 1e-5, PARAMS: []}}"))
        .expect("keys of other owners accepted");
}

#[test]
fn lab_input_uses_one_channel_and_bgr_reverses_channels() {
    let (vs, model) = build_model(
        "{INPUT_TYPE: lab, TRUNK: {RESNETS: {DEPTH: 18, STEM: cifar, BASE_CHANNELS: 8}}}",
    )
    .expect("build");
    assert_eq!(
        vs.variables()["trunk.conv1.weight"].size(),
        vec![8, 1, 3, 3]
    );
    let x = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    assert_eq!(
        model.forward_t(&x, false).expect("forward")[0].size(),
        vec![1, 64]
    );

    let params = ResNetParams {
        stem: Stem::Cifar,
        base_channels: 8,
        ..resnet18()
    };
    let vs_rgb = nn::VarStore::new(Device::Cpu);
    let rgb = ResNet::new(vs_rgb.root(), &params, InputType::Rgb).expect("build");
    let mut vs_bgr = nn::VarStore::new(Device::Cpu);
    let bgr = ResNet::new(vs_bgr.root(), &params, InputType::Bgr).expect("build");
    vs_bgr.copy(&vs_rgb).expect("same weights");
    let a = rgb.forward_t(&x, false).expect("rgb");
    let b = bgr.forward_t(&x.flip([1]), false).expect("bgr");
    assert!(
        a.allclose(&b, 1e-5, 1e-6, false),
        "a BGR trunk on reversed channels equals the RGB trunk"
    );
}
