//! The pod-group lifecycle every vissl-rs resource shares: observe the group's pods, decide (pure,
//! [`decide`]), act (server-side apply, delete), and report Events. It knows nothing of a specific
//! resource kind: the caller renders the children and owns the status type, so `Benchmark` reuses
//! this as it is.
//!
//! With gang scheduling ([`scheduling`]) a PodGroup is applied before the pods, and pods wait for it.
//!
//! No finalizer: the children (Service, ConfigMap, Pods, PodGroup) carry a controller owner reference, so the
//! garbage collector deletes them with the resource, and nothing outside the cluster needs cleaning
//! up (checkpoints are the user's data and stay).

pub mod apply;
pub mod controller;
pub mod decide;
pub mod gate;
pub mod observe;
pub mod reasons;
pub mod scheduling;

pub use apply::{Children, GroupApi};
pub use decide::{decide, Action, Decision, Note, Observed};
pub use observe::{Failure, ObservedPod, PodState};
pub use scheduling::Gang;

/// The one server-side-apply field manager, also the Event reporter and the managed-by label value.
pub const MANAGER: &str = "vissl-operator";
/// `app.kubernetes.io/name` on every child.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Its value.
pub const APP_NAME: &str = "vissl";
/// `app.kubernetes.io/managed-by` on every child (value [`MANAGER`]).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The node rank of a pod.
pub const NODE_RANK_LABEL: &str = "vissl.rs/node-rank";
/// The attempt a pod belongs to.
pub const ATTEMPT_LABEL: &str = "vissl.rs/attempt";

#[cfg(test)]
mod tests;
