//! The SSLTraining kind: its config, its children, and the reconcile that ties them to the shared
//! pod-group lifecycle ([`crate::group`]).

pub mod config;
pub mod controller;
pub mod render;

pub use controller::{error_policy, reconcile, Context, Settings};

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
