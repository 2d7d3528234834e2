//! What users read when a config is wrong: the key, where it was set, and a fix.

mod common;

use common::*;
use vissl_crds::config::{check, ConfigError, Origin};

#[test]
fn unknown_key_in_a_file_names_path_file_and_nearest_key() {
    let (_dir, path) = temp_config(
        "# @package _global_\nconfig:\n  OPTIMIZER:\n    param_schedulers:\n      lr:\n        name: cosine\n        strat_value: 0.1\n",
    );
    let err = load_err(&[&format!("config={}", path.display())]);
    match &err {
        ConfigError::UnknownKey {
            path: key,
            origin,
            suggestion,
        } => {
            assert_eq!(key, "config.OPTIMIZER.param_schedulers.lr.strat_value");
            assert_eq!(origin, &Origin::File(path.display().to_string()));
            assert_eq!(suggestion.as_deref(), Some("start_value"));
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert_eq!(
        text,
        format!(
            "unknown key `config.OPTIMIZER.param_schedulers.lr.strat_value` in {} (did you mean `start_value`?)",
            path.display()
        )
    );
}

#[test]
fn unknown_group_key_and_nested_scheduler_key() {
    let (_dir, path) = temp_config(
        "config:\n  OPTIMZER: {}\n  OPTIMIZER:\n    param_schedulers:\n      lr:\n        name: composite\n        schedulers:\n          - {name: cosine, start_value: 1.0, end_valeu: 0.0}\n",
    );
    let errors = check(
        &opts(configs_root(), None),
        &args(&[&format!("config={}", path.display())]),
    )
    .unwrap_err();
    let mut texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    texts.sort();
    assert_eq!(texts.len(), 2, "{texts:?}");
    assert!(
        texts[0].contains("`config.OPTIMIZER.param_schedulers.lr.schedulers[0].end_valeu`")
            && texts[0].contains("did you mean `end_value`?"),
        "{texts:?}"
    );
    assert!(
        texts[1].contains("`config.OPTIMZER`") && texts[1].contains("did you mean `OPTIMIZER`?"),
        "{texts:?}"
    );
}

#[test]
fn wrong_types_say_what_was_expected_and_found() {
    for (arg, expected, found) in [
        (
            "config.OPTIMIZER.num_epochs=ten",
            "an integer",
            "a string `ten`",
        ),
        (
            "config.OPTIMIZER.num_epochs=1.5",
            "an integer",
            "a float `1.5`",
        ),
        (
            "config.OPTIMIZER.weight_decay=small",
            "a number",
            "a string `small`",
        ),
        ("config.TEST_MODEL=1", "a boolean", "an integer `1`"),
        (
            "config.DATA.TRAIN.DATA_SOURCES=disk_folder",
            "a list",
            "a string `disk_folder`",
        ),
        (
            "config.MODEL.TRUNK.RESNETS=50",
            "a mapping",
            "an integer `50`",
        ),
        (
            "config.METERS.accuracy_list_meter.topk_values=[1,five]",
            "an integer",
            "a string `five`",
        ),
    ] {
        match load_err(&["config=test/integration_test/quick_simclr", arg]) {
            ConfigError::WrongType {
                expected: e,
                found: f,
                origin,
                ..
            } => {
                assert_eq!((e.as_str(), f.as_str()), (expected, found), "{arg}");
                assert_eq!(origin, Origin::CommandLine(arg.into()));
            }
            other => panic!("{arg}: {other}"),
        }
    }
    let text = load_err(&[
        "config=test/integration_test/quick_simclr",
        "config.OPTIMIZER.num_epochs=ten",
    ])
    .to_string();
    assert_eq!(
        text,
        "`config.OPTIMIZER.num_epochs` in command line `config.OPTIMIZER.num_epochs=ten` must be an integer, found a string `ten`"
    );
}

#[test]
fn lenient_conversions_follow_the_declared_type() {
    let config = load_ok(&[
        "config=test/integration_test/quick_simclr",
        // An integer where a float is declared ...
        "config.OPTIMIZER.weight_decay=0",
        // ... and a number where a string is declared.
        "config.DISTRIBUTED.RUN_ID=29500",
        // null defaults accept anything.
        "config.LOSS.cross_entropy_multiple_output_single_target.weight=[1.0,2.0]",
    ]);
    assert_eq!(config.optimizer.weight_decay, 0.0);
    assert!(raw(&config, "OPTIMIZER.weight_decay")
        .as_f64()
        .is_some_and(|v| v == 0.0));
    assert!(raw(&config, "OPTIMIZER.weight_decay").as_i64().is_none());
    assert_eq!(config.distributed.run_id, "29500");
}

#[test]
fn unknown_loss_lists_the_known_ones() {
    let err = load_err(&[
        "config=test/integration_test/quick_simclr",
        "config.LOSS.name=simclr_info_nce_los",
    ]);
    match &err {
        ConfigError::UnknownName {
            kind,
            name,
            path,
            known,
            suggestion,
        } => {
            assert_eq!(
                (kind.as_str(), name.as_str(), path.as_str()),
                ("loss", "simclr_info_nce_los", "config.LOSS.name")
            );
            assert_eq!(suggestion.as_deref(), Some("simclr_info_nce_loss"));
            assert!(known.iter().any(|k| k == "CrossEntropyLoss"), "{known:?}");
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(text.starts_with("unknown loss `simclr_info_nce_los` at `config.LOSS.name` (did you mean `simclr_info_nce_loss`?); known loss names: simclr_info_nce_loss, multicrop_simclr_info_nce_loss,"), "{text}");
}

#[test]
fn every_registry_name_place_is_checked() {
    for (arg, kind) in [
        ("config.MODEL.TRUNK.NAME=resnt", "trunk"),
        (
            "config.MODEL.HEAD.PARAMS=[[mlpp, {dims: [512, 128]}]]",
            "head",
        ),
        (
            "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrp, size: 32}]",
            "transform",
        ),
        (
            "config.DATA.TRAIN.COLLATE_FUNCTION=simclr_colator",
            "collator",
        ),
        ("config.DATA.TRAIN.DATA_SOURCES=[mnist]", "data source"),
        ("config.DATA.TEST.LABEL_SOURCES=[disk_fold]", "data source"),
        ("config.METERS.name=acuracy_list_meter", "meter"),
        ("config.OPTIMIZER.name=adam_w", "optimizer"),
        (
            "config.OPTIMIZER.param_schedulers.lr.name=cosin",
            "param scheduler",
        ),
    ] {
        match load_err(&["config=test/integration_test/quick_simclr", arg]) {
            ConfigError::UnknownName {
                kind: k,
                suggestion,
                ..
            } => {
                assert_eq!(k, kind, "{arg}");
                assert!(suggestion.is_some(), "{arg}: no suggestion");
            }
            other => panic!("{arg}: {other}"),
        }
    }
}

#[test]
fn closed_value_sets_are_checked() {
    let err = load_err(&[
        "config=test/integration_test/quick_simclr",
        "config.MACHINE.DEVICE=gpux",
    ]);
    let text = err.to_string();
    assert!(
        text.contains("`config.MACHINE.DEVICE`") && text.contains("did you mean `gpu`?"),
        "{text}"
    );
    assert!(
        text.contains("command line `config.MACHINE.DEVICE=gpux`"),
        "{text}"
    );
}

#[test]
fn unreadable_files_name_the_file_and_line() {
    let (_dir, path) = temp_config("config:\n  OPTIMIZER: {num_epochs: [1, 2}\n");
    match load_err(&[&format!("config={}", path.display())]) {
        ConfigError::Parse { file, message } => {
            assert_eq!(file, path.display().to_string());
            assert!(message.contains("line 2"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn unsupported_version_and_defaults_lists_are_refused() {
    let (_dir, path) = temp_config("# @package _global_\nVERSION: 2\nconfig: {}\n");
    let err = load_err(&[&format!("config={}", path.display())]);
    assert!(
        err.to_string()
            .contains("config version 2 is not supported"),
        "{err}"
    );

    let (_dir, path) = temp_config("defaults:\n  - optimization: bs32\nconfig: {}\n");
    let err = load_err(&[&format!("config={}", path.display())]);
    assert!(err.to_string().contains("`defaults:` lists"), "{err}");
}

#[test]
fn component_group_needs_a_plus() {
    let err = load_err(&[
        "config=pretrain/simclr/simclr_8node_resnet",
        "config/pretrain/simclr/optimization=bs32_16nodes",
    ]);
    assert!(
        err.to_string()
            .contains("+config/pretrain/simclr/optimization=bs32_16nodes"),
        "{err}"
    );
}
