//! Carrying out a [`Decision`](super::Decision): server-side apply of children with one field
//! manager, pod deletions, the resource's own deletion, status patches and Events.

use std::fmt::Debug;

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Service};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::decide::{Action, Note};
use super::MANAGER;
use crate::error::{Error, Result};

/// What a resource kind renders for one attempt of its group.
#[derive(Debug, Clone, PartialEq)]
pub struct Children {
    /// The headless Service giving each pod a stable DNS name.
    pub service: Service,
    /// The resolved config.
    pub config_map: ConfigMap,
    /// The pods of the requested node ranks.
    pub pods: Vec<Pod>,
}

/// API calls of the group lifecycle, in one namespace.
#[derive(Clone)]
pub struct GroupApi {
    client: Client,
    namespace: String,
}

impl GroupApi {
    /// Calls in `namespace` through `client`.
    pub fn new(client: Client, namespace: &str) -> Self {
        GroupApi {
            client,
            namespace: namespace.to_string(),
        }
    }

    /// The client the calls go through.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The namespace of the calls.
    pub(crate) fn namespace(&self) -> &str {
        &self.namespace
    }

    fn api<T: Resource<DynamicType = (), Scope = NamespaceResourceScope>>(&self) -> Api<T> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The pods matching a label selector.
    pub async fn list_pods(&self, selector: &str) -> Result<Vec<Pod>> {
        let list = self
            .api::<Pod>()
            .list(&ListParams::default().labels(selector))
            .await?;
        Ok(list.items)
    }

    /// Server-side apply (forced: this operator owns the children's fields).
    pub async fn apply<T>(&self, object: &T) -> Result<()>
    where
        T: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + Serialize
            + DeserializeOwned
            + Debug,
    {
        self.api::<T>()
            .patch(
                &object.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(object),
            )
            .await?;
        Ok(())
    }

    /// Deletes a pod; one already gone is fine.
    pub async fn delete_pod(&self, name: &str) -> Result<()> {
        match self
            .api::<Pod>()
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Carries out the actions in order; `render(attempt, ranks)` builds the children to create.
    pub async fn execute<K>(
        &self,
        owner: &K,
        actions: &[Action],
        render: impl Fn(i32, &[usize]) -> Result<Children>,
    ) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        for action in actions {
            match action {
                Action::CreatePods { attempt, ranks } => {
                    let children = render(*attempt, ranks)?;
                    self.apply(&children.service).await?;
                    self.apply(&children.config_map).await?;
                    for pod in &children.pods {
                        self.apply(pod).await?;
                    }
                }
                Action::DeletePods(names) => {
                    for name in names {
                        self.delete_pod(name).await?;
                    }
                }
                Action::DeleteResource => {
                    match self
                        .api::<K>()
                        .delete(&owner.name_any(), &DeleteParams::background())
                        .await
                    {
                        Ok(_) => {}
                        Err(kube::Error::Api(status)) if status.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the status subresource by server-side apply (the caller compares before calling).
    pub async fn patch_status<K, S>(&self, owner: &K, status: &S) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
        S: Serialize,
    {
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        self.api::<K>()
            .patch_status(
                &owner.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await?;
        Ok(())
    }
}

/// Emits one Event per note about `regarding`. A fresh recorder per call: the recorder folds
/// repeats of a reason into a series that keeps the first message, and restart messages differ.
pub async fn publish(client: &Client, regarding: &ObjectReference, notes: &[Note]) -> Result<()> {
    if notes.is_empty() {
        return Ok(());
    }
    let recorder = Recorder::new(client.clone(), MANAGER.into());
    for note in notes {
        let event = Event {
            type_: if note.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: note.reason.into(),
            note: Some(truncate(&note.message, 1000)),
            action: note.action.into(),
            secondary: None,
        };
        // Events are best effort, as for Kubernetes' own controllers: failing the reconcile here
        // would skip the status patch after children were already created.
        if let Err(error) = recorder.publish(&event, regarding).await {
            tracing::warn!(%error, reason = note.reason, "could not record an Event");
        }
    }
    Ok(())
}

/// Events hold at most 1 kB of message.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// `namespace/name` of an object, for errors and logs.
pub fn object_key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

/// The namespace of a namespaced object, or an error naming it.
pub fn namespace_of<K: Resource>(object: &K) -> Result<String> {
    object.namespace().ok_or_else(|| Error::MissingField {
        object: object_key(object),
        field: "metadata.namespace",
    })
}
