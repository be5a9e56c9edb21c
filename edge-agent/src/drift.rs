//! Drift: how a live object differs from what applying its desired state makes of it.
//!
//! The agent reads the live object, then applies the desired one (for real when correcting,
//! as a dry run when only reporting) and compares the two answers. Both come from the API
//! server, so defaults, quantities and int-or-strings are normalised alike and only real
//! differences remain: a field the desired state sets that someone changed or removed, or an
//! object someone deleted. Fields others added and the desired state does not name are no
//! drift (server-side apply leaves them alone, and so do we).
//!
//! Who changed a field is read from the live object's `managedFields`: the manager that owns
//! the path (an update, `kubectl edit` or a merge patch, takes ownership of what it changed).
//! A field someone removed is owned by nobody; then the newest other manager that wrote after
//! the agent did is named. Secret values are never reported, only that they differ.

use serde_json::Value;

use outpost_proto::Digest;
use outpost_proto::wire::{
    FieldDrift, MAX_DRIFT_FIELDS, MAX_DRIFT_OBJECTS, MAX_DRIFT_VALUE, ObjectDrift,
};

use crate::target::ObjectRef;

/// The annotation that sets what the agent does about an object's drift: `report` leaves the
/// live change in place and reports it; anything else (or none) corrects it. The hub sets it on
/// every object of a bundle declared with `drift: report`; a manifest may set it itself.
pub const DRIFT_ANNOTATION: &str = "outpost.io/drift";

/// What the agent does about drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Apply the desired state again.
    Correct,
    /// Leave the live change, report it.
    Report,
}

/// The mode a desired object asks for.
pub fn mode_of(desired: &Value) -> Mode {
    match desired["metadata"]["annotations"][DRIFT_ANNOTATION].as_str() {
        Some("report") => Mode::Report,
        _ => Mode::Correct,
    }
}

/// Metadata the API server sets: never drift.
const SERVER_METADATA: &[&str] = &[
    "resourceVersion",
    "generation",
    "managedFields",
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
];

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A map key.
    Key(String),
    /// The item of a list of named maps with this `name` (other lists are compared whole).
    Named(String),
}

fn path_text(path: &[Step]) -> String {
    let mut text = String::new();
    for step in path {
        match step {
            Step::Key(key) => {
                if !text.is_empty() {
                    text.push('.');
                }
                text.push_str(key);
            }
            Step::Named(name) => text.push_str(&format!("[name={name}]")),
        }
    }
    text
}

/// Whether every item is a map with a string `name`, names unique.
fn named_items(items: &[Value]) -> Option<Vec<&str>> {
    let names: Vec<&str> = items
        .iter()
        .map(|item| item["name"].as_str())
        .collect::<Option<_>>()?;
    let unique: std::collections::BTreeSet<&&str> = names.iter().collect();
    (unique.len() == names.len()).then_some(names)
}

/// Differences between `live` and `applied` at `path`: (path, applied value, live value).
fn walk(
    path: &mut Vec<Step>,
    live: Option<&Value>,
    applied: Option<&Value>,
    out: &mut Vec<(Vec<Step>, Option<Value>, Option<Value>)>,
) {
    if live == applied {
        return;
    }
    let skipped = match path.as_slice() {
        [Step::Key(first)] => first == "status",
        [Step::Key(first), Step::Key(second)] => {
            first == "metadata" && SERVER_METADATA.contains(&second.as_str())
        }
        _ => false,
    };
    if skipped {
        return;
    }
    match (live, applied) {
        (Some(Value::Object(live)), Some(Value::Object(applied))) => {
            let keys: std::collections::BTreeSet<&String> =
                live.keys().chain(applied.keys()).collect();
            for key in keys {
                path.push(Step::Key(key.clone()));
                walk(path, live.get(key), applied.get(key), out);
                path.pop();
            }
        }
        (Some(Value::Array(live)), Some(Value::Array(applied))) => {
            match (named_items(live), named_items(applied)) {
                (Some(live_names), Some(applied_names)) => {
                    let mut names: Vec<&str> = applied_names.clone();
                    names.extend(live_names.iter().filter(|n| !applied_names.contains(n)));
                    for name in names {
                        let find = |items: &'_ [Value], names: &[&str]| {
                            names
                                .iter()
                                .position(|n| *n == name)
                                .map(|i| items[i].clone())
                        };
                        let (live_item, applied_item) =
                            (find(live, &live_names), find(applied, &applied_names));
                        path.push(Step::Named(name.to_owned()));
                        walk(path, live_item.as_ref(), applied_item.as_ref(), out);
                        path.pop();
                    }
                }
                _ => out.push((
                    path.clone(),
                    Some(Value::Array(applied.clone())),
                    Some(Value::Array(live.clone())),
                )),
            }
        }
        (live, applied) => out.push((path.clone(), applied.cloned(), live.cloned())),
    }
}

/// A value as reported: JSON text, cut to [`MAX_DRIFT_VALUE`] characters.
fn value_text(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= MAX_DRIFT_VALUE {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_DRIFT_VALUE - 1).collect();
    cut.push('…');
    cut
}

/// Whether the field of a `kind` object at `path` holds secret values.
fn secret_field(reference: &ObjectRef, path: &[Step]) -> bool {
    reference.group().is_empty()
        && reference.kind == "Secret"
        && match path {
            [Step::Key(first), ..] => first == "data" || first == "stringData",
            _ => false,
        }
        || matches!(path, [Step::Key(first), Step::Key(second), Step::Key(third), ..]
            if first == "metadata" && second == "annotations"
                && third == "kubectl.kubernetes.io/last-applied-configuration"
                && reference.kind == "Secret")
}

/// The `FieldsV1` key of a step.
fn fields_key(step: &Step) -> String {
    match step {
        Step::Key(key) => format!("f:{key}"),
        Step::Named(name) => format!("k:{}", serde_json::json!({ "name": name })),
    }
}

/// Whether a `FieldsV1` set owns `path` (or an ancestor of it, as a whole).
fn owns(fields: &Value, path: &[Step]) -> bool {
    let mut node = fields;
    for step in path {
        match node.as_object() {
            Some(map) if map.is_empty() => return true,
            Some(map) => match map.get(&fields_key(step)) {
                Some(next) => node = next,
                None => return false,
            },
            None => return false,
        }
    }
    true
}

/// Who owns the live value at `path`, and when they wrote: the owning manager other than
/// `own` with the newest time; for a field nobody owns, the newest other manager that wrote
/// after `own` did.
fn manager_of(live: &Value, path: &[Step], own: &str) -> (Option<String>, Option<String>) {
    let Some(entries) = live["metadata"]["managedFields"].as_array() else {
        return (None, None);
    };
    let time = |entry: &Value| entry["time"].as_str().unwrap_or_default().to_owned();
    let others = entries
        .iter()
        .filter(|entry| entry["manager"].as_str().is_some_and(|m| m != own));
    let owner = others
        .clone()
        .filter(|entry| owns(&entry["fieldsV1"], path))
        .max_by_key(|entry| time(entry));
    let chosen = owner.or_else(|| {
        let ours = entries
            .iter()
            .filter(|entry| entry["manager"].as_str() == Some(own))
            .map(time)
            .max()
            .unwrap_or_default();
        others
            .filter(|entry| time(entry) > ours)
            .max_by_key(|entry| time(entry))
    });
    match chosen {
        Some(entry) => (
            entry["manager"].as_str().map(str::to_owned),
            entry["time"].as_str().map(str::to_owned),
        ),
        None => (None, None),
    }
}

/// The drift of one object: `live` as read before the apply (`None`: deleted), `applied` as
/// the apply (or its dry run) answered. `None` when they agree.
pub fn object_drift(
    reference: &ObjectRef,
    live: Option<&Value>,
    applied: &Value,
    own_manager: &str,
) -> Option<ObjectDrift> {
    let mut drift = ObjectDrift {
        api_version: reference.api_version.clone(),
        kind: reference.kind.clone(),
        namespace: reference.namespace.clone(),
        name: reference.name.clone(),
        deleted: live.is_none(),
        fields: Vec::new(),
        more_fields: 0,
    };
    let Some(live) = live else {
        return Some(drift);
    };
    let mut found = Vec::new();
    walk(&mut Vec::new(), Some(live), Some(applied), &mut found);
    if found.is_empty() {
        return None;
    }
    drift.more_fields = found.len().saturating_sub(MAX_DRIFT_FIELDS) as u32;
    for (path, desired, live_value) in found.into_iter().take(MAX_DRIFT_FIELDS) {
        let secret = secret_field(reference, &path);
        let show = |value: Option<Value>| {
            value.map(|value| match secret {
                true => "\"<redacted>\"".to_owned(),
                false => value_text(&value),
            })
        };
        let (manager, changed_at) = manager_of(live, &path, own_manager);
        drift.fields.push(FieldDrift {
            path: path_text(&path),
            desired: show(desired),
            live: show(live_value),
            manager,
            changed_at,
        });
    }
    Some(drift)
}

/// Keeps at most [`MAX_DRIFT_OBJECTS`] objects; returns how many were left out.
pub fn cap_objects(objects: &mut Vec<ObjectDrift>) -> u32 {
    let more = objects.len().saturating_sub(MAX_DRIFT_OBJECTS) as u32;
    objects.truncate(MAX_DRIFT_OBJECTS);
    more
}

/// What identifies a set of drifted objects for "has it changed since it was reported": the
/// objects, fields and values, not who or when.
pub fn fingerprint(objects: &[ObjectDrift], more_objects: u32) -> Digest {
    let mut parts: Vec<Vec<u8>> = vec![more_objects.to_be_bytes().to_vec()];
    for object in objects {
        let fields: Vec<(&str, &Option<String>, &Option<String>)> = object
            .fields
            .iter()
            .map(|f| (f.path.as_str(), &f.desired, &f.live))
            .collect();
        let text = serde_json::json!([
            object.api_version,
            object.kind,
            object.namespace,
            object.name,
            object.deleted,
            fields,
            object.more_fields
        ]);
        parts.push(text.to_string().into_bytes());
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Digest::of_parts(&parts)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config_map() -> ObjectRef {
        ObjectRef {
            api_version: "v1".to_owned(),
            kind: "ConfigMap".to_owned(),
            namespace: "shop".to_owned(),
            name: "menu".to_owned(),
        }
    }

    fn managed(entries: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "menu", "resourceVersion": "7", "managedFields": entries}})
    }

    #[test]
    fn changed_and_removed_fields_name_their_manager() {
        let mut live = managed(json!([
            {"manager": "outpost-agent", "operation": "Apply", "time": "2026-12-01T10:00:00Z",
             "fieldsV1": {"f:data": {"f:b": {}}}},
            {"manager": "kubectl-edit", "operation": "Update", "time": "2026-12-01T11:00:00Z",
             "fieldsV1": {"f:data": {"f:a": {}, "f:extra": {}}}}
        ]));
        live["data"] = json!({"a": "2", "extra": "x", "b": "1"});
        let mut applied = live.clone();
        applied["data"] = json!({"a": "1", "extra": "x", "b": "1", "c": "3"});
        applied["metadata"]["resourceVersion"] = json!("8");
        let drift = object_drift(&config_map(), Some(&live), &applied, "outpost-agent").unwrap();
        assert!(!drift.deleted);
        assert_eq!(drift.fields.len(), 2, "{drift:?}");
        assert_eq!(drift.fields[0].path, "data.a");
        assert_eq!(drift.fields[0].desired.as_deref(), Some("\"1\""));
        assert_eq!(drift.fields[0].live.as_deref(), Some("\"2\""));
        assert_eq!(drift.fields[0].manager.as_deref(), Some("kubectl-edit"));
        assert_eq!(
            drift.fields[0].changed_at.as_deref(),
            Some("2026-12-01T11:00:00Z")
        );
        // Removed: nobody owns it; the manager that wrote after the agent is named.
        assert_eq!(drift.fields[1].path, "data.c");
        assert_eq!(drift.fields[1].live, None);
        assert_eq!(drift.fields[1].manager.as_deref(), Some("kubectl-edit"));
    }

    #[test]
    fn agreement_status_and_server_metadata_are_no_drift() {
        let live = json!({"metadata": {"name": "m", "resourceVersion": "1", "generation": 1},
            "spec": {"replicas": 2}, "status": {"ready": 1}});
        let applied = json!({"metadata": {"name": "m", "resourceVersion": "2", "generation": 2},
            "spec": {"replicas": 2}, "status": {"ready": 2}});
        assert_eq!(
            object_drift(&config_map(), Some(&live), &applied, "a"),
            None
        );
        let drift = object_drift(&config_map(), None, &applied, "a").unwrap();
        assert!(drift.deleted && drift.fields.is_empty());
    }

    #[test]
    fn named_lists_are_compared_by_name() {
        let live = json!({"spec": {"containers": [
            {"name": "sidecar", "image": "s:1"}, {"name": "web", "image": "web:2"}]}});
        let applied = json!({"spec": {"containers": [
            {"name": "web", "image": "web:1"}, {"name": "sidecar", "image": "s:1"}]}});
        let drift = object_drift(&config_map(), Some(&live), &applied, "a").unwrap();
        assert_eq!(drift.fields.len(), 1);
        assert_eq!(drift.fields[0].path, "spec.containers[name=web].image");
        let live = json!({"spec": {"args": ["a", "b"]}});
        let applied = json!({"spec": {"args": ["a"]}});
        let drift = object_drift(&config_map(), Some(&live), &applied, "a").unwrap();
        assert_eq!(drift.fields[0].path, "spec.args");
        assert_eq!(drift.fields[0].desired.as_deref(), Some("[\"a\"]"));
    }

    #[test]
    fn secret_values_are_redacted_and_long_values_cut() {
        let secret = ObjectRef {
            kind: "Secret".to_owned(),
            ..config_map()
        };
        let live = json!({"data": {"password": "c2VjcmV0"}, "metadata": {"labels": {"a": "x".repeat(500)}}});
        let applied = json!({"data": {"password": "b3RoZXI="}, "metadata": {"labels": {"a": "y"}}});
        let drift = object_drift(&secret, Some(&live), &applied, "a").unwrap();
        assert_eq!(drift.fields[0].path, "data.password");
        assert_eq!(drift.fields[0].live.as_deref(), Some("\"<redacted>\""));
        assert_eq!(drift.fields[0].desired.as_deref(), Some("\"<redacted>\""));
        let text = serde_json::to_string(&drift).unwrap();
        assert!(!text.contains("c2VjcmV0") && !text.contains("b3RoZXI="));
        let label = drift.fields[1].live.as_deref().unwrap();
        assert_eq!(label.chars().count(), MAX_DRIFT_VALUE);
        assert!(label.ends_with('…'));
    }

    #[test]
    fn fingerprints_ignore_who_and_when() {
        let live = managed(json!([{"manager": "x", "time": "t1", "fieldsV1": {"f:data": {}}}]));
        let mut live = live;
        live["data"] = json!({"a": "2"});
        let applied = json!({"data": {"a": "1"}});
        let one = object_drift(&config_map(), Some(&live), &applied, "a").unwrap();
        let mut two = one.clone();
        two.fields[0].manager = Some("y".to_owned());
        two.fields[0].changed_at = Some("t2".to_owned());
        assert_eq!(
            fingerprint(std::slice::from_ref(&one), 0),
            fingerprint(std::slice::from_ref(&two), 0)
        );
        two.fields[0].live = Some("\"3\"".to_owned());
        assert_ne!(fingerprint(&[one], 0), fingerprint(&[two], 0));
        assert_eq!(
            mode_of(&json!({"metadata": {"annotations": {DRIFT_ANNOTATION: "report"}}})),
            Mode::Report
        );
        assert_eq!(mode_of(&json!({"metadata": {}})), Mode::Correct);
    }
}
