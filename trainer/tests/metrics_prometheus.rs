//! A real Prometheus (Debian's `prometheus`, installed by scripts/setup) scrapes a running `vissl train`
//! and its query API returns the loss; the trainer's `/status` reports the same run.

mod storage_common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;
use storage_common::*;

/// A child process killed (by its own id) and reaped on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get_json(address: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (code, body) = http(address, "GET", path, &[]).ok()?;
    (code == 200).then(|| serde_json::from_slice(&body).ok())?
}

fn prometheus_binary() -> String {
    let binary = std::env::var("VISSL_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let found = Command::new(&binary)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{binary}` not found: run scripts/setup (it installs Debian's prometheus) or set VISSL_PROMETHEUS"
    );
    binary
}

#[test]
fn prometheus_scrapes_the_loss_from_a_running_training() {
    let prometheus = prometheus_binary();
    let tmp = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    // Long enough to outlive the test; it is killed at the end.
    let args: Vec<String> = [
        "train",
        "config=pretrain/simclr/quick_cpu_fmnist",
        "config.DATA.TRAIN.DATA_LIMIT=48",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.DATA.NUM_DATALOADER_WORKERS=1",
        "config.OPTIMIZER.num_epochs=1000",
        "config.HOOKS.PROMETHEUS_SETUP.USE_PROMETHEUS=true",
        "config.HOOKS.PROMETHEUS_SETUP.BIND_ADDRESS=127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("config.HOOKS.PROMETHEUS_SETUP.PORT={metrics_port}"),
        format!(
            "config.CHECKPOINT.DIR={}",
            tmp.path().join("ckpt").display()
        ),
    ])
    .collect();
    let mut command = vissl(&args, &[]);
    command
        .env("VISSL_RUN_ID", "prom-test")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _trainer = Killed(command.spawn().expect("vissl starts"));
    wait_for("the trainer's /healthz", Duration::from_secs(120), || {
        http(metrics, "GET", "/healthz", &[]).is_ok_and(|(code, _)| code == 200)
    });

    let web_port = free_port();
    let config = tmp.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: vissl\n    \
             static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let mut command = Command::new(prometheus);
    command.args([
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", tmp.path().join("tsdb").display()),
        format!("--web.listen-address=127.0.0.1:{web_port}"),
    ]);
    let server = start_server(
        command,
        SocketAddr::from(([127, 0, 0, 1], web_port)),
        "prometheus",
    );

    // The first scrape after a training step: vissl_loss with the job's labels.
    let mut result = serde_json::Value::Null;
    wait_for(
        "Prometheus to return vissl_loss",
        Duration::from_secs(120),
        || {
            result = get_json(
                server.address,
                "/api/v1/query?query=vissl_loss%20and%20vissl_iteration%20%3E%200",
            )
            .unwrap_or_default();
            result["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        },
    );
    let series = &result["data"]["result"][0];
    assert_eq!(series["metric"]["__name__"], "vissl_loss", "{result}");
    assert_eq!(series["metric"]["job"], "vissl");
    assert_eq!(series["metric"]["instance"], metrics.to_string());
    let loss: f64 = series["value"][1].as_str().unwrap().parse().unwrap();
    // SimCLR's loss with 2 x 8 views lies between 0 and ln(15).
    assert!(loss > 0.0 && loss < 15f64.ln() + 1.0, "loss {loss}");

    let up = get_json(server.address, "/api/v1/query?query=up").unwrap();
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let info = get_json(server.address, "/api/v1/query?query=vissl_run_info").unwrap();
    assert_eq!(
        info["data"]["result"][0]["metric"]["run_id"], "prom-test",
        "{info}"
    );

    let status = get_json(metrics, "/status").expect("/status answers");
    assert_eq!(status["state"], "training", "{status}");
    assert!(status["iteration"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["total_iterations"], 6000);
    assert!(status["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(status["run_id"], "prom-test");
}
