//! VISSL's own Barlow Twins, MoCo and DINO configs load unchanged, with the values the loader
//! infers for these losses.

mod common;

use common::*;
use serde_yaml::Value;
use vissl_crds::config::check;

fn upstream(name: &str) -> vissl_crds::config::Config {
    check(
        &opts(upstream_root(), None),
        &args(&[&format!("config={name}")]),
    )
    .unwrap_or_else(|errors| {
        panic!(
            "{name}:\n{}",
            errors
                .iter()
                .map(|e| format!("  {e}\n"))
                .collect::<String>()
        )
    })
}

fn int(config: &vissl_crds::config::Config, dotted: &str) -> u64 {
    raw(config, dotted)
        .as_u64()
        .unwrap_or_else(|| panic!("{dotted} is an integer"))
}

#[test]
fn vissl_moco_configs_load_with_the_embedding_size_of_the_head() {
    for name in [
        "test/integration_test/quick_moco",
        "pretrain/moco/moco_1node_resnet",
    ] {
        let config = upstream(name);
        assert_eq!(raw(&config, "LOSS.name"), &Value::from("moco_loss"));
        assert_eq!(int(&config, "LOSS.moco_loss.embedding_dim"), 128, "{name}");
        assert_eq!(
            raw(&config, "DATA.TRAIN.COLLATE_FUNCTION"),
            &Value::from("moco_collator")
        );
    }
}

#[test]
fn vissl_dino_configs_load_with_prototypes_and_crops_inferred() {
    for (name, crops) in [
        ("test/integration_test/quick_dino", 2),
        ("pretrain/dino/dino_16gpus_deits16", 10),
    ] {
        let config = upstream(name);
        assert_eq!(config.model.trunk.name, "vision_transformer");
        assert_eq!(int(&config, "LOSS.dino_loss.output_dim"), 65536, "{name}");
        assert_eq!(int(&config, "LOSS.dino_loss.num_crops"), crops, "{name}");
        assert_eq!(
            int(&config, "MODEL.TRUNK.VISION_TRANSFORMERS.HIDDEN_DIM"),
            384
        );
        assert_eq!(
            raw(&config, "DATA.TRAIN.COLLATE_FUNCTION"),
            &Value::from("multicrop_collator")
        );
    }
}

#[test]
fn vissl_barlow_twins_configs_load_with_their_lars_options() {
    // Both files train with VISSL's `lars` optimizer and its own option `exclude_bias_and_norm`,
    // which VISSL's defaults do not list; ours do, with LARS's `eta`.
    for name in [
        "test/integration_test/quick_barlow_twins",
        "pretrain/barlow_twins/barlow_twins_4node_resnet",
    ] {
        let config = upstream(name);
        assert_eq!(
            raw(&config, "OPTIMIZER.name"),
            &Value::from("lars"),
            "{name}"
        );
        assert_eq!(
            raw(&config, "OPTIMIZER.exclude_bias_and_norm"),
            &Value::from(true),
            "{name}"
        );
        assert_eq!(raw(&config, "OPTIMIZER.eta"), &Value::from(0.001), "{name}");
    }
}
