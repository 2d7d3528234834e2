//! Progress from rank 0: `GET http://<pod IP>:<metrics port>/status` while the group runs. An
//! endpoint that does not answer is normal (starting, between restarts): the caller keeps the last
//! values.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vissl_crds::api::{LastCheckpoint, Progress};

/// How long one poll may take: the reconcile waits for it.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a running group is polled.
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);
/// The most a `/status` body may hold (it is about 1 kB).
const MAX_BODY: u64 = 1 << 20;

/// The part of the trainer's `/status` JSON the operator reads.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct TrainerStatus {
    /// starting, training, testing or finished.
    pub state: String,
    /// Iterations done.
    pub iteration: u64,
    /// Iterations in the run.
    pub total_iterations: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Epochs in the run.
    pub num_epochs: u64,
    /// Latest loss.
    pub loss: f64,
    /// Source images per second.
    pub images_per_second: f64,
    /// Seconds to the end.
    pub eta_seconds: f64,
    /// The newest checkpoint.
    pub checkpoint: TrainerCheckpoint,
    /// Seconds since the Unix epoch.
    pub updated_at: f64,
}

/// `checkpoint` of [`TrainerStatus`].
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct TrainerCheckpoint {
    /// Iteration of the newest complete checkpoint.
    pub last_iteration: Option<u64>,
    /// Where it is.
    pub last_location: Option<String>,
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

impl TrainerStatus {
    /// The status' progress block.
    pub fn progress(&self) -> Progress {
        let done = self
            .iteration
            .min(self.total_iterations)
            .saturating_mul(100);
        // At most 100, so the conversion cannot fail.
        let percent = done
            .checked_div(self.total_iterations)
            .map_or(0, |p| i32::try_from(p).unwrap_or(100));
        Progress {
            epoch: to_i64(self.epoch),
            num_epochs: to_i64(self.num_epochs),
            iteration: to_i64(self.iteration),
            total_iterations: to_i64(self.total_iterations),
            percent,
            loss: finite(self.loss),
            images_per_second: finite(self.images_per_second),
            eta_seconds: finite(self.eta_seconds).map(|s| s.round() as i64),
            updated_at: finite(self.updated_at)
                .filter(|s| *s > 0.0)
                .and_then(|s| Timestamp::from_millisecond((s * 1000.0) as i64).ok())
                .map(Time),
        }
    }

    /// The newest checkpoint, when the trainer reported one; its epoch is the number of whole
    /// epochs its iteration covers.
    pub fn last_checkpoint(&self) -> Option<LastCheckpoint> {
        let url = self.checkpoint.last_location.clone()?;
        let iteration = self.checkpoint.last_iteration?;
        let per_epoch = (self.num_epochs > 0 && self.total_iterations >= self.num_epochs)
            .then(|| self.total_iterations / self.num_epochs);
        Some(LastCheckpoint {
            url,
            iteration: to_i64(iteration),
            epoch: per_epoch.map(|n| to_i64(iteration / n)),
        })
    }
}

/// Fetches rank 0's status; `None` when it does not answer in time or answers nonsense.
pub async fn poll(ip: IpAddr, port: u16) -> Option<TrainerStatus> {
    let body = tokio::time::timeout(POLL_TIMEOUT, get(ip, port, "/status"))
        .await
        .ok()?
        .ok()?;
    serde_json::from_str(&body).ok()
}

/// A plain HTTP/1.1 GET (the trainer's server closes the connection after each answer).
async fn get(ip: IpAddr, port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect((ip, port)).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.take(MAX_BODY).read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no end of headers"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("answer: {}", head.lines().next().unwrap_or_default()),
        ));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::net::TcpListener;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// The JSON the trainer serves, field for field as trainer/src/metrics/mod.rs writes it.
    fn trainer_json() -> String {
        serde_json::json!({
            "state": "training", "iteration": 150, "total_iterations": 600, "epoch": 1,
            "num_epochs": 4, "loss": 5.25, "learning_rate": 0.3, "images_per_second": 812.5,
            "eta_seconds": 41.6, "data_wait_seconds": 0.1, "last_step_seconds": 0.05,
            "invalid_images": 0,
            "checkpoint": {"last_iteration": 150, "last_location": "s3://b/run/checkpoint-150",
                           "save_seconds": 0.2, "write_seconds": 0.1, "upload_seconds": 0.1,
                           "bytes": 1000, "saved": 1, "failed": 0},
            "gpu_memory_used_bytes": null, "gpu_memory_peak_bytes": null,
            "run_id": "uid-0", "config_hash": "abc", "updated_at": 1800000000.5
        })
        .to_string()
    }

    async fn serve_once(status_line: &'static str, body: String) -> u16 {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 {status_line}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn polls_and_maps_the_trainer_status() {
        let port = serve_once("200 OK", trainer_json()).await;
        let status = poll(LOCALHOST, port).await.expect("an answer");
        let progress = status.progress();
        assert_eq!(
            (
                progress.epoch,
                progress.num_epochs,
                progress.iteration,
                progress.total_iterations
            ),
            (1, 4, 150, 600)
        );
        assert_eq!(progress.percent, 25);
        assert_eq!(progress.loss, Some(5.25));
        assert_eq!(progress.images_per_second, Some(812.5));
        assert_eq!(progress.eta_seconds, Some(42));
        assert_eq!(
            progress.updated_at.map(|t| t.0.as_millisecond()),
            Some(1_800_000_000_500)
        );
        let checkpoint = status.last_checkpoint().expect("a checkpoint");
        assert_eq!(checkpoint.url, "s3://b/run/checkpoint-150");
        assert_eq!(checkpoint.iteration, 150);
        // 600 iterations over 4 epochs: 150 per epoch, so iteration 150 closes epoch 1.
        assert_eq!(checkpoint.epoch, Some(1));
    }

    #[tokio::test]
    async fn an_endpoint_that_is_down_or_failing_gives_nothing() {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let closed = listener.local_addr().expect("address").port();
        drop(listener);
        assert_eq!(poll(LOCALHOST, closed).await, None);
        let port = serve_once("500 Internal Server Error", trainer_json()).await;
        assert_eq!(poll(LOCALHOST, port).await, None);
        let port = serve_once("200 OK", "not json".into()).await;
        assert_eq!(poll(LOCALHOST, port).await, None);
    }

    #[test]
    fn no_checkpoint_yet_means_none() {
        let status = TrainerStatus::default();
        assert_eq!(status.last_checkpoint(), None);
        assert_eq!(status.progress().percent, 0);
    }
}
