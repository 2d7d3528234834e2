//! The model a Benchmark evaluates, its config and its children.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use vissl_crds::api::{
    Benchmark, BenchmarkStatus, CheckpointSpec, Condition, ConditionStatus, GroupStatus,
    LastCheckpoint, Phase, ResultsSpec, SSLTraining, SSLTrainingStatus,
};
use vissl_crds::config::default_configs_root;

use super::config::resolve;
use super::controller::{
    model_of, requeue_for_training, Model, CHECKPOINT_GIVEN, NO_CHECKPOINT, TRAINING_FAILED,
    TRAINING_SUCCEEDED,
};
use super::fixtures::benchmark;
use super::render::{children, command, RenderInput};
use crate::training::fixtures::training;

fn training_in(phase: Phase, last: Option<&str>, dir: Option<&str>) -> SSLTraining {
    let mut t = training();
    t.spec.checkpoint = Some(CheckpointSpec {
        url: dir.map(str::to_string),
        credentials_secret: Some("training-s3".into()),
    });
    t.status = Some(SSLTrainingStatus {
        group: GroupStatus {
            phase,
            ..GroupStatus::default()
        },
        progress: None,
        last_checkpoint: last.map(|url| LastCheckpoint {
            url: url.into(),
            iteration: 40,
            epoch: Some(2),
        }),
    });
    t
}

#[test]
fn a_missing_or_unfinished_training_is_waited_for() {
    let b = benchmark();
    let Model::Waiting(message) = model_of(&b, None) else {
        panic!("waiting for a training that does not exist");
    };
    assert!(
        message.contains("fmnist") && message.contains("not found"),
        "{message}"
    );
    for phase in [
        Phase::Pending,
        Phase::Running,
        Phase::Restarting,
        Phase::Suspended,
    ] {
        let Model::Waiting(message) = model_of(&b, Some(&training_in(phase, None, Some("s3://c"))))
        else {
            panic!("waiting for a {phase:?} training");
        };
        assert!(message.contains(phase.as_str()), "{message}");
    }
}

#[test]
fn a_succeeded_training_gives_its_last_checkpoint_else_its_folder() {
    let b = benchmark();
    let t = training_in(
        Phase::Succeeded,
        Some("s3://c/run/iter-40"),
        Some("s3://c/run"),
    );
    let Model::Ready {
        location,
        secret,
        reason,
        ..
    } = model_of(&b, Some(&t))
    else {
        panic!("ready");
    };
    assert_eq!(location, "s3://c/run/iter-40");
    assert_eq!(
        secret.as_deref(),
        Some("training-s3"),
        "the training's Secret by default"
    );
    assert_eq!(reason, TRAINING_SUCCEEDED);

    let t = training_in(Phase::Succeeded, None, Some("s3://c/run"));
    let Model::Ready { location, .. } = model_of(&b, Some(&t)) else {
        panic!("ready");
    };
    assert_eq!(location, "s3://c/run");

    let t = training_in(Phase::Succeeded, None, None);
    assert!(matches!(
        model_of(&b, Some(&t)),
        Model::Unavailable(NO_CHECKPOINT, _)
    ));
}

#[test]
fn a_failed_training_fails_the_benchmark_with_its_reason() {
    let b = benchmark();
    let mut t = training_in(Phase::Failed, None, Some("s3://c"));
    if let Some(status) = t.status.as_mut() {
        status.group.conditions.push(Condition {
            type_: "Failed".into(),
            status: ConditionStatus::True,
            reason: "BackoffLimitExceeded".into(),
            message: "pod fmnist-node-0 failed".into(),
            last_transition_time: None,
            observed_generation: None,
        });
    }
    let Model::Unavailable(reason, message) = model_of(&b, Some(&t)) else {
        panic!("unavailable");
    };
    assert_eq!(reason, TRAINING_FAILED);
    assert!(
        message.contains("BackoffLimitExceeded") && message.contains("fmnist"),
        "{message}"
    );
}

#[test]
fn a_checkpoint_url_or_a_recorded_model_needs_no_training() {
    let mut b = benchmark();
    b.spec.model.training = None;
    b.spec.model.checkpoint_url = Some("s3://weights/model".into());
    b.spec.model.credentials_secret = Some("weights-s3".into());
    assert_eq!(
        model_of(&b, None),
        Model::Ready {
            location: "s3://weights/model".into(),
            secret: Some("weights-s3".into()),
            reason: CHECKPOINT_GIVEN,
            message: "evaluating spec.model.checkpointUrl s3://weights/model".into(),
        }
    );

    let mut b = benchmark();
    b.status = Some(BenchmarkStatus {
        model: Some("s3://c/run/iter-40".into()),
        ..BenchmarkStatus::default()
    });
    let Model::Ready { location, .. } = model_of(&b, None) else {
        panic!("a recorded model stays, even once the training is gone");
    };
    assert_eq!(location, "s3://c/run/iter-40");
}

#[test]
fn changes_of_a_training_requeue_the_benchmarks_that_use_it() {
    let t = training();
    let mine = benchmark();
    let mut other_name = benchmark();
    other_name.metadata.name = Some("other".into());
    other_name.spec.model.training = Some("another-training".into());
    let mut other_namespace = benchmark();
    other_namespace.metadata.namespace = Some("elsewhere".into());
    let refs = requeue_for_training(&t, [&mine, &other_name, &other_namespace]);
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].name, "knn");
    assert_eq!(refs[0].namespace.as_deref(), Some("ml"));
}

#[test]
fn the_config_loads_the_model_from_the_checkpoint_location() {
    let b = benchmark();
    let resolved = resolve(&b.spec, Some("s3://c/run/iter-40"), &default_configs_root())
        .expect("valid config");
    let doc: serde_yaml::Value = serde_yaml::from_str(&resolved.yaml).expect("YAML");
    assert_eq!(
        doc["config"]["MODEL"]["WEIGHTS_INIT"]["PARAMS_FILE"],
        serde_yaml::Value::from("s3://c/run/iter-40")
    );
    assert_eq!(
        doc["config"]["DATA"]["TRAIN"]["DATA_LIMIT"],
        serde_yaml::Value::from(500)
    );

    let mut bad = benchmark();
    bad.spec.config.overrides = vec!["config.NEAREST_NEIGHBOR.TOPKK=5".into()];
    let error = resolve(&bad.spec, None, &default_configs_root()).expect_err("unknown key");
    assert!(
        error.contains("TOPKK") && error.contains("spec.config.overrides"),
        "{error}"
    );
}

fn trainer(pod: &Pod) -> &Container {
    let spec = pod.spec.as_ref().expect("a pod spec");
    spec.containers
        .iter()
        .find(|c| c.name == "trainer")
        .expect("a trainer container")
}

fn render(b: &Benchmark, model_secret: Option<&str>) -> Vec<Pod> {
    children(
        b,
        &[0],
        &RenderInput {
            attempt: 0,
            config_yaml: "config: {}\n",
            default_image: "example.org/vissl:test",
            model_secret,
        },
    )
    .unwrap_or_else(|e| panic!("rendering failed: {e}"))
    .pods
}

#[test]
fn pods_run_the_benchmark_with_a_termination_message_and_both_secrets() {
    let mut b = benchmark();
    b.spec.results = Some(ResultsSpec {
        url: "s3://results/bench/".into(),
        credentials_secret: Some("results-s3".into()),
    });
    assert_eq!(
        command(&b),
        [
            "vissl",
            "benchmark",
            "knn",
            "--output",
            "s3://results/bench/ml/knn/knn_results.json",
            "config=/etc/vissl/config.yaml"
        ]
    );
    let pods = render(&b, Some("training-s3"));
    let pod = &pods[0];
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("vissl.rs/benchmark").map(String::as_str),
        Some("knn")
    );
    assert!(!labels.contains_key("vissl.rs/training"));
    assert_eq!(pod.metadata.name.as_deref(), Some("knn-node-0"));
    let owner = &pod.metadata.owner_references.as_ref().expect("an owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Benchmark", Some(true))
    );

    let container = trainer(pod);
    assert_eq!(
        container.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    let env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        env.get("VISSL_TERMINATION_MESSAGE_PATH")
            .map(String::as_str),
        Some("/dev/termination-log")
    );
    assert_eq!(
        env.get("MASTER_ADDR").map(String::as_str),
        Some("knn-node-0.knn.ml.svc")
    );
    let secrets: Vec<String> = container
        .env_from
        .iter()
        .flatten()
        .filter_map(|e| e.secret_ref.as_ref().map(|s| s.name.clone()))
        .collect();
    assert_eq!(
        secrets,
        ["training-s3", "results-s3"],
        "the results Secret last"
    );
    let ports: Vec<String> = container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.clone())
        .collect();
    assert_eq!(
        ports,
        ["rendezvous"],
        "a benchmark serves no training metrics"
    );
}

#[test]
fn without_results_there_is_no_output_and_one_secret_is_listed_once() {
    let mut b = benchmark();
    b.spec.results = Some(ResultsSpec {
        url: "s3://same".into(),
        credentials_secret: Some("s3".into()),
    });
    let pods = render(&b, Some("s3"));
    let secrets = trainer(&pods[0]).env_from.clone().unwrap_or_default();
    assert_eq!(secrets.len(), 1);

    let b = benchmark();
    assert!(!command(&b).iter().any(|a| a == "--output"));
    let pods = render(&b, None);
    assert!(trainer(&pods[0]).env_from.is_none());
}

mod results_in_status {
    use k8s_openapi::jiff::Timestamp;
    use vissl_crds::api::{BenchmarkStatus, ConditionStatus, GroupStatus, Phase, RunPolicy};

    use crate::benchmark::controller::record_results;
    use crate::group::Observed;

    fn succeeded() -> GroupStatus {
        GroupStatus {
            phase: Phase::Succeeded,
            ..GroupStatus::default()
        }
    }

    fn record(message: Option<&str>) -> (BenchmarkStatus, GroupStatus, crate::group::Note) {
        let policy = RunPolicy::default();
        let before = succeeded();
        let obs = Observed {
            generation: Some(1),
            num_nodes: 1,
            policy: &policy,
            spec_error: None,
            status: &before,
            pods: &[],
            now: Timestamp::from_second(1_800_000_000).expect("a valid time"),
        };
        let mut status = BenchmarkStatus::default();
        let mut group = succeeded();
        let note = record_results(&mut status, &mut group, &obs, message);
        (status, group, note)
    }

    #[test]
    fn a_report_fills_rows_headline_url_and_a_true_condition() {
        let (status, group, note) = record(Some(
            r#"{"benchmark":"knn","output":"s3://r/ml/knn/knn_results.json","results":[
                {"features":"trained","layer":"res5avg","k":200,"top1":75.94,"top5":99.1}]}"#,
        ));
        assert_eq!(status.results.len(), 1);
        assert_eq!(status.top1, Some(75.94));
        assert_eq!(
            status.results_url.as_deref(),
            Some("s3://r/ml/knn/knn_results.json")
        );
        let c = group.condition("ResultsRecorded").expect("ResultsRecorded");
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, "ResultsRead")
        );
        assert!(c.message.contains("75.94"), "{}", c.message);
        assert!(!note.warning && note.reason == "ResultsRead");
        assert_eq!(group.phase, Phase::Succeeded);
    }

    #[test]
    fn a_missing_or_junk_message_is_a_false_condition_and_a_warning_but_still_succeeded() {
        for message in [None, Some("killed"), Some("")] {
            let (status, group, note) = record(message);
            assert!(status.results.is_empty() && status.top1.is_none());
            let c = group.condition("ResultsRecorded").expect("ResultsRecorded");
            assert_eq!(
                (c.status, c.reason.as_str()),
                (ConditionStatus::False, "InvalidResults")
            );
            assert!(note.warning && note.reason == "InvalidResults");
            assert_eq!(group.phase, Phase::Succeeded, "the pods did their work");
        }
    }
}
