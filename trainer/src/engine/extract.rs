//! Feature extraction (`engine_name=extract_features`, and the first half of every benchmark): run a model
//! in evaluation mode over a split and keep the chosen layer's features with labels and sample indices.

use crate::data::SplitPipeline;
use crate::dist::group::ProcessGroup;
use crate::models::BaseSslModel;
use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use vissl_crds::config::DataConfig;

/// Features of one split at one layer, in sample-index order.
pub struct SplitFeatures {
    /// `[N, ...]` float features.
    pub features: Tensor,
    /// `[N]` labels.
    pub labels: Tensor,
    /// `[N]` dataset indices.
    pub indices: Tensor,
}

/// Which representation to read from the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// The model's head outputs (VISSL's `heads`), first head.
    Heads,
    /// A trunk feature by VISSL name (`res5avg`, `flatten`, `res4`, ...).
    Trunk(String),
    /// The input tensor itself, flattened: the raw-pixel baseline.
    Input,
}

impl Layer {
    /// VISSL's layer name (`heads` or a trunk feature name).
    pub fn parse(name: &str) -> Self {
        match name {
            "" | "heads" => Layer::Heads,
            "input" | "pixels" => Layer::Input,
            other => Layer::Trunk(other.to_string()),
        }
    }
}

/// Run `model` (eval mode, no grad) over every sample of `split` once, in index order.
pub fn extract_split(
    model: &BaseSslModel,
    split: &SplitPipeline,
    data: &DataConfig,
    seed: u64,
    device: Device,
    layer: &Layer,
) -> Result<SplitFeatures> {
    let _guard = tch::no_grad_guard();
    let loader = split.loader(data, seed, 0, 0, device)?;
    let (mut feats, mut labels, mut indices) = (Vec::new(), Vec::new(), Vec::new());
    for batch in loader {
        let batch = batch?;
        let input = batch
            .data
            .first()
            .ok_or_else(|| anyhow!("collated batch has no `data` tensor"))?;
        let input = input.to_device(device);
        let out = match layer {
            Layer::Heads => model
                .forward_t(&input, false)?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("model has no head output; set NEAREST_NEIGHBOR.FEATURES.LAYER_NAME to a trunk layer"))?,
            Layer::Trunk(name) => model
                .trunk_features(&input, &[name.as_str()], false)?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("trunk produced no `{name}` feature"))?,
            Layer::Input => input.shallow_clone(),
        };
        feats.push(
            out.flatten(1, -1)
                .to_kind(Kind::Float)
                .to_device(Device::Cpu),
        );
        let label = batch
            .label
            .first()
            .ok_or_else(|| anyhow!("collated batch has no `label` tensor"))?;
        labels.push(label.view([-1]).to_device(Device::Cpu));
        let idx = batch
            .data_idx
            .first()
            .ok_or_else(|| anyhow!("collated batch has no `data_idx` tensor"))?;
        indices.push(idx.view([-1]).to_device(Device::Cpu));
    }
    if feats.is_empty() {
        return Err(anyhow!("split {} produced no batch", split.dataset.split()));
    }
    // The sampler shuffles; index order lines outputs up with the dataset and across runs.
    in_index_order(SplitFeatures {
        features: Tensor::cat(&feats, 0),
        labels: Tensor::cat(&labels, 0),
        indices: Tensor::cat(&indices, 0),
    })
}

/// The rows of `f` sorted by dataset index, each index once (a distributed sampler pads its shards
/// by repeating samples).
fn in_index_order(f: SplitFeatures) -> Result<SplitFeatures> {
    let order = f.indices.argsort(0, false);
    let sorted = Vec::<i64>::try_from(&f.indices.index_select(0, &order))?;
    let positions = Vec::<i64>::try_from(&order)?;
    let keep: Vec<i64> = positions
        .iter()
        .zip(&sorted)
        .enumerate()
        .filter(|(i, (_, index))| *i == 0 || sorted[i - 1] != **index)
        .map(|(_, (position, _))| *position)
        .collect();
    let keep = Tensor::from_slice(&keep);
    Ok(SplitFeatures {
        features: f.features.index_select(0, &keep),
        labels: f.labels.index_select(0, &keep),
        indices: f.indices.index_select(0, &keep),
    })
}

/// Every rank's features of a split (each rank extracted its shard), on every rank, in dataset-index
/// order with each sample once: what one process extracting the whole split gets. The collectives run
/// on `device` (NCCL needs GPU tensors); the result is on the CPU.
pub fn gather_split(
    local: &SplitFeatures,
    group: &ProcessGroup,
    device: Device,
) -> Result<SplitFeatures> {
    let all_gather = |t: &Tensor| -> Result<Tensor> {
        Ok(group
            .all_gather(&t.to_device(device))?
            .to_device(Device::Cpu))
    };
    let count = local.indices.size().first().copied().unwrap_or(0);
    let counts = Vec::<i64>::try_from(&all_gather(&Tensor::from_slice(&[count]))?)?;
    let longest = counts.iter().copied().max().unwrap_or(0);
    // all_gather needs the same shape everywhere: pad each shard to the longest, then cut the padding.
    let gather = |t: &Tensor| -> Result<Tensor> {
        let mut shape = t.size();
        shape[0] = longest - count;
        let padded = Tensor::cat(
            &[
                t.shallow_clone(),
                Tensor::zeros(&shape, (t.kind(), t.device())),
            ],
            0,
        );
        all_gather(&padded)
    };
    let rows: Vec<i64> = counts
        .iter()
        .enumerate()
        .flat_map(|(rank, &n)| (0..n).map(move |i| rank as i64 * longest + i))
        .collect();
    let rows = Tensor::from_slice(&rows);
    in_index_order(SplitFeatures {
        features: gather(&local.features)?.index_select(0, &rows),
        labels: gather(&local.labels)?.index_select(0, &rows),
        indices: gather(&local.indices)?.index_select(0, &rows),
    })
}

/// Write a split's features as `<dir>/<split>_<layer>.safetensors` (tensors `features`, `targets`, `inds`).
pub fn save_features(dir: &Path, split: &str, layer: &str, f: &SplitFeatures) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}_{layer}.safetensors", split.to_lowercase()));
    Tensor::write_safetensors(
        &[
            ("features", &f.features),
            ("targets", &f.labels),
            ("inds", &f.indices),
        ],
        &path,
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
