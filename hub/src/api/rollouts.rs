//! Rollout routes of the admin API.
//!
//! - `GET /api/v1/rollouts` — every rollout, newest first, with per-wave progress
//! - `POST /api/v1/rollouts` — create: `{"bundle", "tag", "selector", "waves": "1,10%,100%",
//!   "health_timeout_seconds", "max_failures": "2%", "on_failure": "pause"|"rollback", "why"}`
//! - `GET /api/v1/rollouts/{id}` — one rollout with its members and history
//! - `POST /api/v1/rollouts/{id}/{pause|resume|abort|rollback}` — `{"why": "..."}`

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Operator;
use super::{AdminState, ApiError, ApiResult, check_why, with_store};
use crate::rollout::machine::{Command, OnFailure, Progress, Rollout};
use crate::rollout::{self, CommandFailure, CreateError, Request};
use crate::store::RolloutHead;

/// A rollout as lists show it: its fields, per-wave progress and counts.
pub fn head_json(head: &RolloutHead) -> Value {
    summary_json(&head.rollout, &head.progress, &head.created_by)
}

/// A whole rollout for the API: its fields, progress and counts, members and history.
pub fn rollout_json(rollout: &Rollout) -> Value {
    let created_by = rollout
        .log
        .first()
        .map(|record| record.who.clone())
        .unwrap_or_default();
    let mut value = summary_json(rollout, &rollout.progress(), &created_by);
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
    value
}

fn summary_json(rollout: &Rollout, progress: &Progress, created_by: &str) -> Value {
    let plan = &rollout.plan;
    json!({
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
        "waves": progress.waves,
        "members": progress.members,
        "on_release": progress.on_release,
        "allowed": progress.allowed,
        "failures": progress.failures,
        "budget": progress.budget,
        "created_at": rollout.created_at,
        "updated_at": rollout.updated_at,
        "created_by": created_by,
    })
}

pub(super) async fn list(State(state): State<AdminState>) -> ApiResult {
    with_store(&state, |store| {
        Ok(Json(Value::Array(
            store.rollouts()?.iter().map(head_json).collect(),
        )))
    })
    .await
}

pub(super) async fn show(State(state): State<AdminState>, Path(id): Path<u64>) -> ApiResult {
    with_store(&state, move |store| {
        let stored = store.rollout(id)?.ok_or_else(|| not_found(id))?;
        Ok(Json(rollout_json(&stored.rollout)))
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
        rollout::create(store, &asked, &who, &request.why, now).map_err(create_error)
    })
    .await?;
    tracing::info!(rollout = created.id, bundle = %created.plan.bundle, git_ref = %created.plan.git_ref, "rollout created");
    state.changes.rollouts_changed();
    Ok((StatusCode::CREATED, Json(rollout_json(&created))))
}

/// `GET /api/v1/preview?bundle=B&tag=T[&selector=S][&waves=…][&max_failures=…]` (viewer):
/// what a rollout with these settings would do now — its agents, its waves, per render
/// variant and current release the objects added, changed (field paths, old and new values;
/// Secret values redacted) and removed. Nothing is written.
pub(super) async fn preview(
    State(state): State<AdminState>,
    Query(request): Query<PreviewQuery>,
) -> ApiResult {
    if request.selector.len() > 4096 || request.waves.len() > 256 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "selector or waves is too long".to_owned(),
        ));
    }
    let now = (state.now)();
    let mirrors = state.mirrors.clone();
    let preview = with_store(&state, move |store| {
        let asked = Request {
            bundle: request.bundle,
            tag: request.tag,
            selector: request.selector,
            waves: request.waves,
            health_timeout: default_timeout(),
            max_failures: request.max_failures,
            on_failure: default_on_failure(),
        };
        let mut definitions_at = |url: &str, commit: &str| -> Result<_, String> {
            let source = mirrors
                .iter()
                .find(|(source_url, _)| source_url == url)
                .and_then(|(_, opened)| opened.get().cloned())
                .ok_or_else(|| format!("source {url} is not configured or not opened yet"))?;
            crate::bundles::bundles_at(&source, commit).map_err(|error| error.to_string())
        };
        rollout::preview::preview(store, &mut definitions_at, &asked, now).map_err(create_error)
    })
    .await?;
    Ok(Json(serde_json::to_value(&preview).map_err(|error| {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    })?))
}

#[derive(Debug, Deserialize)]
pub(super) struct PreviewQuery {
    bundle: String,
    tag: String,
    #[serde(default)]
    selector: String,
    #[serde(default = "default_waves")]
    waves: String,
    #[serde(default = "default_failures")]
    max_failures: String,
}

/// A rollout that cannot be created (or previewed), as an answer: the store's failure is the
/// hub's (500), another rollout running is a conflict (409), the rest is the request's (400).
fn create_error(error: CreateError) -> ApiError {
    let status = match error {
        CreateError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CreateError::Busy(_) => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError(status, error.to_string())
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
    Ok(Json(rollout_json(&rollout)))
}
