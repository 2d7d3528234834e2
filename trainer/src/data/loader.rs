//! The data loader: decode, augment and collate on worker threads with a bounded prefetch
//! queue, batches delivered in order. Each sample is a pure function of (seed, epoch, index),
//! so two runs, any number of workers, and a run resumed at `start_iter` all see the same batches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use tch::Device;
use vissl_crds::config::{DataConfig, DataSplitConfig};

use super::collators::{Batch, Collator};
use super::dataset::{add_context, Dataset, RecentImages, SampleTransform};
use super::sampler::Sampler;
use super::{DataError, Result};

/// Batches each worker may hold ready ahead of the consumer (PyTorch's `prefetch_factor`).
pub const DEFAULT_PREFETCH_FACTOR: usize = 2;

/// How to iterate one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    /// `BATCHSIZE_PER_REPLICA`.
    pub batch_size: usize,
    /// `DROP_LAST`: drop the epoch's last batch when it is short.
    pub drop_last: bool,
    /// `NUM_DATALOADER_WORKERS`; 0 loads in the caller's thread.
    pub num_workers: usize,
    /// The run's seed; with the epoch and the sample index it fixes every random choice.
    pub seed: u64,
    pub epoch: u64,
    /// The first iteration of the epoch to produce (resume mid-epoch). The loader applies it for
    /// every sampler kind; a `StatefulDistributedSampler`'s own `start_iter` is not consulted.
    pub start_iter: usize,
    /// Pin batches in page-locked memory (only meaningful for a CUDA target).
    pub pin_memory: bool,
    /// Ready batches per worker.
    pub prefetch_factor: usize,
}

impl LoaderOptions {
    /// Options from `DATA` and `DATA.<split>`; `pin_memory` applies only when `device` is CUDA.
    pub fn from_config(
        data: &DataConfig,
        split: &DataSplitConfig,
        seed: u64,
        epoch: u64,
        start_iter: usize,
        device: Device,
    ) -> Self {
        Self {
            batch_size: split.batchsize_per_replica,
            drop_last: split.drop_last,
            num_workers: data.num_dataloader_workers,
            seed,
            epoch,
            start_iter,
            pin_memory: data.pin_memory && device.is_cuda(),
            prefetch_factor: DEFAULT_PREFETCH_FACTOR,
        }
    }
}

/// Everything a worker needs to turn a list of indices into a batch.
struct BatchMaker {
    dataset: Arc<Dataset>,
    transform: Arc<dyn SampleTransform>,
    collator: Arc<Collator>,
    seed: u64,
    epoch: u64,
    pin_memory: bool,
}

impl BatchMaker {
    fn make(
        &self,
        iteration: usize,
        indices: &[usize],
        recent: &mut RecentImages,
        stop: &AtomicBool,
    ) -> Option<Result<Batch>> {
        let context = || format!("iteration {iteration} of epoch {}", self.epoch);
        let mut samples = Vec::with_capacity(indices.len());
        for &index in indices {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            match self.dataset.get(
                index,
                self.epoch,
                self.seed,
                self.transform.as_ref(),
                recent,
            ) {
                Ok(s) => samples.push(s),
                Err(e) => return Some(Err(add_context(e, &context()))),
            }
        }
        let batch = self
            .collator
            .collate(&samples)
            .map_err(|e| add_context(e, &context()));
        Some(batch.and_then(|b| if self.pin_memory { pin(b) } else { Ok(b) }))
    }
}

fn pin(mut batch: Batch) -> Result<Batch> {
    if tch::Cuda::is_available() {
        for t in batch.tensors_mut() {
            *t = t.f_pin_memory(Device::Cuda(0))?;
        }
    }
    Ok(batch)
}

/// How the batches are produced.
enum Mode {
    /// `num_workers = 0`: in the caller's thread.
    Inline { recent: RecentImages },
    /// Worker `w` makes batches `w, w + W, ...` into its own bounded channel; reading the
    /// channels round-robin restores the order.
    Threads {
        receivers: Vec<Receiver<Result<Batch>>>,
        handles: Vec<JoinHandle<()>>,
    },
}

/// An iterator over one epoch's batches (`Result<Batch>`); dropping it stops the workers.
pub struct DataLoader {
    maker: Arc<BatchMaker>,
    batches: Arc<Vec<Vec<usize>>>,
    start_iter: usize,
    next: usize,
    failed: bool,
    mode: Mode,
    stop: Arc<AtomicBool>,
    data_wait: Duration,
    last_wait: Duration,
}

impl DataLoader {
    /// Start loading epoch `options.epoch` of `sampler`'s indices from iteration
    /// `options.start_iter`; `transform` is the split's `Pipeline` (`Arc::new(pipeline)`).
    pub fn new(
        dataset: Arc<Dataset>,
        transform: Arc<dyn SampleTransform>,
        collator: Arc<Collator>,
        sampler: &Sampler,
        options: LoaderOptions,
    ) -> Result<Self> {
        if options.batch_size == 0 {
            return Err(DataError::Config(
                "data loader: BATCHSIZE_PER_REPLICA must be positive".into(),
            ));
        }
        let indices = sampler.indices(options.epoch);
        if let Some(&bad) = indices.iter().find(|&&i| i >= dataset.len()) {
            return Err(DataError::Config(format!(
                "data loader: the sampler produced index {bad} for a dataset of {} samples",
                dataset.len()
            )));
        }
        let mut batches: Vec<Vec<usize>> = indices
            .chunks(options.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if options.drop_last && batches.last().is_some_and(|b| b.len() < options.batch_size) {
            batches.pop();
        }
        let start_iter = options.start_iter.min(batches.len());
        let batches = Arc::new(batches);
        let maker = Arc::new(BatchMaker {
            dataset,
            transform,
            collator,
            seed: options.seed,
            epoch: options.epoch,
            pin_memory: options.pin_memory,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mode = if options.num_workers == 0 {
            Mode::Inline {
                recent: maker.dataset.recent_images(),
            }
        } else {
            spawn_workers(&maker, &batches, start_iter, &options, &stop)?
        };
        Ok(Self {
            maker,
            batches,
            start_iter,
            next: start_iter,
            failed: false,
            mode,
            stop,
            data_wait: Duration::ZERO,
            last_wait: Duration::ZERO,
        })
    }

    /// Batches in the whole epoch.
    pub fn num_batches_in_epoch(&self) -> usize {
        self.batches.len()
    }

    /// The iteration (within the epoch) of the next batch.
    pub fn next_iter(&self) -> usize {
        self.next
    }

    /// Total time the consumer waited for batches so far.
    pub fn data_wait(&self) -> Duration {
        self.data_wait
    }

    /// How long the consumer waited for the last batch.
    pub fn last_data_wait(&self) -> Duration {
        self.last_wait
    }

    /// Images that failed to load and were replaced (over the dataset's lifetime).
    pub fn replaced_images(&self) -> u64 {
        self.maker.dataset.replaced_count()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Mode::Threads { receivers, handles } = &mut self.mode {
            // Dropping the receivers wakes workers blocked on a full channel.
            receivers.clear();
            for handle in handles.drain(..) {
                if handle.join().is_err() {
                    tracing::error!("a data loader worker panicked");
                }
            }
        }
    }
}

fn spawn_workers(
    maker: &Arc<BatchMaker>,
    batches: &Arc<Vec<Vec<usize>>>,
    start_iter: usize,
    options: &LoaderOptions,
    stop: &Arc<AtomicBool>,
) -> Result<Mode> {
    let workers = options.num_workers;
    let mut receivers = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for worker in 0..workers {
        let (tx, rx) = bounded(options.prefetch_factor.max(1));
        let (maker, batches, stop) = (Arc::clone(maker), Arc::clone(batches), Arc::clone(stop));
        let handle = std::thread::Builder::new()
            .name(format!("vissl-data-{worker}"))
            .spawn(move || {
                let mut recent = maker.dataset.recent_images();
                for iteration in (start_iter + worker..batches.len()).step_by(workers) {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(result) =
                        maker.make(iteration, &batches[iteration], &mut recent, &stop)
                    else {
                        return;
                    };
                    let failed = result.is_err();
                    if tx.send(result).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| {
                DataError::Config(format!(
                    "data loader: cannot start worker thread {worker}: {e}"
                ))
            })?;
        receivers.push(rx);
        handles.push(handle);
    }
    Ok(Mode::Threads { receivers, handles })
}

impl Iterator for DataLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed || self.next >= self.batches.len() {
            return None;
        }
        let iteration = self.next;
        let started = Instant::now();
        let result = match &mut self.mode {
            Mode::Inline { recent } => {
                let never = AtomicBool::new(false);
                self.maker
                    .make(iteration, &self.batches[iteration], recent, &never)?
            }
            Mode::Threads { receivers, .. } => {
                let worker = (iteration - self.start_iter) % receivers.len();
                receivers[worker].recv().unwrap_or_else(|_| {
                    Err(DataError::Config(format!(
                        "data loader: worker {worker} stopped before delivering iteration {iteration}"
                    )))
                })
            }
        };
        self.last_wait = started.elapsed();
        self.data_wait += self.last_wait;
        self.next += 1;
        if result.is_err() {
            self.failed = true;
            self.shutdown();
        }
        Some(result)
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        self.shutdown();
    }
}
