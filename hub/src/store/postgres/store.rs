//! [`Store`] on PostgreSQL: refs, renders, generations, snapshots, releases, events, agents and
//! enrolment tokens.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use outpost_proto::Digest;
use tokio_postgres::Row;

use super::{
    PostgresStore, SNAPSHOT_SELECT, add_event, agent_exists, execute, insert_snapshot_row,
    next_change, one, optional, query, snapshot_from_row,
};
use crate::git::RefTarget;
use crate::store::{
    Agent, EnrolmentToken, Event, RefChange, Release, Store, StoreError, StoredSnapshot,
    TokenError, agent_id, labels_from_json, labels_to_json,
};

/// The columns [`agent_from_row`] reads, in its order.
pub(super) const AGENT_COLUMNS: &str =
    "id, public_key, enrolled_at, last_seen, revoked_at, revoked_by, revoked_why";

/// An agent from a row that starts with [`AGENT_COLUMNS`]; `labels` come from elsewhere.
pub(super) fn agent_from_row(
    row: &Row,
    labels: BTreeMap<String, String>,
) -> Result<Agent, StoreError> {
    let revoked_at: Option<i64> = row.try_get(4)?;
    Ok(Agent {
        id: row.try_get(0)?,
        public_key: row.try_get(1)?,
        labels,
        enrolled_at: row.try_get(2)?,
        last_seen: row.try_get(3)?,
        revoked: match revoked_at {
            Some(at) => Some((
                at,
                row.try_get::<_, Option<String>>(5)?.unwrap_or_default(),
                row.try_get::<_, Option<String>>(6)?.unwrap_or_default(),
            )),
            None => None,
        },
    })
}

/// The agents with these ids (all when `None`), with their labels, by id.
pub(super) async fn agents_where<C: GenericClient>(
    client: &C,
    ids: Option<&[String]>,
) -> Result<Vec<Agent>, StoreError> {
    let rows = query(
        client,
        &format!(
            "SELECT {AGENT_COLUMNS}, label_set FROM agents
             WHERE $1::text[] IS NULL OR id = ANY($1) ORDER BY id"
        ),
        &[&ids],
    )
    .await?;
    rows.iter()
        .map(|row| agent_from_row(row, labels_from_json(row.try_get(7)?)))
        .collect()
}

/// One agent's labels, from its label rows.
async fn labels_of<C: GenericClient>(
    client: &C,
    agent: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    query(
        client,
        "SELECT key, value FROM agent_labels WHERE agent = $1",
        &[&agent],
    )
    .await?
    .iter()
    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
    .collect()
}

impl Store for PostgresStore {
    fn record_refs(
        &self,
        source: &str,
        refs: &[RefTarget],
        now: i64,
    ) -> Result<Vec<RefChange>, StoreError> {
        self.write(async |transaction| {
            let mut known: BTreeMap<String, String> = query(
                transaction,
                "SELECT name, git_commit FROM refs WHERE source = $1 AND NOT deleted",
                &[&source],
            )
            .await?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, StoreError>>()?;
            let mut changes = Vec::new();
            for target in refs {
                match known.remove(&target.name) {
                    Some(previous) if previous == target.commit => continue,
                    Some(previous) => changes.push(RefChange::Moved {
                        target: target.clone(),
                        previous,
                    }),
                    None => changes.push(RefChange::New(target.clone())),
                }
                execute(
                    transaction,
                    "INSERT INTO refs (source, name, git_commit, deleted, updated_at) VALUES ($1, $2, $3, FALSE, $4)
                     ON CONFLICT (source, name) DO UPDATE SET git_commit = $3, deleted = FALSE, updated_at = $4",
                    &[&source, &target.name, &target.commit, &now],
                )
                .await?;
            }
            for name in known.into_keys() {
                execute(
                    transaction,
                    "UPDATE refs SET deleted = TRUE, updated_at = $3 WHERE source = $1 AND name = $2",
                    &[&source, &name, &now],
                )
                .await?;
                changes.push(RefChange::Deleted(name));
            }
            Ok(changes)
        })
    }

    fn rendered(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
    ) -> Result<Option<u64>, StoreError> {
        self.read(async |client| {
            optional(
                client,
                "SELECT generation FROM renders WHERE bundle = $1 AND tree_id = $2 AND selector = $3",
                &[&bundle, &tree_id, &selector],
            )
            .await?
            .map(|row| Ok(row.try_get::<_, i64>(0)? as u64))
            .transpose()
        })
    }

    fn next_generation(&self, bundle: &str) -> Result<u64, StoreError> {
        self.write(async |transaction| {
            let row = one(
                transaction,
                "INSERT INTO generations (bundle, last) VALUES ($1, 1)
                 ON CONFLICT (bundle) DO UPDATE SET last = generations.last + 1 RETURNING last",
                &[&bundle],
            )
            .await?;
            Ok(row.try_get::<_, i64>(0)? as u64)
        })
    }

    fn insert_snapshot(
        &self,
        snapshot: &StoredSnapshot,
        tree_id: &str,
        selector: &str,
    ) -> Result<(), StoreError> {
        self.write(async |transaction| {
            insert_snapshot_row(transaction, snapshot).await?;
            upsert_render(
                transaction,
                &snapshot.bundle,
                tree_id,
                selector,
                snapshot.generation,
            )
            .await
        })
    }

    fn insert_resigned(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        self.write(async |transaction| insert_snapshot_row(transaction, snapshot).await)
    }

    fn insert_render(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
        generation: u64,
    ) -> Result<(), StoreError> {
        self.write(async |transaction| {
            upsert_render(transaction, bundle, tree_id, selector, generation).await
        })
    }

    fn snapshot_by_digest(
        &self,
        bundle: &str,
        digest: &Digest,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        self.read(async |client| {
            optional(
                client,
                &format!(
                    "{SNAPSHOT_SELECT} WHERE s.bundle = $1 AND s.digest = $2 ORDER BY s.generation DESC LIMIT 1"
                ),
                &[&bundle, &digest.0.as_slice()],
            )
            .await?
            .map(|row| snapshot_from_row(&row))
            .transpose()
        })
    }

    fn snapshot(
        &self,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        self.read(async |client| {
            optional(
                client,
                &format!("{SNAPSHOT_SELECT} WHERE s.bundle = $1 AND s.generation = $2"),
                &[&bundle, &(generation as i64)],
            )
            .await?
            .map(|row| snapshot_from_row(&row))
            .transpose()
        })
    }

    fn upsert_release(&self, release: &Release) -> Result<bool, StoreError> {
        self.write(async |transaction| {
            let changed = execute(
                transaction,
                "INSERT INTO releases (source, git_ref, bundle, git_commit, generation, error, updated_at, variant)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (source, git_ref, bundle, variant) DO UPDATE SET
                   git_commit = $4, generation = $5, error = $6, updated_at = $7
                 WHERE releases.git_commit != $4 OR releases.generation IS DISTINCT FROM $5
                    OR releases.error IS DISTINCT FROM $6",
                &[
                    &release.source,
                    &release.git_ref,
                    &release.bundle,
                    &release.git_commit,
                    &release.generation.map(|g| g as i64),
                    &release.error,
                    &release.updated_at,
                    &release.variant,
                ],
            )
            .await?;
            Ok(changed > 0)
        })
    }

    fn delete_releases(&self, source: &str, git_ref: &str) -> Result<(), StoreError> {
        self.write(async |transaction| {
            execute(
                transaction,
                "DELETE FROM releases WHERE source = $1 AND git_ref = $2",
                &[&source, &git_ref],
            )
            .await?;
            Ok(())
        })
    }

    fn retain_variants(
        &self,
        source: &str,
        git_ref: &str,
        bundle: &str,
        keep: &[String],
    ) -> Result<(), StoreError> {
        self.write(async |transaction| {
            execute(
                transaction,
                "DELETE FROM releases WHERE source = $1 AND git_ref = $2 AND bundle = $3
                 AND NOT (variant = ANY($4))",
                &[&source, &git_ref, &bundle, &keep],
            )
            .await?;
            Ok(())
        })
    }

    fn releases(&self) -> Result<Vec<Release>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT source, git_ref, bundle, git_commit, generation, error, updated_at, variant FROM releases
                 ORDER BY source, git_ref, bundle, variant",
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(Release {
                    source: row.try_get(0)?,
                    git_ref: row.try_get(1)?,
                    bundle: row.try_get(2)?,
                    git_commit: row.try_get(3)?,
                    generation: row.try_get::<_, Option<i64>>(4)?.map(|g| g as u64),
                    error: row.try_get(5)?,
                    updated_at: row.try_get(6)?,
                    variant: row.try_get(7)?,
                })
            })
            .collect()
        })
    }

    fn add_event(
        &self,
        at: i64,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.write(async |transaction| add_event(transaction, at, kind, subject, message).await)
    }

    fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT id, at, kind, subject, message FROM events ORDER BY id DESC LIMIT $1",
                &[&(limit.min(i64::MAX as usize) as i64)],
            )
            .await?
            .iter()
            .map(event_from)
            .collect()
        })
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(async |client| {
            query(
                client,
                "SELECT id, at, kind, subject, message FROM events WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )
            .await?
            .iter()
            .map(event_from)
            .collect()
        })
    }

    fn notify_cursor(&self, receiver: &str) -> Result<Option<i64>, StoreError> {
        self.read(async |client| {
            let rows = query(
                client,
                "SELECT last_event FROM notify_cursors WHERE receiver = $1",
                &[&receiver],
            )
            .await?;
            match rows.first() {
                Some(row) => Ok(Some(row.try_get(0)?)),
                None => Ok(None),
            }
        })
    }

    fn set_notify_cursor(&self, receiver: &str, last_event: i64) -> Result<(), StoreError> {
        let receiver = receiver.to_owned();
        self.write(async move |transaction| {
            transaction
                .execute(
                    "INSERT INTO notify_cursors (receiver, last_event) VALUES ($1, $2)
                     ON CONFLICT (receiver) DO UPDATE SET last_event = $2",
                    &[&receiver, &last_event],
                )
                .await?;
            Ok(())
        })
    }

    fn create_token(
        &self,
        token_digest: &Digest,
        labels: &BTreeMap<String, String>,
        created_by: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let labels = labels_to_json(labels);
        self.write(async |transaction| {
            execute(
                transaction,
                "INSERT INTO enrolment_tokens (digest, labels, created_at, created_by, expires_at) VALUES ($1, $2, $3, $4, $5)",
                &[&token_digest.0.as_slice(), &labels, &now, &created_by, &expires_at],
            )
            .await?;
            add_event(
                transaction,
                now,
                "token-created",
                &token_digest.short(),
                &format!("by {created_by}, labels {labels}"),
            )
            .await
        })
    }

    fn create_tokens(
        &self,
        token_digests: &[Digest],
        labels: &BTreeMap<String, String>,
        created_by: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let labels = labels_to_json(labels);
        let digests: Vec<&[u8]> = token_digests.iter().map(|d| d.0.as_slice()).collect();
        self.write(async |transaction| {
            execute(
                transaction,
                "INSERT INTO enrolment_tokens (digest, labels, created_at, created_by, expires_at)
                 SELECT d, $2, $3, $4, $5 FROM unnest($1::bytea[]) AS d",
                &[&digests, &labels, &now, &created_by, &expires_at],
            )
            .await?;
            add_event(
                transaction,
                now,
                "tokens-created",
                &format!("{} tokens", token_digests.len()),
                &format!("by {created_by}, labels {labels}"),
            )
            .await
        })
    }

    fn tokens(&self) -> Result<Vec<EnrolmentToken>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT digest, labels, created_at, created_by, expires_at, used_at, used_by
                 FROM enrolment_tokens ORDER BY created_at DESC, digest",
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                let used_at: Option<i64> = row.try_get(5)?;
                Ok(EnrolmentToken {
                    digest: hex::encode(row.try_get::<_, &[u8]>(0)?),
                    labels: labels_from_json(row.try_get(1)?),
                    created_at: row.try_get(2)?,
                    created_by: row.try_get(3)?,
                    expires_at: row.try_get(4)?,
                    used: match used_at {
                        Some(at) => {
                            Some((at, row.try_get::<_, Option<String>>(6)?.unwrap_or_default()))
                        }
                        None => None,
                    },
                })
            })
            .collect()
        })
    }

    fn revoke_token(
        &self,
        token_digest: &Digest,
        by: &str,
        why: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(async |transaction| {
            let revoked = execute(
                transaction,
                "UPDATE enrolment_tokens SET expires_at = $2
                 WHERE digest = $1 AND used_at IS NULL AND expires_at >= $3",
                &[&token_digest.0.as_slice(), &(now - 1), &now],
            )
            .await?
                > 0;
            if revoked {
                add_event(
                    transaction,
                    now,
                    "token-revoked",
                    &token_digest.short(),
                    &format!("by {by}: {why}"),
                )
                .await?;
            }
            Ok(revoked)
        })
    }

    fn enrol(
        &self,
        token_digest: &Digest,
        public_key: &[u8],
        now: i64,
    ) -> Result<Result<Agent, TokenError>, StoreError> {
        self.write(async |transaction| enrol(transaction, token_digest, public_key, now).await)
    }

    fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.read(async |client| agents_where(client, None).await)
    }

    fn agent(&self, id: &str) -> Result<Option<Agent>, StoreError> {
        let ids = [id.to_owned()];
        self.read(async |client| Ok(agents_where(client, Some(&ids)).await?.into_iter().next()))
    }

    fn label_agent(
        &self,
        id: &str,
        changes: &BTreeMap<String, Option<String>>,
        who: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.write(async |transaction| {
            if !agent_exists(transaction, id).await? {
                return Ok(false);
            }
            let mut described = Vec::new();
            for (key, value) in changes {
                match value {
                    Some(value) => {
                        execute(
                            transaction,
                            "INSERT INTO agent_labels (agent, key, value) VALUES ($1, $2, $3)
                             ON CONFLICT (agent, key) DO UPDATE SET value = $3",
                            &[&id, key, value],
                        )
                        .await?;
                        described.push(format!("{key}={value}"));
                    }
                    None => {
                        execute(
                            transaction,
                            "DELETE FROM agent_labels WHERE agent = $1 AND key = $2",
                            &[&id, key],
                        )
                        .await?;
                        described.push(format!("{key}-"));
                    }
                }
            }
            let labels = labels_of(transaction, id).await?;
            let change = next_change(transaction).await?;
            execute(
                transaction,
                "UPDATE agents SET label_set = $2, change_seq = $3 WHERE id = $1",
                &[&id, &labels_to_json(&labels), &change],
            )
            .await?;
            add_event(
                transaction,
                now,
                "agent-labelled",
                id,
                &format!("{} by {who}", described.join(",")),
            )
            .await?;
            Ok(true)
        })
    }

    fn revoke_agent(&self, id: &str, who: &str, why: &str, now: i64) -> Result<bool, StoreError> {
        self.write(async |transaction| {
            if !agent_exists(transaction, id).await? {
                return Ok(false);
            }
            let change = next_change(transaction).await?;
            let changed = execute(
                transaction,
                "UPDATE agents SET revoked_at = $2, revoked_by = $3, revoked_why = $4, change_seq = $5
                 WHERE id = $1 AND revoked_at IS NULL",
                &[&id, &now, &who, &why, &change],
            )
            .await?;
            if changed > 0 {
                add_event(transaction, now, "agent-revoked", id, &format!("by {who}: {why}"))
                    .await?;
            }
            Ok(true)
        })
    }
}

async fn upsert_render<C: GenericClient>(
    client: &C,
    bundle: &str,
    tree_id: &str,
    selector: &str,
    generation: u64,
) -> Result<(), StoreError> {
    execute(
        client,
        "INSERT INTO renders (bundle, tree_id, selector, generation) VALUES ($1, $2, $3, $4)
         ON CONFLICT (bundle, tree_id, selector) DO UPDATE SET generation = $4",
        &[&bundle, &tree_id, &selector, &(generation as i64)],
    )
    .await?;
    Ok(())
}

/// Uses a token once to enrol `public_key`: the token marked used, the agent created with the
/// token's labels, an event — all in the caller's transaction.
async fn enrol<C: GenericClient>(
    client: &C,
    token_digest: &Digest,
    public_key: &[u8],
    now: i64,
) -> Result<Result<Agent, TokenError>, StoreError> {
    let id = agent_id(public_key);
    let token = optional(
        client,
        "SELECT labels, expires_at, used_by FROM enrolment_tokens WHERE digest = $1",
        &[&token_digest.0.as_slice()],
    )
    .await?;
    let Some(token) = token else {
        return Ok(Err(TokenError::Unknown));
    };
    let (labels, expires_at, used_by): (String, i64, Option<String>) =
        (token.try_get(0)?, token.try_get(1)?, token.try_get(2)?);
    if let Some(used_by) = used_by {
        return Ok(Err(TokenError::Used(used_by)));
    }
    if now > expires_at {
        return Ok(Err(TokenError::Expired(expires_at)));
    }
    let existing = optional(
        client,
        "SELECT id FROM agents WHERE public_key = $1",
        &[&public_key],
    )
    .await?;
    if let Some(existing) = existing {
        return Ok(Err(TokenError::AlreadyEnrolled(existing.try_get(0)?)));
    }
    let labels = labels_from_json(&labels);
    execute(
        client,
        "UPDATE enrolment_tokens SET used_at = $2, used_by = $3 WHERE digest = $1",
        &[&token_digest.0.as_slice(), &now, &id],
    )
    .await?;
    let change = next_change(client).await?;
    execute(
        client,
        "INSERT INTO agents (id, public_key, enrolled_at, label_set, change_seq) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &public_key, &now, &labels_to_json(&labels), &change],
    )
    .await?;
    let (keys, values): (Vec<&String>, Vec<&String>) = labels.iter().unzip();
    execute(
        client,
        "INSERT INTO agent_labels (agent, key, value) SELECT $1, k, v FROM unnest($2::text[], $3::text[]) AS l (k, v)",
        &[&id, &keys, &values],
    )
    .await?;
    add_event(
        client,
        now,
        "agent-enrolled",
        &id,
        &format!("token {}", token_digest.short()),
    )
    .await?;
    Ok(Ok(Agent {
        id,
        public_key: public_key.to_vec(),
        labels,
        enrolled_at: now,
        last_seen: None,
        revoked: None,
    }))
}

/// An `events` row (id, at, kind, subject, message).
pub(super) fn event_from(row: &tokio_postgres::Row) -> Result<Event, StoreError> {
    Ok(Event {
        id: row.try_get(0)?,
        at: row.try_get(1)?,
        kind: row.try_get(2)?,
        subject: row.try_get(3)?,
        message: row.try_get(4)?,
    })
}
