//! The Kubernetes API test server: a real HTTP server that kube-rs (and so the agent) talks to,
//! because no Kubernetes API server can run on the machines this project is built on.
//!
//! It follows the documented API where the agent depends on it:
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/{group}`, `/apis/{group}/{version}`
//!   (the legacy, non-aggregated documents), with namespaced and cluster-scoped kinds;
//! - CustomResourceDefinitions: applying one adds its resources to discovery once it is
//!   Established (after [`ServerOptions::crd_establish_delay`]), deleting it removes them and
//!   their objects; the CRD's name must be `<plural>.<group>` (422 otherwise);
//! - server-side apply (`PATCH` with `application/apply-patch+yaml`, `fieldManager`, `force`)
//!   with field ownership in `managedFields` and 409 conflicts (see [`fields`]); merge patches
//!   and `PUT` as updates (optimistic concurrency on `resourceVersion`); `POST` create (409 when
//!   it exists); the `status` subresource; `dryRun=All`;
//! - `GET`, `LIST` with `labelSelector` (namespaced or across namespaces), `DELETE` (with
//!   `DeleteOptions.preconditions` on uid and resourceVersion: 409 when they no longer hold);
//! - `metadata.resourceVersion` (one counter for the cluster, bumped only by real changes),
//!   `generation` (bumped when anything but metadata and status changes), `uid`,
//!   `creationTimestamp`;
//! - errors as `Status` objects: 404 NotFound (also for a missing namespace), 409 AlreadyExists
//!   or Conflict, 422 Invalid (names, label values), 400 BadRequest, 401 without the token,
//!   415 for JSON patches.
//!
//! With [`ServerOptions::controllers`] a stand-in for the controller manager marks workloads
//! (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job) available or complete after each spec
//! change; tests that drive health themselves turn it off and write `status`.
//! What it does not model is listed in `docs/kube-test-server.md`.

pub mod fields;
pub mod selector;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use serde_json::{Value, json};

use fields::{ManagedEntry, Scope};
use selector::Selector;

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Mark workloads ready/complete after each spec change, as controllers would.
    pub controllers: bool,
    /// Time from applying a CRD until it is Established and its resources are served.
    pub crd_establish_delay: Duration,
    /// Bearer token every request must carry (`None`: no authentication).
    pub token: Option<String>,
    /// Images this cluster's nodes cannot pull: a Deployment using one never becomes available
    /// and its Progressing condition turns False with `ProgressDeadlineExceeded`, as a real
    /// one does once its progress deadline passes in `ImagePullBackOff`.
    pub unpullable_images: Vec<String>,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            controllers: true,
            crd_establish_delay: Duration::from_millis(50),
            token: Some("outpost-test-token".to_owned()),
            unpullable_images: Vec::new(),
        }
    }
}

/// A served resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResourceType {
    group: String,
    version: String,
    kind: String,
    plural: String,
    namespaced: bool,
    status: bool,
    /// The CRD that defines it.
    crd: Option<String>,
    /// A CRD's `spec.names.shortNames`.
    short_names: Vec<String>,
}

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, as error messages name it.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// (group, plural, namespace, name).
type Key = (String, String, String, String);

#[derive(Debug, Clone)]
struct Stored {
    object: Value,
    managers: Vec<ManagedEntry>,
}

#[derive(Debug)]
struct Cluster {
    types: Vec<ResourceType>,
    objects: BTreeMap<Key, Stored>,
    revision: u64,
    uids: u64,
    pending_crds: Vec<(String, Instant)>,
}

/// (namespaced, has status)
const BUILT_IN: &[(&str, &str, &str, &str, bool, bool)] = &[
    ("", "v1", "Namespace", "namespaces", false, true),
    ("", "v1", "ConfigMap", "configmaps", true, false),
    ("", "v1", "Secret", "secrets", true, false),
    ("", "v1", "Service", "services", true, true),
    ("", "v1", "ServiceAccount", "serviceaccounts", true, false),
    ("", "v1", "Pod", "pods", true, true),
    (
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        true,
        true,
    ),
    (
        "",
        "v1",
        "PersistentVolume",
        "persistentvolumes",
        false,
        true,
    ),
    ("", "v1", "Endpoints", "endpoints", true, false),
    ("", "v1", "LimitRange", "limitranges", true, false),
    ("", "v1", "ResourceQuota", "resourcequotas", true, true),
    ("", "v1", "Node", "nodes", false, true),
    ("apps", "v1", "Deployment", "deployments", true, true),
    ("apps", "v1", "StatefulSet", "statefulsets", true, true),
    ("apps", "v1", "DaemonSet", "daemonsets", true, true),
    ("apps", "v1", "ReplicaSet", "replicasets", true, true),
    ("batch", "v1", "Job", "jobs", true, true),
    ("batch", "v1", "CronJob", "cronjobs", true, true),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        true,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        true,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
        false,
    ),
    (
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        true,
        true,
    ),
    (
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
        false,
    ),
    (
        "networking.k8s.io",
        "v1",
        "IngressClass",
        "ingressclasses",
        false,
        false,
    ),
    (
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        true,
        true,
    ),
    (
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        true,
        true,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        true,
    ),
    (
        "apiregistration.k8s.io",
        "v1",
        "APIService",
        "apiservices",
        false,
        true,
    ),
    (
        "storage.k8s.io",
        "v1",
        "StorageClass",
        "storageclasses",
        false,
        false,
    ),
    (
        "scheduling.k8s.io",
        "v1",
        "PriorityClass",
        "priorityclasses",
        false,
        false,
    ),
    ("coordination.k8s.io", "v1", "Lease", "leases", true, false),
    (
        "admissionregistration.k8s.io",
        "v1",
        "ValidatingWebhookConfiguration",
        "validatingwebhookconfigurations",
        false,
        false,
    ),
    (
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
        "mutatingwebhookconfigurations",
        false,
        false,
    ),
    (
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        true,
        false,
    ),
];

/// An API error as the server sends it.
#[derive(Debug)]
struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
    details: Value,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    fn not_found(kind: &ResourceType, name: &str) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", kind.qualified()),
        );
        error.details = json!({"name": name, "group": kind.group, "kind": kind.plural});
        error
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn invalid(kind: &ResourceType, name: &str, field: &str, message: String) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            format!(
                "{}.{} \"{name}\" is invalid: {field}: {message}",
                kind.kind, kind.group
            )
            .replace(". \"", " \""),
        );
        error.details = json!({"name": name, "group": kind.group, "kind": kind.kind,
            "causes": [{"reason": "FieldValueInvalid", "message": message, "field": field}]});
        error
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code.as_u16(),
        });
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }
}

type Reply = Result<(StatusCode, Value), ApiError>;

fn ok(value: Value) -> Reply {
    Ok((StatusCode::OK, value))
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn now_text() -> String {
    rfc3339(crate::harness::unix_now())
}

fn valid_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn valid_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    prefix.is_none_or(valid_subdomain) && !name.is_empty() && valid_label_value(name)
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        for key in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(key);
        }
    }
    object
}

/// A parsed request.
#[derive(Debug)]
struct Request {
    method: Method,
    segments: Vec<String>,
    query: HashMap<String, String>,
    content_type: String,
    /// The client asks for a `meta.k8s.io` Table (as `kubectl get` does).
    wants_table: bool,
    body: Bytes,
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        index += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where a resource request points.
#[derive(Debug)]
struct Target {
    kind: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Cluster {
    fn new() -> Cluster {
        let types = BUILT_IN
            .iter()
            .map(
                |&(group, version, kind, plural, namespaced, status)| ResourceType {
                    group: group.to_owned(),
                    version: version.to_owned(),
                    kind: kind.to_owned(),
                    plural: plural.to_owned(),
                    namespaced,
                    status,
                    crd: None,
                    short_names: Vec::new(),
                },
            )
            .collect();
        let mut cluster = Cluster {
            types,
            objects: BTreeMap::new(),
            revision: 1,
            uids: 0,
            pending_crds: Vec::new(),
        };
        for namespace in ["default", "kube-system", "kube-public"] {
            let kind = cluster.types[0].clone();
            let object = json!({"metadata": {"name": namespace}});
            cluster.store_new(&kind, "", namespace, object, Vec::new());
        }
        cluster
    }

    fn next_revision(&mut self) -> String {
        self.revision += 1;
        self.revision.to_string()
    }

    fn key(kind: &ResourceType, namespace: &str, name: &str) -> Key {
        (
            kind.group.clone(),
            kind.plural.clone(),
            namespace.to_owned(),
            name.to_owned(),
        )
    }

    fn store_new(
        &mut self,
        kind: &ResourceType,
        namespace: &str,
        name: &str,
        mut object: Value,
        managers: Vec<ManagedEntry>,
    ) {
        self.uids += 1;
        let revision = self.next_revision();
        let metadata = &mut object["metadata"];
        metadata["name"] = json!(name);
        if kind.namespaced {
            metadata["namespace"] = json!(namespace);
        }
        metadata["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uids));
        metadata["resourceVersion"] = json!(revision);
        metadata["generation"] = json!(1);
        metadata["creationTimestamp"] = json!(now_text());
        if kind.kind == "Namespace" {
            object["status"] = json!({"phase": "Active"});
        }
        self.objects.insert(
            Cluster::key(kind, namespace, name),
            Stored { object, managers },
        );
    }

    fn render(&self, kind: &ResourceType, stored: &Stored) -> Value {
        let mut object = stored.object.clone();
        if let Some(map) = object.as_object_mut() {
            map.insert("apiVersion".to_owned(), json!(kind.api_version()));
            map.insert("kind".to_owned(), json!(kind.kind));
        }
        if !stored.managers.is_empty() {
            object["metadata"]["managedFields"] = fields::managed_fields(&stored.managers);
        }
        object
    }

    fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// CRDs whose establishment time has come: serve their resources.
    fn settle(&mut self) {
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_crds)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        self.pending_crds = waiting;
        for (name, _) in due {
            self.establish(&name);
        }
    }

    fn crd_type() -> ResourceType {
        let &(group, version, kind, plural, namespaced, status) = BUILT_IN
            .iter()
            .find(|entry| entry.2 == "CustomResourceDefinition")
            .expect("built in");
        ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status,
            crd: None,
            short_names: Vec::new(),
        }
    }

    fn establish(&mut self, name: &str) {
        let key = Cluster::key(&Cluster::crd_type(), "", name);
        let Some(stored) = self.objects.get(&key) else {
            return;
        };
        let spec = stored.object["spec"].clone();
        let names = &spec["names"];
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        self.types.retain(|t| t.crd.as_deref() != Some(name));
        for version in spec["versions"].as_array().into_iter().flatten() {
            if version["served"] != json!(true) {
                continue;
            }
            self.types.push(ResourceType {
                group: text(&spec["group"]),
                version: text(&version["name"]),
                kind: text(&names["kind"]),
                plural: text(&names["plural"]),
                namespaced: spec["scope"] == json!("Namespaced"),
                status: version["subresources"]["status"].is_object(),
                crd: Some(name.to_owned()),
                short_names: names["shortNames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|name| name.as_str().map(str::to_owned))
                    .collect(),
            });
        }
        let before = stored.object.clone();
        let mut after = before.clone();
        let now = now_text();
        after["status"] = json!({
            "acceptedNames": names,
            "storedVersions": spec["versions"].as_array().into_iter().flatten()
                .filter(|v| v["storage"] == json!(true)).map(|v| v["name"].clone()).collect::<Vec<_>>(),
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
            ],
        });
        self.write_status(&key, after, "kube-apiserver", "apiextensions.k8s.io/v1");
    }

    /// Replaces an object's status as `manager` (bumps the resource version if it changed).
    fn write_status(&mut self, key: &Key, after: Value, manager: &str, api_version: &str) {
        let revision = self.revision + 1;
        let Some(stored) = self.objects.get_mut(key) else {
            return;
        };
        if stored.object == after {
            return;
        }
        let now = now_text();
        fields::record_update(
            &stored.object,
            &after,
            &mut stored.managers,
            (manager, api_version, &now),
            Scope::Status,
        );
        stored.object = after;
        stored.object["metadata"]["resourceVersion"] = json!(revision.to_string());
        self.revision = revision;
    }

    /// The stand-in controllers: workloads become available, jobs complete.
    fn run_controllers(&mut self, key: &Key, kind: &ResourceType, unpullable_images: &[String]) {
        let Some(stored) = self.objects.get(key) else {
            return;
        };
        let object = &stored.object;
        let generation = object["metadata"]["generation"].clone();
        if object["status"]["observedGeneration"] == generation && kind.kind != "Job" {
            return;
        }
        let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
        let unpullable = object["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|container| container["image"].as_str())
            .find(|image| unpullable_images.iter().any(|bad| bad == image));
        let status = match kind.kind.as_str() {
            "Deployment" if unpullable.is_some() => json!({
                "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": 0, "availableReplicas": 0, "unavailableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                     "message": "Deployment does not have minimum availability."},
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                     "message": format!("ReplicaSet has timed out progressing: Back-off pulling image \"{}\"", unpullable.unwrap_or_default())},
                ],
            }),
            "Deployment" | "ReplicaSet" => json!({
                "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            }),
            "StatefulSet" => json!({
                "observedGeneration": generation, "replicas": replicas, "readyReplicas": replicas,
                "currentReplicas": replicas, "updatedReplicas": replicas, "availableReplicas": replicas,
                "currentRevision": format!("rev-{generation}"), "updateRevision": format!("rev-{generation}"),
            }),
            "DaemonSet" => json!({
                "observedGeneration": generation, "desiredNumberScheduled": 1, "currentNumberScheduled": 1,
                "numberReady": 1, "updatedNumberScheduled": 1, "numberAvailable": 1, "numberMisscheduled": 0,
            }),
            "Job" => {
                if object["status"]["succeeded"].is_u64() {
                    return;
                }
                json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
            }
            _ => return,
        };
        let mut after = object.clone();
        after["status"] = status;
        self.write_status(key, after, "kube-controller-manager", &kind.api_version());
    }

    fn remove(&mut self, key: &Key, kind: &ResourceType) {
        self.objects.remove(key);
        let (_, _, _, name) = key;
        if kind.kind == "Namespace" {
            self.objects
                .retain(|(_, _, namespace, _), _| namespace != name);
        }
        if kind.kind == "CustomResourceDefinition" {
            let served: Vec<(String, String)> = self
                .types
                .iter()
                .filter(|t| t.crd.as_deref() == Some(name.as_str()))
                .map(|t| (t.group.clone(), t.plural.clone()))
                .collect();
            self.types
                .retain(|t| t.crd.as_deref() != Some(name.as_str()));
            self.objects.retain(|(group, plural, _, _), _| {
                !served.iter().any(|(g, p)| g == group && p == plural)
            });
            self.pending_crds.retain(|(pending, _)| pending != name);
        }
        self.revision += 1;
    }
}

#[derive(Debug)]
struct Shared {
    cluster: Mutex<Cluster>,
    options: ServerOptions,
    requests: AtomicU64,
    writes: AtomicU64,
}

fn discovery_resources(cluster: &Cluster, group: &str, version: &str) -> Value {
    let mut resources = Vec::new();
    for t in cluster
        .types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        // A CRD's short names are its own (spec.names.shortNames); built-ins get kubectl's.
        let short: Vec<String> = match &t.crd {
            Some(_) => t.short_names.clone(),
            None => short_names(&t.kind)
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        };
        resources.push(json!({
            "name": t.plural, "singularName": t.kind.to_lowercase(), "namespaced": t.namespaced, "kind": t.kind,
            "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
            "shortNames": short,
        }));
        if t.status {
            resources.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// The OpenAPI v3 document of one group version (see the route).
fn openapi_v3(cluster: &Cluster, group: &str, version: &str) -> Value {
    let mut schemas = serde_json::Map::new();
    for t in cluster
        .types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let name = match group {
            "" => format!("io.k8s.api.core.{version}.{}", t.kind),
            group => format!("io.outpost.test.{group}.{version}.{}", t.kind),
        };
        schemas.insert(
            name,
            json!({
                "type": "object",
                "x-kubernetes-group-version-kind": [{"group": group, "version": version, "kind": t.kind}],
                "x-kubernetes-preserve-unknown-fields": true,
            }),
        );
    }
    // The write operations of each resource, declaring `fieldValidation`: kubectl then leaves
    // validation to the server (`?fieldValidation=Strict`) instead of downloading schemas.
    let mut paths = serde_json::Map::new();
    let field_validation = json!([{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}, "uniqueItems": true}]);
    for t in cluster
        .types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        let prefix = match group {
            "" => format!("/api/{version}"),
            group => format!("/apis/{group}/{version}"),
        };
        let scoped = match t.namespaced {
            true => format!("{prefix}/namespaces/{{namespace}}/{}", t.plural),
            false => format!("{prefix}/{}", t.plural),
        };
        let gvk = json!({"group": group, "version": version, "kind": t.kind});
        let operation = |verb: &str| {
            json!({"operationId": format!("{verb}{}", t.kind), "x-kubernetes-action": verb,
                   "x-kubernetes-group-version-kind": gvk, "parameters": field_validation,
                   "responses": {"200": {"description": "OK"}}})
        };
        paths.insert(
            format!("{scoped}/{{name}}"),
            json!({"patch": operation("patch"), "put": operation("put")}),
        );
        paths.insert(scoped, json!({"post": operation("post")}));
    }
    json!({"openapi": "3.0.0", "info": {"title": "Outpost API test server", "version": "v1.33.0"},
           "paths": paths, "components": {"schemas": schemas}})
}

/// A `meta.k8s.io/v1` Table of `objects`, as `kubectl get` asks for: the columns the real API
/// server prints for the common kinds (Deployment, ConfigMap, Secret, Namespace, Service), a
/// name and an age for the rest; each row carries the object's metadata.
fn table(kind: &ResourceType, objects: &[Value], revision: u64) -> Value {
    let now = crate::harness::unix_now();
    let age = |object: &Value| -> String {
        let created = object["metadata"]["creationTimestamp"]
            .as_str()
            .and_then(outpost_proto::time::parse_rfc3339)
            .unwrap_or(now);
        let seconds = (now - created).max(0);
        match seconds {
            0..120 => format!("{seconds}s"),
            120..7_200 => format!("{}m", seconds / 60),
            7_200..172_800 => format!("{}h", seconds / 3_600),
            _ => format!("{}d", seconds / 86_400),
        }
    };
    type Cells = fn(&Value) -> Vec<Value>;
    let (columns, cells): (&[(&str, &str)], Cells) = match kind.kind.as_str() {
        "Deployment" if kind.crd.is_none() => (
            &[
                ("Ready", "string"),
                ("Up-to-date", "integer"),
                ("Available", "integer"),
            ],
            |object| {
                let status = &object["status"];
                vec![
                    json!(format!(
                        "{}/{}",
                        status["readyReplicas"].as_u64().unwrap_or(0),
                        object["spec"]["replicas"].as_u64().unwrap_or(1)
                    )),
                    json!(status["updatedReplicas"].as_u64().unwrap_or(0)),
                    json!(status["availableReplicas"].as_u64().unwrap_or(0)),
                ]
            },
        ),
        "ConfigMap" if kind.crd.is_none() => (&[("Data", "integer")], |object| {
            let data = object["data"].as_object().map_or(0, |map| map.len())
                + object["binaryData"].as_object().map_or(0, |map| map.len());
            vec![json!(data)]
        }),
        "Secret" if kind.crd.is_none() => (&[("Type", "string"), ("Data", "integer")], |object| {
            let data = object["data"].as_object().map_or(0, |map| map.len());
            vec![
                json!(object["type"].as_str().unwrap_or("Opaque")),
                json!(data),
            ]
        }),
        "Namespace" if kind.crd.is_none() => (&[("Status", "string")], |object| {
            vec![json!(
                object["status"]["phase"].as_str().unwrap_or("Active")
            )]
        }),
        "Service" if kind.crd.is_none() => (
            &[
                ("Type", "string"),
                ("Cluster-IP", "string"),
                ("Port(s)", "string"),
            ],
            |object| {
                let ports: Vec<String> = object["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|port| {
                        format!(
                            "{}/{}",
                            port["port"],
                            port["protocol"].as_str().unwrap_or("TCP")
                        )
                    })
                    .collect();
                vec![
                    json!(object["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                    json!(object["spec"]["clusterIP"].as_str().unwrap_or("<none>")),
                    json!(if ports.is_empty() {
                        "<none>".to_owned()
                    } else {
                        ports.join(",")
                    }),
                ]
            },
        ),
        _ => (&[], |_| Vec::new()),
    };
    let mut definitions = vec![json!({"name": "Name", "type": "string", "format": "name",
        "description": "Name must be unique within a namespace.", "priority": 0})];
    for (name, kind) in columns {
        definitions.push(
            json!({"name": name, "type": kind, "format": "", "description": "", "priority": 0}),
        );
    }
    definitions.push(json!({"name": "Age", "type": "string", "format": "",
        "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0}));
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut row = vec![json!(object["metadata"]["name"])];
            row.extend(cells(object));
            row.push(json!(age(object)));
            json!({"cells": row, "object": {"kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1", "metadata": object["metadata"]}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": revision.to_string()},
           "columnDefinitions": definitions, "rows": rows})
}

/// kubectl's short names for the built-in kinds (`kubectl get deploy`).
fn short_names(kind: &str) -> &'static [&'static str] {
    match kind {
        "ConfigMap" => &["cm"],
        "Namespace" => &["ns"],
        "Pod" => &["po"],
        "Service" => &["svc"],
        "ServiceAccount" => &["sa"],
        "PersistentVolumeClaim" => &["pvc"],
        "PersistentVolume" => &["pv"],
        "Deployment" => &["deploy"],
        "StatefulSet" => &["sts"],
        "DaemonSet" => &["ds"],
        "ReplicaSet" => &["rs"],
        "CronJob" => &["cj"],
        "Ingress" => &["ing"],
        "CustomResourceDefinition" => &["crd", "crds"],
        "Node" => &["no"],
        "Endpoints" => &["ep"],
        _ => &[],
    }
}

fn api_group(cluster: &Cluster, group: &str) -> Option<Value> {
    let versions: Vec<Value> = cluster
        .types
        .iter()
        .filter(|t| t.group == group)
        .map(|t| t.version.clone())
        .fold(Vec::<String>::new(), |mut seen, v| {
            if !seen.contains(&v) {
                seen.push(v);
            }
            seen
        })
        .into_iter()
        .map(|version| json!({"groupVersion": format!("{group}/{version}"), "version": version}))
        .collect();
    let preferred = versions.first()?.clone();
    Some(
        json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": versions, "preferredVersion": preferred}),
    )
}

impl Shared {
    fn handle(&self, request: Request) -> Reply {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut cluster = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        cluster.settle();
        let segments: Vec<&str> = request.segments.iter().map(String::as_str).collect();
        match (&request.method, segments.as_slice()) {
            (&Method::GET, ["version"]) => ok(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-outpost-test", "platform": "linux/amd64"}),
            ),
            (&Method::GET, ["api"]) => ok(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
            (&Method::GET, ["api", "v1"]) => ok(discovery_resources(&cluster, "", "v1")),
            (&Method::GET, ["apis"]) => {
                let mut groups: Vec<&str> = cluster
                    .types
                    .iter()
                    .filter(|t| !t.group.is_empty())
                    .map(|t| t.group.as_str())
                    .collect();
                groups.dedup();
                groups.sort_unstable();
                groups.dedup();
                let groups: Vec<Value> = groups
                    .iter()
                    .filter_map(|g| api_group(&cluster, g))
                    .collect();
                ok(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
            }
            // Minimal OpenAPI v3: one document per group version, a schema per kind that
            // names its group, version and kind and accepts any fields (kubectl validates
            // against it; the server keeps its own rules).
            (&Method::GET, ["openapi", "v3"]) => {
                let mut paths = serde_json::Map::new();
                for t in &cluster.types {
                    let path = match t.group.as_str() {
                        "" => format!("api/{}", t.version),
                        group => format!("apis/{group}/{}", t.version),
                    };
                    paths.insert(
                        path.clone(),
                        json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=outpost-test")}),
                    );
                }
                ok(json!({"paths": paths}))
            }
            (&Method::GET, ["openapi", "v3", rest @ ..]) => {
                let (group, version) = match rest {
                    ["api", version] => ("", *version),
                    ["apis", group, version] => (*group, *version),
                    _ => {
                        return Err(ApiError::new(
                            StatusCode::NOT_FOUND,
                            "NotFound",
                            "the server could not find the requested resource",
                        ));
                    }
                };
                ok(openapi_v3(&cluster, group, version))
            }
            (&Method::GET, ["apis", group]) => {
                api_group(&cluster, group).map(ok).unwrap_or_else(|| {
                    Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "the server could not find the requested resource",
                    ))
                })
            }
            (&Method::GET, ["apis", group, version])
                if cluster
                    .types
                    .iter()
                    .any(|t| t.group == *group && t.version == *version) =>
            {
                ok(discovery_resources(&cluster, group, version))
            }
            (_, ["api", "v1", rest @ ..]) => {
                let target = resolve(&cluster, "", "v1", rest)?;
                self.resource(&mut cluster, &request, target)
            }
            (_, ["apis", group, version, rest @ ..]) => {
                let target = resolve(&cluster, group, version, rest)?;
                self.resource(&mut cluster, &request, target)
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            )),
        }
    }

    fn resource(&self, cluster: &mut Cluster, request: &Request, target: Target) -> Reply {
        let kind = target.kind.clone();
        let namespace = target.namespace.clone().unwrap_or_default();
        let manager = request
            .query
            .get("fieldManager")
            .cloned()
            .unwrap_or_else(|| "unknown".to_owned());
        let dry_run = request.query.get("dryRun").is_some_and(|v| v == "All");
        let Some(name) = target.name.clone() else {
            return match request.method {
                Method::GET => {
                    let selector = Selector::parse(
                        request
                            .query
                            .get("labelSelector")
                            .map_or("", String::as_str),
                    )
                    .map_err(ApiError::bad_request)?;
                    let items: Vec<Value> = cluster
                        .objects
                        .iter()
                        .filter(|((group, plural, ns, _), stored)| {
                            *group == kind.group
                                && *plural == kind.plural
                                && (target.namespace.is_none() || *ns == namespace)
                                && selector.matches(stored.object["metadata"]["labels"].as_object())
                        })
                        .map(|(_, stored)| {
                            let mut item = cluster.render(&kind, stored);
                            if kind.crd.is_none()
                                && let Some(map) = item.as_object_mut()
                            {
                                map.remove("apiVersion");
                                map.remove("kind");
                            }
                            item
                        })
                        .collect();
                    if request.wants_table {
                        return ok(table(&kind, &items, cluster.revision));
                    }
                    ok(
                        json!({"kind": format!("{}List", kind.kind), "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": cluster.revision.to_string()}, "items": items}),
                    )
                }
                Method::POST => {
                    let body = parse_body(request)?;
                    let name = body["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    self.write(
                        cluster,
                        &kind,
                        &namespace,
                        &name,
                        Write::Create(body),
                        &manager,
                        dry_run,
                    )
                }
                _ => Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{} is not supported on a collection here", request.method),
                )),
            };
        };
        let key = Cluster::key(&kind, &namespace, &name);
        match (&request.method, target.status) {
            (&Method::GET, _) => match cluster.objects.get(&key) {
                Some(stored) if request.wants_table => ok(table(
                    &kind,
                    &[cluster.render(&kind, stored)],
                    cluster.revision,
                )),
                Some(stored) => ok(cluster.render(&kind, stored)),
                None => Err(ApiError::not_found(&kind, &name)),
            },
            (&Method::DELETE, false) => {
                let Some(stored) = cluster.objects.get(&key) else {
                    return Err(ApiError::not_found(&kind, &name));
                };
                // DeleteOptions.preconditions: the object must still be the one the client
                // read (a uid and/or resourceVersion), else 409 as the real API answers.
                let options = match request.body.is_empty() {
                    true => Value::Null,
                    false => parse_body(request)?,
                };
                for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                    if let Some(wanted) = options["preconditions"][field].as_str() {
                        let actual = stored.object["metadata"][field]
                            .as_str()
                            .unwrap_or_default();
                        if wanted != actual {
                            let mut error = ApiError::new(
                                StatusCode::CONFLICT,
                                "Conflict",
                                format!(
                                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {label} in precondition: {wanted}, {label} in object meta: {actual}",
                                    kind.qualified()
                                ),
                            );
                            error.details =
                                json!({"name": name, "group": kind.group, "kind": kind.plural});
                            return Err(error);
                        }
                    }
                }
                if !dry_run {
                    cluster.remove(&key, &kind);
                    self.writes.fetch_add(1, Ordering::Relaxed);
                }
                ok(
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": kind.group, "kind": kind.plural}}),
                )
            }
            (&Method::PUT, status) => {
                let body = parse_body(request)?;
                let write = if status {
                    Write::ReplaceStatus(body)
                } else {
                    Write::Replace(body)
                };
                self.write(cluster, &kind, &namespace, &name, write, &manager, dry_run)
            }
            (&Method::PATCH, status) => {
                let body = parse_body(request)?;
                let write = match request.content_type.as_str() {
                    "application/apply-patch+yaml" => {
                        if !request.query.contains_key("fieldManager") {
                            return Err(ApiError::bad_request(
                                "PATCH /apply requires a fieldManager",
                            ));
                        }
                        let force = request.query.get("force").is_some_and(|v| v == "true");
                        Write::Apply {
                            config: body,
                            force,
                            status,
                        }
                    }
                    "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                        Write::Merge {
                            patch: body,
                            status,
                        }
                    }
                    other => {
                        return Err(ApiError::new(
                            StatusCode::UNSUPPORTED_MEDIA_TYPE,
                            "UnsupportedMediaType",
                            format!(
                                "the body of the request was in an unknown format - accepted media types include: application/apply-patch+yaml, application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"
                            ),
                        ));
                    }
                };
                self.write(cluster, &kind, &namespace, &name, write, &manager, dry_run)
            }
            _ => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{} is not supported here", request.method),
            )),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        cluster: &mut Cluster,
        kind: &ResourceType,
        namespace: &str,
        name: &str,
        write: Write,
        manager: &str,
        dry_run: bool,
    ) -> Reply {
        let key = Cluster::key(kind, namespace, name);
        let existing = cluster.objects.get(&key).cloned();
        let api_version = kind.api_version();
        let now = now_text();
        let entry = (manager, api_version.as_str(), now.as_str());
        if let Write::Create(body) | Write::Replace(body) | Write::Apply { config: body, .. } =
            &write
        {
            check_identity(kind, namespace, name, body)?;
        }
        let mut managers = existing
            .as_ref()
            .map(|s| s.managers.clone())
            .unwrap_or_default();
        let before = existing
            .as_ref()
            .map_or_else(|| json!({}), |s| s.object.clone());
        let after = match &write {
            Write::Create(body) => {
                if existing.is_some() {
                    let mut error = ApiError::new(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", kind.qualified()),
                    );
                    error.details = json!({"name": name, "group": kind.group, "kind": kind.plural});
                    return Err(error);
                }
                let after = without_status(body);
                fields::record_update(&json!({}), &after, &mut managers, entry, Scope::Main);
                after
            }
            Write::Replace(body) | Write::ReplaceStatus(body) => {
                let Some(existing) = &existing else {
                    return Err(ApiError::not_found(kind, name));
                };
                if let Some(version) = body["metadata"]["resourceVersion"].as_str()
                    && Some(version) != existing.object["metadata"]["resourceVersion"].as_str()
                {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                            kind.qualified()
                        ),
                    ));
                }
                let status_write = matches!(write, Write::ReplaceStatus(_));
                let mut after = existing.object.clone();
                if status_write {
                    after["status"] = body["status"].clone();
                } else {
                    after = without_status(body);
                    if let Some(status) = existing.object.get("status") {
                        after["status"] = status.clone();
                    }
                }
                let scope = if status_write {
                    Scope::Status
                } else {
                    Scope::Main
                };
                fields::record_update(&existing.object, &after, &mut managers, entry, scope);
                after
            }
            Write::Merge { patch, status } => {
                let Some(existing) = &existing else {
                    return Err(ApiError::not_found(kind, name));
                };
                let mut after = existing.object.clone();
                if *status {
                    fields::merge_patch(&mut after["status"], &patch["status"]);
                } else {
                    let mut patch = patch.clone();
                    if let Some(map) = patch.as_object_mut() {
                        map.remove("status");
                    }
                    fields::merge_patch(&mut after, &patch);
                }
                let scope = if *status { Scope::Status } else { Scope::Main };
                fields::record_update(&existing.object, &after, &mut managers, entry, scope);
                after
            }
            Write::Apply {
                config,
                force,
                status,
            } => {
                if *status && existing.is_none() {
                    return Err(ApiError::not_found(kind, name));
                }
                let scope = if *status { Scope::Status } else { Scope::Main };
                fields::apply(&before, &mut managers, entry, config, *force, scope).map_err(|conflicts| {
                    let fields: Vec<String> = conflicts.iter().map(|c| format!("conflict with \"{}\" using {}: {}", c.manager, c.api_version, c.field)).collect();
                    let mut error = ApiError::new(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("Apply failed with {} conflict{}: {}", conflicts.len(), if conflicts.len() == 1 { "" } else { "s" }, fields.join("\n")),
                    );
                    error.details = json!({"name": name, "group": kind.group, "kind": kind.plural,
                        "causes": conflicts.iter().map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\" using {}", c.manager, c.api_version), "field": c.field})).collect::<Vec<_>>()});
                    error
                })?
            }
        };
        validate(cluster, kind, namespace, name, &after)?;
        if dry_run {
            let stored = Stored {
                object: after,
                managers,
            };
            return ok(cluster.render(kind, &stored));
        }
        match existing {
            None => {
                cluster.store_new(kind, namespace, name, after, managers);
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.after_write(cluster, &key, kind);
                let stored = cluster.objects.get(&key).expect("just stored");
                return Ok((StatusCode::CREATED, cluster.render(kind, stored)));
            }
            Some(existing) => {
                if existing.object != after
                    || !fields::same_ownership(&existing.managers, &managers)
                {
                    let mut after = after;
                    let mut generation = existing.object["metadata"]["generation"]
                        .as_u64()
                        .unwrap_or(1);
                    if spec_part(&existing.object) != spec_part(&after) {
                        generation += 1;
                    }
                    let revision = cluster.next_revision();
                    for field in ["uid", "creationTimestamp", "name", "namespace"] {
                        after["metadata"][field] = existing.object["metadata"][field].clone();
                    }
                    if let Some(map) = after["metadata"].as_object_mut() {
                        map.retain(|_, v| !v.is_null());
                    }
                    after["metadata"]["generation"] = json!(generation);
                    after["metadata"]["resourceVersion"] = json!(revision);
                    cluster.objects.insert(
                        key.clone(),
                        Stored {
                            object: after,
                            managers,
                        },
                    );
                    self.writes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.after_write(cluster, &key, kind);
        let stored = cluster.objects.get(&key).expect("stored");
        ok(cluster.render(kind, stored))
    }

    fn after_write(&self, cluster: &mut Cluster, key: &Key, kind: &ResourceType) {
        if kind.kind == "CustomResourceDefinition" && kind.group == "apiextensions.k8s.io" {
            let name = key.3.clone();
            let ready = Instant::now() + self.options.crd_establish_delay;
            cluster.pending_crds.retain(|(pending, _)| *pending != name);
            cluster.pending_crds.push((name, ready));
            cluster.settle();
        }
        if self.options.controllers {
            cluster.run_controllers(key, kind, &self.options.unpullable_images);
        }
    }
}

#[derive(Debug)]
enum Write {
    Create(Value),
    Replace(Value),
    ReplaceStatus(Value),
    Merge {
        patch: Value,
        status: bool,
    },
    Apply {
        config: Value,
        force: bool,
        status: bool,
    },
}

fn without_status(body: &Value) -> Value {
    let mut body = body.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
        if let Some(metadata) = map.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in [
                "managedFields",
                "resourceVersion",
                "uid",
                "generation",
                "creationTimestamp",
            ] {
                metadata.remove(field);
            }
        }
    }
    body
}

fn parse_body(request: &Request) -> Result<Value, ApiError> {
    if request.content_type.contains("protobuf") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "this test server reads JSON bodies only, not protobuf (kubectl create sends protobuf; use kubectl apply)",
        ));
    }
    let value: Value = serde_json::from_slice(&request.body).map_err(|error| {
        ApiError::bad_request(format!(
            "the request body is not JSON (this test server reads YAML only in its JSON form): {error}"
        ))
    })?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the request body must be an object"));
    }
    Ok(value)
}

/// The body names the same kind, namespace and name as the URL.
fn check_identity(
    kind: &ResourceType,
    namespace: &str,
    name: &str,
    body: &Value,
) -> Result<(), ApiError> {
    if let (Some(api_version), Some(body_kind)) =
        (body["apiVersion"].as_str(), body["kind"].as_str())
    {
        if api_version != kind.api_version() || body_kind != kind.kind {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({}) or kind {body_kind} is not {}",
                kind.api_version(),
                kind.kind
            )));
        }
    } else if body.get("apiVersion").is_some() || body.get("kind").is_some() {
        return Err(ApiError::bad_request(
            "apiVersion and kind must both be set",
        ));
    }
    if let Some(body_namespace) = body["metadata"]["namespace"].as_str()
        && kind.namespaced
        && body_namespace != namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    if let Some(body_name) = body["metadata"]["name"].as_str()
        && body_name != name
        && !name.is_empty()
    {
        return Err(ApiError::bad_request(
            "the name of the object does not match the name on the URL",
        ));
    }
    Ok(())
}

fn validate(
    cluster: &Cluster,
    kind: &ResourceType,
    namespace: &str,
    name: &str,
    object: &Value,
) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid(
            kind,
            name,
            "metadata.name",
            "Required value: name or generateName is required".to_owned(),
        ));
    }
    let name_ok = if kind.kind == "Namespace" {
        valid_subdomain(name) && name.len() <= 63 && !name.contains('.')
    } else {
        valid_subdomain(name) || kind.group == "rbac.authorization.k8s.io"
    };
    if !name_ok {
        return Err(ApiError::invalid(
            kind,
            name,
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ));
    }
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            let value_text = value.as_str().unwrap_or_default();
            if !valid_label_key(key) || !value.is_string() || !valid_label_value(value_text) {
                return Err(ApiError::invalid(
                    kind,
                    name,
                    &format!("metadata.labels[{key}]"),
                    format!(
                        "Invalid value: {value}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                    ),
                ));
            }
        }
    }
    if kind.namespaced
        && !cluster.objects.contains_key(&(
            String::new(),
            "namespaces".to_owned(),
            String::new(),
            namespace.to_owned(),
        ))
    {
        let mut error = ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("namespaces \"{namespace}\" not found"),
        );
        error.details = json!({"name": namespace, "kind": "namespaces"});
        return Err(error);
    }
    if kind.kind == "CustomResourceDefinition" && kind.group == "apiextensions.k8s.io" {
        let spec = &object["spec"];
        let expected = format!(
            "{}.{}",
            spec["names"]["plural"].as_str().unwrap_or_default(),
            spec["group"].as_str().unwrap_or_default()
        );
        if name != expected {
            return Err(ApiError::invalid(
                kind,
                name,
                "metadata.name",
                format!(
                    "Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group ({expected})"
                ),
            ));
        }
    }
    Ok(())
}

fn resolve(
    cluster: &Cluster,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let missing = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let find = |plural: &str| {
        cluster
            .find_type(group, version, plural)
            .ok_or_else(missing)
    };
    let target =
        |kind: ResourceType, namespace: Option<&str>, name: Option<&str>, status: bool| Target {
            kind,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            status,
        };
    let target = match rest {
        ["namespaces", namespace, plural, tail @ ..]
            if group.is_empty() && *plural == "status" && tail.is_empty() =>
        {
            target(find("namespaces")?, None, Some(namespace), true)
        }
        ["namespaces", namespace, plural, tail @ ..] => {
            let kind = find(plural)?;
            if !kind.namespaced {
                return Err(missing());
            }
            match tail {
                [] => target(kind, Some(namespace), None, false),
                [name] => target(kind, Some(namespace), Some(name), false),
                [name, "status"] if kind.status => target(kind, Some(namespace), Some(name), true),
                _ => return Err(missing()),
            }
        }
        [plural, tail @ ..] => {
            let kind = find(plural)?;
            match tail {
                [] => target(kind, None, None, false),
                [name] if !kind.namespaced => target(kind, None, Some(name), false),
                [name, "status"] if !kind.namespaced && kind.status => {
                    target(kind, None, Some(name), true)
                }
                _ => return Err(missing()),
            }
        }
        [] => return Err(missing()),
    };
    Ok(target)
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Running")
    }
}

/// A running Kubernetes API test server on loopback.
#[derive(Debug)]
pub struct KubeApiServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl KubeApiServer {
    /// Starts a server with `options` on a free loopback port.
    pub async fn start(options: ServerOptions) -> KubeApiServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API test server");
        let address = listener.local_addr().expect("bound");
        let server = KubeApiServer {
            shared: Arc::new(Shared {
                cluster: Mutex::new(Cluster::new()),
                options,
                requests: AtomicU64::new(0),
                writes: AtomicU64::new(0),
            }),
            address,
            running: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let shared = self.shared.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { respond(&shared, method, uri, headers, body) }
            },
        );
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Some(Running { stop, task });
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A kubeconfig for this server (token authentication, if the server wants one).
    pub fn kubeconfig(&self) -> String {
        let user = match &self.shared.options.token {
            Some(token) => format!("{{token: {token}}}"),
            None => "{}".to_owned(),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\nusers:\n- name: test\n  user: {user}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\ncurrent-context: test\n",
            self.url()
        )
    }

    /// Writes [`KubeApiServer::kubeconfig`] to `path`, for an agent process, and returns the path.
    pub fn write_kubeconfig(&self, path: PathBuf) -> PathBuf {
        std::fs::write(&path, self.kubeconfig()).expect("write the test server's kubeconfig");
        path
    }

    /// A kube-rs client for this server, built from [`KubeApiServer::kubeconfig`].
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::from_yaml(&self.kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        kube::Client::try_from(config).expect("client")
    }

    /// The agent's cluster target for this server (kube-rs, through the kubeconfig).
    pub async fn target(&self) -> Arc<outpost_agent::target::kubernetes::KubernetesTarget> {
        let kubeconfig =
            kube::config::Kubeconfig::from_yaml(&self.kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        Arc::new(
            outpost_agent::target::kubernetes::KubernetesTarget::from_config(config)
                .expect("target"),
        )
    }

    /// Deletes an object through the API, as `kubectl delete` would; `false` if it was absent.
    pub async fn kubectl_delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> bool {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let resource = kube::core::ApiResource::from_gvk(&kube::core::GroupVersionKind::gvk(
            group, version, kind,
        ));
        let api: kube::Api<kube::core::DynamicObject> = if namespace.is_empty() {
            kube::Api::all_with(self.client().await, &resource)
        } else {
            kube::Api::namespaced_with(self.client().await, namespace, &resource)
        };
        api.delete(name, &Default::default()).await.is_ok()
    }

    /// Stops listening: connections are refused until [`KubeApiServer::resume`]. The objects stay.
    pub async fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(running) = running {
            let _ = running.stop.send(());
            let _ = running.task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn resume(&self) {
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(self.address).await {
                Ok(listener) => return self.serve(listener),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("cannot listen on {} again", self.address);
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Changes stored so far (creates, updates that changed something, deletes).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// The object, as a GET would return it (`api_version` like `apps/v1`).
    pub fn object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let cluster = self
            .shared
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let kind = cluster
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.kind == kind)?
            .clone();
        let namespace = if kind.namespaced { namespace } else { "" };
        let stored = cluster.objects.get(&Cluster::key(&kind, namespace, name))?;
        Some(cluster.render(&kind, stored))
    }

    /// `(kind, namespace, name)` of every object whose labels match `selector`, sorted.
    pub fn names(&self, selector: &str) -> Vec<(String, String, String)> {
        let selector = Selector::parse(selector).expect("selector");
        let cluster = self
            .shared
            .cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<_> = cluster
            .objects
            .iter()
            .filter(|(_, stored)| selector.matches(stored.object["metadata"]["labels"].as_object()))
            .filter_map(|((group, plural, namespace, name), _)| {
                let kind = cluster
                    .types
                    .iter()
                    .find(|t| t.group == *group && t.plural == *plural)?;
                Some((kind.kind.clone(), namespace.clone(), name.clone()))
            })
            .collect();
        names.sort();
        names
    }
}

fn respond(
    shared: &Shared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let reply = (|| {
        if let Some(token) = &shared.options.token {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if presented != Some(format!("Bearer {token}").as_str()) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "Unauthorized",
                ));
            }
        }
        let query = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(key), percent_decode(value))
            })
            .collect();
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let wants_table = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("as=Table"));
        let request = Request {
            method,
            wants_table,
            segments: uri
                .path()
                .split('/')
                .filter(|s| !s.is_empty())
                .map(percent_decode)
                .collect(),
            query,
            content_type,
            body,
        };
        shared.handle(request)
    })();
    let (code, value) = match reply {
        Ok(reply) => reply,
        Err(error) => (error.code, error.status()),
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc_3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_435_200), "2026-11-23T12:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            percent_decode("outpost.io%2Fbundle%3Dpos"),
            "outpost.io/bundle=pos"
        );
        assert_eq!(percent_decode("a+in+%28x%29"), "a in (x)");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
    }
}
