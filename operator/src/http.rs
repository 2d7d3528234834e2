//! A minimal HTTP/1.1 server for `/metrics`, `/healthz` and `/readyz` (one request per connection;
//! Prometheus and kubelet probes need nothing more).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// The most a request head may hold.
const MAX_REQUEST: usize = 8 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What the endpoints report.
#[derive(Clone)]
pub struct Endpoints {
    /// Series for `/metrics`.
    pub metrics: Metrics,
    /// `/readyz` answers 200 once this is true (the API server answered).
    pub ready: Arc<AtomicBool>,
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &endpoints).await {
                tracing::debug!(%error, "metrics connection ended early");
            }
        });
    }
}

/// Binds the address (errors name it).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on --metrics-addr {addr}"))
}

async fn answer(mut stream: TcpStream, endpoints: &Endpoints) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = route(method, path, endpoints);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if method == "HEAD" { "" } else { body.as_str() }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn route(method: &str, path: &str, endpoints: &Endpoints) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            endpoints.metrics.render(),
        ),
        ("GET" | "HEAD", "/healthz") => ("200 OK", TEXT, "ok\n".into()),
        ("GET" | "HEAD", "/readyz") if endpoints.ready.load(Ordering::Relaxed) => {
            ("200 OK", TEXT, "ready\n".into())
        }
        ("GET" | "HEAD", "/readyz") => (
            "503 Service Unavailable",
            TEXT,
            "not ready: the API server has not answered yet\n".into(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            TEXT,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
        _ => ("405 Method Not Allowed", TEXT, "only GET and HEAD\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(ready: bool) -> Endpoints {
        Endpoints {
            metrics: Metrics::new().expect("metrics"),
            ready: Arc::new(AtomicBool::new(ready)),
        }
    }

    #[test]
    fn routes_metrics_health_and_readiness() {
        let e = endpoints(false);
        e.metrics.reconcile_started();
        let (status, _, body) = route("GET", "/metrics", &e);
        assert_eq!(status, "200 OK");
        assert!(body.contains("vissl_operator_reconciles_total 1"), "{body}");
        assert_eq!(route("GET", "/healthz", &e).0, "200 OK");
        assert_eq!(route("GET", "/readyz", &e).0, "503 Service Unavailable");
        assert_eq!(route("GET", "/readyz", &endpoints(true)).0, "200 OK");
        assert_eq!(route("GET", "/nope", &e).0, "404 Not Found");
        assert_eq!(route("POST", "/metrics", &e).0, "405 Method Not Allowed");
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(listener, endpoints(true)));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("ready\n"), "{response}");
    }
}
