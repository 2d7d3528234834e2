//! The data pipeline, Rust end to end: sources -> transforms -> collator, on worker threads.
//!
//! A [`Sample`] is VISSL's sample dict: `data` holds one entry per data source, and after
//! multi-crop transforms one entry per crop; `label`, `data_valid` and `data_idx` run parallel to it.
//! Every random choice a transform makes comes from [`sample_rng`], so a sample is a pure function of
//! (seed, epoch, index) and a resumed run sees exactly the images it would have seen.

pub mod collators;
pub mod dataset;
pub mod loader;
pub mod sampler;
pub mod sources;
pub mod transforms;

use image::RgbImage;
use rand_pcg::Pcg64Mcg;
use std::path::Path;
use std::sync::Arc;
use vissl_crds::config::{DataConfig, DataSplitConfig};

/// Errors of the data pipeline; each names what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A config entry (transform, collator, source) is malformed.
    #[error("{0}")]
    Config(String),
    /// A file could not be read or decoded.
    #[error("{path}: {reason}")]
    BadFile { path: String, reason: String },
    /// A transform got an input it cannot handle (e.g. a tensor where an image is needed).
    #[error("transform {transform}: {reason}")]
    Transform { transform: String, reason: String },
    /// A collator got samples it cannot stack.
    #[error("collator {collator}: {reason}")]
    Collate { collator: String, reason: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// A float image in channel-major layout (C, H, W), what `ToTensor` produces.
#[derive(Debug, Clone, PartialEq)]
pub struct ChwTensor {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl ChwTensor {
    /// A zero tensor of the given shape.
    pub fn zeros(c: usize, h: usize, w: usize) -> Self {
        Self {
            c,
            h,
            w,
            data: vec![0.0; c * h * w],
        }
    }
}

/// One entry of a sample's data list.
#[derive(Debug, Clone)]
pub enum Item {
    /// A decoded 8-bit RGB image (the "PIL" stage of VISSL's transforms).
    Image(RgbImage),
    /// A float tensor (after `ToTensor`/`ImgToTensor`).
    Tensor(ChwTensor),
}

/// VISSL's sample dict, before collation.
#[derive(Debug, Clone)]
pub struct Sample {
    /// One entry per source, or per crop/patch after copy transforms.
    pub data: Vec<Item>,
    /// The label of each entry: class index, or the sample index for `LABEL_TYPE: sample_index`,
    /// or a transform-made label (rotation, permutation).
    pub label: Vec<i64>,
    /// Whether each entry loaded fine (false: it was replaced after a decode failure).
    pub data_valid: Vec<bool>,
    /// The dataset index the sample came from, per entry.
    pub data_idx: Vec<i64>,
}

/// The random generator for one sample: a pure function of (seed, epoch, index).
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> Pcg64Mcg {
    // splitmix64 over the three words, so neighbouring indices get unrelated streams.
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let a = mix(seed ^ mix(epoch ^ mix(index)));
    let b = mix(a ^ 0xD1B5_4A32_D192_ED03);
    Pcg64Mcg::new(((a as u128) << 64) | b as u128 | 1)
}

/// Everything one split needs to produce batches: dataset, transforms, collator and this rank's sampler.
pub struct SplitPipeline {
    pub dataset: Arc<dataset::Dataset>,
    pub transforms: Arc<transforms::Pipeline>,
    pub collator: Arc<collators::Collator>,
    pub sampler: sampler::Sampler,
    split_config: DataSplitConfig,
}

impl SplitPipeline {
    /// Build split `split` (`TRAIN` | `TEST`) for `rank` of `world_size`; `catalog` is
    /// `<configs>/dataset_catalog.json` (used when DATA_PATHS is empty; may be absent).
    pub fn from_config(
        split: &str,
        cfg: &DataSplitConfig,
        catalog: &Path,
        world_size: usize,
        rank: usize,
        seed: u64,
    ) -> Result<Self> {
        let catalog = if catalog.exists() {
            Some(sources::catalog::DatasetCatalog::load(catalog)?)
        } else {
            None
        };
        let dataset = Arc::new(dataset::Dataset::from_config(split, cfg, catalog.as_ref())?);
        let transforms = Arc::new(transforms::Pipeline::from_config(&cfg.transforms)?);
        let collator = Arc::new(collators::build(
            &cfg.collate_function,
            &cfg.collate_function_params,
        )?);
        let sampler = sampler::Sampler::from_config(cfg, dataset.len(), world_size, rank, seed)?;
        Ok(Self {
            dataset,
            transforms,
            collator,
            sampler,
            split_config: cfg.clone(),
        })
    }

    /// A loader over `epoch`, starting at batch `start_iter`.
    pub fn loader(
        &self,
        data: &DataConfig,
        seed: u64,
        epoch: u64,
        start_iter: usize,
        device: tch::Device,
    ) -> Result<loader::DataLoader> {
        let options = loader::LoaderOptions::from_config(
            data,
            &self.split_config,
            seed,
            epoch,
            start_iter,
            device,
        );
        loader::DataLoader::new(
            self.dataset.clone(),
            self.transforms.clone(),
            self.collator.clone(),
            &self.sampler,
            options,
        )
    }

    /// Batches per epoch for this rank.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.sampler.indices(0).len();
        let b = self.split_config.batchsize_per_replica.max(1);
        if self.split_config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }
}
