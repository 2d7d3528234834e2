//! A second copy of the trained model whose weights follow it as an exponential moving average:
//! MoCo's key encoder, SwAV's momentum encoder, DINO's teacher. One implementation for all of them.
//!
//! The copy never receives gradients; after each update (or, for MoCo, before each forward) its
//! parameters become `m * own + (1 - m) * trained`. Its buffers (batch-norm running statistics) are
//! taken from the trained model once, at the first step; after that they are the copy's own,
//! moved by its own training-mode forwards, as VISSL's MoCo and DINO hooks leave them. SwAV's
//! momentum hook also copies the trained model's `running_*` statistics at every update
//! ([`MomentumEncoder::following_running_stats`]), which matters when the copy runs in evaluation
//! mode. Its tensors are part of the loss state, so checkpoints resume it exactly.

use super::{LossContext, LossError, Result};
use crate::models::BaseSslModel;
use tch::{nn, Tensor};

/// The EMA copy of a model.
pub struct MomentumEncoder {
    // Keeps the copy's variables alive; `model` refers to them.
    _vs: nn::VarStore,
    model: BaseSslModel,
    /// The copy's variables by name, in the same order as `names`.
    names: Vec<String>,
    loss: &'static str,
    /// Whether the weights were taken from the trained model yet.
    initialised: bool,
    /// Copy the trained model's `running_*` buffers at every update.
    follow_running_stats: bool,
}

impl MomentumEncoder {
    /// Builds the copy (random weights until [`MomentumEncoder::init_from`] or a loaded state).
    pub fn new(ctx: &LossContext, loss: &'static str) -> Result<Self> {
        let (vs, model) = ctx.build_model_copy(loss)?;
        Ok(Self::from_model(vs, model, loss))
    }

    /// Wraps a model the loss built itself (DINO's teacher, built without stochastic depth).
    pub fn from_model(vs: nn::VarStore, model: BaseSslModel, loss: &'static str) -> Self {
        let mut names: Vec<String> = model
            .named_variables()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        for (_, t) in model.named_variables() {
            // No gradients ever reach the copy; without this, its forward would build a graph.
            let _ = t.set_requires_grad(false);
        }
        Self {
            _vs: vs,
            model,
            names,
            loss,
            initialised: false,
            follow_running_stats: false,
        }
    }

    /// The same copy, taking the trained model's batch-norm running statistics at every update
    /// (VISSL's SwAV momentum hook) instead of keeping its own.
    pub fn following_running_stats(mut self) -> Self {
        self.follow_running_stats = true;
        self
    }

    /// The copy's model (eval or train mode is chosen per forward).
    pub fn model(&self) -> &BaseSslModel {
        &self.model
    }

    /// Whether the weights have been set from the trained model or a checkpoint.
    pub fn is_initialised(&self) -> bool {
        self.initialised
    }

    /// Copies every weight and buffer of `trained` (VISSL does this at the first step).
    pub fn init_from(&mut self, trained: &BaseSslModel) -> Result<()> {
        self.blend(trained, 0.0, true)?;
        self.initialised = true;
        Ok(())
    }

    /// `own = momentum * own + (1 - momentum) * trained` for parameters; buffers stay the copy's
    /// own (or follow the trained model's running statistics, see above).
    /// Initialises from `trained` first when that has not happened yet.
    pub fn update(&mut self, trained: &BaseSslModel, momentum: f64) -> Result<()> {
        if !self.initialised {
            return self.init_from(trained);
        }
        self.blend(trained, momentum, false)
    }

    fn blend(&mut self, trained: &BaseSslModel, momentum: f64, initialising: bool) -> Result<()> {
        let _guard = tch::no_grad_guard();
        // At initialisation everything is copied; after that parameters blend and a buffer is
        // copied only when following the running statistics.
        let source: std::collections::HashMap<&str, (&Tensor, bool)> = trained
            .trunk_variables()
            .iter()
            .chain(trained.head_variables())
            .map(|v| (v.name.as_str(), (&v.tensor, v.is_param)))
            .collect();
        for (name, mut own) in self.model.named_variables() {
            let Some(&(src, is_param)) = source.get(name.as_str()) else {
                return Err(self.state_error(format!("trained model has no tensor `{name}`")));
            };
            if src.size() != own.size() {
                return Err(self.state_error(format!(
                    "`{name}`: trained model {:?}, copy {:?}",
                    src.size(),
                    own.size()
                )));
            }
            if initialising {
                own.copy_(src);
            } else if !is_param || !src.is_floating_point() {
                if self.follow_running_stats && name.contains("running_") {
                    own.copy_(src);
                }
            } else {
                let _ = own.f_mul_scalar_(momentum)?;
                let _ = own.f_add_(&src.f_mul_scalar(1.0 - momentum)?)?;
            }
        }
        Ok(())
    }

    /// The copy's tensors for a checkpoint, each name prefixed with `prefix`.
    pub fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let vars: std::collections::HashMap<String, Tensor> =
            self.model.named_variables().into_iter().collect();
        self.names
            .iter()
            .filter_map(|n| {
                vars.get(n)
                    .map(|t| (format!("{prefix}{n}"), t.detach().copy()))
            })
            .collect()
    }

    /// Restores what [`MomentumEncoder::state_tensors`] saved under `prefix`; entries without
    /// the prefix are ignored (they belong to the rest of the loss's state).
    pub fn load_state(&mut self, prefix: &str, state: &[(String, Tensor)]) -> Result<()> {
        let mine: std::collections::HashMap<&str, &Tensor> = state
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(prefix).map(|n| (n, t)))
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for (name, mut own) in self.model.named_variables() {
            let src = mine
                .get(name.as_str())
                .ok_or_else(|| self.state_error(format!("checkpoint has no `{prefix}{name}`")))?;
            if src.size() != own.size() {
                return Err(self.state_error(format!(
                    "`{prefix}{name}`: checkpoint {:?}, model {:?}",
                    src.size(),
                    own.size()
                )));
            }
            own.copy_(src);
        }
        self.initialised = true;
        Ok(())
    }

    fn state_error(&self, reason: String) -> LossError {
        LossError::State {
            loss: self.loss,
            reason: format!("momentum encoder: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelParams;
    use std::sync::Arc;
    use tch::Device;

    fn tiny_model() -> anyhow::Result<(nn::VarStore, BaseSslModel)> {
        let yaml: serde_yaml::Value = serde_yaml::from_str(
            "TRUNK: {NAME: resnet, RESNETS: {DEPTH: 18, STEM: cifar, BASE_CHANNELS: 4}}\n\
             HEAD: {PARAMS: [[mlp, {dims: [32, 8]}]]}",
        )?;
        let params = ModelParams::from_yaml(&yaml)?;
        let vs = nn::VarStore::new(Device::Cpu);
        let model = BaseSslModel::new(&vs, &params)?;
        Ok((vs, model))
    }

    fn context() -> LossContext {
        LossContext::single_process().with_model_factory(Arc::new(tiny_model))
    }

    fn by_name(model: &BaseSslModel, name: &str) -> Tensor {
        model
            .named_variables()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.detach().copy())
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    #[test]
    fn follows_the_trained_model_as_an_ema_and_round_trips_through_state() {
        let (_vs, trained) = tiny_model().unwrap();
        let mut ema = MomentumEncoder::new(&context(), "test").unwrap();
        let weight = "heads.0.clf.0.weight";
        let bn_mean = "trunk.bn1.running_mean";
        assert!(!ema.is_initialised());
        ema.update(&trained, 0.9).unwrap();
        assert!(ema.is_initialised());
        assert_eq!(by_name(ema.model(), weight), by_name(&trained, weight));

        // Move the trained weights and statistics, then blend: own' = 0.9 own + 0.1 trained.
        let before = by_name(ema.model(), weight);
        let own_mean = by_name(ema.model(), bn_mean);
        {
            let _g = tch::no_grad_guard();
            for (name, mut t) in trained.named_variables() {
                if name == weight || name == bn_mean {
                    t.copy_(&(t.ones_like() * 3.0));
                }
            }
        }
        ema.update(&trained, 0.9).unwrap();
        let expected = &before * 0.9 + 0.3;
        let got = by_name(ema.model(), weight);
        assert!(
            got.allclose(&expected, 1e-6, 1e-7, false),
            "EMA of parameters"
        );
        // Buffers are neither averaged nor copied after the first step: they are the copy's own.
        assert_eq!(by_name(ema.model(), bn_mean), own_mean);
        assert_ne!(by_name(ema.model(), bn_mean), by_name(&trained, bn_mean));
        assert!(!got.requires_grad());

        let state = ema.state_tensors("teacher.");
        assert!(state.iter().all(|(n, _)| n.starts_with("teacher.")));
        let mut restored = MomentumEncoder::new(&context(), "test").unwrap();
        restored.load_state("teacher.", &state).unwrap();
        assert!(restored.is_initialised());
        assert_eq!(by_name(restored.model(), weight), got);
        let truncated: Vec<(String, Tensor)> = state[1..]
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        let err = MomentumEncoder::new(&context(), "test")
            .unwrap()
            .load_state("teacher.", &truncated)
            .unwrap_err();
        assert!(err.to_string().contains("checkpoint has no"), "{err}");
    }
}
