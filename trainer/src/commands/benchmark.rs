//! `vissl benchmark knn`: weighted kNN on frozen features (VISSL's nearest_neighbor_test), optionally beside
//! the two references every claim of "it learned" needs: a randomly initialised network of the same shape,
//! and the raw pixels.

use crate::benchmarks::knn::{self, KnnAccuracy, KnnParams};
use crate::data::SplitPipeline;
use crate::engine::{self, extract};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use vissl_crds::config::{default_configs_root, Config};

/// Options of `vissl benchmark knn`.
#[derive(clap::Args, Debug, Clone)]
pub struct KnnArgs {
    /// Also evaluate a randomly initialised model of the same shape and the raw input pixels.
    #[arg(long)]
    pub baselines: bool,
    /// Evaluate a random network instead of trained weights (no checkpoint needed).
    #[arg(long)]
    pub random_init: bool,
    /// Where to write the results as JSON (default `<CHECKPOINT.DIR>/knn_results.json`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// `config=...` and `config.KEY=VALUE` overrides, in order.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Row {
    features: String,
    layer: String,
    k: usize,
    #[serde(flatten)]
    accuracy: KnnAccuracy,
}

struct Splits {
    train: SplitPipeline,
    test: SplitPipeline,
}

fn build_splits(config: &Config) -> Result<Splits> {
    let catalog = default_configs_root().join("dataset_catalog.json");
    if config.data.test.data_sources.is_empty() {
        bail!("kNN needs DATA.TEST (the query images); DATA.TEST.DATA_SOURCES is empty");
    }
    let train = SplitPipeline::from_config(
        "TRAIN",
        &config.data.train,
        &catalog,
        1,
        0,
        config.seed_value,
    )
    .context("DATA.TRAIN")?;
    let test =
        SplitPipeline::from_config("TEST", &config.data.test, &catalog, 1, 0, config.seed_value)
            .context("DATA.TEST")?;
    Ok(Splits { train, test })
}

fn params_for(config: &Config, k: usize) -> KnnParams {
    KnnParams {
        topk: k as i64,
        sigma: config.nearest_neighbor.sigma,
        l2_norm: config.nearest_neighbor.l2_norm_feats,
        ..KnnParams::default()
    }
}

fn evaluate(
    config: &Config,
    splits: &Splits,
    model: &crate::models::BaseSslModel,
    device: tch::Device,
    layer: &extract::Layer,
    label: &str,
    layer_name: &str,
) -> Result<Vec<Row>> {
    let started = std::time::Instant::now();
    let train = extract::extract_split(
        model,
        &splits.train,
        &config.data,
        config.seed_value,
        device,
        layer,
    )?;
    let test = extract::extract_split(
        model,
        &splits.test,
        &config.data,
        config.seed_value,
        device,
        layer,
    )?;
    let num_classes = train
        .labels
        .max()
        .int64_value(&[])
        .max(test.labels.max().int64_value(&[]))
        + 1;
    let mut rows = Vec::new();
    for k in config.nearest_neighbor.topk.values() {
        let accuracy = knn::evaluate(
            &train.features,
            &train.labels,
            &test.features,
            &test.labels,
            num_classes,
            &params_for(config, k),
        )?;
        tracing::info!(
            features = label,
            k,
            top1 = accuracy.top1,
            top5 = accuracy.top5,
            seconds = started.elapsed().as_secs_f64(),
            "kNN"
        );
        rows.push(Row {
            features: label.to_string(),
            layer: layer_name.to_string(),
            k,
            accuracy,
        });
    }
    Ok(rows)
}

/// Run the kNN benchmark and print (and save) its accuracies.
pub fn knn(args: &KnnArgs) -> Result<()> {
    let config = super::load_config(&args.overrides)?;
    let device = engine::select_device(&config)?;
    let splits = build_splits(&config)?;
    let layer_name = config.nearest_neighbor.features.layer_name.clone();
    let layer = extract::Layer::parse(&layer_name);
    let mut rows = Vec::new();
    if !args.random_init {
        let (_vs, model) = engine::build_model(&config, device)?;
        let source = if config.model.weights_init.params_file.is_empty() {
            PathBuf::from(&config.checkpoint.dir)
        } else {
            PathBuf::from(&config.model.weights_init.params_file)
        };
        engine::init_model_weights(&model, &source).with_context(|| {
            format!(
                "loading trained weights from {} (set config.MODEL.WEIGHTS_INIT.PARAMS_FILE, or pass --random-init)",
                source.display()
            )
        })?;
        rows.extend(evaluate(
            &config,
            &splits,
            &model,
            device,
            &layer,
            "trained",
            &layer_name,
        )?);
    }
    if args.baselines || args.random_init {
        tch::manual_seed(config.seed_value as i64);
        let (_vs, random) = engine::build_model(&config, device)?;
        rows.extend(evaluate(
            &config,
            &splits,
            &random,
            device,
            &layer,
            "random_init",
            &layer_name,
        )?);
    }
    if args.baselines {
        let (_vs, any) = engine::build_model(&config, device)?;
        rows.extend(evaluate(
            &config,
            &splits,
            &any,
            device,
            &extract::Layer::Input,
            "raw_pixels",
            "input",
        )?);
    }
    println!(
        "{:<12} {:<9} {:>5} {:>8} {:>8}",
        "features", "layer", "k", "top-1", "top-5"
    );
    for r in &rows {
        println!(
            "{:<12} {:<9} {:>5} {:>7.2}% {:>7.2}%",
            r.features, r.layer, r.k, r.accuracy.top1, r.accuracy.top5
        );
    }
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(&config.checkpoint.dir).join("knn_results.json"));
    if let Some(parent) = output.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    std::fs::write(&output, serde_json::to_string_pretty(&rows)?)
        .with_context(|| format!("writing {}", output.display()))?;
    println!("results: {}", output.display());
    Ok(())
}
