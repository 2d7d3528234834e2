//! The `vissl` binary as users run it: exit codes, messages, and the train -> extract -> kNN path.

use std::path::Path;
use std::process::{Command, Output};

fn vissl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vissl"))
        .args(args)
        .env("VISSL_PROGRESS", "plain")
        .output()
        .expect("vissl runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn validate_fails_with_the_key_the_origin_and_a_suggestion() {
    let out = vissl(&[
        "config",
        "validate",
        "config=pretrain/simclr/quick_cpu_fmnist",
        "config.OPTIMIZER.nesterv=true",
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("config.OPTIMIZER.nesterv"), "{msg}");
    assert!(msg.contains("command line"), "{msg}");
    assert!(msg.contains("did you mean `nesterov`"), "{msg}");

    let ok = vissl(&[
        "config",
        "validate",
        "config=pretrain/simclr/quick_cpu_fmnist",
    ]);
    assert!(ok.status.success(), "{}", text(&ok));
}

/// VISSL's own configs (the upstream fixtures) validate unchanged, with their models, optimizers and
/// losses built.
#[test]
fn validate_builds_model_optimizer_and_loss_of_vissls_own_configs() {
    let upstream =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/tests/fixtures/vissl_upstream/config");
    for name in [
        "test/integration_test/quick_swav",
        "test/integration_test/quick_moco",
        "test/integration_test/quick_dino",
        "test/integration_test/quick_barlow_twins",
        "pretrain/swav/swav_8node_resnet",
        "pretrain/moco/moco_1node_resnet",
        "pretrain/dino/dino_16gpus_deits16",
        "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet",
        "pretrain/simclr/simclr_8node_resnet",
        "pretrain/barlow_twins/barlow_twins_4node_resnet",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vissl"))
            .args(["config", "validate", &format!("config={name}")])
            .env("VISSL_CONFIGS", &upstream)
            .output()
            .expect("vissl runs");
        assert!(out.status.success(), "{name}: {}", text(&out));
    }
}

/// A bad key inside a loss's, head's or optimizer's own block is found by `validate`, and `train`
/// exits with the permanent config code (64), not the retryable 1.
#[test]
fn bad_loss_head_and_optimizer_blocks_are_config_errors() {
    let cases: [(&str, &str); 3] = [
        ("+config.LOSS.swav_loss.bogus=1", "unknown field `bogus`"),
        (
            "config.MODEL.HEAD.PARAMS=[[\"swav_head\",{\"dims\":[128,128,64],\"num_clusters\":[100],\"bogus\":1}]]",
            "bogus",
        ),
        ("config.OPTIMIZER.name=sgdd", "sgdd"),
    ];
    for (bad, expected) in cases {
        let out = vissl(&[
            "config",
            "validate",
            "config=pretrain/swav/quick_cpu_fmnist",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(64), "{bad}: {}", text(&out));
        assert!(text(&out).contains(expected), "{bad}: {}", text(&out));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = vec![
        "train".to_string(),
        "config=pretrain/swav/quick_cpu_fmnist".into(),
    ];
    args.extend(tiny(dir.path()));
    args.push(cases[0].0.into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = vissl(&args);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("LOSS.swav_loss"), "{}", text(&out));
}

#[test]
fn list_prints_registered_names_and_rejects_unknown_kinds() {
    let out = vissl(&["list", "transforms"]);
    assert!(out.status.success());
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(names.lines().any(|l| l == "RandomResizedCrop"), "{names}");
    let bad = vissl(&["list", "lossez"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("known kinds"));
}

fn tiny(dir: &Path) -> Vec<String> {
    vec![
        format!("config.CHECKPOINT.DIR={}", dir.display()),
        "config.DATA.TRAIN.DATA_LIMIT=64".into(),
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32".into(),
        "config.OPTIMIZER.num_epochs=1".into(),
    ]
}

#[test]
fn train_then_extract_then_knn_with_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt_dir = dir.path().join("ckpt");
    let mut args = vec![
        "train".to_string(),
        "config=pretrain/simclr/quick_cpu_fmnist".to_string(),
    ];
    args.extend(tiny(&ckpt_dir));
    let out = vissl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("checkpoint: "));

    // Features of the trained trunk for both splits, as VISSL's extract_features engine writes them.
    let feats_dir = dir.path().join("features");
    let ckpt = ckpt_dir.display().to_string();
    let out = vissl(&[
        "train",
        "config=benchmark/nearest_neighbor/quick_cpu_fmnist_knn",
        "engine_name=extract_features",
        &format!("config.MODEL.WEIGHTS_INIT.PARAMS_FILE={ckpt}"),
        &format!("config.EXTRACT_FEATURES.OUTPUT_DIR={}", feats_dir.display()),
        "config.DATA.TRAIN.DATA_LIMIT=100",
        "config.DATA.TEST.DATA_LIMIT=50",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let train = tch::Tensor::read_safetensors(feats_dir.join("train_res5avg.safetensors")).unwrap();
    let features = &train.iter().find(|(n, _)| n == "features").unwrap().1;
    assert_eq!(features.size(), [100, 128]);

    let results = dir.path().join("knn.json");
    let out = vissl(&[
        "benchmark",
        "knn",
        "config=benchmark/nearest_neighbor/quick_cpu_fmnist_knn",
        &format!("config.MODEL.WEIGHTS_INIT.PARAMS_FILE={ckpt}"),
        "config.DATA.TRAIN.DATA_LIMIT=200",
        "config.DATA.TEST.DATA_LIMIT=100",
        "config.NEAREST_NEIGHBOR.TOPK=20",
        "--baselines",
        "--output",
        results.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Every trunk tensor of the kNN model came from the training checkpoint.
    assert!(
        text(&out).contains("missing 0") && !text(&out).contains("loaded 0"),
        "{}",
        text(&out)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&results).unwrap()).unwrap();
    assert_eq!(report["test_samples"].as_i64(), Some(100));
    let rows = &report["results"];
    let kinds: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["features"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["trained", "random_init", "raw_pixels"]);
    for r in rows.as_array().unwrap() {
        let top1 = r["top1"].as_f64().unwrap();
        // Ten balanced-ish classes: anything sensible beats chance; 100% on 100 queries would mean a leak.
        assert!(top1 > 20.0 && top1 < 100.0, "{r}");
    }
}

#[test]
fn knn_without_a_checkpoint_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let out = vissl(&[
        "benchmark",
        "knn",
        "config=benchmark/nearest_neighbor/quick_cpu_fmnist_knn",
        &format!(
            "config.MODEL.WEIGHTS_INIT.PARAMS_FILE={}",
            dir.path().display()
        ),
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("no verified checkpoint") && msg.contains("--random-init"),
        "{msg}"
    );
}

#[test]
fn a_gpu_config_on_a_cpu_machine_names_the_fix() {
    // Only meaningful where there is no GPU: with one, the same command is a valid GPU run.
    if tch::Cuda::is_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "train".to_string(),
        "config=pretrain/simclr/quick_cpu_fmnist".to_string(),
    ];
    args.extend(tiny(dir.path()));
    args.push("config.MACHINE.DEVICE=gpu".into());
    let out = vissl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    assert!(
        text(&out).contains("config.MACHINE.DEVICE=cpu"),
        "{}",
        text(&out)
    );
}
