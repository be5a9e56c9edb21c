//! The hub's store: snapshots, refs seen, releases (a bundle at a ref), generation counters, an
//! event log, agents, assignments, status, rollouts, API tokens.
//!
//! The hub's logic talks to traits ([`Store`], [`FleetStore`], [`FleetView`], [`RolloutStore`],
//! [`AuthStore`], [`RetentionStore`], together [`HubStore`]) whose methods take `&self`: a store is shared by
//! every task with no lock around it, and each backend decides how it serves concurrent
//! readers and writers. [`SqliteStore`] is the embedded default (one file, a pool of readers,
//! one writer with group commits); every change is one transaction, so a crash at any point
//! loses nothing that was committed.

use std::collections::BTreeMap;
use std::fmt::Debug;

use outpost_proto::Digest;

use crate::git::RefTarget;

mod auth;
mod fleet;
pub mod migrate;
pub mod postgres;
mod replicas;
mod retention;
mod rollouts;
pub mod sqlite;
mod view;

pub use auth::{AdminToken, AuthStore, NewToken, Role, TokenCheck};
pub use fleet::{
    AgentAssignments, AssignmentChange, AssignmentRow, FleetChanges, FleetStore, Labels,
    SessionRead, SignedHeader, StatusOutcome, StatusWrite, StoredStatus,
};
pub(crate) use fleet::{drift_action_name, drift_message};
pub use postgres::PostgresStore;
pub use replicas::{Fence, Lease, Notice, ReplicaStore};
pub use retention::{Pruned, Retention, RetentionStore};
pub use rollouts::{Created, RolloutHead, RolloutSave, RolloutStore, Saved, StoredRollout};
pub use sqlite::SqliteStore;
pub use view::{
    DriftQuery, DriftRecord, DriftState, FleetDetails, FleetFilter, FleetPage, FleetSummary,
    FleetView, HistoricStatus,
};

#[cfg(test)]
pub(crate) mod suite;

/// Everything the hub needs of a store, in one bound (and one `dyn` type).
pub trait HubStore:
    Store + FleetStore + FleetView + RolloutStore + AuthStore + RetentionStore + Send + Sync + Debug
{
}

impl<T> HubStore for T where
    T: Store
        + FleetStore
        + FleetView
        + RolloutStore
        + AuthStore
        + RetentionStore
        + Send
        + Sync
        + Debug
{
}

/// Labels as one canonical JSON object text (keys in order), as the stores keep them.
pub(crate) fn labels_to_json(labels: &BTreeMap<String, String>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// Labels from [`labels_to_json`]'s text (none, if it does not decode).
pub(crate) fn labels_from_json(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str::<BTreeMap<String, String>>(text).unwrap_or_default()
}

/// An agent's id from its public key: 16 hex digits of its SHA-256.
pub fn agent_id(public_key: &[u8]) -> String {
    Digest::of(public_key).to_hex()[..16].to_owned()
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Id: the first 16 hex digits of the SHA-256 of its public key.
    pub id: String,
    /// Its ed25519 public key.
    pub public_key: Vec<u8>,
    /// Labels, as set at enrolment or by operators.
    pub labels: BTreeMap<String, String>,
    /// When it enrolled.
    pub enrolled_at: i64,
    /// When it last connected.
    pub last_seen: Option<i64>,
    /// When, by whom and why it was revoked.
    pub revoked: Option<(i64, String, String)>,
}

/// An enrolment token as listed (the secret itself is shown only once, at creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentToken {
    /// SHA-256 of the token, hex: its handle.
    pub digest: String,
    /// Labels the enrolling agent gets.
    pub labels: BTreeMap<String, String>,
    /// Created when and by whom.
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// Unusable after this.
    pub expires_at: i64,
    /// Used when and by which agent.
    pub used: Option<(i64, String)>,
}

/// Why an enrolment token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No such token.
    #[error("unknown enrolment token; ask the operator for a new one (outpost-hub tokens create)")]
    Unknown,
    /// Already used.
    #[error("enrolment token was already used by agent {0}; tokens are single-use")]
    Used(String),
    /// Expired.
    #[error("enrolment token expired at {0}; ask the operator for a new one")]
    Expired(i64),
    /// The key is already enrolled.
    #[error("this key is already enrolled as agent {0}")]
    AlreadyEnrolled(String),
}

/// A snapshot as stored: signed header, signature, canonical body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// Bundle name.
    pub bundle: String,
    /// Generation.
    pub generation: u64,
    /// Body digest.
    pub digest: Digest,
    /// Git commit.
    pub git_commit: String,
    /// Ref it was first rendered for.
    pub git_ref: String,
    /// Signed header bytes.
    pub header: Vec<u8>,
    /// Signature.
    pub signature: Vec<u8>,
    /// Canonical body.
    pub body: Vec<u8>,
    /// Objects in the body.
    pub object_count: u64,
    /// When it was rendered.
    pub created_at: i64,
}

/// A bundle at a ref: rendered to a generation, or refused with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Source URL.
    pub source: String,
    /// Full ref name.
    pub git_ref: String,
    /// Bundle name.
    pub bundle: String,
    /// The render variant's key (empty for the plain bundle; see `variants`).
    pub variant: String,
    /// Commit the ref named.
    pub git_commit: String,
    /// The snapshot's generation, when it rendered.
    pub generation: Option<u64>,
    /// Why it did not render.
    pub error: Option<String>,
    /// Last change.
    pub updated_at: i64,
}

/// How a ref changed since the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefChange {
    /// Seen for the first time.
    New(RefTarget),
    /// Now names another commit (a branch moved, or a tag was force-moved).
    Moved {
        /// The ref now.
        target: RefTarget,
        /// The commit it named before.
        previous: String,
    },
    /// No longer on the remote.
    Deleted(String),
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Sequence number.
    pub id: i64,
    /// When (Unix seconds).
    pub at: i64,
    /// Kind, e.g. `fetch-failed`, `tag-moved`.
    pub kind: String,
    /// What it concerns (a source, ref or bundle).
    pub subject: String,
    /// Details.
    pub message: String,
}

/// Refuses a counter that does not fit both stores' signed 64-bit integers, or one step past
/// it (a stored value may be raised by one); returns it as stored.
pub(crate) fn counter(field: &'static str, value: u64) -> Result<i64, StoreError> {
    match value < outpost_proto::wire::MAX_COUNTER {
        true => Ok(value as i64),
        false => Err(StoreError::CounterOutOfRange { field, value }),
    }
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (disk full, corrupt file, locked).
    #[error("hub store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The PostgreSQL database failed or could not be reached (the message names it, its
    /// password elided).
    #[error("hub store (PostgreSQL): {0}")]
    Postgres(String),
    /// A leader's write refused: the lease is no longer held at the epoch it was decided under
    /// (another replica leads now; nothing of the write was kept).
    #[error(
        "hub store: not the leader any more (lease epoch {epoch} of {holder} is gone); the write was not made"
    )]
    Fenced {
        /// The replica.
        holder: String,
        /// The epoch it held.
        epoch: i64,
    },
    /// The transaction holding a write could not be committed (nothing of it was kept).
    #[error("hub store: committing failed: {0}")]
    Commit(String),
    /// The store was closed (the hub is stopping).
    #[error("hub store: closed")]
    Closed,
    /// A sequence or generation above 2^63 − 1 (`outpost_proto::wire::MAX_COUNTER`): both
    /// stores keep counters as signed 64-bit integers; such a value is never stored.
    #[error("hub store: {field} {value} is above the largest counter, 2^63 - 1; not stored")]
    CounterOutOfRange {
        /// Which counter.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A stored record does not decode (written by a broken or newer hub).
    #[error("hub store: a stored record does not decode: {0}")]
    Corrupt(String),
    /// The store's file could not be created or protected.
    #[error("hub store: {path}: {error}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// A batched call failed for every request in it (the batch's error, as text).
    #[error("hub store: {0}")]
    Batch(String),
    /// The file was written by a newer hub.
    #[error(
        "hub store schema version {found} is newer than this hub understands ({known}); run a newer hub"
    )]
    TooNew {
        /// In the file.
        found: usize,
        /// Known here.
        known: usize,
    },
}

/// What the hub keeps about sources, snapshots, releases, events, agents and enrolment tokens.
pub trait Store {
    /// Records the refs of `source` as fetched now; returns what changed since the last call.
    fn record_refs(
        &self,
        source: &str,
        refs: &[RefTarget],
        now: i64,
    ) -> Result<Vec<RefChange>, StoreError>;
    /// The generation already rendered for this bundle tree and selector, if any.
    fn rendered(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
    ) -> Result<Option<u64>, StoreError>;
    /// Reserves the next generation of `bundle` (never handed out twice).
    fn next_generation(&self, bundle: &str) -> Result<u64, StoreError>;
    /// Stores a snapshot and the render that produced it, in one transaction.
    fn insert_snapshot(
        &self,
        snapshot: &StoredSnapshot,
        tree_id: &str,
        selector: &str,
    ) -> Result<(), StoreError>;
    /// Stores a snapshot signed again under a new generation (a rollout giving an agent an
    /// older body); no render is recorded for it.
    fn insert_resigned(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError>;
    /// Remembers an existing generation as the render of a tree (same body as before).
    fn insert_render(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
        generation: u64,
    ) -> Result<(), StoreError>;
    /// The newest snapshot of `bundle` with this body digest.
    fn snapshot_by_digest(
        &self,
        bundle: &str,
        digest: &Digest,
    ) -> Result<Option<StoredSnapshot>, StoreError>;
    /// A snapshot by bundle and generation.
    fn snapshot(&self, bundle: &str, generation: u64)
    -> Result<Option<StoredSnapshot>, StoreError>;
    /// Sets the outcome of a release; returns whether it changed (new, or another commit,
    /// generation or error).
    fn upsert_release(&self, release: &Release) -> Result<bool, StoreError>;
    /// Removes the releases of a deleted ref (its snapshots stay).
    fn delete_releases(&self, source: &str, git_ref: &str) -> Result<(), StoreError>;
    /// Removes a bundle's releases at a ref whose variants are no longer needed.
    fn retain_variants(
        &self,
        source: &str,
        git_ref: &str,
        bundle: &str,
        keep: &[String],
    ) -> Result<(), StoreError>;
    /// All releases, by source, ref and bundle.
    fn releases(&self) -> Result<Vec<Release>, StoreError>;
    /// Appends to the event log.
    fn add_event(
        &self,
        at: i64,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), StoreError>;
    /// The newest `limit` events, newest first.
    fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// Events with ids above `after`, oldest first, at most `limit` (notifications read on).
    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// The last event `receiver` was sent (none: it was never sent any).
    fn notify_cursor(&self, receiver: &str) -> Result<Option<i64>, StoreError>;
    /// Records that `receiver` was sent every event up to `last_event`.
    fn set_notify_cursor(&self, receiver: &str, last_event: i64) -> Result<(), StoreError>;
    /// Stores a new enrolment token (by its digest) granting `labels`.
    fn create_token(
        &self,
        token_digest: &Digest,
        labels: &BTreeMap<String, String>,
        created_by: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// Stores many enrolment tokens granting the same labels, in one transaction (a fleet
    /// provisioned at once).
    fn create_tokens(
        &self,
        token_digests: &[Digest],
        labels: &BTreeMap<String, String>,
        created_by: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// Enrolment tokens, newest first.
    fn tokens(&self) -> Result<Vec<EnrolmentToken>, StoreError>;
    /// Revokes an enrolment token not used yet: it expires now, so it can enrol nothing more
    /// (a `token-revoked` event says who and why). `false`: no such unused, unexpired token.
    fn revoke_token(
        &self,
        token_digest: &Digest,
        by: &str,
        why: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Uses a token once to enrol `public_key`, in one transaction: the token is marked used and
    /// the agent created with the token's labels. A second use fails.
    fn enrol(
        &self,
        token_digest: &Digest,
        public_key: &[u8],
        now: i64,
    ) -> Result<Result<Agent, TokenError>, StoreError>;
    /// All agents, by id.
    fn agents(&self) -> Result<Vec<Agent>, StoreError>;
    /// One agent by id.
    fn agent(&self, id: &str) -> Result<Option<Agent>, StoreError>;
    /// Sets (`Some`) or removes (`None`) labels of an agent; returns false if there is no such agent.
    fn label_agent(
        &self,
        id: &str,
        changes: &BTreeMap<String, Option<String>>,
        who: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Revokes an agent; returns false if there is no such agent.
    fn revoke_agent(&self, id: &str, who: &str, why: &str, now: i64) -> Result<bool, StoreError>;
}
