//! The smaller config groups the trainer reads: HOOKS, METERS, MACHINE, TRAINER, CHECKPOINT, STORAGE,
//! DISTRIBUTED, EXTRACT_FEATURES, REPRODUCIBILITY, NEAREST_NEIGHBOR, SVM; and `engine_name`.

use serde::{Deserialize, Serialize};
use serde_yaml::Value;

/// Root `engine_name`: what the run does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineName {
    /// Train (and evaluate, when TEST_MODEL).
    #[default]
    Train,
    /// Run the model in eval mode and write features.
    ExtractFeatures,
}

/// `REPRODUCIBILITY` (VISSL's spelling).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ReproducibilityConfig {
    /// Deterministic cuDNN kernels.
    pub cuddn_deterministic: bool,
}

/// `HOOKS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct HooksConfig {
    /// Fail as soon as the loss or an output is NaN.
    pub check_nan: bool,
    /// Weight EMA (not consumed yet).
    pub ema_model: Value,
    /// Timing statistics of the training loop.
    pub perf_stats: PerfStatsConfig,
    /// Memory reports (not consumed yet).
    pub memory_summary: Value,
    /// Log accelerator utilisation and memory.
    pub log_gpu_stats: bool,
    pub model_complexity: ModelComplexityConfig,
    /// TensorBoard event files.
    pub tensorboard_setup: TensorboardSetupConfig,
    /// Prometheus `/metrics`, `/healthz` and `/status` served by rank 0 (vissl-rs).
    pub prometheus_setup: PrometheusSetupConfig,
}

/// `HOOKS.PROMETHEUS_SETUP` (vissl-rs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct PrometheusSetupConfig {
    /// Serve the metrics endpoint from rank 0.
    pub use_prometheus: bool,
    /// Address to listen on (`0.0.0.0`: every interface, as a pod needs).
    pub bind_address: String,
    /// TCP port; 0 picks a free one (logged at start).
    pub port: u16,
}

/// `HOOKS.PERF_STATS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct PerfStatsConfig {
    /// Measure forward, backward, loss and data-loading times.
    pub monitor_perf_stats: bool,
    /// Iterations between reports; -1: at phase ends only.
    pub perf_stat_frequency: i64,
    /// Rolling batch-time window; -1: off.
    pub rolling_btime_freq: i64,
}

/// `HOOKS.MODEL_COMPLEXITY`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ModelComplexityConfig {
    /// Count parameters and FLOPs before training.
    pub compute_complexity: bool,
    /// `[C, H, W]` of the dummy input.
    pub input_shape: Vec<usize>,
}

/// `HOOKS.TENSORBOARD_SETUP`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct TensorboardSetupConfig {
    pub use_tensorboard: bool,
    /// Folder of the event files.
    pub log_dir: String,
    /// Sub-folder of this run.
    pub experiment_log_dir: String,
    /// Minutes between flushes to disk.
    pub flush_every_n_min: u64,
    /// Log parameter histograms.
    pub log_params: bool,
    /// Log gradient histograms.
    pub log_params_gradients: bool,
    /// -1: only at epoch boundaries.
    pub log_params_every_n_iters: i64,
}

/// `METERS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetersConfig {
    /// A single meter (VISSL's older key); empty: none.
    pub name: String,
    /// Several meters.
    pub names: Vec<String>,
    /// Also measure on the train split.
    pub enable_training_meter: bool,
    /// Mask outputs of classes absent from the labels.
    pub model_output_mask: bool,
    /// Top-k accuracy of each output.
    pub accuracy_list_meter: AccuracyListMeterConfig,
    /// Precision@k (not consumed yet).
    pub precision_at_k_list_meter: Value,
    /// Recall@k (not consumed yet).
    pub recall_at_k_list_meter: Value,
    /// Mean average precision (not consumed yet).
    pub mean_ap_list_meter: Value,
}

impl MetersConfig {
    /// The meters to run: `names`, plus `name` when set.
    pub fn active(&self) -> Vec<&str> {
        let mut active: Vec<&str> = self.names.iter().map(String::as_str).collect();
        if !self.name.is_empty() && !active.contains(&self.name.as_str()) {
            active.push(&self.name);
        }
        active
    }
}

/// `METERS.accuracy_list_meter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccuracyListMeterConfig {
    /// One meter per evaluated output.
    pub num_meters: usize,
    /// Top-k accuracies to report.
    pub topk_values: Vec<usize>,
    /// Names of the meters (inferred in linear evaluation).
    pub meter_names: Vec<String>,
}

/// `MACHINE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct MachineConfig {
    /// Where the model runs.
    pub device: Device,
}

/// `MACHINE.DEVICE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// One CUDA device per rank.
    Gpu,
    /// CPU only.
    Cpu,
}

/// `TRAINER`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct TrainerConfig {
    /// `standard_train_step`.
    pub train_step_name: String,
    /// `self_supervision_task`.
    pub task_name: String,
}

/// `CHECKPOINT`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct CheckpointConfig {
    /// Local path or object-store URL (`s3://`, `gs://`, `az://`, `file://`).
    pub dir: String,
    /// Append the distributed run id to DIR.
    pub append_distr_run_id: bool,
    /// Storage backend name (`disk`); DIR's scheme picks the object store.
    pub backend: String,
    /// Resume from the newest valid checkpoint.
    pub auto_resume: bool,
    /// Every N training epochs.
    pub checkpoint_frequency: usize,
    /// Every N iterations too; -1: off.
    pub checkpoint_iter_frequency: i64,
    /// Train again even if DIR holds a finished run.
    pub overwrite_existing: bool,
    /// 1: resume from the newest checkpoint, 2: the one before, ...
    pub latest_checkpoint_resume_file_num: usize,
    pub use_symlink_checkpoint_for_resume: bool,
    /// Keep the newest K checkpoints; -1: all.
    pub keep_last_k: i64,
    /// Write and upload checkpoints on a background thread after snapshotting the tensors (vissl-rs).
    pub save_in_background: bool,
}

/// `STORAGE` (vissl-rs): how object-store URLs in CHECKPOINT.DIR, DATA_PATHS and the TensorBoard
/// LOG_DIR are reached. Credentials and endpoints come from the standard environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct StorageConfig {
    /// Retries of one request after a transient error (connection failure, timeout, 5xx).
    pub max_retries: usize,
    /// No retry of a request starts later than this after its first attempt.
    pub retry_timeout_sec: f64,
    /// First wait between retries; it doubles up to MAX_BACKOFF_SEC.
    pub initial_backoff_sec: f64,
    pub max_backoff_sec: f64,
    /// Attempts of a whole file upload; a failed multipart upload is aborted and started again.
    pub upload_attempts: usize,
    pub connect_timeout_sec: f64,
    pub request_timeout_sec: f64,
    /// Part size of multipart uploads (at least 5, S3's minimum).
    pub multipart_part_mb: usize,
    /// Requests in flight at once per bucket.
    pub max_concurrent_requests: usize,
    /// Local copies of data objects; empty: `<temp dir>/vissl-cache`.
    pub cache_dir: String,
}

/// `DISTRIBUTED`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct DistributedConfig {
    /// Collective-communication library.
    pub backend: Backend,
    /// Print NCCL's own diagnostics.
    pub nccl_debug: bool,
    /// Empty: NCCL's default.
    pub nccl_socket_nthreads: String,
    /// Broadcast BN buffers every forward pass.
    pub broadcast_buffers: bool,
    /// Machines taking part.
    pub num_nodes: usize,
    /// Ranks per node.
    pub num_proc_per_node: usize,
    /// `tcp` | `env` | `file`.
    pub init_method: String,
    /// `auto`, `host:port` or a file path, per INIT_METHOD.
    pub run_id: String,
    /// All-reduce gradients explicitly after backward instead of overlapping.
    pub manual_gradient_reduction: bool,
}

/// `DISTRIBUTED.BACKEND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// GPU collectives.
    Nccl,
    /// CPU collectives.
    Gloo,
}

/// `EXTRACT_FEATURES`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct ExtractFeaturesConfig {
    /// Empty: the checkpoint directory.
    pub output_dir: String,
    /// Features held in memory before writing: 0 none, -1 all.
    pub chunk_threshold: i64,
    /// Save one file per image, named after it.
    pub map_features_to_img_name: bool,
}

/// `NEAREST_NEIGHBOR`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct NearestNeighborConfig {
    /// Temperature of the neighbour weights.
    pub sigma: f64,
    /// Neighbours that vote.
    pub topk: TopK,
    /// L2-normalise features first.
    pub l2_norm_feats: bool,
    pub use_cuda: bool,
    /// Compare test features in chunks to bound memory.
    pub optimize_memory: bool,
    /// Which features to use.
    pub features: NearestNeighborFeatures,
}

/// `NEAREST_NEIGHBOR.TOPK`: one k or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TopK {
    /// A single k.
    One(usize),
    /// One evaluation per k.
    Many(Vec<usize>),
}

impl TopK {
    /// The k values to evaluate.
    pub fn values(&self) -> Vec<usize> {
        match self {
            TopK::One(k) => vec![*k],
            TopK::Many(ks) => ks.clone(),
        }
    }
}

/// `NEAREST_NEIGHBOR.FEATURES`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct NearestNeighborFeatures {
    /// Extracted features to use; empty: extract them first.
    pub path: String,
    /// Extracted layer to use (`heads`, `res5avg`, ...).
    pub layer_name: String,
}

/// `SVM` (VISSL's lower-case keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvmConfig {
    /// L2-normalise features.
    pub normalize: bool,
    /// Classes to train; empty: all.
    pub cls_list: Vec<i64>,
    /// scikit-learn SVM loss (`squared_hinge`).
    pub loss: String,
    /// Regularisation norm (`l2`).
    pub penalty: String,
    /// Solve the dual problem.
    pub dual: bool,
    /// Solver iterations.
    pub max_iter: usize,
    /// Folds of the cross-validation over costs.
    pub cross_val_folds: usize,
    /// Costs (C values) tried.
    pub costs: SvmCosts,
    /// Retrain even if a model for a class and cost exists.
    pub force_retrain: bool,
    /// Low-shot variant of the benchmark.
    pub low_shot: SvmLowShot,
}

/// `SVM.costs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvmCosts {
    /// C values tried.
    pub costs_list: Vec<f64>,
    /// Also try `base^p` for p in `power_range` when positive.
    pub base: f64,
    /// Exponents of `base` tried.
    pub power_range: Vec<i64>,
}

/// `SVM.low_shot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvmLowShot {
    /// `voc` | `places205`.
    pub dataset_name: String,
    /// Independent low-shot samples.
    pub sample_inds: Vec<usize>,
    /// Positives per class.
    pub k_values: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_takes_one_or_many() {
        assert_eq!(
            serde_yaml::from_str::<TopK>("200").unwrap().values(),
            vec![200]
        );
        assert_eq!(
            serde_yaml::from_str::<TopK>("[10, 20]").unwrap().values(),
            vec![10, 20]
        );
    }

    #[test]
    fn active_meters_join_name_and_names() {
        let meters: MetersConfig = serde_yaml::from_str(
            "{name: accuracy_list_meter, names: [], enable_training_meter: true, model_output_mask: false,
              accuracy_list_meter: {num_meters: 1, topk_values: [1, 5], meter_names: []},
              precision_at_k_list_meter: {}, recall_at_k_list_meter: {}, mean_ap_list_meter: {}}",
        )
        .unwrap();
        assert_eq!(meters.active(), vec!["accuracy_list_meter"]);
    }
}
