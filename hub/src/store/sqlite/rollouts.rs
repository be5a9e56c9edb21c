//! [`RolloutStore`] on SQLite: the head (plan and phase as JSON, counts for lists, a version)
//! in `rollouts`, one row per member in `rollout_members` (its state named for queries, the
//! member as JSON) and one per history record in `rollout_log`. A save writes the head, the
//! members changed and the records added, with the assignment changes, in one transaction.

use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use super::fleet::write_changes;
use crate::rollout::machine::{Member, Progress, Record, Rollout};
use crate::store::rollouts::{corrupt, decode_head, encode, rollout_event};
use crate::store::{
    Created, RolloutHead, RolloutSave, RolloutStore, Saved, StoreError, StoredRollout,
};

/// Reads a rollout's members and history into `rollout`.
fn fill(connection: &Connection, rollout: &mut Rollout) -> Result<(), StoreError> {
    let id = rollout.id as i64;
    let members: Vec<(String, String)> = connection
        .prepare_cached("SELECT agent, member FROM rollout_members WHERE rollout = ?1")?
        .query_map([id], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (agent, text) in members {
        let member: Member =
            serde_json::from_str(&text).map_err(|error| corrupt(id, &agent, error))?;
        rollout.members.insert(agent, member);
    }
    rollout.log = connection
        .prepare_cached(
            "SELECT at, who, action, why FROM rollout_log WHERE rollout = ?1 ORDER BY seq",
        )?
        .query_map([id], |row| {
            Ok(Record {
                at: row.get(0)?,
                who: row.get(1)?,
                action: row.get(2)?,
                why: row.get(3)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(())
}

fn insert_log(
    connection: &Connection,
    id: i64,
    from: usize,
    records: &[Record],
) -> Result<(), StoreError> {
    let mut statement = connection.prepare_cached(
        "INSERT INTO rollout_log (rollout, seq, at, who, action, why) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (offset, record) in records.iter().enumerate() {
        statement.execute(params![
            id,
            (from + offset) as i64,
            record.at,
            record.who,
            record.action,
            record.why
        ])?;
        if let Some((kind, subject, message)) = rollout_event(id, record) {
            super::add_event(connection, record.at, kind, &subject, &message)?;
        }
    }
    Ok(())
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
            let head = pending
                .head_json()
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            let created_by = pending
                .log
                .first()
                .map(|record| record.who.clone())
                .unwrap_or_default();
            connection.execute(
                "INSERT INTO rollouts (id, bundle, phase, state, created_at, updated_at, created_by, progress, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, 1)",
                params![
                    pending.id as i64,
                    pending.plan.bundle,
                    pending.phase.name(),
                    head,
                    pending.created_at,
                    created_by,
                    encode(&pending.progress())?,
                ],
            )?;
            let id = pending.id as i64;
            for (agent, member) in &pending.members {
                connection.execute(
                    "INSERT INTO rollout_members (rollout, agent, state, member) VALUES (?1, ?2, ?3, ?4)",
                    params![id, agent, member.state.name(), encode(member)?],
                )?;
            }
            insert_log(connection, id, 0, &pending.log)?;
            Ok((Created::Created(pending.id), pending))
        })?;
        *rollout = stored;
        Ok(created)
    }

    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError> {
        self.read(|connection| {
            let transaction = connection.unchecked_transaction()?;
            let head: Option<(String, i64)> = transaction
                .query_row(
                    "SELECT state, version FROM rollouts WHERE id = ?1",
                    [id as i64],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let Some((head, version)) = head else {
                return Ok(None);
            };
            let mut rollout = decode_head(id as i64, &head)?;
            fill(&transaction, &mut rollout)?;
            transaction.finish()?;
            Ok(Some(StoredRollout {
                rollout,
                version: version as u64,
            }))
        })
    }

    fn rollouts(&self) -> Result<Vec<RolloutHead>, StoreError> {
        self.read(|connection| {
            let transaction = connection.unchecked_transaction()?;
            let rows: Vec<(i64, String, String, Option<String>)> = transaction
                .prepare_cached(
                    "SELECT id, state, created_by, progress FROM rollouts ORDER BY id DESC",
                )?
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<Result<_, _>>()?;
            let mut heads = Vec::with_capacity(rows.len());
            for (id, head, created_by, progress) in rows {
                let mut rollout = decode_head(id, &head)?;
                let progress: Progress = match progress {
                    Some(text) => serde_json::from_str(&text)
                        .map_err(|error| corrupt(id, "progress", error))?,
                    // Stored before counts were kept: count once from the members.
                    None => {
                        fill(&transaction, &mut rollout)?;
                        let progress = rollout.progress();
                        rollout.members.clear();
                        rollout.log.clear();
                        progress
                    }
                };
                heads.push(RolloutHead {
                    rollout,
                    progress,
                    created_by,
                });
            }
            transaction.finish()?;
            Ok(heads)
        })
    }

    fn live_rollouts(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        self.read(|connection| {
            let rows = connection
                .prepare_cached(
                    "SELECT id, version FROM rollouts r
                     WHERE phase IN ('running', 'paused', 'succeeded')
                       AND id = (SELECT MAX(id) FROM rollouts WHERE bundle = r.bundle)
                     ORDER BY id",
                )?
                .query_map([], |row| {
                    Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    fn save_rollout(&self, save: &RolloutSave<'_>) -> Result<Saved, StoreError> {
        let rollout = save.rollout;
        let id = rollout.id as i64;
        let head = rollout
            .head_json()
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let progress = encode(&rollout.progress())?;
        let members = save
            .members
            .iter()
            .filter_map(|agent| rollout.members.get(agent).map(|member| (agent, member)))
            .map(|(agent, member)| Ok((agent.clone(), member.state.name(), encode(member)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let log_from = save.log_from.min(rollout.log.len());
        let records = rollout.log[log_from..].to_vec();
        let (phase, version, changes, now) = (
            rollout.phase.name(),
            save.version as i64,
            save.changes.to_vec(),
            save.now,
        );
        self.write(move |connection| {
            let updated = connection.execute(
                "UPDATE rollouts SET phase = ?2, state = ?3, progress = ?4, updated_at = ?5, version = version + 1
                 WHERE id = ?1 AND version = ?6",
                params![id, phase, head, progress, now, version],
            )?;
            if updated == 0 {
                return Ok(Saved::Conflict);
            }
            let mut upsert = connection.prepare_cached(
                "INSERT INTO rollout_members (rollout, agent, state, member) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (rollout, agent) DO UPDATE SET state = ?3, member = ?4",
            )?;
            for (agent, state, member) in &members {
                upsert.execute(params![id, agent, state, member])?;
            }
            insert_log(connection, id, log_from, &records)?;
            let agents = write_changes(connection, &changes, now)?;
            Ok(Saved::Saved {
                version: version as u64 + 1,
                agents,
            })
        })
    }
}
