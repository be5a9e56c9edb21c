//! The agent's link to the hub: one long-lived QUIC connection, re-established with capped,
//! jittered exponential backoff; enrolment on first contact; assignments accepted by sequence;
//! snapshots fetched (delta against what the agent holds), persisted chunk by chunk so a broken
//! transfer resumes from the last byte kept, and verified before they are installed; status
//! reports sent from the outbox and deleted only when acknowledged.
//!
//! Retry or give up is decided in one place, `SessionError::into_fatal`: refusals by the hub
//! (revoked, unknown key, bad token) stop the agent with the hub's words; everything else is
//! retried.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_proto::transport::{
    MessageReader, SERVER_NAME, StreamError, Tuning, client_config, send_message,
};
use outpost_proto::verify::verify_header;
use outpost_proto::wire::{
    Assignment, BundleStatus, Enrol, ErrorCode, ErrorMessage, Fetch, Hello, Message,
    PayloadEncoding, Phase, Resume, TransferStart,
};
use outpost_proto::{Digest, Expectation, SigningKey};
use tokio::sync::{Notify, watch};

use crate::state::{Download, State, StateError};

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// QUIC tuning.
    pub tuning: Tuning,
    /// First reconnect delay (before jitter).
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Seed for the backoff jitter (give each agent its own).
    pub seed: u64,
    /// Reported to the hub.
    pub agent_version: String,
    /// Attempts per snapshot when received bytes do not verify.
    pub fetch_attempts: u32,
    /// Local UDP address.
    pub bind: SocketAddr,
    /// Status reports in flight before waiting for acknowledgements.
    pub reports_in_flight: usize,
    /// How long a handshake may take before the next hub address is tried, when the
    /// enrolment names more than one (a single address waits for the QUIC idle timeout).
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            tuning: Tuning::default(),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            seed: 0,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            fetch_attempts: 3,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            reports_in_flight: 16,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// Figures the client keeps, for tests, benchmarks and `status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections established.
    pub connections: AtomicU64,
    /// Payload bytes received (resent bytes count again).
    pub payload_bytes: AtomicU64,
    /// Snapshots installed.
    pub installs: AtomicU64,
    /// Transfers whose bytes did not verify and were dropped.
    pub rejected: AtomicU64,
    /// Assignments refused: unsigned, not signed by a certified key, for another agent, or
    /// expired (nothing of them was taken).
    pub assignments_refused: AtomicU64,
    /// Status reports acknowledged.
    pub acknowledged: AtomicU64,
    /// Whether a connection to the hub is up now.
    pub hub_connected: std::sync::atomic::AtomicBool,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The hub refused this agent.
    #[error("the hub refused this agent ({code:?}): {message}")]
    Refused {
        /// Why.
        code: ErrorCode,
        /// The hub's words.
        message: String,
    },
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The endpoint could not be created.
    #[error("cannot open a UDP socket on {bind}: {source}")]
    Bind {
        /// Address.
        bind: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("the hub refused this agent ({0:?}): {1}")]
    Refused(ErrorCode, String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot reach the hub at {0}: {1}")]
    Resolve(String, String),
    #[error("TLS setup: {0}")]
    Setup(String),
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("the hub is busy: {0}")]
    Busy(String, Duration),
    #[error("no handshake with the hub at {0} within {1:?}")]
    Unanswered(SocketAddr, Duration),
}

/// What an `Error` from the hub means for the session: `Busy` waits as long as it says.
fn refusal(error: ErrorMessage) -> SessionError {
    match error.code {
        ErrorCode::Busy => SessionError::Busy(
            error.message,
            Duration::from_secs(u64::from(error.retry_after.unwrap_or(10).clamp(1, 3600))),
        ),
        code => SessionError::Refused(code, error.message),
    }
}

impl SessionError {
    /// Refusals and a broken state database end the agent (`Ok`); the rest is retried (`Err`).
    fn into_fatal(self) -> Result<AgentError, SessionError> {
        match self {
            SessionError::Refused(code, message) => Ok(AgentError::Refused { code, message }),
            SessionError::State(error) => Ok(AgentError::State(error)),
            other => Err(other),
        }
    }
}

/// Why one transfer failed.
enum TransferError {
    /// The bytes or header did not verify: drop them, fetch again.
    Rejected(String),
    /// The hub would not send it (not assigned, gone): wait for new assignments.
    Declined(ErrorMessage),
    /// The link or the state failed.
    Session(SessionError),
}

macro_rules! transfer_error_from {
    ($($source:ty),*) => {$(
        impl From<$source> for TransferError {
            fn from(error: $source) -> Self {
                TransferError::Session(error.into())
            }
        }
    )*};
}

transfer_error_from!(
    SessionError,
    StateError,
    StreamError,
    quinn::ConnectionError
);

/// An agent's connection manager. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    key: SigningKey,
    state: Arc<Mutex<State>>,
    options: ClientOptions,
    counters: Counters,
    installed: watch::Sender<u64>,
    changed: watch::Sender<u64>,
    outbox_ready: Notify,
    fetch_wanted: Notify,
    /// Which of the hub's addresses to try first: moved on when one fails or is lost.
    next_hub: AtomicUsize,
    /// The endpoint of the running link, to close on shutdown.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    /// Payloads the hub pushed ahead of the assignment naming them, by snapshot digest: used
    /// by the next fetch of that snapshot instead of a request (at most [`PUSHED_KEPT`]).
    pushed: Mutex<HashMap<outpost_proto::Digest, (TransferStart, Vec<u8>)>>,
}

/// How many pushed payloads are kept waiting for their assignment.
const PUSHED_KEPT: usize = 8;
/// The largest pushed payload kept (the hub pushes up to 64 KiB).
const PUSHED_MAX: u64 = 256 << 10;

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// The hub addresses in an enrolment's `hub`: one or more `host:port`, separated by commas
/// (replicas of one hub on a shared store, tried in turn).
pub fn hub_addresses(hubs: &str) -> impl Iterator<Item = &str> {
    hubs.split(',').map(str::trim).filter(|hub| !hub.is_empty())
}

/// What is wrong with a `hub` value, if anything: every address needs a port.
pub fn check_hub_addresses(hubs: &str) -> Result<(), String> {
    if hub_addresses(hubs).next().is_none() {
        return Err("no hub address; give one like \"hub.example.com:7443\"".to_owned());
    }
    match hub_addresses(hubs).find(|hub| !hub.contains(':')) {
        Some(hub) => Err(format!(
            "hub address {hub:?} needs a port, like \"hub.example.com:7443\" (several: separate them with commas)"
        )),
        None => Ok(()),
    }
}

/// splitmix64: a tiny seeded generator for backoff jitter.
pub fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The wait before a reconnect: drawn uniformly from [cap/8, cap] where the cap doubles with
/// each failed attempt from `min` up to `max` ("full jitter", floored so an agent never
/// hammers). After an established connection is lost the agent starts at the fourth step
/// ([`LOST_CONNECTION_STEP`]), so when a hub restarts, thousands of agents come back spread
/// over seconds instead of in the same instant.
pub fn backoff_delay(min: Duration, max: Duration, failures: u32, random: u64) -> Duration {
    let cap = min.saturating_mul(1u32 << failures.min(20)).min(max);
    let floor = cap / 8;
    let spread = (cap - floor).as_millis().max(1) as u64;
    floor + Duration::from_millis(random % spread)
}

/// Where backoff starts after an established connection is lost.
pub const LOST_CONNECTION_STEP: u32 = 3;

impl Client {
    /// A client for the agent with `key` and `state`.
    pub fn new(key: SigningKey, state: State, options: ClientOptions) -> Client {
        Client {
            inner: Arc::new(Inner {
                key,
                state: Arc::new(Mutex::new(state)),
                options,
                counters: Counters::default(),
                installed: watch::Sender::new(0),
                changed: watch::Sender::new(0),
                outbox_ready: Notify::new(),
                fetch_wanted: Notify::new(),
                next_hub: AtomicUsize::new(0),
                endpoint: Mutex::new(None),
                pushed: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The figures.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Ticks on every installed snapshot.
    pub fn installed(&self) -> watch::Receiver<u64> {
        self.inner.installed.subscribe()
    }

    /// Ticks when what the agent should enforce may have changed: a snapshot was installed or
    /// a new assignment set was accepted.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Asks the fetcher to look for missing snapshots again (one was dropped as damaged).
    pub fn refetch(&self) {
        self.inner.fetch_wanted.notify_one();
    }

    /// Closes the link (the agent is stopping): the hub hears of it at once instead of at the
    /// idle timeout. Waits up to a second for the close to go out.
    pub async fn shutdown(&self) {
        let endpoint = self
            .inner
            .endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(endpoint) = endpoint {
            endpoint.close(quinn::VarInt::from_u32(0), b"agent stopping");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// Runs `work` on the state database on a blocking thread.
    pub async fn with_state<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut State) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let state = self.inner.state.clone();
        tokio::task::spawn_blocking(move || {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            work(&mut state)
        })
        .await
        .unwrap_or_else(|error| Err(StateError::Corrupt(format!("state task failed: {error}"))))
    }

    /// Queues a status report for the hub.
    pub async fn report(&self, bundles: Vec<BundleStatus>) -> Result<u64, StateError> {
        let sequence = self
            .with_state(move |state| state.queue_status(bundles, unix_now()))
            .await?;
        self.inner.outbox_ready.notify_one();
        Ok(sequence)
    }

    /// Queues drift reports for the hub (see [`State::queue_drift`]).
    pub async fn report_drift(
        &self,
        bundles: Vec<outpost_proto::wire::BundleDrift>,
        left: Vec<(String, Option<Digest>)>,
    ) -> Result<u64, StateError> {
        let sequence = self
            .with_state(move |state| state.queue_drift(bundles, &left, unix_now()))
            .await?;
        self.inner.outbox_ready.notify_one();
        Ok(sequence)
    }

    /// Stays connected to the hub until refused. Returns only with the reason it stopped.
    pub async fn run(&self) -> AgentError {
        let bind = self.inner.options.bind;
        match quinn::Endpoint::client(bind) {
            Ok(endpoint) => self.run_on(endpoint).await,
            Err(source) => AgentError::Bind { bind, source },
        }
    }

    /// [`Client::run`] on an endpoint made elsewhere (the simulations' in-memory network).
    pub async fn run_on(&self, endpoint: quinn::Endpoint) -> AgentError {
        *self
            .inner
            .endpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(endpoint.clone());
        let mut failures = 0u32;
        let mut random = self.inner.options.seed ^ 0x5EED;
        loop {
            let mut connected = false;
            let mut at_least = Duration::ZERO;
            let ended = self.session(&endpoint, &mut connected).await;
            self.inner
                .counters
                .hub_connected
                .store(false, Ordering::Relaxed);
            match ended.map_err(SessionError::into_fatal) {
                Ok(()) => tracing::info!("the hub closed the connection; reconnecting"),
                Err(Ok(fatal)) => return fatal,
                Err(Err(SessionError::Busy(message, wait))) => {
                    tracing::info!(%message, ?wait, "the hub is busy; trying again when it says");
                    at_least = wait;
                }
                Err(Err(error)) => tracing::warn!(%error, "link to the hub lost"),
            }
            failures = if connected {
                LOST_CONNECTION_STEP
            } else {
                failures + 1
            };
            let options = &self.inner.options;
            let delay = backoff_delay(
                options.backoff_min,
                options.backoff_max,
                failures,
                next_random(&mut random),
            )
            .max(at_least);
            tracing::debug!(?delay, failures, "reconnecting after");
            tokio::time::sleep(delay).await;
        }
    }

    /// Connects to one of the hub's addresses (`hubs`: one or more `host:port`, comma
    /// separated — replicas, or one load-balanced name that resolves to several). Starts with
    /// the address after the one that last failed or was lost, so an agent whose replica died
    /// goes to another; with several, each handshake gets `connect_timeout`.
    async fn connect(
        &self,
        endpoint: &quinn::Endpoint,
        hubs: &str,
        config: quinn::ClientConfig,
    ) -> Result<quinn::Connection, SessionError> {
        let mut candidates: Vec<SocketAddr> = Vec::new();
        let mut unresolved = Vec::new();
        for hub in hub_addresses(hubs) {
            match tokio::net::lookup_host(hub).await {
                Ok(addresses) => {
                    for address in addresses {
                        if !candidates.contains(&address) {
                            candidates.push(address);
                        }
                    }
                }
                Err(error) => unresolved.push(format!("{hub}: {error}")),
            }
        }
        if candidates.is_empty() {
            let why = if unresolved.is_empty() {
                "no address".to_owned()
            } else {
                unresolved.join("; ")
            };
            return Err(SessionError::Resolve(hubs.to_owned(), why));
        }
        for problem in &unresolved {
            tracing::warn!(%problem, "a hub address does not resolve; trying the others");
        }
        let first = self.inner.next_hub.load(Ordering::Relaxed);
        let mut last_error = None;
        for attempt in 0..candidates.len() {
            let index = (first + attempt) % candidates.len();
            let address = candidates[index];
            // An address this endpoint cannot dial (IPv6 from an IPv4 socket) is one failure.
            let outcome = match endpoint.connect_with(config.clone(), address, SERVER_NAME) {
                Err(error) => Err(SessionError::from(error)),
                Ok(connecting) if candidates.len() == 1 => {
                    connecting.await.map_err(SessionError::from)
                }
                Ok(connecting) => {
                    match tokio::time::timeout(self.inner.options.connect_timeout, connecting).await
                    {
                        Ok(outcome) => outcome.map_err(SessionError::from),
                        Err(_) => Err(SessionError::Unanswered(
                            address,
                            self.inner.options.connect_timeout,
                        )),
                    }
                }
            };
            match outcome {
                Ok(connection) => {
                    // A lost connection starts the next attempt at the following address.
                    self.inner
                        .next_hub
                        .store((index + 1) % candidates.len(), Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(error) => {
                    if candidates.len() > 1 {
                        tracing::info!(%address, %error, "hub address failed; trying the next");
                    }
                    last_error = Some(error);
                }
            }
        }
        self.inner.next_hub.store(first + 1, Ordering::Relaxed);
        Err(last_error
            .unwrap_or_else(|| SessionError::Resolve(hubs.to_owned(), "no address".to_owned())))
    }

    async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        connected: &mut bool,
    ) -> Result<(), SessionError> {
        let enrolment = self
            .with_state(|state| state.enrolment())
            .await?
            .ok_or(StateError::NotEnrolled)?;
        let config = client_config(
            &self.inner.key,
            enrolment.hub_pin,
            &self.inner.options.tuning,
        )
        .map_err(|error| SessionError::Setup(error.to_string()))?;
        let connection = self.connect(endpoint, &enrolment.hub, config).await?;
        *connected = true;
        self.inner
            .counters
            .connections
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .hub_connected
            .store(true, Ordering::Relaxed);
        tracing::info!(hub = %connection.remote_address(), "connected to the hub");
        let (mut send, recv) = connection.open_bi().await?;
        let mut reader = MessageReader::new(recv);
        if let (Some(token), None) = (enrolment.token, &enrolment.agent_id) {
            let enrol = Enrol {
                token,
                agent_version: self.inner.options.agent_version.clone(),
            };
            send_message(&mut send, &Message::Enrol(enrol)).await?;
            match reader.next().await? {
                Some(Message::Enrolled(enrolled)) => {
                    tracing::info!(agent = %enrolled.agent_id, "enrolled");
                    let id = enrolled.agent_id.clone();
                    self.with_state(move |state| state.enrolled(&id)).await?;
                }
                Some(Message::Error(error)) => return Err(refusal(error)),
                other => {
                    return Err(SessionError::Protocol(format!(
                        "expected Enrolled, got {other:?}"
                    )));
                }
            }
        }
        let (sequence, have, proofs) = self
            .with_state(|state| {
                Ok((
                    state.assignment_sequence()?,
                    state.held()?,
                    state.held_proofs()?,
                ))
            })
            .await?;
        let hello = Hello {
            agent_version: self.inner.options.agent_version.clone(),
            assignment_sequence: sequence,
            have,
            proofs,
        };
        send_message(&mut send, &Message::Hello(hello)).await?;

        let fetcher = tokio::spawn({
            let (client, connection) = (self.clone(), connection.clone());
            async move {
                client
                    .fetch_loop(&connection, &client.inner.fetch_wanted)
                    .await
            }
        });
        let _abort = AbortOnDrop(fetcher.abort_handle());
        let mut fetcher = fetcher;
        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut sent_upto = 0u64;
        let mut pushed_start: Option<TransferStart> = None;
        loop {
            // Send queued reports, keeping a bounded number unacknowledged.
            let room = self
                .inner
                .options
                .reports_in_flight
                .saturating_sub(in_flight.len());
            if room > 0 {
                let reports = self
                    .with_state(move |state| state.outbox(sent_upto, room))
                    .await?;
                for (sequence, report) in reports {
                    sent_upto = sequence;
                    in_flight.push_back(sequence);
                    send_message(&mut send, &report).await?;
                }
            }
            tokio::select! {
                message = reader.next() => match message? {
                    Some(Message::Trust(trust)) => {
                        let (added, revocations) = self
                            .with_state(move |state| {
                                let mut added = 0;
                                for certificate in &trust.certificates {
                                    added += usize::from(state.add_certificate(certificate)?);
                                }
                                // A list that does not verify is ignored, not fatal: the hub
                                // (or a relay) cannot make the agent stop by sending garbage.
                                let revocations = trust
                                    .revocations
                                    .as_ref()
                                    .map(|wire| state.apply_revocations(wire));
                                // The hub admits the agent (again): no refusal stands.
                                state.set_link_refusal(None)?;
                                Ok((added, revocations))
                            })
                            .await?;
                        tracing::debug!(added, "signing-key certificates");
                        match revocations {
                            Some(Ok(true)) => {
                                let trust = self.with_state(|state| state.trust_store()).await?;
                                let revoked: Vec<String> = trust.revoked().map(ToString::to_string).collect();
                                tracing::warn!(version = trust.revocations_version(), revoked = %revoked.join(", "), "signing keys revoked by the root: nothing they sign is accepted from now on");
                            }
                            Some(Err(error)) => tracing::warn!(%error, "the hub sent a revocation list that does not verify; ignored"),
                            _ => {}
                        }
                        self.refetch();
                    }
                    Some(Message::Assign(assign)) => {
                        let sequence = assign.sequence;
                        // Only an assignment the hub's certified signing key signed, for this
                        // agent and in date, is taken; anything else changes nothing (above
                        // all, prunes nothing).
                        let checked = self
                            .with_state(move |state| {
                                let trust = state.trust_store()?;
                                let agent = state
                                    .enrolment()?
                                    .and_then(|enrolment| enrolment.agent_id)
                                    .unwrap_or_default();
                                match outpost_proto::assignment::verify(&trust, &assign, &agent, unix_now()) {
                                    Ok(()) => Ok(Ok(state.accept_assign(&assign)?)),
                                    Err(error) => Ok(Err(error)),
                                }
                            })
                            .await?;
                        match checked {
                            Ok(accepted) => {
                                tracing::info!(sequence, accepted, "assignments");
                                if accepted {
                                    self.inner.changed.send_modify(|count| *count += 1);
                                }
                                self.refetch();
                            }
                            Err(error) => {
                                self.inner.counters.assignments_refused.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(sequence, %error, "assignment refused; this device keeps running what it runs");
                            }
                        }
                    }
                    // A small payload pushed ahead of the Assign naming it: kept for the fetch
                    // that Assign starts (it is verified there like any other).
                    Some(Message::TransferStart(start)) => pushed_start = Some(start),
                    Some(Message::TransferChunk(chunk)) => {
                        if let Some(start) = pushed_start.take()
                            && chunk.payload_digest == start.payload_digest
                            && chunk.offset == 0
                            && chunk.bytes.len() as u64 == start.payload_size
                            && start.payload_size <= PUSHED_MAX
                        {
                            let mut pushed = self.inner.pushed.lock().unwrap_or_else(|e| e.into_inner());
                            if pushed.len() >= PUSHED_KEPT {
                                pushed.clear();
                            }
                            pushed.insert(start.snapshot, (start, chunk.bytes));
                        }
                    }
                    Some(Message::Ack(ack)) => {
                        self.with_state(move |state| state.acknowledge(ack.sequence)).await?;
                        while in_flight.front().is_some_and(|sequence| *sequence <= ack.sequence) {
                            in_flight.pop_front();
                            self.inner.counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Message::Error(error)) => match error.code {
                        ErrorCode::Revoked | ErrorCode::UnknownAgent | ErrorCode::BadToken | ErrorCode::Busy => {
                            return Err(refusal(error));
                        }
                        code => tracing::warn!(?code, message = %error.message, "hub reported an error"),
                    },
                    Some(other) => tracing::warn!(?other, "unexpected message on the control stream"),
                    None => return Ok(()),
                },
                () = self.inner.outbox_ready.notified() => {}
                ended = &mut fetcher => {
                    return match ended {
                        Ok(Err(error)) => Err(error),
                        _ => Err(SessionError::Protocol("fetcher stopped".to_owned())),
                    };
                }
            }
        }
    }

    /// Fetches every assigned snapshot the agent does not hold, then waits for news.
    async fn fetch_loop(
        &self,
        connection: &quinn::Connection,
        wake: &Notify,
    ) -> Result<(), SessionError> {
        // Snapshots the hub declined or that failed verification too often: not asked again
        // until the next news (assignments or trust).
        let mut skipped: HashSet<outpost_proto::Digest> = HashSet::new();
        loop {
            let (assignments, held) = self
                .with_state(|state| Ok((state.assignments()?, state.held()?)))
                .await?;
            // Missing: not held, or held under an older generation (the hub signed the same
            // body again: a fresh expiry, a new key, a roll back) — then only the header is new.
            let missing: Vec<Assignment> = assignments
                .into_iter()
                .filter(|assignment| {
                    !held.iter().any(|held| {
                        held.bundle == assignment.bundle
                            && held.digest == assignment.digest
                            && held.generation >= assignment.generation
                    }) && !skipped.contains(&assignment.digest)
                })
                .collect();
            if missing.is_empty() {
                wake.notified().await;
                skipped.clear();
                continue;
            }
            for assignment in missing {
                if !self.fetch_one(connection, &assignment).await? {
                    skipped.insert(assignment.digest);
                }
            }
        }
    }

    /// Fetches one snapshot, retrying when its bytes do not verify. Ok(false): not installed.
    async fn fetch_one(
        &self,
        connection: &quinn::Connection,
        assignment: &Assignment,
    ) -> Result<bool, SessionError> {
        let attempts = self.inner.options.fetch_attempts.max(1);
        let mut last_reason = String::new();
        for attempt in 1..=attempts {
            match self.transfer(connection, assignment).await {
                Ok(()) => return Ok(true),
                Err(TransferError::Rejected(reason)) => {
                    self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(bundle = %assignment.bundle, snapshot = %assignment.digest.short(), attempt, %reason, "received snapshot rejected; discarding it");
                    let digest = assignment.digest;
                    self.with_state(move |state| state.drop_download(&digest))
                        .await?;
                    last_reason = reason;
                }
                Err(TransferError::Declined(error)) => {
                    tracing::warn!(bundle = %assignment.bundle, code = ?error.code, message = %error.message, "hub declined the fetch");
                    return Ok(false);
                }
                Err(TransferError::Session(error)) => return Err(error),
            }
        }
        let status = BundleStatus {
            bundle: assignment.bundle.clone(),
            digest: assignment.digest,
            generation: assignment.generation,
            phase: Phase::Failed,
            objects_total: 0,
            objects_ready: 0,
            message: format!(
                "snapshot refused {attempts} times ({last_reason}); keeping the installed one"
            ),
            observed_at: unix_now(),
            stale: false,
        };
        self.report(vec![status]).await?;
        Ok(false)
    }

    async fn transfer(
        &self,
        connection: &quinn::Connection,
        assignment: &Assignment,
    ) -> Result<(), TransferError> {
        let pushed = self
            .inner
            .pushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&assignment.digest);
        if let Some((start, payload)) = pushed {
            match self.install_pushed(assignment, start, payload).await {
                Ok(()) => return Ok(()),
                // Not usable (a base this agent no longer holds, say): fetched as usual.
                Err(TransferError::Rejected(reason)) => {
                    tracing::debug!(bundle = %assignment.bundle, %reason, "pushed payload not used; fetching");
                }
                Err(error) => return Err(error),
            }
        }
        let (bundle, wanted) = (assignment.bundle.clone(), assignment.digest);
        let lookup = bundle.clone();
        let (held, partial, trust, installed) = self
            .with_state(move |state| {
                Ok((
                    state.held()?,
                    state.download(&wanted)?,
                    state.trust_store()?,
                    state.installed(&lookup)?,
                ))
            })
            .await?;
        let have: Vec<_> = held
            .iter()
            .filter(|held| held.bundle == bundle)
            .map(|held| held.digest)
            .collect();
        let resume = partial
            .as_ref()
            .filter(|partial| partial.received > 0)
            .map(|partial| Resume {
                payload_digest: partial.payload_digest,
                offset: partial.received,
            });
        let (mut send, recv) = connection.open_bi().await?;
        let fetch = Fetch {
            snapshot: wanted,
            have,
            resume,
        };
        send_message(&mut send, &Message::Fetch(fetch)).await?;
        let _ = send.finish();
        let mut reader = MessageReader::new(recv);
        let start = match reader.next().await? {
            Some(Message::TransferStart(start)) => start,
            Some(Message::Error(error)) => return Err(TransferError::Declined(error)),
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected TransferStart, got {other:?}"
                ))
                .into());
            }
        };
        // The header is checked before any payload byte is kept.
        let (header, reference) = self
            .check_start(&bundle, wanted, &start, &trust, installed)
            .await?;
        let continuing = partial.as_ref().is_some_and(|partial| {
            partial.payload_digest == start.payload_digest
                && partial.received == start.offset
                && start.offset > 0
        });
        if !continuing {
            if start.offset != 0 {
                return Err(TransferError::Rejected(format!(
                    "hub resumed at byte {} of a payload this agent does not hold",
                    start.offset
                )));
            }
            let download = Download {
                snapshot: wanted,
                bundle: bundle.clone(),
                header: start.header.clone(),
                signature: start.signature.clone(),
                encoding: start.encoding,
                payload_size: start.payload_size,
                payload_digest: start.payload_digest,
                received: 0,
            };
            self.with_state(move |state| state.begin_download(&download))
                .await?;
        }
        let size = start.payload_size;
        let mut received = start.offset;
        if size > outpost_proto::header::MAX_BODY_SIZE {
            return Err(TransferError::Rejected(format!(
                "payload of {size} bytes exceeds the limit"
            )));
        }
        while received < size {
            // Take every chunk that has already arrived and keep them in one transaction, so
            // persisting keeps pace with the link and little is lost if the agent dies.
            let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut batch_end = received;
            loop {
                let next = if batch.is_empty() {
                    reader.next().await?
                } else {
                    match tokio::time::timeout(Duration::ZERO, reader.next()).await {
                        Ok(next) => next?,
                        Err(_) => break,
                    }
                };
                let chunk = match next {
                    Some(Message::TransferChunk(chunk)) => chunk,
                    Some(Message::Error(error)) => return Err(TransferError::Declined(error)),
                    None if !batch.is_empty() => break,
                    None => {
                        return Err(SessionError::Protocol(format!(
                            "transfer ended at byte {received} of {size}"
                        ))
                        .into());
                    }
                    Some(other) => {
                        return Err(SessionError::Protocol(format!(
                            "unexpected {other:?} in a transfer"
                        ))
                        .into());
                    }
                };
                let length = chunk.bytes.len() as u64;
                if chunk.payload_digest != start.payload_digest
                    || chunk.offset != batch_end
                    || length > size - batch_end
                {
                    return Err(TransferError::Rejected(format!(
                        "chunk at {} ({length} bytes) does not continue the payload at {batch_end}",
                        chunk.offset
                    )));
                }
                batch_end += length;
                batch.push((chunk.offset, chunk.bytes));
                if batch_end == size || batch.len() >= 64 {
                    break;
                }
            }
            let length = batch_end - received;
            self.with_state(move |state| state.append_chunks(&wanted, &batch))
                .await?;
            received = batch_end;
            self.inner
                .counters
                .payload_bytes
                .fetch_add(length, Ordering::Relaxed);
        }
        let payload = self.with_state(move |state| state.payload(&wanted)).await?;
        self.install_payload(bundle, wanted, header, &start, payload, reference)
            .await
    }

    /// Checks a transfer's signed header against the assignment and what is installed, and
    /// finds the delta's base body among the held snapshots.
    async fn check_start(
        &self,
        bundle: &str,
        wanted: outpost_proto::Digest,
        start: &TransferStart,
        trust: &outpost_proto::TrustStore,
        installed: Option<outpost_proto::Installed>,
    ) -> Result<(outpost_proto::VerifiedHeader, Option<outpost_proto::Body>), TransferError> {
        let expect = Expectation {
            bundle,
            assigned_digest: Some(wanted),
            installed,
        };
        let header = verify_header(trust, &start.header, &start.signature, &expect)
            .and_then(|header| header.check_fresh(unix_now()).map(|()| header))
            .map_err(|error| TransferError::Rejected(error.to_string()))?;
        let reference = match start.encoding {
            PayloadEncoding::Whole => None,
            PayloadEncoding::Delta { base } => {
                let lookup = bundle.to_owned();
                let snapshot = self
                    .with_state(move |state| state.load_snapshot(&lookup, &base))
                    .await?
                    .ok_or_else(|| {
                        TransferError::Rejected(format!(
                            "delta against {} which this agent does not hold",
                            base.short()
                        ))
                    })?;
                Some(snapshot.body().clone())
            }
        };
        Ok((header, reference))
    }

    /// Installs a payload the hub pushed with its assignment: checked like a fetched one, not
    /// kept as a download (it came whole, in one chunk).
    async fn install_pushed(
        &self,
        assignment: &Assignment,
        start: TransferStart,
        payload: Vec<u8>,
    ) -> Result<(), TransferError> {
        let (bundle, wanted) = (assignment.bundle.clone(), assignment.digest);
        if start.snapshot != wanted || start.offset != 0 {
            return Err(TransferError::Rejected(
                "pushed for another snapshot".to_owned(),
            ));
        }
        let lookup = bundle.clone();
        let (trust, installed) = self
            .with_state(move |state| Ok((state.trust_store()?, state.installed(&lookup)?)))
            .await?;
        let (header, reference) = self
            .check_start(&bundle, wanted, &start, &trust, installed)
            .await?;
        self.inner
            .counters
            .payload_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        self.install_payload(bundle, wanted, header, &start, payload, reference)
            .await
    }

    /// Verifies a whole payload against its checked header and installs the snapshot.
    async fn install_payload(
        &self,
        bundle: String,
        wanted: outpost_proto::Digest,
        header: outpost_proto::VerifiedHeader,
        start: &TransferStart,
        payload: Vec<u8>,
        reference: Option<outpost_proto::Body>,
    ) -> Result<(), TransferError> {
        let size = start.payload_size;
        // Hashing and decompressing up to 256 MiB: off the runtime thread, so the link (acks,
        // keep-alives) and the reconcile loop go on meanwhile.
        let payload_digest = start.payload_digest;
        let snapshot = tokio::task::spawn_blocking(move || {
            header.accept_payload(&payload, payload_digest, reference.as_ref())
        })
        .await
        .map_err(|error| TransferError::Rejected(format!("the verifying task failed: {error}")))?
        .map_err(|error| TransferError::Rejected(error.to_string()))?;
        let generation = snapshot.header().generation;
        let objects = snapshot.header().object_count;
        let status = BundleStatus {
            bundle: bundle.clone(),
            digest: wanted,
            generation,
            phase: Phase::Applying,
            objects_total: objects,
            objects_ready: 0,
            message: "snapshot verified and installed".to_owned(),
            observed_at: unix_now(),
            stale: false,
        };
        // Installed and its report queued under one hold of the state: whoever sees the new
        // snapshot (the reconcile loop, reporting Healthy) reports after it, so the hub never
        // takes this Applying for news newer than the loop's answer.
        self.with_state(move |state| {
            let now = unix_now();
            state.install(&snapshot, now)?;
            state.queue_status(vec![status], now)
        })
        .await?;
        self.inner.outbox_ready.notify_one();
        tracing::info!(%bundle, generation, snapshot = %wanted.short(), encoding = ?start.encoding, bytes = size, "snapshot installed");
        self.inner.counters.installs.fetch_add(1, Ordering::Relaxed);
        self.inner.installed.send_modify(|count| *count += 1);
        self.inner.changed.send_modify(|count| *count += 1);
        Ok(())
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_spreads_a_herd() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let mut random = 7;
        for failures in 0..30 {
            let cap = (min * 2u32.pow(failures.min(20))).min(max);
            for _ in 0..100 {
                let delay = backoff_delay(min, max, failures, next_random(&mut random));
                assert!(
                    delay >= cap / 8 && delay <= cap,
                    "{failures}: {delay:?} vs {cap:?}"
                );
            }
        }
        // 10,000 agents losing the hub at once: reconnects spread over the whole window, no
        // second of it holds more than a fifth of them.
        let mut per_second = [0u32; 9];
        for agent in 0..10_000u64 {
            let mut random = agent;
            let delay = backoff_delay(min, max, LOST_CONNECTION_STEP, next_random(&mut random));
            per_second[delay.as_secs() as usize] += 1;
        }
        assert!(
            per_second.iter().all(|count| *count < 2_000),
            "{per_second:?}"
        );
        assert_eq!(per_second.iter().sum::<u32>(), 10_000);
    }
}
