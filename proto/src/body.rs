//! Canonical snapshot bodies: the bundle's objects, normalised and ordered for apply.
//!
//! The canonical text form is one object per line, each line the object as compact JSON with
//! object keys sorted by their UTF-8 bytes, strings escaped as RFC 8259 minimally requires
//! (serde_json's escaping), numbers as integers or shortest round-trip floats, `\n` after every
//! object. Objects are ordered Namespaces first, then CustomResourceDefinitions, then by
//! group/kind/namespace/name. The same objects give the same bytes whatever the files' formatting,
//! key order, comments or split into files; a one-field edit in Git changes bytes in one line only,
//! which is what makes deltas small. JSON, not YAML, because every Kubernetes client reads it,
//! its canonical form is simple to pin, and it parses back without ambiguity on the agent.

use std::io::Write as _;

use serde_json::Value;

use crate::digest::Digest;
use crate::manifest::{self, ManifestError, Object, ObjectKey, SourceFile};

/// The canonical body of a snapshot. Built only from objects (or by a verified snapshot), so its
/// bytes are always canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    bytes: Vec<u8>,
    object_count: u64,
}

/// A body's text that does not parse back into objects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// Line `line` is not a JSON object.
    #[error("snapshot body line {line}: not a JSON object: {message}")]
    NotAnObject {
        /// 1-based line.
        line: usize,
        /// What the JSON reader said.
        message: String,
    },
    /// The body does not end with a newline.
    #[error("snapshot body does not end with a newline")]
    Unterminated,
}

impl Body {
    /// Renders the objects of all `files` into a canonical body. Duplicate objects are an error
    /// naming both places.
    pub fn render(files: &[SourceFile<'_>]) -> Result<Body, ManifestError> {
        let mut objects = Vec::new();
        for file in files {
            objects.extend(manifest::parse_file(*file)?);
        }
        Body::from_objects(objects)
    }

    /// Orders `objects` for apply and writes them canonically.
    pub fn from_objects(mut objects: Vec<Object>) -> Result<Body, ManifestError> {
        objects.sort_by(|a, b| apply_order(&a.key).cmp(&apply_order(&b.key)));
        for pair in objects.windows(2) {
            if pair[0].key == pair[1].key {
                return Err(ManifestError::Duplicate {
                    key: Box::new(pair[0].key.clone()),
                    first: pair[0].origin.clone(),
                    second: pair[1].origin.clone(),
                });
            }
        }
        let mut bytes = Vec::new();
        for object in &objects {
            write_canonical(&object.value, &mut bytes);
            bytes.push(b'\n');
        }
        Ok(Body {
            bytes,
            object_count: objects.len() as u64,
        })
    }

    /// Wraps bytes already checked against a signed digest (see `verify`).
    pub(crate) fn from_verified_bytes(bytes: Vec<u8>, object_count: u64) -> Body {
        Body {
            bytes,
            object_count,
        }
    }

    /// The canonical bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives up the bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// SHA-256 of the bytes: the snapshot's name.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.bytes)
    }

    /// Number of objects.
    pub fn object_count(&self) -> u64 {
        self.object_count
    }

    /// The objects in apply order, parsed back from the canonical text.
    pub fn objects(&self) -> impl Iterator<Item = Result<Value, BodyError>> + '_ {
        parse_lines(&self.bytes)
    }
}

/// Counts the objects of canonical body bytes (one per line) without parsing them.
pub fn count_objects(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&byte| byte == b'\n').count() as u64
}

/// Parses canonical body bytes into objects, line by line.
pub fn parse_lines(bytes: &[u8]) -> impl Iterator<Item = Result<Value, BodyError>> + '_ {
    let unterminated = !bytes.is_empty() && bytes.last() != Some(&b'\n');
    let lines = bytes
        .split(|&byte| byte == b'\n')
        .take(count_objects(bytes) as usize);
    lines
        .enumerate()
        .map(
            |(index, line)| match serde_json::from_slice::<Value>(line) {
                Ok(value @ Value::Object(_)) => Ok(value),
                Ok(_) => Err(BodyError::NotAnObject {
                    line: index + 1,
                    message: "a JSON value other than an object".to_owned(),
                }),
                Err(error) => Err(BodyError::NotAnObject {
                    line: index + 1,
                    message: error.to_string(),
                }),
            },
        )
        .chain(unterminated.then_some(Err(BodyError::Unterminated)))
}

/// The sort key that puts objects in apply order.
fn apply_order(key: &ObjectKey) -> (u8, &str, &str, &str, &str) {
    let rank = match (key.group.as_str(), key.kind.as_str()) {
        ("", "Namespace") => 0,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => 1,
        _ => 2,
    };
    (rank, &key.group, &key.kind, &key.namespace, &key.name)
}

/// Writes `value` as canonical JSON. Keys are sorted here, whatever map type serde_json was built
/// with, so a dependency enabling `serde_json/preserve_order` cannot change our bytes.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{number}");
        }
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
    }
}

fn write_string(text: &str, out: &mut Vec<u8>) {
    // serde_json escapes only what JSON requires (quote, backslash, control characters).
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(files: &[(&str, &str)]) -> Body {
        let files: Vec<SourceFile<'_>> = files
            .iter()
            .map(|(path, text)| SourceFile { path, text })
            .collect();
        Body::render(&files).unwrap()
    }

    const DEPLOY: &str = "# web tier\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: shop\n  labels: {app: web}\nspec:\n  replicas: 2\n  template:\n    spec:\n      containers:\n      - name: web\n        image: \"nginx:1.27\"\n";
    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";
    const CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n";
    const SERVICE: &str = "kind: Service\napiVersion: v1\nmetadata: {namespace: shop, name: web}\nspec: {ports: [{port: 80}], selector: {app: web}}\n";

    /// Golden: pins the canonical bytes of a small fixture. If this changes, every deployed
    /// snapshot digest changes: bump the format version instead.
    #[test]
    fn golden_canonical_bytes() {
        let body = render(&[
            ("a.yaml", &format!("{DEPLOY}---\n{SERVICE}")),
            ("b.yaml", &format!("{CRD}---\n{NAMESPACE}")),
        ]);
        let expected = concat!(
            r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop"}}"#,
            "\n",
            r#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"CustomResourceDefinition","metadata":{"name":"widgets.example.com"},"spec":{"group":"example.com"}}"#,
            "\n",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop"},"spec":{"ports":[{"port":80}],"selector":{"app":"web"}}}"#,
            "\n",
            r#"{"apiVersion":"apps/v1","kind":"Deployment","metadata":{"labels":{"app":"web"},"name":"web","namespace":"shop"},"spec":{"replicas":2,"template":{"spec":{"containers":[{"image":"nginx:1.27","name":"web"}]}}}}"#,
            "\n",
        );
        assert_eq!(std::str::from_utf8(body.as_bytes()).unwrap(), expected);
        assert_eq!(body.object_count(), 4);
        assert_eq!(
            body.digest().to_hex(),
            Digest::of(expected.as_bytes()).to_hex()
        );
    }

    #[test]
    fn same_objects_same_bytes_whatever_the_files() {
        let one_file = render(&[(
            "all.yaml",
            &format!("{NAMESPACE}---\n{CRD}---\n{SERVICE}---\n{DEPLOY}"),
        )]);
        // Reordered, split differently, keys reordered, reformatted, comments added.
        let reformatted_deploy = "kind: Deployment # the web tier\nspec:\n  template: {spec: {containers: [{image: 'nginx:1.27', name: web}]}}\n  replicas: 2\nmetadata: {labels: {app: web}, namespace: shop, name: web}\napiVersion: apps/v1\n";
        let split = render(&[
            ("z.yaml", reformatted_deploy),
            ("y.yaml", &format!("---\n{SERVICE}\n---\n# trailing\n")),
            ("x/crd.yaml", CRD),
            ("ns.yml", NAMESPACE),
        ]);
        assert_eq!(one_file, split);
        let as_list = render(&[(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n",
        )]);
        assert_eq!(as_list, render(&[("ns.yaml", NAMESPACE)]));
    }

    #[test]
    fn duplicates_are_refused_naming_both_places() {
        let files = [
            SourceFile {
                path: "a.yaml",
                text: SERVICE,
            },
            SourceFile {
                path: "b.yaml",
                text: SERVICE,
            },
        ];
        let error = Body::render(&files).unwrap_err();
        assert!(
            error.to_string().contains("a.yaml#1") && error.to_string().contains("b.yaml#1"),
            "{error}"
        );
    }

    #[test]
    fn objects_parse_back_in_order() {
        let body = render(&[("a.yaml", &format!("{DEPLOY}---\n{NAMESPACE}"))]);
        let kinds: Vec<String> = body
            .objects()
            .map(|object| object.unwrap()["kind"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kinds, ["Namespace", "Deployment"]);
        assert_eq!(count_objects(body.as_bytes()), 2);
    }

    #[test]
    fn bad_body_text_is_an_error_not_a_panic() {
        let results: Vec<_> = parse_lines(b"{\"a\":1}\n[1]\n{oops\n{}").collect();
        assert!(results[0].is_ok());
        assert!(matches!(
            results[1],
            Err(BodyError::NotAnObject { line: 2, .. })
        ));
        assert!(matches!(
            results[2],
            Err(BodyError::NotAnObject { line: 3, .. })
        ));
        assert_eq!(results[3], Err(BodyError::Unterminated));
    }

    #[test]
    fn strings_escape_only_what_json_requires() {
        let body = render(&[(
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: \"tab\\there \\\"q\\\" é ✓\\n\"}\n",
        )]);
        let text = std::str::from_utf8(body.as_bytes()).unwrap();
        assert!(text.contains(r#""k":"tab\there \"q\" é ✓\n""#), "{text}");
    }
}
