//! The checked-in CRD matches the code, and carries the schema pieces users and the API server rely on.

use serde::Deserialize;
use serde_json::Value;
use vissl_crds::api::{
    all_crds_yaml, benchmark_crd, benchmark_crd_yaml, ssl_training_crd, ssl_training_crd_yaml,
};

const CHECKED_IN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/manifests/ssltrainings.vissl.rs.yaml"
);

const BENCHMARK_CHECKED_IN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crds/manifests/benchmarks.vissl.rs.yaml"
);

#[test]
fn the_checked_in_benchmark_crd_is_up_to_date() {
    let generated = benchmark_crd_yaml().expect("the CRD renders");
    let on_disk = std::fs::read_to_string(BENCHMARK_CHECKED_IN).unwrap_or_else(|e| {
        panic!("cannot read {BENCHMARK_CHECKED_IN}: {e}; create it with `cargo run -p vissl-operator -- crd --kind benchmark > crds/manifests/benchmarks.vissl.rs.yaml`")
    });
    assert!(
        on_disk == generated,
        "{BENCHMARK_CHECKED_IN} differs from the code; regenerate it with \
         `cargo run -p vissl-operator -- crd --kind benchmark > crds/manifests/benchmarks.vissl.rs.yaml`"
    );
}

#[test]
fn all_crds_is_a_stream_of_both() {
    let stream = all_crds_yaml().expect("the CRDs render");
    let names: Vec<String> = serde_yaml::Deserializer::from_str(&stream)
        .map(|doc| {
            let value = serde_yaml::Value::deserialize(doc).expect("a YAML document");
            value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["ssltrainings.vissl.rs", "benchmarks.vissl.rs"]);
}

#[test]
fn the_benchmark_crd_has_its_names_columns_and_model_rule() {
    let crd = serde_json::to_value(benchmark_crd()).expect("the CRD serialises");
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], "benchmarks.vissl.rs");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "Benchmark");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["bench"]));
    let version = &spec["versions"][0];
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<(&str, &str)> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default(),
                c["jsonPath"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("Phase", ".status.phase"),
            ("Model", ".status.model"),
            ("Top-1", ".status.top1"),
            ("Age", ".metadata.creationTimestamp")
        ]
    );
    let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let rules: Vec<&str> = schema["x-kubernetes-validations"]
        .as_array()
        .expect("x-kubernetes-validations on spec")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| r.contains("model.training") && r.contains("model.checkpointUrl")),
        "{rules:?}"
    );
    assert_eq!(
        schema["properties"]["benchmark"]["enum"],
        serde_json::json!(["knn"])
    );
    assert_eq!(schema["properties"]["benchmark"]["default"], "knn");
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    required.sort_unstable();
    assert_eq!(required, ["config", "model"]);
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    for field in [
        "phase",
        "conditions",
        "model",
        "results",
        "top1",
        "resultsUrl",
    ] {
        assert!(status[field].is_object(), "status.{field} in the schema");
    }
}

#[test]
fn the_checked_in_crd_is_up_to_date() {
    let generated = ssl_training_crd_yaml().expect("the CRD renders");
    let on_disk = std::fs::read_to_string(CHECKED_IN).unwrap_or_else(|e| {
        panic!("cannot read {CHECKED_IN}: {e}; create it with `cargo run -p vissl-operator -- crd --kind ssltraining > crds/manifests/ssltrainings.vissl.rs.yaml`")
    });
    assert!(
        on_disk == generated,
        "{CHECKED_IN} differs from the code; regenerate it with \
         `cargo run -p vissl-operator -- crd --kind ssltraining > crds/manifests/ssltrainings.vissl.rs.yaml`"
    );
}

fn crd() -> Value {
    serde_json::to_value(ssl_training_crd()).expect("the CRD serialises")
}

#[test]
fn names_columns_and_status_subresource() {
    let crd = crd();
    let spec = &crd["spec"];
    assert_eq!(crd["metadata"]["name"], "ssltrainings.vissl.rs");
    assert_eq!(spec["group"], "vissl.rs");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "SSLTraining");
    assert_eq!(spec["names"]["plural"], "ssltrainings");
    assert_eq!(spec["names"]["shortNames"], serde_json::json!(["sslt"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for column in ["Phase", "Progress", "Restarts", "Age"] {
        assert!(columns.contains(&column), "column {column} in {columns:?}");
    }
}

#[test]
fn cel_rules_defaults_and_descriptions_are_in_the_schema() {
    let crd = crd();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let spec = &schema["properties"]["spec"];
    let rules: Vec<&str> = spec["x-kubernetes-validations"]
        .as_array()
        .expect("x-kubernetes-validations on spec")
        .iter()
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| r.contains("nvidia.com/gpu") && r.contains("procsPerNode")),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.contains("config.name") && r.contains("config.inline")),
        "{rules:?}"
    );

    let props = &spec["properties"];
    for field in [
        "numNodes",
        "procsPerNode",
        "image",
        "resources",
        "tolerations",
        "masterPort",
        "config",
        "runPolicy",
    ] {
        assert!(props[field].is_object(), "spec.{field} in the schema");
        assert!(
            props[field]["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "spec.{field} has a description (kubectl explain)"
        );
    }
    assert_eq!(props["numNodes"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(props["numNodes"]["default"], 1);
    assert_eq!(props["masterPort"]["default"], 29500);
    assert_eq!(
        props["config"]["properties"]["inline"]["x-kubernetes-preserve-unknown-fields"],
        true
    );
    let explain = props["runPolicy"]["properties"]["backoffLimit"]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(
        !explain.contains('\n'),
        "descriptions are unwrapped: {explain:?}"
    );
    let required: Vec<&str> = spec["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(required, vec!["config"]);
    let phases = &schema["properties"]["status"]["properties"]["phase"]["enum"];
    assert_eq!(
        phases,
        &serde_json::json!([
            "Pending",
            "Running",
            "Restarting",
            "Succeeded",
            "Failed",
            "Suspended"
        ])
    );
}
