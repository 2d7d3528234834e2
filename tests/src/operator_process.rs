//! A `vissl-operator run` process for scenario tests, and the small network helpers they share.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::{repo_root, TestCluster};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One plain HTTP/1.1 request: (status code, body).
pub fn http(address: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((code, body.to_string()))
}

/// A `vissl-operator run` process watching one namespace; killed (SIGKILL) when dropped.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
}

impl OperatorProcess {
    /// Starts the release binary (or $VISSL_OPERATOR_BIN) for `namespace`, logging to `dir/<name>.log`.
    pub fn start(cluster: &TestCluster, namespace: &str, dir: &Path, name: &str) -> Result<Self> {
        let binary = std::env::var_os("VISSL_OPERATOR_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/release/vissl-operator"));
        ensure!(
            binary.is_file(),
            "{} is missing: build it with `cargo build --release --bins` (make test does)",
            binary.display()
        );
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&binary)
            .args(["run", "--namespace", namespace, "--metrics-addr"])
            .arg(metrics.to_string())
            .arg("--configs-root")
            .arg(repo_root().join("configs"))
            .env("KUBECONFIG", cluster.control_plane.kubeconfig_path())
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child,
            log,
            metrics,
        })
    }

    /// The last 40 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills it (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its /metrics text.
    pub async fn metrics(&self) -> Result<String> {
        let address = self.metrics;
        let (code, body) =
            tokio::task::spawn_blocking(move || http(address, "GET", "/metrics")).await??;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        // The test harness shows a test's output only when it fails: that is when this log matters.
        eprintln!(
            "==== operator log ({}) ====\n{}",
            self.log.display(),
            self.log_tail()
        );
        self.kill();
    }
}
