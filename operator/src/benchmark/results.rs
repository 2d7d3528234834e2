//! The results a benchmark's rank 0 reports in its termination message (JSON written by the
//! trainer to VISSL_TERMINATION_MESSAGE_PATH), read into the status.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde::Deserialize;
use vissl_crds::api::BenchmarkResult;

use crate::group::{ATTEMPT_LABEL, NODE_RANK_LABEL};
use crate::workload::render::TRAINER_CONTAINER;

/// What the trainer writes: `{"benchmark", "output", "results": [...], "truncated"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Report {
    /// The benchmark that ran (`knn`).
    pub benchmark: String,
    /// Where the full results JSON was written, if anywhere.
    #[serde(default)]
    pub output: Option<String>,
    /// One row per features/layer/k.
    pub results: Vec<BenchmarkResult>,
    /// Rows were left out to fit Kubernetes' 4 kB message limit (the output has them all).
    #[serde(default)]
    pub truncated: bool,
}

impl Report {
    /// The headline top-1: the trained model's first row, else the first row.
    pub fn top1(&self) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.features == "trained")
            .or_else(|| self.results.first())
            .map(|r| r.top1)
    }
}

/// Parses a termination message; the error says what is wrong for the condition and Event.
pub fn parse(message: &str) -> Result<Report, String> {
    if message.trim().is_empty() {
        return Err("the trainer left no termination message (no results)".into());
    }
    let report: Report = serde_json::from_str(message)
        .map_err(|e| format!("the trainer's termination message is not a results report: {e}"))?;
    if report.results.is_empty() {
        return Err("the trainer's results report holds no results".into());
    }
    Ok(report)
}

/// The termination message of rank 0's trainer container in this attempt.
pub fn termination_message(pods: &[Pod], attempt: i32) -> Option<String> {
    let attempt = attempt.to_string();
    let rank0 = pods.iter().find(|p| {
        let labels = p.labels();
        labels.get(NODE_RANK_LABEL).map(String::as_str) == Some("0")
            && labels.get(ATTEMPT_LABEL) == Some(&attempt)
    })?;
    rank0
        .status
        .as_ref()?
        .container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == TRAINER_CONTAINER)?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"{"benchmark":"knn","output":"s3://b/ns/x/knn_results.json",
        "results":[{"features":"random_init","layer":"res5avg","k":200,"top1":70.5,"top5":98.0},
                   {"features":"trained","layer":"res5avg","k":200,"top1":75.94,"top5":99.1}],
        "truncated":false}"#;

    #[test]
    fn a_report_parses_and_the_headline_is_the_trained_row() {
        let report = parse(REPORT).expect("a valid report");
        assert_eq!(report.benchmark, "knn");
        assert_eq!(
            report.output.as_deref(),
            Some("s3://b/ns/x/knn_results.json")
        );
        assert_eq!(report.results.len(), 2);
        assert_eq!(report.results[1].k, 200);
        assert_eq!(report.results[1].top5, Some(99.1));
        assert_eq!(report.top1(), Some(75.94));
        assert!(!report.truncated);
    }

    #[test]
    fn no_output_and_only_baselines_still_parse() {
        let report = parse(
            r#"{"benchmark":"knn","output":null,"results":[{"features":"raw_pixels","layer":"input","k":20,"top1":72.6,"top5":97.0}]}"#,
        )
        .expect("a valid report");
        assert_eq!(report.output, None);
        assert_eq!(report.top1(), Some(72.6));
    }

    #[test]
    fn junk_empty_and_resultless_messages_are_errors() {
        assert!(parse("").unwrap_err().contains("no termination message"));
        assert!(parse("Traceback: boom")
            .unwrap_err()
            .contains("not a results report"));
        assert!(parse(r#"{"benchmark":"knn","output":null,"results":[]}"#)
            .unwrap_err()
            .contains("no results"));
    }

    #[test]
    fn the_message_comes_from_rank_0_of_the_current_attempt() {
        let pod = |rank: usize, attempt: i32, message: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("b-node-{rank}"), "labels": {
                    "vissl.rs/node-rank": rank.to_string(), "vissl.rs/attempt": attempt.to_string()}},
                "status": {"phase": "Succeeded", "containerStatuses": [{
                    "name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "message": message}}}]}
            }))
            .expect("a valid pod")
        };
        let pods = [
            pod(1, 1, "rank 1"),
            pod(0, 0, "old attempt"),
            pod(0, 1, "rank 0"),
        ];
        assert_eq!(termination_message(&pods, 1).as_deref(), Some("rank 0"));
        assert_eq!(termination_message(&pods, 2), None);
    }
}
