//! Cluster targets: where the agent applies its snapshots. One trait, two implementations:
//! `kubernetes::KubernetesTarget` (feature `kubernetes`: a Kubernetes API through kube-rs: kubeconfig, in-cluster
//! service account, or k3s's `/etc/rancher/k3s/k3s.yaml`) and [`memory::MemoryTarget`] (a map,
//! for simulations of whole fleets).

#[cfg(feature = "kubernetes")]
pub mod kubernetes;
pub mod memory;

/// Where the cluster's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    /// `KUBECONFIG`, then the in-cluster service account, then k3s's kubeconfig, then
    /// `~/.kube/config`.
    Auto,
    /// A kubeconfig file (and optionally one of its contexts).
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// The context; the file's current context when `None`.
        context: Option<String>,
    },
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
}

use std::future::Future;

use serde_json::Value;

/// The label that marks objects the agent created, with the bundle's name as value. The agent
/// deletes only objects that carry it.
pub const BUNDLE_LABEL: &str = "outpost.io/bundle";

/// `(group, version)` of an apiVersion: `apps/v1` → (`apps`, `v1`), `v1` → (``, `v1`).
pub fn group_version(api_version: &str) -> (&str, &str) {
    api_version.rsplit_once('/').unwrap_or(("", api_version))
}

/// Who an object is in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// `apps/v1`, `v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// Empty for cluster-scoped objects (and for namespaced objects before the target resolved
    /// the default namespace).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// The reference of an object value; `None` without apiVersion, kind or name.
    pub fn of(object: &Value) -> Option<ObjectRef> {
        Some(ObjectRef {
            api_version: object["apiVersion"].as_str()?.to_owned(),
            kind: object["kind"].as_str()?.to_owned(),
            namespace: object["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            name: object["metadata"]["name"].as_str()?.to_owned(),
        })
    }

    /// The API group (`""` for core).
    pub fn group(&self) -> &str {
        group_version(&self.api_version).0
    }

    /// Identity across API versions: (group, kind, namespace, name).
    pub fn identity(&self) -> (String, String, String, String) {
        (
            self.group().to_owned(),
            self.kind.clone(),
            self.namespace.clone(),
            self.name.clone(),
        )
    }

    /// Apply order rank, as in the snapshot body: Namespaces, CRDs, the rest.
    pub fn rank(&self) -> u8 {
        match (self.group(), self.kind.as_str()) {
            ("", "Namespace") => 0,
            ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
            _ => 2,
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// What went wrong talking to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The API cannot be reached (connection refused, timeouts, 5xx): retry the whole pass.
    #[error("cluster API unreachable: {0}")]
    Unreachable(String),
    /// Another field manager owns a field with a different value (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The cluster does not serve this kind (is its CRD installed?).
    #[error("the cluster does not serve {0} (is its CustomResourceDefinition installed?)")]
    UnknownKind(String),
    /// The object or something it needs (its namespace) does not exist (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The API refused the object (400, 422).
    #[error("invalid: {0}")]
    Invalid(String),
    /// Authentication or authorisation failed (401, 403).
    #[error("forbidden: {0} (check the agent's credentials and RBAC)")]
    Forbidden(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A cluster the agent reconciles. Every method is one API round trip or a few.
pub trait ClusterTarget: Send + Sync + 'static {
    /// The object's reference with its namespace resolved: the default namespace for a
    /// namespaced kind without one, none for a cluster-scoped kind.
    fn resolve(
        &self,
        object: &Value,
    ) -> impl Future<Output = Result<ObjectRef, TargetError>> + Send;

    /// Server-side apply of `object` with `field_manager`; returns the live object. With
    /// `dry_run` (`dryRun=All`) nothing is written and the answer is the object as the apply
    /// would leave it.
    fn apply(
        &self,
        object: &Value,
        field_manager: &str,
        force: bool,
        dry_run: bool,
    ) -> impl Future<Output = Result<Value, TargetError>> + Send;

    /// The live object, or `None`.
    fn get(
        &self,
        object: &ObjectRef,
    ) -> impl Future<Output = Result<Option<Value>, TargetError>> + Send;

    /// Every object of a kind, in all namespaces, whose labels match `selector`. Items carry
    /// apiVersion and kind.
    fn list(
        &self,
        api_version: &str,
        kind: &str,
        selector: &str,
    ) -> impl Future<Output = Result<Vec<Value>, TargetError>> + Send;

    /// Deletes the object if it is still the one `read` describes (its uid and
    /// resourceVersion, as a `get` returned it: someone may have deleted and re-created it, or
    /// changed it, since); `false` if it was already gone, [`TargetError::Conflict`] if it is
    /// no longer that object.
    fn delete(
        &self,
        object: &ObjectRef,
        read: &Value,
    ) -> impl Future<Output = Result<bool, TargetError>> + Send;

    /// Forgets cached API discovery (after a CRD was established).
    fn refresh(&self) -> impl Future<Output = Result<(), TargetError>> + Send;
}
