//! Field ownership for server-side apply, after the Kubernetes documentation ("Server-Side
//! Apply": field management, conflicts, merge strategy) and structured-merge-diff's updater.
//!
//! - Every write records which fields its field manager owns (`metadata.managedFields`, one
//!   entry per manager and operation, in `FieldsV1` form).
//! - An **apply** sets the fields of its configuration. Changing a field that another manager
//!   owns to a different value is a conflict (409) unless forced; forcing takes the field over.
//!   Fields the applier owned before and no longer applies are removed unless another manager
//!   owns them. The applier's owned set becomes exactly the fields of its configuration.
//! - An **update** (PUT, merge patch) never conflicts: the fields it changed move to its
//!   manager.
//!
//! Not modelled (written down in `docs/kube-test-server.md`): lists are atomic (real schemas
//! make `containers`, `env`, `ports` … associative lists merged by key), and `FieldsV1` omits the
//! `"."` entries for maps.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A field: the map keys from the object's root.
pub type FieldPath = Vec<String>;

/// How a manager wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Server-side apply.
    Apply,
    /// Create, PUT or a non-apply patch.
    Update,
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedEntry {
    /// Field manager name.
    pub manager: String,
    /// Apply or Update.
    pub operation: Operation,
    /// The API version the manager wrote with.
    pub api_version: String,
    /// RFC 3339 time of the last change.
    pub time: String,
    /// `status` for writes through the status subresource.
    pub subresource: Option<String>,
    /// Owned leaf fields.
    pub fields: BTreeSet<FieldPath>,
}

/// Which part of an object a write may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything but `status` (and identity, server-set metadata).
    Main,
    /// Only `status`.
    Status,
}

/// A conflict: another manager owns `path` with a different value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// Its API version.
    pub api_version: String,
    /// The field, as `.spec.replicas`.
    pub field: String,
}

const SERVER_SET_METADATA: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "selfLink",
];

fn excluded(path: &[String], scope: Scope) -> bool {
    match (scope, path) {
        (_, []) => true,
        (Scope::Status, [first, ..]) => first != "status",
        (Scope::Main, [first]) if first == "apiVersion" || first == "kind" => true,
        (Scope::Main, [first, ..]) if first == "status" => true,
        (Scope::Main, [first, second, ..]) if first == "metadata" => {
            SERVER_SET_METADATA.contains(&second.as_str())
        }
        _ => false,
    }
}

/// The leaf fields of `value` a write in `scope` owns: non-empty maps are descended, everything
/// else (scalars, lists, empty maps) is a leaf.
pub fn leaf_paths(value: &Value, scope: Scope) -> BTreeSet<FieldPath> {
    fn walk(value: &Value, path: &mut FieldPath, scope: Scope, out: &mut BTreeSet<FieldPath>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    path.push(key.clone());
                    if !excluded(path, scope) {
                        walk(child, path, scope, out);
                    }
                    path.pop();
                }
            }
            _ => {
                if !excluded(path, scope) {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(value, &mut Vec::new(), scope, &mut out);
    out
}

/// The value at `path`.
pub fn value_at<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |value, key| value.get(key))
}

fn set_at(value: &mut Value, path: &[String], new: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = value;
    for key in parents {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        let map = current.as_object_mut().expect("made an object above");
        current = map
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !current.is_object() {
        *current = Value::Object(Map::new());
    }
    if let Some(map) = current.as_object_mut() {
        map.insert(last.clone(), new);
    }
}

/// Removes `path`, then parent maps it left empty (never a top-level section).
fn remove_at(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(Value::Object(map)) = value_at_mut(value, parents) {
        map.remove(last);
        if map.is_empty() && parents.len() > 1 {
            remove_at(value, parents);
        }
    }
}

fn value_at_mut<'v>(value: &'v mut Value, path: &[String]) -> Option<&'v mut Value> {
    path.iter()
        .try_fold(value, |value, key| value.get_mut(key.as_str()))
}

fn overlaps(a: &[String], b: &[String]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// `.spec.replicas`.
pub fn path_text(path: &[String]) -> String {
    path.iter().map(|key| format!(".{key}")).collect()
}

/// Applies `config` as `manager` to `live` (an empty object when creating) and returns the
/// new object, or the conflicts when not `force`d.
pub fn apply(
    live: &Value,
    managers: &mut Vec<ManagedEntry>,
    entry: (&str, &str, &str),
    config: &Value,
    force: bool,
    scope: Scope,
) -> Result<Value, Vec<Conflict>> {
    let (manager, api_version, now) = entry;
    let config_paths = leaf_paths(config, scope);
    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, FieldPath)> = Vec::new();
    for (index, other) in managers.iter().enumerate() {
        if other.manager == manager && other.operation == Operation::Apply {
            continue;
        }
        for owned in &other.fields {
            for path in config_paths.iter().filter(|path| overlaps(path, owned)) {
                let shorter = if path.len() <= owned.len() {
                    path
                } else {
                    owned
                };
                if value_at(live, shorter) != value_at(config, shorter) {
                    conflicts.push(Conflict {
                        manager: other.manager.clone(),
                        api_version: other.api_version.clone(),
                        field: path_text(shorter),
                    });
                    taken.push((index, owned.clone()));
                }
            }
        }
    }
    if !conflicts.is_empty() && !force {
        conflicts.dedup();
        return Err(conflicts);
    }
    for (index, owned) in taken {
        managers[index].fields.remove(&owned);
    }
    let mut object = live.clone();
    let previous = managers
        .iter()
        .find(|e| e.manager == manager && e.operation == Operation::Apply)
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    for dropped in previous.difference(&config_paths) {
        let owned_elsewhere = managers.iter().any(|other| {
            !(other.manager == manager && other.operation == Operation::Apply)
                && other.fields.iter().any(|owned| overlaps(owned, dropped))
        });
        if !owned_elsewhere {
            remove_at(&mut object, dropped);
        }
    }
    for path in &config_paths {
        if let Some(value) = value_at(config, path) {
            set_at(&mut object, path, value.clone());
        }
    }
    let entry = ManagedEntry {
        manager: manager.to_owned(),
        operation: Operation::Apply,
        api_version: api_version.to_owned(),
        time: now.to_owned(),
        subresource: (scope == Scope::Status).then(|| "status".to_owned()),
        fields: config_paths,
    };
    // The entry keeps its place, so a no-op apply leaves the list as it was.
    match managers
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == Operation::Apply)
    {
        Some(existing) => *existing = entry,
        None => managers.push(entry),
    }
    managers.retain(|e| !e.fields.is_empty());
    Ok(object)
}

/// Records an update by `manager` that turned `before` into `after`: changed fields move to it.
pub fn record_update(
    before: &Value,
    after: &Value,
    managers: &mut Vec<ManagedEntry>,
    entry: (&str, &str, &str),
    scope: Scope,
) {
    let (manager, api_version, now) = entry;
    let mut changed: BTreeSet<FieldPath> = leaf_paths(after, scope)
        .into_iter()
        .filter(|path| value_at(before, path) != value_at(after, path))
        .collect();
    // Removed fields leave every owner.
    let removed: Vec<FieldPath> = leaf_paths(before, scope)
        .into_iter()
        .filter(|path| value_at(after, path).is_none())
        .collect();
    for other in managers.iter_mut() {
        if other.manager == manager && other.operation == Operation::Update {
            continue;
        }
        other.fields.retain(|owned| {
            !changed.iter().any(|path| overlaps(path, owned))
                && !removed.iter().any(|path| overlaps(path, owned))
        });
    }
    if let Some(own) = managers
        .iter_mut()
        .find(|e| e.manager == manager && e.operation == Operation::Update)
    {
        own.fields
            .retain(|owned| !removed.iter().any(|path| overlaps(path, owned)));
        own.fields.append(&mut changed);
        if value_at(before, &[]) != value_at(after, &[]) {
            own.time = now.to_owned();
        }
    } else if !changed.is_empty() {
        managers.push(ManagedEntry {
            manager: manager.to_owned(),
            operation: Operation::Update,
            api_version: api_version.to_owned(),
            time: now.to_owned(),
            subresource: (scope == Scope::Status).then(|| "status".to_owned()),
            fields: changed,
        });
    }
    managers.retain(|e| !e.fields.is_empty());
}

/// Whether two `managedFields` lists say the same apart from timestamps (a no-op write, which
/// the API server does not persist).
pub fn same_ownership(a: &[ManagedEntry], b: &[ManagedEntry]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| {
            (
                &a.manager,
                a.operation,
                &a.api_version,
                &a.subresource,
                &a.fields,
            ) == (
                &b.manager,
                b.operation,
                &b.api_version,
                &b.subresource,
                &b.fields,
            )
        })
}

/// A set of fields in `FieldsV1` form: `{"f:spec":{"f:replicas":{}}}`.
pub fn fields_v1(paths: &BTreeSet<FieldPath>) -> Value {
    let mut root = Value::Object(Map::new());
    for path in paths {
        let keys: Vec<String> = path.iter().map(|key| format!("f:{key}")).collect();
        set_at(&mut root, &keys, json!({}));
    }
    root
}

/// The `metadata.managedFields` list.
pub fn managed_fields(managers: &[ManagedEntry]) -> Value {
    Value::Array(
        managers
            .iter()
            .map(|entry| {
                let mut value = json!({
                    "manager": entry.manager,
                    "operation": match entry.operation { Operation::Apply => "Apply", Operation::Update => "Update" },
                    "apiVersion": entry.api_version,
                    "time": entry.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(&entry.fields),
                });
                if let Some(subresource) = &entry.subresource {
                    value["subresource"] = json!(subresource);
                }
                value
            })
            .collect(),
    )
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let map = target.as_object_mut().expect("made an object above");
            for (key, value) in patch {
                if value.is_null() {
                    map.remove(key);
                } else {
                    merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPLY: (&str, &str, &str) = ("outpost-agent", "apps/v1", "t1");

    fn deployment(replicas: u64, image: &str) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}})
    }

    #[test]
    fn apply_owns_exactly_its_configuration() {
        let mut managers = Vec::new();
        let object = apply(
            &json!({}),
            &mut managers,
            APPLY,
            &deployment(1, "a"),
            false,
            Scope::Main,
        )
        .unwrap();
        let paths: Vec<String> = managers[0].fields.iter().map(|p| path_text(p)).collect();
        assert_eq!(
            paths,
            [
                ".metadata.labels.app",
                ".spec.replicas",
                ".spec.template.spec.containers"
            ]
        );
        assert_eq!(object["spec"]["replicas"], 1);
        assert_eq!(
            fields_v1(&managers[0].fields)["f:metadata"],
            json!({"f:labels": {"f:app": {}}})
        );
    }

    #[test]
    fn a_field_dropped_from_the_configuration_is_removed_unless_someone_else_owns_it() {
        let mut managers = Vec::new();
        let mut with_label = deployment(1, "a");
        with_label["metadata"]["labels"]["team"] = json!("x");
        let live = apply(
            &json!({}),
            &mut managers,
            APPLY,
            &with_label,
            false,
            Scope::Main,
        )
        .unwrap();
        let live = apply(
            &live,
            &mut managers,
            APPLY,
            &deployment(1, "a"),
            false,
            Scope::Main,
        )
        .unwrap();
        assert!(live["metadata"]["labels"].get("team").is_none());
        assert_eq!(live["metadata"]["labels"]["app"], "web");
        // Owned by an updater as well: kept.
        let mut edited = live.clone();
        edited["metadata"]["labels"]["team"] = json!("y");
        record_update(
            &live,
            &edited,
            &mut managers,
            ("kubectl-edit", "apps/v1", "t2"),
            Scope::Main,
        );
        let after = apply(
            &edited,
            &mut managers,
            APPLY,
            &deployment(1, "a"),
            false,
            Scope::Main,
        )
        .unwrap();
        assert_eq!(after["metadata"]["labels"]["team"], "y");
    }

    #[test]
    fn changing_another_managers_field_conflicts_unless_forced() {
        let mut managers = Vec::new();
        let live = apply(
            &json!({}),
            &mut managers,
            APPLY,
            &deployment(1, "a"),
            false,
            Scope::Main,
        )
        .unwrap();
        let mut scaled = live.clone();
        scaled["spec"]["replicas"] = json!(5);
        record_update(
            &live,
            &scaled,
            &mut managers,
            ("kubectl", "apps/v1", "t2"),
            Scope::Main,
        );
        assert!(
            !managers[0]
                .fields
                .contains(&vec!["spec".to_owned(), "replicas".to_owned()])
        );
        // Same value as live: no conflict even though kubectl owns it.
        apply(
            &scaled,
            &mut managers.clone(),
            APPLY,
            &deployment(5, "a"),
            false,
            Scope::Main,
        )
        .unwrap();
        let conflicts = apply(
            &scaled,
            &mut managers.clone(),
            APPLY,
            &deployment(1, "a"),
            false,
            Scope::Main,
        )
        .unwrap_err();
        assert_eq!(
            conflicts,
            [Conflict {
                manager: "kubectl".into(),
                api_version: "apps/v1".into(),
                field: ".spec.replicas".into()
            }]
        );
        let forced = apply(
            &scaled,
            &mut managers,
            APPLY,
            &deployment(1, "a"),
            true,
            Scope::Main,
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 1);
        assert!(
            managers.iter().all(|e| e.manager != "kubectl"),
            "{managers:?}"
        );
    }

    #[test]
    fn status_writes_touch_only_status() {
        let paths = leaf_paths(
            &json!({"metadata": {"name": "x"}, "spec": {"a": 1}, "status": {"ready": true}}),
            Scope::Status,
        );
        assert_eq!(
            paths.into_iter().collect::<Vec<_>>(),
            [vec!["status".to_owned(), "ready".to_owned()]]
        );
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(&mut target, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(target, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
