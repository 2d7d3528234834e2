//! Inference of derived config values: everything VISSL fills in from other keys (world size,
//! global batch, loss parameters marked "automatically inferred", auto LR scaling, head weight
//! decay, meter names, label type), done in one place on the merged YAML before it is typed.

use serde_yaml::{Mapping, Value};

use super::error::ConfigError;
use super::schedulers::{AutoLrScaling, ScalingType};

/// The process layout of a run as the launcher sees it: nodes, and worker processes on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    /// Machines (pods) taking part.
    pub num_nodes: usize,
    /// Worker processes per machine.
    pub nproc_per_node: usize,
}

/// Runs on the merged `config:` subtree (serde_yaml::Value mapping with VISSL's key names: DATA, MODEL, LOSS,
/// OPTIMIZER, METERS, DISTRIBUTED, ...) BEFORE typed deserialization; fills every derived value.
pub fn infer(config: &mut Value, world: Option<&World>) -> Result<(), ConfigError> {
    if !config.is_mapping() {
        return Err(ConfigError::Invalid {
            path: "config".into(),
            reason: "must be a mapping of VISSL keys".into(),
        });
    }
    let layout = resolve_layout(config, world)?;
    infer_losses(config, &layout)?;
    infer_learning_rates(config, &layout)?;
    infer_head_weight_decay(config)?;
    infer_meters(config)?;
    infer_label_types(config)?;
    Ok(())
}

/// The sizes every derived value depends on.
#[derive(Debug, Clone, Copy)]
struct Layout {
    num_nodes: usize,
    nproc_per_node: usize,
    batch_per_replica: usize,
}

impl Layout {
    fn world_size(&self) -> usize {
        self.num_nodes * self.nproc_per_node
    }

    fn global_batch(&self) -> usize {
        self.batch_per_replica * self.world_size()
    }

    fn batch_per_node(&self) -> usize {
        self.batch_per_replica * self.nproc_per_node
    }
}

const NUM_NODES: &[&str] = &["DISTRIBUTED", "NUM_NODES"];
const NUM_PROC_PER_NODE: &[&str] = &["DISTRIBUTED", "NUM_PROC_PER_NODE"];

/// World size from the launcher when it is known, else from `DISTRIBUTED.*`; the effective layout is
/// written back so the resolved config shows what actually runs.
fn resolve_layout(config: &mut Value, world: Option<&World>) -> Result<Layout, ConfigError> {
    let configured_nodes = usize_at(config, NUM_NODES)?;
    let configured_nproc = usize_at(config, NUM_PROC_PER_NODE)?;
    let (num_nodes, nproc_per_node) = match world {
        None => (configured_nodes, configured_nproc),
        Some(world) => {
            // GPU workers are one per device, which the launcher counts; CPU workers are not tied to
            // devices, so the configured count stands.
            let on_cpu = opt_str_at(config, &["MACHINE", "DEVICE"])? == Some("cpu");
            (
                world.num_nodes,
                if on_cpu {
                    configured_nproc
                } else {
                    world.nproc_per_node
                },
            )
        }
    };
    for (path, n) in [(NUM_NODES, num_nodes), (NUM_PROC_PER_NODE, nproc_per_node)] {
        if n == 0 {
            return Err(ConfigError::Invalid {
                path: dotted(path),
                reason: "must be at least 1".into(),
            });
        }
    }
    if world.is_some() {
        set(config, NUM_NODES, num_nodes)?;
        set(config, NUM_PROC_PER_NODE, nproc_per_node)?;
    }
    let batch_per_replica = usize_at(config, &["DATA", "TRAIN", "BATCHSIZE_PER_REPLICA"])?;
    Ok(Layout {
        num_nodes,
        nproc_per_node,
        batch_per_replica,
    })
}

// ---------------------------------------------------------------------------------------------
// Losses

const COLLATE_FUNCTION: &[&str] = &["DATA", "TRAIN", "COLLATE_FUNCTION"];
const MULTICROP_COLLATOR: &str = "multicrop_collator";

/// Fills the loss parameters that VISSL's defaults mark "automatically inferred".
fn infer_losses(config: &mut Value, layout: &Layout) -> Result<(), ConfigError> {
    let Some(name) = opt_str_at(config, &["LOSS", "name"])? else {
        return Ok(());
    };
    let loss = name.to_string();
    let crops = train_crop_count(config)?;
    match loss.as_str() {
        // SimCLR contrasts two views of each image, so each replica holds twice its batch.
        "simclr_info_nce_loss" => {
            infer_contrastive_buffer(config, &loss, layout, 2 * layout.global_batch())?;
        }
        // The multi-crop variant counts images, not views.
        "multicrop_simclr_info_nce_loss" => {
            infer_contrastive_buffer(config, &loss, layout, layout.global_batch())?;
            set_crop_count(config, &loss, crops)?;
            set(config, COLLATE_FUNCTION, MULTICROP_COLLATOR)?;
        }
        "bce_logits_multiple_output_single_target" => {
            set(config, &["LOSS", &loss, "world_size"], layout.world_size())?;
        }
        "deepclusterv2_loss" => {
            let drop_last = get(config, &["DATA", "TRAIN", "DROP_LAST"])
                .cloned()
                .unwrap_or(Value::Bool(false));
            set(config, &["LOSS", &loss, "DROP_LAST"], drop_last)?;
            set(
                config,
                &["LOSS", &loss, "BATCHSIZE_PER_REPLICA"],
                layout.batch_per_replica,
            )?;
            set_crop_count(config, &loss, crops)?;
            set_embedding_dim_from_head(
                config,
                &["LOSS", &loss, "memory_params", "embedding_dim"],
            )?;
            set(config, COLLATE_FUNCTION, MULTICROP_COLLATOR)?;
        }
        "swav_loss" => {
            let collator = opt_str_at(config, COLLATE_FUNCTION)?.unwrap_or_default();
            const MULTICROP_COLLATORS: [&str; 3] = [
                MULTICROP_COLLATOR,
                "multicrop_mixup_collator",
                "cutmixup_collator",
            ];
            if !MULTICROP_COLLATORS.contains(&collator) {
                return Err(ConfigError::Invalid {
                    path: dotted(COLLATE_FUNCTION),
                    reason: format!(
                        "swav_loss needs a multi-crop collator ({}), found `{collator}`",
                        MULTICROP_COLLATORS.join(", ")
                    ),
                });
            }
            infer_swav_family(
                config,
                &loss,
                &["swav_head", "swav_head_fsdp"],
                layout,
                crops,
            )?;
            let output_dir = checkpoint_folder(config, layout)?;
            set(config, &["LOSS", &loss, "output_dir"], output_dir)?;
        }
        "swav_momentum_loss" => {
            infer_swav_family(config, &loss, &["swav_head"], layout, crops)?;
            set(config, COLLATE_FUNCTION, MULTICROP_COLLATOR)?;
        }
        "dino_loss" => {
            let (_, params) =
                single_head(config, &loss, &["swav_head", "dino_head", "dino_head_fsdp"])?;
            let output_dim = first_cluster_count(params, &loss)?;
            set(config, &["LOSS", &loss, "output_dim"], output_dim)?;
            set_crop_count(config, &loss, crops)?;
            set(config, COLLATE_FUNCTION, MULTICROP_COLLATOR)?;
        }
        // Beyond VISSL: these losses size their buffers from `embedding_dim`, which must equal the
        // head's output, so it is taken from there like SwAV's.
        "moco_loss" | "barlow_twins_loss" => {
            set_embedding_dim_from_head(config, &["LOSS", &loss, "embedding_dim"])?;
        }
        "nce_loss_with_memory" => {
            set_embedding_dim_from_head(
                config,
                &["LOSS", &loss, "memory_params", "embedding_dim"],
            )?;
        }
        _ => {}
    }
    Ok(())
}

/// World size and global batch of SimCLR's distributed buffer, and its embedding size.
fn infer_contrastive_buffer(
    config: &mut Value,
    loss: &str,
    layout: &Layout,
    effective_batch_size: usize,
) -> Result<(), ConfigError> {
    set(
        config,
        &["LOSS", loss, "buffer_params", "world_size"],
        layout.world_size(),
    )?;
    set(
        config,
        &["LOSS", loss, "buffer_params", "effective_batch_size"],
        effective_batch_size,
    )?;
    set_embedding_dim_from_head(config, &["LOSS", loss, "buffer_params", "embedding_dim"])
}

/// SwAV and SwAV-momentum: prototypes and embedding from the head, crops from the transforms, and a
/// queue that holds whole global batches.
fn infer_swav_family(
    config: &mut Value,
    loss: &str,
    heads: &[&str],
    layout: &Layout,
    crops: Option<usize>,
) -> Result<(), ConfigError> {
    let (index, params) = single_head(config, loss, heads)?;
    let prototypes = params
        .get("num_clusters")
        .cloned()
        .ok_or_else(|| ConfigError::Invalid {
            path: format!("MODEL.HEAD.PARAMS[{index}].num_clusters"),
            reason: format!("{loss} takes its prototype counts from it"),
        })?;
    let embedding_dim = last_dim(params, index)?.ok_or_else(|| ConfigError::Invalid {
        path: format!("MODEL.HEAD.PARAMS[{index}].dims"),
        reason: format!("{loss} takes its embedding size from the last entry"),
    })?;
    set(config, &["LOSS", loss, "num_prototypes"], prototypes)?;
    set(config, &["LOSS", loss, "embedding_dim"], embedding_dim)?;
    set_crop_count(config, loss, crops)?;
    size_queue(config, loss, layout)
}

/// Rounds `queue.queue_length` down to whole global batches and splits it over the replicas.
fn size_queue(config: &mut Value, loss: &str, layout: &Layout) -> Result<(), ConfigError> {
    let path = ["LOSS", loss, "queue", "queue_length"];
    let requested = usize_at(config, &path)?;
    let global_batch = layout.global_batch();
    if global_batch == 0 {
        return Err(ConfigError::Invalid {
            path: "DATA.TRAIN.BATCHSIZE_PER_REPLICA".into(),
            reason: format!("must be positive: {loss}'s queue holds whole global batches"),
        });
    }
    let queue_length = requested - requested % global_batch;
    set(config, &path, queue_length)?;
    set(
        config,
        &["LOSS", loss, "queue", "local_queue_length"],
        queue_length / layout.world_size(),
    )
}

/// Where VISSL writes run outputs: `CHECKPOINT.DIR`, plus the run id on multi-node runs that ask for it.
fn checkpoint_folder(config: &Value, layout: &Layout) -> Result<String, ConfigError> {
    let dir = opt_str_at(config, &["CHECKPOINT", "DIR"])?.unwrap_or(".");
    let append_run_id =
        opt_bool_at(config, &["CHECKPOINT", "APPEND_DISTR_RUN_ID"])?.unwrap_or(false);
    if layout.num_nodes > 1 && append_run_id {
        let run_id = opt_str_at(config, &["DISTRIBUTED", "RUN_ID"])?.unwrap_or("auto");
        return Ok(format!("{}/{run_id}", dir.trim_end_matches('/')));
    }
    Ok(dir.to_string())
}

/// Overwrites `LOSS.<loss>.num_crops` when the transforms say how many crops they make.
fn set_crop_count(config: &mut Value, loss: &str, crops: Option<usize>) -> Result<(), ConfigError> {
    match crops {
        Some(n) if n > 0 => set(config, &["LOSS", loss, "num_crops"], n),
        _ => Ok(()),
    }
}

/// Views per image made by the training transforms: a multi-crop transform's `total_num_crops`
/// (as VISSL, whichever transform carries the key), else `ImgReplicatePil`'s `num_times`.
fn train_crop_count(config: &Value) -> Result<Option<usize>, ConfigError> {
    let Some(transforms) = get(config, &["DATA", "TRAIN", "TRANSFORMS"]) else {
        return Ok(None);
    };
    let transforms = as_seq(transforms, "DATA.TRAIN.TRANSFORMS")?;
    let mut multicrop = None;
    let mut replicate = None;
    for (k, transform) in transforms.iter().enumerate() {
        let path = format!("DATA.TRAIN.TRANSFORMS[{k}]");
        let Some(transform) = transform.as_mapping() else {
            return Err(wrong_type(&path, "a mapping with a `name`", transform));
        };
        if let Some(total) = transform.get("total_num_crops") {
            multicrop = Some(as_usize(total, &format!("{path}.total_num_crops"))?);
        } else if transform.get("name").and_then(Value::as_str) == Some("ImgReplicatePil") {
            let times = match transform.get("num_times") {
                Some(v) => as_usize(v, &format!("{path}.num_times"))?,
                // ImgReplicatePil's own default.
                None => 2,
            };
            replicate = Some(times);
        }
    }
    Ok(multicrop.or(replicate))
}

// ---------------------------------------------------------------------------------------------
// Model heads

const HEAD_PARAMS: &[&str] = &["MODEL", "HEAD", "PARAMS"];

/// `MODEL.HEAD.PARAMS` as `(name, params)` pairs; VISSL writes each head as `[name, {params}]`.
fn heads(config: &Value) -> Result<Vec<(&str, &Mapping)>, ConfigError> {
    let Some(list) = get(config, HEAD_PARAMS) else {
        return Ok(Vec::new());
    };
    let list = as_seq(list, "MODEL.HEAD.PARAMS")?;
    list.iter()
        .enumerate()
        .map(|(k, head)| {
            let path = format!("MODEL.HEAD.PARAMS[{k}]");
            match head.as_sequence().map(Vec::as_slice) {
                Some([Value::String(name), Value::Mapping(params)]) => Ok((name.as_str(), params)),
                _ => Err(wrong_type(&path, "a `[head_name, {params}]` pair", head)),
            }
        })
        .collect()
}

/// The only head, which must be one of `allowed`, with its index.
fn single_head<'a>(
    config: &'a Value,
    loss: &str,
    allowed: &[&str],
) -> Result<(usize, &'a Mapping), ConfigError> {
    let heads = heads(config)?;
    match heads.as_slice() {
        [(name, params)] if allowed.contains(name) => Ok((0, params)),
        _ => {
            let found: Vec<&str> = heads.iter().map(|(name, _)| *name).collect();
            Err(ConfigError::Invalid {
                path: dotted(HEAD_PARAMS),
                reason: format!(
                    "{loss} needs exactly one head, one of [{}]; found [{}]",
                    allowed.join(", "),
                    found.join(", ")
                ),
            })
        }
    }
}

/// The last entry of a head's `dims`: the size of the embedding it outputs.
fn last_dim(params: &Mapping, index: usize) -> Result<Option<usize>, ConfigError> {
    let Some(dims) = params.get("dims") else {
        return Ok(None);
    };
    let path = format!("MODEL.HEAD.PARAMS[{index}].dims");
    match as_seq(dims, &path)?.last() {
        Some(last) => Ok(Some(as_usize(last, &format!("{path}[-1]"))?)),
        None => Ok(None),
    }
}

/// Sets `path` to the output size of the last head that declares `dims`; leaves it when none does.
fn set_embedding_dim_from_head(config: &mut Value, path: &[&str]) -> Result<(), ConfigError> {
    let mut embedding_dim = None;
    for (index, (_, params)) in heads(config)?.iter().enumerate() {
        if let Some(dim) = last_dim(params, index)? {
            embedding_dim = Some(dim);
        }
    }
    match embedding_dim {
        Some(dim) => set(config, path, dim),
        None => Ok(()),
    }
}

/// DINO's output size: the first (usually only) prototype count of the head.
fn first_cluster_count(params: &Mapping, loss: &str) -> Result<usize, ConfigError> {
    let path = "MODEL.HEAD.PARAMS[0].num_clusters";
    match params.get("num_clusters") {
        Some(Value::Sequence(counts)) if !counts.is_empty() => {
            as_usize(&counts[0], &format!("{path}[0]"))
        }
        Some(count @ Value::Number(_)) => as_usize(count, path),
        Some(other) => Err(wrong_type(
            path,
            "a non-empty list of prototype counts",
            other,
        )),
        None => Err(ConfigError::Invalid {
            path: path.into(),
            reason: format!("{loss} takes its output size from it"),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Learning rates and weight decay

const LR: &[&str] = &["OPTIMIZER", "param_schedulers", "lr"];
const LR_HEAD: &[&str] = &["OPTIMIZER", "param_schedulers", "lr_head"];
const HEAD_OPTIMIZER_PARAMS: &[&str] = &["OPTIMIZER", "head_optimizer_params"];
const USE_DIFFERENT_LR: &[&str] = &["OPTIMIZER", "head_optimizer_params", "use_different_lr"];
const USE_DIFFERENT_WD: &[&str] = &["OPTIMIZER", "head_optimizer_params", "use_different_wd"];
const HEAD_WEIGHT_DECAY: &[&str] = &["OPTIMIZER", "head_optimizer_params", "weight_decay"];

/// Auto LR scaling (docs §"Auto-scaling of Learning Rate") of `lr`, then `lr_head`: a copy of `lr`
/// unless the head has its own LR, which is scaled the same way.
fn infer_learning_rates(config: &mut Value, layout: &Layout) -> Result<(), ConfigError> {
    if get(config, LR).is_none() {
        return Ok(());
    }
    scale_if_enabled(config, LR, layout)?;
    let different_lr = opt_bool_at(config, USE_DIFFERENT_LR)?.unwrap_or(false);
    if !different_lr {
        let lr = get(config, LR).cloned().unwrap_or(Value::Null);
        return set(config, LR_HEAD, lr);
    }
    match get(config, LR_HEAD) {
        Some(Value::Mapping(head)) if !head.is_empty() => scale_if_enabled(config, LR_HEAD, layout),
        _ => Ok(()),
    }
}

/// What a composite's linear warmup starts from: the LR scaled for one node's batch.
struct Warmup {
    start_value: f64,
    single_node: bool,
}

fn scale_if_enabled(config: &mut Value, path: &[&str], layout: &Layout) -> Result<(), ConfigError> {
    let block_path = dotted(path);
    let scaling_path = format!("{block_path}.auto_lr_scaling");
    let Some(scaling) = get(config, &[path, &["auto_lr_scaling"]].concat()) else {
        return Ok(());
    };
    let scaling: AutoLrScaling =
        serde_yaml::from_value(scaling.clone()).map_err(|e| ConfigError::Invalid {
            path: scaling_path.clone(),
            reason: e.to_string(),
        })?;
    if !scaling.auto_scale {
        return Ok(());
    }
    if scaling.base_lr_batch_size == 0 {
        return Err(ConfigError::Invalid {
            path: format!("{scaling_path}.base_lr_batch_size"),
            reason: "must be positive".into(),
        });
    }
    let ratio = |batch: usize| batch as f64 / scaling.base_lr_batch_size as f64;
    let factor = match scaling.scaling_type {
        ScalingType::Linear => ratio(layout.global_batch()),
        ScalingType::Sqrt => ratio(layout.global_batch()).sqrt(),
    };
    let scaled_lr = scaling.base_value * factor;
    // VISSL scales the warmup start linearly whatever the scaling type.
    let warmup = Warmup {
        start_value: scaling.base_value * ratio(layout.batch_per_node()),
        single_node: layout.num_nodes == 1,
    };
    let block = get_mut(config, path).ok_or_else(|| missing(&block_path))?;
    scale_schedule(block, &block_path, scaled_lr, &warmup)
}

/// Rewrites one schedule so that its peak is `scaled_lr`, keeping its shape.
fn scale_schedule(
    block: &mut Value,
    path: &str,
    scaled_lr: f64,
    warmup: &Warmup,
) -> Result<(), ConfigError> {
    let name = str_in(block, "name", path)?.to_string();
    match name.as_str() {
        // Keep the decay ratio end/start.
        "cosine" | "cosine_warm_restart" => {
            let start = f64_in(block, "start_value", path)?;
            let end = f64_in(block, "end_value", path)?;
            if start == 0.0 {
                return Err(cannot_scale(path, "start_value", "a schedule starting at 0 has no decay ratio to keep"));
            }
            set_in(block, "end_value", scaled_lr * (end / start), path)?;
            set_in(block, "start_value", scaled_lr, path)?;
        }
        // Keep the ratio between consecutive steps; VISSL rounds gamma and the values.
        "multistep" | "step" => {
            let values_path = format!("{path}.values");
            let values = as_seq(block.get("values").ok_or_else(|| missing(&values_path))?, &values_path)?
                .iter()
                .enumerate()
                .map(|(k, v)| as_f64(v, &format!("{values_path}[{k}]")))
                .collect::<Result<Vec<f64>, _>>()?;
            let gamma = match values.as_slice() {
                [0.0, _, ..] => return Err(cannot_scale(path, "values", "the first value is 0, so the step ratio is undefined")),
                [first, second, ..] => round_decimals(second / first, 6),
                _ => 1.0,
            };
            let scaled: Vec<Value> = (0..values.len())
                .map(|k| Value::from(round_decimals(scaled_lr * gamma.powi(k as i32), 8)))
                .collect();
            set_in(block, "values", Value::Sequence(scaled), path)?;
        }
        "step_with_fixed_gamma" => set_in(block, "base_value", scaled_lr, path)?,
        "linear" => set_in(block, "end_value", scaled_lr, path)?,
        "inverse_sqrt" => set_in(block, "start_value", scaled_lr, path)?,
        "constant" => set_in(block, "value", scaled_lr, path)?,
        "composite" => {
            let schedulers_path = format!("{path}.schedulers");
            let schedulers = block
                .get_mut("schedulers")
                .and_then(Value::as_sequence_mut)
                .ok_or_else(|| ConfigError::Invalid {
                    path: schedulers_path.clone(),
                    reason: "a composite schedule needs a list of schedulers".into(),
                })?;
            let mut has_linear = false;
            for (k, sub) in schedulers.iter_mut().enumerate() {
                let sub_path = format!("{schedulers_path}[{k}]");
                has_linear |= str_in(sub, "name", &sub_path)? == "linear";
                scale_schedule(sub, &sub_path, scaled_lr, warmup)?;
            }
            if has_linear {
                resolve_warmup(block, path, warmup)?;
            }
        }
        other => {
            return Err(cannot_scale(
                path,
                "name",
                &format!(
                    "auto_lr_scaling cannot scale `{other}`; it supports cosine, cosine_warm_restart, multistep, \
                     step, step_with_fixed_gamma, linear, inverse_sqrt, constant and composite"
                ),
            ))
        }
    }
    Ok(())
}

/// A composite's linear parts are warmups from the one-node LR (Goyal et al.). On one node that
/// start already is the target, so VISSL drops the warmup; a composite left with one schedule
/// becomes that schedule.
///
/// VISSL leaves `lengths` and `interval_scaling` as they were, which breaks when more than one
/// schedule remains; here the dropped entry goes too and the remaining lengths are rescaled to sum to 1.
fn resolve_warmup(block: &mut Value, path: &str, warmup: &Warmup) -> Result<(), ConfigError> {
    let schedulers_path = format!("{path}.schedulers");
    let Some(schedulers) = block.get_mut("schedulers").and_then(Value::as_sequence_mut) else {
        return Err(missing(&schedulers_path));
    };
    let mut dropped = None;
    for (k, sub) in schedulers.iter_mut().enumerate() {
        let sub_path = format!("{schedulers_path}[{k}]");
        if str_in(sub, "name", &sub_path)? != "linear" {
            continue;
        }
        set_in(sub, "start_value", warmup.start_value, &sub_path)?;
        // VISSL drops only the last such warmup.
        if warmup.single_node && warmup.start_value <= f64_in(sub, "end_value", &sub_path)? {
            dropped = Some(k);
        }
    }
    if let Some(k) = dropped {
        schedulers.remove(k);
        drop_entry(block, "interval_scaling", k);
        if let Some(lengths) = block.get_mut("lengths").and_then(Value::as_sequence_mut) {
            if k < lengths.len() {
                lengths.remove(k);
                let lengths_path = format!("{path}.lengths");
                let values = lengths
                    .iter()
                    .enumerate()
                    .map(|(i, v)| as_f64(v, &format!("{lengths_path}[{i}]")))
                    .collect::<Result<Vec<f64>, _>>()?;
                let total: f64 = values.iter().sum();
                if total > 0.0 {
                    *lengths = values.iter().map(|l| Value::from(l / total)).collect();
                }
            }
        }
    }
    let remaining = block
        .get("schedulers")
        .and_then(Value::as_sequence)
        .map(Vec::as_slice);
    if let Some([Value::Mapping(only)]) = remaining {
        let only = only.clone();
        let target = block.as_mapping_mut().ok_or_else(|| missing(path))?;
        for (key, value) in only {
            target.insert(key, value);
        }
    }
    Ok(())
}

fn drop_entry(block: &mut Value, key: &str, index: usize) {
    if let Some(list) = block.get_mut(key).and_then(Value::as_sequence_mut) {
        if index < list.len() {
            list.remove(index);
        }
    }
}

/// Python's `round(x, digits)`: Rust's fixed-precision formatting rounds the exact binary value
/// half-to-even, as Python does.
fn round_decimals(x: f64, digits: usize) -> f64 {
    format!("{x:.digits$}").parse().unwrap_or(x)
}

fn cannot_scale(path: &str, key: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        path: format!("{path}.{key}"),
        reason: reason.to_string(),
    }
}

/// The head's weight decay is the trunk's unless the head asks for its own.
fn infer_head_weight_decay(config: &mut Value) -> Result<(), ConfigError> {
    if get(config, HEAD_OPTIMIZER_PARAMS).is_none() {
        return Ok(());
    }
    if opt_bool_at(config, USE_DIFFERENT_WD)?.unwrap_or(false) {
        let wd = f64_at(config, HEAD_WEIGHT_DECAY)?;
        if wd.is_nan() || wd < 0.0 {
            return Err(ConfigError::Invalid {
                path: dotted(HEAD_WEIGHT_DECAY),
                reason: format!("must be >= 0, found {wd}"),
            });
        }
        return Ok(());
    }
    let trunk_wd = f64_at(config, &["OPTIMIZER", "weight_decay"])?;
    set(config, HEAD_WEIGHT_DECAY, trunk_wd)
}

// ---------------------------------------------------------------------------------------------
// Meters and labels

/// List meters that report one value per evaluated feature layer.
const LIST_METERS: [&str; 4] = [
    "accuracy_list_meter",
    "mean_ap_list_meter",
    "precision_at_k_list_meter",
    "recall_at_k_list_meter",
];

/// `METERS.name` joins `METERS.names`; when the model is a frozen feature extractor, each list meter
/// gets one meter per evaluated layer, named after it.
fn infer_meters(config: &mut Value) -> Result<(), ConfigError> {
    if !matches!(get(config, &["METERS"]), Some(Value::Mapping(_))) {
        return Ok(());
    }
    let mut names = string_list_at(config, &["METERS", "names"])?;
    if let Some(name) = opt_str_at(config, &["METERS", "name"])?.filter(|n| !n.is_empty()) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
            let list = names.iter().map(|n| Value::from(n.as_str())).collect();
            set(config, &["METERS", "names"], Value::Sequence(list))?;
        }
    }
    let Some(layers) = evaluated_feature_layers(config)? else {
        return Ok(());
    };
    for meter in names.iter().filter(|n| LIST_METERS.contains(&n.as_str())) {
        set(config, &["METERS", meter, "num_meters"], layers.len())?;
        let layer_names = layers.iter().map(|l| Value::from(l.as_str())).collect();
        set(
            config,
            &["METERS", meter, "meter_names"],
            Value::Sequence(layer_names),
        )?;
    }
    Ok(())
}

/// Layer names of `LINEAR_EVAL_FEAT_POOL_OPS_MAP` when the model is a feature extractor: eval mode
/// on, trunk (or trunk and head) frozen, and at least one layer listed.
fn evaluated_feature_layers(config: &Value) -> Result<Option<Vec<String>>, ConfigError> {
    const SETTINGS: [&str; 2] = ["MODEL", "FEATURE_EVAL_SETTINGS"];
    let flag = |key: &str| {
        opt_bool_at(config, &[&SETTINGS[..], &[key]].concat()).map(|b| b.unwrap_or(false))
    };
    if !(flag("EVAL_MODE_ON")? && (flag("FREEZE_TRUNK_ONLY")? || flag("FREEZE_TRUNK_AND_HEAD")?)) {
        return Ok(None);
    }
    let map_key = [&SETTINGS[..], &["LINEAR_EVAL_FEAT_POOL_OPS_MAP"]].concat();
    let Some(map) = get(config, &map_key) else {
        return Ok(None);
    };
    let map_path = dotted(&map_key);
    let layers = as_seq(map, &map_path)?
        .iter()
        .enumerate()
        .map(|(k, entry)| {
            match entry
                .as_sequence()
                .and_then(|e| e.first())
                .and_then(Value::as_str)
            {
                Some(layer) => Ok(layer.to_string()),
                None => Err(wrong_type(
                    &format!("{map_path}[{k}]"),
                    "a `[layer_name, pooling]` pair",
                    entry,
                )),
            }
        })
        .collect::<Result<Vec<String>, _>>()?;
    Ok((!layers.is_empty()).then_some(layers))
}

/// Without label sources the only label is the sample's index (unless the user asked for `zero`,
/// which CutMixUp self-supervision needs).
fn infer_label_types(config: &mut Value) -> Result<(), ConfigError> {
    for split in ["TRAIN", "TEST"] {
        let Some(sources) = get(config, &["DATA", split, "LABEL_SOURCES"]) else {
            continue;
        };
        let has_sources = !as_seq(sources, &format!("DATA.{split}.LABEL_SOURCES"))?.is_empty();
        let label_type = ["DATA", split, "LABEL_TYPE"];
        if !has_sources && opt_str_at(config, &label_type)? != Some("zero") {
            set(config, &label_type, "sample_index")?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading and writing the YAML tree

fn dotted(path: &[&str]) -> String {
    path.join(".")
}

fn get<'a>(config: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter()
        .try_fold(config, |node, key| node.as_mapping()?.get(*key))
}

fn get_mut<'a>(config: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter()
        .try_fold(config, |node, key| node.as_mapping_mut()?.get_mut(*key))
}

/// Writes `value` at `path`, creating missing parent mappings.
fn set(config: &mut Value, path: &[&str], value: impl Into<Value>) -> Result<(), ConfigError> {
    let mut node = config;
    for (depth, key) in path.iter().enumerate() {
        let Some(map) = node.as_mapping_mut() else {
            return Err(ConfigError::Invalid {
                path: dotted(&path[..depth]),
                reason: format!("must be a mapping to hold the inferred `{}`", dotted(path)),
            });
        };
        node = map.entry(Value::from(*key)).or_insert(Value::Null);
        if depth + 1 < path.len() && node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
    }
    *node = value.into();
    Ok(())
}

fn set_in(
    block: &mut Value,
    key: &str,
    value: impl Into<Value>,
    path: &str,
) -> Result<(), ConfigError> {
    let map = block.as_mapping_mut().ok_or_else(|| missing(path))?;
    map.insert(Value::from(key), value.into());
    Ok(())
}

fn missing(path: &str) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_string(),
        reason: "missing; inference needs it".into(),
    }
}

fn wrong_type(path: &str, expected: &str, found: &Value) -> ConfigError {
    let found = serde_yaml::to_string(found)
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    ConfigError::Invalid {
        path: path.to_string(),
        reason: format!("must be {expected}, found `{found}`"),
    }
}

fn as_usize(value: &Value, path: &str) -> Result<usize, ConfigError> {
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| wrong_type(path, "a non-negative integer", value))
}

fn as_f64(value: &Value, path: &str) -> Result<f64, ConfigError> {
    value
        .as_f64()
        .ok_or_else(|| wrong_type(path, "a number", value))
}

fn as_seq<'a>(value: &'a Value, path: &str) -> Result<&'a Vec<Value>, ConfigError> {
    value
        .as_sequence()
        .ok_or_else(|| wrong_type(path, "a list", value))
}

fn usize_at(config: &Value, path: &[&str]) -> Result<usize, ConfigError> {
    let dotted = dotted(path);
    as_usize(get(config, path).ok_or_else(|| missing(&dotted))?, &dotted)
}

fn f64_at(config: &Value, path: &[&str]) -> Result<f64, ConfigError> {
    let dotted = dotted(path);
    as_f64(get(config, path).ok_or_else(|| missing(&dotted))?, &dotted)
}

fn opt_str_at<'a>(config: &'a Value, path: &[&str]) -> Result<Option<&'a str>, ConfigError> {
    match get(config, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(&dotted(path), "a string", other)),
    }
}

fn opt_bool_at(config: &Value, path: &[&str]) -> Result<Option<bool>, ConfigError> {
    match get(config, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(&dotted(path), "true or false", other)),
    }
}

fn string_list_at(config: &Value, path: &[&str]) -> Result<Vec<String>, ConfigError> {
    let dotted = dotted(path);
    match get(config, path) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(list) => as_seq(list, &dotted)?
            .iter()
            .enumerate()
            .map(|(k, v)| {
                v.as_str()
                    .map(String::from)
                    .ok_or_else(|| wrong_type(&format!("{dotted}[{k}]"), "a string", v))
            })
            .collect(),
    }
}

fn str_in<'a>(block: &'a Value, key: &str, path: &str) -> Result<&'a str, ConfigError> {
    let key_path = format!("{path}.{key}");
    let value = block.get(key).ok_or_else(|| missing(&key_path))?;
    value
        .as_str()
        .ok_or_else(|| wrong_type(&key_path, "a string", value))
}

fn f64_in(block: &Value, key: &str, path: &str) -> Result<f64, ConfigError> {
    let key_path = format!("{path}.{key}");
    as_f64(block.get(key).ok_or_else(|| missing(&key_path))?, &key_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts of VISSL's defaults that inference reads, with a 1-node x 8-GPU layout.
    const BASE: &str = r#"
DISTRIBUTED: {NUM_NODES: 1, NUM_PROC_PER_NODE: 8, RUN_ID: "auto"}
MACHINE: {DEVICE: gpu}
CHECKPOINT: {DIR: "/ckpt", APPEND_DISTR_RUN_ID: false}
DATA:
  TRAIN:
    BATCHSIZE_PER_REPLICA: 32
    DROP_LAST: true
    COLLATE_FUNCTION: default_collate
    LABEL_SOURCES: []
    LABEL_TYPE: standard
    TRANSFORMS: [{name: RandomResizedCrop, size: 224}]
  TEST:
    BATCHSIZE_PER_REPLICA: 32
    LABEL_SOURCES: [disk_folder]
    LABEL_TYPE: standard
MODEL:
  HEAD:
    PARAMS: [["mlp", {dims: [2048, 2048]}], ["mlp", {dims: [2048, 128]}]]
  FEATURE_EVAL_SETTINGS:
    EVAL_MODE_ON: false
    FREEZE_TRUNK_ONLY: false
    FREEZE_TRUNK_AND_HEAD: false
    LINEAR_EVAL_FEAT_POOL_OPS_MAP: []
LOSS:
  name: CrossEntropyLoss
  simclr_info_nce_loss:
    temperature: 0.1
    buffer_params: {world_size: 64, embedding_dim: 999, effective_batch_size: 4096}
  swav_loss:
    embedding_dim: 999
    num_crops: 2
    num_prototypes: [1]
    output_dir: "."
    queue: {queue_length: 0, start_iter: 0, local_queue_length: 0}
OPTIMIZER:
  weight_decay: 0.0001
  num_epochs: 100
  head_optimizer_params: {use_different_lr: false, use_different_wd: false, weight_decay: 0.5}
  param_schedulers:
    lr:
      auto_lr_scaling: {auto_scale: true, base_value: 0.3, base_lr_batch_size: 256, scaling_type: linear}
      name: cosine
      update_interval: step
      start_value: 0.15
      end_value: 0.00015
    lr_head:
      auto_lr_scaling: {auto_scale: false, base_value: 0.1, base_lr_batch_size: 256, scaling_type: linear}
      name: multistep
      values: [0.1, 0.01]
      milestones: [30]
METERS:
  name: ""
  names: []
  accuracy_list_meter: {num_meters: 1, topk_values: [1], meter_names: []}
"#;

    fn yaml(text: &str) -> Value {
        serde_yaml::from_str(text).expect("test YAML parses")
    }

    /// BASE with `key=value` overrides (value in YAML).
    fn config(overrides: &[(&str, &str)]) -> Value {
        let mut config = yaml(BASE);
        for (key, value) in overrides {
            let path: Vec<&str> = key.split('.').collect();
            set(&mut config, &path, yaml(value)).expect("override applies");
        }
        config
    }

    fn inferred(overrides: &[(&str, &str)]) -> Value {
        let mut config = config(overrides);
        infer(&mut config, None).expect("inference succeeds");
        config
    }

    /// The value at a dotted key; numeric segments index lists.
    fn at<'a>(config: &'a Value, key: &str) -> &'a Value {
        key.split('.')
            .try_fold(config, |node, segment| match segment.parse::<usize>() {
                Ok(index) => node.as_sequence()?.get(index),
                Err(_) => node.as_mapping()?.get(segment),
            })
            .unwrap_or_else(|| panic!("{key} missing"))
    }

    fn num(config: &Value, key: &str) -> f64 {
        at(config, key)
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number"))
    }

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
    }

    fn invalid_path(result: Result<(), ConfigError>) -> String {
        match result {
            Err(ConfigError::Invalid { path, .. }) => path,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn cosine_scales_to_global_batch_keeping_decay_ratio() {
        // 32 per GPU x 8 GPUs = 256 = base_lr_batch_size, so scaled_lr = 256 * 0.3 / 256 = 0.3;
        // end keeps the ratio 0.00015 / 0.15 = 0.001 -> 0.0003.
        let c = inferred(&[]);
        close(num(&c, "OPTIMIZER.param_schedulers.lr.start_value"), 0.3);
        close(num(&c, "OPTIMIZER.param_schedulers.lr.end_value"), 0.0003);
        // Without use_different_lr the head schedule is a copy of the trunk's.
        assert_eq!(
            at(&c, "OPTIMIZER.param_schedulers.lr_head"),
            at(&c, "OPTIMIZER.param_schedulers.lr")
        );
    }

    #[test]
    fn sqrt_scaling_and_vissl_test_numbers() {
        // VISSL's own test: global batch 32 with base 0.3 / 256 and a linear schedule:
        // linear scaling gives 0.3 * 0.125, sqrt scaling 0.3 * sqrt(0.125).
        for (scaling, expected) in [("linear", 0.3 * 0.125), ("sqrt", 0.3 * 0.125f64.sqrt())] {
            let c = inferred(&[
                ("DATA.TRAIN.BATCHSIZE_PER_REPLICA", "4"),
                ("OPTIMIZER.param_schedulers.lr.name", "linear"),
                (
                    "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type",
                    scaling,
                ),
            ]);
            close(num(&c, "OPTIMIZER.param_schedulers.lr.end_value"), expected);
        }
    }

    #[test]
    fn auto_scale_off_leaves_values() {
        let c = inferred(&[(
            "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.auto_scale",
            "false",
        )]);
        close(num(&c, "OPTIMIZER.param_schedulers.lr.start_value"), 0.15);
    }

    #[test]
    fn multistep_keeps_gamma_and_other_schedules_set_their_key() {
        // Global batch 2 nodes x 8 x 32 = 512, base 0.1 / 256 -> scaled 0.2; gamma 0.01 / 0.1 = 0.1.
        let c = inferred(&[
            ("DISTRIBUTED.NUM_NODES", "2"),
            (
                "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value",
                "0.1",
            ),
            ("OPTIMIZER.param_schedulers.lr.name", "multistep"),
            ("OPTIMIZER.param_schedulers.lr.values", "[0.1, 0.01, 0.001]"),
        ]);
        assert_eq!(
            at(&c, "OPTIMIZER.param_schedulers.lr.values"),
            &yaml("[0.2, 0.02, 0.002]")
        );
        for (name, key) in [
            ("constant", "value"),
            ("inverse_sqrt", "start_value"),
            ("step_with_fixed_gamma", "base_value"),
            ("linear", "end_value"),
        ] {
            let c = inferred(&[
                ("DISTRIBUTED.NUM_NODES", "2"),
                (
                    "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.base_value",
                    "0.1",
                ),
                ("OPTIMIZER.param_schedulers.lr.name", name),
            ]);
            close(
                num(&c, &format!("OPTIMIZER.param_schedulers.lr.{key}")),
                0.2,
            );
        }
    }

    const WARMUP_COSINE: &str = r#"
auto_lr_scaling: {auto_scale: true, base_value: 4.8, base_lr_batch_size: 4096, scaling_type: linear}
name: composite
schedulers:
  - {name: linear, start_value: 0.6, end_value: 4.8}
  - {name: cosine, start_value: 4.8, end_value: 0.0048}
interval_scaling: [rescaled, fixed]
update_interval: step
lengths: [0.1, 0.9]
"#;

    #[test]
    fn single_node_composite_drops_warmup_and_becomes_the_cosine() {
        // 64 x 1 GPU: scaled_lr = 64 * 4.8 / 4096 = 0.075; the one-node warmup start is the same
        // 0.075, so the warmup is pointless and dropped; the cosine alone remains, 0.075 -> 0.000075.
        let c = inferred(&[
            ("DISTRIBUTED.NUM_PROC_PER_NODE", "1"),
            ("DATA.TRAIN.BATCHSIZE_PER_REPLICA", "64"),
            ("OPTIMIZER.param_schedulers.lr", WARMUP_COSINE),
        ]);
        let lr = "OPTIMIZER.param_schedulers.lr";
        assert_eq!(at(&c, &format!("{lr}.name")), &yaml("cosine"));
        close(num(&c, &format!("{lr}.start_value")), 0.075);
        close(num(&c, &format!("{lr}.end_value")), 0.075 * 0.001);
        assert_eq!(at(&c, &format!("{lr}.lengths")), &yaml("[1.0]"));
        assert_eq!(at(&c, &format!("{lr}.interval_scaling")), &yaml("[fixed]"));
    }

    #[test]
    fn multi_node_composite_warms_up_from_the_one_node_lr() {
        // 2 nodes x 8 x 32: global 512 -> scaled 512 * 4.8 / 4096 = 0.6; per node 256 -> 0.3.
        let c = inferred(&[
            ("DISTRIBUTED.NUM_NODES", "2"),
            ("OPTIMIZER.param_schedulers.lr", WARMUP_COSINE),
        ]);
        let lr = "OPTIMIZER.param_schedulers.lr";
        assert_eq!(at(&c, &format!("{lr}.name")), &yaml("composite"));
        close(num(&c, &format!("{lr}.schedulers.0.start_value")), 0.3);
        close(num(&c, &format!("{lr}.schedulers.0.end_value")), 0.6);
        close(num(&c, &format!("{lr}.schedulers.1.start_value")), 0.6);
        close(
            num(&c, &format!("{lr}.schedulers.1.end_value")),
            0.6 * 0.001,
        );
        assert_eq!(at(&c, &format!("{lr}.lengths")), &yaml("[0.1, 0.9]"));
    }

    #[test]
    fn dropping_a_warmup_among_several_renormalizes_lengths() {
        // One node, global 256, base 0.3 / 256 -> scaled 0.3 and warmup start 0.3. VISSL drops the
        // last warmup only; the remaining lengths 0.1, 0.4, 0.4 are rescaled by 1 / 0.9.
        let c = inferred(&[(
            "OPTIMIZER.param_schedulers.lr",
            r#"
auto_lr_scaling: {auto_scale: true, base_value: 0.3, base_lr_batch_size: 256, scaling_type: linear}
name: composite
schedulers:
  - {name: linear, start_value: 0.1, end_value: 0.3}
  - {name: cosine, start_value: 0.3, end_value: 0.003}
  - {name: linear, start_value: 0.003, end_value: 0.2}
  - {name: cosine, start_value: 0.2, end_value: 0.002}
interval_scaling: [rescaled, rescaled, rescaled, fixed]
lengths: [0.1, 0.4, 0.1, 0.4]
"#,
        )]);
        let lr = "OPTIMIZER.param_schedulers.lr";
        let names: Vec<&str> = at(&c, &format!("{lr}.schedulers"))
            .as_sequence()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["linear", "cosine", "cosine"]);
        let lengths: Vec<f64> = at(&c, &format!("{lr}.lengths"))
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (actual, expected) in lengths.iter().zip([0.1 / 0.9, 0.4 / 0.9, 0.4 / 0.9]) {
            close(*actual, expected);
        }
        assert_eq!(
            at(&c, &format!("{lr}.interval_scaling")),
            &yaml("[rescaled, rescaled, fixed]")
        );
        // The kept warmup now starts from the one-node LR 0.3 (its end is scaled to 0.3 too).
        close(num(&c, &format!("{lr}.schedulers.0.start_value")), 0.3);
        // The scaled result still builds as a schedule.
        let typed: crate::config::schedulers::ParamSchedulerConfig =
            serde_yaml::from_value(at(&c, lr).clone()).expect("typed");
        typed.build(lr, 100).expect("builds");
    }

    #[test]
    fn head_lr_is_scaled_on_its_own_when_different() {
        // Head: base 0.1 / 256 at global batch 512 (2 nodes) -> 0.2; multistep gamma 0.1.
        let c = inferred(&[
            ("DISTRIBUTED.NUM_NODES", "2"),
            ("OPTIMIZER.head_optimizer_params.use_different_lr", "true"),
            (
                "OPTIMIZER.param_schedulers.lr_head.auto_lr_scaling.auto_scale",
                "true",
            ),
        ]);
        assert_eq!(
            at(&c, "OPTIMIZER.param_schedulers.lr_head.values"),
            &yaml("[0.2, 0.02]")
        );
        // Trunk: 0.3 * 512 / 256 = 0.6.
        close(num(&c, "OPTIMIZER.param_schedulers.lr.start_value"), 0.6);
    }

    #[test]
    fn head_weight_decay_follows_trunk_unless_different() {
        let c = inferred(&[]);
        close(
            num(&c, "OPTIMIZER.head_optimizer_params.weight_decay"),
            0.0001,
        );
        let c = inferred(&[("OPTIMIZER.head_optimizer_params.use_different_wd", "true")]);
        close(num(&c, "OPTIMIZER.head_optimizer_params.weight_decay"), 0.5);
        let mut bad = config(&[
            ("OPTIMIZER.head_optimizer_params.use_different_wd", "true"),
            ("OPTIMIZER.head_optimizer_params.weight_decay", "-1.0"),
        ]);
        assert_eq!(
            invalid_path(infer(&mut bad, None)),
            "OPTIMIZER.head_optimizer_params.weight_decay"
        );
    }

    #[test]
    fn world_from_launcher_overrides_gpu_layout_but_cpu_keeps_configured_procs() {
        let world = World {
            num_nodes: 4,
            nproc_per_node: 2,
        };
        let mut gpu = config(&[]);
        infer(&mut gpu, Some(&world)).expect("infers");
        assert_eq!(at(&gpu, "DISTRIBUTED.NUM_NODES"), &yaml("4"));
        assert_eq!(at(&gpu, "DISTRIBUTED.NUM_PROC_PER_NODE"), &yaml("2"));
        // 32 x 4 x 2 = 256 -> 0.3.
        close(num(&gpu, "OPTIMIZER.param_schedulers.lr.start_value"), 0.3);

        let mut cpu = config(&[("MACHINE.DEVICE", "cpu")]);
        infer(&mut cpu, Some(&world)).expect("infers");
        assert_eq!(at(&cpu, "DISTRIBUTED.NUM_PROC_PER_NODE"), &yaml("8"));
        // 32 x 4 x 8 = 1024 -> 0.3 * 4 = 1.2.
        close(num(&cpu, "OPTIMIZER.param_schedulers.lr.start_value"), 1.2);
    }

    #[test]
    fn simclr_buffer_counts_two_views_per_image() {
        // World 2 x 8 = 16; effective batch 2 * 32 * 16 = 1024; embedding from the last head, 128.
        let c = inferred(&[
            ("DISTRIBUTED.NUM_NODES", "2"),
            ("LOSS.name", "simclr_info_nce_loss"),
        ]);
        let buffer = "LOSS.simclr_info_nce_loss.buffer_params";
        assert_eq!(at(&c, &format!("{buffer}.world_size")), &yaml("16"));
        assert_eq!(
            at(&c, &format!("{buffer}.effective_batch_size")),
            &yaml("1024")
        );
        assert_eq!(at(&c, &format!("{buffer}.embedding_dim")), &yaml("128"));
    }

    const MULTICROP: &str =
        "[{name: ImgPilToMultiCrop, total_num_crops: 8, num_crops: [2, 6], size_crops: [224, 96]}]";

    #[test]
    fn multicrop_simclr_counts_images_and_crops() {
        // World 8; effective batch 32 * 8 = 256; 2 + 6 = 8 crops.
        let c = inferred(&[
            ("LOSS.name", "multicrop_simclr_info_nce_loss"),
            ("DATA.TRAIN.TRANSFORMS", MULTICROP),
        ]);
        let loss = "LOSS.multicrop_simclr_info_nce_loss";
        assert_eq!(
            at(&c, &format!("{loss}.buffer_params.world_size")),
            &yaml("8")
        );
        assert_eq!(
            at(&c, &format!("{loss}.buffer_params.effective_batch_size")),
            &yaml("256")
        );
        assert_eq!(at(&c, &format!("{loss}.num_crops")), &yaml("8"));
        assert_eq!(
            at(&c, "DATA.TRAIN.COLLATE_FUNCTION"),
            &yaml("multicrop_collator")
        );
    }

    const SWAV_HEAD: &str =
        r#"[["swav_head", {dims: [2048, 2048, 128], use_bn: true, num_clusters: [3000]}]]"#;

    #[test]
    fn swav_takes_head_crops_checkpoint_dir_and_whole_batch_queue() {
        // 2 nodes x 4 GPUs x 64 = global batch 512; 3840 % 512 = 256 -> queue 3584; local 3584 / 8 = 448.
        let c = inferred(&[
            ("DISTRIBUTED.NUM_NODES", "2"),
            ("DISTRIBUTED.NUM_PROC_PER_NODE", "4"),
            ("DISTRIBUTED.RUN_ID", "run-7"),
            ("CHECKPOINT.APPEND_DISTR_RUN_ID", "true"),
            ("DATA.TRAIN.BATCHSIZE_PER_REPLICA", "64"),
            ("DATA.TRAIN.COLLATE_FUNCTION", "multicrop_collator"),
            ("DATA.TRAIN.TRANSFORMS", MULTICROP),
            ("MODEL.HEAD.PARAMS", SWAV_HEAD),
            ("LOSS.name", "swav_loss"),
            ("LOSS.swav_loss.queue.queue_length", "3840"),
        ]);
        let loss = "LOSS.swav_loss";
        assert_eq!(at(&c, &format!("{loss}.num_prototypes")), &yaml("[3000]"));
        assert_eq!(at(&c, &format!("{loss}.embedding_dim")), &yaml("128"));
        assert_eq!(at(&c, &format!("{loss}.num_crops")), &yaml("8"));
        assert_eq!(at(&c, &format!("{loss}.output_dir")), &yaml("/ckpt/run-7"));
        assert_eq!(at(&c, &format!("{loss}.queue.queue_length")), &yaml("3584"));
        assert_eq!(
            at(&c, &format!("{loss}.queue.local_queue_length")),
            &yaml("448")
        );
    }

    #[test]
    fn swav_rejects_wrong_head_and_collator() {
        let mut wrong_head = config(&[
            ("LOSS.name", "swav_loss"),
            ("DATA.TRAIN.COLLATE_FUNCTION", "multicrop_collator"),
        ]);
        assert_eq!(
            invalid_path(infer(&mut wrong_head, None)),
            "MODEL.HEAD.PARAMS"
        );
        let mut wrong_collator =
            config(&[("LOSS.name", "swav_loss"), ("MODEL.HEAD.PARAMS", SWAV_HEAD)]);
        assert_eq!(
            invalid_path(infer(&mut wrong_collator, None)),
            "DATA.TRAIN.COLLATE_FUNCTION"
        );
    }

    #[test]
    fn swav_momentum_dino_deepcluster_and_replicated_crops() {
        // ImgReplicatePil without num_times makes 2 copies; with num_times 3, three.
        let c = inferred(&[
            ("LOSS.name", "swav_momentum_loss"),
            ("MODEL.HEAD.PARAMS", SWAV_HEAD),
            (
                "DATA.TRAIN.TRANSFORMS",
                "[{name: ImgReplicatePil, num_times: 3}]",
            ),
            (
                "LOSS.swav_momentum_loss.queue",
                "{queue_length: 1000, start_iter: 0, local_queue_length: 0}",
            ),
        ]);
        // Global batch 256: 1000 - 1000 % 256 = 768; local 768 / 8 = 96.
        assert_eq!(at(&c, "LOSS.swav_momentum_loss.num_crops"), &yaml("3"));
        assert_eq!(
            at(&c, "LOSS.swav_momentum_loss.queue.queue_length"),
            &yaml("768")
        );
        assert_eq!(
            at(&c, "LOSS.swav_momentum_loss.queue.local_queue_length"),
            &yaml("96")
        );
        assert_eq!(
            at(&c, "DATA.TRAIN.COLLATE_FUNCTION"),
            &yaml("multicrop_collator")
        );

        let c = inferred(&[
            ("LOSS.name", "dino_loss"),
            (
                "MODEL.HEAD.PARAMS",
                r#"[["swav_head", {dims: [384, 256], num_clusters: [65536]}]]"#,
            ),
            ("DATA.TRAIN.TRANSFORMS", "[{name: ImgReplicatePil}]"),
        ]);
        assert_eq!(at(&c, "LOSS.dino_loss.output_dim"), &yaml("65536"));
        assert_eq!(at(&c, "LOSS.dino_loss.num_crops"), &yaml("2"));

        let c = inferred(&[
            ("LOSS.name", "deepclusterv2_loss"),
            ("MODEL.HEAD.PARAMS", SWAV_HEAD),
            ("DATA.TRAIN.TRANSFORMS", MULTICROP),
        ]);
        assert_eq!(at(&c, "LOSS.deepclusterv2_loss.DROP_LAST"), &yaml("true"));
        assert_eq!(
            at(&c, "LOSS.deepclusterv2_loss.BATCHSIZE_PER_REPLICA"),
            &yaml("32")
        );
        assert_eq!(at(&c, "LOSS.deepclusterv2_loss.num_crops"), &yaml("8"));
        assert_eq!(
            at(&c, "LOSS.deepclusterv2_loss.memory_params.embedding_dim"),
            &yaml("128")
        );

        let c = inferred(&[("LOSS.name", "bce_logits_multiple_output_single_target")]);
        assert_eq!(
            at(
                &c,
                "LOSS.bce_logits_multiple_output_single_target.world_size"
            ),
            &yaml("8")
        );
    }

    #[test]
    fn meter_names_come_from_evaluated_layers_of_a_feature_extractor() {
        let overrides = [
            ("METERS.name", "accuracy_list_meter"),
            ("MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON", "true"),
            ("MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY", "true"),
            (
                "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP",
                r#"[["res4", ["AvgPool2d", [[8, 8], 3, 0]]], ["res5", ["AvgPool2d", [[6, 6], 1, 0]]]]"#,
            ),
        ];
        let c = inferred(&overrides);
        assert_eq!(at(&c, "METERS.names"), &yaml("[accuracy_list_meter]"));
        assert_eq!(at(&c, "METERS.accuracy_list_meter.num_meters"), &yaml("2"));
        assert_eq!(
            at(&c, "METERS.accuracy_list_meter.meter_names"),
            &yaml("[res4, res5]")
        );
        // Not frozen: not a feature extractor, so the meter keeps its single output.
        let c = inferred(&[overrides[0], overrides[1], overrides[3]]);
        assert_eq!(at(&c, "METERS.accuracy_list_meter.num_meters"), &yaml("1"));
    }

    #[test]
    fn label_type_is_sample_index_without_sources_unless_zero() {
        let c = inferred(&[]);
        assert_eq!(at(&c, "DATA.TRAIN.LABEL_TYPE"), &yaml("sample_index"));
        assert_eq!(at(&c, "DATA.TEST.LABEL_TYPE"), &yaml("standard"));
        let c = inferred(&[("DATA.TRAIN.LABEL_TYPE", "zero")]);
        assert_eq!(at(&c, "DATA.TRAIN.LABEL_TYPE"), &yaml("zero"));
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = config(&[]);
        c["DATA"]["TRAIN"]
            .as_mapping_mut()
            .unwrap()
            .remove("BATCHSIZE_PER_REPLICA");
        assert_eq!(
            invalid_path(infer(&mut c, None)),
            "DATA.TRAIN.BATCHSIZE_PER_REPLICA"
        );
        let mut c = config(&[("DISTRIBUTED.NUM_NODES", "two")]);
        assert_eq!(invalid_path(infer(&mut c, None)), "DISTRIBUTED.NUM_NODES");
        let mut c = config(&[("OPTIMIZER.param_schedulers.lr.name", "polynomial")]);
        assert_eq!(
            invalid_path(infer(&mut c, None)),
            "OPTIMIZER.param_schedulers.lr.name"
        );
        let mut c = config(&[("OPTIMIZER.param_schedulers.lr.start_value", "0.0")]);
        assert_eq!(
            invalid_path(infer(&mut c, None)),
            "OPTIMIZER.param_schedulers.lr.start_value"
        );
        let mut c = config(&[(
            "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scaling_type",
            "cubic",
        )]);
        assert_eq!(
            invalid_path(infer(&mut c, None)),
            "OPTIMIZER.param_schedulers.lr.auto_lr_scaling"
        );
    }

    #[test]
    fn python_rounding_matches() {
        // Python: round(0.001953125, 8) == 0.00195312 (an exact tie, rounded to even);
        // round(0.1 * 0.1, 8) == 0.01.
        assert_eq!(round_decimals(0.001953125, 8), 0.00195312);
        assert_eq!(round_decimals(0.1 * 0.1, 8), 0.01);
    }
}
