//! Rollouts in the store: each one's state machine as JSON, written in the same transaction as
//! the assignment changes it decided, so a restart resumes exactly where it stopped.

use super::{AssignmentChange, StoreError};
use crate::rollout::machine::Rollout;

/// The answer to creating a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Stored under this id.
    Created(u64),
    /// Refused: this rollout of the same bundle is still running or paused.
    Busy(u64),
}

/// What rollouts need of the store.
pub trait RolloutStore {
    /// Stores a new rollout under the next id (set in `rollout.id`), unless another rollout of
    /// its bundle is running or paused.
    fn create_rollout(&self, rollout: &mut Rollout) -> Result<Created, StoreError>;
    /// One rollout.
    fn rollout(&self, id: u64) -> Result<Option<Rollout>, StoreError>;
    /// Every rollout, newest first.
    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    /// The rollouts that still move agents: per bundle the newest, if it is running, paused or
    /// succeeded (a succeeded one still takes agents that start matching).
    fn live_rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    /// Stores a rollout's new state and the assignment changes it decided, in one transaction;
    /// returns the agents whose assignments changed.
    fn save_rollout(
        &self,
        rollout: &Rollout,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
}
