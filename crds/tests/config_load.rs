//! Loading whole configs: the shipped ones, VISSL's own, round trips, aliases, inference.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_yaml::Value;
use vissl_crds::config::{check, default_configs_root, load, Device, EngineName, World};

fn yaml_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read configs dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_config_loads_and_validates() {
    let mut files = Vec::new();
    yaml_files(&configs_root(), &mut files);
    files.retain(|f| f.file_name().is_some_and(|n| n != "defaults.yaml"));
    assert!(files.len() >= 5, "found only {files:?}");
    for file in files {
        let rel = file
            .strip_prefix(configs_root())
            .expect("under configs")
            .with_extension("");
        load_ok(&[&format!("config={}", rel.display())]);
    }
}

#[test]
fn vissl_upstream_configs_load_unchanged() {
    let opts = opts(upstream_root(), None);
    for name in [
        "pretrain/simclr/simclr_8node_resnet",
        "test/integration_test/quick_simclr",
        "benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear",
    ] {
        let config = check(&opts, &args(&[&format!("config={name}")])).unwrap_or_else(|e| {
            panic!(
                "{name}: {}",
                e.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert_eq!(config.model.trunk.name, "resnet");
    }
    // The linear evaluation's heads and pool ops come through typed.
    let linear = load(&opts, &args(&["config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear"]))
        .unwrap();
    assert_eq!(linear.model.head.params.len(), 7);
    assert_eq!(
        linear
            .model
            .feature_eval_settings
            .linear_eval_feat_pool_ops_map[0]
            .layer,
        "conv1"
    );
    assert_eq!(linear.meters.active(), vec!["accuracy_list_meter"]);
    // quick_simclr's AMP_ARGS carry keys the defaults do not have: that mapping is free-form.
    let quick = load(&opts, &args(&["config=test/integration_test/quick_simclr"])).unwrap();
    assert_eq!(
        quick.model.amp_params.amp_args.get("opt_level"),
        Some(&Value::from("O3"))
    );
}

#[test]
fn vissl_swav_and_deepcluster_configs_load_unchanged_with_inferred_loss_params() {
    let opts = opts(upstream_root(), None);
    for name in [
        "pretrain/swav/swav_8node_resnet",
        "test/integration_test/quick_swav",
        "test/integration_test/quick_swav_2crops",
        "pretrain/deepcluster_v2/deepclusterv2_2crops_resnet",
    ] {
        check(&opts, &args(&[&format!("config={name}")])).unwrap_or_else(|e| {
            panic!(
                "{name}: {}",
                e.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    }
    // SwAV's multi-crop component: 2x224 + 4x96 crops reach the loss, the head sizes it.
    let swav = load(
        &opts,
        &args(&[
            "config=pretrain/swav/swav_8node_resnet",
            "+config/pretrain/swav/transforms=multicrop_2x224_4x96",
        ]),
    )
    .unwrap();
    let loss = &swav.loss.blocks["swav_loss"];
    assert_eq!(loss["num_crops"], Value::from(6));
    assert_eq!(loss["embedding_dim"], Value::from(128));
    assert_eq!(
        loss["num_prototypes"],
        serde_yaml::from_str::<Value>("[3000]").unwrap()
    );
    let dc = load(
        &opts,
        &args(&["config=pretrain/deepcluster_v2/deepclusterv2_2crops_resnet"]),
    )
    .unwrap();
    let loss = &dc.loss.blocks["deepclusterv2_loss"];
    assert_eq!(loss["memory_params"]["embedding_dim"], Value::from(128));
    assert_eq!(loss["DROP_LAST"], Value::from(true));
}

#[test]
fn shown_config_reloads_to_the_same_config() {
    let first = load_ok(&[
        "config=pretrain/simclr/simclr_8node_resnet",
        "+config/pretrain/simclr/transforms=multicrop_2x160_4x96",
        "config.OPTIMIZER.num_epochs=7",
        "+config.LOSS.multicrop_simclr_info_nce_loss.MY_NEW_KEY=MY_VALUE",
        "+config.MY_NEW_GROUP={a: 1}",
        "engine_name=extract_features",
    ]);
    let text = first.to_yaml();
    assert!(text.starts_with("# @package _global_\n"), "{text}");
    let (_dir, path) = temp_config(&text);
    let second = load_ok(&[&format!("config={}", path.display())]);
    assert_eq!(second.to_yaml(), text);
    assert_eq!(second, first);
    assert_eq!(second.hash(), first.hash());
    assert_eq!(second.hash().len(), 16);
    assert_eq!(second.engine_name, EngineName::ExtractFeatures);
}

#[test]
fn hash_is_stable_and_follows_values() {
    let a = load_ok(&["config=test/integration_test/quick_simclr"]);
    let b = load_ok(&["config=test/integration_test/quick_simclr"]);
    let c = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.SEED_VALUE=1",
    ]);
    assert_eq!(a.hash(), b.hash());
    assert_ne!(a.hash(), c.hash());
}

#[test]
fn both_resnets_spellings_land_in_model_trunk_resnets() {
    let (_dir, path) = temp_config(
        "# @package _global_\nconfig:\n  MODEL:\n    TRUNK:\n      NAME: resnet\n      TRUNK_PARAMS:\n        RESNETS:\n          DEPTH: 101\n",
    );
    let old_file = load_ok(&[&format!("config={}", path.display())]);
    assert_eq!(old_file.model.trunk.resnets.depth, 101);
    assert!(raw(&old_file, "MODEL.TRUNK").get("TRUNK_PARAMS").is_none());

    // The docs' command lines (SimCLR / PIRL / SwAV pages) use the old spelling too.
    let cli = load_ok(&[
        "config=pretrain/simclr/simclr_8node_resnet",
        "config.MODEL.TRUNK.NAME=resnet",
        "config.MODEL.TRUNK.TRUNK_PARAMS.RESNETS.DEPTH=101",
        "config.MODEL.TRUNK.TRUNK_PARAMS.RESNETS.WIDTH_MULTIPLIER=2",
    ]);
    assert_eq!(
        (
            cli.model.trunk.resnets.depth,
            cli.model.trunk.resnets.width_multiplier
        ),
        (101, 2)
    );
    let new = load_ok(&[
        "config=pretrain/simclr/simclr_8node_resnet",
        "config.MODEL.TRUNK.RESNETS.DEPTH=101",
        "config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=2",
    ]);
    assert_eq!(new, cli);
}

#[test]
fn docs_tensorboard_spelling_is_an_alias() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        "config.TENSORBOARD_SETUP.LOG_DIR=/tmp/swav_tensorboard_events/",
    ]);
    assert!(config.hooks.tensorboard_setup.use_tensorboard);
    assert_eq!(
        config.hooks.tensorboard_setup.log_dir,
        "/tmp/swav_tensorboard_events/"
    );
}

#[test]
fn simclr_8_nodes_infers_world_batch_and_lr_from_the_config() {
    let config = load_ok(&["config=pretrain/simclr/simclr_8node_resnet"]);
    let simclr = &config.loss.simclr_info_nce_loss.buffer_params;
    // 8 nodes x 8 processes = 64 ranks; two views of 64 images per rank: 2 * 64 * 64 = 8192 embeddings.
    assert_eq!(simclr.world_size, 64);
    assert_eq!(simclr.effective_batch_size, 8192);
    let lr = &config.optimizer.param_schedulers.lr;
    // Global batch 64 * 64 = 4096; 0.3 per 256 -> 0.3 * 4096 / 256 = 4.8.
    // Warmup starts at 0.3 * (64 images * 8 ranks per node) / 256 = 0.6, VISSL's per-node rule.
    assert_eq!(lr.name, "composite");
    let warmup = &lr.schedulers[0];
    let cosine = &lr.schedulers[1];
    assert_eq!(warmup.name, "linear");
    assert!((warmup.start_value.unwrap() - 0.6).abs() < 1e-12);
    assert!((warmup.end_value.unwrap() - 4.8).abs() < 1e-12);
    assert!((cosine.start_value.unwrap() - 4.8).abs() < 1e-12);
    assert_eq!(cosine.end_value, Some(0.0));
}

#[test]
fn one_node_from_the_launcher_drops_the_warmup() {
    let world = World {
        num_nodes: 1,
        nproc_per_node: 8,
    };
    let config = load(
        &opts(configs_root(), Some(world)),
        &args(&["config=pretrain/simclr/simclr_8node_resnet"]),
    )
    .unwrap();
    assert_eq!(
        (
            config.distributed.num_nodes,
            config.distributed.num_proc_per_node
        ),
        (1, 8)
    );
    // Global batch 64 * 8 = 512 -> 0.3 * 512 / 256 = 0.6; the warmup would start at 0.6 as well, so it
    // is pointless and removed, leaving the cosine part as the whole schedule.
    let lr = &config.optimizer.param_schedulers.lr;
    assert_eq!(lr.name, "cosine");
    assert!((lr.start_value.unwrap() - 0.6).abs() < 1e-12);
    assert_eq!(lr.end_value, Some(0.0));
    assert_eq!(config.loss.simclr_info_nce_loss.buffer_params.world_size, 8);
    assert_eq!(
        config
            .loss
            .simclr_info_nce_loss
            .buffer_params
            .effective_batch_size,
        2 * 64 * 8
    );
}

#[test]
fn multicrop_component_infers_crops() {
    let config = load_ok(&[
        "config=pretrain/simclr/simclr_8node_resnet",
        "+config/pretrain/simclr/transforms=multicrop_2x160_4x96",
    ]);
    assert_eq!(config.loss.name, "multicrop_simclr_info_nce_loss");
    // ImgPilToMultiCrop total_num_crops: 6 (2 x 160 px + 4 x 96 px).
    assert_eq!(config.loss.multicrop_simclr_info_nce_loss.num_crops, 6);
    assert_eq!(config.data.train.collate_function, "multicrop_collator");
}

#[test]
fn quick_simclr_runs_on_fashion_mnist_on_the_cpu() {
    let config = load_ok(&["config=test/integration_test/quick_simclr"]);
    assert_eq!(config.machine.device, Device::Cpu);
    assert_eq!(config.data.train.data_sources, vec!["mnist_idx"]);
    assert_eq!(config.data.train.dataset_names, vec!["fashion_mnist"]);
    let catalog: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(configs_root().join("dataset_catalog.json")).unwrap(),
    )
    .unwrap();
    let train = catalog["fashion_mnist"]["train"].as_array().unwrap();
    assert!(train[0]
        .as_str()
        .unwrap()
        .ends_with("train-images-idx3-ubyte.gz"));
    assert!(train[1]
        .as_str()
        .unwrap()
        .ends_with("train-labels-idx1-ubyte.gz"));
    assert!(catalog["fashion_mnist"]["val"][0]
        .as_str()
        .unwrap()
        .ends_with("t10k-images-idx3-ubyte.gz"));
}

#[test]
fn teacher_model_is_completed_from_model() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.DISTILLATION.TEACHER_MODEL.TRUNK.RESNETS.DEPTH=50",
    ]);
    // From MODEL (the teacher's defaults do not set them) ...
    assert_eq!(
        raw(
            &config,
            "DISTILLATION.TEACHER_MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER"
        ),
        &Value::from(1)
    );
    // ... except what the teacher sets itself.
    assert_eq!(
        raw(&config, "DISTILLATION.TEACHER_MODEL.TRUNK.RESNETS.DEPTH"),
        &Value::from(50)
    );
    assert_eq!(raw(&config, "MODEL.TRUNK.RESNETS.DEPTH"), &Value::from(18));
    assert_eq!(
        raw(&config, "DISTILLATION.TEACHER_MODEL.HEAD.PARAMS.0.1.dims.1"),
        &Value::from(1000)
    );
}

#[test]
fn typed_views_cover_exactly_the_defaults_keys() {
    let config = load_ok(&[]);
    fn keys(value: &Value) -> Option<BTreeSet<String>> {
        value.as_mapping().map(|m| {
            m.keys()
                .map(|k| k.as_str().unwrap_or("?").to_string())
                .collect()
        })
    }
    fn compare(path: &str, typed: &Value, raw: &Value) {
        let (Some(typed_keys), Some(raw_keys)) = (keys(typed), keys(raw)) else {
            return;
        };
        assert_eq!(
            typed_keys, raw_keys,
            "typed view of {path} drifted from defaults.yaml"
        );
        for key in typed_keys {
            compare(
                &format!("{path}.{key}"),
                &typed[key.as_str()],
                &raw[key.as_str()],
            );
        }
    }
    let groups: Vec<(&str, Value)> = vec![
        (
            "REPRODUCIBILITY",
            serde_yaml::to_value(&config.reproducibility).unwrap(),
        ),
        ("HOOKS", serde_yaml::to_value(&config.hooks).unwrap()),
        ("DATA", serde_yaml::to_value(&config.data).unwrap()),
        ("METERS", serde_yaml::to_value(&config.meters).unwrap()),
        ("MACHINE", serde_yaml::to_value(&config.machine).unwrap()),
        ("MODEL", serde_yaml::to_value(&config.model).unwrap()),
        ("LOSS", serde_yaml::to_value(&config.loss).unwrap()),
        (
            "OPTIMIZER",
            serde_yaml::to_value(&config.optimizer).unwrap(),
        ),
        (
            "EXTRACT_FEATURES",
            serde_yaml::to_value(&config.extract_features).unwrap(),
        ),
        ("TRAINER", serde_yaml::to_value(&config.trainer).unwrap()),
        (
            "CHECKPOINT",
            serde_yaml::to_value(&config.checkpoint).unwrap(),
        ),
        (
            "DISTRIBUTED",
            serde_yaml::to_value(&config.distributed).unwrap(),
        ),
        (
            "NEAREST_NEIGHBOR",
            serde_yaml::to_value(&config.nearest_neighbor).unwrap(),
        ),
        ("SVM", serde_yaml::to_value(&config.svm).unwrap()),
    ];
    for (group, typed) in groups {
        compare(group, &typed, raw(&config, group));
    }
}

#[test]
fn our_additions_have_their_defaults() {
    let config = load_ok(&[]);
    assert_eq!(config.checkpoint.keep_last_k, -1);
    assert_eq!(config.nearest_neighbor.topk.values(), vec![200]);
    assert_eq!(config.nearest_neighbor.sigma, 0.1);
    assert!(!config.nearest_neighbor.l2_norm_feats);
    assert_eq!(config.nearest_neighbor.features.layer_name, "heads");
}

#[test]
fn default_configs_root_finds_the_repository_configs() {
    let root = default_configs_root();
    assert!(root.join("defaults.yaml").is_file(), "{}", root.display());
}

#[test]
fn resolved_with_a_launcher_world_reloads_unchanged() {
    // The operator resolves with the world of the custom resource; the trainer reloads that file with the
    // same world. Inference must be idempotent, including the collapsed warmup of the composite LR.
    let world = World {
        num_nodes: 1,
        nproc_per_node: 8,
    };
    let options = opts(configs_root(), Some(world));
    let first = load(
        &options,
        &args(&["config=pretrain/simclr/simclr_8node_resnet"]),
    )
    .unwrap();
    let (_dir, path) = temp_config(&first.to_yaml());
    let second = load(&options, &args(&[&format!("config={}", path.display())])).unwrap();
    assert_eq!(second.to_yaml(), first.to_yaml());
    assert_eq!(second.hash(), first.hash());
}
