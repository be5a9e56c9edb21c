//! [`RolloutStore`] on PostgreSQL: the head (plan and phase as JSON, counts for lists, a
//! version) in `rollouts`, one row per member in `rollout_members` and one per history record
//! in `rollout_log`. A save writes the head, the members changed and the records added, with
//! the assignment changes, in one transaction.

use deadpool_postgres::GenericClient;

use super::fleet::write_changes;
use super::{PostgresStore, execute, one, optional, query};
use crate::rollout::machine::{Member, Progress, Record, Rollout};
use crate::store::rollouts::{corrupt, decode_head, encode, rollout_event};
use crate::store::{
    Created, RolloutHead, RolloutSave, RolloutStore, Saved, StoreError, StoredRollout,
};

/// Reads a rollout's members and history into `rollout`.
async fn fill<C: GenericClient>(client: &C, rollout: &mut Rollout) -> Result<(), StoreError> {
    let id = rollout.id as i64;
    for row in query(
        client,
        "SELECT agent, member FROM rollout_members WHERE rollout = $1",
        &[&id],
    )
    .await?
    {
        let agent: String = row.try_get(0)?;
        let member: Member =
            serde_json::from_str(row.try_get(1)?).map_err(|error| corrupt(id, &agent, error))?;
        rollout.members.insert(agent, member);
    }
    rollout.log = query(
        client,
        "SELECT at, who, action, why FROM rollout_log WHERE rollout = $1 ORDER BY seq",
        &[&id],
    )
    .await?
    .iter()
    .map(|row| {
        Ok(Record {
            at: row.try_get(0)?,
            who: row.try_get(1)?,
            action: row.try_get(2)?,
            why: row.try_get(3)?,
        })
    })
    .collect::<Result<_, StoreError>>()?;
    Ok(())
}

async fn insert_log<C: GenericClient>(
    client: &C,
    id: i64,
    from: usize,
    records: &[Record],
) -> Result<(), StoreError> {
    for (offset, record) in records.iter().enumerate() {
        execute(
            client,
            "INSERT INTO rollout_log (rollout, seq, at, who, action, why) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &id,
                &((from + offset) as i64),
                &record.at,
                &record.who,
                &record.action,
                &record.why,
            ],
        )
        .await?;
        if let Some((kind, subject, message)) = rollout_event(id, record) {
            super::add_event(client, record.at, kind, &subject, &message).await?;
        }
    }
    Ok(())
}

/// Inserts or replaces members (agent, state name, member JSON) of rollout `id`.
async fn upsert_members<C: GenericClient>(
    client: &C,
    id: i64,
    members: &[(String, &'static str, String)],
) -> Result<(), StoreError> {
    if members.is_empty() {
        return Ok(());
    }
    let agents: Vec<&String> = members.iter().map(|(agent, _, _)| agent).collect();
    let states: Vec<&str> = members.iter().map(|(_, state, _)| *state).collect();
    let texts: Vec<&String> = members.iter().map(|(_, _, member)| member).collect();
    execute(
        client,
        "INSERT INTO rollout_members (rollout, agent, state, member)
         SELECT $1, agent, state, member FROM unnest($2::text[], $3::text[], $4::text[]) AS m (agent, state, member)
         ON CONFLICT (rollout, agent) DO UPDATE SET state = EXCLUDED.state, member = EXCLUDED.member",
        &[&id, &agents, &states, &texts],
    )
    .await?;
    Ok(())
}

impl RolloutStore for PostgresStore {
    fn create_rollout(&self, rollout: &mut Rollout) -> Result<Created, StoreError> {
        let mut pending = rollout.clone();
        let created = self.write(async |transaction| {
            let busy = optional(
                transaction,
                "SELECT id FROM rollouts WHERE bundle = $1 AND phase IN ('running', 'paused') ORDER BY id DESC LIMIT 1",
                &[&pending.plan.bundle],
            )
            .await?;
            if let Some(busy) = busy {
                return Ok(Created::Busy(busy.try_get::<_, i64>(0)? as u64));
            }
            let last: i64 = one(transaction, "SELECT COALESCE(MAX(id), 0) FROM rollouts", &[])
                .await?
                .try_get(0)?;
            pending.id = last as u64 + 1;
            let head = pending
                .head_json()
                .map_err(|error| StoreError::Corrupt(error.to_string()))?;
            let created_by = pending
                .log
                .first()
                .map(|record| record.who.clone())
                .unwrap_or_default();
            let id = pending.id as i64;
            execute(
                transaction,
                "INSERT INTO rollouts (id, bundle, phase, state, created_at, updated_at, created_by, progress, version)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, 1)",
                &[
                    &id,
                    &pending.plan.bundle,
                    &pending.phase.name(),
                    &head,
                    &pending.created_at,
                    &created_by,
                    &encode(&pending.progress())?,
                ],
            )
            .await?;
            let members = pending
                .members
                .iter()
                .map(|(agent, member)| Ok((agent.clone(), member.state.name(), encode(member)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            upsert_members(transaction, id, &members).await?;
            insert_log(transaction, id, 0, &pending.log).await?;
            Ok(Created::Created(pending.id))
        })?;
        if let Created::Created(_) = created {
            *rollout = pending;
        }
        Ok(created)
    }

    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError> {
        let id = id as i64;
        self.read_consistent(async |transaction| {
            let head = optional(
                transaction,
                "SELECT state, version FROM rollouts WHERE id = $1",
                &[&id],
            )
            .await?;
            let Some(head) = head else {
                return Ok(None);
            };
            let mut rollout = decode_head(id, head.try_get(0)?)?;
            fill(transaction, &mut rollout).await?;
            Ok(Some(StoredRollout {
                rollout,
                version: head.try_get::<_, i64>(1)? as u64,
            }))
        })
    }

    fn rollouts(&self) -> Result<Vec<RolloutHead>, StoreError> {
        self.read_consistent(async |transaction| {
            let rows = query(
                transaction,
                "SELECT id, state, created_by, progress FROM rollouts ORDER BY id DESC",
                &[],
            )
            .await?;
            let mut heads = Vec::with_capacity(rows.len());
            for row in rows {
                let id: i64 = row.try_get(0)?;
                let rollout = decode_head(id, row.try_get(1)?)?;
                let progress: Option<&str> = row.try_get(3)?;
                let progress: Progress = match progress {
                    Some(text) => serde_json::from_str(text)
                        .map_err(|error| corrupt(id, "progress", error))?,
                    None => {
                        let mut whole = rollout.clone();
                        fill(transaction, &mut whole).await?;
                        whole.progress()
                    }
                };
                heads.push(RolloutHead {
                    rollout,
                    progress,
                    created_by: row.try_get(2)?,
                });
            }
            Ok(heads)
        })
    }

    fn live_rollouts(&self) -> Result<Vec<(u64, u64)>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT id, version FROM rollouts r
                 WHERE phase IN ('running', 'paused', 'succeeded')
                   AND id = (SELECT MAX(id) FROM rollouts WHERE bundle = r.bundle)
                 ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<_, i64>(0)? as u64,
                    row.try_get::<_, i64>(1)? as u64,
                ))
            })
            .collect()
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
        let records = &rollout.log[log_from..];
        let (phase, version) = (rollout.phase.name(), save.version as i64);
        self.write(async |transaction| {
            let updated = execute(
                transaction,
                "UPDATE rollouts SET phase = $2, state = $3, progress = $4, updated_at = $5, version = version + 1
                 WHERE id = $1 AND version = $6",
                &[&id, &phase, &head, &progress, &save.now, &version],
            )
            .await?;
            if updated == 0 {
                return Ok(Saved::Conflict);
            }
            upsert_members(transaction, id, &members).await?;
            insert_log(transaction, id, log_from, records).await?;
            let agents = write_changes(transaction, save.changes, save.now).await?;
            Ok(Saved::Saved {
                version: version as u64 + 1,
                agents,
            })
        })
    }
}
