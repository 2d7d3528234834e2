//! `vissl bench dist`: what data parallelism costs on one machine.
//!
//! Runs the configured training at one global batch three ways, each in fresh processes: 1 rank with
//! `--threads` intra-op threads; `--threads` ranks with 1 thread each (DDP's Reducer overlapping the
//! gradient all-reduce with backward); and the same ranks with `MANUAL_GRADIENT_REDUCTION`, whose
//! all-reduce runs after backward and so is timed on its own. Each prints images/s and where an
//! iteration's time goes: data wait, forward (+ loss), backward, explicit all-reduce, optimizer step,
//! and the small collectives (buffer broadcast, loss averaging). The loader threads
//! (`DATA.NUM_DATALOADER_WORKERS`) are split between ranks too, so every setup gets the same cores.

use super::launcher::{self, Role};
use super::{DataParallel, Session};
use crate::engine::hooks::Hook;
use crate::engine::Task;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use vissl_crds::config::Config;

/// Options of `vissl bench dist`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Timed iterations per setup.
    #[arg(long, default_value_t = 20)]
    pub iterations: u64,
    /// Untimed iterations first (thread pools, allocator, DDP's bucket rebuild).
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Cores to share: the single rank gets this many threads, and this many ranks get one each.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Also write the measurements as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Internal: measure one setup and write its result here.
    #[arg(long, hide = true)]
    pub measure_out: Option<PathBuf>,
    /// Internal: set by the launcher in worker processes.
    #[arg(long, hide = true, env = "VISSL_DIST_WORKER")]
    pub dist_worker: bool,
    /// `config=...` and `config.KEY=VALUE` overrides (the global batch is BATCHSIZE_PER_REPLICA).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "OVERRIDES"
    )]
    pub overrides: Vec<String>,
}

/// Mean milliseconds per timed iteration of each part of a step (rank 0's view).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepSplit {
    /// Waiting for the next batch.
    pub data_wait: f64,
    /// Forward pass and loss.
    pub forward: f64,
    /// Backward pass (with the overlapped all-reduce, when DDP overlaps it).
    pub backward: f64,
    /// Gradient all-reduce run after backward (manual reduction).
    pub grad_all_reduce: f64,
    /// Optimizer step.
    pub optimizer: f64,
    /// Broadcast of buffers from rank 0 (BROADCAST_BUFFERS).
    pub buffer_broadcast: f64,
    /// Waiting for the logged loss to be averaged over ranks.
    pub loss_all_reduce: f64,
}

/// One setup's measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// The setup, for people.
    pub label: String,
    /// Ranks.
    pub world_size: usize,
    /// Intra-op threads of each rank.
    pub threads_per_rank: usize,
    /// Images per rank per iteration.
    pub batch_per_rank: usize,
    /// Timed iterations.
    pub iterations: u64,
    /// Wall time of the timed iterations.
    pub wall_s: f64,
    /// Source images per second over all ranks.
    pub images_per_s: f64,
    /// Where an iteration's time goes.
    pub ms_per_iteration: StepSplit,
}

/// `vissl bench dist`.
pub fn run(args: &Args) -> Result<()> {
    if let Some(out) = &args.measure_out {
        return measure_role(args, out);
    }
    let config = launcher::load_config(&args.overrides)?;
    let threads = args.threads.max(1);
    let global_batch = config.data.train.batchsize_per_replica;
    if global_batch % threads != 0 {
        bail!(
            "DATA.TRAIN.BATCHSIZE_PER_REPLICA {global_batch} (the global batch) must divide by --threads {threads}"
        );
    }
    let loader_workers = config.data.num_dataloader_workers;
    let dir = tempfile::tempdir()?;
    let setups = [
        (format!("1 rank x {threads} threads"), 1, threads, false),
        (
            format!("{threads} ranks x 1 thread, DDP overlapped"),
            threads,
            1,
            false,
        ),
        (
            format!("{threads} ranks x 1 thread, all-reduce after backward"),
            threads,
            1,
            true,
        ),
    ];
    let mut results = Vec::new();
    for (i, (label, ranks, threads_per_rank, manual)) in setups.iter().enumerate() {
        let out = dir.path().join(format!("setup{i}.json"));
        let mut extra = vec![
            format!("config.DISTRIBUTED.NUM_NODES=1"),
            format!("config.DISTRIBUTED.NUM_PROC_PER_NODE={ranks}"),
            format!(
                "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={}",
                global_batch / ranks
            ),
            format!(
                "config.DATA.NUM_DATALOADER_WORKERS={}",
                (loader_workers / ranks).max(1)
            ),
            format!("config.DISTRIBUTED.MANUAL_GRADIENT_REDUCTION={manual}"),
        ];
        let mut overrides = args.overrides.clone();
        overrides.append(&mut extra);
        eprintln!("measuring: {label} ...");
        let status = Command::new(std::env::current_exe()?)
            .args(["bench", "dist"])
            .arg("--measure-out")
            .arg(&out)
            .args(["--iterations", &args.iterations.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(&overrides)
            .env("OMP_NUM_THREADS", threads_per_rank.to_string())
            .env("VISSL_BENCH_LABEL", label)
            .env_remove(launcher::WORKER_ENV)
            .status()
            .context("starting a measurement")?;
        if !status.success() {
            bail!(
                "measuring `{label}` failed: {}",
                launcher::describe_exit(status)
            );
        }
        let text = std::fs::read_to_string(&out)
            .with_context(|| format!("reading the result of `{label}`"))?;
        results.push(serde_json::from_str::<Measurement>(&text)?);
    }
    print_table(&results);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(results: &[Measurement]) {
    let base = results.first().map_or(1.0, |m| m.images_per_s.max(1e-9));
    println!(
        "{:<48} {:>7} {:>6} | ms/iter: {:>5} {:>7} {:>8} {:>10} {:>5} {:>6} {:>5}",
        "setup",
        "img/s",
        "vs 1x",
        "data",
        "forward",
        "backward",
        "all-reduce",
        "optim",
        "bcast",
        "loss"
    );
    for m in results {
        let s = &m.ms_per_iteration;
        println!(
            "{:<48} {:>7.1} {:>5.0}% | ms/iter: {:>5.1} {:>7.1} {:>8.1} {:>10.1} {:>5.1} {:>6.1} {:>5.1}",
            m.label,
            m.images_per_s,
            100.0 * m.images_per_s / base,
            s.data_wait,
            s.forward,
            s.backward,
            s.grad_all_reduce,
            s.optimizer,
            s.buffer_broadcast,
            s.loss_all_reduce
        );
    }
    if let [_, overlapped, manual] = results {
        println!(
            "overlapped all-reduce cost inside backward ~ {:.1} ms/iter (backward with DDP hooks minus backward alone)",
            overlapped.ms_per_iteration.backward - manual.ms_per_iteration.backward
        );
    }
}

/// A measurement process: in-process for one rank, else launcher or worker of a multi-rank setup.
fn measure_role(args: &Args, out: &Path) -> Result<()> {
    let config = launcher::load_config(&args.overrides)?;
    match launcher::role(&config, args.dist_worker)? {
        Role::InProcess => measure(config, None, args, out),
        Role::Launch(plan) => Ok(launcher::launch(&plan)?),
        Role::Worker(env) => {
            launcher::apply_thread_settings();
            let session = Session::connect(&env, &config)?;
            measure(config, Some(session), args, out)
        }
    }
}

/// Accumulated time per step part.
#[derive(Default)]
struct Totals {
    data_wait: Duration,
    forward: Duration,
    backward: Duration,
    optimizer: Duration,
}

fn measure(config: Config, session: Option<Session>, args: &Args, out: &Path) -> Result<()> {
    let world = session.as_ref().map_or(1, Session::world_size);
    let primary = session.as_ref().is_none_or(Session::is_primary);
    let threads_per_rank = tch::get_num_threads().max(1) as usize;
    let batch_per_rank = config.data.train.batchsize_per_replica;
    let mut task = Task::with_session(config, session.clone())?;
    let mut ddp = match &session {
        Some(s) => Some(DataParallel::new(&task, s)?),
        None => None,
    };
    if let Some(d) = ddp.as_mut() {
        d.on_start(&mut task)?;
    }
    // A fixed small learning rate: the benchmark measures time, not learning.
    let lr = 1e-3;
    let total = args.warmup + args.iterations;
    let mut totals = Totals::default();
    let mut timed_start = None;
    let mut comm_at_start = ddp.as_ref().map(|d| d.timings).unwrap_or_default();
    let mut done = 0u64;
    let mut epoch = 0u64;
    while done < total {
        let mut loader = task.train_data.loader(
            &task.config.data,
            task.config.seed_value,
            epoch,
            0,
            task.device,
        )?;
        loop {
            if done == args.warmup && timed_start.is_none() {
                timed_start = Some(Instant::now());
                totals = Totals::default();
                comm_at_start = ddp.as_ref().map(|d| d.timings).unwrap_or_default();
            }
            if done >= total {
                break;
            }
            let t0 = Instant::now();
            let Some(batch) = loader.next() else { break };
            let batch = batch?;
            let t1 = Instant::now();
            task.last_output = task.forward(&batch, true)?;
            if let Some(d) = ddp.as_mut() {
                d.on_forward(&mut task)?;
            }
            let target = Tensor::zeros([0], (Kind::Int64, task.device));
            let loss = task.loss.forward(&task.last_output, &target)?;
            task.last_loss = loss.double_value(&[]);
            if let Some(d) = ddp.as_mut() {
                d.on_loss_and_meter(&mut task)?;
            }
            task.optimizer.zero_grad();
            let t2 = Instant::now();
            loss.f_backward()?;
            if let Some(d) = ddp.as_mut() {
                d.on_backward(&mut task)?;
            }
            let t3 = Instant::now();
            task.optimizer.step(lr, lr)?;
            if let Some(d) = ddp.as_mut() {
                d.on_update(&mut task)?;
                d.on_step(&mut task)?;
            }
            let t4 = Instant::now();
            totals.data_wait += t1 - t0;
            totals.forward += t2 - t1;
            totals.backward += t3 - t2;
            totals.optimizer += t4 - t3;
            done += 1;
        }
        epoch += 1;
    }
    let wall = timed_start
        .ok_or_else(|| anyhow!("no timed iteration ran"))?
        .elapsed();
    if !primary {
        return Ok(());
    }
    let comm = ddp.as_ref().map(|d| d.timings).unwrap_or_default();
    let per_iter = |d: Duration| 1e3 * d.as_secs_f64() / args.iterations.max(1) as f64;
    let grad = comm.gradient_all_reduce - comm_at_start.gradient_all_reduce;
    let bcast = comm.buffer_broadcast - comm_at_start.buffer_broadcast;
    let loss_reduce = comm.loss_all_reduce - comm_at_start.loss_all_reduce;
    let measurement = Measurement {
        label: std::env::var("VISSL_BENCH_LABEL").unwrap_or_default(),
        world_size: world,
        threads_per_rank,
        batch_per_rank,
        iterations: args.iterations,
        wall_s: wall.as_secs_f64(),
        images_per_s: (args.iterations as f64 * (batch_per_rank * world) as f64)
            / wall.as_secs_f64().max(1e-9),
        ms_per_iteration: StepSplit {
            data_wait: per_iter(totals.data_wait),
            // The hook's collectives run inside these spans; report them on their own lines.
            forward: per_iter(totals.forward),
            backward: per_iter(totals.backward.saturating_sub(grad)),
            grad_all_reduce: per_iter(grad),
            optimizer: per_iter(totals.optimizer.saturating_sub(bcast + loss_reduce)),
            buffer_broadcast: per_iter(bcast),
            loss_all_reduce: per_iter(loss_reduce),
        },
    };
    std::fs::write(out, serde_json::to_string(&measurement)?)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
