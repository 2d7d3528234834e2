//! `config.DATA`: the data pipeline's keys, as VISSL names them.

use serde::{Deserialize, Serialize};

/// `DATA`: loader-wide settings and the two splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct DataConfig {
    /// Worker threads decoding and augmenting images.
    pub num_dataloader_workers: usize,
    /// Pin host memory of batches bound for a GPU.
    pub pin_memory: bool,
    /// Copy batches to the GPU asynchronously.
    pub enable_async_gpu_copy: bool,
    /// Gradient all-reduce bucket size in MB.
    pub ddp_bucket_cap_mb: f64,
    /// The training split.
    pub train: DataSplitConfig,
    /// The evaluation split.
    pub test: DataSplitConfig,
}

/// `DATA.TRAIN` / `DATA.TEST`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct DataSplitConfig {
    /// Deterministic, unshuffled split across ranks.
    pub use_debugging_sampler: bool,
    /// Batches from a few classes at a time (not consumed).
    pub stratified_sampler: serde_yaml::Value,
    /// Power-law class distribution per batch (not consumed).
    pub power_law_sampler: serde_yaml::Value,
    /// VISSL's StatefulDistributedSampler: resumes mid-epoch at the exact next sample.
    pub use_stateful_distributed_sampler: bool,
    /// Drop each rank's last incomplete batch.
    pub drop_last: bool,
    /// Prefix of file-list image paths to replace ...
    pub remove_img_path_prefix: String,
    /// ... by this one.
    pub new_img_path_prefix: String,
    /// Dataset wrapper; `generic_ssl` is the only one.
    pub base_dataset: String,
    /// Names in `dataset_catalog.json`, one per source.
    pub dataset_names: Vec<String>,
    /// `disk_folder` | `disk_filelist` | `synthetic` | `mnist_idx`, one per source.
    pub data_sources: Vec<String>,
    /// Explicit paths, one per source; empty means "look the name up in the catalog".
    pub data_paths: Vec<String>,
    /// Where labels come from, one per label source; empty: no labels.
    pub label_sources: Vec<String>,
    /// Explicit label paths, aligned with LABEL_SOURCES.
    pub label_paths: Vec<String>,
    /// `standard` | `sample_index`; inferred from LABEL_SOURCES.
    pub label_type: String,
    /// Memory-map `.npy` file lists.
    pub mmap_mode: bool,
    /// Side of the grey replacement image when a file fails to load.
    pub default_gray_img_size: usize,
    /// `synthetic` source: random pixels instead of grey.
    pub random_synthetic_images: bool,
    /// `synthetic` source: distinct random labels (0: all zero).
    pub random_synthetic_labels: i64,
    /// Samples per rank per iteration.
    pub batchsize_per_replica: usize,
    /// Ordered list of `{name: ..., <params>..., indices: [...]}`.
    pub transforms: Vec<serde_yaml::Value>,
    /// Collator registry name (`vissl list collators`).
    pub collate_function: String,
    /// Collator keyword arguments (free-form).
    pub collate_function_params: serde_yaml::Mapping,
    /// Use only the first N samples (-1: all).
    pub data_limit: i64,
    /// Which samples DATA_LIMIT keeps.
    pub data_limit_sampling: DataLimitSampling,
    /// Copy the data next to the job first.
    pub copy_to_local_disk: bool,
    /// Where to copy it; empty: a temporary folder.
    pub copy_destination_dir: String,
    /// Sample keys fed to the model.
    pub input_key_names: Vec<String>,
    /// Sample keys holding targets.
    pub target_key_names: Vec<String>,
    /// Replace a failed image with a recently seen valid one (VISSL's QueueDataset).
    pub enable_queue_dataset: bool,
}

/// `DATA.<split>.DATA_LIMIT_SAMPLING`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct DataLimitSampling {
    /// Seed of the subset choice.
    pub seed: u64,
    /// Same number of samples per class.
    pub is_balanced: bool,
    /// Samples skipped before choosing.
    pub skip_num_samples: usize,
}
