//! `config.LOSS`: the loss name and one parameter block per loss.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

/// `LOSS`: `name` picks the loss; every block stays available as a mapping for the trainer's loss
/// constructors, and the SimCLR blocks are also typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Mapping", into = "Mapping")]
pub struct LossConfig {
    /// Loss registry name (`vissl list losses`).
    pub name: String,
    /// `LOSS.simclr_info_nce_loss`, typed.
    pub simclr_info_nce_loss: SimclrInfoNceLossConfig,
    /// `LOSS.multicrop_simclr_info_nce_loss`, typed.
    pub multicrop_simclr_info_nce_loss: MulticropSimclrInfoNceLossConfig,
    /// Every block under `LOSS` except `name`, by loss name, as written (after inference).
    pub blocks: BTreeMap<String, Value>,
}

impl LossConfig {
    /// The parameter block of the selected loss (`LOSS.<name>`), if the defaults have one.
    pub fn selected_params(&self) -> Option<&Value> {
        self.blocks.get(&self.name)
    }
}

/// `LOSS.simclr_info_nce_loss`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimclrInfoNceLossConfig {
    /// Softmax temperature.
    pub temperature: f64,
    /// Sizes of the similarity buffers.
    pub buffer_params: InfoNceBufferParams,
}

/// `LOSS.multicrop_simclr_info_nce_loss`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MulticropSimclrInfoNceLossConfig {
    /// Softmax temperature.
    pub temperature: f64,
    /// Crops per image (inferred from the transforms).
    pub num_crops: usize,
    /// Sizes of the similarity buffers.
    pub buffer_params: InfoNceBufferParams,
}

/// `buffer_params` of the SimCLR losses: sizes of the similarity matrix and its masks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InfoNceBufferParams {
    /// Number of ranks (inferred).
    pub world_size: usize,
    /// Dimension of the embeddings compared (the last head's output).
    pub embedding_dim: usize,
    /// Global batch size (inferred).
    pub effective_batch_size: usize,
}

impl TryFrom<Mapping> for LossConfig {
    type Error = String;

    fn try_from(mut map: Mapping) -> Result<Self, Self::Error> {
        let name = match map.remove("name") {
            Some(Value::String(name)) => name,
            Some(other) => return Err(format!("`name` must be a string, found {other:?}")),
            None => return Err("missing `name`".into()),
        };
        let mut blocks = BTreeMap::new();
        for (key, value) in map {
            let Value::String(key) = key else {
                return Err(format!("loss block names must be strings, found {key:?}"));
            };
            blocks.insert(key, value);
        }
        Ok(LossConfig {
            simclr_info_nce_loss: typed_block(&blocks, "simclr_info_nce_loss")?,
            multicrop_simclr_info_nce_loss: typed_block(&blocks, "multicrop_simclr_info_nce_loss")?,
            name,
            blocks,
        })
    }
}

fn typed_block<T: serde::de::DeserializeOwned>(
    blocks: &BTreeMap<String, Value>,
    name: &str,
) -> Result<T, String> {
    let block = blocks
        .get(name)
        .cloned()
        .ok_or_else(|| format!("missing `{name}`"))?;
    serde_yaml::from_value(block).map_err(|e| format!("`{name}`: {e}"))
}

impl From<LossConfig> for Mapping {
    /// The blocks are the source of truth (they hold any `+`-added keys the typed views ignore).
    fn from(loss: LossConfig) -> Self {
        let mut map = Mapping::new();
        map.insert("name".into(), Value::String(loss.name));
        for (key, value) in loss.blocks {
            map.insert(Value::String(key), value);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_stay_maps_and_simclr_is_typed() {
        let loss: LossConfig = serde_yaml::from_str(
            "name: simclr_info_nce_loss
simclr_info_nce_loss: {temperature: 0.1, buffer_params: {world_size: 8, embedding_dim: 128, effective_batch_size: 256}, extra: 1}
multicrop_simclr_info_nce_loss: {temperature: 0.2, num_crops: 6, buffer_params: {world_size: 8, embedding_dim: 128, effective_batch_size: 256}}
swav_loss: {epsilon: 0.05}",
        )
        .unwrap();
        assert_eq!(
            loss.simclr_info_nce_loss.buffer_params.effective_batch_size,
            256
        );
        assert_eq!(loss.multicrop_simclr_info_nce_loss.num_crops, 6);
        assert_eq!(loss.blocks["swav_loss"]["epsilon"], Value::from(0.05));
        assert_eq!(loss.selected_params().unwrap()["extra"], Value::from(1));
        let err = serde_yaml::from_str::<LossConfig>("simclr_info_nce_loss: {}").unwrap_err();
        assert!(err.to_string().contains("missing `name`"), "{err}");
    }
}
