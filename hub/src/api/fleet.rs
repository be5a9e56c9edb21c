//! Fleet routes of the admin API and the fleet page, sized for a hundred thousand agents: the
//! page polls counts the store computes and one page of agents, never the whole fleet.
//!
//! - `GET /api/v1/fleet/summary` — counts: agents, connected, revoked, stale, drifted (drift
//!   left in place); per bundle by
//!   phase and by release; per label key its most common values
//! - `GET /api/v1/fleet` — one page of agents (`limit`, default 100, at most 5,000; `after` =
//!   the `next` of the previous page), filtered by `label` (a selector: `k=v,k2=v2,!k3`),
//!   `bundle`, `phase` (`Healthy`, `Failed`, …, `Unknown` = never reported), `release` (a tag
//!   or branch name), `search` (in the id), `connected`, `stale`, `revoked` (`true`/`false`).
//!   Each agent: labels, connected now, last seen, per bundle its assignment (release name,
//!   generation, who assigned it) and its last status. `matched` counts the whole selection.
//! - `GET /` and `GET /fleet` — the page (HTML), `GET /fleet.js` — its script; both public and
//!   data-free: the script asks for an API token and sends it as a header.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminState, ApiError, ApiResult, bad_request, with_store};
use crate::store::{FleetFilter, HubStore, StoreError};

/// The fleet page: static HTML (styles inline) and its script, which asks for an API token,
/// keeps it in the tab's session storage and sends it as a header (no cookies, so no
/// cross-site request forgery).
const FLEET_PAGE: &str = include_str!("fleet.html");
const FLEET_SCRIPT: &str = include_str!("fleet.js");

/// Only our own script runs on the page, it talks only to this hub, and no page may frame it.
const FLEET_PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Agents per page unless `limit` says otherwise, and the most `limit` may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 5_000;
/// Values shown per label key in the summary (the most common first); the rest are counted.
const LABEL_VALUES_SHOWN: usize = 20;

pub(super) async fn fleet_page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, FLEET_PAGE_POLICY),
        ],
        FLEET_PAGE,
    )
}

pub(super) async fn fleet_script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        FLEET_SCRIPT,
    )
}

/// Release names (tags and branches) by bundle and body digest.
type ReleaseNames = HashMap<(String, [u8; 32]), Vec<String>>;

/// Release names by bundle and body digest: the tags and branches whose release is that
/// snapshot, sorted.
fn release_names(store: &dyn HubStore) -> Result<ReleaseNames, StoreError> {
    let mut names: ReleaseNames = HashMap::new();
    let mut digests: HashMap<(String, u64), Option<outpost_proto::Digest>> = HashMap::new();
    for release in store.releases()? {
        let Some(generation) = release.generation else {
            continue;
        };
        let key = (release.bundle.clone(), generation);
        if !digests.contains_key(&key) {
            let digest = store.snapshot_digest(&release.bundle, generation)?;
            digests.insert(key.clone(), digest);
        }
        if let Some(Some(digest)) = digests.get(&key) {
            let name = release
                .git_ref
                .strip_prefix("refs/tags/")
                .or_else(|| release.git_ref.strip_prefix("refs/heads/"))
                .unwrap_or(&release.git_ref)
                .to_owned();
            let entry = names.entry((release.bundle, digest.0)).or_default();
            if !entry.contains(&name) {
                entry.push(name);
            }
        }
    }
    for list in names.values_mut() {
        list.sort();
    }
    Ok(names)
}

/// The fleet list's query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FleetQuery {
    limit: Option<usize>,
    after: Option<String>,
    label: Option<String>,
    bundle: Option<String>,
    phase: Option<String>,
    release: Option<String>,
    search: Option<String>,
    connected: Option<bool>,
    stale: Option<bool>,
    revoked: Option<bool>,
}

const PHASES: [&str; 5] = ["Applying", "Healthy", "Degraded", "Failed", "Unknown"];

/// A parsed label selector: labels to have, keys to lack.
type Selector = (Vec<(String, String)>, Vec<String>);

/// Parses a label selector: `k=v` (has the label), `!k` (lacks the key), comma-separated.
fn parse_selector(text: &str) -> Result<Selector, ApiError> {
    let (mut has, mut lacks) = (Vec::new(), Vec::new());
    for part in text
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        if let Some(key) = part.strip_prefix('!') {
            lacks.push(key.trim().to_owned());
        } else if let Some((key, value)) = part.split_once('=') {
            has.push((key.trim().to_owned(), value.trim().to_owned()));
        } else {
            return Err(bad_request(format!(
                "label selector part {part:?} is neither key=value nor !key (e.g. region=eu,!canary)"
            )));
        }
    }
    Ok((has, lacks))
}

pub(super) async fn fleet(
    State(state): State<AdminState>,
    query: Result<Query<FleetQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) = query.map_err(|rejection| {
        bad_request(format!(
            "{}; known: limit, after, label, bundle, phase, release, search, connected, stale, revoked",
            rejection.body_text()
        ))
    })?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(bad_request(format!(
            "limit must be 1 to {MAX_PAGE}; follow \"next\" for more"
        )));
    }
    if let Some(phase) = &query.phase
        && !PHASES.contains(&phase.as_str())
    {
        return Err(bad_request(format!(
            "unknown phase {phase:?}; one of {}",
            PHASES.join(", ")
        )));
    }
    let (labels, without) = parse_selector(query.label.as_deref().unwrap_or(""))?;
    let now = (state.now)();
    let connected = state.connected.clone();
    with_store(&state, move |store| {
        let names = release_names(store)?;
        let digests = query.release.as_ref().map(|wanted| {
            names
                .iter()
                .filter(|((bundle, _), names)| {
                    query.bundle.as_ref().is_none_or(|only| only == bundle)
                        && names.contains(wanted)
                })
                .map(|((_, digest), _)| outpost_proto::Digest(*digest))
                .collect::<Vec<_>>()
        });
        let filter = FleetFilter {
            labels,
            without,
            bundle: query.bundle.clone(),
            phase: query.phase.clone(),
            digests,
            search: query.search.clone(),
            stale: query.stale,
            revoked: query.revoked,
        };
        let (page, matched, next) = match query.connected {
            // Who is connected is known here, not in the store: filter every selected id.
            Some(want) => {
                let mut ids = store.fleet_ids(&filter)?;
                connected.retain(&mut ids, want);
                let start = match &query.after {
                    Some(after) => ids.partition_point(|id| id <= after),
                    None => 0,
                };
                let page: Vec<String> = ids.iter().skip(start).take(limit).cloned().collect();
                let next = match start + page.len() < ids.len() {
                    true => page.last().cloned(),
                    false => None,
                };
                (page, ids.len() as u64, next)
            }
            None => {
                let found = store.fleet_page(&filter, query.after.as_deref(), limit)?;
                let next = match found.more {
                    true => found.ids.last().cloned(),
                    false => None,
                };
                (found.ids, found.matched, next)
            }
        };
        let details = store.fleet_details(&page)?;
        let mut statuses: BTreeMap<(String, String), Value> = BTreeMap::new();
        let mut heard: HashMap<String, i64> = HashMap::new();
        for stored in details.statuses {
            let status = &stored.status;
            let last = heard.entry(stored.agent.clone()).or_default();
            *last = (*last).max(stored.received_at);
            statuses.insert(
                (stored.agent.clone(), status.bundle.clone()),
                json!({"phase": format!("{:?}", status.phase), "generation": status.generation,
                       "snapshot": status.digest.short(), "message": status.message,
                       "objects_ready": status.objects_ready, "objects_total": status.objects_total,
                       "observed_at": status.observed_at, "stale": status.stale}),
            );
        }
        let mut drift: BTreeMap<(String, String), Value> = details
            .drift
            .into_iter()
            .map(|state| {
                let key = (state.agent.clone(), state.bundle.clone());
                (key, json!({"left_objects": state.left_objects, "left_since": state.left_since,
                    "corrected_objects": state.corrected_objects, "corrected_at": state.corrected_at}))
            })
            .collect();
        let mut assigned: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (row, origin) in details.assignments {
            let release = names
                .get(&(row.bundle.clone(), row.digest.0))
                .map(|names| names.join(", "));
            let status = statuses
                .remove(&(row.agent.clone(), row.bundle.clone()))
                .unwrap_or(Value::Null);
            let drift = drift
                .remove(&(row.agent.clone(), row.bundle.clone()))
                .unwrap_or(Value::Null);
            assigned.entry(row.agent.clone()).or_default().push(json!({
                "bundle": row.bundle, "generation": row.generation, "snapshot": row.digest.short(),
                "release": release, "origin": origin, "status": status, "drift": drift,
            }));
        }
        let agents: Vec<Value> = details
            .agents
            .into_iter()
            .map(|agent| {
                let last_seen = agent
                    .last_seen
                    .into_iter()
                    .chain(heard.get(&agent.id).copied())
                    .max();
                json!({
                    "id": agent.id, "labels": agent.labels, "last_seen": last_seen,
                    "connected": connected.contains(&agent.id),
                    "revoked": agent.revoked.is_some(),
                    "bundles": assigned.remove(&agent.id).unwrap_or_default(),
                })
            })
            .collect();
        Ok(Json(
            json!({"now": now, "agents": agents, "matched": matched, "next": next}),
        ))
    })
    .await
}

pub(super) async fn summary(State(state): State<AdminState>) -> ApiResult {
    let now = (state.now)();
    let connected = state.connected.len();
    with_store(&state, move |store| {
        let names = release_names(store)?;
        let summary = store.fleet_summary()?;
        let mut bundles: BTreeMap<String, (BTreeMap<String, u64>, Vec<Value>)> = BTreeMap::new();
        for (bundle, phase, count) in summary.phases {
            bundles.entry(bundle).or_default().0.insert(phase, count);
        }
        for (bundle, digest, count) in summary.assigned {
            let release = names
                .get(&(bundle.clone(), digest.0))
                .map(|names| names.join(", "));
            bundles.entry(bundle).or_default().1.push(json!({
                "release": release, "snapshot": digest.short(), "agents": count,
            }));
        }
        let bundles: Vec<Value> = bundles
            .into_iter()
            .map(|(bundle, (phases, releases))| {
                json!({"bundle": bundle, "phases": phases, "releases": releases})
            })
            .collect();
        // Values come most common first within each key.
        let mut labels: BTreeMap<String, (Vec<Value>, u64, u64)> = BTreeMap::new();
        for (key, value, count) in summary.labels {
            let entry = labels.entry(key).or_default();
            match entry.0.len() < LABEL_VALUES_SHOWN {
                true => entry.0.push(json!({"value": value, "agents": count})),
                false => {
                    entry.1 += 1;
                    entry.2 += count;
                }
            }
        }
        let labels: Vec<Value> = labels
            .into_iter()
            .map(|(key, (values, more_values, more_agents))| {
                json!({"key": key, "values": values, "more_values": more_values, "more_agents": more_agents})
            })
            .collect();
        Ok(Json(json!({
            "now": now,
            "agents": summary.agents,
            "revoked": summary.revoked,
            "connected": connected,
            "stale": summary.stale,
            "drifted": summary.drifted,
            "bundles": bundles,
            "labels": labels,
        })))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_bad_parts_are_named() {
        let (has, lacks) = parse_selector("region=eu, ring=canary,!retired").unwrap();
        assert_eq!(
            has,
            vec![
                ("region".to_owned(), "eu".to_owned()),
                ("ring".to_owned(), "canary".to_owned())
            ]
        );
        assert_eq!(lacks, vec!["retired".to_owned()]);
        assert!(parse_selector("").unwrap().0.is_empty());
        let error = parse_selector("region").unwrap_err();
        assert!(error.1.contains("\"region\""), "{}", error.1);
    }
}
