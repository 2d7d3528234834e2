//! Config resolution and rendering of an SSLTraining's children.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use vissl_crds::api::{CheckpointSpec, DatasetSpec, SSLTraining};
use vissl_crds::config::default_configs_root;

use super::config::{loader_args, resolve};
use super::fixtures::training;
use super::render::{children, RenderInput};

fn render(training: &SSLTraining, ranks: &[usize]) -> Vec<Pod> {
    let resolved = resolve(&training.spec, &default_configs_root())
        .unwrap_or_else(|e| panic!("the fixture's config must resolve: {e}"));
    children(
        training,
        ranks,
        &RenderInput {
            attempt: 2,
            config_yaml: &resolved.yaml,
            metrics_port: resolved.metrics_port,
            default_image: "example.org/vissl:test",
        },
    )
    .unwrap_or_else(|e| panic!("rendering failed: {e}"))
    .pods
}

fn env_of(container: &Container) -> BTreeMap<String, String> {
    container
        .env
        .iter()
        .flatten()
        .map(|EnvVar { name, value, .. }| (name.clone(), value.clone().unwrap_or_default()))
        .collect()
}

fn trainer(pod: &Pod) -> &Container {
    let spec = pod.spec.as_ref().expect("a pod spec");
    spec.containers
        .iter()
        .find(|c| c.name == "trainer")
        .expect("a trainer container")
}

#[test]
fn the_resolved_config_has_the_world_metrics_and_checkpoint_dir() {
    let mut t = training();
    t.spec.checkpoint = Some(CheckpointSpec {
        url: Some("s3://bucket/runs/fmnist".into()),
        credentials_secret: Some("s3-creds".into()),
    });
    let resolved = resolve(&t.spec, &default_configs_root()).expect("valid config");
    let doc: serde_yaml::Value = serde_yaml::from_str(&resolved.yaml).expect("YAML");
    let config = &doc["config"];
    assert_eq!(
        config["DISTRIBUTED"]["NUM_NODES"],
        serde_yaml::Value::from(2)
    );
    assert_eq!(
        config["DISTRIBUTED"]["NUM_PROC_PER_NODE"],
        serde_yaml::Value::from(1)
    );
    assert_eq!(
        config["HOOKS"]["PROMETHEUS_SETUP"]["USE_PROMETHEUS"],
        serde_yaml::Value::from(true)
    );
    assert_eq!(
        config["CHECKPOINT"]["DIR"],
        serde_yaml::Value::from("s3://bucket/runs/fmnist")
    );
    assert_eq!(
        config["OPTIMIZER"]["num_epochs"],
        serde_yaml::Value::from(1)
    );
    assert_eq!(
        config["HOOKS"]["PROMETHEUS_SETUP"]["PORT"].as_u64(),
        Some(u64::from(resolved.metrics_port))
    );
}

#[test]
fn an_inline_tree_becomes_one_override_per_leaf_before_the_user_lines() {
    let mut t = training();
    t.spec.config.inline = Some(serde_json::json!({
        "OPTIMIZER": {"num_epochs": 3, "param_schedulers": {}},
        "DATA": {"TRAIN": {"DATA_PATHS": ["/data/a"]}}
    }));
    let args = loader_args(&t.spec);
    assert_eq!(
        args,
        vec![
            "config=pretrain/simclr/quick_cpu_fmnist".to_string(),
            "config.DATA.TRAIN.DATA_PATHS=[\"/data/a\"]".into(),
            "config.OPTIMIZER.num_epochs=3".into(),
            "config.OPTIMIZER.param_schedulers={}".into(),
            "config.OPTIMIZER.num_epochs=1".into(),
            "config.HOOKS.PROMETHEUS_SETUP.USE_PROMETHEUS=true".into(),
        ]
    );
}

#[test]
fn a_bad_config_is_reported_with_the_key() {
    let mut t = training();
    t.spec.config.overrides = vec!["config.OPTIMIZER.num_epoch=3".into()];
    let error = resolve(&t.spec, &default_configs_root()).expect_err("unknown key");
    assert!(error.contains("config.OPTIMIZER.num_epoch"), "{error}");
    assert!(
        error.contains("spec.config.overrides line `config.OPTIMIZER.num_epoch=3`"),
        "{error}"
    );

    t.spec.config.overrides.clear();
    t.spec.config.inline = Some(serde_json::json!({"OPTIMIZER": {"num_epoch": 3}}));
    let error = resolve(&t.spec, &default_configs_root()).expect_err("unknown inline key");
    assert!(
        error.contains("spec.config.inline (key `config.OPTIMIZER.num_epoch`)"),
        "{error}"
    );

    t.spec.config.overrides.clear();
    t.spec.config.inline = Some(serde_json::json!({"MODEL": {"TRUNK": {"NAME": "resnet_typo"}}}));
    let error = resolve(&t.spec, &default_configs_root()).expect_err("unknown trunk");
    assert!(error.contains("resnet_typo"), "{error}");

    t.spec.config.inline = None;
    t.spec.config.name = Some("pretrain/simclr/does_not_exist".into());
    let error = resolve(&t.spec, &default_configs_root()).expect_err("missing file");
    assert!(error.contains("does_not_exist"), "{error}");
}

#[test]
fn pods_follow_the_pod_contract() {
    let t = training();
    let pods = render(&t, &[0, 1]);
    assert_eq!(pods.len(), 2);
    for (rank, pod) in pods.iter().enumerate() {
        let meta = &pod.metadata;
        assert_eq!(
            meta.name.as_deref(),
            Some(format!("fmnist-node-{rank}").as_str())
        );
        assert_eq!(meta.namespace.as_deref(), Some("ml"));
        let labels = meta.labels.clone().unwrap_or_default();
        for (key, value) in [
            ("app.kubernetes.io/name", "vissl"),
            ("app.kubernetes.io/managed-by", "vissl-operator"),
            ("vissl.rs/training", "fmnist"),
            ("vissl.rs/node-rank", rank.to_string().as_str()),
            ("vissl.rs/attempt", "2"),
        ] {
            assert_eq!(
                labels.get(key).map(String::as_str),
                Some(value),
                "label {key}"
            );
        }
        let owners = meta.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "SSLTraining");
        assert_eq!(owners[0].api_version, "vissl.rs/v1alpha1");
        assert_eq!(owners[0].uid, "0c3b7a8e-uid");
        assert_eq!(owners[0].controller, Some(true));

        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.hostname.as_deref(),
            Some(format!("fmnist-node-{rank}").as_str())
        );
        assert_eq!(spec.subdomain.as_deref(), Some("fmnist"));
        let volume = &spec.volumes.as_ref().expect("volumes")[0];
        assert_eq!(
            volume.config_map.as_ref().map(|c| c.name.as_str()),
            Some("fmnist-config")
        );

        let init = &spec.init_containers.as_ref().expect("init containers")[0];
        assert_eq!(init.name, "wait-for-master");
        assert_eq!(
            init.command,
            Some(vec!["vissl".to_string(), "wait-for-master".into()])
        );
        assert_eq!(init.image.as_deref(), Some("example.org/vissl:test"));
        assert_eq!(
            env_of(init).get("MASTER_ADDR").map(String::as_str),
            Some("fmnist-node-0.fmnist.ml.svc")
        );

        let main = trainer(pod);
        assert_eq!(
            main.command,
            Some(vec![
                "vissl".to_string(),
                "train".into(),
                "config=/etc/vissl/config.yaml".into()
            ])
        );
        let env = env_of(main);
        let rank_text = rank.to_string();
        for (key, value) in [
            ("MASTER_ADDR", "fmnist-node-0.fmnist.ml.svc"),
            ("MASTER_PORT", "29500"),
            ("NUM_NODES", "2"),
            ("NODE_RANK", rank_text.as_str()),
            ("NPROC_PER_NODE", "1"),
            ("WORLD_SIZE", "2"),
            ("VISSL_RUN_ID", "0c3b7a8e-uid-2"),
            ("VISSL_RESTART_ATTEMPT", "2"),
        ] {
            assert_eq!(env.get(key).map(String::as_str), Some(value), "env {key}");
        }
        let mount = &main.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(
            (mount.name.as_str(), mount.mount_path.as_str()),
            ("config", "/etc/vissl")
        );
        let ports = main.ports.clone().unwrap_or_default();
        let metrics = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .expect("a metrics port");
        // defaults.yaml's HOOKS.PROMETHEUS_SETUP.PORT.
        assert_eq!(metrics.container_port, 9400);
    }
}

#[test]
fn only_the_requested_ranks_are_rendered() {
    let pods = render(&training(), &[1]);
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].metadata.name.as_deref(), Some("fmnist-node-1"));
}

#[test]
fn gpus_user_env_credentials_dataset_and_placement_reach_the_pod() {
    let mut t = training();
    t.spec.nodes.procs_per_node = 4;
    t.spec.nodes.image = Some("registry/vissl:gpu".into());
    t.spec.nodes.resources = Some(ResourceRequirements {
        limits: Some(BTreeMap::from([(
            "nvidia.com/gpu".to_string(),
            Quantity("4".into()),
        )])),
        ..ResourceRequirements::default()
    });
    t.spec.nodes.env = vec![EnvVar {
        name: "NCCL_DEBUG".into(),
        value: Some("INFO".into()),
        ..EnvVar::default()
    }];
    t.spec.nodes.node_selector = BTreeMap::from([("gpu".to_string(), "h100".to_string())]);
    t.spec.nodes.priority_class_name = Some("training".into());
    t.spec.checkpoint = Some(CheckpointSpec {
        url: Some("s3://b/c".into()),
        credentials_secret: Some("s3-creds".into()),
    });
    t.spec.dataset = Some(DatasetSpec {
        claim_name: Some("imagenet".into()),
        host_path: None,
        mount_path: "/datasets/imagenet".into(),
        url: None,
    });
    let pods = render(&t, &[0]);
    let pod = &pods[0];
    let spec = pod.spec.as_ref().expect("spec");
    let main = trainer(pod);
    assert_eq!(main.image.as_deref(), Some("registry/vissl:gpu"));
    assert_eq!(
        main.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("nvidia.com/gpu")),
        Some(&Quantity("4".into()))
    );
    let env = env_of(main);
    assert_eq!(env.get("NPROC_PER_NODE").map(String::as_str), Some("4"));
    assert_eq!(env.get("WORLD_SIZE").map(String::as_str), Some("8"));
    assert_eq!(env.get("NCCL_DEBUG").map(String::as_str), Some("INFO"));
    assert_eq!(
        env.get("VISSL_DATASET_DIR").map(String::as_str),
        Some("/datasets/imagenet")
    );
    let secret = main.env_from.as_ref().expect("envFrom")[0]
        .secret_ref
        .as_ref()
        .map(|s| s.name.clone());
    assert_eq!(secret.as_deref(), Some("s3-creds"));
    let dataset = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "dataset")
        .expect("a dataset volume");
    assert_eq!(
        dataset
            .persistent_volume_claim
            .as_ref()
            .map(|c| c.claim_name.as_str()),
        Some("imagenet")
    );
    assert!(main
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.mount_path == "/datasets/imagenet" && m.read_only == Some(true)));
    assert_eq!(
        spec.node_selector
            .as_ref()
            .and_then(|s| s.get("gpu"))
            .map(String::as_str),
        Some("h100")
    );
    assert_eq!(spec.priority_class_name.as_deref(), Some("training"));
}

#[test]
fn the_service_is_headless_and_publishes_unready_pods() {
    let t = training();
    let resolved = resolve(&t.spec, &default_configs_root()).expect("valid config");
    let rendered = children(
        &t,
        &[0],
        &RenderInput {
            attempt: 0,
            config_yaml: &resolved.yaml,
            metrics_port: resolved.metrics_port,
            default_image: "img",
        },
    )
    .expect("children");
    let spec = rendered.service.spec.expect("service spec");
    assert_eq!(rendered.service.metadata.name.as_deref(), Some("fmnist"));
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(
        spec.selector
            .and_then(|s| s.get("vissl.rs/training").cloned())
            .as_deref(),
        Some("fmnist")
    );
    assert_eq!(
        rendered.config_map.metadata.name.as_deref(),
        Some("fmnist-config")
    );
    assert_eq!(
        rendered
            .config_map
            .data
            .and_then(|d| d.get("config.yaml").cloned()),
        Some(resolved.yaml)
    );
}
