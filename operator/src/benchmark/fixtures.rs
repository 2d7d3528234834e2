//! Benchmark objects for tests.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use vissl_crds::api::{
    Benchmark, BenchmarkKind, BenchmarkSpec, ConfigSource, ModelSource, NodeGroupSpec, RunPolicy,
    SchedulingSpec,
};

/// A 1-node kNN benchmark of the SSLTraining `fmnist`, as the API server returns it.
pub fn benchmark() -> Benchmark {
    let mut benchmark = Benchmark::new(
        "knn",
        BenchmarkSpec {
            nodes: NodeGroupSpec::default(),
            config: ConfigSource {
                name: Some("benchmark/nearest_neighbor/quick_cpu_fmnist_knn".into()),
                inline: None,
                overrides: vec!["config.DATA.TRAIN.DATA_LIMIT=500".into()],
            },
            model: ModelSource {
                training: Some("fmnist".into()),
                checkpoint_url: None,
                credentials_secret: None,
            },
            benchmark: BenchmarkKind::Knn,
            dataset: None,
            results: None,
            run_policy: RunPolicy::default(),
            scheduling: SchedulingSpec::default(),
        },
    );
    benchmark.metadata = ObjectMeta {
        name: Some("knn".into()),
        namespace: Some("ml".into()),
        uid: Some("7d1e-uid".into()),
        generation: Some(1),
        resource_version: Some("200".into()),
        ..ObjectMeta::default()
    };
    benchmark
}
