//! The hub's store: snapshots, refs seen, releases (a bundle at a ref), generation counters,
//! and an event log. SQLite in WAL mode with `synchronous=FULL`, versioned migrations, every
//! change one transaction, so a crash at any point loses nothing that was committed.
//!
//! [`Store`] is the seam for a second (PostgreSQL) backend: the hub's logic talks to the trait.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_proto::Digest;
use rusqlite::{Connection, OptionalExtension, params};

use crate::git::RefTarget;

/// Schema migrations, applied in order; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    // 1: source side.
    "CREATE TABLE snapshots (
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        digest BLOB NOT NULL,
        git_commit TEXT NOT NULL,
        git_ref TEXT NOT NULL,
        header BLOB NOT NULL,
        signature BLOB NOT NULL,
        body BLOB NOT NULL,
        object_count INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (bundle, generation)
    );
    CREATE INDEX snapshots_by_digest ON snapshots (digest);
    CREATE TABLE generations (bundle TEXT PRIMARY KEY, last INTEGER NOT NULL);
    CREATE TABLE renders (
        bundle TEXT NOT NULL,
        tree_id TEXT NOT NULL,
        selector TEXT NOT NULL,
        generation INTEGER NOT NULL,
        PRIMARY KEY (bundle, tree_id, selector)
    );
    CREATE TABLE refs (
        source TEXT NOT NULL,
        name TEXT NOT NULL,
        git_commit TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, name)
    );
    CREATE TABLE releases (
        source TEXT NOT NULL,
        git_ref TEXT NOT NULL,
        bundle TEXT NOT NULL,
        git_commit TEXT NOT NULL,
        generation INTEGER,
        error TEXT,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, git_ref, bundle)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        message TEXT NOT NULL
    );",
    // 2: agents, their labels, enrolment tokens.
    "CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        public_key BLOB NOT NULL UNIQUE,
        enrolled_at INTEGER NOT NULL,
        last_seen INTEGER,
        revoked_at INTEGER,
        revoked_by TEXT,
        revoked_why TEXT
    );
    CREATE TABLE agent_labels (
        agent TEXT NOT NULL REFERENCES agents (id),
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (agent, key)
    );
    CREATE TABLE enrolment_tokens (
        digest BLOB PRIMARY KEY,
        labels TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER,
        used_by TEXT
    );",
    // 3: a release per render variant (overlays and substituted labels).
    "CREATE TABLE releases_v3 (
        source TEXT NOT NULL,
        git_ref TEXT NOT NULL,
        bundle TEXT NOT NULL,
        variant TEXT NOT NULL,
        git_commit TEXT NOT NULL,
        generation INTEGER,
        error TEXT,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (source, git_ref, bundle, variant)
    );
    INSERT INTO releases_v3 SELECT source, git_ref, bundle, '', git_commit, generation, error, updated_at FROM releases;
    DROP TABLE releases;
    ALTER TABLE releases_v3 RENAME TO releases;",
    // 4: serving agents: assignments, the status they report, what they run.
    "ALTER TABLE agents ADD COLUMN agent_version TEXT;
    ALTER TABLE agents ADD COLUMN assignment_sequence INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN status_sequence INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE assignments (
        agent TEXT NOT NULL REFERENCES agents (id),
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        digest BLOB NOT NULL,
        origin TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (agent, bundle)
    );
    CREATE TABLE bundle_status (
        agent TEXT NOT NULL REFERENCES agents (id),
        bundle TEXT NOT NULL,
        digest BLOB NOT NULL,
        generation INTEGER NOT NULL,
        phase TEXT NOT NULL,
        objects_total INTEGER NOT NULL,
        objects_ready INTEGER NOT NULL,
        message TEXT NOT NULL,
        observed_at INTEGER NOT NULL,
        stale INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (agent, bundle)
    );
    CREATE TABLE status_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent TEXT NOT NULL,
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        phase TEXT NOT NULL,
        message TEXT NOT NULL,
        observed_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL
    );",
    // 5: rollouts: the state machine of each, stored whole after every step.
    "CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        bundle TEXT NOT NULL,
        phase TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX rollouts_by_bundle ON rollouts (bundle, id);",
    // 6: operators' API tokens (hashes only), and the snapshots each agent was assigned lately
    // (the only delta bases the hub compresses against for it).
    "CREATE TABLE admin_tokens (
        name TEXT PRIMARY KEY,
        digest BLOB NOT NULL UNIQUE,
        role TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER,
        revoked_by TEXT,
        last_used_at INTEGER
    );
    CREATE TABLE assignment_bases (
        agent TEXT NOT NULL,
        bundle TEXT NOT NULL,
        digest BLOB NOT NULL,
        assigned_at INTEGER NOT NULL,
        PRIMARY KEY (agent, bundle, digest)
    );
    INSERT OR IGNORE INTO assignment_bases (agent, bundle, digest, assigned_at)
        SELECT agent, bundle, digest, updated_at FROM assignments;",
];

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Id: the first 16 hex digits of the SHA-256 of its public key.
    pub id: String,
    /// Its ed25519 public key.
    pub public_key: Vec<u8>,
    /// Labels, as set at enrolment or by operators.
    pub labels: BTreeMap<String, String>,
    /// When it enrolled.
    pub enrolled_at: i64,
    /// When it last connected.
    pub last_seen: Option<i64>,
    /// When, by whom and why it was revoked.
    pub revoked: Option<(i64, String, String)>,
}

/// An enrolment token as listed (the secret itself is shown only once, at creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentToken {
    /// SHA-256 of the token, hex: its handle.
    pub digest: String,
    /// Labels the enrolling agent gets.
    pub labels: BTreeMap<String, String>,
    /// Created when and by whom.
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// Unusable after this.
    pub expires_at: i64,
    /// Used when and by which agent.
    pub used: Option<(i64, String)>,
}

/// Why an enrolment token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No such token.
    #[error("unknown enrolment token; ask the operator for a new one (outpost-hub tokens create)")]
    Unknown,
    /// Already used.
    #[error("enrolment token was already used by agent {0}; tokens are single-use")]
    Used(String),
    /// Expired.
    #[error("enrolment token expired at {0}; ask the operator for a new one")]
    Expired(i64),
    /// The key is already enrolled.
    #[error("this key is already enrolled as agent {0}")]
    AlreadyEnrolled(String),
}

/// A snapshot as stored: signed header, signature, canonical body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// Bundle name.
    pub bundle: String,
    /// Generation.
    pub generation: u64,
    /// Body digest.
    pub digest: Digest,
    /// Git commit.
    pub git_commit: String,
    /// Ref it was first rendered for.
    pub git_ref: String,
    /// Signed header bytes.
    pub header: Vec<u8>,
    /// Signature.
    pub signature: Vec<u8>,
    /// Canonical body.
    pub body: Vec<u8>,
    /// Objects in the body.
    pub object_count: u64,
    /// When it was rendered.
    pub created_at: i64,
}

/// A bundle at a ref: rendered to a generation, or refused with an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Source URL.
    pub source: String,
    /// Full ref name.
    pub git_ref: String,
    /// Bundle name.
    pub bundle: String,
    /// The render variant's key (empty for the plain bundle; see `variants`).
    pub variant: String,
    /// Commit the ref named.
    pub git_commit: String,
    /// The snapshot's generation, when it rendered.
    pub generation: Option<u64>,
    /// Why it did not render.
    pub error: Option<String>,
    /// Last change.
    pub updated_at: i64,
}

/// How a ref changed since the last look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefChange {
    /// Seen for the first time.
    New(RefTarget),
    /// Now names another commit (a branch moved, or a tag was force-moved).
    Moved {
        /// The ref now.
        target: RefTarget,
        /// The commit it named before.
        previous: String,
    },
    /// No longer on the remote.
    Deleted(String),
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Sequence number.
    pub id: i64,
    /// When (Unix seconds).
    pub at: i64,
    /// Kind, e.g. `fetch-failed`, `tag-moved`.
    pub kind: String,
    /// What it concerns (a source, ref or bundle).
    pub subject: String,
    /// Details.
    pub message: String,
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (disk full, corrupt file, locked).
    #[error("hub store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored record does not decode (written by a broken or newer hub).
    #[error("hub store: a stored record does not decode: {0}")]
    Corrupt(String),
    /// The store's file could not be created or protected.
    #[error("hub store: {path}: {error}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// The file was written by a newer hub.
    #[error(
        "hub store schema version {found} is newer than this hub understands ({known}); run a newer hub"
    )]
    TooNew {
        /// In the file.
        found: usize,
        /// Known here.
        known: usize,
    },
}

/// What the hub needs to keep. Implemented by SQLite today.
pub trait Store {
    /// Records the refs of `source` as fetched now; returns what changed since the last call.
    fn record_refs(
        &mut self,
        source: &str,
        refs: &[RefTarget],
        now: i64,
    ) -> Result<Vec<RefChange>, StoreError>;
    /// The generation already rendered for this bundle tree and selector, if any.
    fn rendered(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
    ) -> Result<Option<u64>, StoreError>;
    /// Reserves the next generation of `bundle` (never handed out twice).
    fn next_generation(&mut self, bundle: &str) -> Result<u64, StoreError>;
    /// Stores a snapshot and the render that produced it, in one transaction.
    fn insert_snapshot(
        &mut self,
        snapshot: &StoredSnapshot,
        tree_id: &str,
        selector: &str,
    ) -> Result<(), StoreError>;
    /// Stores a snapshot signed again under a new generation (a rollout giving an agent an
    /// older body); no render is recorded for it.
    fn insert_resigned(&mut self, snapshot: &StoredSnapshot) -> Result<(), StoreError>;
    /// Remembers an existing generation as the render of a tree (same body as before).
    fn insert_render(
        &mut self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
        generation: u64,
    ) -> Result<(), StoreError>;
    /// The newest snapshot of `bundle` with this body digest.
    fn snapshot_by_digest(
        &self,
        bundle: &str,
        digest: &Digest,
    ) -> Result<Option<StoredSnapshot>, StoreError>;
    /// A snapshot by bundle and generation.
    fn snapshot(&self, bundle: &str, generation: u64)
    -> Result<Option<StoredSnapshot>, StoreError>;
    /// Sets the outcome of a release.
    fn upsert_release(&mut self, release: &Release) -> Result<(), StoreError>;
    /// Removes the releases of a deleted ref (its snapshots stay).
    fn delete_releases(&mut self, source: &str, git_ref: &str) -> Result<(), StoreError>;
    /// Removes a bundle's releases at a ref whose variants are no longer needed.
    fn retain_variants(
        &mut self,
        source: &str,
        git_ref: &str,
        bundle: &str,
        keep: &[String],
    ) -> Result<(), StoreError>;
    /// All releases, by source, ref and bundle.
    fn releases(&self) -> Result<Vec<Release>, StoreError>;
    /// Appends to the event log.
    fn add_event(
        &mut self,
        at: i64,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), StoreError>;
    /// The newest `limit` events, newest first.
    fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// Stores a new enrolment token (by its digest) granting `labels`.
    fn create_token(
        &mut self,
        token_digest: &Digest,
        labels: &BTreeMap<String, String>,
        created_by: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// Enrolment tokens, newest first.
    fn tokens(&self) -> Result<Vec<EnrolmentToken>, StoreError>;
    /// Uses a token once to enrol `public_key`, in one transaction: the token is marked used and
    /// the agent created with the token's labels. A second use fails.
    fn enrol(
        &mut self,
        token_digest: &Digest,
        public_key: &[u8],
        now: i64,
    ) -> Result<Result<Agent, TokenError>, StoreError>;
    /// All agents, by id.
    fn agents(&self) -> Result<Vec<Agent>, StoreError>;
    /// One agent by id.
    fn agent(&self, id: &str) -> Result<Option<Agent>, StoreError>;
    /// Sets (`Some`) or removes (`None`) labels of an agent; returns false if there is no such agent.
    fn label_agent(
        &mut self,
        id: &str,
        changes: &BTreeMap<String, Option<String>>,
        who: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Revokes an agent; returns false if there is no such agent.
    fn revoke_agent(
        &mut self,
        id: &str,
        who: &str,
        why: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
}

/// The SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    connection: Connection,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and migrates it to the current schema.
    /// The file, its WAL and its shared-memory file are made readable by the owner only,
    /// whatever the umask (SQLite gives the WAL and SHM files the database file's mode).
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let private = |path: &Path| {
            crate::files::make_private(path).map_err(|error| StoreError::Io {
                path: path.to_owned(),
                error,
            })
        };
        crate::files::create_private(path).map_err(|error| StoreError::Io {
            path: path.to_owned(),
            error,
        })?;
        let connection = Connection::open(path)?;
        // First, so that opening beside a running hub (the CLI's local commands) waits for
        // its transactions instead of failing.
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = SqliteStore { connection };
        store.migrate()?;
        for suffix in ["-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let side = std::path::PathBuf::from(name);
            if side.exists() {
                private(&side)?;
            }
        }
        Ok(store)
    }

    /// The schema version after migration.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let version: i64 = self
            .connection
            .pragma_query_value(None, "user_version", |row| row.get(0))?;
        Ok(version as usize)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        if found > MIGRATIONS.len() {
            return Err(StoreError::TooNew {
                found,
                known: MIGRATIONS.len(),
            });
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(found) {
            let transaction = self.connection.transaction()?;
            transaction.execute_batch(sql)?;
            transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
            transaction.commit()?;
        }
        Ok(())
    }
}

const SNAPSHOT_COLUMNS: &str = "bundle, generation, digest, git_commit, git_ref, header, signature, body, object_count, created_at";

fn insert_snapshot_row(
    connection: &Connection,
    snapshot: &StoredSnapshot,
) -> Result<(), StoreError> {
    connection.execute(
        &format!("INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
        params![
            snapshot.bundle,
            snapshot.generation as i64,
            snapshot.digest.0.as_slice(),
            snapshot.git_commit,
            snapshot.git_ref,
            snapshot.header,
            snapshot.signature,
            snapshot.body,
            snapshot.object_count as i64,
            snapshot.created_at,
        ],
    )?;
    Ok(())
}

/// Reads a 32-byte digest column; another length is a conversion error, never a made-up digest.
fn digest_at(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Digest> {
    let bytes: Vec<u8> = row.get(index)?;
    Digest::from_slice(&bytes).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Blob,
            "digest is not 32 bytes".into(),
        )
    })
}

fn snapshot_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredSnapshot> {
    Ok(StoredSnapshot {
        bundle: row.get(0)?,
        generation: row.get::<_, i64>(1)? as u64,
        digest: digest_at(row, 2)?,
        git_commit: row.get(3)?,
        git_ref: row.get(4)?,
        header: row.get(5)?,
        signature: row.get(6)?,
        body: row.get(7)?,
        object_count: row.get::<_, i64>(8)? as u64,
        created_at: row.get(9)?,
    })
}

fn agent_exists(connection: &Connection, id: &str) -> rusqlite::Result<bool> {
    connection
        .query_row("SELECT 1 FROM agents WHERE id = ?1", [id], |_| Ok(()))
        .optional()
        .map(|row| row.is_some())
}

/// An agent's id from its public key: 16 hex digits of its SHA-256.
pub fn agent_id(public_key: &[u8]) -> String {
    Digest::of(public_key).to_hex()[..16].to_owned()
}

fn labels_to_json(labels: &BTreeMap<String, String>) -> String {
    let map: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn labels_from_json(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str::<BTreeMap<String, String>>(text).unwrap_or_default()
}

impl SqliteStore {
    /// Labels of the agents `filter` selects (`""` for all), by agent id, in one query.
    fn labels_where(
        &self,
        filter: &str,
        parameter: Option<&str>,
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, StoreError> {
        let sql = format!("SELECT agent, key, value FROM agent_labels {filter}");
        let mut statement = self.connection.prepare(&sql)?;
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

    fn agents_where(
        &self,
        filter: &str,
        parameter: Option<&str>,
    ) -> Result<Vec<Agent>, StoreError> {
        let sql = format!(
            "SELECT id, public_key, enrolled_at, last_seen, revoked_at, revoked_by, revoked_why FROM agents {filter} ORDER BY id"
        );
        let mut statement = self.connection.prepare(&sql)?;
        let map = |row: &rusqlite::Row<'_>| {
            let revoked_at: Option<i64> = row.get(4)?;
            Ok(Agent {
                id: row.get(0)?,
                public_key: row.get(1)?,
                labels: BTreeMap::new(),
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
        };
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
        let mut labels = self.labels_where(label_filter, parameter)?;
        for agent in &mut agents {
            agent.labels = labels.remove(&agent.id).unwrap_or_default();
        }
        Ok(agents)
    }
}

impl Store for SqliteStore {
    fn record_refs(
        &mut self,
        source: &str,
        refs: &[RefTarget],
        now: i64,
    ) -> Result<Vec<RefChange>, StoreError> {
        let transaction = self.connection.transaction()?;
        let mut known: std::collections::BTreeMap<String, String> = {
            let mut statement = transaction
                .prepare("SELECT name, git_commit FROM refs WHERE source = ?1 AND deleted = 0")?;
            let rows = statement.query_map([source], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
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
            transaction.execute(
                "INSERT INTO refs (source, name, git_commit, deleted, updated_at) VALUES (?1, ?2, ?3, 0, ?4)
                 ON CONFLICT (source, name) DO UPDATE SET git_commit = ?3, deleted = 0, updated_at = ?4",
                params![source, target.name, target.commit, now],
            )?;
        }
        for name in known.into_keys() {
            transaction.execute(
                "UPDATE refs SET deleted = 1, updated_at = ?3 WHERE source = ?1 AND name = ?2",
                params![source, name, now],
            )?;
            changes.push(RefChange::Deleted(name));
        }
        transaction.commit()?;
        Ok(changes)
    }

    fn rendered(
        &self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .connection
            .query_row(
                "SELECT generation FROM renders WHERE bundle = ?1 AND tree_id = ?2 AND selector = ?3",
                params![bundle, tree_id, selector],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
            .map(|generation| generation as u64))
    }

    fn next_generation(&mut self, bundle: &str) -> Result<u64, StoreError> {
        let transaction = self.connection.transaction()?;
        transaction.execute(
            "INSERT INTO generations (bundle, last) VALUES (?1, 1)
             ON CONFLICT (bundle) DO UPDATE SET last = last + 1",
            [bundle],
        )?;
        let last: i64 = transaction.query_row(
            "SELECT last FROM generations WHERE bundle = ?1",
            [bundle],
            |row| row.get(0),
        )?;
        transaction.commit()?;
        Ok(last as u64)
    }

    fn insert_snapshot(
        &mut self,
        snapshot: &StoredSnapshot,
        tree_id: &str,
        selector: &str,
    ) -> Result<(), StoreError> {
        let transaction = self.connection.transaction()?;
        insert_snapshot_row(&transaction, snapshot)?;
        transaction.execute(
            "INSERT OR REPLACE INTO renders (bundle, tree_id, selector, generation) VALUES (?1, ?2, ?3, ?4)",
            params![snapshot.bundle, tree_id, selector, snapshot.generation as i64],
        )?;
        transaction.commit()?;
        Ok(())
    }

    fn insert_resigned(&mut self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        insert_snapshot_row(&self.connection, snapshot)
    }

    fn insert_render(
        &mut self,
        bundle: &str,
        tree_id: &str,
        selector: &str,
        generation: u64,
    ) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT OR REPLACE INTO renders (bundle, tree_id, selector, generation) VALUES (?1, ?2, ?3, ?4)",
            params![bundle, tree_id, selector, generation as i64],
        )?;
        Ok(())
    }

    fn snapshot_by_digest(
        &self,
        bundle: &str,
        digest: &Digest,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        Ok(self
            .connection
            .query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE bundle = ?1 AND digest = ?2 ORDER BY generation DESC LIMIT 1"),
                params![bundle, digest.0.as_slice()],
                snapshot_from_row,
            )
            .optional()?)
    }

    fn snapshot(
        &self,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        Ok(self
            .connection
            .query_row(
                &format!(
                    "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE bundle = ?1 AND generation = ?2"
                ),
                params![bundle, generation as i64],
                snapshot_from_row,
            )
            .optional()?)
    }

    fn upsert_release(&mut self, release: &Release) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO releases (source, git_ref, bundle, git_commit, generation, error, updated_at, variant)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (source, git_ref, bundle, variant) DO UPDATE SET
               git_commit = ?4, generation = ?5, error = ?6, updated_at = ?7",
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
        Ok(())
    }

    fn delete_releases(&mut self, source: &str, git_ref: &str) -> Result<(), StoreError> {
        self.connection.execute(
            "DELETE FROM releases WHERE source = ?1 AND git_ref = ?2",
            params![source, git_ref],
        )?;
        Ok(())
    }

    fn retain_variants(
        &mut self,
        source: &str,
        git_ref: &str,
        bundle: &str,
        keep: &[String],
    ) -> Result<(), StoreError> {
        let transaction = self.connection.transaction()?;
        let existing: Vec<String> = {
            let mut statement = transaction.prepare(
                "SELECT variant FROM releases WHERE source = ?1 AND git_ref = ?2 AND bundle = ?3",
            )?;
            let rows = statement.query_map(params![source, git_ref, bundle], |row| row.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for variant in existing.iter().filter(|variant| !keep.contains(variant)) {
            transaction.execute(
                "DELETE FROM releases WHERE source = ?1 AND git_ref = ?2 AND bundle = ?3 AND variant = ?4",
                params![source, git_ref, bundle, variant],
            )?;
        }
        transaction.commit()?;
        Ok(())
    }

    fn releases(&self) -> Result<Vec<Release>, StoreError> {
        let mut statement = self.connection.prepare(
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
    }

    fn add_event(
        &mut self,
        at: i64,
        kind: &str,
        subject: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO events (at, kind, subject, message) VALUES (?1, ?2, ?3, ?4)",
            params![at, kind, subject, message],
        )?;
        Ok(())
    }

    fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT id, at, kind, subject, message FROM events ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map([limit as i64], |row| {
            Ok(Event {
                id: row.get(0)?,
                at: row.get(1)?,
                kind: row.get(2)?,
                subject: row.get(3)?,
                message: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_token(
        &mut self,
        token_digest: &Digest,
        labels: &BTreeMap<String, String>,
        created_by: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.connection.execute(
            "INSERT INTO enrolment_tokens (digest, labels, created_at, created_by, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token_digest.0.as_slice(), labels_to_json(labels), now, created_by, expires_at],
        )?;
        self.add_event(
            now,
            "token-created",
            &token_digest.short(),
            &format!("by {created_by}, labels {}", labels_to_json(labels)),
        )
    }

    fn tokens(&self) -> Result<Vec<EnrolmentToken>, StoreError> {
        let mut statement = self.connection.prepare(
            "SELECT digest, labels, created_at, created_by, expires_at, used_at, used_by FROM enrolment_tokens ORDER BY created_at DESC",
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
                    Some(at) => Some((at, row.get::<_, Option<String>>(6)?.unwrap_or_default())),
                    None => None,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn enrol(
        &mut self,
        token_digest: &Digest,
        public_key: &[u8],
        now: i64,
    ) -> Result<Result<Agent, TokenError>, StoreError> {
        let id = agent_id(public_key);
        let transaction = self.connection.transaction()?;
        let token: Option<(String, i64, Option<String>)> = transaction
            .query_row(
                "SELECT labels, expires_at, used_by FROM enrolment_tokens WHERE digest = ?1",
                [token_digest.0.as_slice()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
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
        let existing: Option<String> = transaction
            .query_row(
                "SELECT id FROM agents WHERE public_key = ?1",
                [public_key],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(existing) = existing {
            return Ok(Err(TokenError::AlreadyEnrolled(existing)));
        }
        let labels = labels_from_json(&labels);
        transaction.execute(
            "UPDATE enrolment_tokens SET used_at = ?2, used_by = ?3 WHERE digest = ?1",
            params![token_digest.0.as_slice(), now, id],
        )?;
        transaction.execute(
            "INSERT INTO agents (id, public_key, enrolled_at) VALUES (?1, ?2, ?3)",
            params![id, public_key, now],
        )?;
        for (key, value) in &labels {
            transaction.execute(
                "INSERT INTO agent_labels (agent, key, value) VALUES (?1, ?2, ?3)",
                params![id, key, value],
            )?;
        }
        transaction.execute(
            "INSERT INTO events (at, kind, subject, message) VALUES (?1, 'agent-enrolled', ?2, ?3)",
            params![now, id, format!("token {}", token_digest.short())],
        )?;
        transaction.commit()?;
        Ok(Ok(Agent {
            id,
            public_key: public_key.to_vec(),
            labels,
            enrolled_at: now,
            last_seen: None,
            revoked: None,
        }))
    }

    fn agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.agents_where("", None)
    }

    fn agent(&self, id: &str) -> Result<Option<Agent>, StoreError> {
        Ok(self
            .agents_where("WHERE id = ?1", Some(id))?
            .into_iter()
            .next())
    }

    fn label_agent(
        &mut self,
        id: &str,
        changes: &BTreeMap<String, Option<String>>,
        who: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let transaction = self.connection.transaction()?;
        let exists = agent_exists(&transaction, id)?;
        if !exists {
            return Ok(false);
        }
        let mut described = Vec::new();
        for (key, value) in changes {
            match value {
                Some(value) => {
                    transaction.execute(
                        "INSERT INTO agent_labels (agent, key, value) VALUES (?1, ?2, ?3)
                         ON CONFLICT (agent, key) DO UPDATE SET value = ?3",
                        params![id, key, value],
                    )?;
                    described.push(format!("{key}={value}"));
                }
                None => {
                    transaction.execute(
                        "DELETE FROM agent_labels WHERE agent = ?1 AND key = ?2",
                        params![id, key],
                    )?;
                    described.push(format!("{key}-"));
                }
            }
        }
        transaction.execute(
            "INSERT INTO events (at, kind, subject, message) VALUES (?1, 'agent-labelled', ?2, ?3)",
            params![now, id, format!("{} by {who}", described.join(","))],
        )?;
        transaction.commit()?;
        Ok(true)
    }

    fn revoke_agent(
        &mut self,
        id: &str,
        who: &str,
        why: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let transaction = self.connection.transaction()?;
        let changed = transaction.execute(
            "UPDATE agents SET revoked_at = ?2, revoked_by = ?3, revoked_why = ?4 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now, who, why],
        )?;
        if changed > 0 {
            transaction.execute(
                "INSERT INTO events (at, kind, subject, message) VALUES (?1, 'agent-revoked', ?2, ?3)",
                params![now, id, format!("by {who}: {why}")],
            )?;
        }
        let exists = agent_exists(&transaction, id)?;
        transaction.commit()?;
        Ok(exists)
    }
}

mod fleet;
pub use fleet::{
    AgentAssignments, AssignmentChange, AssignmentRow, FleetStore, SignedHeader, StoredStatus,
};
mod rollouts;
pub use rollouts::{Created, RolloutStore};
mod auth;
pub use auth::{AdminToken, AuthStore, NewToken, Role, TokenCheck};

#[cfg(test)]
mod agent_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, commit: &str) -> RefTarget {
        RefTarget {
            name: name.to_owned(),
            commit: commit.to_owned(),
        }
    }

    #[test]
    fn ref_changes_are_new_moved_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let changes = store
            .record_refs(
                "s",
                &[target("refs/tags/a", "1"), target("refs/tags/b", "1")],
                10,
            )
            .unwrap();
        assert_eq!(changes.len(), 2);
        assert!(
            store
                .record_refs(
                    "s",
                    &[target("refs/tags/a", "1"), target("refs/tags/b", "1")],
                    11
                )
                .unwrap()
                .is_empty()
        );
        let changes = store
            .record_refs("s", &[target("refs/tags/a", "2")], 12)
            .unwrap();
        assert_eq!(
            changes,
            [
                RefChange::Moved {
                    target: target("refs/tags/a", "2"),
                    previous: "1".to_owned()
                },
                RefChange::Deleted("refs/tags/b".to_owned()),
            ]
        );
    }

    #[test]
    fn generations_only_grow_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.next_generation("pos").unwrap(), 1);
        assert_eq!(store.next_generation("pos").unwrap(), 2);
        assert_eq!(store.next_generation("kiosk").unwrap(), 1);
        drop(store);
        let mut store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
        assert_eq!(store.next_generation("pos").unwrap(), 3);
    }

    #[test]
    fn a_store_from_a_newer_hub_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        SqliteStore::open(&path).unwrap();
        let connection = Connection::open(&path).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        drop(connection);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        std::fs::write(
            &path,
            b"this is not sqlite, just some text that is long enough to matter..",
        )
        .unwrap();
        let error = SqliteStore::open(&path).unwrap_err().to_string();
        assert!(error.contains("hub store"), "{error}");
    }
}
