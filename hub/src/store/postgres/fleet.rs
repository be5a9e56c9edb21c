//! [`FleetStore`] on PostgreSQL: assignments, delta bases, status, last seen.
//!
//! An assignment carries the phase its agent last reported for the bundle (for fleet counts
//! without joins): taken from the status when the assignment is inserted, and set on every
//! assignment of the bundle when a status is written.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use deadpool_postgres::GenericClient;
use outpost_proto::Digest;
use outpost_proto::wire::{BundleDrift, BundleStatus, DriftAction};
use tokio_postgres::Row;

use super::store::{AGENT_COLUMNS, agent_from_row};
use super::{PostgresStore, add_event, digest_at, execute, next_change, one, optional, query};
use crate::store::fleet::{
    DELTA_BASES_KEPT, behind_message, drift_action_name, drift_event, phase_from, phase_name,
};
use crate::store::{
    AgentAssignments, AssignmentChange, AssignmentRow, FleetChanges, FleetStore, SessionRead,
    SignedHeader, StatusOutcome, StatusWrite, StoreError, StoredStatus, labels_from_json,
};

/// Inserts or replaces an assignment; a new row takes the phase last reported for it.
const UPSERT_ASSIGNMENT: &str = "INSERT INTO assignments (agent, bundle, generation, digest, origin, updated_at, phase)
     VALUES ($1, $2, $3, $4, $5, $6,
             (SELECT s.phase FROM bundle_status s WHERE s.agent = $1 AND s.bundle = $2))
     ON CONFLICT (agent, bundle) DO UPDATE SET generation = $3, digest = $4, origin = $5, updated_at = $6";

/// Remembers that `agent` was assigned `digest` of `bundle` (a future delta base).
async fn remember_base<C: GenericClient>(
    client: &C,
    agent: &str,
    bundle: &str,
    digest: &[u8],
    now: i64,
) -> Result<(), StoreError> {
    execute(
        client,
        "INSERT INTO assignment_bases (agent, bundle, digest, assigned_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (agent, bundle, digest) DO UPDATE SET assigned_at = $4",
        &[&agent, &bundle, &digest, &now],
    )
    .await?;
    Ok(())
}

/// An assignment from a row that starts with `agent, bundle, generation, digest`.
pub(super) fn assignment_from_row(row: &Row) -> Result<AssignmentRow, StoreError> {
    Ok(AssignmentRow {
        agent: row.try_get(0)?,
        bundle: row.try_get(1)?,
        generation: row.try_get::<_, i64>(2)? as u64,
        digest: digest_at(row, 3)?,
    })
}

/// Bumps the assignment sequence of each agent (its sessions send the new assignments) and
/// stamps it in the change feed.
async fn bump_sequences<C: GenericClient>(
    client: &C,
    agents: &BTreeSet<String>,
) -> Result<(), StoreError> {
    if agents.is_empty() {
        return Ok(());
    }
    let change = next_change(client).await?;
    let agents: Vec<&String> = agents.iter().collect();
    execute(
        client,
        "UPDATE agents SET assignment_sequence = assignment_sequence + 1, change_seq = $2 WHERE id = ANY($1)",
        &[&agents, &change],
    )
    .await?;
    Ok(())
}

/// Writes single assignments in the caller's transaction; returns the agents whose assignments
/// changed.
pub(super) async fn write_changes<C: GenericClient>(
    client: &C,
    changes: &[AssignmentChange],
    now: i64,
) -> Result<Vec<String>, StoreError> {
    let mut changed = BTreeSet::new();
    for change in changes {
        let written = match &change.to {
            Some((generation, digest)) => {
                remember_base(client, &change.agent, &change.bundle, &digest.0, now).await?;
                execute(
                    client,
                    "INSERT INTO assignments (agent, bundle, generation, digest, origin, updated_at, phase)
                     VALUES ($1, $2, $3, $4, $5, $6,
                             (SELECT s.phase FROM bundle_status s WHERE s.agent = $1 AND s.bundle = $2))
                     ON CONFLICT (agent, bundle) DO UPDATE SET generation = $3, digest = $4, origin = $5, updated_at = $6
                     WHERE assignments.generation != $3 OR assignments.digest != $4 OR assignments.origin != $5",
                    &[
                        &change.agent,
                        &change.bundle,
                        &(*generation as i64),
                        &digest.0.as_slice(),
                        &change.origin,
                        &now,
                    ],
                )
                .await?
            }
            None => {
                execute(
                    client,
                    "DELETE FROM assignments WHERE agent = $1 AND bundle = $2",
                    &[&change.agent, &change.bundle],
                )
                .await?
            }
        };
        if written > 0 {
            changed.insert(change.agent.clone());
        }
    }
    bump_sequences(client, &changed).await?;
    Ok(changed.into_iter().collect())
}

/// The columns [`status_from_row`] reads, in order.
pub(super) const STATUS_COLUMNS: &str = "agent, bundle, digest, generation, phase, objects_total, objects_ready, message, observed_at, stale, received_at";

/// A `bundle_status` row selected with [`STATUS_COLUMNS`].
pub(super) fn status_from_row(row: &Row) -> Result<StoredStatus, StoreError> {
    Ok(StoredStatus {
        agent: row.try_get(0)?,
        status: BundleStatus {
            bundle: row.try_get(1)?,
            digest: digest_at(row, 2)?,
            generation: row.try_get::<_, i64>(3)? as u64,
            phase: phase_from(row.try_get(4)?),
            objects_total: row.try_get::<_, i64>(5)? as u64,
            objects_ready: row.try_get::<_, i64>(6)? as u64,
            message: row.try_get(7)?,
            observed_at: row.try_get(8)?,
            stale: row.try_get(9)?,
        },
        received_at: row.try_get(10)?,
    })
}

impl FleetStore for PostgresStore {
    fn set_assignments(
        &self,
        origin: &str,
        wanted: &[AssignmentRow],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.write(async |transaction| {
            let mut current: BTreeMap<(String, String), (u64, Vec<u8>, String)> = BTreeMap::new();
            for row in query(
                transaction,
                "SELECT agent, bundle, generation, digest, origin FROM assignments",
                &[],
            )
            .await?
            {
                current.insert(
                    (row.try_get(0)?, row.try_get(1)?),
                    (
                        row.try_get::<_, i64>(2)? as u64,
                        row.try_get(3)?,
                        row.try_get(4)?,
                    ),
                );
            }
            let mut changed = BTreeSet::new();
            let wanted_keys: BTreeSet<(&str, &str)> = wanted
                .iter()
                .map(|row| (row.agent.as_str(), row.bundle.as_str()))
                .collect();
            // Withdraw this origin's assignments that are no longer wanted.
            for ((agent, bundle), (_, _, row_origin)) in &current {
                if row_origin == origin && !wanted_keys.contains(&(agent.as_str(), bundle.as_str()))
                {
                    execute(
                        transaction,
                        "DELETE FROM assignments WHERE agent = $1 AND bundle = $2",
                        &[agent, bundle],
                    )
                    .await?;
                    changed.insert(agent.clone());
                }
            }
            for row in wanted {
                let key = (row.agent.clone(), row.bundle.clone());
                let same_or_other =
                    current
                        .get(&key)
                        .is_some_and(|(generation, digest, held_by)| {
                            held_by != origin
                                || (*generation == row.generation
                                    && digest.as_slice() == row.digest.0.as_slice())
                        });
                if same_or_other {
                    continue;
                }
                remember_base(transaction, &row.agent, &row.bundle, &row.digest.0, now).await?;
                execute(
                    transaction,
                    UPSERT_ASSIGNMENT,
                    &[
                        &row.agent,
                        &row.bundle,
                        &(row.generation as i64),
                        &row.digest.0.as_slice(),
                        &origin,
                        &now,
                    ],
                )
                .await?;
                changed.insert(row.agent.clone());
            }
            bump_sequences(transaction, &changed).await?;
            Ok(changed.into_iter().collect())
        })
    }

    fn change_assignments(
        &self,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.write(async |transaction| write_changes(transaction, changes, now).await)
    }

    fn bundle_assignments(
        &self,
        bundle: Option<&str>,
    ) -> Result<Vec<(AssignmentRow, String)>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT agent, bundle, generation, digest, origin FROM assignments
                 WHERE $1::text IS NULL OR bundle = $1 ORDER BY agent, bundle",
                &[&bundle],
            )
            .await?
            .iter()
            .map(|row| Ok((assignment_from_row(row)?, row.try_get(4)?)))
            .collect()
        })
    }

    fn assignments(&self, agent: &str) -> Result<AgentAssignments, StoreError> {
        self.read_consistent(async |transaction| {
            let sequence = optional(
                transaction,
                "SELECT assignment_sequence FROM agents WHERE id = $1",
                &[&agent],
            )
            .await?
            .map(|row| row.try_get::<_, i64>(0))
            .transpose()?;
            let entries = query(
                transaction,
                "SELECT agent, bundle, generation, digest FROM assignments WHERE agent = $1 ORDER BY bundle",
                &[&agent],
            )
            .await?
            .iter()
            .map(assignment_from_row)
            .collect::<Result<_, _>>()?;
            Ok(AgentAssignments {
                sequence: sequence.unwrap_or(0) as u64,
                entries,
            })
        })
    }

    fn agent_connected(&self, agent: &str, version: &str, now: i64) -> Result<(), StoreError> {
        self.agents_connected(&[(agent.to_owned(), version.to_owned(), now)])
    }

    fn agents_connected(&self, connections: &[(String, String, i64)]) -> Result<(), StoreError> {
        if connections.is_empty() {
            return Ok(());
        }
        let ids: Vec<&String> = connections.iter().map(|(id, _, _)| id).collect();
        let versions: Vec<&String> = connections.iter().map(|(_, version, _)| version).collect();
        let times: Vec<i64> = connections.iter().map(|(_, _, at)| *at).collect();
        self.write(async |transaction| {
            // One agent twice in a batch: the last connection wins, as one update after another.
            execute(
                transaction,
                "UPDATE agents a SET last_seen = c.at, agent_version = c.version
                 FROM (SELECT DISTINCT ON (id) id, version, at FROM
                         unnest($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS c (id, version, at, n)
                       ORDER BY id, n DESC) c
                 WHERE a.id = c.id",
                &[&ids, &versions, &times],
            )
            .await?;
            Ok(())
        })
    }

    fn session_reads(
        &self,
        ids: &[String],
        with_bases: bool,
    ) -> Result<Vec<SessionRead>, StoreError> {
        let mut found: HashMap<String, SessionRead> = self.read_consistent(async |transaction| {
            let mut found = HashMap::new();
            for row in query(
                transaction,
                &format!(
                    "SELECT {AGENT_COLUMNS}, label_set, assignment_sequence
                     FROM agents WHERE id = ANY($1)"
                ),
                &[&ids],
            )
            .await?
            {
                let agent = agent_from_row(&row, labels_from_json(row.try_get(7)?))?;
                let sequence = row.try_get::<_, i64>(8)? as u64;
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
            for row in query(
                transaction,
                "SELECT agent, bundle, generation, digest FROM assignments
                 WHERE agent = ANY($1) ORDER BY agent, bundle",
                &[&ids],
            )
            .await?
            {
                let row = assignment_from_row(&row)?;
                if let Some(read) = found.get_mut(&row.agent) {
                    read.assignments.entries.push(row);
                }
            }
            if with_bases {
                for row in query(
                    transaction,
                    "SELECT agent, bundle, digest FROM (SELECT agent, bundle, digest, ROW_NUMBER() OVER
                     (PARTITION BY agent, bundle ORDER BY assigned_at DESC, id DESC) AS n
                     FROM assignment_bases WHERE agent = ANY($1)) b WHERE n <= $2",
                    &[&ids, &DELTA_BASES_KEPT],
                )
                .await?
                {
                    let agent: String = row.try_get(0)?;
                    if let Some(read) = found.get_mut(&agent) {
                        read.bases.push((row.try_get(1)?, digest_at(&row, 2)?));
                    }
                }
            }
            Ok(found)
        })?;
        Ok(ids
            .iter()
            .map(|id| found.remove(id).unwrap_or_default())
            .collect())
    }

    fn record_statuses(&self, reports: &[StatusWrite]) -> Result<Vec<StatusOutcome>, StoreError> {
        self.write(async |transaction| {
            let mut outcomes = Vec::with_capacity(reports.len());
            for report in reports {
                transaction.batch_execute("SAVEPOINT report").await?;
                match record_status(
                    transaction,
                    &report.agent,
                    report.sequence,
                    &report.bundles,
                    &report.drift,
                    report.now,
                )
                .await
                {
                    Ok(new) => {
                        transaction
                            .batch_execute("RELEASE SAVEPOINT report")
                            .await?;
                        outcomes.push(Ok(new));
                    }
                    Err(error) => {
                        transaction
                            .batch_execute("ROLLBACK TO SAVEPOINT report; RELEASE SAVEPOINT report")
                            .await?;
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
        self.write(async |transaction| {
            record_status(transaction, agent, sequence, bundles, &[], now).await
        })
    }

    fn change_cursor(&self) -> Result<u64, StoreError> {
        self.read(async |client| {
            let row = one(client, "SELECT value FROM change_counter WHERE id = 1", &[]).await?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
    }

    fn changes_since(&self, cursor: u64) -> Result<FleetChanges, StoreError> {
        let from = cursor as i64;
        // One snapshot: the counter and the rows it covers.
        self.read_consistent(async |transaction| {
            let now: i64 = one(
                transaction,
                "SELECT value FROM change_counter WHERE id = 1",
                &[],
            )
            .await?
            .try_get(0)?;
            let agents = query(
                transaction,
                "SELECT id FROM agents WHERE change_seq > $1 AND change_seq <= $2 ORDER BY id",
                &[&from, &now],
            )
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
            let statuses = query(
                transaction,
                &format!(
                    "SELECT {STATUS_COLUMNS} FROM bundle_status WHERE change_seq > $1 AND change_seq <= $2 ORDER BY agent, bundle"
                ),
                &[&from, &now],
            )
            .await?
            .iter()
            .map(status_from_row)
            .collect::<Result<_, _>>()?;
            Ok(FleetChanges {
                cursor: now.max(from) as u64,
                agents,
                statuses,
            })
        })
    }

    fn statuses(&self, agent: Option<&str>) -> Result<Vec<StoredStatus>, StoreError> {
        self.read(async |client| {
            query(
                client,
                &format!(
                    "SELECT {STATUS_COLUMNS} FROM bundle_status WHERE $1::text IS NULL OR agent = $1 ORDER BY agent, bundle"
                ),
                &[&agent],
            )
            .await?
            .iter()
            .map(status_from_row)
            .collect()
        })
    }

    fn status_history_len(&self, agent: &str) -> Result<u64, StoreError> {
        self.read(async |client| {
            let row = one(
                client,
                "SELECT COUNT(*) FROM status_history WHERE agent = $1",
                &[&agent],
            )
            .await?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
    }

    fn signed_header(
        &self,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<SignedHeader>, StoreError> {
        self.read(async |client| {
            optional(
                client,
                "SELECT header, signature FROM snapshots WHERE bundle = $1 AND generation = $2",
                &[&bundle, &(generation as i64)],
            )
            .await?
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .transpose()
        })
    }

    fn snapshot_body(&self, bundle: &str, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(async |client| {
            optional(
                client,
                "SELECT b.body FROM bodies b WHERE b.digest = $2
                 AND EXISTS (SELECT 1 FROM snapshots s WHERE s.bundle = $1 AND s.digest = $2)",
                &[&bundle, &digest.0.as_slice()],
            )
            .await?
            .map(|row| Ok(row.try_get(0)?))
            .transpose()
        })
    }

    fn snapshot_digest(&self, bundle: &str, generation: u64) -> Result<Option<Digest>, StoreError> {
        self.read(async |client| {
            optional(
                client,
                "SELECT digest FROM snapshots WHERE bundle = $1 AND generation = $2",
                &[&bundle, &(generation as i64)],
            )
            .await?
            .map(|row| digest_at(&row, 0))
            .transpose()
        })
    }

    fn delta_bases(&self, agent: &str) -> Result<Vec<(String, Digest)>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT bundle, digest FROM (SELECT bundle, digest, ROW_NUMBER() OVER
                 (PARTITION BY bundle ORDER BY assigned_at DESC, id DESC) AS n
                 FROM assignment_bases WHERE agent = $1) b WHERE n <= $2",
                &[&agent, &DELTA_BASES_KEPT],
            )
            .await?
            .iter()
            .map(|row| Ok((row.try_get(0)?, digest_at(row, 1)?)))
            .collect()
        })
    }

    fn headers_in_use(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT s.bundle, s.generation, s.header FROM snapshots s
                 WHERE EXISTS (SELECT 1 FROM assignments a WHERE a.bundle = s.bundle AND a.generation = s.generation)
                    OR EXISTS (SELECT 1 FROM releases r WHERE r.bundle = s.bundle AND r.generation = s.generation)
                 ORDER BY s.bundle, s.generation",
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get(0)?,
                    row.try_get::<_, i64>(1)? as u64,
                    row.try_get(2)?,
                ))
            })
            .collect()
        })
    }

    fn label_sets(&self) -> Result<Vec<BTreeMap<String, String>>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT DISTINCT label_set FROM agents WHERE revoked_at IS NULL",
                &[],
            )
            .await?
            .iter()
            .map(|row| Ok(labels_from_json(row.try_get(0)?)))
            .collect()
        })
    }

    fn agent_labels(
        &self,
        ids: Option<&[String]>,
    ) -> Result<Vec<(String, BTreeMap<String, String>)>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT id, label_set FROM agents
                 WHERE revoked_at IS NULL AND ($1::text[] IS NULL OR id = ANY($1)) ORDER BY id",
                &[&ids],
            )
            .await?
            .iter()
            .map(|row| Ok((row.try_get(0)?, labels_from_json(row.try_get(1)?))))
            .collect()
        })
    }

    fn assigned_by(&self, origin: &str, bundle: &str) -> Result<Vec<String>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT agent FROM assignments WHERE bundle = $1 AND origin = $2",
                &[&bundle, &origin],
            )
            .await?
            .iter()
            .map(|row| Ok(row.try_get(0)?))
            .collect()
        })
    }

    fn bundles_assigned_by(&self, origin: &str) -> Result<Vec<String>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT DISTINCT bundle FROM assignments WHERE origin = $1",
                &[&origin],
            )
            .await?
            .iter()
            .map(|row| Ok(row.try_get(0)?))
            .collect()
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
        self.write(async |transaction| {
            let mut changed = BTreeSet::new();
            for row in wanted {
                // Insert, or update a row of this origin that differs; never another origin's.
                let written = execute(
                    transaction,
                    "INSERT INTO assignments (agent, bundle, generation, digest, origin, updated_at, phase)
                     VALUES ($1, $2, $3, $4, $5, $6,
                             (SELECT s.phase FROM bundle_status s WHERE s.agent = $1 AND s.bundle = $2))
                     ON CONFLICT (agent, bundle) DO UPDATE SET generation = $3, digest = $4, updated_at = $6
                     WHERE assignments.origin = $5
                       AND (assignments.generation != $3 OR assignments.digest != $4)",
                    &[
                        &row.agent,
                        &bundle,
                        &(row.generation as i64),
                        &row.digest.0.as_slice(),
                        &origin,
                        &now,
                    ],
                )
                .await?;
                if written > 0 {
                    remember_base(transaction, &row.agent, bundle, &row.digest.0, now).await?;
                    changed.insert(row.agent.clone());
                }
            }
            if !unassign.is_empty() {
                for row in query(
                    transaction,
                    "DELETE FROM assignments WHERE agent = ANY($1) AND bundle = $2 AND origin = $3 RETURNING agent",
                    &[&unassign, &bundle, &origin],
                )
                .await?
                {
                    changed.insert(row.try_get(0)?);
                }
            }
            bump_sequences(transaction, &changed).await?;
            Ok(changed.into_iter().collect())
        })
    }

    fn agents_seen(&self, ids: &[String], now: i64) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.write(async |transaction| {
            execute(
                transaction,
                "UPDATE agents SET last_seen = $2 WHERE id = ANY($1) AND last_seen < $2",
                &[&ids, &now],
            )
            .await?;
            Ok(())
        })
    }

    fn last_seen_between(&self, after: i64, up_to: i64) -> Result<Vec<(String, i64)>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT id, last_seen FROM agents WHERE revoked_at IS NULL AND last_seen > $1 AND last_seen <= $2 ORDER BY id",
                &[&after, &up_to],
            )
            .await?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
        })
    }

    fn advance_past(
        &self,
        agent: &str,
        sequence: u64,
        generations: &[(String, u64)],
        now: i64,
    ) -> Result<bool, StoreError> {
        let sequence = crate::store::counter("assignment sequence", sequence)?;
        for (_, generation) in generations {
            crate::store::counter("generation", *generation)?;
        }
        self.write(async |transaction| {
            let behind = optional(
                transaction,
                "SELECT assignment_sequence <= $2 FROM agents WHERE id = $1",
                &[&agent, &sequence],
            )
            .await?
            .map(|row| row.try_get::<_, bool>(0))
            .transpose()?
            .unwrap_or(false);
            let mut moved = Vec::new();
            if behind {
                let change = next_change(transaction).await?;
                execute(
                    transaction,
                    "UPDATE agents SET assignment_sequence = $2, change_seq = $3 WHERE id = $1",
                    &[&agent, &(sequence + 1), &change],
                )
                .await?;
                moved.push(format!("assignment sequence to {}", sequence + 1));
            }
            for (bundle, generation) in generations {
                let generation = *generation as i64;
                let changed = execute(
                    transaction,
                    "INSERT INTO generations (bundle, last) VALUES ($1, $2)
                     ON CONFLICT (bundle) DO UPDATE SET last = EXCLUDED.last WHERE generations.last < EXCLUDED.last",
                    &[bundle, &generation],
                )
                .await?;
                if changed > 0 {
                    moved.push(format!("{bundle} generations past {generation}"));
                }
            }
            if !moved.is_empty() {
                add_event(
                    transaction,
                    now,
                    "hub-behind-agent",
                    agent,
                    &behind_message(&moved),
                )
                .await?;
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
        let (old, new) = (old as i64, new as i64);
        self.write(async |transaction| {
            execute(
                transaction,
                "UPDATE releases SET generation = $3 WHERE bundle = $1 AND generation = $2",
                &[&bundle, &old, &new],
            )
            .await?;
            execute(
                transaction,
                "UPDATE renders SET generation = $3 WHERE bundle = $1 AND generation = $2",
                &[&bundle, &old, &new],
            )
            .await?;
            let agents: BTreeSet<String> = query(
                transaction,
                "UPDATE assignments SET generation = $3, updated_at = $4 WHERE bundle = $1 AND generation = $2
                 RETURNING agent",
                &[&bundle, &old, &new, &now],
            )
            .await?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
            bump_sequences(transaction, &agents).await?;
            Ok(agents.into_iter().collect())
        })
    }
}

/// Stores a status report unless its sequence was stored before; only bundles the agent is
/// assigned. The latest status is the latest report's (the agent's outbox sequence orders
/// them, not its clock).
async fn record_status<C: GenericClient>(
    client: &C,
    agent: &str,
    sequence: u64,
    bundles: &[BundleStatus],
    drift: &[BundleDrift],
    now: i64,
) -> Result<bool, StoreError> {
    let stored = optional(
        client,
        "SELECT status_sequence FROM agents WHERE id = $1",
        &[&agent],
    )
    .await?;
    let Some(stored) = stored else {
        return Ok(false);
    };
    if sequence <= stored.try_get::<_, i64>(0)? as u64 {
        return Ok(false);
    }
    // Only bundles the agent is assigned: an agent cannot fill the store with others.
    let assigned: BTreeSet<String> = query(
        client,
        "SELECT bundle FROM assignments WHERE agent = $1",
        &[&agent],
    )
    .await?
    .iter()
    .map(|row| row.try_get(0))
    .collect::<Result<_, _>>()?;
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
        false => next_change(client).await?,
    };
    for status in kept {
        let phase = phase_name(status.phase);
        if status.stale {
            let was_stale = optional(
                client,
                "SELECT stale FROM bundle_status WHERE agent = $1 AND bundle = $2",
                &[&agent, &status.bundle],
            )
            .await?
            .map(|row| row.try_get::<_, bool>(0))
            .transpose()?;
            if was_stale != Some(true) {
                add_event(
                    client,
                    now,
                    "agent-stale",
                    agent,
                    &format!(
                        "bundle {} generation {}: the snapshot expired; still enforced, but the agent has had nothing newer",
                        status.bundle, status.generation
                    ),
                )
                .await?;
            }
        }
        execute(
            client,
            "INSERT INTO bundle_status (agent, bundle, digest, generation, phase, objects_total, objects_ready, message, observed_at, stale, received_at, change_seq)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (agent, bundle) DO UPDATE SET digest = $3, generation = $4, phase = $5, objects_total = $6, objects_ready = $7, message = $8, observed_at = $9, stale = $10, received_at = $11, change_seq = $12",
            &[
                &agent,
                &status.bundle,
                &status.digest.0.as_slice(),
                &(status.generation as i64),
                &phase,
                &(status.objects_total as i64),
                &(status.objects_ready as i64),
                &status.message,
                &status.observed_at,
                &status.stale,
                &now,
                &change,
            ],
        )
        .await?;
        execute(
            client,
            "UPDATE assignments SET phase = $3 WHERE agent = $1 AND bundle = $2 AND phase IS DISTINCT FROM $3",
            &[&agent, &status.bundle, &phase],
        )
        .await?;
        execute(
            client,
            "INSERT INTO status_history (agent, bundle, generation, phase, message, observed_at, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &agent,
                &status.bundle,
                &(status.generation as i64),
                &phase,
                &status.message,
                &status.observed_at,
                &now,
            ],
        )
        .await?;
    }
    for drift in drift.iter().filter(|d| assigned.contains(&d.bundle)) {
        record_drift(client, agent, drift, now).await?;
    }
    execute(
        client,
        "UPDATE agents SET status_sequence = $2 WHERE id = $1",
        &[&agent, &(sequence as i64)],
    )
    .await?;
    Ok(true)
}

/// Stores one bundle's drift report, moves where its drift stands, and logs the event.
async fn record_drift<C: GenericClient>(
    client: &C,
    agent: &str,
    drift: &BundleDrift,
    now: i64,
) -> Result<(), StoreError> {
    let total = drift.objects.len() as i64 + i64::from(drift.more_objects);
    let findings = serde_json::to_string(&drift.objects)
        .map_err(|error| StoreError::Corrupt(format!("drift findings: {error}")))?;
    execute(
        client,
        "INSERT INTO drift_reports (agent, bundle, generation, action, objects, findings, observed_at, received_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &agent,
            &drift.bundle,
            &(drift.generation as i64),
            &drift_action_name(drift.action),
            &total,
            &findings,
            &drift.observed_at,
            &now,
        ],
    )
    .await?;
    let statement = match drift.action {
        DriftAction::Left => {
            "INSERT INTO drift_state (agent, bundle, left_objects, left_since) VALUES ($1, $2, $3::BIGINT, CASE WHEN $3::BIGINT > 0 THEN $4::BIGINT END)
             ON CONFLICT (agent, bundle) DO UPDATE SET left_objects = $3::BIGINT,
               left_since = CASE WHEN $3::BIGINT = 0 THEN NULL ELSE COALESCE(drift_state.left_since, $4::BIGINT) END"
        }
        DriftAction::Corrected => {
            "INSERT INTO drift_state (agent, bundle, corrected_objects, corrected_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (agent, bundle) DO UPDATE SET corrected_objects = drift_state.corrected_objects + $3, corrected_at = $4"
        }
    };
    execute(client, statement, &[&agent, &drift.bundle, &total, &now]).await?;
    let (kind, message) = drift_event(drift);
    add_event(client, now, kind, agent, &message).await?;
    Ok(())
}
