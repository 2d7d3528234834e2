//! Tests of MODEL.WEIGHTS_INIT: safetensors round trips and VISSL's renaming rules
//! (STATE_DICT_KEY_NAME, REMOVE_PREFIX, APPEND_PREFIX, SKIP_LAYERS, head initialisation).

use std::collections::BTreeSet;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};
use vissl_trainer::models::weights_init::{read_safetensors, save_named_safetensors};
use vissl_trainer::models::{save_safetensors, BaseSslModel, ModelError, ModelParams, WeightsInit};

const MODEL: &str = "{TRUNK: {RESNETS: {DEPTH: 18, STEM: cifar, BASE_CHANNELS: 8}},
                      HEAD: {PARAMS: [[\"mlp\", {\"dims\": [64, 16], \"use_bn\": true, \"skip_last_layer_relu_bn\": false}]]}}";

const LINEAR_EVAL: &str = "{TRUNK: {RESNETS: {DEPTH: 18, STEM: cifar, BASE_CHANNELS: 8}},
    FEATURE_EVAL_SETTINGS: {EVAL_MODE_ON: True, FREEZE_TRUNK_ONLY: True},
    HEAD: {PARAMS: [[\"mlp\", {\"dims\": [64, 16], \"use_bn\": true, \"skip_last_layer_relu_bn\": false}]]}}";

fn yaml(text: &str) -> serde_yaml::Value {
    serde_yaml::from_str(text).expect("test YAML parses")
}

fn model(model_yaml: &str) -> (nn::VarStore, BaseSslModel) {
    let params = ModelParams::from_yaml(&yaml(model_yaml)).expect("params");
    let vs = nn::VarStore::new(Device::Cpu);
    let model = BaseSslModel::new(&vs, &params).expect("model");
    // Distinct, non-default values everywhere (batch-norm statistics included), so equality after
    // a load can only come from the file.
    tch::no_grad(|| {
        for (_, t) in vs.variables() {
            let mut t = t;
            t.copy_(&Tensor::randn_like(&t).abs());
        }
    });
    (vs, model)
}

fn init(file: &Path, key: &[&str], remove: &str, append: &str) -> WeightsInit {
    WeightsInit {
        params_file: file.display().to_string(),
        state_dict_key_name: key.iter().map(|s| s.to_string()).collect(),
        remove_prefix: remove.to_string(),
        append_prefix: append.to_string(),
        ..WeightsInit::default()
    }
}

fn names<'a>(items: impl IntoIterator<Item = &'a String>) -> BTreeSet<String> {
    items.into_iter().cloned().collect()
}

fn var_names(model: &BaseSslModel, prefix: &str) -> BTreeSet<String> {
    model
        .named_variables()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn assert_same_values(a: &BaseSslModel, b: &BaseSslModel, prefix: &str) {
    let b_vars: std::collections::HashMap<String, Tensor> =
        b.named_variables().into_iter().collect();
    for (name, t) in a
        .named_variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
    {
        assert!(t.equal(&b_vars[&name]), "{name} differs");
    }
}

fn assert_differ(a: &BaseSslModel, b: &BaseSslModel, prefix: &str) {
    let b_vars: std::collections::HashMap<String, Tensor> =
        b.named_variables().into_iter().collect();
    for (name, t) in a
        .named_variables()
        .into_iter()
        .filter(|(n, _)| n.starts_with(prefix))
    {
        assert!(
            !t.equal(&b_vars[&name]),
            "{name} was loaded but should not have been"
        );
    }
}

/// Maps a model name to a file name (None leaves the variable out of the file).
type Rename = Box<dyn Fn(&str) -> Option<String>>;

/// Writes `source`'s variables renamed by `rename` (None drops one), plus `extra` entries.
fn write_renamed(
    source: &BaseSslModel,
    path: &Path,
    rename: impl Fn(&str) -> Option<String>,
    extra: Vec<(String, Tensor)>,
) {
    let mut named: Vec<(String, Tensor)> = source
        .named_variables()
        .into_iter()
        .filter_map(|(n, t)| rename(&n).map(|m| (m, t)))
        .collect();
    named.extend(extra);
    save_named_safetensors(&named, path).expect("write file");
}

#[test]
fn model_round_trips_through_safetensors_under_the_default_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("model.safetensors");
    let (_, a) = model(MODEL);
    a.save_safetensors(&file).expect("save");
    let (_, b) = model(MODEL);
    assert_differ(&a, &b, "");
    let report = b
        .init_from_weights(Some(&init(&file, &["classy_state_dict"], "", "")), true)
        .expect("load");
    assert_eq!(names(&report.loaded), var_names(&a, ""));
    assert!(
        report.missing.is_empty() && report.unexpected.is_empty() && report.skipped.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.namespace, "");
    assert_same_values(&a, &b, "");
    let x = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let (ya, yb) = (
        a.forward_t(&x, false).expect("a"),
        b.forward_t(&x, false).expect("b"),
    );
    assert!(ya[0].equal(&yb[0]), "same weights, same outputs");
}

#[test]
fn torchvision_names_load_with_append_prefix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("resnet18.safetensors");
    let (_, source) = model(MODEL);
    let torch_only = |n: &str| n.strip_prefix("trunk.").map(str::to_string);
    let extra = vec![
        (
            "fc.weight".to_string(),
            Tensor::zeros([10, 64], (Kind::Float, Device::Cpu)),
        ),
        (
            "fc.bias".to_string(),
            Tensor::zeros([10], (Kind::Float, Device::Cpu)),
        ),
        ("bn1.num_batches_tracked".to_string(), Tensor::from(7i64)),
    ];
    write_renamed(&source, &file, torch_only, extra);
    let (_, target) = model(MODEL);
    let report = target
        .init_from_weights(Some(&init(&file, &[], "", "trunk._feature_blocks.")), false)
        .expect("load");
    assert_eq!(names(&report.loaded), var_names(&target, "trunk."));
    assert_eq!(names(&report.missing), var_names(&target, "heads."));
    assert_eq!(report.unexpected, vec!["trunk.fc.bias", "trunk.fc.weight"]);
    assert_eq!(report.skipped, vec!["trunk.bn1.num_batches_tracked"]);
    assert_same_values(&source, &target, "trunk.");
    assert_differ(&source, &target, "heads.");

    // Strict loading refuses the missing heads and then loads nothing.
    let (_, strict_target) = model(MODEL);
    let err = strict_target
        .init_from_weights(Some(&init(&file, &[], "", "trunk.")), true)
        .unwrap_err();
    assert!(err.to_string().contains("heads.0.clf.0.weight"), "{err}");
    assert_differ(&source, &strict_target, "trunk.");
}

#[test]
fn vissl_checkpoint_layouts_load() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, source) = model(MODEL);
    let cases: Vec<(&str, Rename, Vec<&str>, &str, &str)> = vec![
        (
            // VISSL checkpoint: classy_state_dict -> base_model -> model -> {trunk, heads}.
            "classy",
            Box::new(|n: &str| {
                let n = n.replacen("trunk.", "trunk._feature_blocks.", 1);
                Some(format!("classy_state_dict.base_model.model.{n}"))
            }),
            vec!["classy_state_dict"],
            "",
            "",
        ),
        (
            // A feature-extractor checkpoint under a custom key path.
            "custom",
            Box::new(|n: &str| {
                Some(format!(
                    "model.state.{}",
                    n.replacen("trunk.", "trunk.base_model._feature_blocks.", 1)
                ))
            }),
            vec!["model", "state"],
            "",
            "",
        ),
        (
            // DDP-saved names: REMOVE_PREFIX runs before APPEND_PREFIX.
            "ddp",
            Box::new(|n: &str| Some(format!("module.{n}"))),
            vec![],
            "module.",
            "",
        ),
    ];
    for (label, rename, key, remove, append) in cases {
        let file = dir.path().join(format!("{label}.safetensors"));
        write_renamed(&source, &file, rename, Vec::new());
        let (_, target) = model(MODEL);
        let report = target
            .init_from_weights(Some(&init(&file, &key, remove, append)), true)
            .expect(label);
        assert_eq!(names(&report.loaded), var_names(&target, ""), "{label}");
        assert!(
            report.unexpected.is_empty(),
            "{label}: {:?}",
            report.unexpected
        );
        assert_same_values(&source, &target, "");
    }
}

#[test]
fn shape_mismatch_names_the_parameter_and_both_shapes_and_loads_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.safetensors");
    let (_, source) = model(MODEL);
    let extra = vec![(
        "trunk.conv1.weight".to_string(),
        Tensor::zeros([8, 3, 5, 5], (Kind::Float, Device::Cpu)),
    )];
    write_renamed(
        &source,
        &file,
        |n| (n != "trunk.conv1.weight").then(|| n.to_string()),
        extra,
    );
    let (_, target) = model(MODEL);
    let err = target
        .init_from_weights(Some(&init(&file, &[], "", "")), false)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Shape { .. }), "{msg}");
    assert!(
        msg.contains("trunk.conv1.weight")
            && msg.contains("[8, 3, 3, 3]")
            && msg.contains("[8, 3, 5, 5]"),
        "{msg}"
    );
    assert_differ(&source, &target, "trunk.layer1");
}

#[test]
fn evaluation_leaves_heads_alone_unless_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("full.safetensors");
    let (_, source) = model(MODEL);
    source.save_safetensors(&file).expect("save");

    let (_, linear_eval) = model(LINEAR_EVAL);
    let report = linear_eval
        .init_from_weights(Some(&init(&file, &[""], "", "")), true)
        .expect("load");
    assert_eq!(names(&report.skipped), var_names(&linear_eval, "heads."));
    assert_same_values(&source, &linear_eval, "trunk.");
    assert_differ(&source, &linear_eval, "heads.");

    let with_heads = LINEAR_EVAL.replace(
        "FREEZE_TRUNK_ONLY: True",
        "FREEZE_TRUNK_ONLY: True, EVAL_TRUNK_AND_HEAD: True",
    );
    let (_, eval_heads) = model(&with_heads);
    eval_heads
        .init_from_weights(Some(&init(&file, &[""], "", "")), true)
        .expect("load");
    assert_same_values(&source, &eval_heads, "");

    // A head of another size fails by default and is skipped without ASSERT_HEAD_LAYER_SHAPE_INIT.
    let other_head = MODEL.replace("[64, 16]", "[64, 10]");
    let (_, resized) = model(&other_head);
    let msg = resized
        .init_from_weights(Some(&init(&file, &[], "", "")), false)
        .unwrap_err()
        .to_string();
    // Layers are checked in name order: the bias comes first.
    assert!(
        msg.contains("heads.0.clf.0.bias")
            && msg.contains("[10] (model)")
            && msg.contains("[16] (file)"),
        "{msg}"
    );
    let tolerant = other_head.replace(
        "TRUNK:",
        "FEATURE_EVAL_SETTINGS: {ASSERT_HEAD_LAYER_SHAPE_INIT: False}, TRUNK:",
    );
    let (_, resized) = model(&tolerant);
    let report = resized
        .init_from_weights(Some(&init(&file, &[], "", "")), false)
        .expect("load");
    assert!(
        report.skipped.contains(&"heads.0.clf.0.weight".to_string()),
        "{report:?}"
    );
    assert!(
        report
            .skipped
            .contains(&"heads.0.clf.1.running_mean".to_string()),
        "{report:?}"
    );
    assert!(
        report.loaded.contains(&"trunk.conv1.weight".to_string()),
        "{report:?}"
    );
}

#[test]
fn skip_layers_match_substrings_of_model_names() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("full.safetensors");
    let (_, source) = model(MODEL);
    source.save_safetensors(&file).expect("save");
    let (_, target) = model(MODEL);
    let skip = WeightsInit {
        skip_layers: vec!["bn".into(), "downsample.1".into()],
        ..init(&file, &[], "", "")
    };
    let report = target.init_from_weights(Some(&skip), true).expect("load");
    let skipped = names(&report.skipped);
    assert!(
        skipped.contains("trunk.layer2.0.bn1.running_var")
            && skipped.contains("trunk.layer3.0.downsample.1.weight")
    );
    assert!(skipped
        .iter()
        .all(|n| n.contains("bn") || n.contains("downsample.1")));
    assert!(names(&report.loaded).contains("trunk.layer3.0.downsample.0.weight"));
    let target_vars: std::collections::HashMap<String, Tensor> =
        target.named_variables().into_iter().collect();
    let source_vars: std::collections::HashMap<String, Tensor> =
        source.named_variables().into_iter().collect();
    assert!(!target_vars["trunk.bn1.weight"].equal(&source_vars["trunk.bn1.weight"]));
}

#[test]
fn incompatible_files_explain_the_settings_to_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("torchvision.safetensors");
    let (_, source) = model(MODEL);
    write_renamed(
        &source,
        &file,
        |n| n.strip_prefix("trunk.").map(str::to_string),
        Vec::new(),
    );
    let (_, target) = model(MODEL);
    let msg = target
        .init_from_weights(Some(&init(&file, &["classy_state_dict"], "", "")), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("STATE_DICT_KEY_NAME") && msg.contains("conv1") && msg.contains("layer1"),
        "{msg}"
    );
    let msg = target
        .init_from_weights(Some(&init(&file, &[], "", "")), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("APPEND_PREFIX") && msg.contains("trunk._feature_blocks."),
        "{msg}"
    );
    let msg = target
        .init_from_weights(Some(&init(&file, &["model_state_dict"], "", "")), false)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`model_state_dict` is not in the file"),
        "{msg}"
    );
    let missing = dir.path().join("absent.safetensors");
    let msg = target
        .init_from_weights(Some(&init(&missing, &[], "", "")), false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.safetensors"), "{msg}");
    let msg = target
        .init_from_weights(None, false)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("MODEL.WEIGHTS_INIT.PARAMS_FILE"), "{msg}");
}

#[test]
fn weights_init_block_reads_vissl_keys() {
    let parsed = WeightsInit::from_yaml(&yaml(
        "{PARAMS_FILE: /w.safetensors, STATE_DICT_KEY_NAME: \"\", SKIP_LAYERS: [num_batches_tracked, fc],
          REMOVE_PREFIX: module., APPEND_PREFIX: trunk._feature_blocks.}",
    ))
    .expect("parse");
    assert_eq!(parsed.params_file, "/w.safetensors");
    assert!(parsed.state_dict_key_name.is_empty());
    assert_eq!(parsed.skip_layers, vec!["num_batches_tracked", "fc"]);
    assert_eq!(
        (parsed.remove_prefix.as_str(), parsed.append_prefix.as_str()),
        ("module.", "trunk._feature_blocks.")
    );
    let listed =
        WeightsInit::from_yaml(&yaml("{STATE_DICT_KEY_NAME: [model, trunk]}")).expect("parse");
    assert_eq!(listed.state_dict_key_name, vec!["model", "trunk"]);
    let msg = WeightsInit::from_yaml(&yaml("{SKIP_LAYER: [fc]}"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("MODEL.WEIGHTS_INIT.SKIP_LAYER") && msg.contains("SKIP_LAYERS"),
        "{msg}"
    );
}

#[test]
fn save_safetensors_writes_every_var_store_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vs.safetensors");
    let (vs, _) = model(MODEL);
    save_safetensors(&vs, &file).expect("save");
    let read = read_safetensors(&file).expect("read");
    let vars = vs.variables();
    assert_eq!(read.len(), vars.len());
    for (name, t) in read {
        assert!(t.equal(&vars[&name]), "{name}");
    }
}
