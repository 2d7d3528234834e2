//! Every command-line form VISSL's docs show, with Hydra's rules.

mod common;

use common::*;
use serde_yaml::Value;
use vissl_crds::config::{load, ConfigError, EngineName, Origin};

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).expect("test yaml")
}

#[test]
fn dotted_overrides_are_typed_like_yaml() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.VERBOSE=true",
        "config.OPTIMIZER.weight_decay=0.0005",
        "config.OPTIMIZER.num_epochs=3",
        "config.DATA.TRAIN.DATA_PATHS=[/data/a,/data/b]",
        "config.CHECKPOINT.DIR=./checkpoints",
        "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=s3://bucket/run-1/model.safetensors",
        "config.MODEL.AMP_PARAMS.AMP_ARGS={opt_level: O2, loss_scale: dynamic}",
    ]);
    assert!(config.verbose);
    assert_eq!(config.optimizer.weight_decay, 0.0005);
    assert_eq!(config.optimizer.num_epochs, 3);
    assert_eq!(config.data.train.data_paths, vec!["/data/a", "/data/b"]);
    assert_eq!(config.checkpoint.dir, "./checkpoints");
    assert_eq!(
        config.model.weights_init.params_file,
        "s3://bucket/run-1/model.safetensors"
    );
    assert_eq!(
        Value::Mapping(config.model.amp_params.amp_args.clone()),
        yaml("{opt_level: O2, loss_scale: dynamic}")
    );
}

#[test]
fn a_mapping_value_merges_into_the_mapping_it_overrides() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.LOSS.simclr_info_nce_loss={temperature: 0.2}",
    ]);
    assert_eq!(config.loss.simclr_info_nce_loss.temperature, 0.2);
    assert_eq!(
        config.loss.simclr_info_nce_loss.buffer_params.embedding_dim,
        128
    );
}

#[test]
fn list_items_can_be_addressed_by_index() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.DATA.TRAIN.TRANSFORMS.1.size=28",
        "config.DATA.TRAIN.TRANSFORMS[2].p=0.25",
    ]);
    assert_eq!(config.data.train.transforms[1]["size"], Value::from(28));
    assert_eq!(config.data.train.transforms[2]["p"], Value::from(0.25));
}

#[test]
fn plus_adds_new_keys_anywhere_and_refuses_existing_ones() {
    // The docs' two examples.
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "+config.MY_NEW_KEY=MY_VALUE",
        "+config.LOSS.simclr_info_nce_loss.MY_NEW_KEY=MY_VALUE",
        "+config.DATA.TRAIN.COLLATE_FUNCTION_PARAMS.num_classes=10",
    ]);
    assert_eq!(raw(&config, "MY_NEW_KEY"), &Value::from("MY_VALUE"));
    assert_eq!(
        config.loss.blocks["simclr_info_nce_loss"]["MY_NEW_KEY"],
        Value::from("MY_VALUE")
    );
    assert_eq!(
        config.data.train.collate_function_params.get("num_classes"),
        Some(&Value::from(10))
    );

    match load_err(&[
        "config=test/integration_test/quick_simclr",
        "+config.OPTIMIZER.num_epochs=3",
    ]) {
        ConfigError::BadOverride { arg, reason } => {
            assert_eq!(arg, "+config.OPTIMIZER.num_epochs=3");
            assert!(reason.contains("already exists"), "{reason}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn double_plus_sets_whether_or_not_the_key_exists() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "++config.OPTIMIZER.num_epochs=5",
        "++config.BRAND_NEW.deep.key=1",
    ]);
    assert_eq!(config.optimizer.num_epochs, 5);
    assert_eq!(raw(&config, "BRAND_NEW.deep.key"), &Value::from(1));
}

#[test]
fn plain_override_of_a_missing_key_suggests_the_fix() {
    // A typo gets the nearest key ...
    match load_err(&[
        "config=test/integration_test/quick_simclr",
        "config.OPTIMIZER.num_epoch=3",
    ]) {
        ConfigError::UnknownKey {
            path,
            origin,
            suggestion,
        } => {
            assert_eq!(path, "config.OPTIMIZER.num_epoch");
            assert_eq!(
                origin,
                Origin::CommandLine("config.OPTIMIZER.num_epoch=3".into())
            );
            assert_eq!(suggestion.as_deref(), Some("num_epochs"));
        }
        other => panic!("{other}"),
    }
    // ... a new key gets Hydra's advice.
    let err = load_err(&[
        "config=test/integration_test/quick_simclr",
        "config.MY_NEW_KEY=1",
    ]);
    assert!(err.to_string().contains("+config.MY_NEW_KEY=1"), "{err}");
}

#[test]
fn components_merge_after_the_main_file_and_before_dotted_overrides() {
    // Given in the "wrong" order on purpose: the order of kinds is fixed, as in Hydra.
    let config = load_ok(&[
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
        "+config/pretrain/simclr/optimization=bs32_16nodes",
        "config=pretrain/simclr/simclr_8node_resnet",
    ]);
    assert_eq!(config.data.train.batchsize_per_replica, 16);
    assert_eq!(config.distributed.num_nodes, 16);
    // 16 nodes x 8 ranks x 16 images = 2048; 0.3 * 2048 / 256 = 2.4.
    let cosine = &config.optimizer.param_schedulers.lr.schedulers[1];
    assert!((cosine.start_value.unwrap() - 2.4).abs() < 1e-12);
}

#[test]
fn dotted_overrides_apply_in_the_order_given() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "config.SEED_VALUE=1",
        "config.SEED_VALUE=2",
    ]);
    assert_eq!(config.seed_value, 2);
}

#[test]
fn root_keys_and_hydra_settings() {
    let config = load_ok(&[
        "hydra.verbose=true",
        "config=test/integration_test/quick_simclr",
        "engine_name=extract_features",
    ]);
    assert_eq!(config.engine_name, EngineName::ExtractFeatures);
}

#[test]
fn config_file_names_with_and_without_yaml_and_as_paths() {
    let by_name = load_ok(&["config=test/integration_test/quick_simclr"]);
    let with_ext = load_ok(&["config=test/integration_test/quick_simclr.yaml"]);
    let path = configs_root().join("test/integration_test/quick_simclr.yaml");
    let by_path = load_ok(&[&format!("config={}", path.display())]);
    assert_eq!(by_name, with_ext);
    assert_eq!(by_name, by_path);

    match load_err(&["config=pretrain/simclr/no_such_config"]) {
        ConfigError::NotFound { what, searched } => {
            assert!(what.contains("pretrain/simclr/no_such_config"), "{what}");
            assert!(
                searched
                    .iter()
                    .any(|s| s.ends_with("configs/pretrain/simclr/no_such_config.yaml")),
                "{searched:?}"
            );
        }
        other => panic!("{other}"),
    }
}

#[test]
fn vissl_repository_layout_resolves_under_config() {
    // VISSL keeps its files under configs/config/; the same names work with that root.
    let config = load(
        &opts(upstream_root(), None),
        &args(&[
            "config=pretrain/simclr/simclr_8node_resnet",
            "+config/pretrain/simclr/optimization=bs32_16nodes",
        ]),
    )
    .unwrap();
    assert_eq!(config.distributed.num_nodes, 16);
    assert_eq!(config.data.train.batchsize_per_replica, 32);
}

#[test]
fn a_second_config_file_is_refused() {
    let err = load_err(&[
        "config=test/integration_test/quick_simclr",
        "config=pretrain/simclr/simclr_8node_resnet",
    ]);
    assert!(matches!(err, ConfigError::BadOverride { .. }), "{err}");
    assert!(err.to_string().contains("only one `config=`"), "{err}");
}

#[test]
fn headerless_files_hold_config_content() {
    let (_dir, path) = temp_config("OPTIMIZER:\n  num_epochs: 4\n");
    let config = load_ok(&[&format!("config={}", path.display())]);
    assert_eq!(config.optimizer.num_epochs, 4);
}

#[test]
fn the_docs_quick_start_command_line_as_the_shell_passes_it() {
    // python3 run_distributed_engines.py hydra.verbose=true config.DATA.TRAIN.DATASET_NAMES=[imagenet1k_folder] ...
    // (the shell has removed the double quotes around the path and the checkpoint folder)
    let config = load(
        &opts(upstream_root(), None),
        &args(&[
            "hydra.verbose=true",
            "config.DATA.TRAIN.DATASET_NAMES=[imagenet1k_folder]",
            "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
            "config.DATA.TRAIN.DATA_PATHS=[/path/to/my/imagenet/folder/train]",
            "config=test/integration_test/quick_simclr",
            "config.CHECKPOINT.DIR=./checkpoints",
            "config.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        ]),
    )
    .unwrap();
    assert_eq!(
        config.data.train.data_paths,
        vec!["/path/to/my/imagenet/folder/train"]
    );
    assert_eq!(config.data.train.data_sources, vec!["disk_folder"]);
    assert_eq!(config.checkpoint.dir, "./checkpoints");
    assert!(config.hooks.tensorboard_setup.use_tensorboard);
    // Quotes that reach the program intact are YAML quotes.
    let quoted = load_ok(&[
        "config=test/integration_test/quick_simclr",
        r#"config.DATA.TRAIN.DATA_PATHS=["/data/train set"]"#,
        r#"config.CHECKPOINT.DIR="./checkpoints""#,
    ]);
    assert_eq!(quoted.data.train.data_paths, vec!["/data/train set"]);
    assert_eq!(quoted.checkpoint.dir, "./checkpoints");
}

#[test]
fn a_missing_component_lists_where_it_was_looked_for() {
    match load_err(&[
        "config=pretrain/simclr/simclr_8node_resnet",
        "+config/pretrain/simclr/optimization=bs1_1node",
    ]) {
        ConfigError::NotFound { what, searched } => {
            assert_eq!(
                what,
                "config component `pretrain/simclr/optimization/bs1_1node`"
            );
            assert!(searched
                .iter()
                .any(|s| s.ends_with("configs/pretrain/simclr/optimization/bs1_1node.yaml")));
        }
        other => panic!("{other}"),
    }
}

#[test]
fn plus_adds_a_parameter_to_one_transform() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        "+config.DATA.TRAIN.TRANSFORMS.1.scale=[0.2,1.0]",
    ]);
    assert_eq!(config.data.train.transforms[1]["scale"], yaml("[0.2, 1.0]"));
    let err = load_err(&[
        "config=test/integration_test/quick_simclr",
        "+config.DATA.TRAIN.TRANSFORMS.9.scale=1",
    ]);
    assert!(err.to_string().contains("cannot add"), "{err}");
}
