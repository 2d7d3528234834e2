//! VISSL's parameter groups. The `default` constructor: trunk / head x regularized /
//! unregularized, plus the parameters of other layer types ("remaining"). The `dino` constructor:
//! regularized or not, by name (biases and anything named `norm` get no weight decay).
//!
//! VISSL sorts parameters by module type (Linear/Conv, BatchNorm/LayerNorm, other). We see only
//! names and shapes, so the type is read from them: a multi-dimensional `weight` belongs to a
//! Linear/Conv layer, a 1-D `weight` to a normalisation layer, and a `bias` to whichever kind its
//! sibling `weight` is. Anything else (class tokens, raw prototype matrices) is "remaining".

use std::collections::HashMap;

use tch::Tensor;

use super::OptimizerParams;

/// A trainable parameter with its model path and whether it belongs to the head.
#[derive(Debug)]
pub struct NamedParam {
    /// The parameter's path in the model (`trunk.layer1.0.conv1.weight`).
    pub name: String,
    /// The parameter itself; updated in place.
    pub tensor: Tensor,
    /// Head parameters may use their own learning rate and weight decay.
    pub is_head: bool,
}

impl NamedParam {
    /// A parameter whose head membership follows VISSL's rule: its path contains `head`.
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Self {
        let name = name.into();
        let is_head = name.contains("head");
        Self {
            name,
            tensor,
            is_head,
        }
    }

    /// The trainable variables of a model, sorted by name so the order is stable across runs.
    pub fn trainable(vars: impl IntoIterator<Item = (String, Tensor)>) -> Vec<Self> {
        let mut params: Vec<Self> = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| Self::new(name, t))
            .collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        params
    }
}

/// What kind of layer parameter a tensor is, read from its name and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamRole {
    /// Weight of a Linear or Conv layer (including weight-norm `weight_g` / `weight_v`).
    Weight,
    /// Bias of a Linear or Conv layer.
    Bias,
    /// Scale of a BatchNorm / LayerNorm layer.
    NormWeight,
    /// Shift of a BatchNorm / LayerNorm layer.
    NormBias,
    /// Any other parameter.
    Other,
}

/// The role of parameter `name` with `shape`; `weight_dim(prefix)` gives the dimension of the
/// sibling `<prefix>.weight`, if there is one.
pub fn param_role(
    name: &str,
    shape: &[i64],
    weight_dim: impl Fn(&str) -> Option<usize>,
) -> ParamRole {
    let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    match (leaf, shape.len()) {
        ("weight" | "weight_g" | "weight_v", d) if d >= 2 => ParamRole::Weight,
        ("weight", 1) => ParamRole::NormWeight,
        ("bias", 1) if weight_dim(prefix) == Some(1) => ParamRole::NormBias,
        ("bias", 1) => ParamRole::Bias,
        _ => ParamRole::Other,
    }
}

/// The values `OPTIMIZER.param_group_constructor` accepts.
pub const CONSTRUCTORS: &[&str] = &["default", "dino"];

/// The groups of VISSL's constructors (six for `default`, two for `dino`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKind {
    /// Trunk Linear/Conv weights (and biases, norm parameters when regularized): lr, weight_decay.
    TrunkRegularized,
    /// Trunk parameters without weight decay (by default BN/LN parameters): lr, no decay.
    TrunkUnregularized,
    /// Head parameters with decay: lr_head, the head's weight decay.
    HeadRegularized,
    /// Head parameters without decay: lr_head, no decay.
    HeadUnregularized,
    /// Parameters of other layer types (trunk or head), trunk LR and weight decay.
    RemainingRegularized,
    /// Parameters named in `non_regularized_parameters` that were regularized otherwise.
    RemainingUnregularized,
    /// `construct_single_param_group_only`: everything, trunk LR and weight decay.
    All,
    /// `dino`: every parameter but biases and norms, trunk LR and weight decay.
    Regularized,
    /// `dino`: biases and parameters named `norm`, trunk LR, no decay.
    Unregularized,
}

impl GroupKind {
    /// Whether the group follows the head learning rate.
    pub fn uses_head_lr(self) -> bool {
        matches!(
            self,
            GroupKind::HeadRegularized | GroupKind::HeadUnregularized
        )
    }
}

/// One parameter group: the indices of its parameters and their weight decay.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// Which of VISSL's groups this is.
    pub kind: GroupKind,
    /// Weight decay of every parameter in the group.
    pub weight_decay: f64,
    /// Indices into the optimizer's parameter list.
    pub params: Vec<usize>,
}

/// Sorts `params` into VISSL's default groups; empty groups are left out.
pub fn build_param_groups(params: &[NamedParam], cfg: &OptimizerParams) -> Vec<ParamGroup> {
    let kinds: Vec<GroupKind> = if cfg.construct_single_param_group_only {
        vec![GroupKind::All; params.len()]
    } else if cfg.param_group_constructor == "dino" {
        params.iter().map(|p| dino_group_of(&p.name)).collect()
    } else {
        let weight_dims: HashMap<&str, usize> = params
            .iter()
            .filter_map(|p| {
                p.name
                    .strip_suffix(".weight")
                    .map(|prefix| (prefix, p.tensor.dim()))
            })
            .collect();
        params
            .iter()
            .map(|p| {
                let role = param_role(&p.name, &p.tensor.size(), |prefix| {
                    weight_dims.get(prefix).copied()
                });
                let kind = group_of(role, p.is_head, cfg);
                let unregularize = cfg
                    .non_regularized_parameters
                    .iter()
                    .any(|s| p.name.contains(s.as_str()));
                match kind {
                    GroupKind::TrunkRegularized
                    | GroupKind::HeadRegularized
                    | GroupKind::RemainingRegularized
                        if unregularize =>
                    {
                        GroupKind::RemainingUnregularized
                    }
                    kind => kind,
                }
            })
            .collect()
    };

    let mut groups: Vec<ParamGroup> = Vec::new();
    for (index, kind) in kinds.into_iter().enumerate() {
        match groups.iter_mut().find(|g| g.kind == kind) {
            Some(group) => group.params.push(index),
            None => groups.push(ParamGroup {
                kind,
                weight_decay: weight_decay_of(kind, cfg),
                params: vec![index],
            }),
        }
    }
    groups.sort_by_key(|g| g.kind);
    groups
}

/// VISSL's group of a parameter before `non_regularized_parameters` is applied.
fn group_of(role: ParamRole, is_head: bool, cfg: &OptimizerParams) -> GroupKind {
    let regularized = match role {
        ParamRole::Weight => true,
        ParamRole::Bias => cfg.regularize_bias,
        ParamRole::NormWeight => cfg.regularize_bn,
        ParamRole::NormBias => cfg.regularize_bn && cfg.regularize_bias,
        ParamRole::Other => return GroupKind::RemainingRegularized,
    };
    match (is_head, regularized) {
        (false, true) => GroupKind::TrunkRegularized,
        (false, false) => GroupKind::TrunkUnregularized,
        (true, true) => GroupKind::HeadRegularized,
        (true, false) => GroupKind::HeadUnregularized,
    }
}

/// The `dino` constructor's group of a parameter: by its name alone, ignoring `regularize_bn`,
/// `regularize_bias`, `non_regularized_parameters` and the head settings, as VISSL does.
fn dino_group_of(name: &str) -> GroupKind {
    if name.ends_with(".bias") || name.contains("norm") {
        GroupKind::Unregularized
    } else {
        GroupKind::Regularized
    }
}

fn weight_decay_of(kind: GroupKind, cfg: &OptimizerParams) -> f64 {
    match kind {
        GroupKind::TrunkRegularized
        | GroupKind::RemainingRegularized
        | GroupKind::All
        | GroupKind::Regularized => cfg.weight_decay,
        GroupKind::HeadRegularized => cfg.head_weight_decay(),
        GroupKind::TrunkUnregularized
        | GroupKind::HeadUnregularized
        | GroupKind::RemainingUnregularized
        | GroupKind::Unregularized => 0.0,
    }
}
