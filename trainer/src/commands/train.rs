//! `vissl train`: train from a VISSL config, or extract features when `engine_name=extract_features`.

use crate::engine::{self, extract, RunOptions, Trainer};
use anyhow::{Context, Result};
use std::path::PathBuf;
use vissl_crds::config::EngineName;

/// Options of `vissl train`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Stop after this many iterations in total, checkpointing first (a planned preemption; resume with
    /// the same command).
    #[arg(long)]
    pub stop_after_iterations: Option<u64>,
    /// `config=...` and `config.KEY=VALUE` overrides, in order.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

/// Run training (or feature extraction) and report where the results are.
pub fn run(args: &Args) -> Result<()> {
    let config = super::load_config(&args.overrides)?;
    match config.engine_name {
        EngineName::Train => {
            let trainer = Trainer::new(
                config,
                RunOptions {
                    stop_after_iterations: args.stop_after_iterations,
                },
            )?;
            let summary = trainer.train()?;
            if let Some(ckpt) = summary.last_checkpoint {
                println!("checkpoint: {}", ckpt.display());
            }
            Ok(())
        }
        EngineName::ExtractFeatures => extract_features(config),
    }
}

fn extract_features(config: vissl_crds::config::Config) -> Result<()> {
    let device = engine::select_device(&config)?;
    let (_vs, model) = engine::build_initialised_model(&config, device)?;
    let out_dir = if config.extract_features.output_dir.is_empty() {
        PathBuf::from(&config.checkpoint.dir)
    } else {
        PathBuf::from(&config.extract_features.output_dir)
    };
    let layer_name = config.nearest_neighbor.features.layer_name.clone();
    let layer = extract::Layer::parse(&layer_name);
    let catalog = vissl_crds::config::default_configs_root().join("dataset_catalog.json");
    let mut splits = Vec::new();
    if !config.test_only {
        splits.push(("TRAIN", &config.data.train));
    }
    if config.test_model || config.test_only {
        splits.push(("TEST", &config.data.test));
    }
    for (name, split_cfg) in splits {
        if split_cfg.data_sources.is_empty() {
            continue;
        }
        let split = crate::data::SplitPipeline::from_config(
            name,
            split_cfg,
            &catalog,
            1,
            0,
            config.seed_value,
        )
        .with_context(|| format!("DATA.{name}"))?;
        let feats = extract::extract_split(
            &model,
            &split,
            &config.data,
            config.seed_value,
            device,
            &layer,
        )?;
        let path = extract::save_features(&out_dir, name, &layer_name, &feats)?;
        println!(
            "{name}: {} features of shape {:?} -> {}",
            feats.features.size()[0],
            feats.features.size(),
            path.display()
        );
    }
    Ok(())
}
