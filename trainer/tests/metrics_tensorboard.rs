//! TensorBoard event files as TensorBoard reads them: the `tensorboard` Python package (installed into
//! `.venv` by scripts/setup) parses what the writer and a training run produce, checking every record's CRCs.

mod storage_common;

use std::path::Path;
use std::process::Command;
use storage_common::*;
use vissl_trainer::storage::{Location, Storage};
use vissl_trainer::tensorboard::{EventWriter, Histogram, Value};

fn python() -> String {
    std::env::var("VISSL_PYTHON")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python").into())
}

/// What tensorboard's reader finds in an event file (or the one file in a folder).
fn read_events(path: &Path) -> serde_json::Value {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/metrics_tensorboard_read.py"
    );
    let out = Command::new(python())
        .arg(script)
        .arg(path)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "tensorboard could not read {} (scripts/setup installs the tensorboard package):\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tensorboard_reads_back_scalars_and_histograms_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&Location::Local(dir.path().to_path_buf())).unwrap();
    let mut writer = EventWriter::create(storage).unwrap();
    for step in 0..4 {
        writer.add("Training/Loss", step, Value::Scalar(0.1 + step as f32));
    }
    // numpy.histogram([0, 1, 2, 3, 4], bins=4) -> counts [1, 1, 1, 2], edges [0, 1, 2, 3, 4].
    let histogram = Histogram::from_values(&[0.0, 1.0, 2.0, 3.0, 4.0], 4);
    writer.add("Parameters/w", -1, Value::Histogram(&histogram));
    writer.flush().unwrap();
    // A second flush appends to the same file.
    writer.add("Training/Loss", 4, Value::Scalar(-2.5));
    writer.flush().unwrap();

    let events = read_events(dir.path());
    // The file-version record plus six values.
    assert_eq!(events["records"], 7);
    let loss: Vec<(i64, f64)> =
        serde_json::from_value(events["scalars"]["Training/Loss"].clone()).unwrap();
    let want: Vec<(i64, f64)> = (0..4)
        .map(|s| (s, f64::from(0.1f32 + s as f32)))
        .chain([(4, -2.5)])
        .collect();
    assert_eq!(loss, want);
    let h = &events["histograms"]["Parameters/w"][0];
    assert_eq!(h[0], -1, "step");
    assert_eq!(
        (h[1].as_f64(), h[2].as_f64(), h[3].as_f64()),
        (Some(0.0), Some(4.0), Some(5.0))
    );
    assert_eq!((h[4].as_f64(), h[5].as_f64()), (Some(10.0), Some(30.0)));
    assert_eq!(h[6], serde_json::json!([1.0, 2.0, 3.0, 4.0]));
    assert_eq!(h[7], serde_json::json!([1.0, 1.0, 1.0, 2.0]));
}

#[test]
fn training_writes_vissl_scalars_and_histograms_to_a_bucket() {
    let moto = start_moto();
    create_bucket(moto.address, "vissl-tb");
    let tmp = tempfile::tempdir().unwrap();
    let summary = tmp.path().join("summary.json");
    let args: Vec<String> = [
        "train",
        "config=pretrain/simclr/quick_cpu_fmnist",
        "config.DATA.TRAIN.DATA_LIMIT=48",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=2",
        "config.OPTIMIZER.num_epochs=1",
        "config.LOG_FREQUENCY=1",
        "config.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
        "config.TENSORBOARD_SETUP.LOG_DIR=s3://vissl-tb/runs/one",
        "config.TENSORBOARD_SETUP.LOG_PARAMS_EVERY_N_ITERS=3",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!(
            "config.CHECKPOINT.DIR={}",
            tmp.path().join("ckpt").display()
        ),
        format!("--summary-json={}", summary.display()),
    ])
    .collect();
    let (out, text) = run(vissl(&args, &s3_env(moto.address)));
    assert!(out.status.success(), "{text}");
    let keys = list_keys(moto.address, "vissl-tb", "runs/one/tensorboard/");
    assert_eq!(keys.len(), 1, "one event file: {keys:?}");
    assert!(keys[0].contains("events.out.tfevents."), "{keys:?}");
    // TensorBoard recognises event files by name.
    let local = tmp.path().join(keys[0].rsplit('/').next().unwrap());
    std::fs::write(&local, s3_get(moto.address, "vissl-tb", &keys[0])).unwrap();
    let events = read_events(&local);

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let losses: Vec<(i64, f64)> = serde_json::from_value(summary["losses"].clone()).unwrap();
    let logged: Vec<(i64, f64)> =
        serde_json::from_value(events["scalars"]["Training/Loss"].clone()).unwrap();
    // Python's protobuf hands float fields back rounded to 15 significant digits.
    assert_eq!(
        logged.len(),
        losses.len(),
        "Training/Loss at every step (LOG_FREQUENCY 1)"
    );
    for ((step, value), (iteration, loss)) in logged.iter().zip(&losses) {
        assert_eq!(step, iteration);
        let want = f64::from(*loss as f32);
        assert!(
            (value - want).abs() <= 1e-12 * want.abs(),
            "step {step}: {value} vs {want}"
        );
    }
    for tag in [
        "Training/Learning_rate",
        "Speed/Batch_processing_time_ms",
        "Speed/img_per_sec_per_gpu",
        "Speed/Batch_size_per_gpu",
        "Speed/ETA_hours",
    ] {
        assert_eq!(
            events["scalars"][tag].as_array().map(Vec::len),
            Some(6),
            "{tag} in {}",
            events["scalars"]
        );
    }
    assert_eq!(events["scalars"]["Speed/Batch_size_per_gpu"][0][1], 8.0);
    let steps = |tag: &str| -> Vec<i64> {
        events["histograms"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no histogram {tag}"))
            .iter()
            .map(|h| h[0].as_i64().unwrap())
            .collect()
    };
    // Before training (-1) and every 3 iterations; the phase end (6) falls on one of those.
    assert_eq!(steps("Parameters/trunk.conv1.weight"), vec![-1, 3, 6]);
    assert_eq!(steps("Gradients/trunk.conv1.weight"), vec![3, 6]);
    let conv1 = &events["histograms"]["Parameters/trunk.conv1.weight"][0];
    // conv1 of the cifar stem at BASE_CHANNELS 16: 16 x 3 x 3 x 3 weights.
    assert_eq!(conv1[3].as_f64(), Some(432.0));
}
