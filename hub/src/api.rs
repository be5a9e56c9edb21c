//! The admin HTTP API: JSON over HTTP for the CLI, scripts and Git push hooks.
//!
//! Routes (all JSON; errors are `{"error": "..."}` with a 4xx/5xx status):
//! - `GET /live`, `GET /ready`
//! - `GET /api/v1/bundles` — each bundle with its newest generation
//! - `GET /api/v1/releases` — each bundle at each ref: generation or error
//! - `GET /api/v1/snapshots/{bundle}/{generation}` and `…/objects`
//! - `POST /api/v1/fetch` and `POST /hooks/git` (for push hooks; body ignored) — fetch now
//! - `GET /api/v1/events?limit=N`
//! - `GET /api/v1/agents`, `GET /api/v1/agents/{id}`,
//!   `POST /api/v1/agents/{id}/labels` (`{"labels": {"k": "v" | null}}`),
//!   `POST /api/v1/agents/{id}/revoke` (`{"why": "..."}`)
//! - `POST /api/v1/tokens` (`{"labels": {...}, "ttl_seconds": N}`) → the token, shown once, and
//!   an enrolment bundle (hub address, hub key pin, root key, token) for the device;
//!   `GET /api/v1/tokens`
//! - `GET /api/v1/status` (`?agent=ID`) — the last status each agent reported per bundle
//! - rollouts, the fleet list and the fleet page: see [`rollouts`]
//!
//! Who did something is taken from the `x-outpost-user` header (the CLI sends the login name).
//! There is no authentication yet: the API listens on loopback by default; put it behind an
//! authenticating proxy before exposing it.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_proto::{Digest, SnapshotHeader, selector};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::{Agent, FleetStore, SqliteStore, Store, StoreError};

pub mod rollouts;

/// Wakes the sync threads (bump the counter and notify), and tells agent connections that the
/// fleet changed (assignments, labels, revocations).
#[derive(Debug, Default)]
pub struct FetchNow {
    /// Requests so far.
    pub requests: Mutex<u64>,
    /// Signalled on every request.
    pub signal: Condvar,
    /// Ticks when agent connections should look at their agent again.
    pub fleet: tokio::sync::watch::Sender<u64>,
    /// Rollout wake-ups so far (created, commanded).
    pub rollout_requests: Mutex<u64>,
    /// Signalled on every rollout wake-up.
    pub rollout_signal: Condvar,
}

impl FetchNow {
    /// Asks every source to fetch now.
    pub fn request(&self) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests += 1;
        }
        self.signal.notify_all();
    }

    /// Tells every agent connection to re-read its agent (revocation, assignments).
    pub fn fleet_changed(&self) {
        self.fleet.send_modify(|tick| *tick += 1);
    }

    /// Wakes the rollout loop (a rollout was created or commanded).
    pub fn rollouts_changed(&self) {
        if let Ok(mut requests) = self.rollout_requests.lock() {
            *requests += 1;
        }
        self.rollout_signal.notify_all();
    }

    /// Waits until the rollout loop is woken or `timeout` passes; `seen` is the count it last saw.
    pub fn wait_for_rollouts(&self, seen: &mut u64, timeout: std::time::Duration) {
        let Ok(requests) = self.rollout_requests.lock() else {
            return;
        };
        let (requests, _) = self
            .rollout_signal
            .wait_timeout_while(requests, timeout, |requests| *requests == *seen)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *seen = *requests;
    }
}

/// What goes into an enrolment bundle besides the token.
#[derive(Debug, Clone)]
pub struct EnrolmentInfo {
    /// Address agents dial.
    pub hub_address: String,
    /// SHA-256 of the hub's TLS public key.
    pub hub_pin: Digest,
    /// The root public key that certifies snapshot signing keys.
    pub root_key: outpost_proto::PublicKey,
}

impl EnrolmentInfo {
    /// The bundle text (TOML) for one token.
    pub fn bundle(&self, token: &str) -> String {
        format!(
            "# Outpost enrolment bundle: single-use, secret. On the device:\n#   outpost-agent enrol --bundle THIS_FILE\nhub = \"{}\"\nhub_pin = \"{}\"\nroot_key = \"{}\"\ntoken = \"{token}\"\n",
            self.hub_address,
            self.hub_pin.to_hex(),
            hex::encode(self.root_key.to_bytes()),
        )
    }
}

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The store, shared with the sync threads.
    pub store: Arc<Mutex<SqliteStore>>,
    /// Fetch-now requests.
    pub fetch_now: Arc<FetchNow>,
    /// The clock (Unix seconds), injected for tests.
    pub now: fn() -> i64,
    /// For enrolment bundles.
    pub enrolment: Arc<EnrolmentInfo>,
    /// Signing keys (rollouts sign older bodies again under new generations).
    pub keys: Arc<crate::keys::HubKeys>,
    /// The agents connected now.
    pub connected: Arc<crate::transport::Connected>,
}

/// An API error: status and message.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// The admin API's routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(|| async { "ok" }))
        .route("/api/v1/bundles", get(bundles))
        .route("/api/v1/releases", get(releases))
        .route("/api/v1/snapshots/{bundle}/{generation}", get(snapshot))
        .route(
            "/api/v1/snapshots/{bundle}/{generation}/objects",
            get(objects),
        )
        .route("/api/v1/fetch", post(fetch_now))
        .route("/hooks/git", post(fetch_now))
        .route("/api/v1/events", get(events))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{id}", get(agent))
        .route("/api/v1/agents/{id}/labels", post(label_agent))
        .route("/api/v1/agents/{id}/revoke", post(revoke_agent))
        .route("/api/v1/tokens", get(tokens).post(create_token))
        .route("/api/v1/status", get(statuses))
        .route("/api/v1/fleet", get(rollouts::fleet))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::show))
        .route("/api/v1/rollouts/{id}/{command}", post(rollouts::command))
        .route("/", get(rollouts::fleet_page))
        .route("/fleet", get(rollouts::fleet_page))
        .with_state(state)
}

/// Runs `work` on the store in a blocking thread.
async fn with_store<T: Send + 'static>(
    state: &AdminState,
    work: impl FnOnce(&mut SqliteStore) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = store.lock().map_err(|_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store lock poisoned; restart the hub".to_owned(),
            )
        })?;
        work(&mut store)
    })
    .await
    .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
}

fn not_found(message: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message)
}

fn who(headers: &HeaderMap) -> String {
    headers
        .get("x-outpost-user")
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

async fn bundles(State(state): State<AdminState>) -> ApiResult {
    with_store(&state, |store| {
        let mut newest: BTreeMap<String, (u64, usize)> = BTreeMap::new();
        for release in store.releases()? {
            let entry = newest.entry(release.bundle).or_default();
            entry.1 += 1;
            entry.0 = entry.0.max(release.generation.unwrap_or(0));
        }
        let rows: Vec<Value> = newest
            .into_iter()
            .map(|(bundle, (generation, releases))| json!({"bundle": bundle, "newest_generation": generation, "releases": releases}))
            .collect();
        Ok(Json(Value::Array(rows)))
    })
    .await
}

async fn releases(State(state): State<AdminState>) -> ApiResult {
    with_store(&state, |store| {
        let rows: Vec<Value> = store
            .releases()?
            .into_iter()
            .map(|r| {
                json!({"source": r.source, "ref": r.git_ref, "bundle": r.bundle, "variant": r.variant, "commit": r.git_commit,
                       "generation": r.generation, "error": r.error, "updated_at": r.updated_at})
            })
            .collect();
        Ok(Json(Value::Array(rows)))
    })
    .await
}

async fn snapshot(
    State(state): State<AdminState>,
    Path((bundle, generation)): Path<(String, u64)>,
) -> ApiResult {
    with_store(&state, move |store| {
        let snapshot = store
            .snapshot(&bundle, generation)?
            .ok_or_else(|| not_found(format!("no snapshot of bundle {bundle:?} at generation {generation}")))?;
        let header = SnapshotHeader::decode(&snapshot.header)
            .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
        Ok(Json(json!({
            "bundle": header.bundle, "generation": header.generation, "digest": header.body_digest.to_hex(),
            "commit": header.git_commit, "ref": header.git_ref, "body_size": header.body_size,
            "object_count": header.object_count, "created_at": header.created_at,
            "expires_at": header.expires_at, "selector": header.selector, "key_id": hex::encode(header.key_id.0),
        })))
    })
    .await
}

async fn objects(
    State(state): State<AdminState>,
    Path((bundle, generation)): Path<(String, u64)>,
) -> ApiResult {
    with_store(&state, move |store| {
        let snapshot = store.snapshot(&bundle, generation)?.ok_or_else(|| {
            not_found(format!(
                "no snapshot of bundle {bundle:?} at generation {generation}"
            ))
        })?;
        let objects: Result<Vec<Value>, _> =
            outpost_proto::body::parse_lines(&snapshot.body).collect();
        let objects = objects
            .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
        Ok(Json(Value::Array(objects)))
    })
    .await
}

async fn fetch_now(State(state): State<AdminState>) -> (StatusCode, Json<Value>) {
    state.fetch_now.request();
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "fetch scheduled for every source"})),
    )
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(State(state): State<AdminState>, Query(query): Query<EventsQuery>) -> ApiResult {
    let limit = query.limit.unwrap_or(100).min(10_000);
    with_store(&state, move |store| {
        let rows: Vec<Value> = store
            .events(limit)?
            .into_iter()
            .map(|e| json!({"id": e.id, "at": e.at, "kind": e.kind, "subject": e.subject, "message": e.message}))
            .collect();
        Ok(Json(Value::Array(rows)))
    })
    .await
}

fn agent_json(agent: &Agent) -> Value {
    json!({
        "id": agent.id, "public_key": hex::encode(&agent.public_key), "labels": agent.labels,
        "enrolled_at": agent.enrolled_at, "last_seen": agent.last_seen,
        "revoked": agent.revoked.as_ref().map(|(at, who, why)| json!({"at": at, "by": who, "why": why})),
    })
}

async fn agents(State(state): State<AdminState>) -> ApiResult {
    with_store(&state, |store| {
        Ok(Json(Value::Array(
            store.agents()?.iter().map(agent_json).collect(),
        )))
    })
    .await
}

async fn agent(State(state): State<AdminState>, Path(id): Path<String>) -> ApiResult {
    with_store(&state, move |store| {
        let agent = store
            .agent(&id)?
            .ok_or_else(|| not_found(format!("no agent {id:?}; see GET /api/v1/agents")))?;
        Ok(Json(agent_json(&agent)))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct LabelRequest {
    labels: BTreeMap<String, Option<String>>,
}

async fn label_agent(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<LabelRequest>,
) -> ApiResult {
    for (key, value) in &request.labels {
        check_label(key, value.as_deref())?;
    }
    let who = who(&headers);
    let now = (state.now)();
    let result = with_store(&state, move |store| {
        let found = store.label_agent(&id, &request.labels, &who, now)?;
        changed_agent(store, &id, found)
    })
    .await;
    // New labels may mean new variants and assignments: sync, then agents hear of it.
    state.fetch_now.request();
    result
}

/// Refuses a label key or value that Kubernetes' label syntax does not allow.
fn check_label(key: &str, value: Option<&str>) -> Result<(), ApiError> {
    selector::check_key(key)
        .and_then(|()| value.map_or(Ok(()), selector::check_value))
        .map_err(|error| ApiError(StatusCode::BAD_REQUEST, format!("label {key}: {error}")))
}

/// The agent as it is after a change, or 404 if the change found no such agent.
fn changed_agent(store: &SqliteStore, id: &str, found: bool) -> ApiResult {
    let agent = match found {
        true => store.agent(id)?,
        false => None,
    };
    let agent =
        agent.ok_or_else(|| not_found(format!("no agent {id:?}; see GET /api/v1/agents")))?;
    Ok(Json(agent_json(&agent)))
}

#[derive(Debug, Deserialize)]
struct RevokeRequest {
    why: String,
}

async fn revoke_agent(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<RevokeRequest>,
) -> ApiResult {
    if request.why.trim().is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "say why the agent is revoked (\"why\")".to_owned(),
        ));
    }
    let who = who(&headers);
    let now = (state.now)();
    let result = with_store(&state, move |store| {
        let found = store.revoke_agent(&id, &who, &request.why, now)?;
        changed_agent(store, &id, found)
    })
    .await;
    // A connected revoked agent is cut off at once.
    state.fetch_now.fleet_changed();
    result
}

#[derive(Debug, Deserialize)]
struct TokenRequest {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ttl_seconds: Option<i64>,
}

async fn create_token(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Json(request): Json<TokenRequest>,
) -> ApiResult {
    for (key, value) in &request.labels {
        check_label(key, Some(value))?;
    }
    let ttl = request.ttl_seconds.unwrap_or(7 * 24 * 3600);
    if ttl <= 0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "ttl_seconds must be positive".to_owned(),
        ));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    let token = hex::encode(secret);
    let digest = Digest::of(token.as_bytes());
    let who = who(&headers);
    let now = (state.now)();
    let labels = request.labels;
    let bundle = state.enrolment.bundle(&token);
    with_store(&state, move |store| {
        store.create_token(&digest, &labels, &who, now, now + ttl)?;
        Ok(Json(json!({"token": token, "digest": digest.to_hex(), "labels": labels, "expires_at": now + ttl, "bundle": bundle})))
    })
    .await
}

async fn tokens(State(state): State<AdminState>) -> ApiResult {
    with_store(&state, |store| {
        let rows: Vec<Value> = store
            .tokens()?
            .into_iter()
            .map(|t| {
                json!({"digest": t.digest, "labels": t.labels, "created_at": t.created_at, "created_by": t.created_by,
                       "expires_at": t.expires_at, "used": t.used.map(|(at, agent)| json!({"at": at, "agent": agent}))})
            })
            .collect();
        Ok(Json(Value::Array(rows)))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct StatusQuery {
    agent: Option<String>,
}

async fn statuses(State(state): State<AdminState>, Query(query): Query<StatusQuery>) -> ApiResult {
    with_store(&state, move |store| {
        let rows: Vec<Value> = store
            .statuses(query.agent.as_deref())?
            .into_iter()
            .map(|row| {
                let status = row.status;
                json!({"agent": row.agent, "bundle": status.bundle, "generation": status.generation,
                       "snapshot": status.digest.to_hex(), "phase": format!("{:?}", status.phase),
                       "objects_ready": status.objects_ready, "objects_total": status.objects_total,
                       "message": status.message, "observed_at": status.observed_at,
                       "stale": status.stale, "received_at": row.received_at})
            })
            .collect();
        Ok(Json(Value::Array(rows)))
    })
    .await
}
