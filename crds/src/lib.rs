//! vissl-rs API: the VISSL config schema with its loader, and the custom resources.
//! No libtorch here, so the operator can validate configs without it.

pub mod api;
pub mod config;
pub mod registry;
