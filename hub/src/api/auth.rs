//! Who may call the admin API: bearer tokens with a role (on the model of Argo CD's local
//! accounts with RBAC), checked on every request but the public ones, a Host header check
//! against DNS rebinding, a per-token rate limit on writes, and an audit record of every write
//! under the token's name.
//!
//! Every route needs a token of at least the `viewer` role unless it is listed in
//! [`PUBLIC_PATHS`]; handlers that need more take an [`Operator`] or [`Admin`] extractor, so a
//! route's role is written in its handler's signature. No token (or an unknown, expired or
//! revoked one): 401. Too weak a role: 403. Both answer JSON that says what is needed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use outpost_proto::Digest;
use serde_json::json;

use super::AdminState;
use crate::limits::TokenBucket;
use crate::store::{AdminToken, Role, TokenCheck};

/// Paths served without a token: probes, the static fleet page (it holds no data; its script
/// asks for a token), and metrics.
pub const PUBLIC_PATHS: &[&str] = &["/live", "/ready", "/metrics", "/", "/fleet", "/fleet.js"];

/// The prefix of every API token, so secret scanners can spot leaked ones.
pub const TOKEN_PREFIX: &str = "opat_";

/// How long a checked token is believed without asking the store again. A revocation takes
/// effect at once on the replica that made it and on the others as soon as its signal reaches
/// them ([`Signal::TokensRevoked`](crate::changes::Signal)); within this at worst, if the
/// signal is lost.
const CHECK_CACHE: Duration = Duration::from_secs(5);

/// How often a token's last use is written.
const LAST_USED_EVERY: i64 = 60;

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: what the audit trail records.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// A new token's secret and the digest the store keeps.
pub fn new_secret() -> Result<(String, Digest), getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let digest = Digest::of(secret.as_bytes());
    Ok((secret, digest))
}

/// Whether a token name is acceptable: 1-64 of a-z, A-Z, 0-9, `-`, `_`, `.`, `@`.
pub fn valid_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

/// A token check kept for [`CHECK_CACHE`].
#[derive(Debug)]
struct CachedCheck {
    check: TokenCheck,
    at: tokio::time::Instant,
    revocations: u64,
}

/// Authentication state shared by all requests.
#[derive(Debug)]
pub struct Auth {
    names: Vec<String>,
    writes_per_second: f64,
    /// Token checks by digest: the answer, when, and the token revocations heard of by then.
    checked: Mutex<HashMap<Digest, CachedCheck>>,
    last_used: Mutex<HashMap<String, i64>>,
    buckets: Mutex<HashMap<String, TokenBucket>>,
}

impl Auth {
    /// `names`: the Host names the API answers to besides `localhost` and IP addresses;
    /// `writes_per_second`: each token's write rate (bursts of five times that).
    pub fn new(names: Vec<String>, writes_per_second: f64) -> Auth {
        Auth {
            names,
            writes_per_second,
            checked: Mutex::default(),
            last_used: Mutex::default(),
            buckets: Mutex::default(),
        }
    }

    /// Whether a `Host` header names this hub: a configured name, `localhost`, or an IP
    /// address (a DNS-rebinding page always sends its own domain name).
    pub fn host_allowed(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            // HTTP/1.0 without Host: no browser sends this.
            return true;
        };
        let name = match host.strip_prefix('[') {
            Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map_or(host, |(name, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    name
                } else {
                    host
                }
            }),
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost" || name.parse::<IpAddr>().is_ok() || self.names.contains(&name)
    }

    /// A check of this token made less than [`CHECK_CACHE`] ago, unless a token was revoked
    /// since (`revocations`: [`Changes::token_revocations`](crate::changes::Changes) now).
    fn cached(&self, digest: &Digest, revocations: u64) -> Option<TokenCheck> {
        let checked = self.checked.lock().ok()?;
        let cached = checked.get(digest)?;
        (cached.at.elapsed() < CHECK_CACHE && cached.revocations == revocations)
            .then(|| cached.check.clone())
    }

    /// Keeps a check made when `revocations` token revocations were known.
    fn remember(&self, digest: Digest, check: &TokenCheck, revocations: u64) {
        if let Ok(mut checked) = self.checked.lock() {
            if checked.len() > 10_000 {
                checked.clear();
            }
            let at = tokio::time::Instant::now();
            let check = check.clone();
            checked.insert(
                digest,
                CachedCheck {
                    check,
                    at,
                    revocations,
                },
            );
        }
    }

    /// Whether the token's last use should be written now (at most once a minute).
    fn due_last_used(&self, name: &str, now: i64) -> bool {
        let Ok(mut last_used) = self.last_used.lock() else {
            return false;
        };
        let due = last_used
            .get(name)
            .is_none_or(|at| now - at >= LAST_USED_EVERY);
        if due {
            last_used.insert(name.to_owned(), now);
        }
        due
    }

    /// Takes one write from the token's bucket, or says how long to wait.
    fn take_write(&self, name: &str) -> Result<(), Duration> {
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        buckets
            .entry(name.to_owned())
            .or_insert_with(|| {
                TokenBucket::new(self.writes_per_second, self.writes_per_second * 5.0)
            })
            .take()
    }
}

/// A 401 or 403 answer: what went wrong, the role the route needs, the caller's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    status: StatusCode,
    message: String,
    needed: Role,
    role: Option<Role>,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message, "needed": self.needed.name()});
        if let Some(role) = self.role {
            body["role"] = json!(role.name());
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"outpost-hub\""),
            );
        }
        response
    }
}

fn refusal(status: StatusCode, message: String, needed: Role, role: Option<Role>) -> Refusal {
    Refusal {
        status,
        message,
        needed,
        role,
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The middleware in front of every admin route: Host check, token check, write rate limit,
/// audit of writes. Puts the [`Caller`] in the request's extensions.
pub async fn authenticate(
    State(state): State<AdminState>,
    mut request: Request,
    next: Next,
) -> Response {
    let auth = state.auth.clone();
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok());
    if !auth.host_allowed(host) {
        let host = host.unwrap_or_default().to_owned();
        tracing::warn!(%host, "admin request for a foreign Host refused (DNS rebinding?)");
        return (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({"error": format!("this hub does not answer to the host name {host:?}; add it to listen.admin_names in the hub's config if it is the hub's own name")})),
        )
            .into_response();
    }
    let path = request.uri().path().to_owned();
    if PUBLIC_PATHS.contains(&path.as_str()) {
        return next.run(request).await;
    }
    let Some(secret) = bearer(request.headers()) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "this route needs an API token: send `Authorization: Bearer TOKEN` (the CLI takes it from OUTPOST_TOKEN or `outpost-hub login`; an admin makes tokens with `outpost-hub admin-token create`)".to_owned(),
            Role::Viewer,
            None,
        )
        .into_response();
    };
    let digest = Digest::of(secret.as_bytes());
    let now = (state.now)();
    // Read before the store is: a revocation that lands during the lookup makes the answer
    // stale at once.
    let revocations = state.changes.token_revocations();
    let check = match auth.cached(&digest, revocations) {
        Some(check) => check,
        None => {
            let looked_up = super::with_store(&state, move |store| {
                Ok(store.check_admin_token(&digest, now)?)
            })
            .await;
            match looked_up {
                Ok(check) => {
                    auth.remember(digest, &check, revocations);
                    check
                }
                Err(error) => return error.into_response(),
            }
        }
    };
    let token = match check {
        TokenCheck::Valid(token) if token.expires_at.is_some_and(|at| now > at) => {
            return refusal(
                StatusCode::UNAUTHORIZED,
                format!(
                    "API token {:?} has expired; ask an admin for a new one",
                    token.name
                ),
                Role::Viewer,
                None,
            )
            .into_response();
        }
        TokenCheck::Valid(token) => token,
        TokenCheck::Unknown => {
            return refusal(
                StatusCode::UNAUTHORIZED,
                "unknown API token; check OUTPOST_TOKEN or log in again (`outpost-hub login`)"
                    .to_owned(),
                Role::Viewer,
                None,
            )
            .into_response();
        }
        TokenCheck::Expired(token) => {
            return refusal(
                StatusCode::UNAUTHORIZED,
                format!(
                    "API token {:?} expired at {}; ask an admin for a new one",
                    token.name,
                    token.expires_at.unwrap_or_default()
                ),
                Role::Viewer,
                None,
            )
            .into_response();
        }
        TokenCheck::Revoked(token) => {
            let (at, by) = token.revoked.clone().unwrap_or_default();
            return refusal(
                StatusCode::UNAUTHORIZED,
                format!("API token {:?} was revoked at {at} by {by}", token.name),
                Role::Viewer,
                None,
            )
            .into_response();
        }
    };
    let caller = Caller {
        name: token.name.clone(),
        role: token.role,
    };
    let method = request.method().clone();
    if is_write(&method)
        && let Err(wait) = auth.take_write(&caller.name)
    {
        let seconds = wait.as_secs().max(1);
        let mut response = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"error": format!("API token {:?} is over its write rate ({} per second); retry in {seconds} s", caller.name, auth.writes_per_second)})),
        )
            .into_response();
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    if auth.due_last_used(&caller.name, now) {
        touch(&state, &token, now);
    }
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    if is_write(&method) {
        audit(&state, &caller, &method, &path, response.status(), now);
    }
    response
}

/// Writes a token's last use in the background.
fn touch(state: &AdminState, token: &AdminToken, now: i64) {
    let store = state.store.clone();
    let name = token.name.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(error) = store.touch_admin_tokens(&[(name, now)]) {
            tracing::warn!(%error, "cannot record an API token's last use");
        }
    });
}

/// Records a write in the event log under the caller's name.
fn audit(
    state: &AdminState,
    caller: &Caller,
    method: &Method,
    path: &str,
    status: StatusCode,
    now: i64,
) {
    let store = state.store.clone();
    let subject = caller.name.clone();
    let message = format!(
        "{method} {path} → {} (role {})",
        status.as_u16(),
        caller.role
    );
    tokio::task::spawn_blocking(move || {
        if let Err(error) = store.add_event(now, "api-write", &subject, &message) {
            tracing::warn!(%error, "cannot record an API write in the event log");
        }
    });
}

fn caller_of(parts: &Parts) -> Result<Caller, Refusal> {
    parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
        refusal(
            StatusCode::UNAUTHORIZED,
            "this route needs an API token".to_owned(),
            Role::Viewer,
            None,
        )
    })
}

fn require(parts: &Parts, needed: Role) -> Result<Caller, Refusal> {
    let caller = caller_of(parts)?;
    check_role(&caller, needed)?;
    Ok(caller)
}

/// 403, saying what is needed, unless `caller` has at least the `needed` role (for handlers
/// whose role depends on what is asked, like revealing Secret values).
pub fn check_role(caller: &Caller, needed: Role) -> Result<(), Refusal> {
    if caller.role < needed {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            format!(
                "API token {:?} has the {} role; this needs {needed} (ask an admin for an {needed} token)",
                caller.name, caller.role
            ),
            needed,
            Some(caller.role),
        ));
    }
    Ok(())
}

/// Any authenticated caller (the `viewer` role or more).
#[derive(Debug, Clone)]
pub struct Viewer(pub Caller);
/// A caller with the `operator` role or more: rollouts and their commands, agent labels,
/// fetch-now.
#[derive(Debug, Clone)]
pub struct Operator(pub Caller);
/// A caller with the `admin` role: enrolment tokens, revocation, API tokens, keys, Secret
/// values.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

macro_rules! role_extractor {
    ($name:ident, $role:expr) => {
        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = Refusal;

            async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Refusal> {
                require(parts, $role).map($name)
            }
        }
    };
}

role_extractor!(Viewer, Role::Viewer);
role_extractor!(Operator, Role::Operator);
role_extractor!(Admin, Role::Admin);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_we_own_localhost_or_addresses() {
        let auth = Auth::new(vec!["hub.example.com".to_owned()], 1.0);
        for host in [
            "localhost:7070",
            "127.0.0.1:7070",
            "10.0.0.7",
            "[::1]:7070",
            "hub.example.com",
            "HUB.example.com.:443",
        ] {
            assert!(auth.host_allowed(Some(host)), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:7070",
            "hub.example.com.evil.example",
            "localhost.evil",
        ] {
            assert!(!auth.host_allowed(Some(host)), "{host}");
        }
    }

    #[test]
    fn a_cached_check_is_not_used_once_a_token_was_revoked() {
        let auth = Auth::new(Vec::new(), 1.0);
        let digest = Digest::of(b"a token");
        auth.remember(digest, &TokenCheck::Unknown, 3);
        assert_eq!(auth.cached(&digest, 3), Some(TokenCheck::Unknown));
        assert_eq!(auth.cached(&digest, 4), None, "a revocation since");
        assert_eq!(auth.cached(&Digest::of(b"another"), 3), None);
    }

    #[test]
    fn secrets_are_random_prefixed_and_hashed() {
        let (a, digest) = new_secret().unwrap();
        let (b, _) = new_secret().unwrap();
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_ne!(a, b);
        assert_eq!(digest, Digest::of(a.as_bytes()));
        assert!(
            valid_token_name("ci-deploy@team") && !valid_token_name("") && !valid_token_name("a b")
        );
    }
}
