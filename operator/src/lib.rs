//! vissl-operator: reconciles SSLTraining resources into multi-node pod groups.
//!
//! [`group`] is the pod-group lifecycle any vissl-rs resource shares (pure decision, applies,
//! Events); [`training`] is what is specific to SSLTraining (config, children, reconcile).

pub mod cli;
pub mod error;
pub mod group;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod progress;
pub mod telemetry;
pub mod training;

pub use error::{Error, Result};
