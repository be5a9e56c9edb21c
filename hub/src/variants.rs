//! Render variants: which distinct snapshots a bundle needs for the agents it targets.
//!
//! An agent selected by a bundle gets the bundle's manifests, plus those of every overlay whose
//! selector it also matches, with `${label:KEY}` in string values replaced by its labels for the
//! keys the bundle lists under `substitute`. Agents with the same matching overlays and the same
//! substituted values share one snapshot: one [`Variant`]. Pure: no store, no Git.

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::LabelSelector;
use serde_json::Value;

use crate::bundles::BundleDefinition;

/// One distinct render of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Variant {
    /// Indexes of the bundle's overlays applied, ascending.
    pub overlays: Vec<usize>,
    /// Values substituted for `${label:KEY}`, by key.
    pub labels: BTreeMap<String, String>,
}

/// An agent selected by a bundle lacks a label the bundle substitutes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bundle {bundle} substitutes label {key:?}, which the agent does not have; label the agent (outpost-hub agents label)"
)]
pub struct MissingLabel {
    /// The bundle.
    pub bundle: String,
    /// The missing key.
    pub key: String,
}

impl Variant {
    /// A stable text key: empty for the plain bundle, else e.g. `overlays=0,2;region=eu`.
    pub fn key(&self) -> String {
        let mut parts = Vec::new();
        if !self.overlays.is_empty() {
            let indexes: Vec<String> = self.overlays.iter().map(usize::to_string).collect();
            parts.push(format!("overlays={}", indexes.join(",")));
        }
        parts.extend(
            self.labels
                .iter()
                .map(|(key, value)| format!("{key}={value}")),
        );
        parts.join(";")
    }
}

/// The variant an agent with `labels` runs, `None` if the bundle does not select it.
pub fn variant_for(
    definition: &BundleDefinition,
    labels: &BTreeMap<String, String>,
) -> Option<Result<Variant, MissingLabel>> {
    if !definition.selector.matches(labels) {
        return None;
    }
    let overlays = definition
        .overlays
        .iter()
        .enumerate()
        .filter(|(_, overlay)| overlay.selector.matches(labels))
        .map(|(index, _)| index)
        .collect();
    let mut substituted = BTreeMap::new();
    for key in &definition.substitute {
        match labels.get(key) {
            Some(value) => substituted.insert(key.clone(), value.clone()),
            None => {
                return Some(Err(MissingLabel {
                    bundle: definition.name.clone(),
                    key: key.clone(),
                }));
            }
        };
    }
    Some(Ok(Variant {
        overlays,
        labels: substituted,
    }))
}

/// The variants a bundle needs for these agents' labels. The plain variant is always included
/// when the bundle substitutes nothing, so agents that enrol later without overlay labels find
/// a snapshot waiting.
pub fn variants<'a>(
    definition: &BundleDefinition,
    agents: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeSet<Variant> {
    let mut needed: BTreeSet<Variant> = agents
        .into_iter()
        .filter_map(|labels| variant_for(definition, labels))
        .filter_map(Result::ok)
        .collect();
    if definition.substitute.is_empty() {
        needed.insert(Variant::default());
    }
    needed
}

/// The selector a variant is rendered for: the bundle's, its overlays', and its substituted
/// labels, ANDed. Every agent running the variant matches it (it does not exclude agents that
/// match further overlays; [`variant_for`] decides).
pub fn variant_selector(definition: &BundleDefinition, variant: &Variant) -> LabelSelector {
    let mut selector = definition.selector.clone();
    for index in &variant.overlays {
        if let Some(overlay) = definition.overlays.get(*index) {
            selector = selector.and(&overlay.selector);
        }
    }
    match LabelSelector::from_labels(&variant.labels) {
        Ok(labels) => selector.and(&labels),
        // Values came from agent labels, which were validated when they were set.
        Err(_) => selector,
    }
}

/// Replaces `${label:KEY}` in every string of `value` with `labels[KEY]`. Placeholders for keys
/// not in `labels` are left as they are. Types never change: a substituted value stays a string.
pub fn substitute(value: &mut Value, labels: &BTreeMap<String, String>) {
    match value {
        Value::String(text) if text.contains("${label:") => {
            for (key, replacement) in labels {
                let placeholder = format!("${{label:{key}}}");
                if text.contains(&placeholder) {
                    *text = text.replace(&placeholder, replacement);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| substitute(item, labels)),
        Value::Object(map) => map.values_mut().for_each(|item| substitute(item, labels)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundles::parse_definitions;

    fn definition() -> BundleDefinition {
        parse_definitions(
            b"bundles:\n- name: pos\n  path: pos\n  selector: {matchLabels: {role: store}}\n  overlays:\n  - {selector: {matchLabels: {region: eu}}, path: pos-eu}\n  - {selector: {matchLabels: {hw: rpi4}}, path: pos-rpi}\n  substitute: [store-id]\n",
        )
        .unwrap()
        .remove(0)
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_agent_gets_its_overlays_and_values() {
        let d = definition();
        let eu_pi = variant_for(
            &d,
            &labels(&[
                ("role", "store"),
                ("region", "eu"),
                ("hw", "rpi4"),
                ("store-id", "17"),
            ]),
        );
        let variant = eu_pi.unwrap().unwrap();
        assert_eq!(variant.overlays, [0, 1]);
        assert_eq!(variant.key(), "overlays=0,1;store-id=17");
        assert_eq!(
            variant_selector(&d, &variant).to_string(),
            "hw=rpi4,region=eu,role=store,store-id=17"
        );
        assert!(variant_for(&d, &labels(&[("role", "kiosk")])).is_none());
        assert_eq!(
            variant_for(&d, &labels(&[("role", "store")])).unwrap(),
            Err(MissingLabel {
                bundle: "pos".into(),
                key: "store-id".into()
            })
        );
    }

    #[test]
    fn agents_sharing_overlays_and_values_share_a_variant() {
        let d = definition();
        let fleet = [
            labels(&[("role", "store"), ("region", "eu"), ("store-id", "1")]),
            labels(&[
                ("role", "store"),
                ("region", "eu"),
                ("store-id", "1"),
                ("ring", "canary"),
            ]),
            labels(&[("role", "store"), ("region", "us"), ("store-id", "2")]),
            labels(&[("role", "store")]),
            labels(&[("role", "kiosk"), ("store-id", "3")]),
        ];
        let keys: Vec<String> = variants(&d, &fleet).iter().map(Variant::key).collect();
        assert_eq!(keys, ["store-id=2", "overlays=0;store-id=1"]);
        let plain = BundleDefinition {
            overlays: vec![],
            substitute: vec![],
            ..d
        };
        assert_eq!(
            variants(&plain, &[]).len(),
            1,
            "the plain variant is always rendered"
        );
    }

    #[test]
    fn substitution_replaces_placeholders_in_strings_only() {
        let mut value = serde_json::json!({
            "metadata": {"name": "pos-${label:store-id}"},
            "data": {"id": "${label:store-id}", "other": "${label:unknown}", "n": 3},
            "list": ["a-${label:store-id}-b"]
        });
        substitute(&mut value, &labels(&[("store-id", "17")]));
        assert_eq!(
            value,
            serde_json::json!({
                "metadata": {"name": "pos-17"},
                "data": {"id": "17", "other": "${label:unknown}", "n": 3},
                "list": ["a-17-b"]
            })
        );
    }
}
