//! Every SSLTraining and Benchmark under `examples/` is a valid resource whose VISSL config resolves and
//! validates for its world with the operator's own code, so the examples users copy cannot drift from the API
//! or the configs.

use std::path::Path;

use vissl_crds::api::{Benchmark, SSLTraining};
use vissl_operator::benchmark::config::resolve as resolve_benchmark;
use vissl_operator::training::config::resolve;

#[test]
fn every_example_training_parses_and_its_config_validates() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut checked = Vec::new();
    let mut benchmarks = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(root.join("examples"))
        .expect("examples/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("readable example");
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
        if doc["kind"] == "Benchmark" {
            let benchmark: Benchmark = serde_yaml::from_value(doc)
                .unwrap_or_else(|e| panic!("{}: not a Benchmark: {e}", path.display()));
            let model = &benchmark.spec.model;
            assert!(
                model.training.is_some() != model.checkpoint_url.is_some(),
                "{}: spec.model needs exactly one of training and checkpointUrl",
                path.display()
            );
            resolve_benchmark(
                &benchmark.spec,
                Some("s3://bucket/checkpoints"),
                &root.join("configs"),
            )
            .unwrap_or_else(|e| panic!("{}: config does not validate: {e}", path.display()));
            benchmarks.push(path);
            continue;
        }
        if doc["kind"] != "SSLTraining" {
            continue;
        }
        let training: SSLTraining = serde_yaml::from_value(doc)
            .unwrap_or_else(|e| panic!("{}: not an SSLTraining: {e}", path.display()));
        resolve(&training.spec, &root.join("configs"))
            .unwrap_or_else(|e| panic!("{}: config does not validate: {e}", path.display()));
        checked.push(path);
    }
    assert!(
        checked.len() >= 4,
        "expected the example trainings, found {checked:?}"
    );
    assert!(
        !benchmarks.is_empty(),
        "expected the example Benchmark (knn-benchmark.yaml)"
    );
}
