//! `vissl benchmark knn`: weighted kNN on frozen features (VISSL's nearest_neighbor_test), optionally beside
//! the two references every claim of "it learned" needs: a randomly initialised network of the same shape,
//! and the raw pixels. Weights come from a path or an object-store URL; with a world of more than one
//! process (the `vissl train` launcher and pod contract) each rank extracts its shard of both splits and
//! rank 0, holding the gathered features, computes the accuracies and writes the results.

use crate::benchmarks::knn::{self, KnnParams};
use crate::benchmarks::report::{self, BenchmarkReport, KnnResult, TerminationMessage};
use crate::benchmarks::weights;
use crate::data::SplitPipeline;
use crate::dist::{self, launcher::Role, Session};
use crate::engine::{self, extract};
use crate::storage::{self, Location, Storage, StorageSettings};
use anyhow::{anyhow, bail, Context, Result};
use std::path::PathBuf;
use std::time::Instant;
use vissl_crds::config::{default_configs_root, Backend, Config};

/// Options of `vissl benchmark knn`.
#[derive(clap::Args, Debug, Clone)]
pub struct KnnArgs {
    /// Also evaluate a randomly initialised model of the same shape and the raw input pixels.
    #[arg(long)]
    pub baselines: bool,
    /// Evaluate a random network instead of trained weights (no checkpoint needed).
    #[arg(long)]
    pub random_init: bool,
    /// Where to write the results as JSON, a path or an object-store URL (`s3://bucket/run/knn.json`);
    /// default `<CHECKPOINT.DIR>/knn_results.json`.
    #[arg(long, value_name = "PATH_OR_URL")]
    pub output: Option<String>,
    /// Also write a compact JSON summary here on success (at most 4096 bytes, rows dropped from the end
    /// beyond): the Kubernetes termination message.
    #[arg(long, value_name = "PATH", env = "VISSL_TERMINATION_MESSAGE_PATH")]
    pub termination_message: Option<PathBuf>,
    /// Also save the extracted features (all ranks' together) to this folder, as
    /// `engine_name=extract_features` writes them (`<split>_<layer>.safetensors`).
    #[arg(long, value_name = "DIR")]
    pub save_features: Option<PathBuf>,
    /// Run as one rank of a distributed run; the launcher sets this (with RANK, WORLD_SIZE, ...).
    #[arg(long, hide = true, env = dist::launcher::WORKER_ENV)]
    pub dist_worker: bool,
    /// `config=...` and `config.KEY=VALUE` overrides, in order.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

struct Splits {
    train: SplitPipeline,
    test: SplitPipeline,
}

fn build_splits(config: &Config, world_size: usize, rank: usize) -> Result<Splits> {
    let catalog = default_configs_root().join("dataset_catalog.json");
    if config.data.test.data_sources.is_empty() {
        bail!("kNN needs DATA.TEST (the query images); DATA.TEST.DATA_SOURCES is empty");
    }
    let split = |name: &str, cfg| {
        SplitPipeline::from_config(name, cfg, &catalog, world_size, rank, config.seed_value)
            .with_context(|| format!("DATA.{name}"))
    };
    Ok(Splits {
        train: split("TRAIN", &config.data.train)?,
        test: split("TEST", &config.data.test)?,
    })
}

fn params_for(config: &Config, k: usize) -> KnnParams {
    KnnParams {
        topk: k as i64,
        sigma: config.nearest_neighbor.sigma,
        l2_norm: config.nearest_neighbor.l2_norm_feats,
        ..KnnParams::default()
    }
}

/// What one benchmark process is and does.
struct Run<'a> {
    config: &'a Config,
    args: &'a KnnArgs,
    splits: Splits,
    device: tch::Device,
    session: Option<Session>,
}

impl Run<'_> {
    fn is_primary(&self) -> bool {
        self.session.as_ref().is_none_or(Session::is_primary)
    }

    /// Features of one split: this process's shard, gathered from every rank in a distributed run.
    fn features(
        &self,
        model: &crate::models::BaseSslModel,
        split: &SplitPipeline,
        layer: &extract::Layer,
    ) -> Result<extract::SplitFeatures> {
        let data = &self.config.data;
        let local = extract::extract_split(
            model,
            split,
            data,
            self.config.seed_value,
            self.device,
            layer,
        )?;
        // NCCL collects GPU tensors only; Gloo gathers the CPU copies.
        let collective_device = match self.config.distributed.backend {
            Backend::Nccl => self.device,
            Backend::Gloo => tch::Device::Cpu,
        };
        match &self.session {
            None => Ok(local),
            Some(session) => extract::gather_split(&local, session.group(), collective_device)
                .with_context(|| format!("gathering the {} features", split.dataset.split())),
        }
    }

    /// kNN accuracies of `model`'s `layer` for every `k` (rank 0 only; `None` on the others).
    fn evaluate(
        &self,
        model: &crate::models::BaseSslModel,
        layer: &extract::Layer,
        label: &str,
        layer_name: &str,
    ) -> Result<Option<(Vec<KnnResult>, [usize; 2])>> {
        let started = Instant::now();
        let train = self.features(model, &self.splits.train, layer)?;
        let test = self.features(model, &self.splits.test, layer)?;
        if !self.is_primary() {
            return Ok(None);
        }
        if let Some(dir) = &self.args.save_features {
            for (split, f) in [("train", &train), ("test", &test)] {
                extract::save_features(dir, split, &format!("{label}_{layer_name}"), f)?;
            }
        }
        let num_classes = train
            .labels
            .max()
            .int64_value(&[])
            .max(test.labels.max().int64_value(&[]))
            + 1;
        let mut rows = Vec::new();
        for k in self.config.nearest_neighbor.topk.values() {
            let accuracy = knn::evaluate(
                &train.features,
                &train.labels,
                &test.features,
                &test.labels,
                num_classes,
                &params_for(self.config, k),
            )?;
            tracing::info!(
                features = label,
                k,
                top1 = accuracy.top1,
                top5 = accuracy.top5,
                seconds = started.elapsed().as_secs_f64(),
                "kNN"
            );
            rows.push(KnnResult {
                features: label.to_string(),
                layer: layer_name.to_string(),
                k,
                top1: accuracy.top1,
                top5: accuracy.top5,
            });
        }
        let sizes = [train.labels.size()[0], test.labels.size()[0]].map(|n| n as usize);
        Ok(Some((rows, sizes)))
    }
}

/// Run the kNN benchmark and print (and save) its accuracies. A world of more than one process makes
/// this the node's launcher, which re-runs the same command as its workers.
pub fn knn(args: &KnnArgs) -> Result<()> {
    let config = super::load_config(&args.overrides)?;
    match dist::launcher::role(&config, args.dist_worker)? {
        Role::InProcess => run(&config, args, None),
        Role::Launch(plan) => Ok(dist::launcher::launch(&plan)?),
        Role::Worker(env) => {
            dist::launcher::apply_thread_settings();
            let session = Session::connect(&env, &config)?;
            run(&config, args, Some(session))
        }
    }
}

/// CHECKPOINT.DIR as a location, for the default output and the fallback weights.
fn checkpoint_dir(config: &Config) -> Result<Location> {
    Location::parse(&config.checkpoint.dir).context("CHECKPOINT.DIR")
}

fn run(config: &Config, args: &KnnArgs, session: Option<Session>) -> Result<()> {
    let started = Instant::now();
    storage::configure(StorageSettings::from_config(&config.storage));
    let (world_size, rank) = session
        .as_ref()
        .map_or((1, 0), |s| (s.world_size(), s.rank()));
    let output = match &args.output {
        Some(text) => Location::parse(text).context("--output")?,
        None => checkpoint_dir(config)?.join("knn_results.json"),
    };
    let device = match (engine::select_device(config)?, &session) {
        // Each rank of a node drives its own GPU.
        (tch::Device::Cuda(_), Some(s)) => tch::Device::Cuda(s.env().local_rank),
        (device, _) => device,
    };
    let run = Run {
        config,
        args,
        splits: build_splits(config, world_size, rank)?,
        device,
        session,
    };
    let layer_name = config.nearest_neighbor.features.layer_name.clone();
    let layer = extract::Layer::parse(&layer_name);
    let mut evaluated = Vec::new();
    let mut loaded = None;
    if !args.random_init {
        let (_vs, model) = engine::build_model(config, device)?;
        let source = match config.model.weights_init.params_file.as_str() {
            "" => config.checkpoint.dir.as_str(),
            set => set,
        };
        let hint = "set config.MODEL.WEIGHTS_INIT.PARAMS_FILE, or pass --random-init";
        let weights = weights::resolve(source)
            .with_context(|| format!("loading trained weights ({hint})"))?;
        engine::init_model_weights(&model, &weights.file).with_context(|| {
            format!("loading trained weights from {} ({hint})", weights.location)
        })?;
        tracing::info!(weights = %weights.location, "loaded trained weights");
        loaded = Some(weights.location.to_string());
        evaluated.push(run.evaluate(&model, &layer, "trained", &layer_name)?);
    }
    if args.baselines || args.random_init {
        tch::manual_seed(config.seed_value as i64);
        let (_vs, random) = engine::build_model(config, device)?;
        evaluated.push(run.evaluate(&random, &layer, "random_init", &layer_name)?);
    }
    if args.baselines {
        let (_vs, any) = engine::build_model(config, device)?;
        evaluated.push(run.evaluate(&any, &extract::Layer::Input, "raw_pixels", "input")?);
    }
    // Only rank 0 holds the gathered features and accuracies.
    let Some(evaluated) = evaluated.into_iter().collect::<Option<Vec<_>>>() else {
        return Ok(());
    };
    let [train_samples, test_samples] = evaluated.first().map_or([0, 0], |(_, sizes)| *sizes);
    let results: Vec<KnnResult> = evaluated.into_iter().flat_map(|(rows, _)| rows).collect();
    print_table(&results);
    let report = BenchmarkReport {
        benchmark: report::KNN.into(),
        weights: loaded,
        train_samples,
        test_samples,
        seconds: started.elapsed().as_secs_f64(),
        results,
    };
    write_report(&output, &report)?;
    println!("results: {output}");
    if let Some(path) = &args.termination_message {
        let message =
            TerminationMessage::new(report::KNN, Some(output.to_string()), &report.results)
                .to_json_within(report::TERMINATION_MESSAGE_LIMIT);
        std::fs::write(path, message)
            .with_context(|| format!("writing the termination message to {}", path.display()))?;
    }
    Ok(())
}

fn print_table(rows: &[KnnResult]) {
    println!(
        "{:<12} {:<9} {:>5} {:>8} {:>8}",
        "features", "layer", "k", "top-1", "top-5"
    );
    for r in rows {
        println!(
            "{:<12} {:<9} {:>5} {:>7.2}% {:>7.2}%",
            r.features, r.layer, r.k, r.top1, r.top5
        );
    }
}

/// Write the results file whole (one atomic put, on disk or to a store).
fn write_report(output: &Location, report: &BenchmarkReport) -> Result<()> {
    let folder = output
        .parent()
        .ok_or_else(|| anyhow!("--output {output}: names a bucket or root, not a file"))?;
    let json = serde_json::to_vec_pretty(report)?;
    Storage::open(&folder)
        .and_then(|f| f.put_bytes(&output.file_name(), json))
        .with_context(|| format!("writing the results to {output}"))
}
