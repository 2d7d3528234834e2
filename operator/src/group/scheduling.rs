//! Gang scheduling: the PodGroup a gang scheduler (scheduler-plugins' coscheduling, volcano) admits
//! as a whole, and what a pod needs to join it. The PodGroup is applied before any pod of the group
//! and pods are created only once the API server has returned it; without the PodGroup CRD the
//! group waits with a condition saying what to install.
//!
//! Generic over the resource kind: the caller passes the PodGroup's metadata (named like the
//! resource, its labels, a controller owner reference so the garbage collector deletes it with the
//! resource), its node group and its `spec.scheduling`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{json, Map};
use vissl_crds::api::{ConditionStatus, GangScheduler, NodeGroupSpec, SchedulingSpec};

use super::decide::{normal, set_condition, warning, Action, Decision, Observed};
use super::{reasons, GroupApi, MANAGER};
use crate::error::Result;

/// schedulerName of scheduler-plugins' second scheduler as its Helm chart installs it.
pub const SCHEDULER_PLUGINS_SCHEDULER: &str = "scheduler-plugins-scheduler";
/// schedulerName of volcano's scheduler.
pub const VOLCANO_SCHEDULER: &str = "volcano";
/// The pod label naming the scheduler-plugins PodGroup a pod belongs to.
pub const POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// The pod annotation naming the volcano PodGroup a pod belongs to.
pub const VOLCANO_GROUP_ANNOTATION: &str = "scheduling.k8s.io/group-name";

/// How soon to look again while the PodGroup CRD is missing (installing a CRD triggers no watch
/// event on the resource).
const RETRY_UNAVAILABLE: Duration = Duration::from_secs(30);

/// The PodGroup API of a gang scheduler, and how to install it.
struct GangApi {
    group: &'static str,
    version: &'static str,
    default_scheduler: &'static str,
    install: &'static str,
    /// The vissl-operator chart value that grants the operator this API.
    chart_value: &'static str,
}

fn gang_api(scheduler: GangScheduler) -> Option<GangApi> {
    match scheduler {
        GangScheduler::None => None,
        GangScheduler::SchedulerPlugins => Some(GangApi {
            group: "scheduling.x-k8s.io",
            version: "v1alpha1",
            default_scheduler: SCHEDULER_PLUGINS_SCHEDULER,
            install: "install scheduler-plugins as a second scheduler (its Helm chart \
                      as-a-second-scheduler installs the CRD and scheduler-plugins-scheduler)",
            chart_value: "gangScheduling.schedulerPlugins",
        }),
        GangScheduler::Volcano => Some(GangApi {
            group: "scheduling.volcano.sh",
            version: "v1beta1",
            default_scheduler: VOLCANO_SCHEDULER,
            install: "install volcano (its Helm chart installs the CRDs and the volcano scheduler)",
            chart_value: "gangScheduling.volcano",
        }),
    }
}

/// The gang of one group: its PodGroup and the scheduler its pods name.
#[derive(Debug, Clone, PartialEq)]
pub struct Gang {
    scheduler: GangScheduler,
    scheduler_name: String,
    resource: ApiResource,
    pod_group: DynamicObject,
}

impl Gang {
    /// The gang of a group, or None when `scheduling.gang` is None. An error is a message naming
    /// the spec field that makes the PodGroup impossible (an unreadable resource quantity).
    pub fn plan(
        meta: ObjectMeta,
        nodes: &NodeGroupSpec,
        scheduling: &SchedulingSpec,
    ) -> Result<Option<Gang>, String> {
        let Some(api) = gang_api(scheduling.gang) else {
            return Ok(None);
        };
        let resource = ApiResource {
            group: api.group.into(),
            version: api.version.into(),
            api_version: format!("{}/{}", api.group, api.version),
            kind: "PodGroup".into(),
            plural: "podgroups".into(),
        };
        let mut spec = Map::new();
        spec.insert("minMember".into(), json!(nodes.num_nodes));
        let min_resources = min_resources(nodes, scheduling)?;
        if !min_resources.is_empty() {
            spec.insert("minResources".into(), json!(min_resources));
        }
        match scheduling.gang {
            GangScheduler::SchedulerPlugins => {
                if let Some(timeout) = scheduling.schedule_timeout_seconds {
                    spec.insert("scheduleTimeoutSeconds".into(), json!(timeout));
                }
            }
            GangScheduler::Volcano => {
                if let Some(queue) = &scheduling.queue {
                    spec.insert("queue".into(), json!(queue));
                }
                // Volcano orders and preempts whole groups by the group's priority.
                if let Some(priority) = &nodes.priority_class_name {
                    spec.insert("priorityClassName".into(), json!(priority));
                }
            }
            GangScheduler::None => {}
        }
        let mut pod_group = DynamicObject::new("", &resource).data(json!({ "spec": spec }));
        pod_group.metadata = meta;
        Ok(Some(Gang {
            scheduler: scheduling.gang,
            scheduler_name: scheduling
                .scheduler_name
                .clone()
                .unwrap_or_else(|| api.default_scheduler.to_string()),
            resource,
            pod_group,
        }))
    }

    /// The PodGroup to apply.
    pub fn pod_group(&self) -> &DynamicObject {
        &self.pod_group
    }

    /// Its API resource (group, version, plural).
    pub fn api_resource(&self) -> &ApiResource {
        &self.resource
    }

    /// The schedulerName its pods get.
    pub fn scheduler_name(&self) -> &str {
        &self.scheduler_name
    }

    /// The name of the PodGroup's CustomResourceDefinition, `podgroups.<group>`.
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.resource.plural, self.resource.group)
    }

    /// Makes a pod of the group join the PodGroup: its scheduler, and the label (scheduler-plugins)
    /// or annotation (volcano) naming the group.
    pub fn join(&self, pod: &mut Pod) {
        let group = self.pod_group.metadata.name.clone().unwrap_or_default();
        match self.scheduler {
            GangScheduler::SchedulerPlugins => {
                pod.metadata
                    .labels
                    .get_or_insert_with(BTreeMap::new)
                    .insert(POD_GROUP_LABEL.into(), group);
            }
            GangScheduler::Volcano => {
                pod.metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(VOLCANO_GROUP_ANNOTATION.into(), group);
            }
            GangScheduler::None => return,
        }
        pod.spec.get_or_insert_with(Default::default).scheduler_name =
            Some(self.scheduler_name.clone());
    }

    /// Why no pods can be created while the PodGroup API is missing, and what to do.
    fn unavailable_message(&self) -> String {
        let install = gang_api(self.scheduler).map_or("", |api| api.install);
        format!(
            "spec.scheduling.gang is {} but the API server does not serve {} PodGroups (CRD {} is \
             not installed): {install}, or set spec.scheduling.gang to None. No pods are created \
             until the PodGroup exists.",
            self.scheduler.as_str(),
            self.resource.api_version,
            self.crd_name()
        )
    }

    /// Why no pods can be created while the operator may not create PodGroups, and what to do.
    fn forbidden_message(&self, refusal: &str) -> String {
        let value = gang_api(self.scheduler).map_or("", |api| api.chart_value);
        format!(
            "spec.scheduling.gang is {} but the operator may not create {} PodGroups ({refusal}): \
             install the vissl-operator chart with {value}=true. No pods are created until the \
             PodGroup exists.",
            self.scheduler.as_str(),
            self.resource.api_version,
        )
    }
}

/// The group's minimum resources: `scheduling.minResources` when given, else numNodes times one
/// pod's requests (a limit stands in for a missing request, as Kubernetes defaults it).
fn min_resources(
    nodes: &NodeGroupSpec,
    scheduling: &SchedulingSpec,
) -> Result<BTreeMap<String, Quantity>, String> {
    if let Some(given) = &scheduling.min_resources {
        return Ok(given.clone());
    }
    let Some(resources) = &nodes.resources else {
        return Ok(BTreeMap::new());
    };
    let mut per_pod: BTreeMap<String, (&str, &Quantity)> = BTreeMap::new();
    for (name, quantity) in resources.limits.iter().flatten() {
        per_pod.insert(name.clone(), ("limits", quantity));
    }
    for (name, quantity) in resources.requests.iter().flatten() {
        per_pod.insert(name.clone(), ("requests", quantity));
    }
    per_pod
        .into_iter()
        .map(|(name, (field, quantity))| {
            times(&quantity.0, nodes.num_nodes)
                .map(|total| (name.clone(), Quantity(total)))
                .map_err(|e| format!("spec.resources.{field}.{name}: {e}"))
        })
        .collect()
}

/// `n` times a Kubernetes quantity, exactly, in the quantity's own suffix ("500m" x 2 = "1000m",
/// "1.5Gi" x 2 = "3Gi").
fn times(quantity: &str, n: i32) -> Result<String, String> {
    let invalid = || format!("'{quantity}' is not a Kubernetes quantity");
    let split = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(split);
    if !is_quantity_suffix(suffix) {
        return Err(invalid());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid());
    }
    let digits: u128 = format!("{whole}{fraction}")
        .parse()
        .map_err(|_| invalid())?;
    let factor = u128::try_from(n).map_err(|_| format!("cannot multiply by {n}"))?;
    let product = digits
        .checked_mul(factor)
        .ok_or_else(|| format!("'{quantity}' x {n} is too large"))?;
    let mut text = format!("{product:0>width$}", width = fraction.len() + 1);
    if !fraction.is_empty() {
        text.insert(text.len() - fraction.len(), '.');
        let trimmed = text.trim_end_matches('0').trim_end_matches('.').len();
        text.truncate(trimmed);
    }
    Ok(format!("{text}{suffix}"))
}

/// Kubernetes' decimal SI, binary SI and decimal exponent suffixes.
fn is_quantity_suffix(suffix: &str) -> bool {
    const NAMED: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    if NAMED.contains(&suffix) {
        return true;
    }
    let Some(exponent) = suffix.strip_prefix(['e', 'E']) else {
        return false;
    };
    let digits = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit())
}

/// Holds the group's pods back because the PodGroup cannot be created: no pod creation, the
/// PodGroupCreated condition False with `reason` and what to do, a Warning Event when that is
/// news, and a later look.
pub fn hold_for_pod_group(
    decision: &mut Decision,
    obs: &Observed,
    reason: &'static str,
    message: &str,
) {
    decision
        .actions
        .retain(|a| !matches!(a, Action::CreatePods { .. }));
    decision
        .notes
        .retain(|n| n.reason != reasons::CREATED_GROUP);
    let news = decision
        .status
        .condition(reasons::POD_GROUP_CREATED)
        .is_none_or(|c| c.reason != reason || c.message != message);
    set_condition(
        &mut decision.status,
        obs,
        reasons::POD_GROUP_CREATED,
        ConditionStatus::False,
        reason,
        message,
    );
    if news {
        decision
            .notes
            .push(warning(reason, "CreatePodGroup", message.to_string()));
    }
    decision.requeue_after = Some(
        decision
            .requeue_after
            .map_or(RETRY_UNAVAILABLE, |d| d.min(RETRY_UNAVAILABLE)),
    );
}

/// Records that the PodGroup exists: PodGroupCreated True, and a Normal Event the first time.
fn pod_group_created(decision: &mut Decision, obs: &Observed, gang: &Gang) {
    let already = decision
        .status
        .condition(reasons::POD_GROUP_CREATED)
        .is_some_and(|c| c.status == ConditionStatus::True);
    let message = format!(
        "PodGroup {} ({}) exists; the pods use scheduler {}",
        gang.pod_group.metadata.name.as_deref().unwrap_or_default(),
        gang.resource.api_version,
        gang.scheduler_name
    );
    set_condition(
        &mut decision.status,
        obs,
        reasons::POD_GROUP_CREATED,
        ConditionStatus::True,
        reasons::POD_GROUP_APPLIED,
        &message,
    );
    if !already {
        decision.notes.insert(
            0,
            normal(reasons::POD_GROUP_APPLIED, "CreatePodGroup", message),
        );
    }
}

impl GroupApi {
    /// Before a decision that creates pods is carried out: applies the group's PodGroup, and
    /// holds the pods back (see [`hold_for_pod_group`]) when its API is not served; also when pods
    /// exist but the status lacks PodGroupCreated=True. Otherwise, or without a gang, nothing happens.
    pub async fn prepare_gang(
        &self,
        gang: Option<&Gang>,
        obs: &Observed<'_>,
        decision: &mut Decision,
    ) -> Result<()> {
        let Some(gang) = gang else {
            return Ok(());
        };
        let creates = decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::CreatePods { .. }));
        // Pods exist but the status does not say their PodGroup does (the pass that created them
        // could not write the status): apply it again (idempotent) so the condition is recorded.
        let unrecorded = !obs.pods.is_empty()
            && decision
                .status
                .condition(reasons::POD_GROUP_CREATED)
                .is_none_or(|c| c.status != ConditionStatus::True);
        if !creates && !unrecorded {
            return Ok(());
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client().clone(), self.namespace(), &gang.resource);
        let name = gang.pod_group.metadata.name.clone().unwrap_or_default();
        match api
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&gang.pod_group),
            )
            .await
        {
            Ok(_) => pod_group_created(decision, obs, gang),
            // An apply creates a missing object, so 404 means the resource type itself is unknown.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                let message = gang.unavailable_message();
                hold_for_pod_group(decision, obs, reasons::POD_GROUP_UNAVAILABLE, &message);
            }
            Err(kube::Error::Api(status)) if status.code == 403 => {
                let message = gang.forbidden_message(&status.message);
                hold_for_pod_group(decision, obs, reasons::POD_GROUP_FORBIDDEN, &message);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::jiff::Timestamp;
    use vissl_crds::api::{GroupStatus, RunPolicy};

    use super::*;
    use crate::group::decide;

    fn meta() -> ObjectMeta {
        ObjectMeta {
            name: Some("sim".into()),
            namespace: Some("ml".into()),
            labels: Some(BTreeMap::from([("vissl.rs/training".into(), "sim".into())])),
            ..ObjectMeta::default()
        }
    }

    fn nodes(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> NodeGroupSpec {
        let list = |items: &[(&str, &str)]| {
            (!items.is_empty()).then(|| {
                items
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect()
            })
        };
        NodeGroupSpec {
            num_nodes: 3,
            resources: Some(ResourceRequirements {
                requests: list(requests),
                limits: list(limits),
                ..ResourceRequirements::default()
            }),
            ..NodeGroupSpec::default()
        }
    }

    fn plan(nodes: &NodeGroupSpec, scheduling: SchedulingSpec) -> Gang {
        Gang::plan(meta(), nodes, &scheduling)
            .expect("a valid spec")
            .expect("a gang")
    }

    #[test]
    fn no_gang_means_no_pod_group() {
        let nodes = nodes(&[("cpu", "1")], &[]);
        assert_eq!(
            Gang::plan(meta(), &nodes, &SchedulingSpec::default()),
            Ok(None)
        );
    }

    #[test]
    fn scheduler_plugins_pod_group() {
        let nodes = nodes(
            &[("cpu", "1500m"), ("memory", "1.5Gi")],
            &[("memory", "2Gi"), ("nvidia.com/gpu", "8")],
        );
        let gang = plan(
            &nodes,
            SchedulingSpec {
                gang: GangScheduler::SchedulerPlugins,
                schedule_timeout_seconds: Some(120),
                ..SchedulingSpec::default()
            },
        );
        let group = serde_json::to_value(gang.pod_group()).expect("JSON");
        assert_eq!(
            group,
            json!({
                "apiVersion": "scheduling.x-k8s.io/v1alpha1",
                "kind": "PodGroup",
                "metadata": {"name": "sim", "namespace": "ml", "labels": {"vissl.rs/training": "sim"}},
                "spec": {
                    "minMember": 3,
                    "minResources": {"cpu": "4500m", "memory": "4.5Gi", "nvidia.com/gpu": "24"},
                    "scheduleTimeoutSeconds": 120,
                },
            })
        );
        assert_eq!(gang.crd_name(), "podgroups.scheduling.x-k8s.io");
        assert_eq!(gang.api_resource().plural, "podgroups");
        assert_eq!(gang.scheduler_name(), "scheduler-plugins-scheduler");
    }

    #[test]
    fn volcano_pod_group_with_queue_priority_and_given_resources() {
        let mut nodes = nodes(&[("cpu", "2")], &[]);
        nodes.priority_class_name = Some("high".into());
        let gang = plan(
            &nodes,
            SchedulingSpec {
                gang: GangScheduler::Volcano,
                queue: Some("research".into()),
                scheduler_name: Some("volcano-2".into()),
                min_resources: Some(BTreeMap::from([("cpu".into(), Quantity("5".into()))])),
                ..SchedulingSpec::default()
            },
        );
        let group = serde_json::to_value(gang.pod_group()).expect("JSON");
        assert_eq!(group["apiVersion"], "scheduling.volcano.sh/v1beta1");
        assert_eq!(
            group["spec"],
            json!({"minMember": 3, "minResources": {"cpu": "5"}, "queue": "research",
                   "priorityClassName": "high"})
        );
        assert_eq!(gang.crd_name(), "podgroups.scheduling.volcano.sh");
        assert_eq!(gang.scheduler_name(), "volcano-2");
    }

    #[test]
    fn no_resources_no_min_resources() {
        let nodes = NodeGroupSpec {
            num_nodes: 2,
            ..NodeGroupSpec::default()
        };
        let gang = plan(
            &nodes,
            SchedulingSpec {
                gang: GangScheduler::Volcano,
                ..SchedulingSpec::default()
            },
        );
        let group = serde_json::to_value(gang.pod_group()).expect("JSON");
        assert_eq!(group["spec"], json!({"minMember": 2}));
        assert_eq!(gang.scheduler_name(), "volcano");
    }

    #[test]
    fn a_bad_quantity_names_the_field() {
        let nodes = nodes(&[("cpu", "two")], &[]);
        let error = Gang::plan(
            meta(),
            &nodes,
            &SchedulingSpec {
                gang: GangScheduler::SchedulerPlugins,
                ..SchedulingSpec::default()
            },
        )
        .expect_err("an unreadable quantity");
        assert_eq!(
            error,
            "spec.resources.requests.cpu: 'two' is not a Kubernetes quantity"
        );
    }

    #[test]
    fn quantities_multiply_exactly_in_their_suffix() {
        for (quantity, n, want) in [
            ("1", 4, "4"),
            ("500m", 2, "1000m"),
            ("0.5", 2, "1"),
            ("0.25", 3, "0.75"),
            ("1.5Gi", 2, "3Gi"),
            (".5", 3, "1.5"),
            ("1e3", 2, "2e3"),
            ("128974848", 2, "257949696"),
            ("2E-2", 5, "10E-2"),
        ] {
            assert_eq!(times(quantity, n).as_deref(), Ok(want), "{quantity} x {n}");
        }
        for bad in ["", ".", "1.2.3", "-1", "1Q", "1e", "1x3"] {
            assert!(times(bad, 2).is_err(), "{bad:?} is not a quantity");
        }
    }

    #[test]
    fn pods_join_their_group() {
        let nodes = nodes(&[], &[]);
        let mut pod = Pod::default();
        plan(
            &nodes,
            SchedulingSpec {
                gang: GangScheduler::SchedulerPlugins,
                ..SchedulingSpec::default()
            },
        )
        .join(&mut pod);
        assert_eq!(
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(POD_GROUP_LABEL)),
            Some(&"sim".to_string())
        );
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()),
            Some("scheduler-plugins-scheduler")
        );
        assert_eq!(pod.metadata.annotations, None);

        let mut pod = Pod::default();
        plan(
            &nodes,
            SchedulingSpec {
                gang: GangScheduler::Volcano,
                ..SchedulingSpec::default()
            },
        )
        .join(&mut pod);
        assert_eq!(
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(VOLCANO_GROUP_ANNOTATION)),
            Some(&"sim".to_string())
        );
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()),
            Some("volcano")
        );
        assert_eq!(pod.metadata.labels, None);
    }

    #[test]
    fn holding_drops_pod_creation_and_reports_once() {
        let policy = RunPolicy::default();
        let status = GroupStatus::default();
        let obs = Observed {
            generation: Some(1),
            num_nodes: 2,
            policy: &policy,
            spec_error: None,
            status: &status,
            pods: &[],
            now: Timestamp::UNIX_EPOCH,
        };
        let mut decision = decide(&obs);
        assert!(
            decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::CreatePods { .. })),
            "a fresh group creates pods: {decision:?}"
        );
        hold_for_pod_group(
            &mut decision,
            &obs,
            reasons::POD_GROUP_UNAVAILABLE,
            "install it",
        );
        assert_eq!(decision.actions, vec![]);
        assert_eq!(decision.requeue_after, Some(RETRY_UNAVAILABLE));
        let condition = decision
            .status
            .condition(reasons::POD_GROUP_CREATED)
            .expect("a PodGroupCreated condition");
        assert_eq!(
            (
                condition.status,
                condition.reason.as_str(),
                condition.message.as_str()
            ),
            (ConditionStatus::False, "PodGroupUnavailable", "install it")
        );
        let reported: Vec<_> = decision
            .notes
            .iter()
            .map(|n| (n.reason, n.warning))
            .collect();
        assert_eq!(reported, vec![("PodGroupUnavailable", true)]);

        // The next pass still cannot create the group: same condition, no second Event.
        let held = decision.status.clone();
        let obs = Observed {
            status: &held,
            ..obs
        };
        let mut again = decide(&obs);
        hold_for_pod_group(
            &mut again,
            &obs,
            reasons::POD_GROUP_UNAVAILABLE,
            "install it",
        );
        assert_eq!(again.notes, vec![]);
        assert_eq!(again.actions, vec![]);

        // A different obstacle is news again.
        let mut forbidden = decide(&obs);
        hold_for_pod_group(
            &mut forbidden,
            &obs,
            reasons::POD_GROUP_FORBIDDEN,
            "grant it",
        );
        let reported: Vec<_> = forbidden.notes.iter().map(|n| n.reason).collect();
        assert_eq!(reported, vec!["PodGroupForbidden"]);
    }
}
