//! The training engine, structured as VISSL's: a trainer builds a task (model, loss, optimizer, schedules,
//! data) from the config, then runs train phases (and test phases every TEST_EVERY_NUM_EPOCH) step by step,
//! calling the hooks at VISSL's nine events.

pub mod extract;
pub mod hooks;
pub mod meters;
pub mod progress;

use crate::checkpoint::writer::{CheckpointWriter, SaveOutcome};
use crate::checkpoint::{self, CheckpointDir, Position, Snapshot, TensorGroup};
use crate::data::{collators::Batch, SplitPipeline};
use crate::dist::{resume::RunLayout, DataParallel, Session};
use crate::losses::{self, Loss, LossContext, StepContext};
use crate::metrics::hook::MetricsHook;
use crate::models::{BaseSslModel, ModelParams};
use crate::optim::{GradClip, NamedParam, Optimizer, OptimizerParams};
use crate::storage::{self, Location, StorageSettings};
use crate::tensorboard::hook::TensorboardHook;
use anyhow::{anyhow, bail, Context, Result};
use hooks::{CheckNanHook, CheckpointHook, Hook, LogLossLrEtaHook};
use meters::AccuracyListMeter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{nn, Device, Tensor};
use vissl_crds::config::schedulers::{ParamScheduler, UpdateInterval};
use vissl_crds::config::{default_configs_root, Config};

/// Pauses (seconds) between further attempts at a run's final checkpoint when its save failed.
pub const FINAL_SAVE_RETRY_PAUSES: [u64; 5] = [1, 2, 4, 8, 16];

/// Train or test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Train,
    Test,
}

impl Phase {
    /// `train` / `test`, as VISSL names phases.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Train => "train",
            Phase::Test => "test",
        }
    }
}

/// Options of a run that are not part of the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop (after checkpointing) once this many iterations are done: a planned preemption, for testing
    /// resume and for time-boxed runs.
    pub stop_after_iterations: Option<u64>,
    /// This process's rank in a multi-process run (None: a single process).
    pub distributed: Option<Session>,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Loss of every training iteration this process ran, in order, with its iteration number.
    pub losses: Vec<(u64, f64)>,
    /// Iterations done in total (including those before a resume).
    pub iterations: u64,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<Location>,
    /// Test-phase meter readings of the last test phase.
    pub test_meters: Vec<meters::AccuracyReading>,
}

/// Everything a run holds; hooks see and act on it.
pub struct Task {
    pub config: Config,
    pub device: Device,
    pub vs: nn::VarStore,
    pub model: BaseSslModel,
    pub loss: Box<dyn Loss>,
    pub optimizer: Optimizer,
    lr_schedule: Box<dyn ParamScheduler>,
    lr_head_schedule: Box<dyn ParamScheduler>,
    /// `param_schedulers.weight_decay`, when the config schedules it (DINO).
    weight_decay_schedule: Option<Box<dyn ParamScheduler>>,
    pub train_data: SplitPipeline,
    pub test_data: Option<SplitPipeline>,
    pub phase: Phase,
    pub iteration: u64,
    pub epoch: u64,
    pub iteration_in_epoch: u64,
    pub iterations_per_epoch: u64,
    pub num_epochs: u64,
    pub last_loss: f64,
    pub lr: f64,
    pub lr_head: f64,
    pub last_output: Vec<Tensor>,
    pub last_target: Option<Tensor>,
    pub meter: Option<AccuracyListMeter>,
    /// CHECKPOINT.DIR: a local folder or an object-store URL.
    pub checkpoint_dir: Location,
    /// The newest checkpoint known to be complete.
    pub last_checkpoint: Option<Location>,
    checkpoints: CheckpointWriter,
    /// Set by a hook (or the run options) to end the run after the current step.
    pub stop_requested: bool,
    /// Counters the logging hooks read.
    pub stats: RunStats,
    /// The distributed run this task is one rank of (None: a single process).
    pub session: Option<Session>,
}

/// Timing and throughput counters of the running phase.
#[derive(Debug, Clone)]
pub struct RunStats {
    /// (iteration, loss) of every training step this process ran.
    pub losses: Vec<(u64, f64)>,
    pub run_started: Instant,
    pub phase_started: Instant,
    /// Source images consumed in this phase.
    pub phase_images: u64,
    /// Time this phase spent waiting for the next batch.
    pub data_wait: Duration,
    /// Images replaced after a load failure in the last finished phase.
    pub images_replaced: u64,
    /// Checkpoint saves and their costs.
    pub checkpoints: CheckpointStats,
}

/// What checkpointing cost and where it stands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointStats {
    /// Iteration of the newest complete checkpoint.
    pub last_iteration: Option<u64>,
    /// Time the last save held up training (snapshot, plus waiting for the save before it).
    pub last_stall_seconds: f64,
    /// Serialising the last completed checkpoint.
    pub last_write_seconds: f64,
    /// Making the last completed checkpoint visible (renames or uploads, and its manifest).
    pub last_upload_seconds: f64,
    /// Size of the last completed checkpoint.
    pub last_bytes: u64,
    /// Saves completed and failed so far in this process.
    pub completed: u64,
    pub failed: u64,
}

impl RunStats {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            losses: Vec::new(),
            run_started: now,
            phase_started: now,
            phase_images: 0,
            data_wait: Duration::ZERO,
            images_replaced: 0,
            checkpoints: CheckpointStats::default(),
        }
    }

    fn start_phase(&mut self) {
        self.phase_started = Instant::now();
        self.phase_images = 0;
        self.data_wait = Duration::ZERO;
    }
}

/// The device MACHINE.DEVICE asks for; a GPU request without a GPU is an error with the fix.
pub fn select_device(config: &Config) -> Result<Device> {
    use vissl_crds::config::Device as Want;
    match config.machine.device {
        Want::Cpu => Ok(Device::Cpu),
        Want::Gpu if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        Want::Gpu => bail!(
            "MACHINE.DEVICE is gpu but no CUDA device is available; run with config.MACHINE.DEVICE=cpu"
        ),
    }
}

/// The raw (resolved) subtree of a top-level config group, for the modules that read VISSL's YAML.
pub fn raw_group<'a>(config: &'a Config, group: &str) -> Result<&'a serde_yaml::Value> {
    config
        .raw
        .get(group)
        .ok_or_else(|| anyhow!("resolved config has no `{group}` group"))
}

/// Build the model of `config` on `device`, randomly initialised from the global seed.
pub fn build_model(config: &Config, device: Device) -> Result<(nn::VarStore, BaseSslModel)> {
    let params = ModelParams::from_yaml(raw_group(config, "MODEL")?).context("MODEL")?;
    let vs = nn::VarStore::new(device);
    let model = BaseSslModel::new(&vs, &params).context("building the model")?;
    Ok((vs, model))
}

/// [`build_model`], then MODEL.WEIGHTS_INIT.PARAMS_FILE when it is set.
pub fn build_initialised_model(
    config: &Config,
    device: Device,
) -> Result<(nn::VarStore, BaseSslModel)> {
    let (vs, model) = build_model(config, device)?;
    let source = &config.model.weights_init.params_file;
    if !source.is_empty() {
        init_model_weights(&model, Path::new(source))?;
    }
    Ok((vs, model))
}

/// The single input tensor of a batch (multi-crop batches go through `forward_multi_res` instead).
fn batch_input(batch: &Batch) -> Result<&Tensor> {
    batch
        .data
        .first()
        .ok_or_else(|| anyhow!("collated batch has no `data` tensor"))
}

impl Task {
    /// Build the task from a resolved config (model initialised from SEED_VALUE).
    pub fn new(config: Config) -> Result<Self> {
        Self::with_session(config, None)
    }

    /// Build the task of one rank of a distributed run (`None`: a single process).
    pub fn with_session(config: Config, session: Option<Session>) -> Result<Self> {
        tch::manual_seed(config.seed_value as i64);
        storage::configure(StorageSettings::from_config(&config.storage));
        // Before any data is read or step taken: a wrong URL, missing credentials or an unreachable
        // store fail here, naming CHECKPOINT.DIR.
        let checkpoint_dir = Location::parse(&config.checkpoint.dir).context("CHECKPOINT.DIR")?;
        let checkpoint_store = CheckpointDir::open(&checkpoint_dir)
            .and_then(|dir| dir.check_access().map(|_| dir))
            .context("CHECKPOINT.DIR")?;
        let device = match (select_device(&config)?, &session) {
            // Each rank of a node drives its own GPU.
            (Device::Cuda(_), Some(s)) => Device::Cuda(s.env().local_rank),
            (device, _) => device,
        };
        if let Some(session) = &session {
            session.install_sync_bn(&config)?;
        }
        let (vs, model) = build_initialised_model(&config, device)?;
        let opt_params =
            OptimizerParams::from_yaml(raw_group(&config, "OPTIMIZER")?).context("OPTIMIZER")?;
        let mut optimizer = Optimizer::new(
            NamedParam::trainable(model.trainable_parameters()),
            &opt_params,
        )
        .context("OPTIMIZER")?;
        optimizer.set_temp_frozen(&config.model.temp_frozen_params_iter_map)?;
        optimizer.set_grad_clip(GradClip::from_config(&config.model.grad_clip)?);
        let num_epochs = config.optimizer.num_epochs as u64;
        let schedules = &config.optimizer.param_schedulers;
        let lr_schedule = schedules
            .lr
            .build("OPTIMIZER.param_schedulers.lr", config.optimizer.num_epochs)?;
        let lr_head_schedule = schedules.lr_head.build(
            "OPTIMIZER.param_schedulers.lr_head",
            config.optimizer.num_epochs,
        )?;
        let weight_decay_schedule = schedules
            .others
            .get("weight_decay")
            .map(|s| {
                s.build(
                    "OPTIMIZER.param_schedulers.weight_decay",
                    config.optimizer.num_epochs,
                )
            })
            .transpose()?;
        let catalog = default_configs_root().join("dataset_catalog.json");
        let (world, rank) = session
            .as_ref()
            .map_or((1, 0), |s| (s.world_size(), s.rank()));
        let train_data = SplitPipeline::from_config(
            "TRAIN",
            &config.data.train,
            &catalog,
            world,
            rank,
            config.seed_value,
        )
        .context("DATA.TRAIN")?;
        let factory_config = config.clone();
        let loss_context = session
            .as_ref()
            .map_or_else(LossContext::single_process, Session::loss_context)
            .with_model_factory(Arc::new(move || build_model(&factory_config, device)));
        let loss_section =
            losses::with_num_train_samples(raw_group(&config, "LOSS")?, train_data.dataset.len());
        let loss = losses::build_loss(&loss_section, loss_context).context("LOSS")?;
        let test_configured = config.test_model && !config.data.test.data_sources.is_empty();
        let test_data = if test_configured {
            Some(
                SplitPipeline::from_config(
                    "TEST",
                    &config.data.test,
                    &catalog,
                    world,
                    rank,
                    config.seed_value,
                )
                .context("DATA.TEST")?,
            )
        } else {
            None
        };
        let iterations_per_epoch = train_data.batches_per_epoch() as u64;
        if iterations_per_epoch == 0 {
            bail!(
                "DATA.TRAIN yields no batch per epoch ({} samples, BATCHSIZE_PER_REPLICA {}, DROP_LAST {})",
                train_data.dataset.len(),
                config.data.train.batchsize_per_replica,
                config.data.train.drop_last
            );
        }
        let meter =
            (!config.meters.names.is_empty() || !config.meters.name.is_empty()).then(|| {
                let m = &config.meters.accuracy_list_meter;
                AccuracyListMeter::new(
                    m.topk_values.iter().map(|&k| k as i64).collect(),
                    m.meter_names.clone(),
                )
            });
        let keep = config.checkpoint.keep_last_k;
        let checkpoints = CheckpointWriter::new(
            checkpoint_store,
            (keep > 0).then_some(keep as usize),
            config.checkpoint.save_in_background,
        );
        Ok(Self {
            device,
            vs,
            model,
            loss,
            optimizer,
            lr_schedule,
            lr_head_schedule,
            weight_decay_schedule,
            train_data,
            test_data,
            phase: Phase::Train,
            iteration: 0,
            epoch: 0,
            iteration_in_epoch: 0,
            iterations_per_epoch,
            num_epochs,
            last_loss: 0.0,
            lr: 0.0,
            lr_head: 0.0,
            last_output: Vec::new(),
            last_target: None,
            meter,
            checkpoint_dir,
            last_checkpoint: None,
            checkpoints,
            stop_requested: false,
            stats: RunStats::new(),
            session,
            config,
        })
    }

    /// Iterations of the whole run.
    pub fn total_iterations(&self) -> u64 {
        self.num_epochs * self.iterations_per_epoch
    }

    /// Source images per second since the phase started.
    pub fn images_per_second(&self) -> f64 {
        self.stats.phase_images as f64 / self.stats.phase_started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Time to the end of training at the average step time of this process so far.
    pub fn eta(&self) -> Duration {
        let steps = self.stats.losses.len().max(1) as f64;
        let per_step = self.stats.run_started.elapsed().as_secs_f64() / steps;
        let left = self.total_iterations().saturating_sub(self.iteration) as f64;
        Duration::from_secs_f64((left * per_step).max(0.0))
    }

    fn schedule_where(&self, schedule: &dyn ParamScheduler) -> f64 {
        let w = match schedule.update_interval() {
            UpdateInterval::Step => self.iteration as f64 / self.total_iterations().max(1) as f64,
            UpdateInterval::Epoch => self.epoch as f64 / self.num_epochs.max(1) as f64,
        };
        // Schedules are defined on [0, 1); the last step sits just below 1.
        w.min(1.0 - 1e-9)
    }

    fn update_lr(&mut self) {
        self.lr = self
            .lr_schedule
            .value(self.schedule_where(self.lr_schedule.as_ref()));
        self.lr_head = self
            .lr_head_schedule
            .value(self.schedule_where(self.lr_head_schedule.as_ref()));
        if let Some(schedule) = &self.weight_decay_schedule {
            let weight_decay = schedule.value(self.schedule_where(schedule.as_ref()));
            self.optimizer.set_weight_decay(weight_decay);
        }
    }

    /// Everything a checkpoint holds, grouped by file, as CPU copies that training no longer touches.
    fn checkpoint_groups(&self) -> Vec<TensorGroup> {
        let model = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, cpu_copy(&t)))
            .collect();
        let optimizer = self
            .optimizer
            .state_dict()
            .into_iter()
            .map(|(n, t)| (n, cpu_copy(&t)))
            .collect();
        let mut groups = vec![
            TensorGroup {
                name: "model".into(),
                tensors: model,
            },
            TensorGroup {
                name: "optimizer".into(),
                tensors: optimizer,
            },
        ];
        let loss_state: Vec<(String, Tensor)> = self
            .loss
            .state_tensors()
            .into_iter()
            .map(|(n, t)| (n, cpu_copy(&t)))
            .collect();
        if !loss_state.is_empty() {
            groups.push(TensorGroup {
                name: "loss".into(),
                tensors: loss_state,
            });
        }
        groups
    }

    /// How this run splits its data over processes (recorded in checkpoints).
    pub fn layout(&self) -> RunLayout {
        let world = self.session.as_ref().map_or(1, Session::world_size);
        RunLayout::of(&self.config, world, self.iterations_per_epoch)
    }

    /// Rank 0 of a distributed run, or the only process: the one that logs, checkpoints and serves metrics.
    pub fn is_primary(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.is_primary())
    }

    /// Checkpoint the current position (rank 0 only; other ranks hold the same state). The tensors are
    /// copied now; writing, uploading and retention happen in the background with
    /// CHECKPOINT.SAVE_IN_BACKGROUND. A failed save is logged and counted, and training goes on.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        let started = Instant::now();
        let snapshot = Snapshot {
            position: Position {
                iteration: self.iteration,
                epoch: self.epoch,
                iteration_in_epoch: self.iteration_in_epoch,
            },
            seed: self.config.seed_value,
            config_hash: self.config.hash(),
            groups: self.checkpoint_groups(),
            extra: self.layout().to_extra(),
        };
        let background = self.checkpoints.is_background();
        let (outcomes, _) = self.checkpoints.submit(snapshot);
        let held_up = started.elapsed().as_secs_f64();
        self.stats.checkpoints.last_stall_seconds = held_up;
        tracing::info!(
            iteration = self.iteration,
            held_up_seconds = held_up,
            background,
            "checkpoint taken"
        );
        for outcome in outcomes {
            self.record_checkpoint(outcome);
        }
        Ok(())
    }

    /// Take note of a finished save, if there is one; never blocks.
    pub fn poll_checkpoint(&mut self) {
        if let Some(outcome) = self.checkpoints.poll() {
            self.record_checkpoint(outcome);
        }
    }

    /// Wait for the save in flight. The run's last checkpoint must not fail silently: when its save failed
    /// (a store outage, say) it is tried again with growing pauses for about half a minute
    /// ([`FINAL_SAVE_RETRY_PAUSES`]), and an error if it still fails.
    pub fn finish_checkpoints(&mut self) -> Result<()> {
        if let Some(outcome) = self.checkpoints.wait() {
            self.record_checkpoint(outcome);
        }
        for pause in FINAL_SAVE_RETRY_PAUSES {
            if !self.checkpoints.has_failed_save() {
                return Ok(());
            }
            tracing::warn!(
                "the final checkpoint was not saved to {}; trying again in {} s",
                self.checkpoint_dir,
                pause
            );
            std::thread::sleep(Duration::from_secs(pause));
            if let Some(outcome) = self.checkpoints.retry_failed() {
                self.record_checkpoint(outcome);
            }
        }
        if self.checkpoints.has_failed_save() {
            bail!(
                "the final checkpoint could not be saved to {} (see the errors above)",
                self.checkpoint_dir
            );
        }
        Ok(())
    }

    fn record_checkpoint(&mut self, outcome: SaveOutcome) {
        let stats = &mut self.stats.checkpoints;
        match outcome.result {
            Ok(report) => {
                tracing::info!(
                    folder = %report.folder,
                    bytes = report.bytes,
                    write_seconds = report.write_seconds,
                    upload_seconds = report.upload_seconds,
                    "checkpoint saved"
                );
                stats.last_iteration = Some(report.iteration);
                stats.last_write_seconds = report.write_seconds;
                stats.last_upload_seconds = report.upload_seconds;
                stats.last_bytes = report.bytes;
                stats.completed += 1;
                self.last_checkpoint = Some(report.folder);
            }
            Err(err) => {
                stats.failed += 1;
                tracing::warn!(
                    "checkpoint at iteration {} was not saved (training continues; the next save \
                     tries again): {err:#}",
                    outcome.iteration
                );
            }
        }
    }

    /// The checkpoint folder this run saves to and resumes from.
    pub fn checkpoint_store(&self) -> &CheckpointDir {
        self.checkpoints.dir()
    }

    /// Restore model, optimizer, loss state and position from a verified checkpoint.
    pub fn restore(&mut self, ckpt: &checkpoint::Checkpoint) -> Result<()> {
        if ckpt.manifest.config_hash != self.config.hash() {
            tracing::warn!(
                folder = %ckpt.location,
                "resuming from a checkpoint written under a different config"
            );
        }
        copy_into_varstore(&self.vs, &ckpt.tensors("model")?)
            .with_context(|| format!("{}", ckpt.location))?;
        self.optimizer
            .load_state_dict(&ckpt.tensors("optimizer")?)
            .with_context(|| format!("optimizer state of {}", ckpt.location))?;
        if ckpt
            .manifest
            .files
            .iter()
            .any(|f| f.name == "loss.safetensors")
        {
            self.loss.load_state(&ckpt.tensors("loss")?)?;
        }
        let saved_layout = RunLayout::from_extra(&ckpt.manifest.extra);
        let p = &crate::dist::resume::resume_position(
            &self.layout(),
            saved_layout.as_ref(),
            &ckpt.manifest.position,
        )
        .with_context(|| format!("resuming from {}", ckpt.location))?;
        self.iteration = p.iteration;
        self.epoch = p.epoch;
        self.iteration_in_epoch = p.iteration_in_epoch;
        if self.iteration_in_epoch >= self.iterations_per_epoch {
            self.epoch += 1;
            self.iteration_in_epoch = 0;
        }
        tracing::info!(
            folder = %ckpt.location,
            iteration = self.iteration,
            epoch = self.epoch,
            "resumed"
        );
        Ok(())
    }

    /// The model's outputs for a collated batch (multi-crop batches go through the multi-resolution path).
    pub fn forward(&self, batch: &Batch, train: bool) -> Result<Vec<Tensor>> {
        self.forward_crops(&self.device_crops(batch)?, train)
    }

    /// The batch's input crops on the model's device.
    pub fn device_crops(&self, batch: &Batch) -> Result<Vec<Tensor>> {
        batch_input(batch)?;
        Ok(batch
            .data
            .iter()
            .map(|t| t.to_device(self.device))
            .collect())
    }

    /// The model's outputs for crops already on its device.
    pub fn forward_crops(&self, crops: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        let outputs = match crops {
            [single] => self.model.forward_t(single, train)?,
            _ => self.model.forward_multi_res(crops, train)?,
        };
        Ok(outputs)
    }
}

/// A CPU copy of `t` that shares no memory with it (moving a CPU tensor to the CPU would not copy).
fn cpu_copy(t: &Tensor) -> Tensor {
    let t = t.detach();
    if t.device() == Device::Cpu {
        t.copy()
    } else {
        t.to_device(Device::Cpu)
    }
}

/// Copy named tensors into a VarStore's variables; every variable must be present with its shape.
pub fn copy_into_varstore(vs: &nn::VarStore, named: &[(String, Tensor)]) -> Result<()> {
    let by_name: std::collections::HashMap<&str, &Tensor> =
        named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vs.variables() {
        let src = by_name
            .get(name.as_str())
            .ok_or_else(|| anyhow!("model tensor `{name}` missing"))?;
        if src.size() != var.size() {
            bail!(
                "model tensor `{name}`: checkpoint has shape {:?}, model {:?}",
                src.size(),
                var.size()
            );
        }
        var.copy_(src);
    }
    Ok(())
}

fn call<F>(hooks: &mut [Box<dyn Hook>], task: &mut Task, mut event: F) -> Result<()>
where
    F: FnMut(&mut dyn Hook, &mut Task) -> Result<()>,
{
    for hook in hooks.iter_mut() {
        event(hook.as_mut(), task)?;
    }
    Ok(())
}

/// The trainer: runs a task's phases with its hooks.
pub struct Trainer {
    pub task: Task,
    hooks: Vec<Box<dyn Hook>>,
    options: RunOptions,
}

impl Trainer {
    /// Build the task and the standard hooks: NaN check (HOOKS.CHECK_NAN), loss/LR/ETA logging, checkpoints.
    pub fn new(config: Config, options: RunOptions) -> Result<Self> {
        let check_nan = config.hooks.check_nan;
        let log_frequency = config.log_frequency as u64;
        let task = Task::with_session(config, options.distributed.clone())?;
        let mut hooks: Vec<Box<dyn Hook>> = Vec::new();
        if check_nan {
            hooks.push(Box::new(CheckNanHook));
        }
        hooks.push(Box::new(LogLossLrEtaHook::new(log_frequency)));
        hooks.push(Box::new(CheckpointHook));
        if task.is_primary() {
            // After the checkpoint hook, so that they see its latest numbers.
            let prometheus = &task.config.hooks.prometheus_setup;
            if prometheus.use_prometheus {
                hooks.push(Box::new(
                    MetricsHook::start(prometheus, &task).context("HOOKS.PROMETHEUS_SETUP")?,
                ));
            }
            if task.config.hooks.tensorboard_setup.use_tensorboard {
                hooks.push(Box::new(
                    TensorboardHook::new(&task).context("HOOKS.TENSORBOARD_SETUP")?,
                ));
            }
        }
        if let Some(session) = &options.distributed {
            hooks.push(Box::new(DataParallel::new(&task, session)?));
        }
        Ok(Self {
            task,
            hooks,
            options,
        })
    }

    /// Add a hook after the standard ones.
    pub fn add_hook(&mut self, hook: Box<dyn Hook>) {
        self.hooks.push(hook);
    }

    /// Resume (CHECKPOINT.AUTO_RESUME) and train to OPTIMIZER.num_epochs (or the planned stop).
    pub fn train(mut self) -> Result<RunSummary> {
        let task = &mut self.task;
        if task.config.checkpoint.auto_resume {
            if let Some(ckpt) = task.checkpoint_store().latest()? {
                task.restore(&ckpt)?;
                task.last_checkpoint = Some(ckpt.location.clone());
                task.stats.checkpoints.last_iteration = Some(ckpt.manifest.position.iteration);
            }
        }
        let mut test_meters = Vec::new();
        if task.epoch >= task.num_epochs {
            tracing::info!(
                iteration = task.iteration,
                dir = %task.checkpoint_dir,
                "training already finished (OPTIMIZER.num_epochs reached); nothing to do. Use another \
                 CHECKPOINT.DIR or raise num_epochs to train further"
            );
        }
        call(&mut self.hooks, task, |h, t| h.on_start(t))?;
        if task.iteration == 0 && task.loss.needs_initial_pass() {
            initial_pass(task)?;
        }
        tracing::info!(
            epochs = task.num_epochs,
            iterations = task.total_iterations(),
            per_epoch = task.iterations_per_epoch,
            start_iteration = task.iteration,
            device = ?task.device,
            "training"
        );
        while task.epoch < task.num_epochs && !task.stop_requested {
            task.phase = Phase::Train;
            task.stats.start_phase();
            call(&mut self.hooks, task, |h, t| h.on_phase_start(t))?;
            loss_event(task, &[], |loss, _, step| loss.on_phase_start(step))?;
            let mut loader = task.train_data.loader(
                &task.config.data,
                task.config.seed_value,
                task.epoch,
                task.iteration_in_epoch as usize,
                task.device,
            )?;
            loop {
                let wait_started = Instant::now();
                let Some(batch) = loader.next() else { break };
                task.stats.data_wait += wait_started.elapsed();
                let batch = batch.with_context(|| {
                    format!(
                        "loading epoch {} batch {}",
                        task.epoch, task.iteration_in_epoch
                    )
                })?;
                train_step(task, &mut self.hooks, &batch)?;
                if self
                    .options
                    .stop_after_iterations
                    .is_some_and(|n| task.iteration >= n)
                {
                    task.stop_requested = true;
                }
                call(&mut self.hooks, task, |h, t| h.on_step(t))?;
                if task.stop_requested && task.iteration_in_epoch < task.iterations_per_epoch {
                    break;
                }
            }
            task.stats.images_replaced = loader.replaced_images();
            if task.iteration_in_epoch < task.iterations_per_epoch {
                // Stopped mid-epoch; the checkpoint hook saved the position at the last step.
                break;
            }
            call(&mut self.hooks, task, |h, t| h.on_phase_end(t))?;
            task.epoch += 1;
            task.iteration_in_epoch = 0;
            let every = task.config.test_every_num_epoch.max(1) as u64;
            if task.test_data.is_some()
                && (task.epoch.is_multiple_of(every) || task.epoch == task.num_epochs)
            {
                test_meters = run_test_phase(task, &mut self.hooks)?;
            }
        }
        call(&mut self.hooks, task, |h, t| h.on_end(t))?;
        Ok(RunSummary {
            losses: std::mem::take(&mut task.stats.losses),
            iterations: task.iteration,
            last_checkpoint: task.last_checkpoint.clone(),
            test_meters,
        })
    }
}

/// Runs the loss (or one of its own events: teachers, prototypes, clustering) with the step's context
/// and the model's last outputs.
fn loss_event<T, F>(task: &mut Task, crops: &[Tensor], event: F) -> Result<T>
where
    F: FnOnce(&mut dyn Loss, &[Tensor], &StepContext) -> losses::Result<T>,
{
    let step = StepContext {
        model: &task.model,
        crops,
        iteration: task.iteration,
        epoch: task.epoch,
        iterations_per_epoch: task.iterations_per_epoch,
        num_epochs: task.num_epochs,
        train: task.phase == Phase::Train,
    };
    let result = event(task.loss.as_mut(), &task.last_output, &step);
    result.with_context(|| format!("loss {}", task.loss.name()))
}

/// The pass over the training data (the first epoch's order) without gradients that some losses
/// need before the first step (VISSL's InitMemoryHook for DeepClusterV2).
fn initial_pass(task: &mut Task) -> Result<()> {
    tracing::info!(
        loss = task.loss.name(),
        "initial pass over the training data"
    );
    let loader = task.train_data.loader(
        &task.config.data,
        task.config.seed_value,
        task.epoch,
        0,
        task.device,
    )?;
    let _guard = tch::no_grad_guard();
    for batch in loader {
        let batch = batch.context("loading the initial pass")?;
        let crops = task.device_crops(&batch)?;
        let target = batch
            .label
            .first()
            .map(|t| t.to_device(task.device))
            .ok_or_else(|| anyhow!("the initial pass needs the batch labels (sample indices)"))?;
        loss_event(task, &crops, |loss, _, step| {
            loss.on_initial_pass_batch(&target, step)
        })?;
    }
    Ok(())
}

/// The seed of libtorch's generator for `iteration` of `rank` (a SplitMix64 mix of the three, so
/// neighbouring steps and ranks get unrelated streams).
pub fn step_seed(seed_value: u64, rank: usize, iteration: u64) -> i64 {
    let mut z = seed_value
        .wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(iteration.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 1) as i64
}

/// One training step with its hook events: forward, loss, backward, update.
fn train_step(task: &mut Task, hooks: &mut [Box<dyn Hook>], batch: &Batch) -> Result<()> {
    task.update_lr();
    // Stochastic layers (drop path, dropout) draw from libtorch's global generator. Seeding it at
    // every step from (SEED_VALUE, rank, iteration) makes a resumed run draw exactly what the
    // straight run drew, with no generator state in the checkpoint; ranks draw differently, as
    // VISSL's SEED_VALUE + rank does.
    let rank = task.session.as_ref().map_or(0, Session::rank);
    tch::manual_seed(step_seed(task.config.seed_value, rank, task.iteration));
    let crops = task.device_crops(batch)?;
    let seen = task
        .loss
        .model_crops()
        .map_or(crops.len(), |k| k.clamp(1, crops.len()));
    task.last_output = task.forward_crops(&crops[..seen], true)?;
    task.last_target = batch.label.first().map(|t| t.to_device(task.device));
    call(hooks, task, |h, t| h.on_forward(t))?;
    let target = match &task.last_target {
        Some(t) => t.shallow_clone(),
        None => Tensor::zeros([0], (tch::Kind::Int64, task.device)),
    };
    let loss = loss_event(task, &crops, |loss, output, step| {
        loss.forward_step(output, &target, step)
    })?;
    task.last_loss = loss.double_value(&[]);
    call(hooks, task, |h, t| h.on_loss_and_meter(t))?;
    task.optimizer.zero_grad();
    // A collective inside backward (gathered negatives, SyncBN, DDP buckets) can fail.
    loss.f_backward().context("backward pass")?;
    call(hooks, task, |h, t| h.on_backward(t))?;
    loss_event(task, &crops, |loss, _, step| loss.on_backward(step))?;
    task.optimizer
        .step_at(task.iteration, task.lr, task.lr_head)?;
    loss_event(task, &crops, |loss, _, step| loss.on_update(step))?;
    call(hooks, task, |h, t| h.on_update(t))?;
    task.iteration += 1;
    task.iteration_in_epoch += 1;
    task.stats.losses.push((task.iteration, task.last_loss));
    task.stats.phase_images += batch.num_samples as u64;
    Ok(())
}

fn run_test_phase(
    task: &mut Task,
    hooks: &mut [Box<dyn Hook>],
) -> Result<Vec<meters::AccuracyReading>> {
    task.phase = Phase::Test;
    call(hooks, task, |h, t| h.on_phase_start(t))?;
    if let Some(m) = task.meter.as_mut() {
        m.reset();
    }
    let Some(test) = task.test_data.as_ref() else {
        return Ok(Vec::new());
    };
    let loader = test.loader(
        &task.config.data,
        task.config.seed_value,
        task.epoch,
        0,
        task.device,
    )?;
    let _guard = tch::no_grad_guard();
    let mut loss_sum = 0.0;
    let mut batches = 0u64;
    for batch in loader {
        let batch = batch?;
        let outputs = task.forward(&batch, false)?;
        let target = batch.label.first().map(|t| t.to_device(task.device));
        if let (Some(meter), Some(target)) = (task.meter.as_mut(), target.as_ref()) {
            meter.update(&outputs, target);
        }
        if let Some(target) = target.as_ref() {
            if let Ok(loss) = task.loss.forward(&outputs, target) {
                loss_sum += loss.double_value(&[]);
                batches += 1;
            }
        }
    }
    if let (Some(meter), Some(session)) = (task.meter.as_mut(), task.session.as_ref()) {
        // Every rank saw its own share of the test split: sum the counters so rank 0 reports all of it.
        let counts = Tensor::from_slice(&meter.counts());
        session.group().all_reduce_sum_(&counts)?;
        meter.set_counts(&Vec::<f64>::try_from(&counts)?);
    }
    let readings = task.meter.as_ref().map(|m| m.value()).unwrap_or_default();
    for r in readings.iter().filter(|_| task.is_primary()) {
        let topk: Vec<String> = r
            .topk
            .iter()
            .map(|(k, v)| format!("top_{k} {v:.2}"))
            .collect();
        tracing::info!(meter = %r.name, "test accuracy: {}", topk.join(" "));
    }
    if batches > 0 && task.is_primary() {
        tracing::info!(
            loss = loss_sum / batches as f64,
            "test phase done (rank 0's share)"
        );
    }
    call(hooks, task, |h, t| h.on_phase_end(t))?;
    task.phase = Phase::Train;
    Ok(readings)
}

/// The safetensors file behind a weights source: the file itself, a checkpoint folder's model file, or the
/// model file of the newest verified checkpoint under a CHECKPOINT.DIR.
pub fn resolve_weights_file(source: &Path) -> Result<PathBuf> {
    if source.is_file() {
        return Ok(source.to_path_buf());
    }
    let ckpt = checkpoint::find(&Location::Local(source.to_path_buf()))?
        .ok_or_else(|| anyhow!("no verified checkpoint under {}", source.display()))?;
    Ok(ckpt.model_file())
}

/// Initialise `model` from `source` (see [`resolve_weights_file`]) with MODEL.WEIGHTS_INIT's rules
/// (STATE_DICT_KEY_NAME, SKIP_LAYERS, prefixes; heads only where FEATURE_EVAL_SETTINGS says so).
pub fn init_model_weights(model: &BaseSslModel, source: &Path) -> Result<PathBuf> {
    let file = resolve_weights_file(source)?;
    let mut init = model.params().weights_init.clone();
    init.params_file = file.display().to_string();
    model
        .init_from_weights(Some(&init), false)
        .with_context(|| format!("loading weights from {}", file.display()))?;
    Ok(file)
}
