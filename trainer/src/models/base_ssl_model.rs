//! [`BaseSslModel`]: VISSL's `BaseSSLMultiInputOutputModel`, a trunk plus heads.
//!
//! Which heads see which trunk features follows VISSL: with as many features as heads, head `i`
//! gets feature `i` (linear evaluation on several layers); with one feature and several heads the
//! heads run one after another. A frozen part runs without gradient and with batch norm in
//! evaluation mode. With `EVAL_MODE_ON` and `EXTRACT_TRUNK_FEATURES_ONLY`, or with no heads at all,
//! forward returns the trunk features.

use super::feature_eval::{FeatureEvalSettings, PoolOp};
use super::heads::{BuiltHead, HeadParams, HeadSettings};
use super::multi_input::InputHeadMapping;
use super::trunks::{build_trunk, FeatureShape, InputType, Trunk, TrunkParams};
use super::weights_init::{self, LoadOptions, LoadReport, WeightsInit};
use super::yaml::Block;
use super::{shape_str, ModelError, Result};
use serde_yaml::Value;
use std::path::Path;
use tch::{nn, Tensor};

/// The model-building part of VISSL's `MODEL` block; `Default` is VISSL's default model
/// (ResNet-50, no heads).
#[derive(Debug, Clone, Default)]
pub struct ModelParams {
    /// `TRUNK` and `INPUT_TYPE`.
    pub trunk: TrunkParams,
    /// `HEAD.PARAMS`.
    pub heads: Vec<HeadParams>,
    /// `HEAD.BATCHNORM_EPS`, `HEAD.BATCHNORM_MOMENTUM`, `HEAD.PARAMS_MULTIPLIER`.
    pub head_settings: HeadSettings,
    /// `MULTI_INPUT_HEAD_MAPPING`.
    pub multi_input_head_mapping: Vec<InputHeadMapping>,
    /// `FEATURE_EVAL_SETTINGS`.
    pub feature_eval: FeatureEvalSettings,
    /// `SINGLE_PASS_EVERY_CROP`: run the trunk once per crop instead of once per resolution.
    pub single_pass_every_crop: bool,
    /// `WEIGHTS_INIT`.
    pub weights_init: WeightsInit,
}

/// Keys of VISSL's `MODEL` block that belong to other parts of the trainer (AMP, FSDP, SyncBN,
/// gradient clipping, ...). They are accepted here and read by their owners.
const MODEL_KEYS_READ_ELSEWHERE: &[&str] = &[
    "BASE_MODEL_NAME",
    "CUDA_CACHE",
    "NON_TRAINABLE_PARAMS",
    "TEMP_FROZEN_PARAMS_ITER_MAP",
    "ACTIVATION_CHECKPOINTING",
    "SHARDED_DDP_SETUP",
    "FSDP_CONFIG",
    "GRAD_CLIP",
    "SYNC_BN_CONFIG",
    "AMP_PARAMS",
    "MODEL_COMPLEXITY",
    "_MODEL_INIT_SEED",
];

const MODEL_KEYS: &[&str] = &[
    "TRUNK",
    "HEAD",
    "INPUT_TYPE",
    "MULTI_INPUT_HEAD_MAPPING",
    "SINGLE_PASS_EVERY_CROP",
    "FEATURE_EVAL_SETTINGS",
    "WEIGHTS_INIT",
];

impl ModelParams {
    /// Reads VISSL's `MODEL` block (missing keys keep VISSL's defaults).
    pub fn from_yaml(model: &Value) -> Result<Self> {
        let block = Block::new("MODEL", model)?;
        let known: Vec<&str> = MODEL_KEYS
            .iter()
            .chain(MODEL_KEYS_READ_ELSEWHERE)
            .copied()
            .collect();
        block.check_keys(&known)?;
        let input_type = InputType::parse(
            &block.key_path("INPUT_TYPE"),
            &block.string("INPUT_TYPE", "rgb")?,
        )?;
        let null = Value::Null;
        let trunk = TrunkParams::from_yaml(
            "MODEL.TRUNK",
            block.get("TRUNK").unwrap_or(&null),
            input_type,
        )?;
        let head = block.get("HEAD").unwrap_or(&null);
        let head_settings = HeadSettings::from_yaml(head)?;
        let heads = HeadParams::list_from_yaml(
            Block::new("MODEL.HEAD", head)?
                .get("PARAMS")
                .unwrap_or(&null),
        )?;
        let multi_input_head_mapping = InputHeadMapping::list_from_yaml(
            block.get("MULTI_INPUT_HEAD_MAPPING").unwrap_or(&null),
            heads.len(),
        )?;
        Ok(ModelParams {
            trunk,
            heads,
            head_settings,
            multi_input_head_mapping,
            feature_eval: FeatureEvalSettings::from_yaml(
                block.get("FEATURE_EVAL_SETTINGS").unwrap_or(&null),
            )?,
            single_pass_every_crop: block.bool("SINGLE_PASS_EVERY_CROP", false)?,
            weights_init: WeightsInit::from_yaml(block.get("WEIGHTS_INIT").unwrap_or(&null))?,
        })
    }
}

/// One variable of the model with its full name.
#[derive(Debug)]
pub struct NamedVar {
    /// `trunk.layer1.0.conv1.weight`, `heads.0.clf.0.bias`, ...
    pub name: String,
    /// The variable itself (shares storage with the var store).
    pub tensor: Tensor,
    /// A trained parameter (false for batch-norm running statistics).
    pub is_param: bool,
}

/// How heads consume features (VISSL's `heads_forward` rule).
enum Pairing {
    OnePerFeature,
    Chain,
}

fn pairing(n_feats: usize, n_heads: usize, what: &str) -> Result<Pairing> {
    if n_feats == n_heads {
        Ok(Pairing::OnePerFeature)
    } else if n_feats == 1 && n_heads > 1 {
        Ok(Pairing::Chain)
    } else {
        Err(ModelError::invalid(
            "MODEL.HEAD.PARAMS",
            format!(
                "{n_heads} head(s) for {n_feats} trunk feature(s) of {what}: give one head per feature, \
                 or one feature for heads applied in sequence"
            ),
        ))
    }
}

/// VISSL's self-supervised model: trunk + heads, with freezing and feature extraction.
#[derive(Debug)]
pub struct BaseSslModel {
    params: ModelParams,
    trunk: Box<dyn Trunk>,
    heads: Vec<BuiltHead>,
    /// Trunk features read by the single-input forward (empty: the trunk's last feature).
    output_features: Vec<String>,
    /// Pooling per output feature when the model is a feature extractor, else empty.
    pool_ops: Vec<PoolOp>,
    trunk_vars: Vec<NamedVar>,
    head_vars: Vec<NamedVar>,
    trunk_frozen: bool,
    heads_frozen: bool,
}

impl BaseSslModel {
    /// Builds the model into `vs`, which must be empty so that parameter names are exactly
    /// `trunk.*` and `heads.*`. Heads are checked against the trunk's feature shapes here, so a
    /// head whose input size does not match fails before any data is read. Freezing follows
    /// `FEATURE_EVAL_SETTINGS`.
    pub fn new(vs: &nn::VarStore, params: &ModelParams) -> Result<Self> {
        if !vs.is_empty() {
            return Err(ModelError::invalid(
                "model var store",
                format!(
                    "must be empty to keep torchvision/VISSL names, it holds {} variables",
                    vs.len()
                ),
            ));
        }
        for (i, mapping) in params.multi_input_head_mapping.iter().enumerate() {
            if mapping.head_index >= params.heads.len() {
                return Err(ModelError::invalid(
                    format!("MODEL.MULTI_INPUT_HEAD_MAPPING[{i}]"),
                    format!(
                        "head index {} but HEAD.PARAMS has {} heads",
                        mapping.head_index,
                        params.heads.len()
                    ),
                ));
            }
        }
        let root = vs.root();
        let trunk = build_trunk(&root / "trunk", &params.trunk)?;
        let fe = &params.feature_eval;
        let (output_features, pool_ops) = if fe.is_feature_extractor() {
            fe.linear_eval_feat_pool_ops_map
                .iter()
                .map(|(name, op)| (name.clone(), *op))
                .unzip()
        } else {
            (Vec::new(), Vec::new())
        };
        for name in output_features.iter().chain(
            params
                .multi_input_head_mapping
                .iter()
                .flat_map(|m| &m.feat_names),
        ) {
            trunk.feature_shape(name)?;
        }
        let heads_path = &root / "heads";
        let heads = params
            .heads
            .iter()
            .enumerate()
            .map(|(i, head)| {
                head.build(
                    &(&heads_path / i),
                    &format!("heads.{i}"),
                    &params.head_settings,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut trunk_vars = Vec::new();
        let mut head_vars = Vec::new();
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in variables {
            let var = NamedVar {
                is_param: tensor.requires_grad(),
                name,
                tensor,
            };
            if var.name.starts_with("heads.") {
                head_vars.push(var);
            } else {
                trunk_vars.push(var);
            }
        }
        let mut model = BaseSslModel {
            params: params.clone(),
            trunk,
            heads,
            output_features,
            pool_ops,
            trunk_vars,
            head_vars,
            trunk_frozen: false,
            heads_frozen: false,
        };
        model.check_head_shapes()?;
        if fe.heads_frozen() {
            model.freeze_head_and_trunk();
        } else if fe.trunk_frozen() {
            model.freeze_trunk();
        }
        Ok(model)
    }

    /// The parameters the model was built from.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// The trunk.
    pub fn trunk(&self) -> &dyn Trunk {
        self.trunk.as_ref()
    }

    /// VISSL's head names (`mlp`, `mlp->mlp`), one per head.
    pub fn head_names(&self) -> Vec<String> {
        self.heads.iter().map(|h| h.name.clone()).collect()
    }

    /// The trunk's variables (sorted by name).
    pub fn trunk_variables(&self) -> &[NamedVar] {
        &self.trunk_vars
    }

    /// The heads' variables (sorted by name).
    pub fn head_variables(&self) -> &[NamedVar] {
        &self.head_vars
    }

    /// All variables, trunk first, as (name, tensor) pairs.
    pub fn named_variables(&self) -> Vec<(String, Tensor)> {
        self.trunk_vars
            .iter()
            .chain(&self.head_vars)
            .map(|v| (v.name.clone(), v.tensor.shallow_clone()))
            .collect()
    }

    /// The parameters that currently require gradients (what an optimizer should update).
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.trunk_vars
            .iter()
            .chain(&self.head_vars)
            .filter(|v| v.is_param && v.tensor.requires_grad())
            .map(|v| (v.name.clone(), v.tensor.shallow_clone()))
            .collect()
    }

    /// Stops gradients through the trunk and runs it in evaluation mode.
    pub fn freeze_trunk(&mut self) {
        set_trainable(&self.trunk_vars, false);
        self.trunk_frozen = true;
    }

    /// Stops gradients through the heads and runs them in evaluation mode.
    pub fn freeze_heads(&mut self) {
        set_trainable(&self.head_vars, false);
        self.heads_frozen = true;
    }

    /// Freezes the whole model.
    pub fn freeze_head_and_trunk(&mut self) {
        self.freeze_trunk();
        self.freeze_heads();
    }

    /// Whether the trunk is frozen.
    pub fn is_trunk_frozen(&self) -> bool {
        self.trunk_frozen
    }

    /// Whether no parameter is trainable.
    pub fn is_fully_frozen(&self) -> bool {
        self.trainable_parameters().is_empty()
    }

    /// The single-input forward: trunk features (pooled when the model is a feature extractor),
    /// then the heads. One output per head (or per feature when heads are not run).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        if !self.params.multi_input_head_mapping.is_empty() {
            return Err(ModelError::invalid(
                "MODEL.MULTI_INPUT_HEAD_MAPPING",
                "is set, so inputs must be given by key (forward_multi_input)",
            ));
        }
        let names: Vec<&str> = self.output_features.iter().map(String::as_str).collect();
        let heads: Vec<&BuiltHead> = self.heads.iter().collect();
        self.single_input_forward(xs, &names, &heads, train)
    }

    /// The multi-resolution forward (multi-crop): consecutive crops of the same width go through
    /// the trunk together (each crop alone with `SINGLE_PASS_EVERY_CROP`), the features are
    /// concatenated in crop order and the heads run once on them.
    pub fn forward_multi_res(&self, crops: &[Tensor], train: bool) -> Result<Vec<Tensor>> {
        if crops.is_empty() {
            return Err(ModelError::invalid("model input", "no crops given"));
        }
        let names: Vec<&str> = self.output_features.iter().map(String::as_str).collect();
        let mut groups: Vec<Vec<&Tensor>> = Vec::new();
        for crop in crops {
            let width = crop.size().last().copied();
            match groups.last_mut() {
                Some(group)
                    if !self.params.single_pass_every_crop
                        && group[0].size().last().copied() == width =>
                {
                    group.push(crop)
                }
                _ => groups.push(vec![crop]),
            }
        }
        let mut feats = Vec::with_capacity(groups.len());
        for group in groups {
            let batch = Tensor::f_cat(&group, 0).map_err(|_| {
                let shapes: Vec<String> = group.iter().map(|t| shape_str(&t.size())).collect();
                ModelError::shape(
                    "model input",
                    "crops of one resolution with equal shapes",
                    shapes.join(" "),
                )
            })?;
            let mut out = self.trunk_forward(&batch, &names, train)?;
            if out.len() != 1 {
                return Err(ModelError::invalid(
                    "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP",
                    format!(
                        "multi-resolution input needs exactly one trunk feature, {} requested",
                        out.len()
                    ),
                ));
            }
            feats.push(out.remove(0));
        }
        let feat = Tensor::f_cat(&feats, 0).map_err(|_| {
            let shapes: Vec<String> = feats.iter().map(|t| shape_str(&t.size())).collect();
            ModelError::shape(
                "trunk output",
                "features of equal size across resolutions",
                shapes.join(" "),
            )
        })?;
        let heads: Vec<&BuiltHead> = self.heads.iter().collect();
        self.heads_after_trunk(vec![feat], &heads, train)
    }

    /// The multi-input forward (`MULTI_INPUT_HEAD_MAPPING`): for every mapped input present in
    /// `inputs`, in mapping order, the trunk features it names go through its head. Input keys
    /// that are not mapped are ignored, as VISSL ignores other batch entries.
    pub fn forward_multi_input(
        &self,
        inputs: &[(&str, &Tensor)],
        train: bool,
    ) -> Result<Vec<Vec<Tensor>>> {
        if self.params.multi_input_head_mapping.is_empty() {
            return Err(ModelError::invalid(
                "MODEL.MULTI_INPUT_HEAD_MAPPING",
                "is empty; use forward_t",
            ));
        }
        let mut outputs = Vec::new();
        for mapping in &self.params.multi_input_head_mapping {
            if let Some((_, xs)) = inputs.iter().find(|(key, _)| *key == mapping.input_key) {
                let names: Vec<&str> = mapping.feat_names.iter().map(String::as_str).collect();
                outputs.push(self.single_input_forward(
                    xs,
                    &names,
                    &[&self.heads[mapping.head_index]],
                    train,
                )?);
            }
        }
        Ok(outputs)
    }

    /// Raw trunk features by VISSL name (no pooling), honouring the trunk's frozen state.
    pub fn trunk_features(&self, xs: &Tensor, names: &[&str], train: bool) -> Result<Vec<Tensor>> {
        let run = || {
            self.trunk
                .forward_features(xs, names, train && !self.trunk_frozen)
        };
        if self.trunk_frozen {
            tch::no_grad(run)
        } else {
            run()
        }
    }

    /// VISSL's names for what [`BaseSslModel::extract_features`] returns: the pooled features'
    /// names (a repeated name gets `_1`, `_2`, ...), or `heads` when no pooling map is set.
    pub fn output_feature_names(&self, n_outputs: usize) -> Vec<String> {
        let base: Vec<String> = if self.pool_ops.is_empty() {
            vec!["heads".to_string(); n_outputs]
        } else {
            self.output_features.clone()
        };
        let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        base.iter()
            .map(|name| {
                let seen = counts.entry(name.as_str()).or_insert(0);
                let unique = if *seen == 0 {
                    name.clone()
                } else {
                    format!("{name}_{seen}")
                };
                *seen += 1;
                unique
            })
            .collect()
    }

    /// Feature extraction: an evaluation-mode forward without gradient, outputs paired with
    /// [`BaseSslModel::output_feature_names`].
    pub fn extract_features(&self, xs: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let outputs = tch::no_grad(|| self.forward_t(xs, false))?;
        Ok(self
            .output_feature_names(outputs.len())
            .into_iter()
            .zip(outputs)
            .collect())
    }

    /// Loads `MODEL.WEIGHTS_INIT` (from [`BaseSslModel::params`] unless `init` is given) with VISSL's
    /// rules: heads only when fine-tuning or with `EVAL_TRUNK_AND_HEAD`, head shape mismatches
    /// tolerated without `ASSERT_HEAD_LAYER_SHAPE_INIT`.
    pub fn init_from_weights(
        &self,
        init: Option<&WeightsInit>,
        strict: bool,
    ) -> Result<LoadReport> {
        let init = init.unwrap_or(&self.params.weights_init);
        let fe = &self.params.feature_eval;
        let opts = LoadOptions {
            init_heads: fe.should_init_head_weights(),
            assert_head_shapes: fe.assert_head_layer_shape_init,
            strict,
        };
        weights_init::init_from_file(&self.named_variables(), init, &opts)
    }

    /// Writes every variable (trunk and heads, with batch-norm statistics) to a `.safetensors` file.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        weights_init::save_named_safetensors(&self.named_variables(), path)
    }

    fn single_input_forward(
        &self,
        xs: &Tensor,
        names: &[&str],
        heads: &[&BuiltHead],
        train: bool,
    ) -> Result<Vec<Tensor>> {
        let feats = self.trunk_forward(xs, names, train)?;
        self.heads_after_trunk(feats, heads, train)
    }

    fn heads_after_trunk(
        &self,
        feats: Vec<Tensor>,
        heads: &[&BuiltHead],
        train: bool,
    ) -> Result<Vec<Tensor>> {
        if self.params.feature_eval.trunk_features_only() || heads.is_empty() {
            return Ok(feats);
        }
        let train = train && !self.heads_frozen;
        let run = || -> Result<Vec<Tensor>> {
            match pairing(feats.len(), heads.len(), "this input")? {
                // A head with several outputs (SwAV's) contributes all of them, in order.
                Pairing::OnePerFeature => Ok(feats
                    .iter()
                    .zip(heads)
                    .map(|(f, h)| h.forward_outputs_t(f, train))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect()),
                Pairing::Chain => {
                    let (last, first) = heads.split_last().ok_or_else(|| {
                        ModelError::invalid("MODEL.HEAD.PARAMS", "no head to chain")
                    })?;
                    let hidden = first
                        .iter()
                        .try_fold(feats[0].shallow_clone(), |out, h| h.forward_t(&out, train))?;
                    last.forward_outputs_t(&hidden, train)
                }
            }
        };
        if self.heads_frozen {
            tch::no_grad(run)
        } else {
            run()
        }
    }

    /// Trunk features, then the feature extractor's pooling and flattening.
    fn trunk_forward(&self, xs: &Tensor, names: &[&str], train: bool) -> Result<Vec<Tensor>> {
        let feats = self.trunk_features(xs, names, train)?;
        if self.pool_ops.is_empty() {
            return Ok(feats);
        }
        if feats.len() != self.pool_ops.len() {
            return Err(ModelError::invalid(
                "MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP",
                format!(
                    "{} pooling ops for {} requested trunk features",
                    self.pool_ops.len(),
                    feats.len()
                ),
            ));
        }
        let flatten = self.params.feature_eval.should_flatten_feats;
        feats
            .iter()
            .zip(self.pool_ops.iter().zip(names))
            .map(|(feat, (op, name))| {
                let pooled = op.apply(feat, name)?;
                Ok(if flatten {
                    pooled.flatten(1, -1)
                } else {
                    pooled
                })
            })
            .collect()
    }

    /// The statically known shape of each trunk output for `names` (after pooling/flattening).
    fn trunk_output_shapes(&self, names: &[String]) -> Result<Vec<FeatureShape>> {
        let default =
            [self.trunk.feature_names()[self.trunk.feature_names().len() - 1].to_string()];
        let names = if names.is_empty() {
            &default[..]
        } else {
            names
        };
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let shape = self.trunk.feature_shape(name)?;
                Ok(match self.pool_ops.get(i) {
                    Some(op) => {
                        let pooled = op.output_shape(shape);
                        match (self.params.feature_eval.should_flatten_feats, pooled) {
                            (true, FeatureShape::Map { .. }) => FeatureShape::Flat,
                            (_, other) => other,
                        }
                    }
                    None => shape,
                })
            })
            .collect()
    }

    /// Checks every head's input size against the trunk features it will receive.
    fn check_head_shapes(&self) -> Result<()> {
        if self.params.feature_eval.trunk_features_only() || self.heads.is_empty() {
            return Ok(());
        }
        let plans: Vec<(Vec<FeatureShape>, Vec<usize>, String)> =
            if self.params.multi_input_head_mapping.is_empty() {
                vec![(
                    self.trunk_output_shapes(&self.output_features)?,
                    (0..self.heads.len()).collect(),
                    "the input".into(),
                )]
            } else {
                self.params
                    .multi_input_head_mapping
                    .iter()
                    .map(|m| {
                        let shapes = self.trunk_output_shapes(&m.feat_names)?;
                        Ok((
                            shapes,
                            vec![m.head_index],
                            format!("input `{}`", m.input_key),
                        ))
                    })
                    .collect::<Result<_>>()?
            };
        for (shapes, head_indices, what) in plans {
            let layer = |i: usize| format!("heads.{i}");
            match pairing(shapes.len(), head_indices.len(), &what)? {
                Pairing::OnePerFeature => {
                    for (shape, &i) in shapes.iter().zip(&head_indices) {
                        self.params.heads[i].output_shape(&layer(i), *shape)?;
                    }
                }
                Pairing::Chain => {
                    head_indices.iter().try_fold(shapes[0], |shape, &i| {
                        self.params.heads[i].output_shape(&layer(i), shape)
                    })?;
                }
            }
        }
        Ok(())
    }
}

fn set_trainable(vars: &[NamedVar], trainable: bool) {
    for var in vars.iter().filter(|v| v.is_param) {
        let _ = var.tensor.set_requires_grad(trainable);
    }
}
