//! Exact resume per method (Barlow Twins, MoCo, DINO): a short run of the method's quick config,
//! stopped and resumed, equals a straight run bitwise, model and loss state included.
//!
//! The runs seed libtorch's global generator when they build the model, so they must not overlap
//! with each other or with tests that draw from it: they live in this binary and run one at a time.

mod method_common;

use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn barlow_twins_resumes_exactly() {
    let _serial = serial();
    method_common::assert_exact_resume("pretrain/barlow_twins/quick_cpu_fmnist", &[], &[]);
}

#[test]
fn moco_resumes_exactly_with_its_queue_and_key_encoder() {
    let _serial = serial();
    method_common::assert_exact_resume(
        "pretrain/moco/quick_cpu_fmnist",
        &["config.LOSS.moco_loss.queue_size=64"],
        &["queue", "queue_ptr", "moco_encoder.trunk."],
    );
}

#[test]
fn dino_resumes_exactly_with_its_center_and_teacher() {
    let _serial = serial();
    method_common::assert_exact_resume(
        "pretrain/dino/quick_cpu_fmnist_vit",
        // With the config's stochastic depth (0.1): the engine seeds libtorch's generator per
        // step, so the resumed run drops the same paths as the straight one.
        &[],
        &["center", "momentum_teacher.trunk."],
    );
}
