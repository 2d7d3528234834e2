//! What every pod-group resource runs, independent of its kind: the VISSL config resolved with the
//! trainer's own loader ([`config`]) and the Service, ConfigMap and pods of one attempt
//! ([`render`]). `training` and `benchmark` supply only what differs (command, labels, secrets).

pub mod config;
pub mod render;
