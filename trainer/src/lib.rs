//! vissl-rs trainer: VISSL's self-supervised training on libtorch, one module per VISSL concept.

pub mod data;
pub mod losses;
pub mod models;
pub mod optim;
