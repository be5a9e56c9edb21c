//! Rollouts in the store: each rollout's head (plan, phase, wave, counts for lists, a version),
//! its members one row each, and its history one row per record. A step writes the members it
//! changed, the records it added and the assignment changes it decided, in one transaction, so
//! a restart resumes exactly where it stopped and a step costs what it changed.

use super::{AssignmentChange, StoreError};

/// A stored rollout that does not decode.
pub(crate) fn corrupt(id: i64, what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("rollout {id}: {what}: {error}"))
}

/// A rollout's head from its stored JSON.
pub(crate) fn decode_head(id: i64, text: &str) -> Result<Rollout, StoreError> {
    serde_json::from_str(text).map_err(|error| corrupt(id, "head", error))
}

/// A member or progress as the stores keep it (JSON).
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}
use crate::rollout::machine::{Progress, Record, Rollout};

/// The event a rollout log record also is, for the event log (and so for notifications): its
/// pauses, roll backs, aborts and success, by an operator or by the rollout itself. (kind,
/// subject, message).
pub(crate) fn rollout_event(id: i64, record: &Record) -> Option<(&'static str, String, String)> {
    let kind = match record.action.as_str() {
        "paused" | "pause" => "rollout-paused",
        "rolled back" | "rollback" => "rollout-rolled-back",
        "succeeded" => "rollout-succeeded",
        "abort" | "aborted" => "rollout-aborted",
        _ => return None,
    };
    let message = match record.why.is_empty() {
        true => format!("{} by {}", record.action, record.who),
        false => format!("{} by {}: {}", record.action, record.who, record.why),
    };
    Some((kind, format!("rollout {id}"), message))
}

/// The answer to creating a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Stored under this id.
    Created(u64),
    /// Refused: this rollout of the same bundle is still running or paused.
    Busy(u64),
}

/// A rollout as lists show it: no members, no history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutHead {
    /// The rollout with no members and no history.
    pub rollout: Rollout,
    /// Its counts and per-wave progress.
    pub progress: Progress,
    /// Who created it.
    pub created_by: String,
}

/// A whole rollout and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRollout {
    /// The rollout.
    pub rollout: Rollout,
    /// Grows with every save; a save names the version it read.
    pub version: u64,
}

/// What one step of a rollout writes.
#[derive(Debug)]
pub struct RolloutSave<'a> {
    /// The rollout after the step.
    pub rollout: &'a Rollout,
    /// The version it was read at: the save is refused if another save came first.
    pub version: u64,
    /// The members the step changed.
    pub members: &'a [String],
    /// Its history from here on is new.
    pub log_from: usize,
    /// The assignment changes it decided.
    pub changes: &'a [AssignmentChange],
    /// Now.
    pub now: i64,
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// Written, under this version; these agents' assignments changed.
    Saved {
        /// The new version.
        version: u64,
        /// Agents whose assignments changed.
        agents: Vec<String>,
    },
    /// Another save came first (an operator's command beside the driver's step): nothing was
    /// written; read the rollout again and step it again.
    Conflict,
}

/// What rollouts need of the store.
pub trait RolloutStore {
    /// Stores a new rollout under the next id (set in `rollout.id`), at version 1, unless
    /// another rollout of its bundle is running or paused.
    fn create_rollout(&self, rollout: &mut Rollout) -> Result<Created, StoreError>;
    /// One rollout, whole.
    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError>;
    /// Every rollout's head, newest first.
    fn rollouts(&self) -> Result<Vec<RolloutHead>, StoreError>;
    /// The rollouts that still move agents, with their versions: per bundle the newest, if it
    /// is running, paused or succeeded (a succeeded one still takes agents that start
    /// matching).
    fn live_rollouts(&self) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Writes a step: the head, the members changed, the records added and the assignment
    /// changes, in one transaction, unless the rollout's version moved since it was read.
    fn save_rollout(&self, save: &RolloutSave<'_>) -> Result<Saved, StoreError>;
}
