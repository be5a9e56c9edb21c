//! Git push webhooks (on the model of Flux's receivers): `POST /hooks/git/{source}` with the
//! sender verified by the source's secret, then one fetch of that source only — pushes arriving
//! close together become one fetch.
//!
//! Accepted signatures (the first present header decides):
//! - GitHub (and Gitea, Forgejo, Gogs when set up like GitHub): `X-Hub-Signature-256:
//!   sha256=<hex HMAC-SHA256 of the body>`;
//! - Gitea / Forgejo: `X-Gitea-Signature` or `X-Forgejo-Signature`: `<hex HMAC-SHA256>`;
//! - GitLab: `X-Gitlab-Token: <the secret>`.
//!
//! All comparisons are constant-time. Missing or wrong: 401; a source without a configured
//! secret: 404 saying how to enable it; unknown source: 404. A replayed delivery — its delivery
//! id (`X-GitHub-Delivery`, `X-Gitea-Delivery`, `X-Forgejo-Delivery`, `X-Gitlab-Event-UUID`)
//! or its body already accepted for that source within [`REPLAY_WINDOW`] — is refused with 409
//! (the body too, because the signature covers the body and not the id header: a captured
//! delivery with its id changed is still the same signed body). Served on the admin listener, or
//! on a listener of its own (`listen.hooks`) so Git servers never reach the admin API.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{KeyInit as _, Mac as _};
use serde_json::json;
use subtle::ConstantTimeEq as _;

use crate::changes::Changes;
use crate::config::Secret;

/// The largest webhook body read (GitHub sends at most 25 MB; push events are far smaller).
pub const MAX_HOOK_BODY: usize = 4 << 20;

/// How long an accepted delivery is remembered, to refuse it when it comes again.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(3600);
/// The most deliveries remembered (the oldest are forgotten first).
const MAX_REMEMBERED: usize = 100_000;

/// What the webhook route needs.
#[derive(Debug, Clone)]
pub struct HooksState {
    /// Each configured source's secret (`None`: webhooks not enabled for it).
    pub secrets: Arc<BTreeMap<String, Option<Secret>>>,
    /// Where fetch requests go.
    pub changes: Arc<Changes>,
    /// Deliveries accepted lately.
    pub deliveries: Arc<Deliveries>,
}

/// Deliveries accepted within [`REPLAY_WINDOW`], by delivery id and by body, per source.
#[derive(Debug, Default)]
pub struct Deliveries {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    keys: HashSet<[u8; 32]>,
    order: VecDeque<(Instant, [u8; 32])>,
}

impl Deliveries {
    /// Remembers a delivery of `source` with `id` (if it has one) and `body`; `false` when
    /// either was accepted within [`REPLAY_WINDOW`] (a replay: nothing is remembered anew).
    pub fn first_time(&self, source: &str, id: Option<&str>, body: &[u8], now: Instant) -> bool {
        use sha2::Digest as _;
        let key = |kind: &str, bytes: &[u8]| -> [u8; 32] {
            let mut hash = sha2::Sha256::new();
            for part in [kind.as_bytes(), source.as_bytes(), bytes] {
                hash.update((part.len() as u64).to_be_bytes());
                hash.update(part);
            }
            hash.finalize().into()
        };
        let mut keys = vec![key("body", body)];
        if let Some(id) = id {
            keys.push(key("id", id.as_bytes()));
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some((at, old)) = seen.order.front().copied() {
            if now.duration_since(at) < REPLAY_WINDOW && seen.order.len() < MAX_REMEMBERED {
                break;
            }
            seen.order.pop_front();
            seen.keys.remove(&old);
        }
        if keys.iter().any(|key| seen.keys.contains(key)) {
            return false;
        }
        for key in keys {
            seen.keys.insert(key);
            seen.order.push_back((now, key));
        }
        true
    }
}

/// The delivery id a Git server sends with each delivery, if any.
fn delivery_id(headers: &HeaderMap) -> Option<&str> {
    [
        "x-github-delivery",
        "x-gitea-delivery",
        "x-forgejo-delivery",
        "x-gitlab-event-uuid",
    ]
    .iter()
    .find_map(|name| headers.get(*name)?.to_str().ok())
    .filter(|id| !id.is_empty())
}

/// The webhook routes.
pub fn router(state: HooksState) -> axum::Router {
    axum::Router::new()
        .route("/hooks/git/{source}", post(hook))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_HOOK_BODY))
        .with_state(state)
}

/// Why a delivery was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No signature header of a known kind.
    Missing,
    /// A signature header that does not match.
    Wrong(&'static str),
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Checks a delivery's signature against `secret`. Returns the sender's kind.
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> Result<&'static str, Refusal> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let hmac_matches = |hex_signature: &str| {
        let Ok(signature) = hex::decode(hex_signature.trim()) else {
            return false;
        };
        let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
            return false;
        };
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    };
    if let Some(value) = header("x-hub-signature-256") {
        let signature = value.strip_prefix("sha256=").unwrap_or("");
        return match hmac_matches(signature) {
            true => Ok("github"),
            false => Err(Refusal::Wrong("X-Hub-Signature-256")),
        };
    }
    for (name, sender) in [
        ("x-gitea-signature", "gitea"),
        ("x-forgejo-signature", "forgejo"),
    ] {
        if let Some(value) = header(name) {
            return match hmac_matches(value) {
                true => Ok(sender),
                false => Err(Refusal::Wrong("X-Gitea-Signature")),
            };
        }
    }
    if let Some(value) = header("x-gitlab-token") {
        let same: bool = value.as_bytes().ct_eq(secret).into();
        return match same {
            true => Ok("gitlab"),
            false => Err(Refusal::Wrong("X-Gitlab-Token")),
        };
    }
    Err(Refusal::Missing)
}

fn answer(status: StatusCode, message: String) -> Response {
    let key = if status.is_success() {
        "status"
    } else {
        "error"
    };
    (status, Json(json!({ key: message }))).into_response()
}

async fn hook(
    State(state): State<HooksState>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(configured) = state.secrets.get(&source) else {
        return answer(
            StatusCode::NOT_FOUND,
            format!("no source {source:?} on this hub"),
        );
    };
    let Some(secret) = configured else {
        return answer(
            StatusCode::NOT_FOUND,
            format!(
                "webhooks are not enabled for source {source:?}: set webhook_secret_env or webhook_secret_file in its [[sources]] entry, and the same secret in the Git server's webhook"
            ),
        );
    };
    match verify(&headers, &body, secret.0.as_bytes()) {
        Ok(sender) => {
            let event = headers
                .get("x-github-event")
                .or_else(|| headers.get("x-gitea-event"))
                .or_else(|| headers.get("x-gitlab-event"))
                .and_then(|value| value.to_str().ok())
                .unwrap_or("push");
            let id = delivery_id(&headers);
            if !state
                .deliveries
                .first_time(&source, id, &body, Instant::now())
            {
                let message = format!(
                    "this delivery ({}) was accepted already within the last {} minutes: a replay is refused",
                    id.map_or_else(|| "the same body".to_owned(), |id| format!("id {id}")),
                    REPLAY_WINDOW.as_secs() / 60
                );
                tracing::warn!(%source, sender, %message, "webhook replay refused");
                return answer(StatusCode::CONFLICT, message);
            }
            if event == "ping" {
                return answer(StatusCode::OK, "pong: the signature checks out".to_owned());
            }
            tracing::info!(%source, sender, event, "webhook: fetch requested");
            state.changes.fetch_source(&source);
            answer(
                StatusCode::ACCEPTED,
                format!("fetch of source {source} scheduled"),
            )
        }
        Err(refusal) => {
            let message = match refusal {
                Refusal::Missing => "no webhook signature: configure the webhook with the source's secret (GitHub and Gitea sign with HMAC-SHA256; GitLab sends X-Gitlab-Token)".to_owned(),
                Refusal::Wrong(header) => format!("{header} does not match the secret configured for source {source:?}"),
            };
            tracing::warn!(%source, %message, "webhook refused");
            answer(StatusCode::UNAUTHORIZED, message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn a_delivery_is_taken_once_by_id_or_by_body_within_the_window() {
        let deliveries = Deliveries::default();
        let start = Instant::now();
        assert!(deliveries.first_time("fleet", Some("a"), b"one", start));
        assert!(
            !deliveries.first_time("fleet", Some("a"), b"one", start),
            "replayed whole"
        );
        assert!(
            !deliveries.first_time("fleet", Some("b"), b"one", start),
            "id changed, same signed body"
        );
        assert!(
            !deliveries.first_time("fleet", None, b"one", start),
            "id removed"
        );
        assert!(
            !deliveries.first_time("fleet", Some("a"), b"two", start),
            "same id, another body"
        );
        assert!(
            deliveries.first_time("fleet", Some("c"), b"two", start),
            "a new delivery"
        );
        assert!(
            deliveries.first_time("other", Some("a"), b"one", start),
            "another source"
        );
        let later = start + REPLAY_WINDOW + Duration::from_secs(1);
        assert!(
            deliveries.first_time("fleet", Some("a"), b"one", later),
            "forgotten after the window"
        );
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231, test case 2.
        assert_eq!(
            hmac_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn each_sender_format_is_checked() {
        let (secret, body) = (
            b"0123456789abcdef".as_slice(),
            b"{\"ref\":\"refs/heads/main\"}".as_slice(),
        );
        let good = hmac_hex(secret, body);
        let bad = hmac_hex(b"another secret!!", body);
        let signed = |name, value: String| headers(&[(name, value)]);
        assert_eq!(
            verify(
                &signed("x-hub-signature-256", format!("sha256={good}")),
                body,
                secret
            ),
            Ok("github")
        );
        assert_eq!(
            verify(
                &signed("x-hub-signature-256", format!("sha256={bad}")),
                body,
                secret
            ),
            Err(Refusal::Wrong("X-Hub-Signature-256"))
        );
        assert!(
            verify(&signed("x-hub-signature-256", good.clone()), body, secret).is_err(),
            "prefix required"
        );
        assert_eq!(
            verify(&signed("x-gitea-signature", good.clone()), body, secret),
            Ok("gitea")
        );
        assert!(verify(&signed("x-gitea-signature", "zz".into()), body, secret).is_err());
        assert_eq!(
            verify(
                &signed("x-gitlab-token", "0123456789abcdef".into()),
                body,
                secret
            ),
            Ok("gitlab")
        );
        assert!(
            verify(
                &signed("x-gitlab-token", "0123456789abcdeF".into()),
                body,
                secret
            )
            .is_err()
        );
        assert_eq!(
            verify(&HeaderMap::new(), body, secret),
            Err(Refusal::Missing)
        );
        // A signature of another body does not pass.
        assert!(
            verify(
                &signed("x-hub-signature-256", format!("sha256={good}")),
                b"{}",
                secret
            )
            .is_err()
        );
    }
}
