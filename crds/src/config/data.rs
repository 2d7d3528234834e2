//! `config.DATA`: the data pipeline's keys, as VISSL names them.

use serde::{Deserialize, Serialize};

/// `DATA`: loader-wide settings and the two splits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", deny_unknown_fields)]
pub struct DataConfig {
    /// Worker threads decoding and augmenting images.
    pub num_dataloader_workers: usize,
    /// Pin host memory of batches bound for a GPU.
    pub pin_memory: bool,
    /// Copy batches to the GPU asynchronously.
    pub enable_async_gpu_copy: bool,
    /// Gradient all-reduce bucket size in MB.
    pub ddp_bucket_cap_mb: f64,
    pub train: DataSplitConfig,
    pub test: DataSplitConfig,
}

/// `DATA.TRAIN` / `DATA.TEST`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", deny_unknown_fields)]
pub struct DataSplitConfig {
    pub use_debugging_sampler: bool,
    pub stratified_sampler: serde_yaml::Value,
    pub power_law_sampler: serde_yaml::Value,
    /// VISSL's StatefulDistributedSampler: resumes mid-epoch at the exact next sample.
    pub use_stateful_distributed_sampler: bool,
    pub drop_last: bool,
    pub remove_img_path_prefix: String,
    pub new_img_path_prefix: String,
    pub base_dataset: String,
    /// Names in `dataset_catalog.json`, one per source.
    pub dataset_names: Vec<String>,
    /// `disk_folder` | `disk_filelist` | `synthetic` | `mnist_idx`, one per source.
    pub data_sources: Vec<String>,
    /// Explicit paths, one per source; empty means "look the name up in the catalog".
    pub data_paths: Vec<String>,
    pub label_sources: Vec<String>,
    pub label_paths: Vec<String>,
    /// `standard` | `sample_index`; inferred from LABEL_SOURCES.
    pub label_type: String,
    pub mmap_mode: bool,
    /// Side of the grey replacement image when a file fails to load.
    pub default_gray_img_size: usize,
    pub random_synthetic_images: bool,
    pub random_synthetic_labels: i64,
    pub batchsize_per_replica: usize,
    /// Ordered list of `{name: ..., <params>..., indices: [...]}`.
    pub transforms: Vec<serde_yaml::Value>,
    pub collate_function: String,
    pub collate_function_params: serde_yaml::Mapping,
    /// Use only the first N samples (-1: all).
    pub data_limit: i64,
    pub data_limit_sampling: DataLimitSampling,
    pub copy_to_local_disk: bool,
    pub copy_destination_dir: String,
    pub input_key_names: Vec<String>,
    pub target_key_names: Vec<String>,
    /// Replace a failed image with a recently seen valid one (VISSL's QueueDataset).
    pub enable_queue_dataset: bool,
}

/// `DATA.<split>.DATA_LIMIT_SAMPLING`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE", deny_unknown_fields)]
pub struct DataLimitSampling {
    pub seed: u64,
    pub is_balanced: bool,
    pub skip_num_samples: usize,
}
