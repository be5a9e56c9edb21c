//! Notifications: the event log, sent on to receivers — a generic JSON webhook (signed with
//! HMAC-SHA256), a Slack-compatible incoming webhook, and Alertmanager's API. What is sent:
//! rollouts paused, rolled back, aborted or succeeded, releases refused, bundle definitions
//! invalid, agents gone stale (their snapshot expired), offline or revoked, drift found (left in
//! place) or corrected — or the kinds a receiver names (also `drift-gone`).
//!
//! Nothing is lost while a receiver is down: each receiver has a cursor in the store (the last
//! event it took), advanced only after it answered 2xx, and the leader (the only hub, or the
//! replica holding the lease) retries the same event with backoff (1 s doubling to 5 min)
//! until it does. Delivery is at least once: a hub stopped between the answer and the cursor
//! write sends that event again, with the same `X-Outpost-Delivery` id for the receiver to
//! drop. A new receiver starts at the end of the log (no flood of history). Events older than
//! the retention (`[retention] events`, 90 days) that a receiver never took are gone with them.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use crate::replication::{Leading, leading};
use crate::store::{Event, HubStore, StoreError};

/// The kinds sent when a receiver names none.
pub const DEFAULT_EVENTS: &[&str] = &[
    "rollout-paused",
    "rollout-rolled-back",
    "rollout-aborted",
    "rollout-succeeded",
    "release-refused",
    "definitions-invalid",
    "agent-stale",
    "agent-offline",
    "agents-offline",
    "agent-revoked",
    "drift-found",
    "drift-corrected",
];

/// What a receiver speaks.
#[derive(Clone, PartialEq, Eq)]
pub enum ReceiverKind {
    /// JSON `{id, at, kind, subject, message}`; with a secret, signed:
    /// `X-Outpost-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    Webhook {
        /// The HMAC key.
        secret: Option<String>,
    },
    /// A Slack (or Mattermost, Rocket.Chat…) incoming webhook: `{"text": …}`.
    Slack,
    /// Alertmanager: `POST {url}/api/v2/alerts`, one alert per event.
    Alertmanager,
}

impl std::fmt::Debug for ReceiverKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReceiverKind::Webhook { secret } => write!(
                f,
                "Webhook {{ secret: {} }}",
                if secret.is_some() { "set" } else { "none" }
            ),
            ReceiverKind::Slack => write!(f, "Slack"),
            ReceiverKind::Alertmanager => write!(f, "Alertmanager"),
        }
    }
}

/// One configured receiver.
#[derive(Clone, PartialEq, Eq)]
pub struct Receiver {
    /// Its name (the store keeps its cursor under it).
    pub name: String,
    /// What it speaks.
    pub kind: ReceiverKind,
    /// Where (may hold a secret, as Slack URLs do: never logged).
    pub url: String,
    /// The event kinds it takes.
    pub events: Vec<String>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &"(not shown)")
            .field("events", &self.events)
            .finish()
    }
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The receiver answered, but not 2xx.
    #[error("the receiver answered {0}")]
    Status(u16),
    /// No answer.
    #[error("{0}")]
    Transport(String),
}

/// The body, headers and URL one event is sent as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Where to POST.
    pub url: String,
    /// The JSON body.
    pub body: String,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

fn camel(kind: &str) -> String {
    kind.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or(String::new(), |first| {
                first.to_uppercase().chain(chars).collect()
            })
        })
        .collect()
}

/// How `event` is sent to `receiver`. Pure.
pub fn delivery(receiver: &Receiver, event: &Event) -> Delivery {
    let at = outpost_proto::time::rfc3339(event.at);
    let mut headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("x-outpost-event".to_owned(), event.kind.clone()),
        ("x-outpost-delivery".to_owned(), event.id.to_string()),
    ];
    let (url, body) = match &receiver.kind {
        ReceiverKind::Webhook { secret } => {
            let body = json!({"id": event.id, "at": at, "kind": event.kind,
                              "subject": event.subject, "message": event.message})
            .to_string();
            if let Some(secret) = secret {
                let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(secret.as_bytes())
                    .expect("HMAC takes keys of any length");
                mac.update(body.as_bytes());
                headers.push((
                    "x-outpost-signature".to_owned(),
                    format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
                ));
            }
            (receiver.url.clone(), body)
        }
        ReceiverKind::Slack => (
            receiver.url.clone(),
            json!({"text": format!("*Outpost {}* {}: {}", slack_escape(&event.kind), slack_escape(&event.subject), slack_escape(&event.message))})
                .to_string(),
        ),
        ReceiverKind::Alertmanager => {
            let severity = match event.kind.as_str() {
                "rollout-succeeded" => "info",
                "rollout-rolled-back" | "release-refused" | "definitions-invalid" => "critical",
                _ => "warning",
            };
            // One-off events: the alert resolves by itself an hour later.
            let alert = json!([{
                "labels": {"alertname": format!("Outpost{}", camel(&event.kind)),
                           "subject": event.subject, "severity": severity, "source": "outpost"},
                "annotations": {"summary": format!("{}: {}", event.subject, event.message)},
                "startsAt": at,
                "endsAt": outpost_proto::time::rfc3339(event.at + 3_600),
            }]);
            (
                format!("{}/api/v2/alerts", receiver.url.trim_end_matches('/')),
                alert.to_string(),
            )
        }
    };
    Delivery { url, body, headers }
}

fn send(delivery: &Delivery) -> Result<(), DeliveryError> {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let mut request = agent.post(&delivery.url);
    for (name, value) in &delivery.headers {
        request = request.header(name, value);
    }
    let response = request
        .send(delivery.body.as_bytes())
        .map_err(|error| DeliveryError::Transport(describe(&error)))?;
    match response.status().as_u16() {
        200..=299 => Ok(()),
        status => Err(DeliveryError::Status(status)),
    }
}

/// An error without the URL it may quote (receivers' URLs can be secrets).
fn describe(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Io(error) => format!("connection: {error}"),
        ureq::Error::Timeout(_) => "no answer within 10 s".to_owned(),
        ureq::Error::HostNotFound => "the host is not found".to_owned(),
        ureq::Error::ConnectionFailed => "the connection failed".to_owned(),
        _ => "the request failed".to_owned(),
    }
}

/// Sends what is new to every receiver, forever, while this replica leads.
pub async fn notify_loop(
    receivers: Vec<Receiver>,
    store: std::sync::Arc<dyn HubStore>,
    mut lead: Leading,
) {
    let mut waits: Vec<(Duration, tokio::time::Instant)> =
        vec![(Duration::ZERO, tokio::time::Instant::now()); receivers.len()];
    loop {
        leading(&mut lead).await;
        for (index, receiver) in receivers.iter().enumerate() {
            if tokio::time::Instant::now() < waits[index].1 {
                continue;
            }
            let (receiver, store) = (receiver.clone(), store.clone());
            let outcome = tokio::task::spawn_blocking(move || deliver_pending(&receiver, &*store))
                .await
                .unwrap_or_else(|error| Err(Failure::Store(StoreError::Batch(error.to_string()))));
            let wait = &mut waits[index];
            match outcome {
                Ok(_) => *wait = (Duration::ZERO, tokio::time::Instant::now()),
                Err(failure) => {
                    let backoff =
                        (wait.0 * 2).clamp(Duration::from_secs(1), Duration::from_secs(300));
                    tracing::warn!(receiver = %receivers[index].name, error = %failure, retry_in = ?backoff, "notification not delivered; it is kept and sent again");
                    *wait = (backoff, tokio::time::Instant::now() + backoff);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Why a round of deliveries stopped.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The receiver did not take an event.
    #[error("event {id}: {error}")]
    Delivery {
        /// The event.
        id: i64,
        /// Why.
        error: DeliveryError,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends `receiver` every event it has not taken, in order, until one fails; returns how many
/// were sent.
pub fn deliver_pending(receiver: &Receiver, store: &dyn HubStore) -> Result<usize, Failure> {
    let mut cursor = match store.notify_cursor(&receiver.name)? {
        Some(cursor) => cursor,
        None => {
            let end = store.events(1)?.first().map_or(0, |event| event.id);
            store.set_notify_cursor(&receiver.name, end)?;
            end
        }
    };
    // `cursor`: the last event looked at; `stored`: the last one the store has.
    let (mut sent, mut stored) = (0, cursor);
    loop {
        let events = store.events_after(cursor, 200)?;
        if events.is_empty() {
            if cursor != stored {
                store.set_notify_cursor(&receiver.name, cursor)?;
            }
            return Ok(sent);
        }
        for event in &events {
            if receiver.events.contains(&event.kind) {
                if let Err(error) = send(&delivery(receiver, event)) {
                    // What was passed over before it is done with.
                    if cursor != stored {
                        store.set_notify_cursor(&receiver.name, cursor)?;
                    }
                    return Err(Failure::Delivery {
                        id: event.id,
                        error,
                    });
                }
                sent += 1;
                store.set_notify_cursor(&receiver.name, event.id)?;
                stored = event.id;
            }
            cursor = event.id;
        }
    }
}

/// A receiver's payload as JSON, for tests and `check-config`.
pub fn example(receiver: &Receiver) -> Value {
    let event = Event {
        id: 1,
        at: 0,
        kind: "rollout-paused".to_owned(),
        subject: "rollout 1".to_owned(),
        message: "pause by ops: change freeze".to_owned(),
    };
    serde_json::from_str(&delivery(receiver, &event).body).unwrap_or(Value::Null)
}

/// Text as a Slack-compatible receiver shows it and nothing more: `&`, `<` and `>` escaped as
/// Slack documents (so no `<!channel>`, `<@user>` or `<https://…|link>` from a commit message or
/// an agent's label), and a word joiner after each `@` (so Mattermost and Rocket.Chat do not
/// read `@channel` or `@all` as a mention).
pub fn slack_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '@' => escaped.push_str("@\u{2060}"),
            other => escaped.push(other),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str) -> Event {
        Event {
            id: 7,
            at: 1_796_148_300,
            kind: kind.to_owned(),
            subject: "rollout 2".to_owned(),
            message: "rolled back by hub: 1 agents failed".to_owned(),
        }
    }

    #[test]
    fn slack_text_cannot_mention_link_or_format_a_message_of_its_own() {
        let said = slack_escape("v2 <!channel> <https://evil.example|login> @here & <@U1>");
        assert!(!said.contains('<') && !said.contains('>'), "{said}");
        assert!(
            said.contains("&lt;!channel&gt;") && said.contains("&amp;"),
            "{said}"
        );
        assert!(!said.contains("@here"), "no mention: {said}");
        assert_eq!(slack_escape("plain words"), "plain words");
    }

    #[test]
    fn webhooks_are_signed_slack_gets_text_alertmanager_alerts() {
        let webhook = Receiver {
            name: "ops".to_owned(),
            kind: ReceiverKind::Webhook {
                secret: Some("s3cret".to_owned()),
            },
            url: "http://ops.example/hook".to_owned(),
            events: Vec::new(),
        };
        let sent = delivery(&webhook, &event("rollout-rolled-back"));
        let body: Value = serde_json::from_str(&sent.body).unwrap();
        assert_eq!(body["at"], "2026-12-01T18:05:00Z");
        assert_eq!(body["kind"], "rollout-rolled-back");
        let signature = sent
            .headers
            .iter()
            .find(|(name, _)| name == "x-outpost-signature")
            .map(|(_, value)| value.clone())
            .unwrap();
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(b"s3cret").unwrap();
        mac.update(sent.body.as_bytes());
        assert_eq!(
            signature,
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        );
        assert!(
            sent.headers
                .contains(&("x-outpost-delivery".to_owned(), "7".to_owned()))
        );
        let slack = Receiver {
            kind: ReceiverKind::Slack,
            ..webhook.clone()
        };
        let text = example(&slack)["text"].as_str().unwrap().to_owned();
        assert!(
            text.contains("rollout-paused") && text.contains("change freeze"),
            "{text}"
        );
        let alertmanager = Receiver {
            kind: ReceiverKind::Alertmanager,
            url: "http://am.example:9093/".to_owned(),
            ..webhook
        };
        let sent = delivery(&alertmanager, &event("rollout-rolled-back"));
        assert_eq!(sent.url, "http://am.example:9093/api/v2/alerts");
        let alerts: Value = serde_json::from_str(&sent.body).unwrap();
        assert_eq!(alerts[0]["labels"]["alertname"], "OutpostRolloutRolledBack");
        assert_eq!(alerts[0]["labels"]["severity"], "critical");
        assert_eq!(alerts[0]["endsAt"], "2026-12-01T19:05:00Z");
        assert!(
            !format!("{alertmanager:?}").contains("am.example"),
            "URLs are not shown"
        );
    }
}
