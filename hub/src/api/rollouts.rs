//! Rollout and fleet routes of the admin API, and the fleet page.
//!
//! - `GET /api/v1/rollouts` — every rollout, newest first, with per-wave progress
//! - `POST /api/v1/rollouts` — create: `{"bundle", "tag", "selector", "waves": "1,10%,100%",
//!   "health_timeout_seconds", "max_failures": "2%", "on_failure": "pause"|"rollback", "why"}`
//! - `GET /api/v1/rollouts/{id}` — one rollout with its members and history
//! - `POST /api/v1/rollouts/{id}/{pause|resume|abort|rollback}` — `{"why": "..."}`
//! - `GET /api/v1/fleet` — every agent: labels, connected now, last seen (last connection or
//!   report), per bundle its assignment (release name, generation, who assigned it) and its
//!   last status
//! - `GET /` and `GET /fleet` — the fleet page (HTML; it polls the two lists above)

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Operator;
use super::{AdminState, ApiError, ApiResult, check_why, with_store};
use crate::rollout::machine::{Command, OnFailure, Rollout};
use crate::rollout::{self, CommandFailure, CreateError, Request};

/// The fleet page: static HTML (styles inline) and its script, which asks for an API token,
/// keeps it in the tab's session storage and sends it as a header (no cookies, so no
/// cross-site request forgery).
const FLEET_PAGE: &str = include_str!("fleet.html");
const FLEET_SCRIPT: &str = include_str!("fleet.js");

/// Only our own script runs on the page, it talks only to this hub, and no page may frame it.
const FLEET_PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

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

/// A rollout for the API: its fields, per-wave progress and counts; members and history only
/// when `full`.
pub fn rollout_json(rollout: &Rollout, full: bool) -> Value {
    let plan = &rollout.plan;
    let mut value = json!({
        "id": rollout.id,
        "bundle": plan.bundle,
        "ref": plan.git_ref,
        "commit": plan.git_commit,
        "selector": plan.selector,
        "waves_planned": plan.waves.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "health_timeout_seconds": plan.health_timeout,
        "max_failures": plan.max_failures.to_string(),
        "on_failure": plan.on_failure,
        "phase": rollout.phase.name(),
        "reason": match &rollout.phase {
            crate::rollout::machine::Phase::Paused { reason } => Some(reason.clone()),
            _ => None,
        },
        "wave": rollout.wave + 1,
        "waves": rollout.waves(),
        "members": rollout.members.len(),
        "on_release": rollout.on_release(),
        "allowed": rollout.allowed(),
        "failures": rollout.failures(),
        "budget": rollout.budget(),
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "created_by": rollout.log.first().map(|record| record.who.clone()),
    });
    if full {
        value["agents"] = rollout
            .members
            .iter()
            .map(|(id, member)| {
                json!({
                    "agent": id, "state": member.state.name(), "canary": member.canary,
                    "wave": member.wave.map(|wave| wave + 1), "released_at": member.released_at,
                    "detail": match &member.state {
                        crate::rollout::machine::MemberState::Failed { message } => Some(message.clone()),
                        crate::rollout::machine::MemberState::Restored { was, .. } => Some(format!("was {was}")),
                        _ => member.report.clone(),
                    },
                    "previous": member.previous.as_ref().map(|previous| json!({"generation": previous.generation, "snapshot": previous.digest.short()})),
                })
            })
            .collect();
        value["log"] = json!(rollout.log);
    }
    value
}

pub(super) async fn list(State(state): State<AdminState>) -> ApiResult {
    with_store(&state, |store| {
        Ok(Json(Value::Array(
            store
                .rollouts()?
                .iter()
                .map(|rollout| rollout_json(rollout, false))
                .collect(),
        )))
    })
    .await
}

pub(super) async fn show(State(state): State<AdminState>, Path(id): Path<u64>) -> ApiResult {
    with_store(&state, move |store| {
        let rollout = store.rollout(id)?.ok_or_else(|| not_found(id))?;
        Ok(Json(rollout_json(&rollout, true)))
    })
    .await
}

fn not_found(id: u64) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no rollout {id}; see GET /api/v1/rollouts"),
    )
}

#[derive(Debug, Deserialize)]
pub(super) struct CreateRequest {
    bundle: String,
    tag: String,
    #[serde(default)]
    selector: String,
    #[serde(default = "default_waves")]
    waves: String,
    #[serde(default = "default_timeout")]
    health_timeout_seconds: i64,
    #[serde(default = "default_failures")]
    max_failures: String,
    #[serde(default = "default_on_failure")]
    on_failure: OnFailure,
    #[serde(default)]
    why: String,
}

fn default_waves() -> String {
    "1,10%,50%,100%".to_owned()
}
fn default_timeout() -> i64 {
    600
}
fn default_failures() -> String {
    "0".to_owned()
}
fn default_on_failure() -> OnFailure {
    OnFailure::Pause
}

pub(super) async fn create(
    State(state): State<AdminState>,
    Operator(caller): Operator,
    Json(request): Json<CreateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if request.why.len() > super::MAX_WHY
        || request.selector.len() > 4096
        || request.waves.len() > 256
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "why, selector or waves is too long".to_owned(),
        ));
    }
    let who = caller.name;
    let now = (state.now)();
    let created = with_store(&state, move |store| {
        let asked = Request {
            bundle: request.bundle,
            tag: request.tag,
            selector: request.selector,
            waves: request.waves,
            health_timeout: request.health_timeout_seconds,
            max_failures: request.max_failures,
            on_failure: request.on_failure,
        };
        rollout::create(store, &asked, &who, &request.why, now).map_err(|error| {
            let status = match error {
                CreateError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                CreateError::Busy(_) => StatusCode::CONFLICT,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError(status, error.to_string())
        })
    })
    .await?;
    tracing::info!(rollout = created.id, bundle = %created.plan.bundle, git_ref = %created.plan.git_ref, "rollout created");
    state.changes.rollouts_changed();
    Ok((StatusCode::CREATED, Json(rollout_json(&created, true))))
}

#[derive(Debug, Deserialize)]
pub(super) struct CommandRequest {
    why: String,
}

pub(super) async fn command(
    State(state): State<AdminState>,
    Operator(caller): Operator,
    Path((id, name)): Path<(u64, String)>,
    Json(request): Json<CommandRequest>,
) -> ApiResult {
    let command = Command::parse(&name).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("unknown rollout command {name:?}; use pause, resume, abort or rollback"),
        )
    })?;
    check_why(&request.why, &format!("{name} the rollout"))?;
    let who = caller.name;
    let now = (state.now)();
    let keys = state.keys.clone();
    let (rollout, changed) = with_store(&state, move |store| {
        rollout::command(store, &keys, id, command, &who, &request.why, now).map_err(|error| {
            let status = match error {
                CommandFailure::NotFound(_) => StatusCode::NOT_FOUND,
                CommandFailure::Refused(_) => StatusCode::CONFLICT,
                CommandFailure::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError(status, error.to_string())
        })
    })
    .await?;
    if !changed.is_empty() {
        state.changes.fleet_changed();
    }
    state.changes.rollouts_changed();
    Ok(Json(rollout_json(&rollout, true)))
}

/// Every agent with its labels, last contact, and per bundle: what it is assigned (release
/// name, generation, origin) and its last status.
pub(super) async fn fleet(State(state): State<AdminState>) -> ApiResult {
    let now = (state.now)();
    let connected = state.connected.clone();
    with_store(&state, move |store| {
        // Release names by bundle and body digest: tags first, then branches.
        let mut names: HashMap<(String, [u8; 32]), Vec<String>> = HashMap::new();
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
        let mut statuses: BTreeMap<(String, String), Value> = BTreeMap::new();
        let mut heard: HashMap<String, i64> = HashMap::new();
        for stored in store.statuses(None)? {
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
        let mut assigned: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (row, origin) in store.bundle_assignments(None)? {
            let release = names
                .get(&(row.bundle.clone(), row.digest.0))
                .map(|names| names.join(", "));
            let status = statuses
                .remove(&(row.agent.clone(), row.bundle.clone()))
                .unwrap_or(Value::Null);
            assigned.entry(row.agent.clone()).or_default().push(json!({
                "bundle": row.bundle, "generation": row.generation, "snapshot": row.digest.short(),
                "release": release, "origin": origin, "status": status,
            }));
        }
        let agents: Vec<Value> = store
            .agents()?
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
        Ok(Json(json!({"now": now, "agents": agents})))
    })
    .await
}
