//! `vissl train`: train from a VISSL config, or extract features when `engine_name=extract_features`.

use crate::dist::{self, launcher::Role, Session};
use crate::engine::{self, extract, RunOptions, Trainer};
use anyhow::{Context, Result};
use std::path::PathBuf;
use vissl_crds::config::{Config, EngineName};

/// Options of `vissl train`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Stop after this many iterations in total, checkpointing first (a planned preemption; resume with
    /// the same command).
    #[arg(long)]
    pub stop_after_iterations: Option<u64>,
    /// Write the run summary (loss of every iteration, last checkpoint) as JSON to this file; in a
    /// distributed run rank 0 writes it, with losses averaged over ranks.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Run as one rank of a distributed run; the launcher sets this (with RANK, WORLD_SIZE, ...).
    #[arg(long, hide = true, env = "VISSL_DIST_WORKER")]
    pub dist_worker: bool,
    /// `config=...` and `config.KEY=VALUE` overrides, in order.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

/// Run training (or feature extraction) and report where the results are. A world of more than one
/// process makes this the node's launcher, which re-runs the same command as its workers.
pub fn run(args: &Args) -> Result<()> {
    let config = dist::launcher::load_config(&args.overrides)?;
    match config.engine_name {
        EngineName::Train => match dist::launcher::role(&config, args.dist_worker)? {
            Role::InProcess => train(config, args, None),
            Role::Launch(plan) => Ok(dist::launcher::launch(&plan)?),
            Role::Worker(env) => {
                dist::launcher::apply_thread_settings();
                let session = Session::connect(&env, &config)?;
                train(config, args, Some(session))
            }
        },
        EngineName::ExtractFeatures => extract_features(config),
    }
}

fn train(config: Config, args: &Args, session: Option<Session>) -> Result<()> {
    let primary = session.as_ref().is_none_or(Session::is_primary);
    let trainer = Trainer::new(
        config,
        RunOptions {
            stop_after_iterations: args.stop_after_iterations,
            distributed: session,
        },
    )?;
    let summary = trainer.train()?;
    if !primary {
        return Ok(());
    }
    if let Some(path) = &args.summary_json {
        let json = serde_json::json!({
            "iterations": summary.iterations,
            "losses": summary.losses,
            "last_checkpoint": summary.last_checkpoint,
            "test_meters": summary.test_meters,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing the run summary to {}", path.display()))?;
    }
    if let Some(ckpt) = summary.last_checkpoint {
        println!("checkpoint: {}", ckpt.display());
    }
    Ok(())
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
