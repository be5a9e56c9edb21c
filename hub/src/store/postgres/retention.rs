//! [`RetentionStore`] on PostgreSQL: each kind of row deleted in chunks of [`CHUNK`], one write
//! each, so a long pass interleaves with the writes of serving agents. What decides that a
//! snapshot is unreferenced is evaluated inside the delete's own transaction (under the write
//! lock), so a reference made a moment before (an assignment, a rollout's decision) is always
//! seen.

use super::{PostgresStore, execute};
use crate::store::fleet::DELTA_BASES_KEPT;
use crate::store::{Pruned, Retention, RetentionStore, StoreError};

/// Rows deleted per transaction.
const CHUNK: i64 = 5_000;

/// The snapshots of `s` no one can need (see the module docs of `store::retention`), given
/// `rollout_digests` (bundle, hex digest): what rollouts that may still act could assign —
/// their targets, and what a roll back would give back.
const UNREFERENCED: &str = "
    WITH rollout_digests AS (
        SELECT r.bundle, m.member::jsonb -> 'target' ->> 'digest' AS digest FROM rollouts r
            JOIN rollout_members m ON m.rollout = r.id
            WHERE r.phase != 'rolled-back' AND m.member::jsonb -> 'target' ->> 'digest' IS NOT NULL
        UNION
        SELECT r.bundle, m.member::jsonb -> 'previous' ->> 'digest' FROM rollouts r
            JOIN rollout_members m ON m.rollout = r.id
            WHERE r.phase != 'rolled-back' AND m.member::jsonb -> 'previous' ->> 'digest' IS NOT NULL)
    SELECT s.bundle, s.generation FROM snapshots s WHERE
    s.generation <= COALESCE((SELECT g.last FROM generations g WHERE g.bundle = s.bundle), 0) - $1
    AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.bundle = s.bundle AND a.generation = s.generation)
    AND NOT EXISTS (SELECT 1 FROM releases r WHERE r.bundle = s.bundle AND r.generation = s.generation)
    AND NOT (
        s.generation = (SELECT MAX(n.generation) FROM snapshots n WHERE n.bundle = s.bundle AND n.digest = s.digest)
        AND (EXISTS (SELECT 1 FROM assignment_bases b WHERE b.bundle = s.bundle AND b.digest = s.digest)
             OR EXISTS (SELECT 1 FROM rollout_digests x WHERE x.bundle = s.bundle AND x.digest = encode(s.digest, 'hex'))))
    LIMIT $2";

impl PostgresStore {
    /// Runs `sql` (which deletes at most `$2` rows, given `$1 = first`) until a run deletes
    /// fewer than a chunk; returns how many went.
    fn delete_in_chunks(&self, sql: &str, first: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let deleted =
                self.write(async |transaction| execute(transaction, sql, &[&first, &CHUNK]).await)?;
            total += deleted;
            if (deleted as i64) < CHUNK {
                return Ok(total);
            }
        }
    }

    /// Deletes the rows of an append-only log (`table` with an increasing `id`, stamped in
    /// `at_column`) older than `age` seconds, then the oldest beyond `max` rows.
    fn prune_log(
        &self,
        table: &str,
        at_column: &str,
        now: i64,
        age: i64,
        max: u64,
    ) -> Result<u64, StoreError> {
        let old = self.delete_in_chunks(
            &format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {at_column} < $1 ORDER BY id LIMIT $2)"
            ),
            now.saturating_sub(age),
        )?;
        let beyond = self.delete_in_chunks(
            &format!(
                "DELETE FROM {table} WHERE id IN (SELECT id FROM {table}
                   WHERE id <= (SELECT MAX(id) FROM {table}) - $1 ORDER BY id LIMIT $2)"
            ),
            max.min(i64::MAX as u64) as i64,
        )?;
        Ok(old + beyond)
    }
}

impl RetentionStore for PostgresStore {
    fn prune(&self, policy: &Retention, now: i64) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        pruned.events +=
            self.prune_log("events", "at", now, policy.events_age, policy.events_max)?;
        pruned.status_history += self.prune_log(
            "status_history",
            "received_at",
            now,
            policy.history_age,
            policy.history_max,
        )?;
        pruned.drift_reports += self.prune_log(
            "drift_reports",
            "received_at",
            now,
            policy.history_age,
            policy.history_max,
        )?;
        pruned.delta_bases += self.delete_in_chunks(
            "DELETE FROM assignment_bases WHERE id IN (SELECT id FROM (
               SELECT id, ROW_NUMBER() OVER (PARTITION BY agent, bundle ORDER BY assigned_at DESC, id DESC) AS n
               FROM assignment_bases) b WHERE n > $1 LIMIT $2)",
            DELTA_BASES_KEPT,
        )?;
        let kept = policy.snapshots_kept.min(i64::MAX as u64) as i64;
        loop {
            let (snapshots, renders, bodies) = self.write(async |transaction| {
                let snapshots = execute(
                    transaction,
                    &format!(
                        "DELETE FROM snapshots WHERE (bundle, generation) IN ({UNREFERENCED})"
                    ),
                    &[&kept, &CHUNK],
                )
                .await?;
                let (mut renders, mut bodies) = (0, 0);
                if snapshots > 0 {
                    renders = execute(
                        transaction,
                        "DELETE FROM renders WHERE NOT EXISTS
                           (SELECT 1 FROM snapshots s WHERE s.bundle = renders.bundle AND s.generation = renders.generation)",
                        &[],
                    )
                    .await?;
                    bodies = execute(
                        transaction,
                        "DELETE FROM bodies WHERE NOT EXISTS (SELECT 1 FROM snapshots s WHERE s.digest = bodies.digest)",
                        &[],
                    )
                    .await?;
                }
                Ok((snapshots, renders, bodies))
            })?;
            pruned.snapshots += snapshots;
            pruned.renders += renders;
            pruned.bodies += bodies;
            if (snapshots as i64) < CHUNK {
                break;
            }
        }
        Ok(pruned)
    }
}
