//! vissl-rs trainer: VISSL's self-supervised training on libtorch, one module per VISSL concept.

pub mod benchmarks;
pub mod checkpoint;
pub mod commands;
pub mod data;
pub mod dist;
pub mod engine;
pub mod exit;
pub mod logging;
pub mod losses;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod storage;
pub mod tensorboard;
