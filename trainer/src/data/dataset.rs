//! VISSL's `GenericSSLDataset`: the data sources of one split read side by side (a sample's
//! `data` has one entry per source), labels per `LABEL_SOURCES` / `LABEL_TYPE`, the
//! `DATA_LIMIT` subset, and the replacement of images that fail to load.

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use image::RgbImage;
use rand_pcg::Pcg64Mcg;
use vissl_crds::config::data::DataLimitSampling;
use vissl_crds::config::DataSplitConfig;

use super::sources::catalog::{get_data_files, DatasetCatalog};
use super::sources::{self, mean_image, read_label_file, DataSource, Labels, SourceSpec};
use super::transforms::Pipeline;
use super::{sample_rng, DataError, Item, Result, Sample};

/// Images larger than this are not kept for replacement, as in VISSL's QueueDataset.
const MAX_QUEUED_PIXELS: u64 = 10_000_000;

/// The label source that reads a `.npy` label file for any data source.
const FILELIST_LABELS: &str = "disk_filelist";

/// `DATA.<split>.LABEL_TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelType {
    /// The labels of `LABEL_SOURCES`.
    Standard,
    /// Each sample's label is its dataset index (instance discrimination).
    SampleIndex,
    /// Every label is 0 (e.g. for cutmix/mixup label smoothing).
    Zero,
}

impl LabelType {
    /// Parse VISSL's name.
    pub fn parse(name: &str, split: &str) -> Result<Self> {
        match name {
            "standard" => Ok(Self::Standard),
            "sample_index" => Ok(Self::SampleIndex),
            "zero" => Ok(Self::Zero),
            other => Err(DataError::Config(format!(
                "DATA.{split}.LABEL_TYPE: unknown label type '{other}'; known: standard, sample_index, zero"
            ))),
        }
    }
}

/// Dataset-wide settings (the parts of `DATA.<split>` the dataset itself uses).
#[derive(Debug, Clone)]
pub struct DatasetOptions {
    pub label_type: LabelType,
    /// Use a `DATA_LIMIT`-sized subset drawn per `DATA_LIMIT_SAMPLING`; negative: all images.
    pub data_limit: i64,
    pub data_limit_sampling: DataLimitSampling,
    /// Side of the grey image that replaces a failed one.
    pub default_gray_img_size: usize,
    /// `ENABLE_QUEUE_DATASET`: replace failed images by recently seen valid ones, keeping up to
    /// this many per worker and source (VISSL uses the batch size).
    pub queue_size: Option<usize>,
}

impl DatasetOptions {
    /// The options of split `split` (`TRAIN`/`TEST`).
    pub fn from_config(split: &str, cfg: &DataSplitConfig) -> Result<Self> {
        Ok(Self {
            label_type: LabelType::parse(&cfg.label_type, split)?,
            data_limit: cfg.data_limit,
            data_limit_sampling: cfg.data_limit_sampling.clone(),
            default_gray_img_size: cfg.default_gray_img_size,
            queue_size: cfg
                .enable_queue_dataset
                .then_some(cfg.batchsize_per_replica.max(1)),
        })
    }
}

/// What the loader applies to each loaded sample: the split's transform [`Pipeline`], or a
/// stand-in (tests, tools) with the same contract.
pub trait SampleTransform: Send + Sync {
    /// Transform `sample` in place, drawing every random choice from `rng`.
    fn apply(&self, sample: &mut Sample, rng: &mut Pcg64Mcg) -> Result<()>;
}

impl SampleTransform for Pipeline {
    fn apply(&self, sample: &mut Sample, rng: &mut Pcg64Mcg) -> Result<()> {
        Pipeline::apply(self, sample, rng)
    }
}

/// A named data source of the dataset.
pub struct NamedSource {
    /// The `DATA_SOURCES` name (for logs).
    pub name: String,
    pub source: Box<dyn DataSource>,
}

/// The dataset of one split.
pub struct Dataset {
    split: String,
    sources: Vec<NamedSource>,
    labels: Vec<Labels>,
    options: DatasetOptions,
    /// External index -> source index, when `DATA_LIMIT` picked a subset.
    subset: Option<Vec<usize>>,
    len: usize,
    replaced: AtomicU64,
    warned: Mutex<HashSet<(usize, usize)>>,
}

/// Recently loaded valid images of one worker, per source: VISSL's QueueDataset replacement pool.
pub struct RecentImages {
    capacity: usize,
    per_source: Vec<VecDeque<RgbImage>>,
}

impl RecentImages {
    fn offer(&mut self, source: usize, img: &RgbImage) {
        let Some(queue) = self.per_source.get_mut(source) else {
            return;
        };
        let pixels = u64::from(img.width()) * u64::from(img.height());
        // Only fill while there is room: in steady state no copy is made.
        if queue.len() < self.capacity && pixels <= MAX_QUEUED_PIXELS {
            queue.push_back(img.clone());
        }
    }

    fn take(&mut self, source: usize) -> Option<RgbImage> {
        self.per_source.get_mut(source)?.pop_front()
    }
}

impl Dataset {
    /// Build split `split` (`TRAIN`/`TEST`) from its config; `catalog` resolves `DATASET_NAMES`
    /// when `DATA_PATHS` is empty.
    pub fn from_config(
        split: &str,
        cfg: &DataSplitConfig,
        catalog: Option<&DatasetCatalog>,
    ) -> Result<Self> {
        if cfg.data_sources.is_empty() {
            return Err(DataError::Config(format!(
                "DATA.{split}.DATA_SOURCES is empty"
            )));
        }
        let files = get_data_files(split, cfg, catalog)?;
        let mut named = Vec::with_capacity(cfg.data_sources.len());
        for (index, name) in cfg.data_sources.iter().enumerate() {
            let spec = SourceSpec {
                split,
                index,
                dataset_name: cfg
                    .dataset_names
                    .get(index)
                    .map(String::as_str)
                    .unwrap_or(""),
                path: &files.data_paths[index],
                cfg,
            };
            named.push(NamedSource {
                name: name.clone(),
                source: sources::build(name, &spec)?,
            });
        }
        let mut labels = Vec::with_capacity(cfg.label_sources.len());
        for (index, label_source) in cfg.label_sources.iter().enumerate() {
            let label_path = files.label_paths.get(index).cloned().flatten();
            let context = |e: DataError| {
                add_context(
                    e,
                    &format!("DATA.{split}.LABEL_SOURCES[{index}] = {label_source}"),
                )
            };
            let column = if label_source == FILELIST_LABELS {
                let path = label_path.ok_or_else(|| {
                    DataError::Config(format!(
                        "DATA.{split}.LABEL_SOURCES[{index}] = {FILELIST_LABELS} needs a label .npy: \
                         set LABEL_PATHS[{index}] or a labels path in the catalog entry of '{}'",
                        cfg.dataset_names.get(index).map(String::as_str).unwrap_or("")
                    ))
                })?;
                read_label_file(Path::new(&path)).map_err(context)?
            } else {
                let data_source = cfg.data_sources.get(index).map(String::as_str);
                if data_source != Some(label_source.as_str()) {
                    let mut known = sources::names();
                    known.retain(|n| *n != FILELIST_LABELS);
                    return Err(DataError::Config(format!(
                        "DATA.{split}.LABEL_SOURCES[{index}] = {label_source}: labels of this kind come \
                         from the data source at the same position, which is {data_source:?}; label \
                         sources: {FILELIST_LABELS} (a .npy file) or one of {} matching DATA_SOURCES",
                        known.join(", ")
                    )));
                }
                named[index]
                    .source
                    .labels(label_path.as_deref().map(Path::new))
                    .map_err(context)?
            };
            labels.push(column);
        }
        Self::new(
            split,
            named,
            labels,
            DatasetOptions::from_config(split, cfg)?,
        )
    }

    /// Assemble a dataset from built sources and label columns (one value per source image).
    pub fn new(
        split: &str,
        sources: Vec<NamedSource>,
        labels: Vec<Labels>,
        options: DatasetOptions,
    ) -> Result<Self> {
        let first = sources
            .first()
            .ok_or_else(|| DataError::Config(format!("DATA.{split}.DATA_SOURCES is empty")))?;
        let total = first.source.len();
        for (i, s) in sources.iter().enumerate() {
            if s.source.len() != total {
                return Err(DataError::Config(format!(
                    "DATA.{split}.DATA_SOURCES: source {i} ({}) has {} images but source 0 ({}) has {total}; \
                     sources read side by side must have the same length",
                    s.name,
                    s.source.len(),
                    first.name
                )));
            }
        }
        for (i, column) in labels.iter().enumerate() {
            if column.values.len() != total {
                return Err(DataError::Config(format!(
                    "DATA.{split}.LABEL_SOURCES[{i}]: {} labels for {total} images",
                    column.values.len()
                )));
            }
        }
        let subset = if options.data_limit >= 0 {
            let wanted = options.data_limit as usize;
            let sampling = &options.data_limit_sampling;
            let picked = if sampling.is_balanced {
                let column = labels.first().ok_or_else(|| {
                    DataError::Config(format!(
                        "DATA.{split}.DATA_LIMIT_SAMPLING.IS_BALANCED needs labels (LABEL_SOURCES)"
                    ))
                })?;
                balanced_sub_sampling(
                    &column.values,
                    wanted,
                    sampling.skip_num_samples,
                    sampling.seed,
                )
            } else {
                unbalanced_sub_sampling(total, wanted, sampling.skip_num_samples, sampling.seed)
            };
            Some(picked.map_err(|e| {
                DataError::Config(format!("DATA.{split}.DATA_LIMIT = {wanted}: {e}"))
            })?)
        } else {
            None
        };
        let len = subset.as_ref().map_or(total, Vec::len);
        Ok(Self {
            split: split.to_string(),
            sources,
            labels,
            options,
            subset,
            len,
            replaced: AtomicU64::new(0),
            warned: Mutex::new(HashSet::new()),
        })
    }

    /// Number of samples (the `DATA_LIMIT` when set).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `TRAIN` or `TEST`.
    pub fn split(&self) -> &str {
        &self.split
    }

    /// The label columns, one per `LABEL_SOURCES` entry, indexed by source image (not by sample).
    pub fn label_columns(&self) -> &[Labels] {
        &self.labels
    }

    /// The labels of every sample in order, one vector per label source.
    pub fn sample_labels(&self) -> Vec<Vec<i64>> {
        self.labels
            .iter()
            .map(|c| {
                (0..self.len)
                    .map(|i| c.values[self.source_index(i)])
                    .collect()
            })
            .collect()
    }

    /// The image paths of every sample in order, one list per source (None for sources without files).
    pub fn image_paths(&self) -> Vec<Option<Vec<String>>> {
        self.sources
            .iter()
            .map(|s| {
                s.source.image_paths().map(|paths| {
                    (0..self.len)
                        .filter_map(|i| paths.get(self.source_index(i)).cloned())
                        .collect()
                })
            })
            .collect()
    }

    /// How many images failed to load and were replaced so far.
    pub fn replaced_count(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// An empty replacement pool for one worker.
    pub fn recent_images(&self) -> RecentImages {
        RecentImages {
            capacity: self.options.queue_size.unwrap_or(0),
            per_source: (0..self.sources.len()).map(|_| VecDeque::new()).collect(),
        }
    }

    fn source_index(&self, index: usize) -> usize {
        self.subset.as_ref().map_or(index, |s| s[index])
    }

    /// Load sample `index` without transforms. A file that fails to load is replaced (by a
    /// recent valid image of this worker with `ENABLE_QUEUE_DATASET`, else the grey mean image),
    /// marked `data_valid = false`, counted and logged once; only an index past the end is an error.
    pub fn load(&self, index: usize, recent: &mut RecentImages) -> Result<Sample> {
        if index >= self.len {
            return Err(DataError::Config(format!(
                "DATA.{}: sample index {index} is out of range (the dataset has {} samples)",
                self.split, self.len
            )));
        }
        let source_index = self.source_index(index);
        let n = self.sources.len();
        let mut sample = Sample {
            data: Vec::with_capacity(n),
            label: Vec::with_capacity(n),
            data_valid: Vec::with_capacity(n),
            data_idx: vec![index as i64; n],
        };
        for (s, named) in self.sources.iter().enumerate() {
            match named.source.load(source_index) {
                Ok(img) => {
                    recent.offer(s, &img);
                    sample.data.push(Item::Image(img));
                    sample.data_valid.push(true);
                }
                Err(err) => {
                    self.note_failure(s, source_index, &err);
                    let img = recent
                        .take(s)
                        .unwrap_or_else(|| mean_image(self.options.default_gray_img_size));
                    sample.data.push(Item::Image(img));
                    sample.data_valid.push(false);
                }
            }
        }
        if !self.labels.is_empty() || self.options.label_type == LabelType::Standard {
            sample.label = self.labels.iter().map(|c| c.values[source_index]).collect();
        } else if self.options.label_type == LabelType::SampleIndex {
            sample.label = vec![index as i64; n];
        } else {
            sample.label = vec![0; n];
        }
        Ok(sample)
    }

    /// Load sample `index` and apply `transform` with the sample's own random stream
    /// `sample_rng(seed, epoch, index)`.
    pub fn get(
        &self,
        index: usize,
        epoch: u64,
        seed: u64,
        transform: &dyn SampleTransform,
        recent: &mut RecentImages,
    ) -> Result<Sample> {
        let mut sample = self.load(index, recent)?;
        let mut rng = sample_rng(seed, epoch, index as u64);
        transform
            .apply(&mut sample, &mut rng)
            .map_err(|e| add_context(e, &format!("DATA.{} sample {index}", self.split)))?;
        Ok(sample)
    }

    fn note_failure(&self, source: usize, source_index: usize, err: &DataError) {
        self.replaced.fetch_add(1, Ordering::Relaxed);
        let first_time = match self.warned.lock() {
            Ok(mut seen) => seen.insert((source, source_index)),
            Err(poisoned) => poisoned.into_inner().insert((source, source_index)),
        };
        if first_time {
            tracing::warn!(
                split = %self.split,
                source = %self.sources[source].name,
                image = %self.sources[source].source.describe(source_index),
                error = %err,
                "could not load image; replacing it"
            );
        }
    }
}

/// Prefix an error's message with what was being done, keeping its kind.
pub fn add_context(err: DataError, context: &str) -> DataError {
    match err {
        DataError::Config(msg) => DataError::Config(format!("{context}: {msg}")),
        DataError::BadFile { path, reason } => DataError::BadFile {
            path,
            reason: format!("{reason} ({context})"),
        },
        DataError::Transform { transform, reason } => DataError::Transform {
            transform,
            reason: format!("{reason} ({context})"),
        },
        DataError::Collate { collator, reason } => DataError::Collate {
            collator,
            reason: format!("{reason} ({context})"),
        },
        other => DataError::Config(format!("{context}: {other}")),
    }
}

/// VISSL's `unbalanced_sub_sampling`: `np.random.choice(total, skip + wanted, replace=False)[skip:]`
/// under `np.random.seed(seed)`, reproduced exactly so a run picks the same images as VISSL.
pub fn unbalanced_sub_sampling(
    total: usize,
    wanted: usize,
    skip: usize,
    seed: u64,
) -> Result<Vec<usize>, String> {
    let mut rng = numpy_legacy::RandomState::new(seed)?;
    let picked = rng.choice_without_replacement(total, skip + wanted)?;
    Ok(picked[skip..].to_vec())
}

/// VISSL's `balanced_sub_sampling`: per class (sorted), `np.random.choice` of an equal share
/// (the first `wanted % classes` classes get one more), concatenated in class order.
pub fn balanced_sub_sampling(
    labels: &[i64],
    wanted: usize,
    skip: usize,
    seed: u64,
) -> Result<Vec<usize>, String> {
    let mut classes: Vec<i64> = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    if classes.is_empty() {
        return Err("balanced sampling over an empty label list".into());
    }
    let (skip_q, skip_r) = (skip / classes.len(), skip % classes.len());
    let (want_q, want_r) = (wanted / classes.len(), wanted % classes.len());
    if want_q == 0 {
        return Err(format!(
            "balanced sampling needs at least one sample per class ({} classes)",
            classes.len()
        ));
    }
    let mut rng = numpy_legacy::RandomState::new(seed)?;
    let mut out = Vec::with_capacity(wanted);
    for (i, class) in classes.iter().enumerate() {
        let members: Vec<usize> = (0..labels.len()).filter(|&j| labels[j] == *class).collect();
        let n = want_q + usize::from(i < want_r);
        let s = skip_q + usize::from(i < skip_r);
        let order = rng
            .choice_without_replacement(members.len(), s + n)
            .map_err(|e| format!("class {class}: {e}"))?;
        out.extend(order[s..].iter().map(|&k| members[k]));
    }
    Ok(out)
}

/// The parts of numpy's legacy `RandomState` (MT19937) that VISSL's subset sampling uses.
mod numpy_legacy {
    const N: usize = 624;
    const M: usize = 397;

    pub struct RandomState {
        mt: [u32; N],
        pos: usize,
    }

    impl RandomState {
        /// `np.random.seed(seed)` (numpy accepts 0 ..= 2^32-1).
        pub fn new(seed: u64) -> Result<Self, String> {
            let seed = u32::try_from(seed)
                .map_err(|_| format!("seed {seed} must be between 0 and 2**32 - 1"))?;
            let mut mt = [0u32; N];
            mt[0] = seed;
            for i in 1..N {
                mt[i] = 1_812_433_253u32
                    .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                    .wrapping_add(i as u32);
            }
            Ok(Self { mt, pos: N })
        }

        fn refill(&mut self) {
            const UPPER: u32 = 0x8000_0000;
            const LOWER: u32 = 0x7fff_ffff;
            const MATRIX_A: u32 = 0x9908_b0df;
            for i in 0..N {
                let y = (self.mt[i] & UPPER) | (self.mt[(i + 1) % N] & LOWER);
                let mut next = self.mt[(i + M) % N] ^ (y >> 1);
                if y & 1 != 0 {
                    next ^= MATRIX_A;
                }
                self.mt[i] = next;
            }
            self.pos = 0;
        }

        fn next_u32(&mut self) -> u32 {
            if self.pos >= N {
                self.refill();
            }
            let mut y = self.mt[self.pos];
            self.pos += 1;
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c_5680;
            y ^= (y << 15) & 0xefc6_0000;
            y ^ (y >> 18)
        }

        fn next_u64(&mut self) -> u64 {
            let hi = u64::from(self.next_u32());
            (hi << 32) | u64::from(self.next_u32())
        }

        /// Uniform in `0..=max` by masked rejection, numpy's legacy `random_interval`.
        fn random_interval(&mut self, max: u64) -> u64 {
            if max == 0 {
                return 0;
            }
            let mut mask = max;
            for shift in [1, 2, 4, 8, 16, 32] {
                mask |= mask >> shift;
            }
            loop {
                let value = if max <= u64::from(u32::MAX) {
                    u64::from(self.next_u32()) & mask
                } else {
                    self.next_u64() & mask
                };
                if value <= max {
                    return value;
                }
            }
        }

        /// `choice(total, size, replace=False)` = `permutation(total)[:size]`.
        pub fn choice_without_replacement(
            &mut self,
            total: usize,
            size: usize,
        ) -> Result<Vec<usize>, String> {
            if size > total {
                return Err(format!(
                    "cannot take {size} samples out of {total} without replacement"
                ));
            }
            let mut perm: Vec<usize> = (0..total).collect();
            for i in (1..total).rev() {
                let j = self.random_interval(i as u64) as usize;
                perm.swap(i, j);
            }
            perm.truncate(size);
            Ok(perm)
        }
    }
}
