//! SSLTraining objects for tests.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use vissl_crds::api::{
    ConfigSource, NodeGroupSpec, RunPolicy, SSLTraining, SSLTrainingSpec, SchedulingSpec,
};

/// A 2-node CPU training of the quick Fashion-MNIST config, as the API server returns it.
pub fn training() -> SSLTraining {
    let mut training = SSLTraining::new(
        "fmnist",
        SSLTrainingSpec {
            nodes: NodeGroupSpec {
                num_nodes: 2,
                ..NodeGroupSpec::default()
            },
            config: ConfigSource {
                name: Some("pretrain/simclr/quick_cpu_fmnist".into()),
                inline: None,
                overrides: vec!["config.OPTIMIZER.num_epochs=1".into()],
            },
            dataset: None,
            checkpoint: None,
            run_policy: RunPolicy::default(),
            scheduling: SchedulingSpec::default(),
        },
    );
    training.metadata = ObjectMeta {
        name: Some("fmnist".into()),
        namespace: Some("ml".into()),
        uid: Some("0c3b7a8e-uid".into()),
        generation: Some(1),
        resource_version: Some("100".into()),
        ..ObjectMeta::default()
    };
    training
}
