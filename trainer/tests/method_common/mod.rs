//! The exact-resume check shared by the method tests: a short run of a method's quick config on a
//! few Fashion-MNIST images, straight through and stopped/resumed mid-epoch and at an epoch
//! boundary, must give bitwise the same per-iteration losses, model and loss state (queues,
//! encoders, teachers, centers).

use std::path::Path;
use tch::Tensor;
use vissl_crds::config::{load, Config, LoadOptions};
use vissl_trainer::checkpoint;
use vissl_trainer::engine::{RunOptions, RunSummary, Trainer};

/// `config=<quick>` on 96 images in batches of 16 (6 steps per epoch, 2 epochs) plus `extra`.
fn config(quick: &str, dir: &Path, extra: &[&str]) -> Config {
    let mut args: Vec<String> = vec![
        format!("config={quick}"),
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

fn run(config: Config, stop_after: Option<u64>) -> RunSummary {
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

/// The newest checkpoint's tensors of `group` (`model`, `loss`), sorted by name.
fn saved(dir: &Path, group: &str) -> Vec<(String, Tensor)> {
    let ckpt = checkpoint::latest(dir)
        .unwrap()
        .expect("a checkpoint exists");
    let mut tensors = ckpt.tensors(group).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn assert_bitwise_equal(what: &str, a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: tensor names");
    for ((name, ta), (_, tb)) in a.iter().zip(b) {
        assert!(ta.equal(tb), "{what}: tensor {name} differs after resume");
    }
}

/// Runs the check for `quick` with `extra` overrides; `state_names` must appear in the loss state.
pub fn assert_exact_resume(quick: &str, extra: &[&str], state_names: &[&str]) {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = run(config(quick, straight_dir.path(), extra), None);
    assert_eq!(straight.iterations, 12);

    let resumed_dir = tempfile::tempdir().unwrap();
    let first = run(config(quick, resumed_dir.path(), extra), Some(4));
    let second = run(config(quick, resumed_dir.path(), extra), Some(6));
    let third = run(config(quick, resumed_dir.path(), extra), None);
    assert_eq!(
        (first.iterations, second.iterations, third.iterations),
        (4, 6, 12)
    );
    let resumed: Vec<(u64, f64)> = [first.losses, second.losses, third.losses].concat();
    assert_eq!(resumed, straight.losses, "per-iteration losses, bitwise");
    // A stateless loss writes no `loss` group.
    let groups: &[&str] = if state_names.is_empty() {
        &["model"]
    } else {
        &["model", "loss"]
    };
    for &group in groups {
        assert_bitwise_equal(
            group,
            &saved(straight_dir.path(), group),
            &saved(resumed_dir.path(), group),
        );
    }
    let loss_state = if state_names.is_empty() {
        Vec::new()
    } else {
        saved(straight_dir.path(), "loss")
    };
    for name in state_names {
        assert!(
            loss_state.iter().any(|(n, _)| n.starts_with(name)),
            "loss state has {name}: {:?}",
            loss_state.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    }
}
