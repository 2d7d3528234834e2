//! Evaluation benchmarks on frozen features.

pub mod knn;
pub mod report;
pub mod weights;
