//! Kubernetes manifests in, objects out: multi-document YAML as `kubectl apply -f` accepts it.
//!
//! `---` separated documents, comments, anchors, aliases and merge keys are understood; empty
//! documents are skipped; `kind: List` (and any `*List` kind with `items`) is flattened. Scalars
//! are typed the way Kubernetes' own YAML reader types them (YAML 1.1: `yes`/`on` are booleans,
//! `0644` is octal), so `defaultMode: 0644` means 420 here as it does in `kubectl`.

use serde_json::Value;

/// One file of manifests, as read from a bundle folder.
#[derive(Debug, Clone, Copy)]
pub struct SourceFile<'a> {
    /// Path inside the bundle, used in error messages.
    pub path: &'a str,
    /// The file's text.
    pub text: &'a str,
}

/// Who an object is in the cluster: its group, kind, namespace and name. Two objects with the same
/// key in one bundle are an error.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// API group, empty for the core group (`v1`).
    pub group: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// `metadata.namespace`, empty when the manifest names none.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

/// A parsed Kubernetes object with the place it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Identity in the cluster.
    pub key: ObjectKey,
    /// The whole object as a JSON value.
    pub value: Value,
    /// `path#document` it was read from.
    pub origin: String,
}

/// Why a manifest file could not be read into objects.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The YAML itself does not parse.
    #[error("{path}:{line}:{column}: invalid YAML: {message}")]
    Yaml {
        /// File path.
        path: String,
        /// 1-based line (0 when the parser gave none).
        line: u64,
        /// 1-based column.
        column: u64,
        /// What the parser said.
        message: String,
    },
    /// A document lacks a field every Kubernetes object needs.
    #[error(
        "{path}: document {document} (line {line}): missing {field}; every object needs apiVersion, kind and metadata.name"
    )]
    MissingField {
        /// File path.
        path: String,
        /// 1-based index among the file's non-empty documents.
        document: usize,
        /// Line where the document starts.
        line: u64,
        /// The missing field, e.g. `metadata.name`.
        field: &'static str,
    },
    /// A field is there but of the wrong type, e.g. `kind: 3`.
    #[error("{path}: document {document} (line {line}): {field} must be {expected}")]
    InvalidField {
        /// File path.
        path: String,
        /// 1-based index among the file's non-empty documents.
        document: usize,
        /// Line where the document starts.
        line: u64,
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// Two documents declare the same object.
    #[error("{} {}/{} (group {:?}) is declared twice: in {first} and in {second}", .key.kind, .key.namespace, .key.name, .key.group)]
    Duplicate {
        /// The object declared twice.
        key: Box<ObjectKey>,
        /// Where it was first declared.
        first: String,
        /// Where it was declared again.
        second: String,
    },
}

/// Lists nested deeper than this are refused (a `List` inside a `List` is legal but rare).
const MAX_LIST_NESTING: usize = 8;

/// Parses one file into objects, in file order.
pub fn parse_file(file: SourceFile<'_>) -> Result<Vec<Object>, ManifestError> {
    let documents: Vec<serde_saphyr::Spanned<Value>> =
        serde_saphyr::from_multiple_with_options(file.text, yaml_options()).map_err(|error| {
            let (line, column) = error
                .location()
                .map_or((0, 0), |location| (location.line(), location.column()));
            ManifestError::Yaml {
                path: file.path.to_owned(),
                line,
                column,
                message: first_line(&error.to_string()),
            }
        })?;
    let mut objects = Vec::with_capacity(documents.len());
    for (index, document) in documents.into_iter().enumerate() {
        let place = Place {
            path: file.path,
            document: index + 1,
            line: document.referenced.line(),
        };
        flatten_into(document.value, &place, 0, &mut objects)?;
    }
    Ok(objects)
}

/// Where a document sits, for error messages.
struct Place<'a> {
    path: &'a str,
    document: usize,
    line: u64,
}

impl Place<'_> {
    fn missing(&self, field: &'static str) -> ManifestError {
        ManifestError::MissingField {
            path: self.path.to_owned(),
            document: self.document,
            line: self.line,
            field,
        }
    }

    fn invalid(&self, field: &'static str, expected: &'static str) -> ManifestError {
        ManifestError::InvalidField {
            path: self.path.to_owned(),
            document: self.document,
            line: self.line,
            field,
            expected,
        }
    }
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            // Kubernetes objects nest a few dozen levels at most; deeper input is refused before
            // it can exhaust a thread's stack in the recursive steps after parsing.
            max_depth: 64,
            max_documents: 100_000,
            max_nodes: 20_000_000,
        },
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        legacy_octal_numbers: true,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::Reject,
        with_snippet: false,
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().trim().to_owned()
}

fn flatten_into(
    value: Value,
    place: &Place<'_>,
    depth: usize,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let Value::Object(map) = value else {
        return match value {
            Value::Null => Ok(()),
            _ => Err(place.invalid("the document", "a mapping (a Kubernetes object)")),
        };
    };
    let kind = match map.get("kind") {
        None => return Err(place.missing("kind")),
        Some(Value::String(kind)) if !kind.is_empty() => kind.clone(),
        Some(_) => return Err(place.invalid("kind", "a non-empty string")),
    };
    if kind.ends_with("List")
        && let Some(items) = map.get("items")
    {
        let Value::Array(items) = items else {
            return Err(place.invalid("items", "a list of objects"));
        };
        if depth >= MAX_LIST_NESTING {
            return Err(place.invalid("items", "nested at most 8 Lists deep"));
        }
        for item in items.clone() {
            flatten_into(item, place, depth + 1, out)?;
        }
        return Ok(());
    }
    let api_version = match map.get("apiVersion") {
        None => return Err(place.missing("apiVersion")),
        Some(Value::String(version)) if !version.is_empty() => version.as_str(),
        Some(_) => return Err(place.invalid("apiVersion", "a non-empty string")),
    };
    let group = match api_version.rsplit_once('/') {
        Some((group, _version)) => group.to_owned(),
        None => String::new(),
    };
    let metadata = match map.get("metadata") {
        None => return Err(place.missing("metadata")),
        Some(Value::Object(metadata)) => metadata,
        Some(_) => return Err(place.invalid("metadata", "a mapping")),
    };
    let name = match metadata.get("name") {
        None => return Err(place.missing("metadata.name")),
        Some(Value::String(name)) if !name.is_empty() => name.clone(),
        Some(_) => return Err(place.invalid("metadata.name", "a non-empty string")),
    };
    let namespace = match metadata.get("namespace") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(namespace)) => namespace.clone(),
        Some(_) => return Err(place.invalid("metadata.namespace", "a string")),
    };
    out.push(Object {
        key: ObjectKey {
            group,
            kind,
            namespace,
            name,
        },
        value: Value::Object(map),
        origin: format!("{}#{}", place.path, place.document),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
        parse_file(SourceFile {
            path: "app/deploy.yaml",
            text,
        })
    }

    fn keys(text: &str) -> Vec<String> {
        parse(text)
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}/{}/{}",
                    o.key.group, o.key.kind, o.key.namespace, o.key.name
                )
            })
            .collect()
    }

    #[test]
    fn multi_document_with_comments_and_empty_documents() {
        let text = "# leading comment\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: x\n---\n---\n# only a comment\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
        assert_eq!(keys(text), ["/ConfigMap/x/a", "apps/Deployment//web"]);
    }

    #[test]
    fn lists_are_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: s}\n- apiVersion: v1\n  kind: List\n  items:\n  - {apiVersion: v1, kind: Secret, metadata: {name: t}}\n";
        assert_eq!(keys(text), ["/Service//s", "/Secret//t"]);
    }

    #[test]
    fn anchors_and_merge_keys_are_expanded() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  labels: &common {app: web, tier: front}\n  annotations:\n    <<: *common\n    extra: 'yes'\n";
        let objects = parse(text).unwrap();
        assert_eq!(
            objects[0].value["metadata"]["annotations"],
            serde_json::json!({"app": "web", "tier": "front", "extra": "yes"})
        );
    }

    #[test]
    fn scalars_are_typed_like_kubectl() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\nspec: {mode: 0644, on: yes, n: 3, f: 1.5, s: '0644'}\n";
        let spec = &parse(text).unwrap()[0].value["spec"];
        assert_eq!(spec["mode"], serde_json::json!(420));
        assert_eq!(spec["n"], serde_json::json!(3));
        assert_eq!(spec["f"], serde_json::json!(1.5));
        assert_eq!(spec["s"], serde_json::json!("0644"));
    }

    #[test]
    fn missing_fields_name_file_document_and_field() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {labels: {a: b}}\n";
        let error = parse(text).unwrap_err();
        assert!(
            matches!(&error, ManifestError::MissingField { path, document: 2, field: "metadata.name", line: 5 } if path == "app/deploy.yaml"),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .contains("app/deploy.yaml: document 2 (line 5): missing metadata.name")
        );
        for (text, field) in [
            ("kind: A\nmetadata: {name: a}\n", "apiVersion"),
            ("apiVersion: v1\nmetadata: {name: a}\n", "kind"),
            ("apiVersion: v1\nkind: A\n", "metadata"),
        ] {
            assert!(
                matches!(parse(text), Err(ManifestError::MissingField { field: f, .. }) if f == field),
                "{text}"
            );
        }
    }

    #[test]
    fn wrong_types_and_bad_yaml_are_errors_with_places() {
        assert!(matches!(
            parse("apiVersion: v1\nkind: 3\nmetadata: {name: a}\n"),
            Err(ManifestError::InvalidField { field: "kind", .. })
        ));
        assert!(matches!(
            parse("- a\n- b\n"),
            Err(ManifestError::InvalidField { .. })
        ));
        let error = parse("apiVersion: v1\nkind: A\nmetadata: {name: a\n").unwrap_err();
        assert!(
            matches!(&error, ManifestError::Yaml { line, .. } if *line > 0),
            "{error:?}"
        );
        assert!(matches!(
            parse("apiVersion: v1\nkind: A\nkind: B\nmetadata: {name: a}\n"),
            Err(ManifestError::Yaml { .. })
        ));
        assert!(matches!(
            parse("apiVersion: v1\nkind: A\nmetadata: {name: a}\nx: .nan\n"),
            Err(ManifestError::Yaml { .. })
        ));
    }
}
