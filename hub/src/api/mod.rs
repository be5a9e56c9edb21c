//! The admin HTTP API: JSON over HTTP(S) for the CLI, scripts and the fleet page.
//!
//! Who may call what (see [`auth`]): every route needs an API token except the probes, the
//! metrics and the static fleet page; a handler that needs more than `viewer` says so in its
//! signature ([`auth::Operator`], [`auth::Admin`]). Errors are `{"error": "..."}`.
//!
//! - public: `GET /live`, `GET /ready`, `GET /metrics`, `GET /`, `GET /fleet`, `GET /fleet.js`
//! - viewer: `GET /api/v1/whoami`, `GET /api/v1/bundles`, `GET /api/v1/releases`,
//!   `GET /api/v1/sources`, `GET /api/v1/snapshots/{bundle}/{generation}` and `…/objects`
//!   (Secret values redacted), `GET /api/v1/events?limit=N`, `GET /api/v1/agents`,
//!   `GET /api/v1/agents/{id}`, `GET /api/v1/agents/{id}/history?since=T` (its time line),
//!   `GET /api/v1/drift?agent=A&bundle=B&since=T&limit=N` (drift reports, newest first),
//!   `GET /api/v1/tokens` (enrolment tokens, by digest),
//!   `GET /api/v1/status` (`?agent=ID`), `GET /api/v1/fleet` (a filtered page) and
//!   `GET /api/v1/fleet/summary` (counts; see [`fleet`]), `GET /api/v1/rollouts`,
//!   `GET /api/v1/rollouts/{id}`, `GET /api/v1/preview?bundle=B&tag=T&selector=S` (what a
//!   rollout would do; see [`rollouts`])
//! - operator: `POST /api/v1/fetch`, `POST /api/v1/agents/{id}/labels`
//!   (`{"labels": {"k": "v" | null}}`), `POST /api/v1/rollouts`,
//!   `POST /api/v1/rollouts/{id}/{pause|resume|abort|rollback}` (see [`rollouts`])
//! - admin: `POST /api/v1/tokens` (`{"labels": {...}, "ttl_seconds": N}`: an enrolment token,
//!   shown once, in an enrolment bundle; with `"count": N`, up to 10,000 tokens at once),
//!   `POST /api/v1/agents/{id}/revoke` (`{"why": "..."}`),
//!   `POST /api/v1/tokens/{digest}/revoke` (`{"why": "..."}`: an unused enrolment token, by
//!   its digest or a unique prefix of at least 8 hex digits, can enrol nothing more),
//!   `GET|POST /api/v1/admin-tokens`, `POST /api/v1/admin-tokens/{name}/revoke`,
//!   `GET /api/v1/keys`, `POST /api/v1/keys/reload`, and `…/objects?secrets=reveal`
//! - Git webhooks: `POST /hooks/git/{source}`, signed with the source's secret (see [`hooks`]),
//!   here or on a listener of their own
//!
//! The audit trail (events, rollout history, revocations) names the authenticated token; every
//! write is also recorded as an `api-write` event.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_proto::{Digest, SnapshotHeader, selector};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::changes::Changes;
use crate::store::{Agent, HubStore, Role, StoreError};

pub mod admin;
pub mod auth;
pub mod fleet;
pub mod hooks;
pub mod listener;
pub mod rollouts;

/// The largest request body the API reads.
pub const MAX_BODY: usize = 64 << 10;
/// The most labels an agent (or an enrolment token) carries.
pub const MAX_LABELS: usize = 64;
/// The longest "why" recorded.
pub const MAX_WHY: usize = 1024;

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

/// A configured source, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSummary {
    /// Name.
    pub name: String,
    /// URL (credentials never live in it).
    pub url: String,
    /// The ref agents follow.
    pub track: String,
    /// Whether its webhook is enabled.
    pub webhook: bool,
}

/// What handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The store, shared with the sync threads.
    pub store: Arc<dyn HubStore>,
    /// What changed, for whom: fetches, fleet, rollouts.
    pub changes: Arc<Changes>,
    /// Token checks, rate limits, allowed hosts.
    pub auth: Arc<auth::Auth>,
    /// The configured sources.
    pub sources: Arc<Vec<SourceSummary>>,
    /// The clock (Unix seconds), injected for tests.
    pub now: fn() -> i64,
    /// For enrolment bundles.
    pub enrolment: Arc<EnrolmentInfo>,
    /// Signing keys (rollouts sign older bodies again under new generations).
    pub keys: Arc<crate::keys::HubKeys>,
    /// The agents connected now.
    pub connected: Arc<crate::transport::Connected>,
    /// The agent service (its metrics and counters, for `/metrics`).
    pub service: Arc<crate::transport::AgentService>,
    /// Each source's URL and its mirror once opened (previews read bundle definitions).
    pub mirrors: Arc<Vec<(String, Mirror)>>,
    /// This replica's name (none: the only hub) and whether it leads.
    pub replica: ReplicaState,
}

/// A source's mirror, set once the runtime opened it.
pub type Mirror = Arc<tokio::sync::OnceCell<Arc<crate::git::GitSource>>>;

/// What `GET /api/v1/replica` shows.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    /// The replica's name in the lease (none: the only hub, always leading).
    pub name: Option<String>,
    /// The lease epoch held (0: another replica leads).
    pub leading: crate::replication::Leading,
}

/// An API error: status and message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

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

/// The admin API's routes, behind [`auth::authenticate`]; with the webhook routes when `hooks`
/// is given (no separate hooks listener).
pub fn router(state: AdminState, hooks: Option<hooks::HooksState>) -> Router {
    let api = Router::new()
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/whoami", get(admin::whoami))
        .route("/api/v1/bundles", get(bundles))
        .route("/api/v1/releases", get(releases))
        .route("/api/v1/sources", get(admin::sources))
        .route("/api/v1/replica", get(admin::replica))
        .route("/api/v1/snapshots/{bundle}/{generation}", get(snapshot))
        .route(
            "/api/v1/snapshots/{bundle}/{generation}/objects",
            get(objects),
        )
        .route("/api/v1/fetch", post(fetch_now))
        .route("/api/v1/events", get(events))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{id}", get(agent))
        .route("/api/v1/agents/{id}/history", get(history))
        .route("/api/v1/drift", get(drift))
        .route("/api/v1/agents/{id}/labels", post(label_agent))
        .route("/api/v1/agents/{id}/revoke", post(revoke_agent))
        .route("/api/v1/tokens", get(tokens).post(create_token))
        .route("/api/v1/tokens/{digest}/revoke", post(revoke_token))
        .route(
            "/api/v1/admin-tokens",
            get(admin::list_tokens).post(admin::create_token),
        )
        .route(
            "/api/v1/admin-tokens/{name}/revoke",
            post(admin::revoke_token),
        )
        .route("/api/v1/keys", get(admin::keys))
        .route("/api/v1/keys/reload", post(admin::reload_keys))
        .route("/api/v1/status", get(statuses))
        .route("/api/v1/fleet", get(fleet::fleet))
        .route("/api/v1/fleet/summary", get(fleet::summary))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::show))
        .route("/api/v1/preview", get(rollouts::preview))
        .route("/api/v1/rollouts/{id}/{command}", post(rollouts::command))
        .route("/", get(fleet::fleet_page))
        .route("/fleet", get(fleet::fleet_page))
        .route("/fleet.js", get(fleet::fleet_script))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .with_state(state);
    let api = match hooks {
        Some(hooks) => api.merge(hooks::router(hooks)),
        None => api,
    };
    api.layer(axum::middleware::map_response(security_headers))
}

/// Headers on every answer: nothing is cached or sniffed, and no page frames ours.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Runs `work` on the store in a blocking thread.
async fn with_store<T: Send + 'static>(
    state: &AdminState,
    work: impl FnOnce(&dyn HubStore) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || work(&*store))
        .await
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?
}

/// `GET /ready` (public, for probes): 200 once this hub can do its work — its store answers
/// and, on the replica that leads (the only hub always does), every source was fetched once
/// since the start (a fetch that failed counts: what was fetched before is served) — else 503
/// naming what it waits for. The keys are loaded before any listener opens.
async fn ready(State(state): State<AdminState>) -> Response {
    let mut waiting = Vec::new();
    if let Err(error) = with_store(&state, |store| Ok(store.change_cursor()?)).await {
        waiting.push(format!("the store: {}", error.1));
    }
    if *state.replica.leading.borrow() > 0 {
        let records = state.changes.records();
        for source in state.sources.iter() {
            if records
                .get(&source.name)
                .is_none_or(|record| record.fetches == 0)
            {
                waiting.push(format!("the first fetch of source {}", source.name));
            }
        }
    }
    match waiting.is_empty() {
        true => Json(json!({"ready": true})).into_response(),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "waiting_for": waiting})),
        )
            .into_response(),
    }
}

/// `GET /metrics` (public, for Prometheus): the hub's counters and, read from the store now,
/// the fleet's gauges (see [`crate::metrics`]). A store that does not answer gives
/// `outpost_hub_store_up 0` and no fleet gauges, not an error: the scrape still says so.
async fn metrics(State(state): State<AdminState>) -> Response {
    let timing = state.service.metrics().clone();
    let read = with_store(&state, move |store| {
        let summary = timing.time("fleet_summary", || store.fleet_summary());
        let rollouts = timing.time("rollouts", || store.rollouts());
        Ok((summary, rollouts))
    })
    .await;
    let (summary, rollouts) = match read {
        Ok((summary, rollouts)) => (
            summary
                .inspect_err(|error| tracing::warn!(%error, "metrics: the fleet summary failed"))
                .ok(),
            rollouts
                .inspect_err(|error| tracing::warn!(%error, "metrics: reading rollouts failed"))
                .ok(),
        ),
        Err(_) => (None, None),
    };
    let gauges = crate::metrics::FleetGauges::read(&crate::metrics::FleetReading {
        summary: summary.as_ref(),
        rollouts: rollouts.as_deref(),
        connected: state.connected.len(),
        leading: *state.replica.leading.borrow() > 0,
        service: state.service.counters(),
        compressions: state.service.payloads().compressions(),
    });
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.service.metrics().encode(&gauges),
    )
        .into_response()
}

fn not_found(message: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, message)
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

/// Refuses an empty or overlong "why".
fn check_why(why: &str, what: &str) -> Result<(), ApiError> {
    if why.trim().is_empty() {
        return Err(bad_request(format!(
            "say why you {what} (\"why\"); it is recorded with your token's name"
        )));
    }
    if why.len() > MAX_WHY {
        return Err(bad_request(format!(
            "\"why\" is {} bytes; keep it under {MAX_WHY}",
            why.len()
        )));
    }
    Ok(())
}

/// Replaces the values of a Secret's `data` and `stringData` with `<redacted>` (keys kept);
/// returns whether it was a Secret.
pub fn redact_secret(object: &mut Value) -> bool {
    let is_secret = object["kind"] == "Secret" && object["apiVersion"] == "v1";
    if is_secret {
        for field in ["data", "stringData"] {
            if let Some(values) = object.get_mut(field).and_then(Value::as_object_mut) {
                for value in values.values_mut() {
                    *value = json!("<redacted>");
                }
            }
        }
    }
    is_secret
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

#[derive(Debug, Deserialize)]
struct ObjectsQuery {
    /// `reveal`: show Secret values (admin only).
    secrets: Option<String>,
}

async fn objects(
    State(state): State<AdminState>,
    auth::Viewer(caller): auth::Viewer,
    Path((bundle, generation)): Path<(String, u64)>,
    Query(query): Query<ObjectsQuery>,
) -> Response {
    let reveal = match query.secrets.as_deref() {
        None | Some("redact") => false,
        // Secret values are for admin tokens only.
        Some("reveal") => match auth::check_role(&caller, Role::Admin) {
            Ok(()) => true,
            Err(refused) => return refused.into_response(),
        },
        Some(other) => {
            return bad_request(format!(
                "secrets={other:?}: use secrets=reveal (admin) or leave it out"
            ))
            .into_response();
        }
    };
    if reveal {
        tracing::info!(who = %caller.name, %bundle, generation, "Secret values revealed");
    }
    with_store(&state, move |store| {
        let snapshot = store.snapshot(&bundle, generation)?.ok_or_else(|| {
            not_found(format!(
                "no snapshot of bundle {bundle:?} at generation {generation}"
            ))
        })?;
        let objects: Result<Vec<Value>, _> =
            outpost_proto::body::parse_lines(&snapshot.body).collect();
        let mut objects = objects
            .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
        if !reveal {
            for object in &mut objects {
                redact_secret(object);
            }
        }
        Ok(Json(Value::Array(objects)))
    })
    .await
    .into_response()
}

async fn fetch_now(
    State(state): State<AdminState>,
    auth::Operator(caller): auth::Operator,
) -> (StatusCode, Json<Value>) {
    tracing::info!(who = %caller.name, "fetch of every source requested");
    state.changes.fetch_all();
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

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    /// Unix seconds; entries before are left out.
    #[serde(default)]
    since: i64,
}

/// `GET /api/v1/agents/{id}/history` (viewer): the agent's time line, oldest first (see
/// [`crate::history`]).
async fn history(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> ApiResult {
    let now = (state.now)();
    with_store(&state, move |store| {
        let entries = crate::history::agent_history(store, &id, query.since, now)?
            .ok_or_else(|| not_found(format!("no agent {id:?}; see GET /api/v1/agents")))?;
        Ok(Json(serde_json::to_value(entries).map_err(|error| {
            ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
        })?))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct DriftParams {
    agent: Option<String>,
    bundle: Option<String>,
    /// Unix seconds (hub clock); reports received before are left out.
    since: Option<i64>,
    /// At most this many reports (default 100, at most 10,000).
    limit: Option<usize>,
}

/// `GET /api/v1/drift` (viewer): drift reports, newest first: per report the agent, bundle,
/// generation, what the agent did (`corrected`, or `left` in place), and the objects with the
/// fields that differ, their desired and live values (Secret values redacted by the agent) and
/// who changed them. A `left` report with no objects says the drift left in place is gone.
async fn drift(State(state): State<AdminState>, Query(params): Query<DriftParams>) -> ApiResult {
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 10000".to_owned(),
        ));
    }
    let query = crate::store::DriftQuery {
        agent: params.agent,
        bundle: params.bundle,
        since: params.since,
        limit,
    };
    with_store(&state, move |store| {
        let reports = store.drift_reports(&query)?;
        Ok(Json(Value::Array(
            reports
                .iter()
                .map(|report| {
                    json!({"id": report.id, "agent": report.agent, "bundle": report.bundle,
                        "generation": report.generation, "action": report.action,
                        "objects": report.total, "observed_at": report.observed_at,
                        "received_at": report.received_at, "findings": report.objects})
                })
                .collect(),
        )))
    })
    .await
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
    auth::Operator(caller): auth::Operator,
    Path(id): Path<String>,
    Json(request): Json<LabelRequest>,
) -> ApiResult {
    if request.labels.len() > MAX_LABELS {
        return Err(bad_request(format!(
            "{} label changes at once; an agent has at most {MAX_LABELS} labels",
            request.labels.len()
        )));
    }
    for (key, value) in &request.labels {
        check_label(key, value.as_deref())?;
    }
    let now = (state.now)();
    let result = with_store(&state, move |store| {
        if let Some(agent) = store.agent(&id)? {
            let mut after = agent.labels.clone();
            for (key, value) in &request.labels {
                match value {
                    Some(value) => after.insert(key.clone(), value.clone()),
                    None => after.remove(key),
                };
            }
            if after.len() > MAX_LABELS {
                return Err(bad_request(format!(
                    "agent {id} would have {} labels; at most {MAX_LABELS}",
                    after.len()
                )));
            }
        }
        let found = store.label_agent(&id, &request.labels, &caller.name, now)?;
        changed_agent(store, &id, found)
    })
    .await;
    if let Ok(agent) = &result
        && let Some(id) = agent["id"].as_str()
    {
        // New labels may mean a new variant to render and other assignments (the source
        // loops see to both for this agent alone), and rollouts it now matches.
        state.changes.agents_to_assign(&[id.to_owned()]);
        state.changes.rollouts_changed();
    }
    result
}

/// Refuses a label key or value that Kubernetes' label syntax does not allow.
fn check_label(key: &str, value: Option<&str>) -> Result<(), ApiError> {
    selector::check_key(key)
        .and_then(|()| value.map_or(Ok(()), selector::check_value))
        .map_err(|error| ApiError(StatusCode::BAD_REQUEST, format!("label {key}: {error}")))
}

/// The agent as it is after a change, or 404 if the change found no such agent.
fn changed_agent(store: &dyn HubStore, id: &str, found: bool) -> ApiResult {
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
    auth::Admin(caller): auth::Admin,
    Path(id): Path<String>,
    Json(request): Json<RevokeRequest>,
) -> ApiResult {
    check_why(&request.why, "revoke the agent")?;
    let now = (state.now)();
    let revoked = id.clone();
    let result = with_store(&state, move |store| {
        let found = store.revoke_agent(&id, &caller.name, &request.why, now)?;
        changed_agent(store, &id, found)
    })
    .await;
    // A connected revoked agent is cut off at once.
    state.changes.agents_changed(&[revoked]);
    state.changes.rollouts_changed();
    result
}

/// Revokes an unused enrolment token named by its digest (hex, as `GET /api/v1/tokens` lists
/// it) or a prefix of at least 8 hex digits that names one token.
async fn revoke_token(
    State(state): State<AdminState>,
    auth::Admin(caller): auth::Admin,
    Path(digest): Path<String>,
    Json(request): Json<RevokeRequest>,
) -> ApiResult {
    check_why(&request.why, "revoke the enrolment token")?;
    let prefix = digest.to_ascii_lowercase();
    if prefix.len() < 8 || prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_request(format!(
            "{digest:?} is not a token digest: give 8 to 64 hex digits of a digest `outpost-hub tokens list` shows"
        )));
    }
    let now = (state.now)();
    with_store(&state, move |store| {
        let matching: Vec<crate::store::EnrolmentToken> = store
            .tokens()?
            .into_iter()
            .filter(|token| token.digest.starts_with(&prefix))
            .collect();
        let token = match matching.as_slice() {
            [one] => one,
            [] => {
                return Err(not_found(format!(
                    "no enrolment token with a digest starting {prefix}; see `outpost-hub tokens list`"
                )));
            }
            _ => {
                return Err(bad_request(format!(
                    "{} tokens have digests starting {prefix}: give more digits",
                    matching.len()
                )));
            }
        };
        if let Some((_, agent)) = &token.used {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("token {} was used already, by agent {agent}: revoke the agent instead (outpost-hub agents revoke)", &token.digest[..16]),
            ));
        }
        let bytes: [u8; 32] = hex::decode(&token.digest)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "a stored token digest does not decode".to_owned()))?;
        if !store.revoke_token(&outpost_proto::Digest(bytes), &caller.name, &request.why, now)? {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("token {} has expired already: it can enrol nothing", &token.digest[..16]),
            ));
        }
        Ok(Json(json!({"digest": token.digest, "revoked_at": now, "by": caller.name, "why": request.why})))
    })
    .await
}

#[derive(Debug, Deserialize)]
struct TokenRequest {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    ttl_seconds: Option<i64>,
    /// Many tokens at once (1 to 10,000), for provisioning a fleet: answered as a list of
    /// tokens, without enrolment bundles.
    count: Option<usize>,
}

/// The most tokens one request makes.
pub const MAX_TOKENS_AT_ONCE: usize = 10_000;

async fn create_token(
    State(state): State<AdminState>,
    auth::Admin(caller): auth::Admin,
    Json(request): Json<TokenRequest>,
) -> ApiResult {
    if request.labels.len() > MAX_LABELS {
        return Err(bad_request(format!(
            "{} labels; an agent has at most {MAX_LABELS}",
            request.labels.len()
        )));
    }
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
    let who = caller.name;
    let now = (state.now)();
    let labels = request.labels;
    if let Some(count) = request.count {
        if !(1..=MAX_TOKENS_AT_ONCE).contains(&count) {
            return Err(bad_request(format!(
                "count must be 1 to {MAX_TOKENS_AT_ONCE}"
            )));
        }
        let mut secrets = Vec::with_capacity(count);
        for _ in 0..count {
            secrets.push(new_token_secret()?);
        }
        let digests: Vec<Digest> = secrets
            .iter()
            .map(|secret| Digest::of(secret.as_bytes()))
            .collect();
        return with_store(&state, move |store| {
            store.create_tokens(&digests, &labels, &who, now, now + ttl)?;
            Ok(Json(
                json!({"tokens": secrets, "labels": labels, "expires_at": now + ttl}),
            ))
        })
        .await;
    }
    let token = new_token_secret()?;
    let digest = Digest::of(token.as_bytes());
    let bundle = state.enrolment.bundle(&token);
    with_store(&state, move |store| {
        store.create_token(&digest, &labels, &who, now, now + ttl)?;
        Ok(Json(json!({"token": token, "digest": digest.to_hex(), "labels": labels, "expires_at": now + ttl, "bundle": bundle})))
    })
    .await
}

/// A fresh enrolment token: 32 random bytes as hex.
fn new_token_secret() -> Result<String, ApiError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|error| ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    Ok(hex::encode(secret))
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
