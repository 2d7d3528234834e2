//! `vissl bench data`: images/s of the configured DATA.TRAIN pipeline, beside the same transforms run by
//! torchvision + PIL DataLoader workers (`bench/torchvision_reference.py`), with the ratio of the two.

use crate::data;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vissl_crds::config::default_configs_root;

/// Options of `vissl bench data`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Seconds to measure each pipeline (after one warm-up batch).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    /// Worker threads (ours) and worker processes (reference); default DATA.NUM_DATALOADER_WORKERS.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Skip the torchvision reference run.
    #[arg(long)]
    pub no_reference: bool,
    /// Python with torch + torchvision for the reference (`make setup-bench` makes `.venv-bench`).
    #[arg(
        long,
        env = "VISSL_BENCH_PYTHON",
        default_value = ".venv-bench/bin/python"
    )]
    pub reference_python: PathBuf,
    /// The reference script.
    #[arg(long, default_value = "bench/torchvision_reference.py")]
    pub reference_script: PathBuf,
    /// Print one JSON line instead of sentences.
    #[arg(long)]
    pub json: bool,
    /// `config=...` and `config.KEY=VALUE` overrides, in order.
    #[arg(value_name = "OVERRIDES")]
    pub overrides: Vec<String>,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub images_per_s: f64,
    /// Images per CPU-second of the whole process: the per-core rate, independent of other load.
    pub images_per_cpu_s: f64,
    pub workers: usize,
    pub images: u64,
    pub seconds: f64,
    pub cpu_seconds: f64,
}

/// User + system CPU seconds of this process (all threads), from /proc/self/stat as the reference reads it.
fn process_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/stat layout"))
    };
    // Linux reports these in USER_HZ, which is 100 on every architecture we build for.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

#[derive(Debug, Serialize)]
struct Report {
    config: String,
    ours: Throughput,
    reference: Option<serde_json::Value>,
    ratio: Option<f64>,
}

/// Pull batches from our loader for `seconds` after a warm-up batch; count source images.
fn measure_ours(
    config: &vissl_crds::config::Config,
    workers: usize,
    seconds: f64,
) -> Result<Throughput> {
    let mut data_cfg = config.data.clone();
    data_cfg.num_dataloader_workers = workers;
    let split = &data_cfg.train;
    let catalog = default_configs_root().join("dataset_catalog.json");
    let pipeline =
        data::SplitPipeline::from_config("TRAIN", split, &catalog, 1, 0, config.seed_value)
            .context("building the DATA.TRAIN pipeline")?;
    let budget = Duration::from_secs_f64(seconds);
    let mut images = 0u64;
    let mut started: Option<Instant> = None;
    let mut cpu_started = 0.0;
    let mut epoch = 0u64;
    'outer: loop {
        let loader = pipeline.loader(&data_cfg, config.seed_value, epoch, 0, tch::Device::Cpu)?;
        let mut produced_any = false;
        for batch in loader {
            let batch = batch?;
            produced_any = true;
            let n = batch.num_samples as u64;
            match started {
                // The first batch pays for thread start-up and cold caches on both sides; it is not counted.
                None => {
                    started = Some(Instant::now());
                    cpu_started = process_cpu_seconds()?;
                }
                Some(t0) => {
                    images += n;
                    if t0.elapsed() >= budget {
                        break 'outer;
                    }
                }
            }
        }
        if !produced_any {
            bail!("DATA.TRAIN produced no batch (dataset smaller than one batch with DROP_LAST?)");
        }
        epoch += 1;
    }
    let secs = started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    let cpu = process_cpu_seconds()? - cpu_started;
    Ok(Throughput {
        images_per_s: images as f64 / secs.max(1e-9),
        images_per_cpu_s: images as f64 / cpu.max(1e-9),
        workers,
        images,
        seconds: secs,
        cpu_seconds: cpu,
    })
}

fn run_reference(args: &Args, resolved_config: &Path, workers: usize) -> Result<serde_json::Value> {
    if !args.reference_python.exists() {
        bail!(
            "reference interpreter {} not found: run `make setup-bench` (or pass --no-reference)",
            args.reference_python.display()
        );
    }
    let output = Command::new(&args.reference_python)
        .arg(&args.reference_script)
        .arg("--config")
        .arg(resolved_config)
        .args([
            "--workers",
            &workers.to_string(),
            "--seconds",
            &args.seconds.to_string(),
            "--json",
        ])
        .output()
        .with_context(|| format!("running {}", args.reference_script.display()))?;
    if !output.status.success() {
        bail!(
            "reference run failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last).with_context(|| format!("reference printed no JSON line: {stdout}"))
}

/// Run the benchmark and print both numbers and their ratio.
pub fn run(args: &Args) -> Result<()> {
    let config = super::load_config(&args.overrides)?;
    let workers = args
        .workers
        .unwrap_or(config.data.num_dataloader_workers)
        .max(1);
    let ours = measure_ours(&config, workers, args.seconds)?;
    let (reference, ratio) = if args.no_reference {
        (None, None)
    } else {
        let resolved = tempfile::Builder::new().suffix(".yaml").tempfile()?;
        std::fs::write(resolved.path(), config.to_yaml())?;
        let reference = run_reference(args, resolved.path(), workers)?;
        let theirs = reference
            .get("images_per_cpu_s")
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::NAN);
        (Some(reference), Some(ours.images_per_cpu_s / theirs))
    };
    let report = Report {
        config: args.overrides.join(" "),
        ours,
        reference,
        ratio,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let o = &report.ours;
    println!(
        "vissl-rs:    {:7.1} images/s wall, {:7.1} images per CPU-second ({} worker threads, {} images, {:.1} s, {:.1} CPU-s)",
        o.images_per_s, o.images_per_cpu_s, o.workers, o.images, o.seconds, o.cpu_seconds
    );
    if let (Some(reference), Some(ratio)) = (&report.reference, report.ratio) {
        let get = |k: &str| {
            reference
                .get(k)
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN)
        };
        println!(
            "torchvision: {:7.1} images/s wall, {:7.1} images per CPU-second ({workers} DataLoader worker processes, {:.0} images, {:.1} s, {:.1} CPU-s)",
            get("images_per_s"),
            get("images_per_cpu_s"),
            get("images"),
            get("seconds"),
            get("cpu_seconds")
        );
        println!("per-core ratio: {ratio:.2}x (images per CPU-second; same transforms, same JPEGs, same worker count)");
    }
    Ok(())
}
