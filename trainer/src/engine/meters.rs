//! Meters: running evaluation statistics reported at phase ends (`METERS.name`).

use serde::Serialize;

/// The meters the engine can build (`METERS.name` / `METERS.names`).
pub fn names() -> Vec<&'static str> {
    vec!["accuracy_list_meter"]
}
use tch::{Kind, Tensor};

/// `accuracy_list_meter`: top-k accuracies for each of `num_meters` model outputs.
#[derive(Debug, Clone)]
pub struct AccuracyListMeter {
    topk: Vec<i64>,
    names: Vec<String>,
    correct: Vec<Vec<f64>>,
    total: Vec<f64>,
}

/// One meter's reading: `{"top_1": 71.2, "top_5": 90.1}` per output name, in percent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccuracyReading {
    pub name: String,
    pub topk: Vec<(i64, f64)>,
    /// Samples the accuracies are over.
    pub samples: f64,
}

impl AccuracyListMeter {
    /// `names` labels each output (VISSL's inferred meter_names, e.g. the evaluated layers); empty means one
    /// unnamed output.
    pub fn new(topk: Vec<i64>, names: Vec<String>) -> Self {
        let names = if names.is_empty() {
            vec![String::new()]
        } else {
            names
        };
        let n = names.len();
        Self {
            correct: vec![vec![0.0; topk.len()]; n],
            total: vec![0.0; n],
            topk,
            names,
        }
    }

    /// Add a batch: one `[N, C]` score tensor per output, `[N]` integer targets.
    pub fn update(&mut self, outputs: &[Tensor], target: &Tensor) {
        let target = target.to_kind(Kind::Int64).view([-1, 1]);
        for (i, scores) in outputs.iter().enumerate().take(self.names.len()) {
            let classes = scores.size()[1];
            let max_k = self.topk.iter().copied().max().unwrap_or(1).min(classes);
            let (_, pred) = scores.detach().topk(max_k, 1, true, true);
            let hits = pred.eq_tensor(&target);
            for (j, &k) in self.topk.iter().enumerate() {
                let k = k.min(classes);
                self.correct[i][j] += hits.narrow(1, 0, k).sum(Kind::Float).double_value(&[]);
            }
            self.total[i] += target.size()[0] as f64;
        }
    }

    /// Current accuracies in percent.
    pub fn value(&self) -> Vec<AccuracyReading> {
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| AccuracyReading {
                name: name.clone(),
                topk: self
                    .topk
                    .iter()
                    .zip(&self.correct[i])
                    .map(|(&k, &c)| (k, 100.0 * c / self.total[i].max(1.0)))
                    .collect(),
                samples: self.total[i],
            })
            .collect()
    }

    /// The meter's counters as one flat vector (hits per output and k, then totals), for summing across ranks.
    pub fn counts(&self) -> Vec<f64> {
        self.correct
            .iter()
            .flatten()
            .chain(self.total.iter())
            .copied()
            .collect()
    }

    /// Replace the counters with `counts` (as [`AccuracyListMeter::counts`] lays them out, e.g. summed over ranks).
    pub fn set_counts(&mut self, counts: &[f64]) {
        let per_output = self.topk.len();
        for (i, c) in self.correct.iter_mut().enumerate() {
            c.copy_from_slice(&counts[i * per_output..(i + 1) * per_output]);
        }
        let offset = self.correct.len() * per_output;
        let outputs = self.total.len();
        self.total
            .copy_from_slice(&counts[offset..offset + outputs]);
    }

    /// Start a new phase.
    pub fn reset(&mut self) {
        self.correct
            .iter_mut()
            .for_each(|c| c.iter_mut().for_each(|v| *v = 0.0));
        self.total.iter_mut().for_each(|t| *t = 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top1_and_top2_hits() {
        let mut meter = AccuracyListMeter::new(vec![1, 2], vec![]);
        // Sample 0: best class 2 (target 2, top-1 hit). Sample 1: ranking 0 > 1 > 2 with target 1
        // (top-2 hit only). Sample 2: ranking 1 > 2 > 0 with target 0 (miss).
        let scores =
            Tensor::from_slice(&[0.1f32, 0.2, 0.7, 0.5, 0.3, 0.2, 0.1, 0.6, 0.3]).view([3, 3]);
        meter.update(&[scores], &Tensor::from_slice(&[2i64, 1, 0]));
        let reading = &meter.value()[0];
        assert_eq!(reading.topk[0], (1, 100.0 / 3.0));
        assert_eq!(reading.topk[1], (2, 200.0 / 3.0));
        // Counters round-trip (what the distributed test phase sums across ranks).
        let mut doubled = AccuracyListMeter::new(vec![1, 2], vec![]);
        doubled.set_counts(&meter.counts().iter().map(|c| 2.0 * c).collect::<Vec<_>>());
        let (d, m) = (&doubled.value()[0], &meter.value()[0]);
        assert_eq!(d.topk, m.topk);
        assert_eq!(d.samples, 2.0 * m.samples);
        meter.reset();
        assert_eq!(meter.value()[0].topk[0].1, 0.0);
    }
}
