//! Routes about the API itself and the hub's keys: who am I, the sources, API tokens, keys.
//!
//! - viewer: `GET /api/v1/whoami`, `GET /api/v1/sources`
//! - admin: `GET /api/v1/admin-tokens`, `POST /api/v1/admin-tokens`
//!   (`{"name", "role", "ttl_seconds"}` → the secret, shown once),
//!   `POST /api/v1/admin-tokens/{name}/revoke`, `GET /api/v1/keys`, `POST /api/v1/keys/reload`

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{self, Admin, Viewer};
use super::{AdminState, ApiError, ApiResult, bad_request, not_found, with_store};
use crate::keys::KeyStatus;
use crate::store::{AdminToken, NewToken, Role};

pub(super) async fn whoami(Viewer(caller): Viewer) -> Json<Value> {
    Json(json!({"name": caller.name, "role": caller.role.name()}))
}

pub(super) async fn sources(State(state): State<AdminState>, _: Viewer) -> Json<Value> {
    let records = state.changes.records();
    let rows: Vec<Value> = state
        .sources
        .iter()
        .map(|source| {
            let record = records.get(&source.name).cloned().unwrap_or_default();
            json!({
                "name": source.name, "url": source.url, "track": source.track,
                "webhook": source.webhook, "fetches": record.fetches,
                "webhook_requests": record.webhook_requests,
                "last_fetch_at": record.last_fetch_at, "last_duration_ms": record.last_duration_ms,
                "last_error": record.last_error,
            })
        })
        .collect();
    Json(Value::Array(rows))
}

/// `GET /api/v1/replica` (viewer): this replica's name and whether it holds the leader lease
/// (then it syncs Git and steps rollouts).
pub(super) async fn replica(State(state): State<AdminState>, _: Viewer) -> Json<Value> {
    let epoch = *state.replica.leading.borrow();
    Json(json!({
        "replicated": state.replica.name.is_some(),
        "name": state.replica.name,
        "leading": epoch > 0,
        "epoch": epoch,
    }))
}

/// A token for the API: never its secret.
pub fn token_json(token: &AdminToken) -> Value {
    json!({
        "name": token.name, "role": token.role.name(), "created_at": token.created_at,
        "created_by": token.created_by, "expires_at": token.expires_at,
        "revoked": token.revoked.as_ref().map(|(at, by)| json!({"at": at, "by": by})),
        "last_used_at": token.last_used_at,
    })
}

pub(super) async fn list_tokens(State(state): State<AdminState>, _: Admin) -> ApiResult {
    with_store(&state, |store| {
        Ok(Json(Value::Array(
            store.admin_tokens()?.iter().map(token_json).collect(),
        )))
    })
    .await
}

#[derive(Debug, Deserialize)]
pub(super) struct CreateRequest {
    name: String,
    role: String,
    /// Seconds until it expires; none: it does not.
    ttl_seconds: Option<i64>,
}

/// Checks a token request; returns what to store.
pub fn new_token(
    name: &str,
    role: &str,
    ttl_seconds: Option<i64>,
    now: i64,
) -> Result<NewToken, String> {
    if !auth::valid_token_name(name) {
        return Err(format!(
            "token name {name:?}: 1-64 characters of letters, digits, '-', '_', '.', '@'"
        ));
    }
    let role =
        Role::parse(role).ok_or_else(|| format!("role {role:?}: use viewer, operator or admin"))?;
    if ttl_seconds.is_some_and(|ttl| ttl <= 0) {
        return Err("ttl_seconds must be positive (leave it out for no expiry)".to_owned());
    }
    Ok(NewToken {
        name: name.to_owned(),
        role,
        expires_at: ttl_seconds.map(|ttl| now.saturating_add(ttl)),
    })
}

pub(super) async fn create_token(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Json(request): Json<CreateRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let now = (state.now)();
    let token =
        new_token(&request.name, &request.role, request.ttl_seconds, now).map_err(bad_request)?;
    let (secret, digest) = auth::new_secret()
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    let created = with_store(&state, move |store| {
        store
            .create_admin_token(&token, &digest, &caller.name, now)?
            .map_err(|taken| ApiError(StatusCode::CONFLICT, taken))
    })
    .await?;
    let mut answer = token_json(&created);
    answer["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(answer)))
}

pub(super) async fn revoke_token(
    State(state): State<AdminState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
) -> ApiResult {
    let now = (state.now)();
    let lookup = name.clone();
    let revoked = with_store(&state, move |store| {
        Ok(store.revoke_admin_token(&lookup, &caller.name, now)?)
    })
    .await?
    .ok_or_else(|| {
        not_found(format!(
            "no API token {name:?}; see GET /api/v1/admin-tokens"
        ))
    })?;
    state.changes.token_revoked();
    Ok(Json(token_json(&revoked)))
}

/// The keys at a glance, for the API.
pub fn keys_json(status: &KeyStatus) -> Value {
    let window = |(key, not_before, not_after): &(outpost_proto::KeyId, i64, i64)| json!({"key": hex::encode(key.0), "not_before": not_before, "not_after": not_after});
    json!({
        "root": hex::encode(status.root.0),
        "root_key_present": status.root_key_present,
        "active": window(&status.active),
        "next": status.next.as_ref().map(|(key, not_before, not_after, from)| {
            let mut value = window(&(*key, *not_before, *not_after));
            value["active_from"] = json!(from);
            value
        }),
        "retired": status.retired.iter().map(window).collect::<Vec<_>>(),
        "revocations": status.revocations.as_ref().map(|(version, keys)| json!({
            "version": version,
            "keys": keys.iter().map(|key| hex::encode(key.0)).collect::<Vec<_>>(),
        })),
        "certificates_offered": status.certificates_offered,
        "warnings": status.warnings,
    })
}

pub(super) async fn keys(State(state): State<AdminState>, _: Admin) -> Json<Value> {
    Json(keys_json(&state.keys.status((state.now)())))
}

pub(super) async fn reload_keys(
    State(state): State<AdminState>,
    Admin(caller): Admin,
) -> ApiResult {
    let now = (state.now)();
    let keys = state.keys.clone();
    tracing::info!(who = %caller.name, "key dir reload requested");
    let (refreshed, agents) = with_store(&state, move |store| {
        crate::resign::refresh_keys(store, &keys, now)
            .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))
    })
    .await
    .map(|refreshed| {
        let agents = refreshed.resigned.agents.len();
        (refreshed, agents)
    })?;
    if agents > 0 {
        state.changes.fleet_changed();
    }
    let mut answer = keys_json(&state.keys.status(now));
    answer["notices"] = json!(
        refreshed
            .notices
            .iter()
            .map(|notice| notice.message())
            .collect::<Vec<_>>()
    );
    answer["resigned"] = json!(refreshed.resigned.resigned.len());
    Ok(Json(answer))
}
