//! Bundle definitions: which folders of a Git commit are bundles, and which agents each targets.
//!
//! An `outpost.yaml` at the repository root lists them:
//!
//! ```yaml
//! bundles:
//!   - name: pos                 # DNS label: a-z, 0-9, '-', at most 63 characters
//!     path: apps/pos            # folder in the repository
//!     selector:                 # Kubernetes label selector over agent labels; absent = all agents
//!       matchLabels: {role: store}
//!       matchExpressions:
//!         - {key: region, operator: In, values: [eu, uk]}
//!     drift: report             # correct (default): apply drift back; report: leave it, report it
//! ```
//!
//! Without that file, each top-level folder holding manifests (`*.yaml`, `*.yml`, `*.json`, at
//! any depth) is a bundle named after the folder, for all agents.

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::LabelSelector;
use serde::Deserialize;

use crate::git::{GitError, GitSource};

/// The file at the repository root that declares bundles.
pub const DEFINITION_FILE: &str = "outpost.yaml";

/// One bundle as declared at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleDefinition {
    /// Bundle name.
    pub name: String,
    /// Folder in the repository, without leading or trailing `/`.
    pub path: String,
    /// Which agents it targets.
    pub selector: LabelSelector,
    /// Extra manifests for the agents that also match an overlay's selector, in declared order.
    pub overlays: Vec<Overlay>,
    /// Label keys whose values replace `${label:KEY}` in the manifests' string values.
    pub substitute: Vec<String>,
    /// With `drift: report`, agents leave drift in place and report it: every object is
    /// rendered with the annotation `outpost.io/drift: report` (unless it sets its own).
    pub drift_report: bool,
}

/// The annotation that tells agents what to do about an object's drift (`report` or
/// `correct`); the agent reads it (`outpost_agent::drift::DRIFT_ANNOTATION`).
pub const DRIFT_ANNOTATION: &str = "outpost.io/drift";

/// Extra manifests for some of a bundle's agents. An overlay object with the same group, kind,
/// namespace and name as a base object replaces it; others are added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Which of the bundle's agents get it.
    pub selector: LabelSelector,
    /// Its folder in the repository.
    pub path: String,
}

/// Why the bundles of a commit could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// Reading the commit failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// `outpost.yaml` is invalid; every problem is listed.
    #[error("{DEFINITION_FILE} is invalid:\n  - {}", .problems.join("\n  - "))]
    Invalid {
        /// One line per problem.
        problems: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionFile {
    bundles: Vec<BundleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleEntry {
    name: String,
    path: String,
    #[serde(default)]
    selector: Option<SelectorEntry>,
    #[serde(default)]
    overlays: Vec<OverlayEntry>,
    #[serde(default)]
    substitute: Vec<String>,
    #[serde(default)]
    drift: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverlayEntry {
    selector: SelectorEntry,
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelectorEntry {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<ExpressionEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpressionEntry {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

/// Whether a file is a manifest the hub renders.
pub fn is_manifest(path: &str) -> bool {
    [".yaml", ".yml", ".json"]
        .iter()
        .any(|extension| path.ends_with(extension))
        && path.rsplit('/').next() != Some(DEFINITION_FILE)
}

/// The bundles declared at `commit`.
pub fn bundles_at(
    source: &GitSource,
    commit: &str,
) -> Result<Vec<BundleDefinition>, DefinitionError> {
    match source.read_file(commit, DEFINITION_FILE)? {
        Some(bytes) => parse_definitions(&bytes),
        None => Ok(implicit_bundles(&source.list_files(commit, "")?)),
    }
}

/// Parses `outpost.yaml`, listing every problem at once.
pub fn parse_definitions(bytes: &[u8]) -> Result<Vec<BundleDefinition>, DefinitionError> {
    let invalid = |problems: Vec<String>| DefinitionError::Invalid { problems };
    let text = std::str::from_utf8(bytes).map_err(|_| invalid(vec!["not UTF-8".to_owned()]))?;
    let file: DefinitionFile = serde_saphyr::from_str(text).map_err(|error| {
        let place = error
            .location()
            .map(|location| format!("line {}: ", location.line()))
            .unwrap_or_default();
        let message = error.to_string();
        invalid(vec![format!(
            "{place}{}",
            message.lines().next().unwrap_or_default()
        )])
    })?;
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut bundles = Vec::new();
    for (index, entry) in file.bundles.into_iter().enumerate() {
        let at = format!("bundles[{index}] ({})", entry.name);
        if !is_bundle_name(&entry.name) {
            problems.push(format!("{at}: name must be 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit"));
        }
        if !names.insert(entry.name.clone()) {
            problems.push(format!("{at}: name is used by an earlier bundle"));
        }
        let path = folder(&entry.path, &at, &mut problems);
        let selector = match &entry.selector {
            None => Ok(LabelSelector::everything()),
            Some(selector) => selector.parse(),
        };
        let selector = selector.unwrap_or_else(|error| {
            problems.push(format!("{at}: selector: {error}"));
            LabelSelector::everything()
        });
        let mut overlays = Vec::new();
        for (overlay_index, overlay) in entry.overlays.iter().enumerate() {
            let overlay_at = format!("{at}: overlays[{overlay_index}]");
            let path = folder(&overlay.path, &overlay_at, &mut problems);
            match overlay.selector.parse() {
                Ok(selector) if selector.is_everything() => problems.push(format!(
                    "{overlay_at}: an overlay needs a selector that narrows the bundle's agents; put manifests for all agents in the bundle's folder"
                )),
                Ok(selector) => overlays.push(Overlay { selector, path }),
                Err(error) => problems.push(format!("{overlay_at}: selector: {error}")),
            }
        }
        for key in &entry.substitute {
            if outpost_proto::selector::check_key(key).is_err() {
                problems.push(format!(
                    "{at}: substitute: {key:?} is not a valid label key"
                ));
            }
        }
        let drift_report = match entry.drift.as_deref() {
            None | Some("correct") => false,
            Some("report") => true,
            Some(other) => {
                problems.push(format!(
                    "{at}: drift: {other:?} is neither \"correct\" (apply drift back, the default) nor \"report\" (leave it in place and report it)"
                ));
                false
            }
        };
        bundles.push(BundleDefinition {
            name: entry.name,
            path,
            selector,
            overlays,
            substitute: entry.substitute,
            drift_report,
        });
    }
    match problems.is_empty() {
        true => Ok(bundles),
        false => Err(invalid(problems)),
    }
}

impl SelectorEntry {
    fn parse(&self) -> Result<LabelSelector, outpost_proto::selector::SelectorError> {
        LabelSelector::from_parts(
            &self.match_labels,
            &self
                .match_expressions
                .iter()
                .map(|e| (e.key.clone(), e.operator.clone(), e.values.clone()))
                .collect::<Vec<_>>(),
        )
    }
}

/// A folder path inside the repository, without leading or trailing `/`; records a problem for
/// `.` and `..`.
fn folder(path: &str, at: &str, problems: &mut Vec<String>) -> String {
    let trimmed = path.trim_matches('/').to_owned();
    if trimmed.split('/').any(|part| part == ".." || part == ".") {
        problems.push(format!(
            "{at}: path {path:?} must be a folder inside the repository, without '.' or '..'"
        ));
    }
    trimmed
}

/// One bundle per top-level folder that holds manifests, named after it, for all agents.
/// Folders whose names are not valid bundle names are skipped.
pub fn implicit_bundles(paths: &[String]) -> Vec<BundleDefinition> {
    let folders: BTreeSet<&str> = paths
        .iter()
        .filter(|path| is_manifest(path))
        .filter_map(|path| path.split_once('/').map(|(folder, _)| folder))
        .filter(|folder| is_bundle_name(folder))
        .collect();
    folders
        .into_iter()
        .map(|folder| BundleDefinition {
            name: folder.to_owned(),
            path: folder.to_owned(),
            selector: LabelSelector::everything(),
            overlays: Vec::new(),
            substitute: Vec::new(),
            drift_report: false,
        })
        .collect()
}

/// A DNS label: 1-63 of `a-z0-9-`, alphanumeric at both ends.
pub fn is_bundle_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_with_selectors() {
        let bundles = parse_definitions(
            b"bundles:\n- name: pos\n  path: /apps/pos/\n  selector:\n    matchLabels: {role: store}\n    matchExpressions:\n    - {key: region, operator: In, values: [eu, uk]}\n- name: all\n  path: common\n",
        )
        .unwrap();
        assert_eq!(bundles[0].path, "apps/pos");
        assert_eq!(
            bundles[0].selector.to_string(),
            "region in (eu,uk),role=store"
        );
        assert!(bundles[1].selector.is_everything());
    }

    #[test]
    fn overlays_and_substitutions_parse_and_are_checked() {
        let bundles = parse_definitions(
            b"bundles:\n- name: pos\n  path: apps/pos\n  overlays:\n  - {selector: {matchLabels: {region: eu}}, path: apps/pos-eu}\n  substitute: [store-id]\n",
        )
        .unwrap();
        assert_eq!(bundles[0].overlays[0].path, "apps/pos-eu");
        assert_eq!(bundles[0].overlays[0].selector.to_string(), "region=eu");
        assert_eq!(bundles[0].substitute, ["store-id"]);
        let error = parse_definitions(
            b"bundles:\n- name: pos\n  path: p\n  overlays:\n  - {selector: {}, path: q}\n  - {selector: {matchLabels: {a: b}}, path: ../x}\n  substitute: ['bad key']\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("overlays[0]: an overlay needs a selector"),
            "{error}"
        );
        assert!(error.contains("overlays[1]: path"), "{error}");
        assert!(error.contains("substitute: \"bad key\""), "{error}");
    }

    #[test]
    fn every_problem_is_listed() {
        let error = parse_definitions(
            b"bundles:\n- {name: Bad_Name, path: a}\n- {name: x, path: ../etc}\n- {name: x, path: b, selector: {matchExpressions: [{key: k, operator: Gt, values: ['1']}]}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("bundles[0] (Bad_Name): name must be"),
            "{error}"
        );
        assert!(error.contains("bundles[1] (x): path"), "{error}");
        assert!(error.contains("bundles[2] (x): name is used"), "{error}");
        assert!(error.contains("unknown operator"), "{error}");
    }

    #[test]
    fn typos_and_bad_yaml_are_refused_with_a_line() {
        let error =
            parse_definitions(b"bundles:\n- name: a\n  path: a\n  selecter: {}\n").unwrap_err();
        assert!(error.to_string().contains("line"), "{error}");
        assert!(parse_definitions(b"bundles: [\n").is_err());
    }

    #[test]
    fn implicit_bundles_are_top_level_folders_with_manifests() {
        let paths: Vec<String> = [
            "README.md",
            "pos/app.yaml",
            "pos/sub/x.yml",
            "docs/readme.md",
            "Odd Name/a.yaml",
            "top.yaml",
            "kiosk/deep/cm.json",
        ]
        .iter()
        .map(|p| p.to_string())
        .collect();
        let names: Vec<String> = implicit_bundles(&paths)
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, ["kiosk", "pos"]);
    }
}
