//! Serving agents over QUIC: enrolment, identity, assignments pushed as they change, snapshot
//! transfers (whole or delta, resumable), and status reports with acknowledgements.
//!
//! One connection per agent. The agent opens a control stream first: `Enrol` (first time) or
//! `Hello`; the hub answers with `Trust` (signing-key certificates) and `Assign`, then pushes
//! `Assign` whenever the agent's assignments change and acks every `StatusReport`. Each fetch
//! is its own stream: `Fetch` → `TransferStart` + `TransferChunk`s, then the hub finishes it.
//!
//! The hub serves only snapshots assigned to the asking agent; unknown and revoked keys get an
//! `Error` that says what to do, then the connection is closed.
//!
//! Abuse: until a peer is identified as an enrolled agent it may send the hub almost nothing
//! (small flow-control windows, one stream, 10 s to say who it is), at most
//! [`ServiceOptions::max_unidentified`] such peers are let in at once, and above
//! [`ServiceOptions::retry_above`] of them new peers must prove their address first (QUIC
//! Retry). An identified agent gets one connection (a newer one replaces it), a rate limit on
//! status reports and on fetches, status stored only for bundles assigned to it, and deltas
//! only against snapshots it was assigned.

mod batch;
mod payloads;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::Instrument as _;

use outpost_proto::transport::{
    MessageReader, StreamError, allow_identified, peer_public_key, send_message,
};
use outpost_proto::wire::{
    Assign, Assignment, Enrolled, ErrorCode, ErrorMessage, Fetch, Message, TransferChunk,
    TransferStart,
};
use outpost_proto::{Digest, PublicKey};

use crate::changes::Changes;
use crate::keys::HubKeys;
use crate::limits::TokenBucket;
use crate::metrics::HubMetrics;
use crate::store::{
    Agent, AgentAssignments, HubStore, SessionRead, StatusOutcome, StatusWrite, StoreError,
    agent_id,
};
use batch::Batcher;

pub use payloads::{Bodies, Payload, PayloadCache, PayloadError};

/// Application close codes on agent connections.
pub mod close {
    /// The agent's key is not enrolled.
    pub const UNKNOWN_AGENT: u32 = 1;
    /// The agent was revoked.
    pub const REVOKED: u32 = 2;
    /// The enrolment token was refused.
    pub const BAD_TOKEN: u32 = 3;
    /// The agent broke the protocol.
    pub const PROTOCOL: u32 = 4;
    /// A newer connection of the same agent replaced this one.
    pub const REPLACED: u32 = 5;
    /// The peer did not say who it is in time.
    pub const TOO_SLOW: u32 = 6;
    /// The hub is busy: the peer was told when to come back.
    pub const BUSY: u32 = 7;
}

/// How long a new peer has to send its first message.
const IDENTIFY_WITHIN: Duration = Duration::from_secs(10);

/// Settings of the agent service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// zstd level for payloads.
    pub compression_level: i32,
    /// Bytes of payload per `TransferChunk`.
    pub chunk_size: usize,
    /// Payload cache bound.
    pub cache_bytes: usize,
    /// Peers let in at once before they are identified (handshaking, or not yet past their
    /// first message); more are refused.
    pub max_unidentified: usize,
    /// With this many unidentified peers, new ones must prove their address (QUIC Retry).
    pub retry_above: usize,
    /// Status reports one agent may send per second (ten times that at once); faster ones
    /// wait.
    pub reports_per_second: f64,
    /// Fetches one agent may start per second (ten times that at once); faster ones wait.
    pub fetches_per_second: f64,
    /// Enrolments handled at once; beyond that, and after a second's wait, new ones are told
    /// the hub is busy and when to come back (an enrolment storm is spread out, not dropped).
    pub max_enrolling: usize,
    /// Push payloads up to [`PUSH_LIMIT`] ahead of the `Assign` that names them.
    pub push_payloads: bool,
}

impl Default for ServiceOptions {
    fn default() -> ServiceOptions {
        ServiceOptions {
            compression_level: outpost_proto::compress::DEFAULT_LEVEL,
            chunk_size: 32 << 10,
            cache_bytes: 256 << 20,
            max_unidentified: 8192,
            retry_above: 1024,
            reports_per_second: 20.0,
            fetches_per_second: 2.0,
            max_enrolling: 256,
            push_payloads: true,
        }
    }
}

/// What the service refused or throttled, counted.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    /// New peers asked to prove their address first (QUIC Retry).
    pub retries: AtomicU64,
    /// New peers refused because too many were unidentified.
    pub refused: AtomicU64,
    /// Connections replaced by a newer one of the same agent.
    pub replaced: AtomicU64,
    /// Status reports or fetches that had to wait for the rate limit.
    pub throttled: AtomicU64,
    /// Enrolments told to come back later.
    pub busy: AtomicU64,
    /// Payloads pushed ahead of their assignment.
    pub pushed: AtomicU64,
    /// Times a session read its agent and assignments again (at its start, and when the bus
    /// named its agent or the whole fleet).
    pub session_reads: AtomicU64,
}

/// The agents connected now (the store only knows when each last connected): one connection
/// per agent, the newest.
#[derive(Debug, Default)]
pub struct Connected {
    connections: Mutex<HashMap<String, (u64, quinn::Connection)>>,
    next: AtomicU64,
}

impl Connected {
    /// Whether `agent` has a connection open now.
    pub fn contains(&self, agent: &str) -> bool {
        self.connections
            .lock()
            .map(|connected| connected.contains_key(agent))
            .unwrap_or(false)
    }

    /// Keeps the ids of agents connected now (`connected`) or not, under one lock.
    pub fn retain(&self, ids: &mut Vec<String>, connected: bool) {
        if let Ok(open) = self.connections.lock() {
            ids.retain(|id| open.contains_key(id) == connected);
        }
    }

    /// The ids of the agents connected now.
    pub fn ids(&self) -> Vec<String> {
        self.connections
            .lock()
            .map(|connected| connected.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How many agents are connected.
    pub fn len(&self) -> usize {
        self.connections
            .lock()
            .map_or(0, |connected| connected.len())
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `connection` as `agent`'s; returns the connection it replaces, if any.
    fn enter(
        self: &Arc<Connected>,
        agent: &str,
        connection: &quinn::Connection,
    ) -> (ConnectedGuard, Option<quinn::Connection>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let replaced = self.connections.lock().ok().and_then(|mut connected| {
            connected
                .insert(agent.to_owned(), (id, connection.clone()))
                .map(|(_, old)| old)
        });
        (ConnectedGuard(self.clone(), agent.to_owned(), id), replaced)
    }
}

/// Keeps a connection listed until dropped.
struct ConnectedGuard(Arc<Connected>, String, u64);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        if let Ok(mut connected) = self.0.connections.lock()
            && connected.get(&self.1).is_some_and(|(id, _)| *id == self.2)
        {
            connected.remove(&self.1);
        }
    }
}

/// Counts a peer as unidentified until dropped (or [`Unidentified::identified`]).
struct Unidentified(Option<Arc<AtomicUsize>>);

impl Unidentified {
    fn identified(&mut self) {
        if let Some(count) = self.0.take() {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Unidentified {
    fn drop(&mut self) {
        self.identified();
    }
}

/// What a session knows of its agent, shared with its fetch streams: what it last told the
/// agent to run, and the snapshots the agent may hold (its delta bases).
#[derive(Debug, Default)]
struct SessionView {
    assigned: Vec<crate::store::AssignmentRow>,
    bases: std::collections::HashSet<(String, Digest)>,
}

/// Signed headers by (bundle, generation): the same for every agent, read once.
type HeaderCache = Mutex<HashMap<(String, u64), Arc<crate::store::SignedHeader>>>;

/// How many headers the cache keeps before it starts afresh.
const HEADERS_CACHED: usize = 4096;

/// What every agent connection shares.
pub struct AgentService {
    headers: HeaderCache,
    /// Agents and their assignments, read for many sessions at once.
    reads: Arc<Batcher<(String, bool), SessionRead>>,
    /// Status reports, stored for many sessions at once.
    statuses: Arc<Batcher<StatusWrite, StatusOutcome>>,
    /// Connections (last seen, version), recorded for many sessions at once.
    connections: Arc<Batcher<(String, String, i64), ()>>,
    enrolling: tokio::sync::Semaphore,
    connected: Arc<Connected>,
    unidentified: Arc<AtomicUsize>,
    counters: ServiceCounters,
    metrics: Arc<HubMetrics>,
    store: Arc<dyn HubStore>,
    keys: Arc<HubKeys>,
    payloads: PayloadCache,
    changes: Arc<Changes>,
    now: fn() -> i64,
    options: ServiceOptions,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The handshake or the connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// A payload could not be made.
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

impl AgentService {
    /// A service over the hub's store and keys. `changes` wakes connections when their
    /// agent's assignments, labels or revocation may have changed (one agent's, or all), and
    /// hears of enrolments (so the new agent's variants are rendered and assigned).
    pub fn new(
        store: Arc<dyn HubStore>,
        keys: Arc<HubKeys>,
        changes: Arc<Changes>,
        now: fn() -> i64,
        options: ServiceOptions,
        metrics: Arc<HubMetrics>,
    ) -> AgentService {
        AgentService {
            headers: Mutex::default(),
            reads: Batcher::new("session_reads", metrics.clone(), |store, asked| {
                let with_bases = asked.iter().any(|(_, bases)| *bases);
                let ids: Vec<String> = asked.into_iter().map(|(id, _)| id).collect();
                store.session_reads(&ids, with_bases)
            }),
            statuses: Batcher::new("record_statuses", metrics.clone(), |store, reports| {
                store.record_statuses(&reports)
            }),
            connections: Batcher::new("agents_connected", metrics.clone(), |store, connections| {
                let count = connections.len();
                store.agents_connected(&connections)?;
                Ok(vec![(); count])
            }),
            enrolling: tokio::sync::Semaphore::new(options.max_enrolling.max(1)),
            connected: Arc::default(),
            unidentified: Arc::default(),
            counters: ServiceCounters::default(),
            metrics,
            store,
            keys,
            payloads: PayloadCache::new(options.compression_level, options.cache_bytes),
            changes,
            now,
            options,
        }
    }

    /// The agents connected now (for the fleet page).
    pub fn connected(&self) -> Arc<Connected> {
        self.connected.clone()
    }

    /// The payload cache (for figures: compressions run).
    pub fn payloads(&self) -> &PayloadCache {
        &self.payloads
    }

    /// What was refused or throttled.
    pub fn counters(&self) -> &ServiceCounters {
        &self.counters
    }

    /// The hub's metrics this service adds to.
    pub fn metrics(&self) -> &Arc<HubMetrics> {
        &self.metrics
    }

    /// A generation's signed header (cached: every agent of a release asks for the same).
    async fn signed_header(
        self: &Arc<Self>,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<(Vec<u8>, Vec<u8>)>, ServeError> {
        let key = (bundle.to_owned(), generation);
        if let Some(found) = self
            .headers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(Some((**found).clone()));
        }
        let (lookup, at) = (bundle.to_owned(), generation);
        let found = self
            .with_store(move |store| store.signed_header(&lookup, at))
            .await?;
        if let Some(found) = &found {
            let mut headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
            if headers.len() >= HEADERS_CACHED {
                headers.clear();
            }
            headers.insert(key, Arc::new(found.clone()));
        }
        Ok(found)
    }

    async fn with_store<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&dyn HubStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ServeError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&*store))
            .await
            .map_err(|error| ServeError::Protocol(format!("store task failed: {error}")))?
            .map_err(ServeError::from)
    }
}

/// Accepts agent connections on `endpoint` until it is closed.
pub async fn serve(endpoint: quinn::Endpoint, service: Arc<AgentService>) {
    let batches = [
        tokio::spawn(service.reads.clone().run(service.store.clone())),
        tokio::spawn(service.statuses.clone().run(service.store.clone())),
        tokio::spawn(service.connections.clone().run(service.store.clone())),
    ];
    struct AbortOnDrop([tokio::task::JoinHandle<()>; 3]);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            for task in &self.0 {
                task.abort();
            }
        }
    }
    let _batches = AbortOnDrop(batches);
    while let Some(incoming) = endpoint.accept().await {
        let unidentified = service.unidentified.load(Ordering::Relaxed);
        if unidentified >= service.options.max_unidentified {
            service.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(remote = %incoming.remote_address(), unidentified, "too many unidentified peers; refused");
            incoming.refuse();
            continue;
        }
        if unidentified >= service.options.retry_above
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            service.counters.retries.fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        service.unidentified.fetch_add(1, Ordering::Relaxed);
        let guard = Unidentified(Some(service.unidentified.clone()));
        let service = service.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match handle_connection(incoming, service, guard).await {
                Ok(()) => tracing::debug!(%remote, "agent connection closed"),
                Err(error) => tracing::debug!(%remote, %error, "agent connection ended"),
            }
        });
    }
}

async fn refuse(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: ErrorCode,
    close_code: u32,
    message: String,
) -> Result<(), ServeError> {
    tracing::info!(remote = %connection.remote_address(), ?code, %message, "agent refused");
    let error = ErrorMessage {
        code,
        message,
        retry_after: None,
    };
    let _ = send_message(send, &Message::Error(error)).await;
    let _ = send.finish();
    // Give the error frame a moment to leave before the close overtakes it.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
    connection.close(close_code.into(), b"refused");
    Ok(())
}

async fn handle_connection(
    incoming: quinn::Incoming,
    service: Arc<AgentService>,
    mut unidentified: Unidentified,
) -> Result<(), ServeError> {
    let connection = incoming.await?;
    let key = peer_public_key(&connection)
        .ok_or_else(|| ServeError::Protocol("no ed25519 client key".to_owned()))?;
    let id = agent_id(&key.to_bytes());
    let first = tokio::time::timeout(IDENTIFY_WITHIN, async {
        let (send, recv) = connection.accept_bi().await?;
        let mut reader = MessageReader::new(recv);
        let first = reader
            .next()
            .await?
            .ok_or_else(|| ServeError::Protocol("control stream closed before Hello".to_owned()))?;
        Ok::<_, ServeError>((send, reader, first))
    })
    .await;
    let (mut send, reader, first) = match first {
        Ok(first) => first?,
        Err(_) => {
            connection.close(close::TOO_SLOW.into(), b"say Hello or Enrol first");
            return Err(ServeError::Protocol(format!(
                "no first message within {IDENTIFY_WITHIN:?}"
            )));
        }
    };
    let agent = service
        .reads
        .call((id.clone(), false))
        .await?
        .agent
        .filter(|agent| agent.public_key == key.to_bytes());
    let agent = match (agent, first) {
        (Some(agent), _) if agent.revoked.is_some() => {
            return refuse_revoked(&connection, &mut send, &agent).await;
        }
        (Some(agent), Message::Enrol(_)) => {
            // Enrolled before, but the answer was lost: say so again.
            send_message(
                &mut send,
                &Message::Enrolled(Enrolled {
                    agent_id: agent.id.clone(),
                }),
            )
            .await?;
            agent
        }
        (Some(agent), Message::Hello(hello)) => {
            unidentified.identified();
            return run_session(&service, connection, send, reader, agent, Some(hello)).await;
        }
        (None, Message::Enrol(enrol)) => {
            let permit = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                service.enrolling.acquire(),
            )
            .await;
            let Ok(Ok(_permit)) = permit else {
                service.counters.busy.fetch_add(1, Ordering::Relaxed);
                // Spread the retries: 5 to 35 s, by the key.
                let retry_after = 5 + u32::from(key.to_bytes()[0]) % 31;
                let error = ErrorMessage {
                    code: ErrorCode::Busy,
                    message: format!(
                        "the hub is enrolling many agents; come back in {retry_after} s"
                    ),
                    retry_after: Some(retry_after),
                };
                let _ = send_message(&mut send, &Message::Error(error)).await;
                let _ = send.finish();
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), send.stopped()).await;
                connection.close(close::BUSY.into(), b"busy");
                return Ok(());
            };
            match enrol_agent(&service, &key, &enrol.token).await? {
                Ok(agent) => {
                    tracing::info!(agent = %agent.id, version = %enrol.agent_version, "agent enrolled");
                    send_message(
                        &mut send,
                        &Message::Enrolled(Enrolled {
                            agent_id: agent.id.clone(),
                        }),
                    )
                    .await?;
                    service.changes.agent_enrolled(&agent.id);
                    agent
                }
                Err(message) => {
                    return refuse(
                        &connection,
                        &mut send,
                        ErrorCode::BadToken,
                        close::BAD_TOKEN,
                        message,
                    )
                    .await;
                }
            }
        }
        (None, _) => {
            return refuse(
                &connection,
                &mut send,
                ErrorCode::UnknownAgent,
                close::UNKNOWN_AGENT,
                format!(
                    "agent key {id} is not enrolled on this hub; enrol it with a token from `outpost-hub tokens create`"
                ),
            )
            .await;
        }
        (Some(_), other) => {
            return Err(ServeError::Protocol(format!(
                "expected Hello or Enrol first, got {}",
                message_name(&other)
            )));
        }
    };
    unidentified.identified();
    run_session(&service, connection, send, reader, agent, None).await
}

async fn refuse_revoked(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    agent: &Agent,
) -> Result<(), ServeError> {
    let (at, who, why) = agent.revoked.clone().unwrap_or_default();
    let message = format!(
        "agent {} was revoked at {at} by {who}: {why}; it gets nothing from this hub. Enrol a new key with a new token if this was a mistake",
        agent.id
    );
    refuse(
        connection,
        send,
        ErrorCode::Revoked,
        close::REVOKED,
        message,
    )
    .await
}

async fn enrol_agent(
    service: &Arc<AgentService>,
    key: &PublicKey,
    token: &str,
) -> Result<Result<Agent, String>, ServeError> {
    let digest = Digest::of(token.as_bytes());
    let public_key = key.to_bytes();
    let now = (service.now)();
    let outcome = service
        .with_store(move |store| store.enrol(&digest, &public_key, now))
        .await?;
    Ok(outcome.map_err(|error| error.to_string()))
}

fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::Assign(_) => "Assign",
        Message::Fetch(_) => "Fetch",
        Message::TransferStart(_) => "TransferStart",
        Message::TransferChunk(_) => "TransferChunk",
        Message::StatusReport(_) => "StatusReport",
        Message::Ack(_) => "Ack",
        Message::Error(_) => "Error",
        Message::Enrol(_) => "Enrol",
        Message::Enrolled(_) => "Enrolled",
        Message::Trust(_) => "Trust",
        Message::Drift(_) => "Drift",
    }
}

/// The enrolled agent's session: the control stream's loop, with fetches on their own streams.
async fn run_session(
    service: &Arc<AgentService>,
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    mut reader: MessageReader,
    agent: Agent,
    mut hello: Option<outpost_proto::wire::Hello>,
) -> Result<(), ServeError> {
    let id = agent.id.clone();
    if hello.is_none() {
        match reader.next().await? {
            Some(Message::Hello(first)) => hello = Some(first),
            other => {
                return Err(ServeError::Protocol(format!(
                    "expected Hello after enrolment, got {:?}",
                    other.as_ref().map(message_name)
                )));
            }
        }
    }
    // What the agent says it has seen: checked against this hub's state at the first read.
    let mut seen = hello.as_ref().map(|hello| Claims {
        sequence: hello.assignment_sequence,
        held: hello.have.clone(),
        proofs: hello.proofs.clone(),
    });
    let version = hello.map(|hello| hello.agent_version).unwrap_or_default();
    let now = (service.now)();
    service.connections.call((id.clone(), version, now)).await?;
    allow_identified(&connection);
    let (_connected, replaced) = service.connected.enter(&id, &connection);
    service.metrics.session_started();
    if let Some(old) = replaced {
        service.counters.replaced.fetch_add(1, Ordering::Relaxed);
        tracing::info!(agent = %id, old = %old.remote_address(), new = %connection.remote_address(), "a newer connection replaces the agent's old one");
        old.close(close::REPLACED.into(), b"replaced by a newer connection");
    }
    let span = tracing::info_span!("agent", agent = %id);
    // Everything the session does, its fetches too, is logged inside the agent span.
    async {
    tracing::info!(remote = %connection.remote_address(), "agent connected");
    let mut trust_changes = service.keys.trust_changes();
    trust_changes.borrow_and_update();
    send_message(&mut send, &Message::Trust(service.keys.trust())).await?;
    let view = Arc::new(Mutex::new(SessionView::default()));
    let subscription = service.changes.subscribe(&id);
    let mut fleet = service.changes.fleet.subscribe();
    fleet.borrow_and_update();
    let mut sent_sequence = None;
    let mut reports = TokenBucket::new(
        service.options.reports_per_second,
        service.options.reports_per_second * 10.0,
    );
    let fetches = Arc::new(tokio::sync::Mutex::new(TokenBucket::new(
        service.options.fetches_per_second,
        service.options.fetches_per_second * 10.0,
    )));
    // The agent is (re)read at the start (with its delta bases) and whenever the fleet
    // changes, not per message.
    let mut recheck = true;
    let mut first = true;
    loop {
        if std::mem::take(&mut recheck)
            && !push_assignments(
                service,
                &connection,
                &mut send,
                &id,
                &view,
                &mut sent_sequence,
                std::mem::take(&mut first),
                seen.take(),
            )
            .await?
        {
            return Ok(());
        }
        tokio::select! {
            () = subscription.changed() => recheck = true,
            changed = fleet.changed() => {
                if changed.is_err() {
                    connection.close(0u32.into(), b"hub stopping");
                    return Ok(());
                }
                recheck = true;
            }
            // New keys reach the agent before any assignment naming what they signed: both
            // travel on this stream, in order.
            changed = trust_changes.changed() => {
                if changed.is_ok() {
                    send_message(&mut send, &Message::Trust(service.keys.trust())).await?;
                }
            }
            message = reader.next() => match message? {
                Some(Message::StatusReport(report)) => {
                    let report = (report.sequence, report.bundles, Vec::new());
                    store_report(service, &id, &mut send, &mut reports, report).await?;
                }
                Some(Message::Drift(report)) => {
                    let report = (report.sequence, Vec::new(), report.bundles);
                    store_report(service, &id, &mut send, &mut reports, report).await?;
                }
                Some(Message::Hello(_)) => {}
                Some(other) => {
                    connection.close(close::PROTOCOL.into(), b"unexpected message");
                    return Err(ServeError::Protocol(format!("unexpected {} on the control stream", message_name(&other))));
                }
                None => return Ok(()),
            },
            stream = connection.accept_bi() => {
                let (stream_send, stream_recv) = stream?;
                let (service, agent, fetches, view) =
                    (service.clone(), id.clone(), fetches.clone(), view.clone());
                tokio::spawn(async move {
                    {
                        let mut fetches = fetches.lock().await;
                        if fetches.take().is_err() {
                            service.counters.throttled.fetch_add(1, Ordering::Relaxed);
                            fetches.wait().await;
                        }
                    }
                    if let Err(error) = serve_fetch(&service, &agent, &view, stream_send, stream_recv).await {
                        tracing::debug!(%agent, %error, "fetch ended");
                    }
                }.instrument(tracing::Span::current()));
            }
        }
    }
    }
    .instrument(span)
    .await
}

/// Stores a status or drift report from `id`'s outbox (sequence, statuses, drift) and acks it.
async fn store_report(
    service: &Arc<AgentService>,
    id: &str,
    send: &mut quinn::SendStream,
    reports: &mut TokenBucket,
    (sequence, bundles, drift): (
        u64,
        Vec<outpost_proto::wire::BundleStatus>,
        Vec<outpost_proto::wire::BundleDrift>,
    ),
) -> Result<(), ServeError> {
    if reports.take().is_err() {
        service.counters.throttled.fetch_add(1, Ordering::Relaxed);
        reports.wait().await;
    }
    let drifted: Vec<(String, &'static str, u64)> = drift
        .iter()
        .map(|d| {
            let objects = d.objects.len() as u64 + u64::from(d.more_objects);
            (
                d.bundle.clone(),
                crate::store::drift_action_name(d.action),
                objects,
            )
        })
        .collect();
    let new = service
        .statuses
        .call(StatusWrite {
            agent: id.to_owned(),
            sequence,
            bundles,
            drift,
            now: (service.now)(),
        })
        .await?
        .map_err(StoreError::Batch)?;
    if new {
        for (bundle, action, objects) in drifted {
            service.metrics.drift(&bundle, action, objects);
            tracing::info!(agent = %id, %bundle, action, objects, "drift reported");
        }
    }
    service.metrics.status_reports(1);
    tracing::debug!(agent = %id, sequence, new, "status report stored");
    send_message(send, &Message::Ack(outpost_proto::wire::Ack { sequence })).await?;
    Ok(())
}

/// Re-reads the agent: refuses it if it was revoked or removed (returns false), else sends its
/// assignments if their sequence is not the one sent last. With `seen` (the agent's Hello: the
/// sequence it accepted last, the snapshots it holds and their signed headers), a hub that is
/// behind the agent first moves past what the agent can prove (see [`catch_up`]) and the push
/// waits for the re-read that follows; claims it cannot prove are refused and answered with
/// this hub's own assignment.
#[allow(clippy::too_many_arguments)]
async fn push_assignments(
    service: &Arc<AgentService>,
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    id: &str,
    view: &Mutex<SessionView>,
    sent_sequence: &mut Option<u64>,
    with_bases: bool,
    seen: Option<Claims>,
) -> Result<bool, ServeError> {
    service
        .counters
        .session_reads
        .fetch_add(1, Ordering::Relaxed);
    let SessionRead {
        agent,
        assignments,
        bases,
    } = service.reads.call((id.to_owned(), with_bases)).await?;
    view.lock()
        .unwrap_or_else(|e| e.into_inner())
        .bases
        .extend(bases);
    match agent {
        Some(agent) if agent.revoked.is_none() => {}
        Some(agent) => {
            refuse_revoked(connection, send, &agent).await?;
            return Ok(false);
        }
        None => {
            let message = format!("agent {id} is no longer known to this hub");
            refuse(
                connection,
                send,
                ErrorCode::UnknownAgent,
                close::UNKNOWN_AGENT,
                message,
            )
            .await?;
            return Ok(false);
        }
    }
    if let Some(claims) = seen
        && behind(&assignments, claims.sequence, &claims.held)
    {
        let (store, keys, agent, now) = (
            service.store.clone(),
            service.keys.clone(),
            id.to_owned(),
            (service.now)(),
        );
        let ours = assignments.clone();
        let caught = tokio::task::spawn_blocking(move || {
            catch_up(&*store, &keys, &agent, &ours, &claims, now)
        })
        .await
        .map_err(|error| ServeError::Protocol(format!("catching up failed: {error}")))??;
        if !caught.refused.is_empty() {
            service.metrics.claims_refused(caught.refused.len());
            let (store, agent, now) = (service.store.clone(), id.to_owned(), (service.now)());
            let message = caught.refused.join("; ");
            tracing::warn!(%agent, %message, "the agent claims what this hub cannot verify; refused, and its own assignment sent");
            let recorded = tokio::task::spawn_blocking(move || {
                store.add_event(
                    now,
                    "agent-claim-refused",
                    &agent,
                    &format!("refused: {message}; nothing moved, the hub's signed assignment sent"),
                )
            })
            .await;
            if let Ok(Err(error)) = recorded {
                tracing::warn!(%error, "could not record the refused claim");
            }
        }
        if !caught.changed.is_empty() {
            // This session among them: it reads again and sends what is right.
            service.changes.agents_changed(&caught.changed);
            return Ok(true);
        }
    }
    if *sent_sequence != Some(assignments.sequence) {
        let first_send = sent_sequence.is_none();
        *sent_sequence = Some(assignments.sequence);
        // Bundles whose snapshot moved since the last Assign of this session: their new
        // payload goes ahead of the Assign, against the snapshot the agent was running.
        let changed: Vec<(crate::store::AssignmentRow, Digest)> = {
            let mut view = view.lock().unwrap_or_else(|e| e.into_inner());
            let changed = match first_send {
                true => Vec::new(),
                false => assignments
                    .entries
                    .iter()
                    .filter_map(|row| {
                        let before = view.assigned.iter().find(|old| old.bundle == row.bundle)?;
                        (before.digest != row.digest
                            && view.bases.contains(&(row.bundle.clone(), before.digest)))
                        .then(|| (row.clone(), before.digest))
                    })
                    .collect(),
            };
            for row in &assignments.entries {
                view.bases.insert((row.bundle.clone(), row.digest));
            }
            view.assigned = assignments.entries.clone();
            changed
        };
        if !changed.is_empty() && service.options.push_payloads {
            push_payloads(service, send, changed).await?;
        }
        let mut assign = Assign {
            sequence: assignments.sequence,
            assignments: assignments
                .entries
                .iter()
                .map(|row| Assignment {
                    bundle: row.bundle.clone(),
                    generation: row.generation,
                    digest: row.digest,
                })
                .collect(),
            agent: id.to_owned(),
            ..Assign::default()
        };
        // Signed like the snapshots: only the certified signing key chooses what a device runs.
        service
            .keys
            .sign_assignment(&mut assign, (service.now)())
            .map_err(|error| ServeError::Protocol(format!("signing the assignment: {error}")))?;
        send_message(send, &Message::Assign(assign)).await?;
    }
    Ok(true)
}

/// Whether this hub is behind what the agent has seen — the sign of a hub restored from a
/// backup: the agent accepted a higher sequence than the one the hub would send, or it holds a
/// generation of an assigned bundle at least as new as the assigned one with another body (the
/// hub handed that number out again). Cheap: no store access.
fn behind(
    assignments: &AgentAssignments,
    sequence: u64,
    held: &[outpost_proto::wire::HeldSnapshot],
) -> bool {
    let sequence_seen = sequence > assignments.sequence;
    sequence_seen
        || assignments.entries.iter().any(|row| {
            held.iter().any(|have| {
                have.bundle == row.bundle
                    && have.generation >= row.generation
                    && have.digest != row.digest
            })
        })
}

/// What an agent's `Hello` says it has seen.
#[derive(Debug, Clone)]
struct Claims {
    /// The highest assignment sequence it accepted.
    sequence: u64,
    /// The snapshots it holds.
    held: Vec<outpost_proto::wire::HeldSnapshot>,
    /// The signed headers of the newest of them, per bundle.
    proofs: Vec<outpost_proto::wire::HeldProof>,
}

/// What came of an agent's claims.
#[derive(Debug, Default)]
struct CaughtUp {
    /// The agents to wake (empty: nothing moved).
    changed: Vec<String>,
    /// The claims refused, for people.
    refused: Vec<String>,
}

/// Moves the hub past what the agent can show it has seen — the case of a hub restored from a
/// backup — and never past what it merely says:
/// - generation counters move only to generations proven by a snapshot header the agent holds
///   and this hub's keys verify (the hub signed that generation once, before the backup); a held
///   generation or digest without such a header is refused;
/// - the agent's own assignment sequence moves at most [`MAX_SEQUENCE_STEP`] past what this
///   hub issued it (it concerns that agent alone); a claim beyond is refused.
///
/// Then every assigned snapshot whose generation the agent proves it holds with another body
/// (or newer) is signed again under a fresh generation and put in its place everywhere. The
/// agent then accepts what it is sent: a higher sequence, a newer generation. One agent can
/// thus never move a fleet-wide counter past what this hub's keys signed, nor jam one.
fn catch_up(
    store: &dyn HubStore,
    keys: &HubKeys,
    agent: &str,
    assignments: &AgentAssignments,
    claims: &Claims,
    now: i64,
) -> Result<CaughtUp, ServeError> {
    use outpost_proto::wire::MAX_SEQUENCE_STEP;
    let mut caught = CaughtUp::default();
    let sequence = match claims.sequence.checked_sub(assignments.sequence) {
        Some(step) if step > MAX_SEQUENCE_STEP => {
            caught.refused.push(format!(
                "assignment sequence {} ({step} past the {} this hub issued it; at most {MAX_SEQUENCE_STEP} is taken on the agent's word)",
                claims.sequence, assignments.sequence
            ));
            assignments.sequence
        }
        _ => claims.sequence,
    };
    // The newest generation of each bundle that a header this hub's keys verify proves.
    let trust = keys.trust_store();
    let mut proven: HashMap<String, (u64, Digest)> = HashMap::new();
    for proof in &claims.proofs {
        let bundle = match outpost_proto::SnapshotHeader::decode(&proof.header) {
            Ok(header) => header.bundle,
            Err(error) => {
                caught.refused.push(format!(
                    "a held snapshot header that does not decode: {error}"
                ));
                continue;
            }
        };
        let expect = outpost_proto::verify::Expectation {
            bundle: &bundle,
            assigned_digest: None,
            installed: None,
        };
        match outpost_proto::verify::verify_header(&trust, &proof.header, &proof.signature, &expect)
        {
            Ok(verified) => {
                let header = verified.header();
                let entry = proven
                    .entry(header.bundle.clone())
                    .or_insert((header.generation, header.body_digest));
                if header.generation > entry.0 {
                    *entry = (header.generation, header.body_digest);
                }
            }
            Err(error) => caught.refused.push(format!(
                "a held snapshot header of {bundle} that this hub's keys do not verify: {error}"
            )),
        }
    }
    let is_proven = |bundle: &str, generation: u64, digest: &Digest| {
        proven.get(bundle) == Some(&(generation, *digest))
    };
    // Claims that would move this hub and that no header proves.
    for have in &claims.held {
        let moves = assignments.entries.iter().any(|row| {
            row.bundle == have.bundle
                && have.generation >= row.generation
                && have.digest != row.digest
        });
        if moves && !is_proven(&have.bundle, have.generation, &have.digest) {
            caught.refused.push(format!(
                "{} generation {} with body {} (no header signed by this hub's keys shows it)",
                have.bundle,
                have.generation,
                have.digest.short()
            ));
        }
    }
    let generations: Vec<(String, u64)> = proven
        .iter()
        .map(|(bundle, (generation, _))| (bundle.clone(), *generation))
        .collect();
    // Nothing proven and no sequence taken: nothing to move (not even this agent's sequence).
    let moved = match sequence > assignments.sequence || !generations.is_empty() {
        true => store.advance_past(agent, sequence, &generations, now)?,
        false => false,
    };
    let mut changed = Vec::new();
    for row in &assignments.entries {
        let outdated = claims.held.iter().any(|have| {
            have.bundle == row.bundle
                && have.generation >= row.generation
                && have.digest != row.digest
                && is_proven(&have.bundle, have.generation, &have.digest)
        });
        if !outdated {
            continue;
        }
        let Some(snapshot) = store.snapshot(&row.bundle, row.generation)? else {
            continue;
        };
        let generation =
            crate::resign::sign_again(store, keys, snapshot, now).map_err(|error| {
                ServeError::Protocol(format!("signing {} again: {error}", row.bundle))
            })?;
        tracing::warn!(%agent, bundle = %row.bundle, from = row.generation, to = generation, "the agent holds this generation, signed by this hub, with another body (a hub restored from a backup?); the assigned snapshot is signed again under a new generation");
        changed.extend(store.replace_generation(&row.bundle, row.generation, generation, now)?);
    }
    if moved || !changed.is_empty() {
        changed.push(agent.to_owned());
    }
    changed.sort();
    changed.dedup();
    caught.changed = changed;
    Ok(caught)
}

/// One fetch: check the snapshot is assigned, choose whole or delta, send from the resume point.
async fn serve_fetch(
    service: &Arc<AgentService>,
    agent: &str,
    view: &Mutex<SessionView>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), ServeError> {
    let mut reader = MessageReader::new(recv);
    let fetch: Fetch = match reader.next().await? {
        Some(Message::Fetch(fetch)) => fetch,
        other => {
            return Err(ServeError::Protocol(format!(
                "expected Fetch, got {:?}",
                other.as_ref().map(message_name)
            )));
        }
    };
    let wanted = fetch.snapshot;
    // The snapshot must be assigned to this agent (as its session last told it). The delta
    // base: the first held body the agent was assigned lately, so it cannot make the hub
    // compress against anything it names — the wanted body itself when only its header is new.
    let found = {
        let view = view.lock().unwrap_or_else(|e| e.into_inner());
        view.assigned
            .iter()
            .find(|row| row.digest == wanted)
            .cloned()
            .map(|row| {
                let base = fetch
                    .have
                    .iter()
                    .take(4)
                    .find(|digest| view.bases.contains(&(row.bundle.clone(), **digest)))
                    .copied();
                (row, base)
            })
    };
    let Some((row, base)) = found else {
        let message = format!(
            "snapshot {} is not assigned to agent {agent}",
            wanted.short()
        );
        return error_reply(&mut send, ErrorCode::NotAssigned, message).await;
    };
    let Some((header, signature, payload)) = prepare_transfer(service, &row, base).await? else {
        let message = format!("the hub no longer holds snapshot {}", wanted.short());
        return error_reply(&mut send, ErrorCode::UnknownSnapshot, message).await;
    };
    let bundle = row.bundle.clone();
    let encoding = encoding_name(&payload);
    service.metrics.transfer(encoding);
    let size = payload.bytes.len() as u64;
    let offset = match fetch.resume {
        Some(resume) if resume.payload_digest == payload.digest && resume.offset <= size => {
            resume.offset
        }
        _ => 0,
    };
    tracing::debug!(%agent, %bundle, snapshot = %wanted.short(), encoding = ?payload.encoding, size, offset, "sending");
    send_message(
        &mut send,
        &Message::TransferStart(TransferStart {
            snapshot: wanted,
            header,
            signature,
            encoding: payload.encoding,
            payload_size: size,
            payload_digest: payload.digest,
            offset,
        }),
    )
    .await?;
    let chunk_size = service
        .options
        .chunk_size
        .clamp(1, outpost_proto::wire::MAX_CHUNK_SIZE);
    let mut position = offset as usize;
    while position < payload.bytes.len() {
        let end = (position + chunk_size).min(payload.bytes.len());
        send_message(
            &mut send,
            &Message::TransferChunk(TransferChunk {
                payload_digest: payload.digest,
                offset: position as u64,
                bytes: payload.bytes[position..end].to_vec(),
            }),
        )
        .await?;
        service.metrics.sent(encoding, end - position);
        position = end;
    }
    let _ = send.finish();
    let _ = send.stopped().await;
    Ok(())
}

/// The label of a payload's encoding.
fn encoding_name(payload: &Payload) -> &'static str {
    match payload.encoding {
        outpost_proto::wire::PayloadEncoding::Whole => "whole",
        outpost_proto::wire::PayloadEncoding::Delta { .. } => "delta",
    }
}

/// The signed header and the payload (against `base`, or whole) of an assigned snapshot;
/// `None` when the hub no longer holds it.
async fn prepare_transfer(
    service: &Arc<AgentService>,
    row: &crate::store::AssignmentRow,
    base: Option<Digest>,
) -> Result<Option<(Vec<u8>, Vec<u8>, Arc<Payload>)>, ServeError> {
    let Some((header, signature)) = service.signed_header(&row.bundle, row.generation).await?
    else {
        return Ok(None);
    };
    let wanted = row.digest;
    let store = service.store.clone();
    let load_bundle = row.bundle.clone();
    let (payload, compressed) = service
        .payloads
        .get(wanted, base, move || {
            let body = |digest: &Digest| -> Result<Option<Vec<u8>>, String> {
                store
                    .snapshot_body(&load_bundle, digest)
                    .map_err(|error| error.to_string())
            };
            Ok(Bodies {
                target: body(&wanted)?
                    .ok_or_else(|| format!("snapshot {} vanished", wanted.short()))?,
                // A base the hub no longer has: the payload is the whole body.
                base: match &base {
                    Some(base) => body(base)?,
                    None => None,
                },
            })
        })
        .await?;
    service
        .metrics
        .payload_lookup(encoding_name(&payload), compressed);
    Ok(Some((header, signature, payload)))
}

/// Payloads up to this size are pushed on the control stream ahead of the `Assign` that
/// names them, when the agent's assignment of the bundle moved from a snapshot it was sent
/// before (the delta base): the agent installs without a round trip of its own.
pub const PUSH_LIMIT: usize = 64 << 10;

/// Pushes the payloads of `changed` (each with the digest the agent was assigned before, its
/// likely delta base) that fit [`PUSH_LIMIT`] in one chunk, ahead of the `Assign`. An agent
/// that cannot use one (it lacks the base) fetches as usual.
async fn push_payloads(
    service: &Arc<AgentService>,
    send: &mut quinn::SendStream,
    changed: Vec<(crate::store::AssignmentRow, Digest)>,
) -> Result<(), ServeError> {
    for (row, base) in changed {
        let Some((header, signature, payload)) =
            prepare_transfer(service, &row, Some(base)).await?
        else {
            continue;
        };
        if payload.bytes.len() > PUSH_LIMIT.min(outpost_proto::wire::MAX_CHUNK_SIZE) {
            continue;
        }
        let encoding = encoding_name(&payload);
        send_message(
            send,
            &Message::TransferStart(TransferStart {
                snapshot: row.digest,
                header,
                signature,
                encoding: payload.encoding,
                payload_size: payload.bytes.len() as u64,
                payload_digest: payload.digest,
                offset: 0,
            }),
        )
        .await?;
        send_message(
            send,
            &Message::TransferChunk(TransferChunk {
                payload_digest: payload.digest,
                offset: 0,
                bytes: payload.bytes.clone(),
            }),
        )
        .await?;
        service.metrics.transfer(encoding);
        service.metrics.pushed();
        service.counters.pushed.fetch_add(1, Ordering::Relaxed);
        service.metrics.sent(encoding, payload.bytes.len());
    }
    Ok(())
}

async fn error_reply(
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) -> Result<(), ServeError> {
    let error = ErrorMessage {
        code,
        message,
        retry_after: None,
    };
    send_message(send, &Message::Error(error)).await?;
    let _ = send.finish();
    Ok(())
}
