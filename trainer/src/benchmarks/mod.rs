//! Evaluation benchmarks on frozen features.

pub mod knn;
