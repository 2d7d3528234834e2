//! vissl-operator: reconciles SSLTraining and Benchmark resources into multi-node pod groups.
//!
//! [`group`] is the pod-group lifecycle any vissl-rs resource shares (pure decision, applies,
//! Events) and [`workload`] the config and children every kind runs; [`training`] is what is
//! specific to SSLTraining, [`benchmark`] what is specific to Benchmark.

pub mod benchmark;
pub mod cli;
pub mod error;
pub mod group;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod progress;
pub mod telemetry;
pub mod training;
pub mod workload;

pub use error::{Error, Result};

/// Selects rustls' ring provider for the process (idempotent). A workspace build can enable both of
/// rustls' providers through other crates, and rustls then refuses to choose one by itself.
pub fn install_crypto_provider() {
    // An Err means a provider is installed already, which is all this needs.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
