//! What a benchmark reports: the results file and the Kubernetes termination message. Plain serde types
//! (no libtorch), so the operator, which parses the termination message of a `Benchmark`'s pods, can
//! share them.

use serde::{Deserialize, Serialize};

/// The `benchmark` name of kNN reports.
pub const KNN: &str = "knn";

/// The kubelet keeps at most this many bytes of a container's termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// One accuracy of a kNN run: features of one kind at one layer, `k` neighbours voting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnResult {
    /// `trained`, `random_init` or `raw_pixels`.
    pub features: String,
    /// The layer the features come from (`res5avg`, `heads`, `input`, ...).
    pub layer: String,
    /// Neighbours that voted (NEAREST_NEIGHBOR.TOPK).
    pub k: usize,
    /// Top-1 accuracy in percent.
    pub top1: f64,
    /// Top-5 accuracy in percent.
    pub top5: f64,
}

/// The results file of `vissl benchmark knn` (`--output`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkReport {
    /// Which benchmark ([`KNN`]).
    pub benchmark: String,
    /// The weights actually loaded: the resolved checkpoint folder or file; `null` for `--random-init`.
    pub weights: Option<String>,
    /// Samples of DATA.TRAIN (the memory bank).
    pub train_samples: usize,
    /// Samples of DATA.TEST (the queries).
    pub test_samples: usize,
    /// Wall-clock seconds of the whole benchmark.
    pub seconds: f64,
    /// One row per feature kind and `k`.
    pub results: Vec<KnnResult>,
}

/// The compact JSON a benchmark pod leaves in its termination message on success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminationMessage {
    /// Which benchmark ([`KNN`]).
    pub benchmark: String,
    /// Where the full results file was written.
    pub output: Option<String>,
    /// The accuracies, percentages rounded to two decimals.
    pub results: Vec<KnnResult>,
    /// Rows were dropped from the end to stay within the kubelet's limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

fn two_decimals(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

impl TerminationMessage {
    /// The message for `results` written to `output`.
    pub fn new(benchmark: &str, output: Option<String>, results: &[KnnResult]) -> Self {
        Self {
            benchmark: benchmark.to_string(),
            output,
            results: results
                .iter()
                .map(|r| KnnResult {
                    top1: two_decimals(r.top1),
                    top5: two_decimals(r.top5),
                    ..r.clone()
                })
                .collect(),
            truncated: false,
        }
    }

    /// Compact JSON of at most `limit` bytes: rows are dropped from the end (and `truncated` set) until it
    /// fits; should even no row fit, the output location goes too.
    pub fn to_json_within(&self, limit: usize) -> String {
        let mut message = self.clone();
        loop {
            let json = serde_json::to_string(&message).unwrap_or_default();
            if json.len() <= limit {
                return json;
            }
            message.truncated = true;
            if message.results.pop().is_none() && message.output.take().is_none() {
                return json;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: usize) -> KnnResult {
        KnnResult {
            features: "trained".into(),
            layer: "res5avg".into(),
            k: i,
            top1: 75.94444,
            top5: 99.1,
        }
    }

    #[test]
    fn short_messages_are_whole_and_rounded() {
        let m = TerminationMessage::new(KNN, Some("s3://b/r.json".into()), &[row(200)]);
        assert_eq!(
            m.to_json_within(TERMINATION_MESSAGE_LIMIT),
            r#"{"benchmark":"knn","output":"s3://b/r.json","results":[{"features":"trained","layer":"res5avg","k":200,"top1":75.94,"top5":99.1}]}"#
        );
    }

    #[test]
    fn long_messages_lose_rows_from_the_end_and_say_so() {
        let rows: Vec<KnnResult> = (0..100).map(row).collect();
        let json = TerminationMessage::new(KNN, None, &rows).to_json_within(1000);
        assert!(json.len() <= 1000, "{}", json.len());
        let back: TerminationMessage = serde_json::from_str(&json).unwrap();
        assert!(back.truncated);
        assert!(!back.results.is_empty() && back.results.len() < 100);
        let ks: Vec<usize> = back.results.iter().map(|r| r.k).collect();
        assert_eq!(ks, (0..back.results.len()).collect::<Vec<_>>());
        // One more row would not have fitted.
        let mut more = back.clone();
        more.results.push(
            TerminationMessage::new(KNN, None, &[row(back.results.len())]).results[0].clone(),
        );
        assert!(serde_json::to_string(&more).unwrap().len() > 1000);
    }
}
