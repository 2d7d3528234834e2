//! One reconcile against a scripted API server (a tower-test mock standing in for the client's
//! transport): the calls it must make, in order, with their bodies, and nothing more.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeMap;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower_test::mock::{self, Handle};
use vissl_crds::api::{
    ConfigSource, GangScheduler, NodeGroupSpec, RunPolicy, SSLTraining, SSLTrainingSpec,
    SSLTrainingStatus, SchedulingSpec,
};
use vissl_operator::metrics::Metrics;
use vissl_operator::training::{reconcile, Context, Settings};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const NS: &str = "ml";
const NAME: &str = "fmnist";

fn training(status: Option<SSLTrainingStatus>) -> SSLTraining {
    let mut t = SSLTraining::new(
        NAME,
        SSLTrainingSpec {
            nodes: NodeGroupSpec {
                num_nodes: 2,
                ..NodeGroupSpec::default()
            },
            config: ConfigSource {
                name: Some("pretrain/simclr/quick_cpu_fmnist".into()),
                ..ConfigSource::default()
            },
            dataset: None,
            checkpoint: None,
            run_policy: RunPolicy::default(),
            scheduling: SchedulingSpec::default(),
        },
    );
    t.metadata = ObjectMeta {
        name: Some(NAME.into()),
        namespace: Some(NS.into()),
        uid: Some("uid-1".into()),
        generation: Some(1),
        resource_version: Some("7".into()),
        ..ObjectMeta::default()
    };
    t.status = status;
    t
}

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context {
        client,
        metrics: Metrics::new().expect("metrics register"),
        settings: Settings {
            configs_root: vissl_crds::config::default_configs_root(),
            default_image: "example.org/vissl:test".into(),
            // No pod IPs behind a mock: the poller is tested on its own.
            poll_progress: false,
        },
    })
}

/// One expected call: method, path (without the query), and the JSON body sent back.
struct Expect {
    method: Method,
    path: String,
}

/// Answers the next request after checking it; returns the request body as JSON.
async fn answer(
    handle: &mut ApiHandle,
    expect: Expect,
    reply: impl FnOnce(&Value) -> Value,
) -> (String, Value) {
    answer_with(handle, expect, 200, reply).await
}

/// [`answer`] with an HTTP status code.
async fn answer_with(
    handle: &mut ApiHandle,
    expect: Expect,
    code: u16,
    reply: impl FnOnce(&Value) -> Value,
) -> (String, Value) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no request came; expected {} {}",
                expect.method, expect.path
            )
        })
        .expect("the client is alive");
    assert_eq!(
        request.method(),
        expect.method,
        "method of {}",
        request.uri()
    );
    assert_eq!(request.uri().path(), expect.path, "path");
    let query = request.uri().query().unwrap_or("").to_string();
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON request body")
    };
    let response = serde_json::to_vec(&reply(&body)).expect("JSON");
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(response))
            .expect("response"),
    );
    (query, body)
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "8"}, "items": items})
}

async fn expect_list(handle: &mut ApiHandle, items: Vec<Value>) {
    let (query, _) = answer(
        handle,
        Expect {
            method: Method::GET,
            path: format!("/api/v1/namespaces/{NS}/pods"),
        },
        |_| pod_list(items),
    )
    .await;
    assert!(
        query.contains("labelSelector=vissl.rs%2Ftraining%3Dfmnist"),
        "pods are listed by the training label: {query}"
    );
}

async fn expect_apply(handle: &mut ApiHandle, path: String) -> Value {
    let (query, body) = answer(
        handle,
        Expect {
            method: Method::PATCH,
            path,
        },
        |b| b.clone(),
    )
    .await;
    assert!(query.contains("fieldManager=vissl-operator"), "{query}");
    assert!(query.contains("force=true"), "{query}");
    body
}

async fn expect_event(handle: &mut ApiHandle, reason: &str) -> Value {
    let (_, body) = answer(
        handle,
        Expect {
            method: Method::POST,
            path: format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        },
        |b| b.clone(),
    )
    .await;
    assert_eq!(body["reason"], reason, "event {body}");
    assert_eq!(body["regarding"]["name"], NAME);
    assert_eq!(body["reportingController"], "vissl-operator");
    body
}

async fn expect_status_patch(handle: &mut ApiHandle) -> Value {
    let (query, body) = answer(
        handle,
        Expect {
            method: Method::PATCH,
            path: format!("/apis/vissl.rs/v1alpha1/namespaces/{NS}/ssltrainings/{NAME}/status"),
        },
        |_| serde_json::to_value(training(None)).expect("JSON"),
    )
    .await;
    assert!(query.contains("fieldManager=vissl-operator"), "{query}");
    assert_eq!(body["apiVersion"], "vissl.rs/v1alpha1");
    assert_eq!(body["kind"], "SSLTraining");
    body["status"].clone()
}

fn running_pod(rank: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{NAME}-node-{rank}"), "namespace": NS, "labels": {
            "vissl.rs/training": NAME, "app.kubernetes.io/managed-by": "vissl-operator",
            "vissl.rs/node-rank": rank.to_string(), "vissl.rs/attempt": "0"}},
        "status": {"phase": "Running", "podIP": "127.0.0.1"}
    })
}

/// Runs one reconcile while `script` plays the API server; both must finish.
async fn reconcile_with<F, Fut>(t: SSLTraining, script: F)
where
    F: FnOnce(ApiHandle) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let server = tokio::spawn(script(handle));
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        reconcile(Arc::new(t), context(client)),
    )
    .await
    .expect("reconcile finished (an unexpected extra API call would hang it)");
    assert!(result.is_ok(), "reconcile failed: {:?}", result.err());
    server.await.expect("every expected call was made");
}

#[tokio::test]
async fn a_new_training_gets_service_configmap_pods_event_and_status() {
    reconcile_with(training(None), |mut h| async move {
        expect_list(&mut h, vec![]).await;
        let service =
            expect_apply(&mut h, format!("/api/v1/namespaces/{NS}/services/{NAME}")).await;
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(
            service["metadata"]["ownerReferences"][0]["kind"],
            "SSLTraining"
        );
        let config = expect_apply(
            &mut h,
            format!("/api/v1/namespaces/{NS}/configmaps/{NAME}-config"),
        )
        .await;
        let yaml = config["data"]["config.yaml"].as_str().expect("config.yaml");
        assert!(yaml.contains("USE_PROMETHEUS: true"), "{yaml}");
        for rank in 0..2 {
            let pod = expect_apply(
                &mut h,
                format!("/api/v1/namespaces/{NS}/pods/{NAME}-node-{rank}"),
            )
            .await;
            assert_eq!(
                pod["metadata"]["labels"]["vissl.rs/node-rank"],
                rank.to_string()
            );
            assert_eq!(pod["spec"]["restartPolicy"], "Never");
        }
        let event = expect_event(&mut h, "CreatedGroup").await;
        assert_eq!(event["type"], "Normal");
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Pending");
        assert_eq!(status["attempt"], 0);
        let conditions = status["conditions"].as_array().expect("conditions");
        assert!(conditions
            .iter()
            .any(|c| c["type"] == "ConfigValid" && c["status"] == "True"));
    })
    .await;
}

#[tokio::test]
async fn an_invalid_config_gets_a_condition_and_a_warning_but_no_children() {
    let mut t = training(None);
    t.spec.config.overrides = vec!["config.OPTIMIZER.num_epoch=2".into()];
    reconcile_with(t, |mut h| async move {
        expect_list(&mut h, vec![]).await;
        let event = expect_event(&mut h, "InvalidConfig").await;
        assert_eq!(event["type"], "Warning");
        assert!(
            event["note"]
                .as_str()
                .unwrap_or("")
                .contains("config.OPTIMIZER.num_epoch"),
            "{event}"
        );
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Failed");
        let conditions = status["conditions"].as_array().expect("conditions");
        assert!(conditions.iter().any(|c| c["type"] == "ConfigValid"
            && c["status"] == "False"
            && c["reason"] == "InvalidConfig"));
    })
    .await;
}

#[tokio::test]
async fn the_status_is_patched_only_when_it_changed() {
    // First pass: both pods run, so the phase moves to Running: an Event and a status patch.
    let (tx, rx) = tokio::sync::oneshot::channel();
    reconcile_with(training(None), |mut h| async move {
        expect_list(&mut h, vec![running_pod(0), running_pod(1)]).await;
        expect_event(&mut h, "Running").await;
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Running");
        let _ = tx.send(status);
    })
    .await;
    let written: SSLTrainingStatus =
        serde_json::from_value(rx.await.expect("status captured")).expect("a valid status");

    // Second pass over what the API server now holds: nothing changed, so only the list.
    reconcile_with(training(Some(written)), |mut h| async move {
        expect_list(&mut h, vec![running_pod(0), running_pod(1)]).await;
    })
    .await;
}

fn failed_pod(rank: usize, exit_code: i32) -> Value {
    let mut pod = running_pod(rank);
    pod["status"] = json!({"phase": "Failed", "containerStatuses": [{
        "name": "trainer", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "reason": "Error"}}}]});
    pod
}

async fn expect_delete(handle: &mut ApiHandle, pod: &str) {
    let name = pod.to_string();
    answer(
        handle,
        Expect {
            method: Method::DELETE,
            path: format!("/api/v1/namespaces/{NS}/pods/{pod}"),
        },
        move |_| running_pod_named(&name),
    )
    .await;
}

fn running_pod_named(name: &str) -> Value {
    let mut pod = running_pod(0);
    pod["metadata"]["name"] = json!(name);
    pod
}

#[tokio::test]
async fn a_failed_pod_deletes_the_whole_group_and_counts_a_restart() {
    // The status of a running group, as the first pass of the previous test writes it.
    let (tx, rx) = tokio::sync::oneshot::channel();
    reconcile_with(training(None), |mut h| async move {
        expect_list(&mut h, vec![running_pod(0), running_pod(1)]).await;
        expect_event(&mut h, "Running").await;
        let _ = tx.send(expect_status_patch(&mut h).await);
    })
    .await;
    let running: SSLTrainingStatus =
        serde_json::from_value(rx.await.expect("status captured")).expect("a valid status");

    reconcile_with(training(Some(running)), |mut h| async move {
        expect_list(&mut h, vec![running_pod(0), failed_pod(1, 137)]).await;
        expect_delete(&mut h, "fmnist-node-0").await;
        expect_delete(&mut h, "fmnist-node-1").await;
        let event = expect_event(&mut h, "PodFailed").await;
        assert_eq!(event["type"], "Warning");
        let note = event["note"].as_str().unwrap_or_default();
        assert!(
            note.contains("fmnist-node-1") && note.contains("137"),
            "{note}"
        );
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Restarting");
        assert_eq!(status["restarts"], 1);
        assert_eq!(status["attempt"], 1);
    })
    .await;
}

fn gang_training(gang: GangScheduler) -> SSLTraining {
    let mut t = training(None);
    t.spec.scheduling.gang = gang;
    t.spec.nodes.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".into(), Quantity("2".into()))])),
        ..ResourceRequirements::default()
    });
    t
}

fn pod_group_path(group_version: &str) -> String {
    format!("/apis/{group_version}/namespaces/{NS}/podgroups/{NAME}")
}

#[tokio::test]
async fn a_gang_applies_the_pod_group_before_any_pod() {
    reconcile_with(
        gang_training(GangScheduler::SchedulerPlugins),
        |mut h| async move {
            expect_list(&mut h, vec![]).await;
            // The first write of the reconcile is the PodGroup: nothing exists before it.
            let group = expect_apply(&mut h, pod_group_path("scheduling.x-k8s.io/v1alpha1")).await;
            assert_eq!(group["kind"], "PodGroup");
            assert_eq!(group["spec"]["minMember"], 2);
            assert_eq!(group["spec"]["minResources"], json!({"cpu": "4"}));
            assert_eq!(
                group["metadata"]["ownerReferences"][0]["kind"],
                "SSLTraining"
            );
            assert_eq!(group["metadata"]["ownerReferences"][0]["controller"], true);
            expect_apply(&mut h, format!("/api/v1/namespaces/{NS}/services/{NAME}")).await;
            expect_apply(
                &mut h,
                format!("/api/v1/namespaces/{NS}/configmaps/{NAME}-config"),
            )
            .await;
            for rank in 0..2 {
                let pod = expect_apply(
                    &mut h,
                    format!("/api/v1/namespaces/{NS}/pods/{NAME}-node-{rank}"),
                )
                .await;
                assert_eq!(
                    pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"],
                    NAME
                );
                assert_eq!(pod["spec"]["schedulerName"], "scheduler-plugins-scheduler");
            }
            expect_event(&mut h, "PodGroupApplied").await;
            expect_event(&mut h, "CreatedGroup").await;
            let status = expect_status_patch(&mut h).await;
            let conditions = status["conditions"].as_array().expect("conditions");
            assert!(
                conditions.iter().any(|c| c["type"] == "PodGroupCreated"
                    && c["status"] == "True"
                    && c["reason"] == "PodGroupApplied"),
                "{status}"
            );
        },
    )
    .await;
}

/// The PodGroup apply is refused with `code`: no other child is created, a Warning Event with
/// `reason` whose note contains `hints`, and PodGroupCreated=False.
async fn refused_pod_group_holds_the_pods(
    gang: GangScheduler,
    group_version: &'static str,
    code: u16,
    reason: &'static str,
    hints: &'static [&'static str],
) {
    reconcile_with(gang_training(gang), move |mut h| async move {
        expect_list(&mut h, vec![]).await;
        answer_with(
            &mut h,
            Expect {
                method: Method::PATCH,
                path: pod_group_path(group_version),
            },
            code,
            |_| {
                let reason = if code == 404 { "NotFound" } else { "Forbidden" };
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "refused by the scripted server", "reason": reason, "code": code})
            },
        )
        .await;
        // No Service, ConfigMap or pod: straight to the Event and the status.
        let event = expect_event(&mut h, reason).await;
        assert_eq!(event["type"], "Warning");
        let note = event["note"].as_str().unwrap_or("");
        for hint in hints {
            assert!(note.contains(hint), "{hint:?} in {note}");
        }
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Pending");
        let conditions = status["conditions"].as_array().expect("conditions");
        assert!(
            conditions.iter().any(|c| c["type"] == "PodGroupCreated"
                && c["status"] == "False"
                && c["reason"] == reason),
            "{status}"
        );
    })
    .await;
}

#[tokio::test]
async fn without_the_pod_group_crd_no_pod_is_created() {
    refused_pod_group_holds_the_pods(
        GangScheduler::Volcano,
        "scheduling.volcano.sh/v1beta1",
        404,
        "PodGroupUnavailable",
        &["podgroups.scheduling.volcano.sh", "install volcano"],
    )
    .await;
}

#[tokio::test]
async fn without_rights_on_pod_groups_no_pod_is_created() {
    refused_pod_group_holds_the_pods(
        GangScheduler::SchedulerPlugins,
        "scheduling.x-k8s.io/v1alpha1",
        403,
        "PodGroupForbidden",
        &[
            "gangScheduling.schedulerPlugins=true",
            "refused by the scripted server",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_group_restart_keeps_the_pod_group() {
    // Attempt 0 failed: the restart deletes pods only; the PodGroup is neither deleted nor touched.
    let mut t = gang_training(GangScheduler::SchedulerPlugins);
    t.status = Some(running_with_pod_group_recorded(true));
    reconcile_with(t, |mut h| async move {
        expect_list(&mut h, vec![failed_pod(0, 1), running_pod(1)]).await;
        expect_delete(&mut h, &format!("{NAME}-node-0")).await;
        expect_delete(&mut h, &format!("{NAME}-node-1")).await;
        expect_event(&mut h, "PodFailed").await;
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Restarting");
    })
    .await;
}

/// A Running status whose PodGroupCreated condition is there (`recorded`) or missing.
fn running_with_pod_group_recorded(recorded: bool) -> SSLTrainingStatus {
    let conditions = if recorded {
        json!([{"type": "PodGroupCreated", "status": "True", "reason": "PodGroupApplied",
                "message": "PodGroup exists", "lastTransitionTime": "2026-01-01T00:00:00Z"}])
    } else {
        json!([])
    };
    serde_json::from_value(json!({"phase": "Running", "conditions": conditions}))
        .expect("a valid status")
}

#[tokio::test]
async fn pods_without_a_recorded_pod_group_get_it_applied_and_recorded() {
    // The pass that created the pods could not write its status: the next one applies the
    // PodGroup again (idempotent) and records the condition, creating nothing else.
    let mut t = gang_training(GangScheduler::SchedulerPlugins);
    t.status = Some(running_with_pod_group_recorded(false));
    reconcile_with(t, |mut h| async move {
        expect_list(&mut h, vec![running_pod(0), running_pod(1)]).await;
        expect_apply(&mut h, pod_group_path("scheduling.x-k8s.io/v1alpha1")).await;
        expect_event(&mut h, "PodGroupApplied").await;
        let status = expect_status_patch(&mut h).await;
        let conditions = status["conditions"].as_array().expect("conditions");
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == "PodGroupCreated" && c["status"] == "True"),
            "{status}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_refused_event_does_not_stop_the_status_patch() {
    reconcile_with(training(None), |mut h| async move {
        expect_list(&mut h, vec![]).await;
        expect_apply(&mut h, format!("/api/v1/namespaces/{NS}/services/{NAME}")).await;
        expect_apply(
            &mut h,
            format!("/api/v1/namespaces/{NS}/configmaps/{NAME}-config"),
        )
        .await;
        for rank in 0..2 {
            expect_apply(
                &mut h,
                format!("/api/v1/namespaces/{NS}/pods/{NAME}-node-{rank}"),
            )
            .await;
        }
        answer_with(
            &mut h,
            Expect {
                method: Method::POST,
                path: format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
            },
            500,
            |_| {
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "etcd is busy", "reason": "InternalError", "code": 500})
            },
        )
        .await;
        let status = expect_status_patch(&mut h).await;
        assert_eq!(status["phase"], "Pending");
    })
    .await;
}
