//! Structural diffs of Kubernetes objects: which objects two snapshot bodies add, remove and
//! change, and for a changed object the field paths whose values differ, with both values.
//! Pure. Secret values (`data`, `stringData`) are never shown: a changed Secret value reads
//! `<redacted>` on both sides.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// What identifies an object across bodies: API group, kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ObjectId {
    /// `apps/v1`, `v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.namespace.is_empty() {
            true => write!(f, "{} {}", self.kind, self.name),
            false => write!(f, "{} {}/{}", self.kind, self.namespace, self.name),
        }
    }
}

impl ObjectId {
    /// The id of `object`.
    pub fn of(object: &Value) -> ObjectId {
        let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
        ObjectId {
            api_version: text(&object["apiVersion"]),
            kind: text(&object["kind"]),
            namespace: text(&object["metadata"]["namespace"]),
            name: text(&object["metadata"]["name"]),
        }
    }

    /// The group, for matching across API versions (`apps` of `apps/v1`; empty for core).
    fn group(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    }

    fn key(&self) -> (String, String, String, String) {
        (
            self.group().to_owned(),
            self.kind.clone(),
            self.namespace.clone(),
            self.name.clone(),
        )
    }
}

/// One field that differs: its path (`spec.template.spec.containers[0].image`) and values
/// (`None`: absent on that side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Dotted path; list items as `[i]`; keys with dots or brackets quoted (`["a.b"]`).
    pub path: String,
    /// The value before (absent: `None`).
    pub from: Option<Value>,
    /// The value after (absent: `None`).
    pub to: Option<Value>,
}

/// What a change of body does to the objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BodyDiff {
    /// Objects only after.
    pub added: Vec<ObjectId>,
    /// Objects only before.
    pub removed: Vec<ObjectId>,
    /// Objects in both that differ, with their changed fields.
    pub changed: Vec<(ObjectId, Vec<FieldChange>)>,
    /// Objects in both, equal.
    pub unchanged: usize,
}

impl BodyDiff {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The diff from the objects `before` to the objects `after`.
pub fn bodies(before: &[Value], after: &[Value]) -> BodyDiff {
    let index = |objects: &[Value]| -> BTreeMap<_, (ObjectId, Value)> {
        objects
            .iter()
            .map(|object| {
                let id = ObjectId::of(object);
                (id.key(), (id, object.clone()))
            })
            .collect()
    };
    let (before, after) = (index(before), index(after));
    let mut diff = BodyDiff::default();
    for (key, (id, old)) in &before {
        match after.get(key) {
            None => diff.removed.push(id.clone()),
            Some((new_id, new)) => {
                let changes = objects(old, new);
                if changes.is_empty() {
                    diff.unchanged += 1;
                } else {
                    diff.changed.push((new_id.clone(), changes));
                }
            }
        }
    }
    for (key, (id, _)) in &after {
        if !before.contains_key(key) {
            diff.added.push(id.clone());
        }
    }
    diff
}

/// The fields that differ from `before` to `after` (one object), Secret values redacted.
pub fn objects(before: &Value, after: &Value) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    walk("", before, after, &mut changes);
    let secret = |object: &Value| object["kind"] == "Secret" && object["apiVersion"] == "v1";
    if secret(before) || secret(after) {
        for change in &mut changes {
            if change.path.starts_with("data") || change.path.starts_with("stringData") {
                let hide = |value: &mut Option<Value>| {
                    if value.is_some() {
                        *value = Some(Value::String("<redacted>".to_owned()));
                    }
                };
                hide(&mut change.from);
                hide(&mut change.to);
            }
        }
    }
    changes
}

fn child(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '/');
    match (path.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{}]", Value::String(key.to_owned())),
    }
}

fn walk(path: &str, before: &Value, after: &Value, out: &mut Vec<FieldChange>) {
    match (before, after) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, value) in old {
                match new.get(key) {
                    Some(other) => walk(&child(path, key), value, other, out),
                    None => out.push(FieldChange {
                        path: child(path, key),
                        from: Some(value.clone()),
                        to: None,
                    }),
                }
            }
            for (key, value) in new {
                if !old.contains_key(key) {
                    out.push(FieldChange {
                        path: child(path, key),
                        from: None,
                        to: Some(value.clone()),
                    });
                }
            }
        }
        (Value::Array(old), Value::Array(new)) if old.len() == new.len() => {
            for (index, (a, b)) in old.iter().zip(new).enumerate() {
                walk(&format!("{path}[{index}]"), a, b, out);
            }
        }
        (old, new) if old != new => out.push(FieldChange {
            path: if path.is_empty() {
                ".".to_owned()
            } else {
                path.to_owned()
            },
            from: Some(old.clone()),
            to: Some(new.clone()),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(image: &str, replicas: u64) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "shop", "namespace": "default"},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                   {"name": "shop", "image": image}]}}}})
    }

    #[test]
    fn changed_fields_are_named_with_both_values() {
        let changes = objects(&deployment("shop:1", 1), &deployment("shop:2", 3));
        assert_eq!(
            changes,
            vec![
                FieldChange {
                    path: "spec.replicas".to_owned(),
                    from: Some(json!(1)),
                    to: Some(json!(3)),
                },
                FieldChange {
                    path: "spec.template.spec.containers[0].image".to_owned(),
                    from: Some(json!("shop:1")),
                    to: Some(json!("shop:2")),
                },
            ]
        );
        let labelled = json!({"metadata": {"labels": {"app.kubernetes.io/name": "x"}}});
        let changes = objects(&json!({"metadata": {}}), &labelled);
        assert_eq!(changes[0].path, "metadata.labels");
        let changes = objects(
            &json!({"metadata": {"labels": {}}}),
            &json!({"metadata": {"labels": {"a.b/c": "x"}}}),
        );
        assert_eq!(changes[0].path, "metadata.labels[\"a.b/c\"]");
    }

    #[test]
    fn bodies_added_removed_changed_and_unchanged() {
        let config = |name: &str, value: &str| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": "default"}, "data": {"v": value}})
        };
        let before = vec![
            deployment("shop:1", 1),
            config("a", "1"),
            config("gone", "1"),
        ];
        let after = vec![
            deployment("shop:1", 1),
            config("a", "2"),
            config("new", "1"),
        ];
        let diff = bodies(&before, &after);
        assert_eq!(diff.unchanged, 1);
        assert_eq!(diff.added.len(), 1);
        assert_eq!(diff.added[0].name, "new");
        assert_eq!(diff.removed[0].name, "gone");
        assert_eq!(diff.changed[0].0.name, "a");
        assert_eq!(diff.changed[0].1[0].path, "data.v");
        assert!(bodies(&after, &after).is_empty());
    }

    #[test]
    fn secret_values_never_show() {
        let secret = |value: &str| {
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s", "namespace": "default", "labels": {"v": value}},
                   "data": {"password": value}})
        };
        let changes = objects(&secret("aHVudGVyMg=="), &secret("c2VjcmV0"));
        let data = changes.iter().find(|c| c.path == "data.password").unwrap();
        assert_eq!(data.from, Some(json!("<redacted>")));
        assert_eq!(data.to, Some(json!("<redacted>")));
        // Labels are not secret: they still show.
        let label = changes
            .iter()
            .find(|c| c.path == "metadata.labels.v")
            .unwrap();
        assert_eq!(label.to, Some(json!("c2VjcmV0")));
    }
}
