//! Weighted k-nearest-neighbour classification as NPID defines it and VISSL runs it: cosine (dot-product)
//! similarity to every train feature, the `k` most similar vote for their class with weight
//! `exp(similarity / sigma)`, classes ranked by the summed votes.

use serde::Serialize;
use tch::{Kind, Tensor};

/// `NEAREST_NEIGHBOR.*` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KnnParams {
    /// Neighbours that vote (TOPK).
    pub topk: i64,
    /// Temperature of the vote weights (SIGMA).
    pub sigma: f64,
    /// L2-normalise features first (L2_NORM_FEATS).
    pub l2_norm: bool,
    /// Test features scored at once; bounds memory to `chunk x num_train` similarities.
    pub chunk: i64,
}

impl Default for KnnParams {
    fn default() -> Self {
        Self {
            topk: 200,
            sigma: 0.1,
            l2_norm: true,
            chunk: 512,
        }
    }
}

/// Accuracy of a kNN run, in percent as VISSL prints it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KnnAccuracy {
    pub top1: f64,
    pub top5: f64,
    pub total: i64,
}

/// Errors are shape problems the caller can name.
#[derive(Debug, thiserror::Error)]
pub enum KnnError {
    #[error("kNN: {0}")]
    Shape(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

fn flatten_features(features: &Tensor, l2_norm: bool) -> Tensor {
    let flat = features.flatten(1, -1).to_kind(Kind::Float);
    if l2_norm {
        let norm = flat
            .norm_scalaropt_dim(2.0, [1i64].as_slice(), true)
            .clamp_min(1e-12);
        flat / norm
    } else {
        flat
    }
}

/// Ranked class predictions (`[num_test, num_classes]`, best first) for each test feature.
pub fn predict(
    train_features: &Tensor,
    train_labels: &Tensor,
    test_features: &Tensor,
    num_classes: i64,
    params: &KnnParams,
) -> Result<Tensor, KnnError> {
    let n_train = train_features.size().first().copied().unwrap_or(0);
    if n_train == 0 || train_labels.size() != [n_train] {
        return Err(KnnError::Shape(format!(
            "train features {:?} and labels {:?} must have the same non-zero length",
            train_features.size(),
            train_labels.size()
        )));
    }
    let train = flatten_features(train_features, params.l2_norm);
    let test = flatten_features(test_features, params.l2_norm);
    if train.size()[1] != test.size()[1] {
        return Err(KnnError::Shape(format!(
            "train features have dimension {} but test features {}",
            train.size()[1],
            test.size()[1]
        )));
    }
    let k = params.topk.min(n_train);
    let train_t = train.tr();
    let labels = train_labels.to_kind(Kind::Int64);
    let mut ranked = Vec::new();
    let n_test = test.size()[0];
    let mut start = 0;
    while start < n_test {
        let len = params.chunk.min(n_test - start);
        let sims = test.narrow(0, start, len).matmul(&train_t);
        let (top_sims, top_idx) = sims.topk(k, 1, true, true);
        let neighbour_labels = labels.index_select(0, &top_idx.view([-1])).view([len, k]);
        let weights = (top_sims / params.sigma).exp();
        let votes = Tensor::zeros([len, num_classes], (Kind::Float, test.device())).scatter_add(
            1,
            &neighbour_labels,
            &weights,
        );
        ranked.push(votes.argsort(1, true));
        start += len;
    }
    Ok(Tensor::cat(&ranked, 0))
}

/// Top-1 and top-5 accuracy of `predict` against the test labels.
pub fn evaluate(
    train_features: &Tensor,
    train_labels: &Tensor,
    test_features: &Tensor,
    test_labels: &Tensor,
    num_classes: i64,
    params: &KnnParams,
) -> Result<KnnAccuracy, KnnError> {
    let ranked = predict(
        train_features,
        train_labels,
        test_features,
        num_classes,
        params,
    )?;
    let total = test_labels.size()[0];
    if ranked.size()[0] != total {
        return Err(KnnError::Shape(format!(
            "{} test features but {} test labels",
            ranked.size()[0],
            total
        )));
    }
    let correct = ranked.eq_tensor(&test_labels.to_kind(Kind::Int64).view([-1, 1]));
    let hits_within = |n: i64| -> f64 {
        correct
            .narrow(1, 0, n.min(num_classes))
            .sum(Kind::Float)
            .double_value(&[])
    };
    let pct = |hits: f64| 100.0 * hits / total.max(1) as f64;
    Ok(KnnAccuracy {
        top1: pct(hits_within(1)),
        top5: pct(hits_within(5)),
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, 2])
    }

    #[test]
    fn nearest_class_wins_on_separated_clusters() {
        // Class 0 points near +x, class 1 near +y; test points sit clearly in one cluster.
        let train = t(&[
            [1.0, 0.1],
            [0.9, -0.1],
            [1.0, 0.0],
            [0.1, 1.0],
            [-0.1, 0.9],
            [0.0, 1.0],
        ]);
        let labels = Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1]);
        let test = t(&[[0.8, 0.05], [0.05, 0.7]]);
        let test_labels = Tensor::from_slice(&[0i64, 1]);
        let params = KnnParams {
            topk: 3,
            sigma: 0.1,
            l2_norm: true,
            chunk: 1,
        };
        let acc = evaluate(&train, &labels, &test, &test_labels, 2, &params).unwrap();
        assert_eq!(acc.top1, 100.0);
        assert_eq!(acc.total, 2);
    }

    #[test]
    fn votes_are_weighted_by_similarity_not_counted() {
        // One very similar class-1 neighbour against two weakly similar class-0 neighbours, k = 3.
        // Weights exp(cos/0.1): class 1 gets exp(10) = 22026; class 0 gets 2*exp(0.6/0.1*...) below it.
        let train = t(&[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]);
        let labels = Tensor::from_slice(&[1i64, 0, 0]);
        let test = t(&[[1.0, 0.2]]);
        // cos to [1,0] = 0.981 -> exp(9.81) = 18200; cos to [0,1] = 0.196 -> 2*exp(1.96) = 14.2.
        let params = KnnParams {
            topk: 3,
            sigma: 0.1,
            l2_norm: true,
            chunk: 8,
        };
        let ranked = predict(&train, &labels, &test, 2, &params).unwrap();
        assert_eq!(ranked.int64_value(&[0, 0]), 1);
        // With a large temperature every vote counts about the same: the majority class wins.
        let flat = KnnParams {
            sigma: 100.0,
            ..params
        };
        let ranked = predict(&train, &labels, &test, 2, &flat).unwrap();
        assert_eq!(ranked.int64_value(&[0, 0]), 0);
    }

    #[test]
    fn mismatched_dimensions_are_an_error() {
        let train = t(&[[1.0, 0.0]]);
        let labels = Tensor::from_slice(&[0i64]);
        let test = Tensor::zeros([1, 3], (Kind::Float, tch::Device::Cpu));
        let err = predict(&train, &labels, &test, 2, &KnnParams::default()).unwrap_err();
        assert!(
            err.to_string().contains("dimension 2 but test features 3"),
            "{err}"
        );
    }
}
