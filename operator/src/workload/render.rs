//! The children of a pod-group resource for one attempt, as the pod contract (DESIGN.md) describes
//! them; the resource kind supplies a [`Workload`] (owner label, command, secrets).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvFromSource, EnvVar,
    HostPathVolumeSource, PersistentVolumeClaimVolumeSource, Pod, PodSpec, SecretEnvSource,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::{Resource, ResourceExt};
use vissl_crds::api::{DatasetSpec, NodeGroupSpec};

use crate::error::{Error, Result};
use crate::group::apply::{namespace_of, object_key};
use crate::group::{
    Children, APP_NAME, ATTEMPT_LABEL, MANAGED_BY_LABEL, MANAGER, NAME_LABEL, NODE_RANK_LABEL,
};

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
/// Where a trainer that reports a result writes it (Kubernetes' default terminationMessagePath).
pub const TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";
/// The variable telling the trainer that path.
pub const TERMINATION_MESSAGE_ENV: &str = "VISSL_TERMINATION_MESSAGE_PATH";

const CONFIG_VOLUME: &str = "config";
const DATASET_VOLUME: &str = "dataset";

/// What differs between resource kinds in the pods they run.
#[derive(Debug, Clone)]
pub struct Workload<'a> {
    /// The label naming the owning resource on every child (`vissl.rs/training`, ...).
    pub owner_label: &'static str,
    /// The pods' shape from the spec.
    pub nodes: &'a NodeGroupSpec,
    /// The data volume and URL, if any.
    pub dataset: Option<&'a DatasetSpec>,
    /// The trainer container's command.
    pub command: Vec<String>,
    /// Secrets whose keys become the trainer's environment, in order (a later one wins a key).
    pub secrets: Vec<String>,
    /// The port rank 0 serves `/metrics` and `/status` on, when the trainer serves them.
    pub metrics_port: Option<u16>,
    /// The trainer writes its result to [`TERMINATION_MESSAGE_PATH`] (read back from the pod status).
    pub termination_message: bool,
}

/// The attempt being rendered.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The attempt the pods belong to.
    pub attempt: i32,
    /// The resolved config file.
    pub config_yaml: &'a str,
    /// Image when the spec names none (--default-image).
    pub default_image: &'a str,
}

/// `<name>-node-<rank>`.
pub fn pod_name(owner: &str, rank: usize) -> String {
    format!("{owner}-node-{rank}")
}

/// `<name>-config`.
pub fn config_map_name(owner: &str) -> String {
    format!("{owner}-config")
}

/// The label selector of every child of the resource `owner` (labelled with `owner_label`).
pub fn selector(owner_label: &str, owner: &str) -> String {
    format!("{owner_label}={owner},{MANAGED_BY_LABEL}={MANAGER}")
}

fn labels(owner_label: &str, owner: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), APP_NAME.to_string()),
        (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
        (owner_label.to_string(), owner.to_string()),
    ])
}

/// Metadata of a child: name, namespace, labels, controller owner reference.
fn child_meta<K>(owner: &K, name: String, labels: BTreeMap<String, String>) -> Result<ObjectMeta>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
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

/// Metadata of the resource's PodGroup (gang scheduling): named like the resource, labelled and
/// owned like the other children.
pub fn pod_group_meta<K>(owner: &K, owner_label: &str) -> Result<ObjectMeta>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    let name = owner.name_any();
    child_meta(owner, name.clone(), labels(owner_label, &name))
}

/// The Service, the ConfigMap and the pods of `ranks` for one attempt.
pub fn children<K>(
    owner: &K,
    workload: &Workload,
    ranks: &[usize],
    attempt: &Attempt,
) -> Result<Children>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    let name = owner.name_any();
    Ok(Children {
        service: service(owner, workload)?,
        config_map: ConfigMap {
            metadata: child_meta(
                owner,
                config_map_name(&name),
                labels(workload.owner_label, &name),
            )?,
            data: Some(BTreeMap::from([(
                CONFIG_KEY.to_string(),
                attempt.config_yaml.to_string(),
            )])),
            ..ConfigMap::default()
        },
        pods: ranks
            .iter()
            .map(|&rank| pod(owner, workload, rank, attempt))
            .collect::<Result<_>>()?,
    })
}

/// Headless, and publishing pods before they are ready: rendezvous needs the names while the
/// trainers start.
fn service<K>(owner: &K, workload: &Workload) -> Result<Service>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    let name = owner.name_any();
    Ok(Service {
        metadata: child_meta(owner, name.clone(), labels(workload.owner_label, &name))?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(workload.owner_label.to_string(), name)])),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: workload.nodes.master_port,
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

/// The dataset volume and its mount, when the spec names a claim or a host folder.
fn dataset_volume(dataset: &DatasetSpec) -> Option<(Volume, VolumeMount)> {
    let volume = match (&dataset.claim_name, &dataset.host_path) {
        (Some(claim), _) => Volume {
            name: DATASET_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        },
        (None, Some(path)) => Volume {
            name: DATASET_VOLUME.into(),
            host_path: Some(HostPathVolumeSource {
                path: path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        },
        (None, None) => return None,
    };
    let mount = VolumeMount {
        name: DATASET_VOLUME.into(),
        mount_path: dataset.mount_path.clone(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    Some((volume, mount))
}

fn pod<K>(owner: &K, workload: &Workload, rank: usize, attempt: &Attempt) -> Result<Pod>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
{
    let name = owner.name_any();
    let namespace = namespace_of(owner)?;
    let uid = owner.uid().ok_or_else(|| Error::MissingField {
        object: object_key(owner),
        field: "metadata.uid",
    })?;
    let nodes = workload.nodes;
    let image = nodes
        .image
        .clone()
        .unwrap_or_else(|| attempt.default_image.to_string());
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
        env("VISSL_RUN_ID", format!("{uid}-{}", attempt.attempt)),
        env("VISSL_RESTART_ATTEMPT", attempt.attempt),
    ]);
    if workload.termination_message {
        trainer_env.push(env(TERMINATION_MESSAGE_ENV, TERMINATION_MESSAGE_PATH));
    }
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
    if let Some(dataset) = workload.dataset {
        if let Some(url) = &dataset.url {
            trainer_env.push(env("VISSL_DATASET_URL", url));
        }
        if let Some((volume, mount)) = dataset_volume(dataset) {
            volumes.push(volume);
            trainer_env.push(env("VISSL_DATASET_DIR", &dataset.mount_path));
            mounts.push(mount);
        }
    }
    // User variables last: they may refer to the ones above with $(VAR).
    trainer_env.extend(nodes.env.iter().cloned());
    let mut secrets: Vec<&String> = Vec::new();
    for secret in &workload.secrets {
        if !secrets.contains(&secret) {
            secrets.push(secret);
        }
    }
    let env_from = (!secrets.is_empty()).then(|| {
        secrets
            .into_iter()
            .map(|secret| EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            })
            .collect()
    });
    let mut ports = Vec::new();
    if let Some(port) = workload.metrics_port {
        ports.push(ContainerPort {
            name: Some(METRICS_PORT_NAME.into()),
            container_port: i32::from(port),
            ..ContainerPort::default()
        });
    }
    ports.push(ContainerPort {
        name: Some("rendezvous".into()),
        container_port: nodes.master_port,
        ..ContainerPort::default()
    });

    let mut pod_labels = labels(workload.owner_label, &name);
    pod_labels.insert(NODE_RANK_LABEL.into(), rank.to_string());
    pod_labels.insert(ATTEMPT_LABEL.into(), attempt.attempt.to_string());
    let pod_name = pod_name(&name, rank);
    Ok(Pod {
        metadata: child_meta(owner, pod_name.clone(), pod_labels)?,
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
                command: Some(workload.command.clone()),
                env: Some(trainer_env),
                env_from,
                ports: Some(ports),
                resources: nodes.resources.clone(),
                volume_mounts: Some(mounts),
                termination_message_path: workload
                    .termination_message
                    .then(|| TERMINATION_MESSAGE_PATH.to_string()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    })
}
