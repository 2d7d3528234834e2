//! Shared helpers of the `dist_*` integration tests: real multi-process runs.
//!
//! Collective tests re-run their own test binary once per rank (filtered to the calling test, with
//! `DIST_TEST_*` variables), so each rank is a separate process talking Gloo over loopback. Training
//! tests run the `vissl` binary, which launches its own workers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};
use tch::Tensor;
use vissl_trainer::dist::group::{ConnectOptions, ProcessGroup, Rendezvous};

/// This process's part in a self-spawned collective test.
pub struct RankCtx {
    pub rank: usize,
    pub world: usize,
    pub port: u16,
    /// Where ranks write what the parent checks.
    pub out: PathBuf,
}

impl RankCtx {
    /// Join the test's process group (Gloo on loopback) with `timeout`.
    pub fn connect(&self, timeout: Duration) -> vissl_trainer::dist::Result<ProcessGroup> {
        ProcessGroup::connect(&ConnectOptions {
            rendezvous: Rendezvous::Tcp {
                addr: "127.0.0.1".into(),
                port: self.port,
            },
            rank: self.rank,
            world_size: self.world,
            timeout,
            backend: vissl_crds::config::Backend::Gloo,
            gloo_interface: None,
            gloo_hostname: Some("127.0.0.1".into()),
            cuda_device: None,
        })
    }

    /// Write a named result of this rank.
    pub fn write(&self, name: &str, value: &serde_json::Value) {
        let path = self.out.join(format!("{name}.rank{}.json", self.rank));
        std::fs::write(&path, value.to_string()).expect("writing a rank result");
    }
}

/// In a spawned rank: its context; in the parent test: None.
pub fn rank_ctx() -> Option<RankCtx> {
    let var = |k: &str| std::env::var(k).ok();
    Some(RankCtx {
        rank: var("DIST_TEST_RANK")?.parse().ok()?,
        world: var("DIST_TEST_WORLD")?.parse().ok()?,
        port: var("DIST_TEST_PORT")?.parse().ok()?,
        out: PathBuf::from(var("DIST_TEST_OUT")?),
    })
}

/// Start `ranks` of `world` copies of this test binary running only `test_name`.
pub fn spawn_ranks(
    test_name: &str,
    ranks: &[usize],
    world: usize,
    port: u16,
    out: &Path,
) -> Vec<Child> {
    let exe = std::env::current_exe().expect("test binary path");
    ranks
        .iter()
        .map(|&rank| {
            Command::new(&exe)
                .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
                .env("DIST_TEST_RANK", rank.to_string())
                .env("DIST_TEST_WORLD", world.to_string())
                .env("DIST_TEST_PORT", port.to_string())
                .env("DIST_TEST_OUT", out)
                .env("OMP_NUM_THREADS", "1")
                // The harness's own chatter; panics and errors still reach stderr.
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawning a rank")
        })
        .collect()
}

/// Run `world` ranks of `test_name` to completion; panics naming a failed rank.
pub fn run_ranks(test_name: &str, world: usize) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let children = spawn_ranks(
        test_name,
        &(0..world).collect::<Vec<_>>(),
        world,
        port,
        out.path(),
    );
    for (rank, child) in children.into_iter().enumerate() {
        let status = wait_with_timeout(child, Duration::from_secs(120));
        assert!(
            status.success(),
            "rank {rank} of {test_name} failed: {status:?}"
        );
    }
    out
}

/// Wait for a child, killing it after `limit` (a hung collective must fail the test, not hang it).
pub fn wait_with_timeout(mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("child {} still running after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rank's named result.
pub fn read(out: &Path, name: &str, rank: usize) -> serde_json::Value {
    let path = out.join(format!("{name}.rank{rank}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("rank result is JSON")
}

/// A free loopback port.
pub fn free_port() -> u16 {
    vissl_trainer::dist::launcher::free_port().expect("free port")
}

/// A float tensor's values, flattened.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).reshape([-1])).expect("tensor values")
}

/// JSON numbers as f64s.
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// Largest absolute difference of two equally long lists.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The Python with numpy used for independent float64 references.
pub fn python() -> PathBuf {
    std::env::var_os("VISSL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
        })
}

/// Run a Python script with numpy and parse its stdout as JSON.
pub fn python_json(script: &str, input: &serde_json::Value) -> serde_json::Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("input.json");
    std::fs::write(&path, input.to_string()).expect("writing the reference input");
    let out: Output = Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("running the reference python");
    assert!(
        out.status.success(),
        "reference python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference output is JSON")
}

/// The `vissl` binary under test.
pub fn vissl() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vissl"));
    command
        .env("VISSL_PROGRESS", "plain")
        .env_remove("RUST_LOG")
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env_remove("NUM_NODES")
        .env_remove("NODE_RANK")
        .env_remove("NPROC_PER_NODE")
        .env_remove("WORLD_SIZE")
        .env_remove("VISSL_DIST_WORKER");
    command
}

/// A quick SimCLR run on 64 Fashion-MNIST images: ResNet-18 with the CIFAR stem and 8 base channels,
/// a 64-64-16 projection head, `DATA_LIMIT` 64, a constant learning rate (no auto-scaling) and a
/// checkpoint after every iteration. `nproc` ranks of `batch` images each.
pub fn quick_simclr(dir: &Path, nproc: usize, batch: usize, lr: f64, epochs: usize) -> Vec<String> {
    [
        "config=test/integration_test/quick_simclr".to_string(),
        "config.DATA.TRAIN.DATA_LIMIT=64".into(),
        format!("config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}"),
        "config.DATA.NUM_DATALOADER_WORKERS=1".into(),
        format!("config.DISTRIBUTED.NUM_PROC_PER_NODE={nproc}"),
        "config.MODEL.TRUNK.RESNETS.STEM=cifar".into(),
        "config.MODEL.TRUNK.RESNETS.BASE_CHANNELS=8".into(),
        r#"config.MODEL.HEAD.PARAMS=[["mlp",{"dims":[64,64],"use_relu":true,"skip_last_layer_relu_bn":false}],["mlp",{"dims":[64,16]}]]"#.into(),
        "config.LOSS.simclr_info_nce_loss.buffer_params.embedding_dim=16".into(),
        "config.OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale=false".into(),
        "config.OPTIMIZER.param_schedulers.lr.name=constant".into(),
        format!("config.OPTIMIZER.param_schedulers.lr.value={lr}"),
        format!("config.OPTIMIZER.num_epochs={epochs}"),
        format!("config.CHECKPOINT.DIR={}", dir.display()),
        "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1".into(),
        "config.CHECKPOINT.KEEP_LAST_K=0".into(),
    ]
    .into()
}

/// The per-iteration losses a run wrote with `--summary-json`.
pub fn summary_losses(path: &Path) -> Vec<(u64, f64)> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("summary is JSON");
    json["losses"]
        .as_array()
        .expect("losses array")
        .iter()
        .map(|p| {
            (
                p[0].as_u64().expect("iteration"),
                p[1].as_f64().expect("loss"),
            )
        })
        .collect()
}

/// The model tensors of a checkpoint folder, by name.
pub fn checkpoint_model(folder: &Path) -> Vec<(String, Tensor)> {
    let mut named = Tensor::read_safetensors(folder.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("reading {}: {e}", folder.display()));
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The checkpoint folder of iteration `iteration` under `dir`.
pub fn checkpoint_at(dir: &Path, iteration: u64) -> PathBuf {
    dir.join(format!("checkpoint_iter{iteration:09}"))
}
