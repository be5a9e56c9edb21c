//! Rollouts in the store: each one's state machine as JSON, written in the same transaction as
//! the assignment changes it decided, so a restart resumes exactly where it stopped.

use rusqlite::{OptionalExtension, params};

use super::fleet::write_changes;
use super::{SqliteStore, StoreError};
use crate::rollout::machine::Rollout;
use crate::store::AssignmentChange;

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
    fn create_rollout(&mut self, rollout: &mut Rollout) -> Result<Created, StoreError>;
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
        &mut self,
        rollout: &Rollout,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
}

fn decode(id: i64, text: &str) -> Result<Rollout, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("rollout {id}: {error}")))
}

impl SqliteStore {
    fn rollouts_where(&self, sql: &str) -> Result<Vec<Rollout>, StoreError> {
        let mut statement = self.connection.prepare(sql)?;
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.iter().map(|(id, text)| decode(*id, text)).collect()
    }
}

impl RolloutStore for SqliteStore {
    fn create_rollout(&mut self, rollout: &mut Rollout) -> Result<Created, StoreError> {
        let transaction = self.connection.transaction()?;
        let busy: Option<i64> = transaction
            .query_row(
                "SELECT id FROM rollouts WHERE bundle = ?1 AND phase IN ('running', 'paused') ORDER BY id DESC LIMIT 1",
                [&rollout.plan.bundle],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(busy) = busy {
            return Ok(Created::Busy(busy as u64));
        }
        let last: i64 =
            transaction.query_row("SELECT COALESCE(MAX(id), 0) FROM rollouts", [], |row| {
                row.get(0)
            })?;
        rollout.id = last as u64 + 1;
        let state = serde_json::to_string(rollout)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        transaction.execute(
            "INSERT INTO rollouts (id, bundle, phase, state, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![
                rollout.id as i64,
                rollout.plan.bundle,
                rollout.phase.name(),
                state,
                rollout.created_at
            ],
        )?;
        transaction.commit()?;
        Ok(Created::Created(rollout.id))
    }

    fn rollout(&self, id: u64) -> Result<Option<Rollout>, StoreError> {
        let text: Option<String> = self
            .connection
            .query_row(
                "SELECT state FROM rollouts WHERE id = ?1",
                [id as i64],
                |row| row.get(0),
            )
            .optional()?;
        text.map(|text| decode(id as i64, &text)).transpose()
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.rollouts_where("SELECT id, state FROM rollouts ORDER BY id DESC")
    }

    fn live_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.rollouts_where(
            "SELECT id, state FROM rollouts r
             WHERE phase IN ('running', 'paused', 'succeeded')
               AND id = (SELECT MAX(id) FROM rollouts WHERE bundle = r.bundle)
             ORDER BY id",
        )
    }

    fn save_rollout(
        &mut self,
        rollout: &Rollout,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let state = serde_json::to_string(rollout)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let transaction = self.connection.transaction()?;
        let changed = write_changes(&transaction, changes, now)?;
        transaction.execute(
            "UPDATE rollouts SET phase = ?2, state = ?3, updated_at = ?4 WHERE id = ?1",
            params![rollout.id as i64, rollout.phase.name(), state, now],
        )?;
        transaction.commit()?;
        Ok(changed)
    }
}
