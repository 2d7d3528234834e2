//! `deepclusterv2_loss`: DeepCluster-v2 (Caron et al., arXiv 2006.09882, appendix).
//!
//! A memory bank keeps, per sample of the epoch, the normalised embeddings of the crops in
//! `memory_params.crops_for_mb` and the sample's dataset index (the batch target under
//! `LABEL_TYPE: sample_index`). At each train epoch start the memory is clustered with spherical
//! k-means once per entry of `num_clusters` (cycling through the memory's crops); every crop of a
//! sample is then trained to predict its sample's cluster with a softmax over
//! `<embedding, centroid> / temperature`, averaged over the clusterings. Samples without a
//! cluster yet (dropped by DROP_LAST) are ignored. Before the first epoch of a run the engine
//! makes one pass over the training data to fill the memory.

use serde::Deserialize;
use tch::{Kind, Reduction, Tensor};

use super::kmeans;
use super::{
    config_error, l2_normalize_rows, parse_params, Loss, LossContext, LossError, Result,
    StepContext,
};

/// The registry name.
pub const NAME: &str = "deepclusterv2_loss";

/// The target value of samples without a cluster (PyTorch's default `ignore_index`).
const NO_CLUSTER: i64 = -100;

/// `LOSS.deepclusterv2_loss.memory_params`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryParams {
    /// The crops whose embeddings the memory keeps (one memory bank each).
    pub crops_for_mb: Vec<usize>,
    /// Width of the embeddings (inferred from the head).
    pub embedding_dim: usize,
}

impl Default for MemoryParams {
    fn default() -> Self {
        Self {
            crops_for_mb: vec![0],
            embedding_dim: 128,
        }
    }
}

/// `LOSS.deepclusterv2_loss`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeepClusterV2Params {
    /// DATA.TRAIN.DROP_LAST (inferred): the memory holds whole batches only.
    #[serde(rename = "DROP_LAST")]
    pub drop_last: bool,
    /// DATA.TRAIN.BATCHSIZE_PER_REPLICA (inferred).
    #[serde(rename = "BATCHSIZE_PER_REPLICA")]
    pub batchsize_per_replica: usize,
    /// Crops per image (inferred from the transforms).
    pub num_crops: usize,
    /// Softmax temperature.
    pub temperature: f64,
    /// Clusters of each clustering.
    pub num_clusters: Vec<usize>,
    /// k-means rounds per clustering.
    pub kmeans_iters: usize,
    /// The memory bank.
    pub memory_params: MemoryParams,
    /// Samples in the training dataset (filled by the engine from the dataset, as VISSL does).
    pub num_train_samples: i64,
}

impl Default for DeepClusterV2Params {
    fn default() -> Self {
        // VISSL's defaults.yaml values.
        Self {
            drop_last: true,
            batchsize_per_replica: 256,
            num_crops: 2,
            temperature: 0.1,
            num_clusters: vec![3000, 3000, 3000],
            kmeans_iters: 10,
            memory_params: MemoryParams::default(),
            num_train_samples: -1,
        }
    }
}

impl DeepClusterV2Params {
    /// Reads `LOSS.deepclusterv2_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }

    /// Memory rows per rank: this rank's share of the dataset, whole batches only with DROP_LAST.
    pub fn memory_rows(&self, world_size: usize) -> usize {
        let per_rank = (self.num_train_samples.max(0) as usize).div_ceil(world_size.max(1));
        if self.drop_last && self.batchsize_per_replica > 0 {
            per_rank - per_rank % self.batchsize_per_replica
        } else {
            per_rank
        }
    }

    fn validate(&self, world_size: usize) -> Result<()> {
        let key = |k: &str| format!("{NAME}.{k}");
        if self.num_train_samples <= 0 {
            return Err(config_error(
                key("num_train_samples"),
                format!(
                    "{} is not a dataset size; the trainer fills it from DATA.TRAIN",
                    self.num_train_samples
                ),
            ));
        }
        if self.memory_rows(world_size) == 0 {
            return Err(config_error(
                key("BATCHSIZE_PER_REPLICA"),
                format!(
                    "{} samples over {world_size} rank(s) leave no whole batch of {} for the memory",
                    self.num_train_samples, self.batchsize_per_replica
                ),
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(config_error(
                key("temperature"),
                format!("{} must be positive", self.temperature),
            ));
        }
        if self.num_clusters.is_empty() || self.num_clusters.contains(&0) {
            return Err(config_error(
                key("num_clusters"),
                format!("{:?} must list positive cluster counts", self.num_clusters),
            ));
        }
        let mb = &self.memory_params;
        if mb.crops_for_mb.is_empty() || mb.crops_for_mb.iter().any(|&c| c >= self.num_crops) {
            return Err(config_error(
                key("memory_params.crops_for_mb"),
                format!(
                    "{:?} must name crops below num_crops {}",
                    mb.crops_for_mb, self.num_crops
                ),
            ));
        }
        if mb.embedding_dim == 0 {
            return Err(config_error(
                key("memory_params.embedding_dim"),
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// DeepClusterV2's loss with its memory bank and clusters.
pub struct DeepClusterV2Loss {
    params: DeepClusterV2Params,
    ctx: LossContext,
    /// `crops_for_mb x rows x dim`: this rank's normalised embeddings of the epoch.
    memory: Tensor,
    /// The dataset index of each memory row.
    memory_index: Tensor,
    /// `clusterings x num_train_samples`: each sample's cluster, or [`NO_CLUSTER`].
    assignments: Tensor,
    /// One `K x dim` matrix per clustering.
    centroids: Vec<Tensor>,
    /// The next memory row to write.
    next_row: i64,
    /// Whether the memory holds a full pass of embeddings (initial pass done or state loaded).
    memory_ready: bool,
}

impl DeepClusterV2Loss {
    /// Builds the loss for `ctx`'s rank (the memory is empty until the initial pass).
    pub fn new(params: &DeepClusterV2Params, ctx: LossContext) -> Result<Self> {
        params.validate(ctx.world_size)?;
        let rows = params.memory_rows(ctx.world_size) as i64;
        let dim = params.memory_params.embedding_dim as i64;
        let banks = params.memory_params.crops_for_mb.len() as i64;
        let cpu = (Kind::Float, tch::Device::Cpu);
        let centroids = params
            .num_clusters
            .iter()
            // Placeholders until the first clustering: zeros, so building the loss draws nothing
            // from libtorch's global generator (which seeds the model of a run).
            .map(|&k| Tensor::f_zeros([k as i64, dim], cpu))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            memory: Tensor::f_zeros([banks, rows, dim], cpu)?,
            memory_index: Tensor::f_zeros([rows], (Kind::Int64, tch::Device::Cpu))?,
            assignments: Tensor::f_full(
                [params.num_clusters.len() as i64, params.num_train_samples],
                NO_CLUSTER,
                (Kind::Int64, tch::Device::Cpu),
            )?,
            centroids,
            params: params.clone(),
            ctx,
            next_row: 0,
            memory_ready: false,
        })
    }

    /// The centroids of each clustering.
    pub fn centroids(&self) -> &[Tensor] {
        &self.centroids
    }

    /// Each sample's cluster per clustering (`clusterings x num_train_samples`, -100: none).
    pub fn assignments(&self) -> &Tensor {
        &self.assignments
    }

    /// The memory bank (`crops_for_mb x rows x dim`) and its dataset indices.
    pub fn memory(&self) -> (&Tensor, &Tensor) {
        (&self.memory, &self.memory_index)
    }

    /// Writes a batch's embeddings (`crops x images` rows, normalised) of the memory's crops and
    /// its indices (`crops x images`, crop-major; the first `images` are the samples).
    pub fn remember(&mut self, embeddings: &[Tensor], indices: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let images = indices.size()[0] / self.params.num_crops as i64;
        let rows = self.memory_index.size()[0];
        if self.next_row + images > rows {
            return Err(self.input_error(format!(
                "the memory holds {rows} samples per rank (num_train_samples {}, DROP_LAST {}), \
                 but this batch would fill rows {}..{}",
                self.params.num_train_samples,
                self.params.drop_last,
                self.next_row,
                self.next_row + images
            )));
        }
        self.move_to(indices.device())?;
        self.memory_index
            .f_narrow(0, self.next_row, images)?
            .f_copy_(&indices.f_narrow(0, 0, images)?)?;
        for (bank, embedding) in embeddings.iter().enumerate() {
            self.memory
                .f_get(bank as i64)?
                .f_narrow(0, self.next_row, images)?
                .f_copy_(&embedding.f_detach()?.f_to_kind(Kind::Float)?)?;
        }
        self.next_row += images;
        Ok(())
    }

    /// Clusters the memory once per entry of `num_clusters` and records every sample's cluster
    /// (gathered from all ranks); `seed` picks the starting centroids.
    pub fn cluster_memory(&mut self, seed: u64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.next_row = 0;
        let banks = self.params.memory_params.crops_for_mb.len();
        let indices = self.gather_i64(&self.memory_index)?;
        for (clustering, &k) in self.params.num_clusters.clone().iter().enumerate() {
            let memory = self.memory.f_get((clustering % banks) as i64)?;
            let clusters = kmeans::cluster(
                &memory,
                k,
                self.params.kmeans_iters,
                clustering_seed(seed, clustering),
                &self.ctx,
                NAME,
            )?;
            let all = self.gather_i64(&clusters.assignments)?;
            let row = self.assignments.f_get(clustering as i64)?;
            let _ = row.shallow_clone().f_fill_(NO_CLUSTER)?;
            let _ =
                row.shallow_clone()
                    .f_index_put_(&[Some(indices.shallow_clone())], &all, false)?;
            self.centroids[clustering] = clusters.centroids;
        }
        Ok(())
    }

    /// All ranks' values of an int64 vector, in rank order (through float64, exact below 2^53).
    fn gather_i64(&self, t: &Tensor) -> Result<Tensor> {
        let gathered = (self.ctx.gather)(&t.f_to_kind(Kind::Double)?)
            .map_err(|reason| LossError::Gather { loss: NAME, reason })?;
        Ok(gathered.f_to_kind(Kind::Int64)?)
    }

    fn move_to(&mut self, device: tch::Device) -> Result<()> {
        if self.memory.device() != device {
            self.memory = self.memory.f_to_device(device)?;
            self.memory_index = self.memory_index.f_to_device(device)?;
            self.assignments = self.assignments.f_to_device(device)?;
            for c in &mut self.centroids {
                *c = c.f_to_device(device)?;
            }
        }
        Ok(())
    }

    fn check(&self, embedding: &Tensor, target: &Tensor) -> Result<()> {
        let rows = embedding.size().first().copied().unwrap_or(0);
        let crops = self.params.num_crops as i64;
        let dim = self.params.memory_params.embedding_dim as i64;
        if embedding.dim() != 2 || embedding.size()[1] != dim || rows == 0 || rows % crops != 0 {
            return Err(self.input_error(format!(
                "expects embeddings of shape [num_crops ({crops}) x images, embedding_dim ({dim})], \
                 got {:?}",
                embedding.size()
            )));
        }
        if target.size() != [rows] || target.kind() != Kind::Int64 {
            return Err(self.input_error(format!(
                "expects the sample indices as target ({rows} int64, DATA.TRAIN.LABEL_TYPE: \
                 sample_index), got {:?} {:?}",
                target.size(),
                target.kind()
            )));
        }
        let (low, high) = (
            target.f_min()?.int64_value(&[]),
            target.f_max()?.int64_value(&[]),
        );
        if low < 0 || high >= self.params.num_train_samples {
            return Err(self.input_error(format!(
                "sample indices {low}..={high} outside the dataset of {} (LABEL_TYPE must be \
                 sample_index)",
                self.params.num_train_samples
            )));
        }
        Ok(())
    }

    fn input_error(&self, reason: String) -> LossError {
        LossError::Input { loss: NAME, reason }
    }

    /// The normalised embeddings of the memory's crops.
    fn memory_crops(&self, normalized: &Tensor) -> Result<Vec<Tensor>> {
        let images = normalized.size()[0] / self.params.num_crops as i64;
        self.params
            .memory_params
            .crops_for_mb
            .iter()
            .map(|&c| Ok(normalized.f_narrow(0, c as i64 * images, images)?))
            .collect()
    }
}

impl Loss for DeepClusterV2Loss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, output: &[Tensor], target: &Tensor) -> Result<Tensor> {
        let embedding = output.first().ok_or_else(|| {
            self.input_error("expects the head's embeddings as first output, got none".into())
        })?;
        self.check(embedding, target)?;
        self.move_to(embedding.device())?;
        let normalized = l2_normalize_rows(embedding)?;
        let mut total: Option<Tensor> = None;
        for (clustering, centroids) in self.centroids.iter().enumerate() {
            let logits = normalized
                .f_mm(&centroids.f_tr()?)?
                .f_div_scalar(self.params.temperature)?;
            let targets = self
                .assignments
                .f_get(clustering as i64)?
                .f_index_select(0, target)?;
            let term = logits.f_cross_entropy_loss::<Tensor>(
                &targets,
                None,
                Reduction::Mean,
                NO_CLUSTER,
                0.0,
            )?;
            total = Some(match total {
                None => term,
                Some(sum) => sum.f_add(&term)?,
            });
        }
        let total = total
            .ok_or_else(|| self.input_error("no clustering".into()))?
            .f_div_scalar(self.centroids.len() as f64)?;
        self.remember(&self.memory_crops(&normalized)?, target)?;
        Ok(total)
    }

    fn needs_initial_pass(&self) -> bool {
        true
    }

    fn on_initial_pass_batch(&mut self, target: &Tensor, step: &StepContext) -> Result<()> {
        // VISSL runs each memory crop through the model alone, in training mode.
        let embeddings =
            self.params
                .memory_params
                .crops_for_mb
                .iter()
                .map(|&c| {
                    let crop = step.crops.get(c).ok_or_else(|| {
                        self.input_error(format!(
                            "memory crop {c} missing: the batch has {} crops",
                            step.crops.len()
                        ))
                    })?;
                    let out = step.model.forward_t(crop, true).map_err(|e| {
                        self.input_error(format!("forward of memory crop {c}: {e}"))
                    })?;
                    let first = out
                        .first()
                        .ok_or_else(|| self.input_error("the model returned no output".into()))?;
                    l2_normalize_rows(first)
                })
                .collect::<Result<Vec<_>>>()?;
        self.remember(&embeddings, target)?;
        self.memory_ready = true;
        Ok(())
    }

    fn on_phase_start(&mut self, step: &StepContext) -> Result<()> {
        // A run resumed mid-epoch keeps the clusters and memory position of its checkpoint.
        if step.iteration != step.epoch * step.iterations_per_epoch {
            return Ok(());
        }
        if !self.memory_ready {
            return Err(self.input_error(
                "the memory bank was never filled: the engine fills it in a pass over the \
                 training data before the first epoch"
                    .into(),
            ));
        }
        self.cluster_memory(step.epoch)
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![
            ("local_memory_embeddings".to_string(), self.memory.copy()),
            ("local_memory_index".to_string(), self.memory_index.copy()),
            ("assignments".to_string(), self.assignments.copy()),
            (
                "start_idx".to_string(),
                Tensor::from_slice(&[self.next_row]),
            ),
        ];
        for (i, c) in self.centroids.iter().enumerate() {
            state.push((format!("centroids{i}"), c.copy()));
        }
        state
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let find = |key: &str, like: Option<&Tensor>| -> Result<Tensor> {
            let t = state
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, t)| t)
                .ok_or_else(|| LossError::State {
                    loss: NAME,
                    reason: format!("checkpoint has no `{key}`"),
                })?;
            if let Some(own) = like {
                if t.size() != own.size() {
                    return Err(LossError::State {
                        loss: NAME,
                        reason: format!(
                            "`{key}` has shape {:?} in the checkpoint but {:?} here \
                             (num_train_samples, world size, crops_for_mb and num_clusters must match)",
                            t.size(),
                            own.size()
                        ),
                    });
                }
                return Ok(t.f_to_kind(own.kind())?.f_to_device(own.device())?);
            }
            Ok(t.copy())
        };
        let memory = find("local_memory_embeddings", Some(&self.memory))?;
        let memory_index = find("local_memory_index", Some(&self.memory_index))?;
        let assignments = find("assignments", Some(&self.assignments))?;
        let next_row = find("start_idx", None)?.f_int64_value(&[0])?;
        let centroids = self
            .centroids
            .iter()
            .enumerate()
            .map(|(i, c)| find(&format!("centroids{i}"), Some(c)))
            .collect::<Result<Vec<_>>>()?;
        self.memory = memory;
        self.memory_index = memory_index;
        self.assignments = assignments;
        self.next_row = next_row;
        self.centroids = centroids;
        self.memory_ready = true;
        Ok(())
    }
}

/// The seed of clustering `clustering` at an epoch whose seed is `seed` (its starting centroids).
pub fn clustering_seed(seed: u64, clustering: usize) -> u64 {
    seed.wrapping_mul(0x100).wrapping_add(clustering as u64)
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(DeepClusterV2Loss::new(
        &DeepClusterV2Params::from_yaml(params)?,
        ctx,
    )?))
}
