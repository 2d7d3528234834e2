//! Optimizers, keyed by VISSL's `OPTIMIZER.name`: the update rules (`sgd`, `adamw`, `lars`),
//! LARC, VISSL's parameter groups, and the two `MODEL` options that act between the backward pass
//! and the update: gradient clipping and temporarily frozen parameters.
//!
//! The optimizer keeps its own state as named tensors (`<param>.momentum_buffer`,
//! `<param>.exp_avg`, `<param>.step`, ...), so a checkpoint restores it exactly. Learning rates
//! come from the schedules, evaluated by the caller and passed to every [`Optimizer::step`].

pub mod adamw;
pub mod buffers;
pub mod clip;
pub mod frozen;
pub mod larc;
pub mod lars;
pub mod param_groups;
pub mod params;
pub mod sgd;

use std::collections::HashMap;

use tch::{Kind, Tensor};
use vissl_crds::config::model::TempFrozenParam;

pub use adamw::AdamW;
pub use clip::GradClip;
pub use lars::Lars;
pub use param_groups::{build_param_groups, GroupKind, NamedParam, ParamGroup, ParamRole};
pub use params::{HeadOptimizerParams, LarcConfig, OptimizerParams};
pub use sgd::Sgd;

/// Errors of building an optimizer, stepping it or restoring its state.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// `OPTIMIZER.name` is not a registered optimizer.
    #[error("OPTIMIZER.name: unknown optimizer `{name}`; known optimizers: {}", known.join(", "))]
    UnknownOptimizer {
        name: String,
        known: Vec<&'static str>,
    },
    /// A config value is unknown or out of range; `key` is its full path.
    #[error("{key}: {reason}")]
    Config { key: String, reason: String },
    /// A checkpointed optimizer state does not fit the parameters.
    #[error("optimizer state: {0}")]
    State(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

/// Result of this module.
pub type Result<T, E = OptimError> = std::result::Result<T, E>;

/// One optimizer's per-parameter update and state; `slot` indexes the parameter.
pub trait UpdateRule: Send {
    /// Updates `param` in place (autograd off) from `grad`, with the group's rate and decay.
    fn update(
        &mut self,
        slot: usize,
        param: &mut Tensor,
        grad: &Tensor,
        lr: f64,
        weight_decay: f64,
    ) -> Result<()>;
    /// Copies of the state of parameter `slot`, by state key; empty before its first update.
    fn save(&self, slot: usize) -> Vec<(&'static str, Tensor)>;
    /// Restores the state of parameter `slot` from checkpointed entries.
    fn load(&mut self, slot: usize, state: SlotState) -> Result<()>;
    /// Forgets the state of parameter `slot`.
    fn clear(&mut self, slot: usize);
}

/// Builds an update rule for a number of parameters.
pub type RuleConstructor = fn(&OptimizerParams, usize) -> Box<dyn UpdateRule>;

/// Every optimizer by its VISSL name (`OPTIMIZER.name`).
pub const REGISTRY: &[(&str, RuleConstructor)] = &[
    (adamw::NAME, |cfg, n| Box::new(AdamW::new(cfg, n))),
    (lars::NAME, |cfg, n| Box::new(Lars::new(cfg, n))),
    (sgd::NAME, |cfg, n| Box::new(Sgd::new(cfg, n))),
];

/// The names `OPTIMIZER.name` accepts.
pub fn known_optimizers() -> Vec<&'static str> {
    REGISTRY.iter().map(|(name, _)| *name).collect()
}

/// The checkpointed state entries of one parameter, handed to [`UpdateRule::load`].
pub struct SlotState<'a> {
    param_name: &'a str,
    param: &'a Tensor,
    entries: HashMap<&'a str, &'a Tensor>,
}

impl<'a> SlotState<'a> {
    /// Takes entry `key` as a fresh tensor of the parameter's shape, kind and device.
    pub fn take_like_param(&mut self, key: &str) -> Result<Tensor> {
        let value = self.take(key)?;
        if value.size() != self.param.size() {
            return Err(OptimError::State(format!(
                "`{}.{key}` has shape {:?}, the parameter has {:?}",
                self.param_name,
                value.size(),
                self.param.size()
            )));
        }
        let converted = value
            .f_detach()?
            .f_to_device(self.param.device())?
            .f_to_kind(self.param.kind())?;
        // A copy, so the optimizer never shares storage with the caller's tensors.
        Ok(converted.copy())
    }

    /// Takes entry `key` as an integer count (a one-element tensor).
    pub fn take_count(&mut self, key: &str) -> Result<i64> {
        let value = self.take(key)?;
        if value.numel() != 1 || value.is_floating_point() {
            return Err(OptimError::State(format!(
                "`{}.{key}` must be one integer, got {:?} of shape {:?}",
                self.param_name,
                value.kind(),
                value.size()
            )));
        }
        Ok(value
            .f_to_kind(Kind::Int64)?
            .f_view([1i64])?
            .f_int64_value(&[0])?)
    }

    /// Fails if entries are left that the update rule does not know.
    pub fn finish(self) -> Result<()> {
        let mut unknown: Vec<&str> = self.entries.keys().copied().collect();
        unknown.sort_unstable();
        match unknown.first() {
            None => Ok(()),
            Some(key) => Err(OptimError::State(format!(
                "unexpected entry `{}.{key}`",
                self.param_name
            ))),
        }
    }

    fn take(&mut self, key: &str) -> Result<&'a Tensor> {
        self.entries
            .remove(key)
            .ok_or_else(|| OptimError::State(format!("missing entry `{}.{key}`", self.param_name)))
    }
}

/// An optimizer over named parameters in VISSL's parameter groups, optionally wrapped in LARC.
pub struct Optimizer {
    params: Vec<NamedParam>,
    groups: Vec<ParamGroup>,
    rule: Box<dyn UpdateRule>,
    larc: Option<LarcConfig>,
    head_uses_own_lr: bool,
    head_uses_own_wd: bool,
    /// Per parameter: the iteration before which it is not updated (0: never frozen).
    frozen_until: Vec<u64>,
    grad_clip: Option<GradClip>,
}

impl Optimizer {
    /// Builds the optimizer `cfg.name` over `params` (see [`NamedParam::trainable`]).
    pub fn new(params: Vec<NamedParam>, cfg: &OptimizerParams) -> Result<Self> {
        cfg.validate()?;
        let (_, build) = REGISTRY
            .iter()
            .find(|(name, _)| *name == cfg.name)
            .ok_or_else(|| OptimError::UnknownOptimizer {
                name: cfg.name.clone(),
                known: known_optimizers(),
            })?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = params.iter().find(|p| !seen.insert(p.name.as_str())) {
            return Err(OptimError::State(format!(
                "parameter `{}` is listed twice",
                dup.name
            )));
        }
        Ok(Self {
            rule: build(cfg, params.len()),
            frozen_until: vec![0; params.len()],
            grad_clip: None,
            groups: build_param_groups(&params, cfg),
            params,
            larc: cfg.use_larc.then_some(cfg.larc_config),
            head_uses_own_lr: cfg.head_optimizer_params.use_different_lr,
            head_uses_own_wd: cfg.head_optimizer_params.use_different_wd,
        })
    }

    /// The parameter groups, with indices into [`Optimizer::params`].
    pub fn param_groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The parameters, in the order the groups index them.
    pub fn params(&self) -> &[NamedParam] {
        &self.params
    }

    /// Keeps the parameters named in `MODEL.TEMP_FROZEN_PARAMS_ITER_MAP` unchanged before their
    /// iteration (see [`frozen::frozen_until`] for the matching rules).
    pub fn set_temp_frozen(&mut self, entries: &[TempFrozenParam]) -> Result<()> {
        let names: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        self.frozen_until = frozen::frozen_until(entries, &names)?;
        Ok(())
    }

    /// The parameters frozen for the first iterations, with the iteration they start to move at.
    pub fn temp_frozen(&self) -> Vec<(&str, u64)> {
        self.params
            .iter()
            .zip(&self.frozen_until)
            .filter(|(_, &until)| until > 0)
            .map(|(p, &until)| (p.name.as_str(), until))
            .collect()
    }

    /// Clips the gradients before every update (`MODEL.GRAD_CLIP`; `None`: no clipping).
    pub fn set_grad_clip(&mut self, clip: Option<GradClip>) {
        self.grad_clip = clip;
    }

    /// [`Optimizer::step_at`] an iteration past every temporary freeze.
    pub fn step(&mut self, lr: f64, lr_head: f64) -> Result<()> {
        self.step_at(u64::MAX, lr, lr_head)
    }

    /// The update of training iteration `iteration` (counted from 0), in VISSL's order: clip all
    /// gradients together (`MODEL.GRAD_CLIP`, frozen parameters' gradients included), drop those
    /// of parameters still frozen, then update every parameter that has a gradient. Head groups
    /// use `lr_head` when `head_optimizer_params.use_different_lr`, `lr` otherwise (VISSL then
    /// copies `lr`'s schedule).
    pub fn step_at(&mut self, iteration: u64, lr: f64, lr_head: f64) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        if let Some(clip) = &self.grad_clip {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.tensor.grad())
                .filter(Tensor::defined)
                .collect();
            // The norm before clipping stays on the device: reading it would synchronise.
            let _norm = clip.clip(&grads)?;
        }
        for group in &self.groups {
            let group_lr = if group.kind.uses_head_lr() && self.head_uses_own_lr {
                lr_head
            } else {
                lr
            };
            for &slot in &group.params {
                if iteration < self.frozen_until[slot] {
                    continue;
                }
                let param = &mut self.params[slot].tensor;
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                match &self.larc {
                    Some(larc) => {
                        let grad =
                            larc::larc_gradient(param, &grad, group.weight_decay, group_lr, larc)?;
                        self.rule.update(slot, param, &grad, group_lr, 0.0)?;
                    }
                    None => self
                        .rule
                        .update(slot, param, &grad, group_lr, group.weight_decay)?,
                }
            }
        }
        Ok(())
    }

    /// Sets the weight decay of the regularized groups (`param_schedulers.weight_decay`, DINO's
    /// cosine schedule); groups without decay keep none, and the heads keep their own value when
    /// `head_optimizer_params.use_different_wd`.
    pub fn set_weight_decay(&mut self, weight_decay: f64) {
        for group in &mut self.groups {
            let follows = match group.kind {
                GroupKind::TrunkRegularized
                | GroupKind::RemainingRegularized
                | GroupKind::All
                | GroupKind::Regularized => true,
                GroupKind::HeadRegularized => !self.head_uses_own_wd,
                _ => false,
            };
            if follows {
                group.weight_decay = weight_decay;
            }
        }
    }

    /// Zeroes the gradient of every parameter.
    pub fn zero_grad(&mut self) {
        for param in &mut self.params {
            param.tensor.zero_grad();
        }
    }

    /// The optimizer state as `<param name>.<state key>` entries (copies, safe to keep).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .enumerate()
            .flat_map(|(slot, p)| {
                self.rule
                    .save(slot)
                    .into_iter()
                    .map(move |(key, value)| (format!("{}.{key}", p.name), value))
            })
            .collect()
    }

    /// Replaces the optimizer state with `state` as [`Optimizer::state_dict`] wrote it. Parameters
    /// without entries start fresh; entries for unknown parameters are errors.
    pub fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let slots: HashMap<&str, usize> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut per_slot: HashMap<usize, HashMap<&str, &Tensor>> = HashMap::new();
        for (name, value) in state {
            let slot = name
                .rsplit_once('.')
                .and_then(|(param, key)| slots.get(param).map(|&slot| (slot, key)))
                .ok_or_else(|| {
                    OptimError::State(format!("`{name}` names no parameter of this model"))
                })?;
            per_slot.entry(slot.0).or_default().insert(slot.1, value);
        }
        for slot in 0..self.params.len() {
            self.rule.clear(slot);
            if let Some(entries) = per_slot.remove(&slot) {
                let param = &self.params[slot];
                self.rule.load(
                    slot,
                    SlotState {
                        param_name: &param.name,
                        param: &param.tensor,
                        entries,
                    },
                )?;
            }
        }
        Ok(())
    }
}
