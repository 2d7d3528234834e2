//! End-to-end training on real Fashion-MNIST images: the loss falls, checkpoints are written, and a run
//! stopped (mid-epoch or at an epoch boundary) and resumed is bitwise the same as one run straight through.

use std::path::Path;
use tch::Tensor;
use vissl_crds::config::{load, Config, LoadOptions};
use vissl_trainer::checkpoint;
use vissl_trainer::engine::{RunOptions, RunSummary, Trainer};

/// A tiny SimCLR run: the quickstart model on 28x28 crops, 96 images in batches of 16 (6 steps/epoch).
fn config(dir: &Path, extra: &[&str]) -> Config {
    let mut args: Vec<String> = vec![
        "config=pretrain/simclr/quick_cpu_fmnist".into(),
        format!("config.CHECKPOINT.DIR={}", dir.display()),
        "config.DATA.TRAIN.DATA_LIMIT=96".into(),
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16".into(),
        "config.DATA.NUM_DATALOADER_WORKERS=2".into(),
        "config.OPTIMIZER.num_epochs=2".into(),
        "config.CHECKPOINT.KEEP_LAST_K=-1".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    load(&LoadOptions::default(), &args).expect("test config loads")
}

/// Training runs seed libtorch's global generator and draw the model's weights from it, so
/// runs of parallel tests in this binary take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run(config: Config, stop_after: Option<u64>) -> RunSummary {
    let _turn = turn();
    Trainer::new(
        config,
        RunOptions {
            stop_after_iterations: stop_after,
            ..RunOptions::default()
        },
    )
    .expect("trainer builds")
    .train()
    .expect("training runs")
}

fn final_model(dir: &Path) -> Vec<(String, Tensor)> {
    let ckpt = checkpoint::latest(dir)
        .unwrap()
        .expect("a checkpoint exists");
    let mut tensors = ckpt.tensors("model").unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn assert_bitwise_equal(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "tensor {na} differs after resume");
    }
}

#[test]
fn resumed_runs_equal_a_straight_run_bitwise() {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(config(straight_dir.path(), &[]), None);
    assert_eq!(straight.iterations, 12);
    assert_eq!(straight.losses.len(), 12);

    // Stopped mid-epoch (after step 4 of 6), then at the epoch boundary (step 6), then to the end.
    let resumed_dir = tempfile::tempdir().unwrap();
    let first = run(config(resumed_dir.path(), &[]), Some(4));
    assert_eq!(first.iterations, 4);
    let second = run(config(resumed_dir.path(), &[]), Some(6));
    assert_eq!(second.iterations, 6);
    let third = run(config(resumed_dir.path(), &[]), None);
    assert_eq!(third.iterations, 12);

    let resumed: Vec<(u64, f64)> = [first.losses, second.losses, third.losses].concat();
    assert_eq!(
        resumed, straight.losses,
        "per-iteration losses must match bitwise"
    );
    assert_bitwise_equal(
        &final_model(straight_dir.path()),
        &final_model(resumed_dir.path()),
    );
}

#[test]
fn loss_falls_and_checkpoints_are_written_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let summary = run(config(dir.path(), &["config.OPTIMIZER.num_epochs=4"]), None);
    let mean = |s: &[(u64, f64)]| s.iter().map(|(_, l)| l).sum::<f64>() / s.len() as f64;
    let first = mean(&summary.losses[..6]);
    let last = mean(&summary.losses[summary.losses.len() - 6..]);
    assert!(
        last < first - 0.05,
        "loss did not fall: first epoch {first:.4}, last epoch {last:.4}"
    );
    // CHECKPOINT_FREQUENCY 1: one verified checkpoint per epoch, the newest at the last iteration.
    let folders = checkpoint::list(dir.path()).unwrap();
    assert_eq!(folders.len(), 4);
    let newest = checkpoint::latest(dir.path()).unwrap().unwrap();
    assert_eq!(newest.manifest.position.iteration, 24);
}

#[test]
fn a_damaged_newest_checkpoint_is_skipped_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    run(config(dir.path(), &[]), Some(6));
    run(config(dir.path(), &[]), Some(9));
    // Corrupt the newest checkpoint (iteration 9): resume must fall back to iteration 6 and redo 7..12.
    let newest = dir
        .path()
        .join(checkpoint::folder_name(9))
        .join("model.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&newest, bytes).unwrap();
    let resumed = run(config(dir.path(), &[]), None);
    assert_eq!(resumed.losses.first().map(|(i, _)| *i), Some(7));
    assert_eq!(resumed.iterations, 12);
}

#[test]
fn a_nan_loss_stops_the_run_naming_the_iteration() {
    let dir = tempfile::tempdir().unwrap();
    // An absurd learning rate makes the weights (and the loss) blow up within a few steps.
    let cfg = config(
        dir.path(),
        &[
            "config.OPTIMIZER.param_schedulers.lr.schedulers.0.start_value=1e30",
            "config.OPTIMIZER.param_schedulers.lr.schedulers.0.end_value=1e30",
            "config.OPTIMIZER.param_schedulers.lr.schedulers.1.start_value=1e30",
        ],
    );
    let _turn = turn();
    let err = Trainer::new(cfg, RunOptions::default())
        .unwrap()
        .train()
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("at iteration") && msg.contains("CHECK_NAN"),
        "{msg}"
    );
}

#[test]
fn supervised_training_reports_test_accuracy_above_chance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        &LoadOptions::default(),
        &[
            "config=test/integration_test/quick_supervised_fmnist".to_string(),
            format!("config.CHECKPOINT.DIR={}", dir.path().display()),
        ],
    )
    .unwrap();
    let summary = run(cfg, None);
    let reading = summary
        .test_meters
        .first()
        .expect("accuracy_list_meter ran in the test phase");
    let (k, top1) = reading.topk[0];
    assert_eq!(k, 1);
    // Ten classes: chance is 10%. Two short epochs on 1,024 images reach well above it.
    assert!(top1 > 25.0, "test top-1 {top1:.1}%");
    let (k5, top5) = reading.topk[1];
    assert_eq!(k5, 5);
    assert!(top5 >= top1);
}
