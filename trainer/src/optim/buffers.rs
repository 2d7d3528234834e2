//! One state tensor per parameter under one checkpoint key: the momentum buffers of `sgd`
//! (`momentum_buffer`) and `lars` (`mu`).

use tch::Tensor;

use super::{Result, SlotState};

/// Per parameter slot: none until the rule's first step with a gradient for it.
pub struct SlotBuffers {
    key: &'static str,
    slots: Vec<Option<Tensor>>,
}

impl SlotBuffers {
    /// Empty buffers for `num_params` parameters, checkpointed under `key`.
    pub fn new(key: &'static str, num_params: usize) -> Self {
        Self {
            key,
            slots: (0..num_params).map(|_| None).collect(),
        }
    }

    /// The buffer of `slot` (none before its first step).
    pub fn slot(&mut self, slot: usize) -> &mut Option<Tensor> {
        &mut self.slots[slot]
    }

    /// A copy of `slot`'s buffer for a checkpoint (nothing before its first step).
    pub fn save(&self, slot: usize) -> Vec<(&'static str, Tensor)> {
        self.slots[slot]
            .iter()
            .map(|b| (self.key, b.copy()))
            .collect()
    }

    /// Restores `slot`'s buffer from a checkpoint (shape and kind of the parameter).
    pub fn load(&mut self, slot: usize, mut state: SlotState) -> Result<()> {
        self.slots[slot] = Some(state.take_like_param(self.key)?);
        state.finish()
    }

    /// Forgets `slot`'s buffer.
    pub fn clear(&mut self, slot: usize) {
        self.slots[slot] = None;
    }
}
