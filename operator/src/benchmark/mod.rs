//! The Benchmark kind: the model it evaluates (an SSLTraining's checkpoint or a URL), its config,
//! its children, the results its trainer reports, and the reconcile that ties them to the shared
//! pod-group lifecycle ([`crate::group`]).

pub mod config;
pub mod controller;
pub mod render;
pub mod results;

pub use controller::{error_policy, reconcile, requeue_for_training};

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
