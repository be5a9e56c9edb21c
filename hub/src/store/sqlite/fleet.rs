//! [`FleetStore`] on SQLite: assignments, delta bases, status, last seen.

use std::collections::{BTreeMap, BTreeSet};

use outpost_proto::Digest;
use outpost_proto::wire::{BundleDrift, BundleStatus, DriftAction};
use rusqlite::{Connection, OptionalExtension, params};

use super::store::{AGENT_COLUMNS, agent_from_row};
use super::{SqliteStore, add_event, digest_at, next_change};
use crate::store::fleet::{
    DELTA_BASES_KEPT, behind_message, drift_action_name, drift_event, phase_from, phase_name,
};
use crate::store::labels_from_json;
use crate::store::{
    AgentAssignments, AssignmentChange, AssignmentRow, FleetChanges, FleetStore, SessionRead,
    SignedHeader, StatusOutcome, StatusWrite, StoreError, StoredStatus,
};

/// Remembers that `agent` was assigned `digest` of `bundle` (a future delta base). Only the
/// newest [`DELTA_BASES_KEPT`] count (older rows are pruned by retention).
fn remember_base(
    connection: &Connection,
    agent: &str,
    bundle: &str,
    digest: &[u8],
    now: i64,
) -> Result<(), StoreError> {
    connection
        .prepare_cached(
            "INSERT INTO assignment_bases (agent, bundle, digest, assigned_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (agent, bundle, digest) DO UPDATE SET assigned_at = ?4",
        )?
        .execute(params![agent, bundle, digest, now])?;
    Ok(())
}

/// An assignment from a row that starts with `agent, bundle, generation, digest`.
pub(super) fn assignment_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AssignmentRow> {
    Ok(AssignmentRow {
        agent: row.get(0)?,
        bundle: row.get(1)?,
        generation: row.get::<_, i64>(2)? as u64,
        digest: digest_at(row, 3)?,
    })
}

/// Bumps the assignment sequence of each agent (its sessions send the new assignments) and
/// stamps it in the change feed.
fn bump_sequences<'a>(
    connection: &Connection,
    agents: impl IntoIterator<Item = &'a String>,
) -> Result<(), StoreError> {
    let mut agents = agents.into_iter().peekable();
    if agents.peek().is_none() {
        return Ok(());
    }
    let change = next_change(connection)?;
    let mut statement = connection.prepare_cached(
        "UPDATE agents SET assignment_sequence = assignment_sequence + 1, change_seq = ?2 WHERE id = ?1",
    )?;
    for agent in agents {
        statement.execute(params![agent, change])?;
    }
    Ok(())
}

/// Writes single assignments inside `transaction`; returns the agents whose assignments changed.
pub(super) fn write_changes(
    connection: &Connection,
    changes: &[AssignmentChange],
    now: i64,
) -> Result<Vec<String>, StoreError> {
    let mut changed = BTreeSet::new();
    for change in changes {
        let written = match &change.to {
            Some((generation, digest)) => {
                remember_base(connection, &change.agent, &change.bundle, &digest.0, now)?;
                connection.execute(
                "INSERT INTO assignments (agent, bundle, generation, digest, origin, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (agent, bundle) DO UPDATE SET generation = ?3, digest = ?4, origin = ?5, updated_at = ?6
                 WHERE generation != ?3 OR digest != ?4 OR origin != ?5",
                params![
                    change.agent,
                    change.bundle,
                    *generation as i64,
                    digest.0.as_slice(),
                    change.origin,
                    now
                ],
            )?
            }
            None => connection.execute(
                "DELETE FROM assignments WHERE agent = ?1 AND bundle = ?2",
                params![change.agent, change.bundle],
            )?,
        };
        if written > 0 {
            changed.insert(change.agent.clone());
        }
    }
    bump_sequences(connection, &changed)?;
    Ok(changed.into_iter().collect())
}

/// The columns [`status_from_row`] reads, in order.
pub(super) const STATUS_COLUMNS: &str = "agent, bundle, digest, generation, phase, objects_total, objects_ready, message, observed_at, stale, received_at";

/// A `bundle_status` row selected with [`STATUS_COLUMNS`].
pub(super) fn status_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredStatus> {
    Ok(StoredStatus {
        agent: row.get(0)?,
        status: BundleStatus {
            bundle: row.get(1)?,
            digest: digest_at(row, 2)?,
            generation: row.get::<_, i64>(3)? as u64,
            phase: phase_from(&row.get::<_, String>(4)?),
            objects_total: row.get::<_, i64>(5)? as u64,
            objects_ready: row.get::<_, i64>(6)? as u64,
            message: row.get(7)?,
            observed_at: row.get(8)?,
            stale: row.get(9)?,
        },
        received_at: row.get(10)?,
    })
}

impl FleetStore for SqliteStore {
    fn set_assignments(
        &self,
        origin: &str,
        wanted: &[AssignmentRow],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let (origin, wanted) = (origin.to_owned(), wanted.to_vec());
        self.write(move |connection| {
            let mut current: BTreeMap<(String, String), (u64, Vec<u8>, String)> = BTreeMap::new();
            {
                let mut statement = connection
                    .prepare("SELECT agent, bundle, generation, digest, origin FROM assignments")?;
                let rows = statement.query_map([], |row| {
                    Ok((
                        (row.get::<_, String>(0)?, row.get::<_, String>(1)?),
                        (
                            row.get::<_, i64>(2)? as u64,
                            row.get::<_, Vec<u8>>(3)?,
                            row.get::<_, String>(4)?,
                        ),
                    ))
                })?;
                for row in rows {
                    let (key, value) = row?;
                    current.insert(key, value);
                }
            }
            let mut changed = BTreeSet::new();
            let wanted_keys: BTreeSet<(String, String)> = wanted
                .iter()
                .map(|row| (row.agent.clone(), row.bundle.clone()))
                .collect();
            // Withdraw this origin's assignments that are no longer wanted.
            for ((agent, bundle), (_, _, row_origin)) in &current {
                if *row_origin == origin && !wanted_keys.contains(&(agent.clone(), bundle.clone()))
                {
                    connection.execute(
                        "DELETE FROM assignments WHERE agent = ?1 AND bundle = ?2",
                        params![agent, bundle],
                    )?;
                    changed.insert(agent.clone());
                }
            }
            for row in &wanted {
                let key = (row.agent.clone(), row.bundle.clone());
                let same_or_other =
                    current
                        .get(&key)
                        .is_some_and(|(generation, digest, held_by)| {
                            *held_by != origin
                                || (*generation == row.generation
                                    && digest.as_slice() == row.digest.0.as_slice())
                        });
                if same_or_other {
                    continue;
                }
                remember_base(connection, &row.agent, &row.bundle, &row.digest.0, now)?;
                connection.execute(
                    "INSERT INTO assignments (agent, bundle, generation, digest, origin, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (agent, bundle) DO UPDATE SET generation = ?3, digest = ?4, origin = ?5, updated_at = ?6",
                    params![
                        row.agent,
                        row.bundle,
                        row.generation as i64,
                        row.digest.0.as_slice(),
                        origin,
                        now
                    ],
                )?;
                changed.insert(row.agent.clone());
            }
            bump_sequences(connection, &changed)?;
            Ok(changed.into_iter().collect())
        })
    }

    fn change_assignments(
        &self,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let changes = changes.to_vec();
        self.write(move |connection| write_changes(connection, &changes, now))
    }

    fn bundle_assignments(
        &self,
        bundle: Option<&str>,
    ) -> Result<Vec<(AssignmentRow, String)>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT agent, bundle, generation, digest, origin FROM assignments
                 WHERE ?1 IS NULL OR bundle = ?1 ORDER BY agent, bundle",
            )?;
            let rows = statement
                .query_map([bundle], |row| Ok((assignment_from_row(row)?, row.get(4)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn assignments(&self, agent: &str) -> Result<AgentAssignments, StoreError> {
        self.read(|connection| {
            let sequence: Option<i64> = connection
                .prepare_cached("SELECT assignment_sequence FROM agents WHERE id = ?1")?
                .query_row([agent], |row| row.get(0))
                .optional()?;
            let mut statement = connection.prepare_cached(
                "SELECT bundle, generation, digest FROM assignments WHERE agent = ?1 ORDER BY bundle",
            )?;
            let entries = statement
                .query_map([agent], |row| {
                    Ok(AssignmentRow {
                        agent: agent.to_owned(),
                        bundle: row.get(0)?,
                        generation: row.get::<_, i64>(1)? as u64,
                        digest: digest_at(row, 2)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(AgentAssignments {
                sequence: sequence.unwrap_or(0) as u64,
                entries,
            })
        })
    }

    fn agent_connected(&self, agent: &str, version: &str, now: i64) -> Result<(), StoreError> {
        let (agent, version) = (agent.to_owned(), version.to_owned());
        self.write(move |connection| {
            connection
                .prepare_cached(
                    "UPDATE agents SET last_seen = ?2, agent_version = ?3 WHERE id = ?1",
                )?
                .execute(params![agent, now, version])?;
            Ok(())
        })
    }

    fn agents_connected(&self, connections: &[(String, String, i64)]) -> Result<(), StoreError> {
        let connections = connections.to_vec();
        self.write(move |connection| {
            let mut statement = connection.prepare_cached(
                "UPDATE agents SET last_seen = ?2, agent_version = ?3 WHERE id = ?1",
            )?;
            for (agent, version, now) in &connections {
                statement.execute(params![agent, now, version])?;
            }
            Ok(())
        })
    }

    fn session_reads(
        &self,
        ids: &[String],
        with_bases: bool,
    ) -> Result<Vec<SessionRead>, StoreError> {
        let list = serde_json::Value::Array(
            ids.iter()
                .map(|id| serde_json::Value::String(id.clone()))
                .collect(),
        )
        .to_string();
        let mut found: std::collections::HashMap<String, SessionRead> = self.read(|connection| {
            let transaction = connection.unchecked_transaction()?;
            let mut found = std::collections::HashMap::new();
            let agents = transaction
                .prepare_cached(&format!(
                    "SELECT {AGENT_COLUMNS}, label_set, assignment_sequence
                     FROM agents WHERE id IN (SELECT value FROM json_each(?1))"
                ))?
                .query_map([&list], |row| {
                    let agent = agent_from_row(row, labels_from_json(&row.get::<_, String>(7)?))?;
                    Ok((agent, row.get::<_, i64>(8)? as u64))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            for (agent, sequence) in agents {
                found.insert(
                    agent.id.clone(),
                    SessionRead {
                        assignments: AgentAssignments {
                            sequence,
                            entries: Vec::new(),
                        },
                        agent: Some(agent),
                        bases: Vec::new(),
                    },
                );
            }
            let rows = transaction
                .prepare_cached(
                    "SELECT agent, bundle, generation, digest FROM assignments
                     WHERE agent IN (SELECT value FROM json_each(?1)) ORDER BY agent, bundle",
                )?
                .query_map([&list], assignment_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            for row in rows {
                if let Some(read) = found.get_mut(&row.agent) {
                    read.assignments.entries.push(row);
                }
            }
            if with_bases {
                let bases = transaction
                    .prepare_cached(
                        "SELECT agent, bundle, digest FROM (SELECT agent, bundle, digest, ROW_NUMBER() OVER
                         (PARTITION BY agent, bundle ORDER BY assigned_at DESC, rowid DESC) AS n
                         FROM assignment_bases WHERE agent IN (SELECT value FROM json_each(?1))) WHERE n <= ?2",
                    )?
                    .query_map(params![&list, DELTA_BASES_KEPT], |row| {
                        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, digest_at(row, 2)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                for (agent, bundle, digest) in bases {
                    if let Some(read) = found.get_mut(&agent) {
                        read.bases.push((bundle, digest));
                    }
                }
            }
            transaction.finish()?;
            Ok(found)
        })?;
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or_default())
            .collect())
    }

    fn record_statuses(&self, reports: &[StatusWrite]) -> Result<Vec<StatusOutcome>, StoreError> {
        let reports = reports.to_vec();
        self.write(move |connection| {
            let mut outcomes = Vec::with_capacity(reports.len());
            for report in &reports {
                connection.execute_batch("SAVEPOINT report")?;
                match record_status(
                    connection,
                    &report.agent,
                    report.sequence,
                    &report.bundles,
                    &report.drift,
                    report.now,
                ) {
                    Ok(new) => {
                        connection.execute_batch("RELEASE report")?;
                        outcomes.push(Ok(new));
                    }
                    Err(error) => {
                        connection.execute_batch("ROLLBACK TO report; RELEASE report")?;
                        outcomes.push(Err(error.to_string()));
                    }
                }
            }
            Ok(outcomes)
        })
    }

    fn record_status(
        &self,
        agent: &str,
        sequence: u64,
        bundles: &[BundleStatus],
        now: i64,
    ) -> Result<bool, StoreError> {
        let (agent, bundles) = (agent.to_owned(), bundles.to_vec());
        self.write(move |connection| {
            record_status(connection, &agent, sequence, &bundles, &[], now)
        })
    }

    fn change_cursor(&self) -> Result<u64, StoreError> {
        self.read(|connection| {
            let value: i64 = connection
                .prepare_cached("SELECT value FROM change_counter WHERE id = 1")?
                .query_row([], |row| row.get(0))?;
            Ok(value as u64)
        })
    }

    fn changes_since(&self, cursor: u64) -> Result<FleetChanges, StoreError> {
        self.read(|connection| {
            // One read transaction: the counter and the rows from the same snapshot.
            let transaction = connection.unchecked_transaction()?;
            let now: i64 = transaction
                .prepare_cached("SELECT value FROM change_counter WHERE id = 1")?
                .query_row([], |row| row.get(0))?;
            let agents = transaction
                .prepare_cached(
                    "SELECT id FROM agents WHERE change_seq > ?1 AND change_seq <= ?2 ORDER BY id",
                )?
                .query_map(params![cursor as i64, now], |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            let statuses = transaction
                .prepare_cached(&format!(
                    "SELECT {STATUS_COLUMNS} FROM bundle_status WHERE change_seq > ?1 AND change_seq <= ?2 ORDER BY agent, bundle"
                ))?
                .query_map(params![cursor as i64, now], status_from_row)?
                .collect::<Result<_, _>>()?;
            transaction.finish()?;
            Ok(FleetChanges {
                cursor: now.max(cursor as i64) as u64,
                agents,
                statuses,
            })
        })
    }

    fn statuses(&self, agent: Option<&str>) -> Result<Vec<StoredStatus>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                &format!("SELECT {STATUS_COLUMNS} FROM bundle_status WHERE ?1 IS NULL OR agent = ?1 ORDER BY agent, bundle"),
            )?;
            let rows = statement.query_map([agent], status_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn status_history_len(&self, agent: &str) -> Result<u64, StoreError> {
        self.read(|connection| {
            let count: i64 = connection.query_row(
                "SELECT COUNT(*) FROM status_history WHERE agent = ?1",
                [agent],
                |row| row.get(0),
            )?;
            Ok(count as u64)
        })
    }

    fn signed_header(
        &self,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<SignedHeader>, StoreError> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached(
                    "SELECT header, signature FROM snapshots WHERE bundle = ?1 AND generation = ?2",
                )?
                .query_row(params![bundle, generation as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })
                .optional()?)
        })
    }

    fn snapshot_body(&self, bundle: &str, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached(
                    "SELECT b.body FROM bodies b WHERE b.digest = ?2
                     AND EXISTS (SELECT 1 FROM snapshots s WHERE s.bundle = ?1 AND s.digest = ?2)",
                )?
                .query_row(params![bundle, digest.0.as_slice()], |row| row.get(0))
                .optional()?)
        })
    }

    fn snapshot_digest(&self, bundle: &str, generation: u64) -> Result<Option<Digest>, StoreError> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached(
                    "SELECT digest FROM snapshots WHERE bundle = ?1 AND generation = ?2",
                )?
                .query_row(params![bundle, generation as i64], |row| digest_at(row, 0))
                .optional()?)
        })
    }

    fn delta_bases(&self, agent: &str) -> Result<Vec<(String, Digest)>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT bundle, digest FROM (SELECT bundle, digest, ROW_NUMBER() OVER
                 (PARTITION BY bundle ORDER BY assigned_at DESC, rowid DESC) AS n
                 FROM assignment_bases WHERE agent = ?1) WHERE n <= ?2",
            )?;
            let rows = statement.query_map(params![agent, DELTA_BASES_KEPT], |row| {
                Ok((row.get(0)?, digest_at(row, 1)?))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn headers_in_use(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare(
                "SELECT s.bundle, s.generation, s.header FROM snapshots s
                 WHERE EXISTS (SELECT 1 FROM assignments a WHERE a.bundle = s.bundle AND a.generation = s.generation)
                    OR EXISTS (SELECT 1 FROM releases r WHERE r.bundle = s.bundle AND r.generation = s.generation)
                 ORDER BY s.bundle, s.generation",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get(0)?, row.get::<_, i64>(1)? as u64, row.get(2)?))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn label_sets(&self) -> Result<Vec<BTreeMap<String, String>>, StoreError> {
        self.read(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT DISTINCT label_set FROM agents WHERE revoked_at IS NULL")?;
            let rows = statement.query_map([], |row| row.get::<_, String>(0))?;
            rows.map(|text| Ok(labels_from_json(&text?)))
                .collect::<Result<_, StoreError>>()
        })
    }

    fn agent_labels(
        &self,
        ids: Option<&[String]>,
    ) -> Result<Vec<(String, BTreeMap<String, String>)>, StoreError> {
        self.read(|connection| {
            let map =
                |row: &rusqlite::Row<'_>| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?));
            let rows: Vec<(String, String)> = match ids {
                None => connection
                    .prepare_cached(
                        "SELECT id, label_set FROM agents WHERE revoked_at IS NULL ORDER BY id",
                    )?
                    .query_map([], map)?
                    .collect::<Result<_, _>>()?,
                Some(ids) => {
                    let mut statement = connection.prepare_cached(
                        "SELECT id, label_set FROM agents WHERE revoked_at IS NULL AND id = ?1",
                    )?;
                    let mut rows = Vec::with_capacity(ids.len());
                    for id in ids {
                        rows.extend(
                            statement
                                .query_map([id], map)?
                                .collect::<Result<Vec<_>, _>>()?,
                        );
                    }
                    rows
                }
            };
            Ok(rows
                .into_iter()
                .map(|(id, labels)| (id, labels_from_json(&labels)))
                .collect())
        })
    }

    fn assigned_by(&self, origin: &str, bundle: &str) -> Result<Vec<String>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT agent FROM assignments WHERE bundle = ?1 AND origin = ?2",
            )?;
            let rows = statement.query_map(params![bundle, origin], |row| row.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn bundles_assigned_by(&self, origin: &str) -> Result<Vec<String>, StoreError> {
        self.read(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT DISTINCT bundle FROM assignments WHERE origin = ?1")?;
            let rows = statement.query_map([origin], |row| row.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn set_tracked(
        &self,
        origin: &str,
        bundle: &str,
        wanted: &[AssignmentRow],
        unassign: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let (origin, bundle, wanted, unassign) = (
            origin.to_owned(),
            bundle.to_owned(),
            wanted.to_vec(),
            unassign.to_vec(),
        );
        self.write(move |connection| {
            let mut changed = BTreeSet::new();
            {
                // Insert, or update a row of this origin that differs; never another origin's.
                let mut upsert = connection.prepare_cached(
                    "INSERT INTO assignments (agent, bundle, generation, digest, origin, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (agent, bundle) DO UPDATE SET generation = ?3, digest = ?4, updated_at = ?6
                     WHERE origin = ?5 AND (generation != ?3 OR digest != ?4)",
                )?;
                for row in &wanted {
                    let written = upsert.execute(params![
                        row.agent,
                        bundle,
                        row.generation as i64,
                        row.digest.0.as_slice(),
                        origin,
                        now
                    ])?;
                    if written > 0 {
                        remember_base(connection, &row.agent, &bundle, &row.digest.0, now)?;
                        changed.insert(row.agent.clone());
                    }
                }
                let mut delete = connection.prepare_cached(
                    "DELETE FROM assignments WHERE agent = ?1 AND bundle = ?2 AND origin = ?3",
                )?;
                for agent in &unassign {
                    if delete.execute(params![agent, bundle, origin])? > 0 {
                        changed.insert(agent.clone());
                    }
                }
            }
            bump_sequences(connection, &changed)?;
            Ok(changed.into_iter().collect())
        })
    }

    fn agents_seen(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.write(move |connection| {
            let mut statement = connection.prepare_cached(
                "UPDATE agents SET last_seen = ?2 WHERE id = ?1 AND last_seen < ?2",
            )?;
            for id in &ids {
                statement.execute(params![id, now])?;
            }
            Ok(())
        })
    }

    fn last_seen_between(&self, after: i64, up_to: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, last_seen FROM agents WHERE revoked_at IS NULL AND last_seen > ?1 AND last_seen <= ?2 ORDER BY id",
            )?;
            let rows = statement.query_map(params![after, up_to], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn advance_past(
        &self,
        agent: &str,
        sequence: u64,
        generations: &[(String, u64)],
        now: i64,
    ) -> Result<bool, StoreError> {
        crate::store::counter("assignment sequence", sequence)?;
        for (_, generation) in generations {
            crate::store::counter("generation", *generation)?;
        }
        let (agent, generations) = (agent.to_owned(), generations.to_vec());
        self.write(move |connection| {
            let behind: bool = connection
                .query_row(
                    "SELECT assignment_sequence <= ?2 FROM agents WHERE id = ?1",
                    params![agent, sequence as i64],
                    |row| row.get(0),
                )
                .optional()?
                .unwrap_or(false);
            let mut moved = Vec::new();
            if behind {
                connection.execute(
                    "UPDATE agents SET assignment_sequence = ?2, change_seq = ?3 WHERE id = ?1",
                    params![agent, sequence as i64 + 1, next_change(connection)?],
                )?;
                moved.push(format!("assignment sequence to {}", sequence + 1));
            }
            for (bundle, generation) in &generations {
                let changed = connection.execute(
                    "INSERT INTO generations (bundle, last) VALUES (?1, ?2)
                     ON CONFLICT (bundle) DO UPDATE SET last = ?2 WHERE last < ?2",
                    params![bundle, *generation as i64],
                )?;
                if changed > 0 {
                    moved.push(format!("{bundle} generations past {generation}"));
                }
            }
            if !moved.is_empty() {
                add_event(
                    connection,
                    now,
                    "hub-behind-agent",
                    &agent,
                    &behind_message(&moved),
                )?;
            }
            Ok(!moved.is_empty())
        })
    }

    fn replace_generation(
        &self,
        bundle: &str,
        old: u64,
        new: u64,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let bundle = bundle.to_owned();
        self.write(move |connection| {
            let (old, new) = (old as i64, new as i64);
            connection.execute(
                "UPDATE releases SET generation = ?3 WHERE bundle = ?1 AND generation = ?2",
                params![bundle, old, new],
            )?;
            connection.execute(
                "UPDATE renders SET generation = ?3 WHERE bundle = ?1 AND generation = ?2",
                params![bundle, old, new],
            )?;
            let agents: Vec<String> = {
                let mut statement = connection.prepare(
                    "SELECT agent FROM assignments WHERE bundle = ?1 AND generation = ?2",
                )?;
                let rows = statement.query_map(params![bundle, old], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            connection.execute(
                "UPDATE assignments SET generation = ?3, updated_at = ?4 WHERE bundle = ?1 AND generation = ?2",
                params![bundle, old, new, now],
            )?;
            bump_sequences(connection, &agents)?;
            Ok(agents)
        })
    }
}

/// Stores a status report unless its sequence was stored before; only bundles the agent is
/// assigned. The latest status is the latest report's (the agent's outbox sequence orders
/// them, not its clock).
fn record_status(
    connection: &Connection,
    agent: &str,
    sequence: u64,
    bundles: &[BundleStatus],
    drift: &[BundleDrift],
    now: i64,
) -> Result<bool, StoreError> {
    let stored: Option<i64> = connection
        .prepare_cached("SELECT status_sequence FROM agents WHERE id = ?1")?
        .query_row([agent], |row| row.get(0))
        .optional()?;
    let Some(stored) = stored else {
        return Ok(false);
    };
    if sequence <= stored as u64 {
        return Ok(false);
    }
    // Only bundles the agent is assigned: an agent cannot fill the store with others.
    let assigned: BTreeSet<String> = {
        let mut statement =
            connection.prepare_cached("SELECT bundle FROM assignments WHERE agent = ?1")?;
        let rows = statement.query_map([agent], |row| row.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let (kept, dropped): (Vec<&BundleStatus>, Vec<&BundleStatus>) = bundles
        .iter()
        .partition(|status| assigned.contains(&status.bundle));
    if !dropped.is_empty() {
        tracing::debug!(
            agent,
            dropped = dropped.len(),
            "status for bundles not assigned to the agent ignored"
        );
    }
    let change = match kept.is_empty() {
        true => 0,
        false => next_change(connection)?,
    };
    for status in kept {
        let phase = phase_name(status.phase);
        if status.stale {
            let was_stale: Option<bool> = connection
                .prepare_cached("SELECT stale FROM bundle_status WHERE agent = ?1 AND bundle = ?2")?
                .query_row(params![agent, status.bundle], |row| row.get(0))
                .optional()?;
            if was_stale != Some(true) {
                add_event(
                    connection,
                    now,
                    "agent-stale",
                    agent,
                    &format!(
                        "bundle {} generation {}: the snapshot expired; still enforced, but the agent has had nothing newer",
                        status.bundle, status.generation
                    ),
                )?;
            }
        }
        connection
            .prepare_cached(
                "INSERT INTO bundle_status (agent, bundle, digest, generation, phase, objects_total, objects_ready, message, observed_at, stale, received_at, change_seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (agent, bundle) DO UPDATE SET digest = ?3, generation = ?4, phase = ?5, objects_total = ?6, objects_ready = ?7, message = ?8, observed_at = ?9, stale = ?10, received_at = ?11, change_seq = ?12",
            )?
            .execute(params![
                agent,
                status.bundle,
                status.digest.0.as_slice(),
                status.generation as i64,
                phase,
                status.objects_total as i64,
                status.objects_ready as i64,
                status.message,
                status.observed_at,
                status.stale,
                now,
                change
            ])?;
        connection
            .prepare_cached(
                "INSERT INTO status_history (agent, bundle, generation, phase, message, observed_at, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                agent,
                status.bundle,
                status.generation as i64,
                phase,
                status.message,
                status.observed_at,
                now
            ])?;
    }
    for drift in drift.iter().filter(|d| assigned.contains(&d.bundle)) {
        record_drift(connection, agent, drift, now)?;
    }
    connection
        .prepare_cached("UPDATE agents SET status_sequence = ?2 WHERE id = ?1")?
        .execute(params![agent, sequence as i64])?;
    Ok(true)
}

/// Stores one bundle's drift report, moves where its drift stands, and logs the event.
fn record_drift(
    connection: &Connection,
    agent: &str,
    drift: &BundleDrift,
    now: i64,
) -> Result<(), StoreError> {
    let total = drift.objects.len() as i64 + i64::from(drift.more_objects);
    let findings = serde_json::to_string(&drift.objects)
        .map_err(|error| StoreError::Corrupt(format!("drift findings: {error}")))?;
    connection
        .prepare_cached(
            "INSERT INTO drift_reports (agent, bundle, generation, action, objects, findings, observed_at, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            agent,
            drift.bundle,
            drift.generation as i64,
            drift_action_name(drift.action),
            total,
            findings,
            drift.observed_at,
            now
        ])?;
    let statement = match drift.action {
        DriftAction::Left => {
            "INSERT INTO drift_state (agent, bundle, left_objects, left_since) VALUES (?1, ?2, ?3, CASE WHEN ?3 > 0 THEN ?4 END)
             ON CONFLICT (agent, bundle) DO UPDATE SET left_objects = ?3,
               left_since = CASE WHEN ?3 = 0 THEN NULL ELSE COALESCE(left_since, ?4) END"
        }
        DriftAction::Corrected => {
            "INSERT INTO drift_state (agent, bundle, corrected_objects, corrected_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (agent, bundle) DO UPDATE SET corrected_objects = corrected_objects + ?3, corrected_at = ?4"
        }
    };
    connection
        .prepare_cached(statement)?
        .execute(params![agent, drift.bundle, total, now])?;
    let (kind, message) = drift_event(drift);
    add_event(connection, now, kind, agent, &message)?;
    Ok(())
}
