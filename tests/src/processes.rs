//! The processes scenario tests start besides the cluster: a `vissl-operator` scoped to the test's namespace
//! and moto's S3 server, plus the plain HTTP requests used to talk to them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::{repo_root, wait_for, TestCluster};

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One plain HTTP/1.1 request: (status code, body).
pub fn http(address: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    http_with(address, method, path, "")
}

/// [`http`] with extra header lines (each ending in `\r\n`).
fn http_with(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
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
pub struct Operator {
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
}

impl Operator {
    /// Starts `vissl-operator run --namespace <namespace>` logging to `<dir>/<name>.log`.
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

    /// Its `/metrics` page.
    pub async fn metrics(&self) -> Result<String> {
        let address = self.metrics;
        let (code, body) =
            tokio::task::spawn_blocking(move || http(address, "GET", "/metrics")).await??;
        ensure!(code == 200, "/metrics answered {code}");
        Ok(body)
    }
}

impl Drop for Operator {
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

/// Moto's S3 server (object-store URLs of checkpoints and results), killed when dropped.
pub struct S3Server {
    child: Child,
    /// Where it listens (the AWS_ENDPOINT_URL of clients).
    pub address: SocketAddr,
}

impl S3Server {
    /// Starts moto on a free port and creates `bucket`.
    pub async fn start(bucket: &str) -> Result<Self> {
        let moto = std::env::var_os("VISSL_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join(".venv/bin/moto_server"));
        ensure!(
            moto.is_file(),
            "{} is missing: run scripts/setup (it installs moto[server] into .venv)",
            moto.display()
        );
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &address.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", moto.display()))?;
        let server = Self { child, address };
        let path = format!("/{bucket}");
        wait_for("moto to create the bucket", Duration::from_secs(60), || {
            let path = path.clone();
            async move {
                let (code, body) =
                    tokio::task::spawn_blocking(move || http(address, "PUT", &path)).await??;
                ensure!(code == 200, "PUT bucket answered {code}: {body}");
                Ok(())
            }
        })
        .await?;
        Ok(server)
    }

    /// The body of object `key` in `bucket`.
    pub async fn object(&self, bucket: &str, key: &str) -> Result<String> {
        let address = self.address;
        let path = format!("/{bucket}/{key}");
        // Moto refuses anonymous reads of private objects but does not verify signatures: any
        // SigV4-shaped Authorization header makes the request a signed one.
        let signed =
            "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
                      SignedHeaders=host, Signature=0\r\n";
        let (code, body) =
            tokio::task::spawn_blocking(move || http_with(address, "GET", &path, signed)).await??;
        ensure!(code == 200, "GET {bucket}/{key} answered {code}: {body}");
        Ok(body)
    }

    /// The object keys under `prefix` (ListObjectsV2, unsigned: moto accepts it).
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>> {
        let address = self.address;
        let path = format!("/{bucket}?list-type=2&prefix={prefix}");
        let (code, body) =
            tokio::task::spawn_blocking(move || http(address, "GET", &path)).await??;
        ensure!(code == 200, "listing answered {code}: {body}");
        Ok(body
            .split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split("</Key>").next())
            .map(str::to_string)
            .collect())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an operator scenario test starts with: the shared cluster with both of the operator's CRDs
/// (as the chart installs them; it watches both kinds), a client, a fresh namespace, a scratch
/// folder and an operator process scoped to that namespace.
pub struct OperatorScenario {
    /// The shared cluster.
    pub cluster: &'static TestCluster,
    /// An admin client.
    pub client: kube::Client,
    /// The test's own namespace.
    pub namespace: String,
    /// The operator watching it. Declared before the folder its log is in: fields drop in order,
    /// and a failing test prints that log.
    pub operator: Operator,
    /// Scratch space (checkpoints, the operator log).
    pub dir: tempfile::TempDir,
}

impl OperatorScenario {
    /// Applies the CRDs, creates a namespace named after `prefix` and starts the operator.
    pub async fn start(prefix: &str) -> Result<Self> {
        let cluster = crate::shared_cluster().await?;
        let client = cluster.client().await?;
        for crd in ["ssltrainings.vissl.rs.yaml", "benchmarks.vissl.rs.yaml"] {
            crate::apply_crd_file(&client, &repo_root().join("crds/manifests").join(crd)).await?;
        }
        let namespace = crate::create_namespace(&client, prefix).await?;
        let dir = tempfile::tempdir()?;
        let operator = Operator::start(cluster, &namespace, dir.path(), "operator")?;
        Ok(Self {
            cluster,
            client,
            namespace,
            operator,
            dir,
        })
    }

    /// The namespaced API of kind `K` in the test's namespace.
    pub fn api<K>(&self) -> kube::Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        kube::Api::namespaced(self.client.clone(), &self.namespace)
    }
}
