//! Real servers for the storage and metrics tests, started on 127.0.0.1 with free ports and stopped on
//! drop: moto's S3 server (`moto_server` in `.venv`, installed by scripts/setup), a TCP proxy that can cut
//! the connection to it (an S3 outage), and plain HTTP helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The credentials the tests give moto (it checks none).
pub const ACCESS_KEY: &str = "vissl-test-key";
pub const SECRET_KEY: &str = "vissl-test-secret";
pub const REGION: &str = "us-east-1";

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// A tool installed into the repository's `.venv` (overridable with `env_var`).
pub fn venv_tool(name: &str, env_var: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return PathBuf::from(path);
    }
    let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin")).join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup (it installs the test servers), or set {env_var}",
        path.display()
    );
    path
}

/// Wait until `check` holds, or fail after `timeout` saying `what`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (by its own id) and reaped on drop.
pub struct Server {
    pub child: Child,
    pub address: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// The server's output so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `command` with its output in a log file, then wait until `address` answers HTTP.
pub fn start_server(mut command: Command, address: SocketAddr, what: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut server = Server {
        child,
        address,
        log,
        _dir: dir,
    };
    let started = Instant::now();
    loop {
        if http(address, "GET", "/", &[]).is_ok() {
            return server;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{what} exited with {status}:\n{}", server.log());
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not answer on {address}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// moto's S3 server on a free port.
pub fn start_moto() -> Server {
    let port = free_port();
    let mut command = Command::new(venv_tool("moto_server", "VISSL_MOTO_SERVER"));
    command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    start_server(
        command,
        SocketAddr::from(([127, 0, 0, 1], port)),
        "moto_server",
    )
}

/// One plain HTTP/1.1 request: (status code, body). S3 requests without a signature are accepted by moto.
pub fn http(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((code, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// The S3 object keys under `prefix` in `bucket` (a ListObjectsV2 call, first 1000 keys).
pub fn list_keys(moto: SocketAddr, bucket: &str, prefix: &str) -> Vec<String> {
    let (code, body) = http(
        moto,
        "GET",
        &format!("/{bucket}?list-type=2&prefix={prefix}"),
        &[],
    )
    .expect("listing the bucket");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8_lossy(&body);
    text.split("<Key>")
        .skip(1)
        .filter_map(|s| s.split("</Key>").next())
        .map(str::to_string)
        .collect()
}

/// Create `bucket` on moto.
pub fn create_bucket(moto: SocketAddr, bucket: &str) {
    let (code, body) = http(moto, "PUT", &format!("/{bucket}"), &[]).expect("creating a bucket");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
}

/// Run `op` against `bucket` on the S3 server at `endpoint` with the test credentials, through a client
/// configured here (not from this process's environment, which other tests leave alone).
fn with_s3<T>(
    endpoint: SocketAddr,
    bucket: &str,
    op: impl FnOnce(
        object_store::aws::AmazonS3,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>,
) -> T {
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://{endpoint}"))
        .with_allow_http(true)
        .with_region(REGION)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .with_bucket_name(bucket)
        .build()
        .expect("an S3 client for the test server");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(op(store))
}

/// Write object `key` of `bucket`.
pub fn s3_put(endpoint: SocketAddr, bucket: &str, key: &str, bytes: Vec<u8>) {
    use object_store::ObjectStoreExt;
    let key = object_store::path::Path::from(key);
    with_s3(endpoint, bucket, move |store| {
        Box::pin(async move { store.put(&key, bytes.into()).await.map(|_| ()) })
    })
    .expect("writing a test object");
}

/// Read object `key` of `bucket`.
pub fn s3_get(endpoint: SocketAddr, bucket: &str, key: &str) -> Vec<u8> {
    use object_store::ObjectStoreExt;
    let key = object_store::path::Path::from(key);
    with_s3(endpoint, bucket, move |store| {
        Box::pin(async move {
            match store.get(&key).await {
                Ok(result) => result.bytes().await.map(|b| b.to_vec()),
                Err(e) => Err(e),
            }
        })
    })
    .expect("reading a test object")
}

/// The environment that points the trainer at `endpoint` with the test credentials.
pub fn s3_env(endpoint: SocketAddr) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("AWS_REGION", REGION.into()),
        ("AWS_ENDPOINT_URL", format!("http://{endpoint}")),
        ("AWS_ALLOW_HTTP", "true".into()),
    ]
}

/// The `vissl` binary with the test environment: plain progress lines, no inherited AWS settings.
pub fn vissl(args: &[String], env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vissl"));
    command.args(args).env("VISSL_PROGRESS", "plain");
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") || key.starts_with("VISSL_STORAGE") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command
}

/// Run a command to the end: its output with stdout and stderr together.
pub fn run(mut command: Command) -> (Output, String) {
    let out = command.output().expect("the command runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// A TCP proxy in front of a server whose link can be cut: while cut, open connections are closed and
/// new ones are refused, as when the server stops. It cuts itself once `cut_after_bytes` have gone to
/// the server, for `outage`.
pub struct Proxy {
    pub address: SocketAddr,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub forwarded: Arc<AtomicU64>,
    pub cuts: Arc<AtomicU64>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr, cut_after_bytes: Option<u64>, outage: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let cuts = Arc::new(AtomicU64::new(0));
        let trigger = Arc::new(AtomicU64::new(cut_after_bytes.unwrap_or(u64::MAX)));
        let proxy = Proxy {
            address,
            down: down.clone(),
            stop: stop.clone(),
            forwarded: forwarded.clone(),
            cuts: cuts.clone(),
        };
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if down.load(Ordering::Relaxed) {
                            drop(client);
                            continue;
                        }
                        let Ok(server) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let link = Link {
                            down: down.clone(),
                            forwarded: forwarded.clone(),
                            cuts: cuts.clone(),
                            trigger: trigger.clone(),
                            outage,
                        };
                        link.spawn(client, server);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        proxy
    }

    /// Whether the link is cut now.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Link {
    down: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
    trigger: Arc<AtomicU64>,
    outage: Duration,
}

impl Link {
    fn spawn(self, client: TcpStream, server: TcpStream) {
        for s in [&client, &server] {
            s.set_nonblocking(false).ok();
            s.set_read_timeout(Some(Duration::from_millis(50))).ok();
        }
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let up = self.clone();
        std::thread::spawn(move || up.pump(client, server, true));
        std::thread::spawn(move || self.pump(s2, c2, false));
    }

    /// Copy `from` -> `to` until either side closes or the link goes down.
    fn pump(self, mut from: TcpStream, mut to: TcpStream, upstream: bool) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if self.down.load(Ordering::Relaxed) {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            if upstream {
                let total = self.forwarded.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                let trigger = self.trigger.load(Ordering::Relaxed);
                if total >= trigger
                    && self
                        .trigger
                        .compare_exchange(trigger, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    self.cut();
                    break;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    }

    fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.down.store(true, Ordering::Relaxed);
        let (down, outage) = (self.down.clone(), self.outage);
        std::thread::spawn(move || {
            std::thread::sleep(outage);
            down.store(false, Ordering::Relaxed);
        });
    }
}
