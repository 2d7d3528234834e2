//! The children of an SSLTraining for one attempt: the shared rendering
//! ([`crate::workload::render`]) with `vissl train`, the training label and the checkpoint Secret.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use vissl_crds::api::SSLTraining;

use crate::error::Result;
use crate::group::Children;
use crate::workload::render::{self, Attempt, Workload, CONFIG_DIR, CONFIG_KEY};
pub use crate::workload::render::{
    config_map_name, pod_name, METRICS_PORT_NAME, TRAINER_CONTAINER, WAIT_CONTAINER,
};

/// The label naming the SSLTraining a child belongs to.
pub const TRAINING_LABEL: &str = "vissl.rs/training";

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

/// The label selector of every child of a training.
pub fn selector(training: &str) -> String {
    render::selector(TRAINING_LABEL, training)
}

/// Metadata of the training's PodGroup (gang scheduling): named like the training, labelled and
/// owned like the other children.
pub fn pod_group_meta(training: &SSLTraining) -> Result<ObjectMeta> {
    render::pod_group_meta(training, TRAINING_LABEL)
}

/// The Service, the ConfigMap and the pods of `ranks` for one attempt.
pub fn children(training: &SSLTraining, ranks: &[usize], input: &RenderInput) -> Result<Children> {
    let spec = &training.spec;
    let workload = Workload {
        owner_label: TRAINING_LABEL,
        nodes: &spec.nodes,
        dataset: spec.dataset.as_ref(),
        command: vec![
            "vissl".into(),
            "train".into(),
            format!("config={CONFIG_DIR}/{CONFIG_KEY}"),
        ],
        secrets: spec
            .checkpoint
            .as_ref()
            .and_then(|c| c.credentials_secret.clone())
            .into_iter()
            .collect(),
        metrics_port: Some(input.metrics_port),
        termination_message: false,
    };
    render::children(
        training,
        &workload,
        ranks,
        &Attempt {
            attempt: input.attempt,
            config_yaml: input.config_yaml,
            default_image: input.default_image,
        },
    )
}
