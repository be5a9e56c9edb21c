//! [`Store`] on SQLite: refs, renders, generations, snapshots, releases, events, agents and
//! enrolment tokens.

use std::collections::BTreeMap;

use outpost_proto::Digest;
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    SNAPSHOT_SELECT, SqliteStore, add_event, agent_exists, insert_snapshot_row, next_change,
    snapshot_from_row,
};
use crate::git::RefTarget;
use crate::store::{
    Agent, EnrolmentToken, Event, RefChange, Release, Store, StoreError, StoredSnapshot,
    TokenError, agent_id, labels_from_json, labels_to_json,
};

/// The columns [`agent_from_row`] reads, in its order (`label_set` last, for callers that want labels).
pub(super) const AGENT_COLUMNS: &str =
    "id, public_key, enrolled_at, last_seen, revoked_at, revoked_by, revoked_why";

/// An agent from a row that starts with [`AGENT_COLUMNS`]; `labels` come from elsewhere.
pub(super) fn agent_from_row(
    row: &rusqlite::Row<'_>,
    labels: BTreeMap<String, String>,
) -> rusqlite::Result<Agent> {
    let revoked_at: Option<i64> = row.get(4)?;
    Ok(Agent {
        id: row.get(0)?,
        public_key: row.get(1)?,
        labels,
        enrolled_at: row.get(2)?,
        last_seen: row.get(3)?,
        revoked: match revoked_at {
            Some(at) => Some((
                at,
                row.get::<_, Option<String>>(5)?.unwrap_or_default(),
                row.get::<_, Option<String>>(6)?.unwrap_or_default(),
            )),
            None => None,
        },
    })
}

/// Labels of the agents `filter` selects (`""` for all), by agent id, in one query.
fn labels_where(
    connection: &Connection,
    filter: &str,
    parameter: Option<&str>,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, StoreError> {
    let sql = format!("SELECT agent, key, value FROM agent_labels {filter}");
    let mut statement = connection.prepare_cached(&sql)?;
    let map = |row: &rusqlite::Row<'_>| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
        ))
    };
    let rows: Vec<(String, String, String)> = match parameter {
        Some(parameter) => statement
            .query_map([parameter], map)?
            .collect::<Result<_, _>>()?,
        None => statement.query_map([], map)?.collect::<Result<_, _>>()?,
    };
    let mut labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (agent, key, value) in rows {
        labels.entry(agent).or_default().insert(key, value);
    }
    Ok(labels)
}

/// The agents `filter` selects, with their labels.
pub(super) fn agents_where(
    connection: &Connection,
    filter: &str,
    parameter: Option<&str>,
) -> Result<Vec<Agent>, StoreError> {
    let sql = format!("SELECT {AGENT_COLUMNS} FROM agents {filter} ORDER BY id");
    let mut statement = connection.prepare_cached(&sql)?;
    let map = |row: &rusqlite::Row<'_>| agent_from_row(row, BTreeMap::new());
    let mut agents: Vec<Agent> = match parameter {
        Some(parameter) => statement
            .query_map([parameter], map)?
            .collect::<Result<_, _>>()?,
        None => statement.query_map([], map)?.collect::<Result<_, _>>()?,
    };
    let label_filter = match parameter {
        Some(_) => "WHERE agent = ?1",
        None => "",
    };
    let mut labels = labels_where(connection, label_filter, parameter)?;
    for agent in &mut agents {
        agent.labels = labels.remove(&agent.id).unwrap_or_default();
    }
    Ok(agents)
}

impl Store for SqliteStore {
    fn record_refs(
        &self,
        source: &str,
        refs: &[RefTarget],
        now: i64,
    ) -> Result<Vec<RefChange>, StoreError> {
        let (source, refs) = (source.to_owned(), refs.to_vec());
        self.write(move |connection| {
            let mut known: BTreeMap<String, String> = {
                let mut statement = connection.prepare(
                    "SELECT name, git_commit FROM refs WHERE source = ?1 AND deleted = 0",
                )?;
                let rows =
                    statement.query_map([&source], |row| Ok((row.get(0)?, row.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut changes = Vec::new();
            for target in &refs {
                match known.remove(&target.name) {
                    Some(previous) if previous == target.commit => continue,
                    Some(previous) => changes.push(RefChange::Moved {
                        target: target.clone(),
                        previous,
                    }),
                    None => changes.push(RefChange::New(target.clone())),
                }
                connection.execute(
                    "INSERT INTO refs (source, name, git_commit, deleted, updated_at) VALUES (?1, ?2, ?3, 0, ?4)
                     ON CONFLICT (source, name) DO UPDATE SET git_commit = ?3, deleted = 0, updated_at = ?4",
                    params![source, target.name, target.commit, now],
                )?;
            }
            for name in known.into_keys() {
                connection.execute(
                    "UPDATE refs SET deleted = 1, updated_at = ?3 WHERE source = ?1 AND name = ?2",
                    params![source, name, now],
                )?;
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
        self.read(|connection| {
            Ok(connection
                .prepare_cached(
                    "SELECT generation FROM renders WHERE bundle = ?1 AND tree_id = ?2 AND selector = ?3",
                )?
                .query_row(params![bundle, tree_id, selector], |row| row.get::<_, i64>(0))
                .optional()?
                .map(|generation| generation as u64))
        })
    }

    fn next_generation(&self, bundle: &str) -> Result<u64, StoreError> {
        let bundle = bundle.to_owned();
        self.write(move |connection| {
            connection.execute(
                "INSERT INTO generations (bundle, last) VALUES (?1, 1)
                 ON CONFLICT (bundle) DO UPDATE SET last = last + 1",
                [&bundle],
            )?;
            let last: i64 = connection.query_row(
                "SELECT last FROM generations WHERE bundle = ?1",
                [&bundle],
                |row| row.get(0),
            )?;
            Ok(last as u64)
        })
    }

    fn insert_snapshot(
        &self,
        snapshot: &StoredSnapshot,
        tree_id: &str,
        selector: &str,
    ) -> Result<(), StoreError> {
        let (snapshot, tree_id, selector) =
            (snapshot.clone(), tree_id.to_owned(), selector.to_owned());
        self.write(move |connection| {
            insert_snapshot_row(connection, &snapshot)?;
            connection.execute(
                "INSERT OR REPLACE INTO renders (bundle, tree_id, selector, generation) VALUES (?1, ?2, ?3, ?4)",
                params![snapshot.bundle, tree_id, selector, snapshot.generation as i64],
            )?;
            Ok(())
        })
    }

    fn insert_resigned(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let snapshot = snapshot.clone();
        self.write(move |connection| insert_snapshot_row(connection, &snapshot))
    }

    fn insert_render(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
        generation: u64,
    ) -> Result<(), StoreError> {
        let (bundle, tree_id, selector) =
            (bundle.to_owned(), tree_id.to_owned(), selector.to_owned());
        self.write(move |connection| {
            connection.execute(
                "INSERT OR REPLACE INTO renders (bundle, tree_id, selector, generation) VALUES (?1, ?2, ?3, ?4)",
                params![bundle, tree_id, selector, generation as i64],
            )?;
            Ok(())
        })
    }

    fn snapshot_by_digest(
        &self,
        bundle: &str,
        digest: &Digest,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached(&format!(
                    "{SNAPSHOT_SELECT} WHERE s.bundle = ?1 AND s.digest = ?2 ORDER BY s.generation DESC LIMIT 1"
                ))?
                .query_row(params![bundle, digest.0.as_slice()], snapshot_from_row)
                .optional()?)
        })
    }

    fn snapshot(
        &self,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached(&format!(
                    "{SNAPSHOT_SELECT} WHERE s.bundle = ?1 AND s.generation = ?2"
                ))?
                .query_row(params![bundle, generation as i64], snapshot_from_row)
                .optional()?)
        })
    }

    fn upsert_release(&self, release: &Release) -> Result<bool, StoreError> {
        let release = release.clone();
        self.write(move |connection| {
            let changed = connection.execute(
                "INSERT INTO releases (source, git_ref, bundle, git_commit, generation, error, updated_at, variant)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (source, git_ref, bundle, variant) DO UPDATE SET
                   git_commit = ?4, generation = ?5, error = ?6, updated_at = ?7
                 WHERE git_commit != ?4 OR generation IS NOT ?5 OR error IS NOT ?6",
                params![
                    release.source,
                    release.git_ref,
                    release.bundle,
                    release.git_commit,
                    release.generation.map(|g| g as i64),
                    release.error,
                    release.updated_at,
                    release.variant,
                ],
            )?;
            Ok(changed > 0)
        })
    }

    fn delete_releases(&self, source: &str, git_ref: &str) -> Result<(), StoreError> {
        let (source, git_ref) = (source.to_owned(), git_ref.to_owned());
        self.write(move |connection| {
            connection.execute(
                "DELETE FROM releases WHERE source = ?1 AND git_ref = ?2",
                params![source, git_ref],
            )?;
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
        let (source, git_ref, bundle, keep) = (
            source.to_owned(),
            git_ref.to_owned(),
            bundle.to_owned(),
            keep.to_vec(),
        );
        self.write(move |connection| {
            let existing: Vec<String> = {
                let mut statement = connection.prepare(
                    "SELECT variant FROM releases WHERE source = ?1 AND git_ref = ?2 AND bundle = ?3",
                )?;
                let rows =
                    statement.query_map(params![source, git_ref, bundle], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            for variant in existing.iter().filter(|variant| !keep.contains(variant)) {
                connection.execute(
                    "DELETE FROM releases WHERE source = ?1 AND git_ref = ?2 AND bundle = ?3 AND variant = ?4",
                    params![source, git_ref, bundle, variant],
                )?;
            }
            Ok(())
        })
    }

    fn releases(&self) -> Result<Vec<Release>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT source, git_ref, bundle, git_commit, generation, error, updated_at, variant FROM releases
                 ORDER BY source, git_ref, bundle, variant",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(Release {
                    source: row.get(0)?,
                    git_ref: row.get(1)?,
                    bundle: row.get(2)?,
                    git_commit: row.get(3)?,
                    generation: row.get::<_, Option<i64>>(4)?.map(|g| g as u64),
                    error: row.get(5)?,
                    updated_at: row.get(6)?,
                    variant: row.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn add_event(
        &self,
        at: i64,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let (kind, subject, message) = (kind.to_owned(), subject.to_owned(), message.to_owned());
        self.write(move |connection| add_event(connection, at, &kind, &subject, &message))
    }

    fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, at, kind, subject, message FROM events ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = statement.query_map([limit as i64], event_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, at, kind, subject, message FROM events WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement.query_map(
                params![after, limit.min(i64::MAX as usize) as i64],
                event_from_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn notify_cursor(&self, receiver: &str) -> Result<Option<i64>, StoreError> {
        self.read(|connection| {
            Ok(connection
                .prepare_cached("SELECT last_event FROM notify_cursors WHERE receiver = ?1")?
                .query_row([receiver], |row| row.get(0))
                .optional()?)
        })
    }

    fn set_notify_cursor(&self, receiver: &str, last_event: i64) -> Result<(), StoreError> {
        let receiver = receiver.to_owned();
        self.write(move |connection| {
            connection.execute(
                "INSERT INTO notify_cursors (receiver, last_event) VALUES (?1, ?2)
                 ON CONFLICT (receiver) DO UPDATE SET last_event = ?2",
                params![receiver, last_event],
            )?;
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
        let (token_digest, labels, created_by) =
            (*token_digest, labels_to_json(labels), created_by.to_owned());
        self.write(move |connection| {
            connection.execute(
                "INSERT INTO enrolment_tokens (digest, labels, created_at, created_by, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token_digest.0.as_slice(), labels, now, created_by, expires_at],
            )?;
            add_event(
                connection,
                now,
                "token-created",
                &token_digest.short(),
                &format!("by {created_by}, labels {labels}"),
            )
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
        let (token_digests, labels, created_by) = (
            token_digests.to_vec(),
            labels_to_json(labels),
            created_by.to_owned(),
        );
        self.write(move |connection| {
            let mut insert = connection.prepare_cached(
                "INSERT INTO enrolment_tokens (digest, labels, created_at, created_by, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for digest in &token_digests {
                insert.execute(params![digest.0.as_slice(), labels, now, created_by, expires_at])?;
            }
            add_event(
                connection,
                now,
                "tokens-created",
                &format!("{} tokens", token_digests.len()),
                &format!("by {created_by}, labels {labels}"),
            )
        })
    }

    fn tokens(&self) -> Result<Vec<EnrolmentToken>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT digest, labels, created_at, created_by, expires_at, used_at, used_by FROM enrolment_tokens ORDER BY created_at DESC, digest",
            )?;
            let rows = statement.query_map([], |row| {
                let digest: Vec<u8> = row.get(0)?;
                let used_at: Option<i64> = row.get(5)?;
                Ok(EnrolmentToken {
                    digest: hex::encode(digest),
                    labels: labels_from_json(&row.get::<_, String>(1)?),
                    created_at: row.get(2)?,
                    created_by: row.get(3)?,
                    expires_at: row.get(4)?,
                    used: match used_at {
                        Some(at) => {
                            Some((at, row.get::<_, Option<String>>(6)?.unwrap_or_default()))
                        }
                        None => None,
                    },
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn revoke_token(
        &self,
        token_digest: &Digest,
        by: &str,
        why: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (token_digest, by, why) = (*token_digest, by.to_owned(), why.to_owned());
        self.write(move |connection| {
            let revoked = connection.execute(
                "UPDATE enrolment_tokens SET expires_at = ?2
                 WHERE digest = ?1 AND used_at IS NULL AND expires_at >= ?3",
                params![token_digest.0.as_slice(), now - 1, now],
            )? > 0;
            if revoked {
                add_event(
                    connection,
                    now,
                    "token-revoked",
                    &token_digest.short(),
                    &format!("by {by}: {why}"),
                )?;
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
        let (token_digest, public_key) = (*token_digest, public_key.to_vec());
        self.write(move |connection| enrol(connection, &token_digest, &public_key, now))
    }

    fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.read(|connection| agents_where(connection, "", None))
    }

    fn agent(&self, id: &str) -> Result<Option<Agent>, StoreError> {
        self.read(|connection| {
            Ok(agents_where(connection, "WHERE id = ?1", Some(id))?
                .into_iter()
                .next())
        })
    }

    fn label_agent(
        &self,
        id: &str,
        changes: &BTreeMap<String, Option<String>>,
        who: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (id, changes, who) = (id.to_owned(), changes.clone(), who.to_owned());
        self.write(move |connection| {
            if !agent_exists(connection, &id)? {
                return Ok(false);
            }
            let mut described = Vec::new();
            for (key, value) in &changes {
                match value {
                    Some(value) => {
                        connection.execute(
                            "INSERT INTO agent_labels (agent, key, value) VALUES (?1, ?2, ?3)
                             ON CONFLICT (agent, key) DO UPDATE SET value = ?3",
                            params![id, key, value],
                        )?;
                        described.push(format!("{key}={value}"));
                    }
                    None => {
                        connection.execute(
                            "DELETE FROM agent_labels WHERE agent = ?1 AND key = ?2",
                            params![id, key],
                        )?;
                        described.push(format!("{key}-"));
                    }
                }
            }
            let labels = labels_where(connection, "WHERE agent = ?1", Some(&id))?
                .remove(&id)
                .unwrap_or_default();
            connection.execute(
                "UPDATE agents SET label_set = ?2, change_seq = ?3 WHERE id = ?1",
                params![id, labels_to_json(&labels), next_change(connection)?],
            )?;
            add_event(
                connection,
                now,
                "agent-labelled",
                &id,
                &format!("{} by {who}", described.join(",")),
            )?;
            Ok(true)
        })
    }

    fn revoke_agent(&self, id: &str, who: &str, why: &str, now: i64) -> Result<bool, StoreError> {
        let (id, who, why) = (id.to_owned(), who.to_owned(), why.to_owned());
        self.write(move |connection| {
            let changed = connection.execute(
                "UPDATE agents SET revoked_at = ?2, revoked_by = ?3, revoked_why = ?4, change_seq = ?5 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now, who, why, next_change(connection)?],
            )?;
            if changed > 0 {
                add_event(connection, now, "agent-revoked", &id, &format!("by {who}: {why}"))?;
            }
            Ok(agent_exists(connection, &id)?)
        })
    }
}

/// Uses a token once to enrol `public_key`: the token marked used, the agent created with the
/// token's labels, an event — all in the caller's transaction.
fn enrol(
    connection: &Connection,
    token_digest: &Digest,
    public_key: &[u8],
    now: i64,
) -> Result<Result<Agent, TokenError>, StoreError> {
    let id = agent_id(public_key);
    let token: Option<(String, i64, Option<String>)> = connection
        .prepare_cached(
            "SELECT labels, expires_at, used_by FROM enrolment_tokens WHERE digest = ?1",
        )?
        .query_row([token_digest.0.as_slice()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .optional()?;
    let Some((labels, expires_at, used_by)) = token else {
        return Ok(Err(TokenError::Unknown));
    };
    if let Some(used_by) = used_by {
        return Ok(Err(TokenError::Used(used_by)));
    }
    if now > expires_at {
        return Ok(Err(TokenError::Expired(expires_at)));
    }
    let existing: Option<String> = connection
        .prepare_cached("SELECT id FROM agents WHERE public_key = ?1")?
        .query_row([public_key], |row| row.get(0))
        .optional()?;
    if let Some(existing) = existing {
        return Ok(Err(TokenError::AlreadyEnrolled(existing)));
    }
    let labels = labels_from_json(&labels);
    connection.execute(
        "UPDATE enrolment_tokens SET used_at = ?2, used_by = ?3 WHERE digest = ?1",
        params![token_digest.0.as_slice(), now, id],
    )?;
    connection
        .prepare_cached(
            "INSERT INTO agents (id, public_key, enrolled_at, label_set, change_seq) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![id, public_key, now, labels_to_json(&labels), next_change(connection)?])?;
    for (key, value) in &labels {
        connection.execute(
            "INSERT INTO agent_labels (agent, key, value) VALUES (?1, ?2, ?3)",
            params![id, key, value],
        )?;
    }
    add_event(
        connection,
        now,
        "agent-enrolled",
        &id,
        &format!("token {}", token_digest.short()),
    )?;
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
pub(super) fn event_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: row.get(0)?,
        at: row.get(1)?,
        kind: row.get(2)?,
        subject: row.get(3)?,
        message: row.get(4)?,
    })
}
