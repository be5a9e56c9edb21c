//! Label selectors over agent labels, with Kubernetes semantics: `matchLabels` plus
//! `matchExpressions` with `In`, `NotIn`, `Exists` and `DoesNotExist`, all requirements ANDed; an
//! empty selector selects every agent.
//!
//! The text form is kubectl's `-l` syntax: `region=eu,role in (store,kiosk),!legacy,ring!=canary`.
//! [`LabelSelector`]'s `Display` is canonical (requirements sorted by key and operator, values
//! sorted and deduplicated, `=`/`!=` for single values), so equal selectors print equally; the
//! snapshot header carries that form.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// A parsed, validated selector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector {
    requirements: BTreeSet<Requirement>,
}

/// One requirement on one label key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// What the key's value must satisfy.
    pub operator: Operator,
}

/// The four operators of Kubernetes label selectors.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operator {
    /// The key is present and its value is one of these.
    In(BTreeSet<String>),
    /// The key is absent, or its value is none of these.
    NotIn(BTreeSet<String>),
    /// The key is present.
    Exists,
    /// The key is absent.
    DoesNotExist,
}

/// A selector that does not parse or breaks Kubernetes' label syntax.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    /// The text form does not parse.
    #[error(
        "label selector {text:?}: {message} (expected e.g. 'region=eu,role in (store,kiosk),!legacy')"
    )]
    Syntax {
        /// The selector text.
        text: String,
        /// What is wrong.
        message: String,
    },
    /// A key is not a valid label key.
    #[error(
        "{0:?} is not a valid label key: [prefix/]name, name 1-63 characters of [A-Za-z0-9._-] starting and ending alphanumeric, prefix a DNS subdomain"
    )]
    InvalidKey(String),
    /// A value is not a valid label value.
    #[error(
        "{0:?} is not a valid label value: 0-63 characters of [A-Za-z0-9._-] starting and ending alphanumeric"
    )]
    InvalidValue(String),
    /// `In` or `NotIn` without values, or `Exists` with values.
    #[error("operator {operator} on key {key:?} {message}")]
    Values {
        /// The key.
        key: String,
        /// The operator's name.
        operator: String,
        /// What is wrong.
        message: &'static str,
    },
    /// An operator other than the four Kubernetes knows.
    #[error("unknown operator {0:?}: use In, NotIn, Exists or DoesNotExist")]
    UnknownOperator(String),
}

impl LabelSelector {
    /// The selector that selects everything.
    pub fn everything() -> LabelSelector {
        LabelSelector::default()
    }

    /// Builds a selector from Kubernetes' structured form: `matchLabels` and `matchExpressions`
    /// given as (key, operator name, values).
    pub fn from_parts(
        match_labels: &BTreeMap<String, String>,
        match_expressions: &[(String, String, Vec<String>)],
    ) -> Result<LabelSelector, SelectorError> {
        let mut selector = LabelSelector::default();
        for (key, value) in match_labels {
            selector.add(key, Operator::In(BTreeSet::from([value.clone()])))?;
        }
        for (key, operator, values) in match_expressions {
            let values: BTreeSet<String> = values.iter().cloned().collect();
            let needs_values = |operator: &str| match values.is_empty() {
                true => Err(SelectorError::Values {
                    key: key.clone(),
                    operator: operator.to_owned(),
                    message: "needs at least one value",
                }),
                false => Ok(()),
            };
            let takes_no_values = |operator: &str| match values.is_empty() {
                true => Ok(()),
                false => Err(SelectorError::Values {
                    key: key.clone(),
                    operator: operator.to_owned(),
                    message: "takes no values",
                }),
            };
            let operator = match operator.as_str() {
                "In" => needs_values("In").map(|()| Operator::In(values.clone()))?,
                "NotIn" => needs_values("NotIn").map(|()| Operator::NotIn(values.clone()))?,
                "Exists" => takes_no_values("Exists").map(|()| Operator::Exists)?,
                "DoesNotExist" => {
                    takes_no_values("DoesNotExist").map(|()| Operator::DoesNotExist)?
                }
                other => return Err(SelectorError::UnknownOperator(other.to_owned())),
            };
            selector.add(key, operator)?;
        }
        Ok(selector)
    }

    /// Parses kubectl's text form. The empty string selects everything.
    pub fn parse(text: &str) -> Result<LabelSelector, SelectorError> {
        let syntax = |message: &str| SelectorError::Syntax {
            text: text.to_owned(),
            message: message.to_owned(),
        };
        let mut selector = LabelSelector::default();
        for term in split_terms(text).map_err(&syntax)? {
            let term = term.trim();
            if term.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(syntax("empty requirement between commas"));
            }
            let (key, operator) = if let Some(key) = term.strip_prefix('!') {
                (key.trim(), Operator::DoesNotExist)
            } else if let Some((key, value)) = term.split_once("!=") {
                (
                    key.trim(),
                    Operator::NotIn(BTreeSet::from([value.trim().to_owned()])),
                )
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                (
                    key.trim(),
                    Operator::In(BTreeSet::from([value.trim().to_owned()])),
                )
            } else if let Some((key, values)) = split_set(term, " notin ") {
                (key, Operator::NotIn(parse_set(values).map_err(&syntax)?))
            } else if let Some((key, values)) = split_set(term, " in ") {
                (key, Operator::In(parse_set(values).map_err(&syntax)?))
            } else {
                (term, Operator::Exists)
            };
            selector.add(key, operator)?;
        }
        Ok(selector)
    }

    /// Whether an agent with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|requirement| {
            let value = labels.get(&requirement.key);
            match &requirement.operator {
                Operator::In(values) => value.is_some_and(|value| values.contains(value)),
                Operator::NotIn(values) => value.is_none_or(|value| !values.contains(value)),
                Operator::Exists => value.is_some(),
                Operator::DoesNotExist => value.is_none(),
            }
        })
    }

    /// The selector requiring both this and `other`.
    pub fn and(&self, other: &LabelSelector) -> LabelSelector {
        LabelSelector {
            requirements: self
                .requirements
                .union(&other.requirements)
                .cloned()
                .collect(),
        }
    }

    /// A selector of `key=value` requirements, one per label.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<LabelSelector, SelectorError> {
        LabelSelector::from_parts(labels, &[])
    }

    /// Whether this selects every agent.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, in canonical order.
    pub fn requirements(&self) -> impl Iterator<Item = &Requirement> {
        self.requirements.iter()
    }

    fn add(&mut self, key: &str, operator: Operator) -> Result<(), SelectorError> {
        check_key(key)?;
        if let Operator::In(values) | Operator::NotIn(values) = &operator {
            for value in values {
                check_value(value)?;
            }
        }
        self.requirements.insert(Requirement {
            key: key.to_owned(),
            operator,
        });
        Ok(())
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, requirement) in self.requirements.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            let key = &requirement.key;
            let join =
                |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
            match &requirement.operator {
                Operator::In(values) if values.len() == 1 => write!(f, "{key}={}", join(values))?,
                Operator::In(values) => write!(f, "{key} in ({})", join(values))?,
                Operator::NotIn(values) if values.len() == 1 => {
                    write!(f, "{key}!={}", join(values))?
                }
                Operator::NotIn(values) => write!(f, "{key} notin ({})", join(values))?,
                Operator::Exists => write!(f, "{key}")?,
                Operator::DoesNotExist => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

/// Splits on commas that are not inside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, &'static str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (index, character) in text.char_indices() {
        match character {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested parentheses"),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("unbalanced ')'"),
            ',' if depth == 0 => {
                terms.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed '('");
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn split_set<'a>(term: &'a str, operator: &str) -> Option<(&'a str, &'a str)> {
    let (key, values) = term.split_once(operator)?;
    Some((key.trim(), values.trim()))
}

fn parse_set(values: &str) -> Result<BTreeSet<String>, &'static str> {
    let inner = values
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or("a set of values is written in parentheses: key in (a,b)")?;
    let set: BTreeSet<String> = inner
        .split(',')
        .map(|value| value.trim().to_owned())
        .collect();
    if inner.trim().is_empty() {
        return Err("a set needs at least one value");
    }
    Ok(set)
}

fn is_name(text: &str, max: usize) -> bool {
    let bytes = text.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        && bytes
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Checks a label key against Kubernetes' syntax: `[prefix/]name`.
pub fn check_key(key: &str) -> Result<(), SelectorError> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|prefix| {
        prefix.len() <= 253
            && prefix.split('.').all(|label| {
                is_name(label, 63)
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    match prefix_ok && is_name(name, 63) {
        true => Ok(()),
        false => Err(SelectorError::InvalidKey(key.to_owned())),
    }
}

/// Checks a label value against Kubernetes' syntax (empty is allowed).
pub fn check_value(value: &str) -> Result<(), SelectorError> {
    match value.is_empty() || is_name(value, 63) {
        true => Ok(()),
        false => Err(SelectorError::InvalidValue(value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `check(selector, labels, selected)`: one line per case.
    fn check(selector: &str, agent: &[(&str, &str)], selected: bool) {
        let parsed = LabelSelector::parse(selector).unwrap();
        assert_eq!(
            parsed.matches(&labels(agent)),
            selected,
            "{selector} on {agent:?}"
        );
    }

    #[test]
    fn matching_follows_kubernetes() {
        check("", &[], true);
        check("region=eu", &[("region", "eu")], true);
        check("region==eu", &[("region", "us")], false);
        check("region=eu", &[], false);
        check("region!=eu", &[], true);
        check("region!=eu", &[("region", "eu")], false);
        check("role in (store,kiosk)", &[("role", "kiosk")], true);
        check("role in (store,kiosk)", &[], false);
        check("role notin (store,kiosk)", &[], true);
        check("role notin (store,kiosk)", &[("role", "store")], false);
        check("ring", &[("ring", "")], true);
        check("!ring", &[("ring", "canary")], false);
        check("!ring", &[], true);
        check("region=eu,role=store", &[("region", "eu")], false);
        check(
            "region=eu, role = store",
            &[("region", "eu"), ("role", "store")],
            true,
        );
    }

    #[test]
    fn text_form_is_canonical() {
        let a = LabelSelector::parse("role in (store, kiosk, store),region=eu,!legacy").unwrap();
        let b = LabelSelector::parse("!legacy , region==eu,role in (kiosk,store)").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "!legacy,region=eu,role in (kiosk,store)");
        assert_eq!(LabelSelector::parse(&a.to_string()).unwrap(), a);
        assert_eq!(LabelSelector::everything().to_string(), "");
    }

    #[test]
    fn and_combines_requirements() {
        let a = LabelSelector::parse("region=eu").unwrap();
        let b = LabelSelector::parse("role=store,region=eu").unwrap();
        assert_eq!(a.and(&b).to_string(), "region=eu,role=store");
        assert_eq!(LabelSelector::everything().and(&a), a);
    }

    #[test]
    fn structured_form_equals_text_form() {
        let structured = LabelSelector::from_parts(
            &labels(&[("region", "eu")]),
            &[
                (
                    "role".into(),
                    "In".into(),
                    vec!["store".into(), "kiosk".into()],
                ),
                ("legacy".into(), "DoesNotExist".into(), vec![]),
                ("hw".into(), "Exists".into(), vec![]),
            ],
        )
        .unwrap();
        assert_eq!(
            structured,
            LabelSelector::parse("region=eu,role in (kiosk,store),!legacy,hw").unwrap()
        );
    }

    #[test]
    fn labels_are_checked_on_their_own() {
        assert!(check_key("example.com/store-id").is_ok());
        assert!(matches!(
            check_key("bad key"),
            Err(SelectorError::InvalidKey(_))
        ));
        assert!(matches!(
            check_key("a=b"),
            Err(SelectorError::InvalidKey(_))
        ));
        assert!(check_value("").is_ok());
        assert!(matches!(
            check_value("x y"),
            Err(SelectorError::InvalidValue(_))
        ));
    }

    #[test]
    fn bad_selectors_say_what_is_wrong() {
        for text in ["role in (a", "role in ()", "a=b,,c", "role in a,b", "x)"] {
            assert!(
                matches!(
                    LabelSelector::parse(text),
                    Err(SelectorError::Syntax { .. })
                ),
                "{text}"
            );
        }
        assert!(matches!(
            LabelSelector::parse("-bad=x"),
            Err(SelectorError::InvalidKey(_))
        ));
        assert!(matches!(
            LabelSelector::parse("Example.com/x=y"),
            Err(SelectorError::InvalidKey(_))
        ));
        assert!(LabelSelector::parse("example.com/x=y").is_ok());
        assert!(matches!(
            LabelSelector::parse("a=b c"),
            Err(SelectorError::InvalidValue(_))
        ));
        assert!(matches!(
            LabelSelector::from_parts(&BTreeMap::new(), &[("a".into(), "In".into(), vec![])]),
            Err(SelectorError::Values { .. })
        ));
        assert!(matches!(
            LabelSelector::from_parts(
                &BTreeMap::new(),
                &[("a".into(), "Exists".into(), vec!["x".into()])]
            ),
            Err(SelectorError::Values { .. })
        ));
        assert!(matches!(
            LabelSelector::from_parts(
                &BTreeMap::new(),
                &[("a".into(), "Gt".into(), vec!["1".into()])]
            ),
            Err(SelectorError::UnknownOperator(_))
        ));
    }
}
