//! The loader: deterministic batches across runs, worker counts and resumes; errors surface;
//! dropping it stops the workers.

mod data_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use data_common::{floats, ints, marked_image, split_config, write_png, ToTensorJitter};
use rand_pcg::Pcg64Mcg;
use vissl_trainer::data::collators::{self, Batch};
use vissl_trainer::data::dataset::{Dataset, SampleTransform};
use vissl_trainer::data::loader::{DataLoader, LoaderOptions};
use vissl_trainer::data::sampler::{DistributedSampler, Sampler};
use vissl_trainer::data::{ChwTensor, Item, Result, Sample};

/// A 23-image ImageFolder with one corrupt file (index 5 in folder order).
fn dataset(dir: &std::path::Path) -> Arc<Dataset> {
    for i in 0..23u8 {
        let path = dir.join(format!("c{}/{i:02}.png", i % 3));
        if i == 15 {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"corrupt").unwrap();
        } else {
            write_png(&path, &marked_image(4, 4, [i * 5, 7, 9], i));
        }
    }
    let cfg = split_config(&format!(
        "{{DATA_SOURCES: [disk_folder], DATA_PATHS: ['{}'], LABEL_SOURCES: [disk_folder], DEFAULT_GRAY_IMG_SIZE: 4}}",
        dir.display()
    ));
    Arc::new(Dataset::from_config("TRAIN", &cfg, None).unwrap())
}

fn options(workers: usize, start_iter: usize, drop_last: bool) -> LoaderOptions {
    LoaderOptions {
        batch_size: 4,
        drop_last,
        num_workers: workers,
        seed: 42,
        epoch: 3,
        start_iter,
        pin_memory: false,
        prefetch_factor: 2,
    }
}

/// A batch as plain numbers (data, label, data_valid, data_idx), for comparisons.
type Flat = (Vec<Vec<f32>>, Vec<Vec<i64>>, Vec<Vec<i64>>, Vec<Vec<i64>>);

/// A batch as plain numbers, for comparisons.
fn flatten(b: &Batch) -> Flat {
    (
        b.data.iter().map(floats).collect(),
        b.label.iter().map(ints).collect(),
        b.data_valid.iter().map(ints).collect(),
        b.data_idx.iter().map(ints).collect(),
    )
}

fn run(
    ds: &Arc<Dataset>,
    sampler: &Sampler,
    transform: Arc<dyn SampleTransform>,
    opts: LoaderOptions,
) -> Vec<Flat> {
    let collator =
        Arc::new(collators::build("default_collate", &serde_yaml::Mapping::new()).unwrap());
    DataLoader::new(Arc::clone(ds), transform, collator, sampler, opts)
        .unwrap()
        .map(|b| flatten(&b.unwrap()))
        .collect()
}

#[test]
fn batches_are_identical_across_runs_worker_counts_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let sampler =
        Sampler::Distributed(DistributedSampler::new(ds.len(), 1, 0, true, 42, false).unwrap());
    let t: Arc<dyn SampleTransform> = Arc::new(ToTensorJitter);

    let reference = run(&ds, &sampler, Arc::clone(&t), options(0, 0, false));
    assert_eq!(reference.len(), 6, "23 samples in batches of 4");
    assert_eq!(
        reference.last().unwrap().3[0].len(),
        3,
        "short last batch kept"
    );
    // The epoch covers every sample once, in the sampler's order.
    let order: Vec<i64> = reference.iter().flat_map(|b| b.3[0].clone()).collect();
    let expected: Vec<i64> = sampler.indices(3).iter().map(|&i| i as i64).collect();
    assert_eq!(order, expected);

    assert_eq!(
        run(&ds, &sampler, Arc::clone(&t), options(0, 0, false)),
        reference,
        "second run"
    );
    for workers in [1, 2, 3, 7] {
        assert_eq!(
            run(&ds, &sampler, Arc::clone(&t), options(workers, 0, false)),
            reference,
            "{workers} workers"
        );
    }
    for start_iter in [1, 3, 5] {
        let resumed = run(&ds, &sampler, Arc::clone(&t), options(2, start_iter, false));
        assert_eq!(
            resumed,
            reference[start_iter..].to_vec(),
            "resume at {start_iter}"
        );
    }
    let dropped = run(&ds, &sampler, Arc::clone(&t), options(2, 0, true));
    assert_eq!(
        dropped,
        reference[..5].to_vec(),
        "DROP_LAST drops the short batch"
    );

    // Another epoch is another order and other random draws.
    let mut other = options(2, 0, false);
    other.epoch = 4;
    assert_ne!(run(&ds, &sampler, Arc::clone(&t), other), reference);
}

#[test]
fn a_corrupt_image_is_replaced_and_counted_while_the_epoch_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let sampler =
        Sampler::Distributed(DistributedSampler::new(ds.len(), 1, 0, false, 0, false).unwrap());
    let collator =
        Arc::new(collators::build("default_collate", &serde_yaml::Mapping::new()).unwrap());
    let mut loader = DataLoader::new(
        Arc::clone(&ds),
        Arc::new(ToTensorJitter),
        collator,
        &sampler,
        options(2, 0, false),
    )
    .unwrap();
    let mut invalid = Vec::new();
    for batch in loader.by_ref() {
        let (_, _, valid, idx) = flatten(&batch.unwrap());
        invalid.extend(
            idx[0]
                .iter()
                .zip(&valid[0])
                .filter(|(_, &v)| v == -1)
                .map(|(&i, _)| i),
        );
    }
    // The corrupt file 15.png is in class c0, the 6th of its 8 files: index 5 in folder order.
    assert_eq!(invalid, vec![5]);
    assert_eq!(loader.replaced_images(), 1);
    assert!(loader.data_wait() > Duration::ZERO);
}

/// Makes sample 9 larger than the others, so its batch cannot be stacked.
struct OddOneOut;

impl SampleTransform for OddOneOut {
    fn apply(&self, sample: &mut Sample, rng: &mut Pcg64Mcg) -> Result<()> {
        ToTensorJitter.apply(sample, rng)?;
        if sample.data_idx[0] == 9 {
            sample.data[0] = Item::Tensor(ChwTensor::zeros(3, 5, 5));
        }
        Ok(())
    }
}

#[test]
fn a_collate_error_surfaces_with_context_and_ends_the_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset(tmp.path());
    let sampler =
        Sampler::Distributed(DistributedSampler::new(ds.len(), 1, 0, false, 0, false).unwrap());
    for workers in [0, 2] {
        let collator =
            Arc::new(collators::build("simclr_collator", &serde_yaml::Mapping::new()).unwrap());
        let loader = DataLoader::new(
            Arc::clone(&ds),
            Arc::new(OddOneOut),
            collator,
            &sampler,
            options(workers, 0, false),
        )
        .unwrap();
        let results: Vec<_> = loader.collect();
        assert_eq!(
            results.len(),
            3,
            "two good batches, then the error, then nothing ({workers} workers)"
        );
        assert!(results[0].is_ok() && results[1].is_ok());
        let err = results[2].as_ref().err().unwrap().to_string();
        assert!(
            err.contains("simclr_collator")
                && err.contains("iteration 2")
                && err.contains("[3, 5, 5]"),
            "{err}"
        );
    }
}

/// A slow transform, so that workers are busy when the loader is dropped.
struct Slow;

impl SampleTransform for Slow {
    fn apply(&self, sample: &mut Sample, rng: &mut Pcg64Mcg) -> Result<()> {
        std::thread::sleep(Duration::from_millis(20));
        ToTensorJitter.apply(sample, rng)
    }
}

#[test]
fn dropping_the_loader_stops_the_workers_promptly() {
    let cfg = split_config("{DATA_SOURCES: [synthetic], DEFAULT_GRAY_IMG_SIZE: 8}");
    let ds = Arc::new(Dataset::from_config("TRAIN", &cfg, None).unwrap());
    let sampler =
        Sampler::Distributed(DistributedSampler::new(ds.len(), 1, 0, true, 0, false).unwrap());
    let collator =
        Arc::new(collators::build("default_collate", &serde_yaml::Mapping::new()).unwrap());
    let mut opts = options(3, 0, false);
    opts.batch_size = 64;
    let mut loader = DataLoader::new(ds, Arc::new(Slow), collator, &sampler, opts).unwrap();
    assert!(loader.next().unwrap().is_ok());
    let started = Instant::now();
    drop(loader);
    // Each worker is at most one 20 ms sample away from noticing the stop flag.
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "drop took {:?}",
        started.elapsed()
    );
}

#[test]
fn options_from_config_pin_only_for_cuda() {
    let split = split_config("{BATCHSIZE_PER_REPLICA: 32, DROP_LAST: true}");
    let data: vissl_crds::config::DataConfig = serde_yaml::from_value(
        serde_yaml::to_value(serde_yaml::Mapping::from_iter([
            ("NUM_DATALOADER_WORKERS".into(), 5.into()),
            ("PIN_MEMORY".into(), true.into()),
            ("ENABLE_ASYNC_GPU_COPY".into(), true.into()),
            ("DDP_BUCKET_CAP_MB".into(), 25.into()),
            ("TRAIN".into(), serde_yaml::to_value(&split).unwrap()),
            ("TEST".into(), serde_yaml::to_value(&split).unwrap()),
        ]))
        .unwrap(),
    )
    .unwrap();
    let cpu = LoaderOptions::from_config(&data, &split, 1, 2, 3, tch::Device::Cpu);
    assert_eq!(
        (
            cpu.batch_size,
            cpu.drop_last,
            cpu.num_workers,
            cpu.pin_memory
        ),
        (32, true, 5, false)
    );
    assert_eq!((cpu.seed, cpu.epoch, cpu.start_iter), (1, 2, 3));
    assert!(LoaderOptions::from_config(&data, &split, 1, 2, 3, tch::Device::Cuda(0)).pin_memory);
}
