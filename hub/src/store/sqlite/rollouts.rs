//! [`RolloutStore`] on SQLite: each rollout's state machine as JSON, written in the same
//! transaction as the assignment changes it decided, so a restart resumes exactly where it
//! stopped.

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use super::fleet::write_changes;
use crate::rollout::machine::Rollout;
use crate::store::{AssignmentChange, Created, RolloutStore, StoreError};

fn decode(id: i64, text: &str) -> Result<Rollout, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("rollout {id}: {error}")))
}

fn rollouts_where(connection: &Connection, sql: &str) -> Result<Vec<Rollout>, StoreError> {
    let mut statement = connection.prepare(sql)?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.iter().map(|(id, text)| decode(*id, text)).collect()
}

impl RolloutStore for SqliteStore {
    fn create_rollout(&self, rollout: &mut Rollout) -> Result<Created, StoreError> {
        let mut pending = rollout.clone();
        let (created, stored) = self.write(move |connection| {
            let busy: Option<i64> = connection
                .query_row(
                    "SELECT id FROM rollouts WHERE bundle = ?1 AND phase IN ('running', 'paused') ORDER BY id DESC LIMIT 1",
                    [&pending.plan.bundle],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(busy) = busy {
                return Ok((Created::Busy(busy as u64), pending));
            }
            let last: i64 =
                connection.query_row("SELECT COALESCE(MAX(id), 0) FROM rollouts", [], |row| {
                    row.get(0)
                })?;
            pending.id = last as u64 + 1;
            let state = serde_json::to_string(&pending)
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            connection.execute(
                "INSERT INTO rollouts (id, bundle, phase, state, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                params![
                    pending.id as i64,
                    pending.plan.bundle,
                    pending.phase.name(),
                    state,
                    pending.created_at
                ],
            )?;
            Ok((Created::Created(pending.id), pending))
        })?;
        *rollout = stored;
        Ok(created)
    }

    fn rollout(&self, id: u64) -> Result<Option<Rollout>, StoreError> {
        self.read(|connection| {
            let text: Option<String> = connection
                .query_row(
                    "SELECT state FROM rollouts WHERE id = ?1",
                    [id as i64],
                    |row| row.get(0),
                )
                .optional()?;
            text.map(|text| decode(id as i64, &text)).transpose()
        })
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.read(|connection| {
            rollouts_where(
                connection,
                "SELECT id, state FROM rollouts ORDER BY id DESC",
            )
        })
    }

    fn live_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.read(|connection| {
            rollouts_where(
                connection,
                "SELECT id, state FROM rollouts r
                 WHERE phase IN ('running', 'paused', 'succeeded')
                   AND id = (SELECT MAX(id) FROM rollouts WHERE bundle = r.bundle)
                 ORDER BY id",
            )
        })
    }

    fn save_rollout(
        &self,
        rollout: &Rollout,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let state = serde_json::to_string(rollout)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let (id, phase, changes) = (rollout.id, rollout.phase.name(), changes.to_vec());
        self.write(move |connection| {
            let changed = write_changes(connection, &changes, now)?;
            connection.execute(
                "UPDATE rollouts SET phase = ?2, state = ?3, updated_at = ?4 WHERE id = ?1",
                params![id as i64, phase, state, now],
            )?;
            Ok(changed)
        })
    }
}
