//! The children of an SSLTraining for one attempt, as the pod contract (DESIGN.md) describes them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvFromSource, EnvVar,
    HostPathVolumeSource, PersistentVolumeClaimVolumeSource, Pod, PodSpec, SecretEnvSource,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use vissl_crds::api::SSLTraining;

use crate::error::{Error, Result};
use crate::group::apply::{namespace_of, object_key};
use crate::group::{
    Children, APP_NAME, ATTEMPT_LABEL, MANAGED_BY_LABEL, MANAGER, NAME_LABEL, NODE_RANK_LABEL,
};

/// The label naming the SSLTraining a child belongs to.
pub const TRAINING_LABEL: &str = "vissl.rs/training";
/// The trainer container (its exit code decides the pod's fate).
pub const TRAINER_CONTAINER: &str = "trainer";
/// The init container that waits for node 0's DNS name.
pub const WAIT_CONTAINER: &str = "wait-for-master";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/vissl";
/// The config file's key in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";
/// The container port name of rank 0's `/metrics` and `/status`.
pub const METRICS_PORT_NAME: &str = "metrics";

const CONFIG_VOLUME: &str = "config";
const DATASET_VOLUME: &str = "dataset";

/// Everything rendering needs besides the resource.
#[derive(Debug, Clone, Copy)]
pub struct RenderInput<'a> {
    /// The attempt the pods belong to.
    pub attempt: i32,
    /// The resolved config file.
    pub config_yaml: &'a str,
    /// HOOKS.PROMETHEUS_SETUP.PORT of that config.
    pub metrics_port: u16,
    /// Image when the spec names none (--default-image).
    pub default_image: &'a str,
}

/// `<name>-node-<rank>`.
pub fn pod_name(training: &str, rank: usize) -> String {
    format!("{training}-node-{rank}")
}

/// `<name>-config`.
pub fn config_map_name(training: &str) -> String {
    format!("{training}-config")
}

/// The label selector of every child of a training.
pub fn selector(training: &str) -> String {
    format!("{TRAINING_LABEL}={training},{MANAGED_BY_LABEL}={MANAGER}")
}

/// Labels of every child.
fn labels(training: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), APP_NAME.to_string()),
        (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
        (TRAINING_LABEL.to_string(), training.to_string()),
    ])
}

/// Metadata of a child: name, namespace, labels, controller owner reference.
fn child_meta(
    owner: &SSLTraining,
    name: String,
    labels: BTreeMap<String, String>,
) -> Result<ObjectMeta> {
    let owner_ref = owner
        .controller_owner_ref(&())
        .ok_or_else(|| Error::MissingField {
            object: object_key(owner),
            field: "metadata.uid",
        })?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(namespace_of(owner)?),
        labels: Some(labels),
        owner_references: Some(vec![owner_ref]),
        ..ObjectMeta::default()
    })
}

/// Metadata of the training's PodGroup (gang scheduling): named like the training, labelled and
/// owned like the other children.
pub fn pod_group_meta(training: &SSLTraining) -> Result<ObjectMeta> {
    let name = training.name_any();
    child_meta(training, name.clone(), labels(&name))
}

/// The Service, the ConfigMap and the pods of `ranks` for one attempt.
pub fn children(training: &SSLTraining, ranks: &[usize], input: &RenderInput) -> Result<Children> {
    let name = training.name_any();
    Ok(Children {
        service: service(training)?,
        config_map: ConfigMap {
            metadata: child_meta(training, config_map_name(&name), labels(&name))?,
            data: Some(BTreeMap::from([(
                CONFIG_KEY.to_string(),
                input.config_yaml.to_string(),
            )])),
            ..ConfigMap::default()
        },
        pods: ranks
            .iter()
            .map(|&rank| pod(training, rank, input))
            .collect::<Result<_>>()?,
    })
}

/// Headless, and publishing pods before they are ready: rendezvous needs the names while the
/// trainers start.
fn service(training: &SSLTraining) -> Result<Service> {
    let name = training.name_any();
    Ok(Service {
        metadata: child_meta(training, name.clone(), labels(&name))?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(TRAINING_LABEL.to_string(), name)])),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: training.spec.nodes.master_port,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

fn pod(training: &SSLTraining, rank: usize, input: &RenderInput) -> Result<Pod> {
    let name = training.name_any();
    let namespace = namespace_of(training)?;
    let uid = training.uid().ok_or_else(|| Error::MissingField {
        object: object_key(training),
        field: "metadata.uid",
    })?;
    let spec = &training.spec;
    let nodes = &spec.nodes;
    let image = nodes
        .image
        .clone()
        .unwrap_or_else(|| input.default_image.to_string());
    let pull_policy = nodes.image_pull_policy.map(|p| p.as_str().to_string());

    let master = [
        env(
            "MASTER_ADDR",
            format!("{}.{name}.{namespace}.svc", pod_name(&name, 0)),
        ),
        env("MASTER_PORT", nodes.master_port),
    ];
    let mut trainer_env = master.to_vec();
    trainer_env.extend([
        env("NUM_NODES", nodes.num_nodes),
        env("NODE_RANK", rank),
        env("NPROC_PER_NODE", nodes.procs_per_node),
        env(
            "WORLD_SIZE",
            i64::from(nodes.num_nodes) * i64::from(nodes.procs_per_node),
        ),
        env("VISSL_RUN_ID", format!("{uid}-{}", input.attempt)),
        env("VISSL_RESTART_ATTEMPT", input.attempt),
    ]);
    let mut volumes = vec![Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(&name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: CONFIG_VOLUME.into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    if let Some(dataset) = &spec.dataset {
        if let Some(url) = &dataset.url {
            trainer_env.push(env("VISSL_DATASET_URL", url));
        }
        let source = match (&dataset.claim_name, &dataset.host_path) {
            (Some(claim), _) => Some(Volume {
                name: DATASET_VOLUME.into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            (None, Some(path)) => Some(Volume {
                name: DATASET_VOLUME.into(),
                host_path: Some(HostPathVolumeSource {
                    path: path.clone(),
                    type_: Some("Directory".into()),
                }),
                ..Volume::default()
            }),
            (None, None) => None,
        };
        if let Some(volume) = source {
            volumes.push(volume);
            trainer_env.push(env("VISSL_DATASET_DIR", &dataset.mount_path));
            mounts.push(VolumeMount {
                name: DATASET_VOLUME.into(),
                mount_path: dataset.mount_path.clone(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    // User variables last: they may refer to the ones above with $(VAR).
    trainer_env.extend(nodes.env.iter().cloned());
    let env_from = spec
        .checkpoint
        .as_ref()
        .and_then(|c| c.credentials_secret.as_ref())
        .map(|secret| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        });

    let mut pod_labels = labels(&name);
    pod_labels.insert(NODE_RANK_LABEL.into(), rank.to_string());
    pod_labels.insert(ATTEMPT_LABEL.into(), input.attempt.to_string());
    let pod_name = pod_name(&name, rank);
    Ok(Pod {
        metadata: child_meta(training, pod_name.clone(), pod_labels)?,
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            hostname: Some(pod_name),
            subdomain: Some(name.clone()),
            node_selector: (!nodes.node_selector.is_empty()).then(|| nodes.node_selector.clone()),
            tolerations: (!nodes.tolerations.is_empty()).then(|| nodes.tolerations.clone()),
            affinity: nodes.affinity.clone(),
            priority_class_name: nodes.priority_class_name.clone(),
            service_account_name: nodes.service_account_name.clone(),
            volumes: Some(volumes),
            init_containers: Some(vec![Container {
                name: WAIT_CONTAINER.into(),
                image: Some(image.clone()),
                image_pull_policy: pull_policy.clone(),
                command: Some(vec!["vissl".into(), "wait-for-master".into()]),
                env: Some(master.to_vec()),
                ..Container::default()
            }]),
            containers: vec![Container {
                name: TRAINER_CONTAINER.into(),
                image: Some(image),
                image_pull_policy: pull_policy,
                command: Some(vec![
                    "vissl".into(),
                    "train".into(),
                    format!("config={CONFIG_DIR}/{CONFIG_KEY}"),
                ]),
                env: Some(trainer_env),
                env_from,
                ports: Some(vec![
                    ContainerPort {
                        name: Some(METRICS_PORT_NAME.into()),
                        container_port: i32::from(input.metrics_port),
                        ..ContainerPort::default()
                    },
                    ContainerPort {
                        name: Some("rendezvous".into()),
                        container_port: nodes.master_port,
                        ..ContainerPort::default()
                    },
                ]),
                resources: nodes.resources.clone(),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    })
}
