//! An in-memory cluster for simulations: objects in a map, applies replace the desired fields,
//! workloads are ready at once. Failures can be injected: an unreachable API, or objects whose
//! apply or health fails (to simulate a bad release).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::{Value, json};

use super::{ClusterTarget, ObjectRef, TargetError};

/// Kinds without a namespace (everything else is namespaced).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "APIService",
    "Node",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
];

/// Decides, per applied object, a failure to inject (`Some(message)`).
pub type Injector = Box<dyn Fn(&Value) -> Option<String> + Send + Sync>;

/// A cluster in a map.
#[derive(Default)]
pub struct MemoryTarget {
    objects: Mutex<BTreeMap<(String, String, String, String), Value>>,
    unreachable: AtomicBool,
    applies: AtomicU64,
    fail_apply: Mutex<Option<Injector>>,
    fail_health: Mutex<Option<Injector>>,
}

impl std::fmt::Debug for MemoryTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTarget")
            .field("objects", &self.len())
            .field("applies", &self.applies())
            .finish()
    }
}

fn resolved(object: &ObjectRef) -> ObjectRef {
    let mut resolved = object.clone();
    if CLUSTER_SCOPED.contains(&object.kind.as_str()) {
        resolved.namespace.clear();
    } else if resolved.namespace.is_empty() {
        resolved.namespace = "default".to_owned();
    }
    resolved
}

impl MemoryTarget {
    /// An empty cluster.
    pub fn new() -> MemoryTarget {
        MemoryTarget::default()
    }

    /// Makes every call fail as if the API were down (or brings it back).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.unreachable.store(unreachable, Ordering::Relaxed);
    }

    /// Objects whose apply fails with the injector's message.
    pub fn fail_applies(&self, injector: Option<Injector>) {
        *self.fail_apply.lock().unwrap_or_else(|e| e.into_inner()) = injector;
    }

    /// Objects that never become healthy (their status says why).
    pub fn fail_health(&self, injector: Option<Injector>) {
        *self.fail_health.lock().unwrap_or_else(|e| e.into_inner()) = injector;
    }

    /// Objects held.
    pub fn len(&self) -> usize {
        self.objects.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no object is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies that changed or created an object.
    pub fn applies(&self) -> u64 {
        self.applies.load(Ordering::Relaxed)
    }

    /// A copy of the object.
    pub fn object(&self, object: &ObjectRef) -> Option<Value> {
        let key = resolved(object).identity();
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    fn check(&self) -> Result<(), TargetError> {
        if self.unreachable.load(Ordering::Relaxed) {
            return Err(TargetError::Unreachable(
                "connection refused (simulated)".to_owned(),
            ));
        }
        Ok(())
    }
}

/// The status a controller would write for a healthy (or failing) workload.
fn settled_status(object: &Value, failure: Option<String>) -> Option<Value> {
    let generation = object["metadata"]["generation"].clone();
    let replicas = object["spec"]["replicas"].as_u64().unwrap_or(1);
    match (object["kind"].as_str()?, failure) {
        ("Deployment", None) => Some(
            json!({"observedGeneration": generation, "replicas": replicas,
            "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}),
        ),
        ("Deployment", Some(message)) => Some(
            json!({"observedGeneration": generation, "replicas": replicas,
            "updatedReplicas": replicas, "availableReplicas": 0, "conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": message}]}),
        ),
        ("StatefulSet", None) => Some(
            json!({"observedGeneration": generation, "replicas": replicas,
            "readyReplicas": replicas, "updatedReplicas": replicas, "currentRevision": "r", "updateRevision": "r"}),
        ),
        ("DaemonSet", None) => Some(
            json!({"observedGeneration": generation, "desiredNumberScheduled": 1,
            "updatedNumberScheduled": 1, "numberAvailable": 1, "numberReady": 1}),
        ),
        ("Job", None) => {
            Some(json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}))
        }
        ("Job", Some(message)) => Some(
            json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True", "message": message}]}),
        ),
        ("CustomResourceDefinition", _) => {
            Some(json!({"conditions": [{"type": "Established", "status": "True"}]}))
        }
        (_, Some(message)) => {
            Some(json!({"conditions": [{"type": "Ready", "status": "False", "message": message}]}))
        }
        _ => None,
    }
}

impl ClusterTarget for MemoryTarget {
    async fn resolve(&self, object: &Value) -> Result<ObjectRef, TargetError> {
        self.check()?;
        ObjectRef::of(object)
            .map(|reference| resolved(&reference))
            .ok_or_else(|| {
                TargetError::Invalid("object without apiVersion, kind or name".to_owned())
            })
    }

    async fn apply(
        &self,
        object: &Value,
        _field_manager: &str,
        _force: bool,
        dry_run: bool,
    ) -> Result<Value, TargetError> {
        let reference = self.resolve(object).await?;
        if let Some(message) = self
            .fail_apply
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|f| f(object))
        {
            return Err(TargetError::Invalid(message));
        }
        let failure = self
            .fail_health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|f| f(object));
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let key = reference.identity();
        let mut live = object.clone();
        if !reference.namespace.is_empty() {
            live["metadata"]["namespace"] = json!(reference.namespace);
        }
        let previous = objects.get(&key);
        let spec_of = |value: &Value| {
            let mut value = value.clone();
            if let Some(map) = value.as_object_mut() {
                map.remove("status");
                if let Some(metadata) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                    metadata.remove("generation");
                }
            }
            value
        };
        let generation = match previous {
            Some(previous) if spec_of(previous) == spec_of(&live) => return Ok(previous.clone()),
            Some(previous) => previous["metadata"]["generation"].as_u64().unwrap_or(1) + 1,
            None => 1,
        };
        live["metadata"]["generation"] = json!(generation);
        if let Some(status) = settled_status(&live, failure) {
            live["status"] = status;
        }
        if dry_run {
            return Ok(live);
        }
        objects.insert(key, live.clone());
        self.applies.fetch_add(1, Ordering::Relaxed);
        Ok(live)
    }

    async fn get(&self, object: &ObjectRef) -> Result<Option<Value>, TargetError> {
        self.check()?;
        Ok(self.object(object))
    }

    async fn list(
        &self,
        api_version: &str,
        kind: &str,
        selector: &str,
    ) -> Result<Vec<Value>, TargetError> {
        self.check()?;
        let (key, value) = selector.split_once('=').unwrap_or((selector, ""));
        let group = super::group_version(api_version).0;
        let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        Ok(objects
            .iter()
            .filter(|((g, k, _, _), object)| {
                g == group
                    && k == kind
                    && (selector.is_empty() || object["metadata"]["labels"][key] == json!(value))
            })
            .map(|(_, object)| object.clone())
            .collect())
    }

    async fn delete(&self, object: &ObjectRef, read: &Value) -> Result<bool, TargetError> {
        self.check()?;
        let reference = resolved(object);
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        // The same preconditions as the API: the object must be the one that was read.
        if let Some(stored) = objects.get(&reference.identity()) {
            for field in ["uid", "resourceVersion"] {
                let wanted = &read["metadata"][field];
                if !wanted.is_null() && *wanted != stored["metadata"][field] {
                    return Err(TargetError::Conflict(format!(
                        "{reference}: precondition failed: {field} changed since it was read"
                    )));
                }
            }
        }
        let removed = objects.remove(&reference.identity()).is_some();
        if removed && reference.kind == "Namespace" && reference.group().is_empty() {
            objects.retain(|(_, _, namespace, _), _| *namespace != reference.name);
        }
        Ok(removed)
    }

    async fn refresh(&self) -> Result<(), TargetError> {
        self.check()
    }
}
