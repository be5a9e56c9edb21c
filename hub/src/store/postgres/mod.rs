//! The PostgreSQL store, for several hub replicas on one database: tokio-postgres through a
//! deadpool connection pool, driven by a small runtime of the store's own so that the store
//! traits stay synchronous (the hub calls them from blocking tasks, as it does SQLite's).
//!
//! Transactions are those SQLite has: every write is one transaction, and writes are
//! serialised by a transaction-scoped advisory lock taken first (SQLite's one writer, across
//! every replica), so a read-modify-write such as a rollout step, a generation reserved or an
//! enrolment sees every write committed before it and none after. The change feed's counter is
//! bumped under that lock, so its values are committed in order and a reader that saw value N
//! has seen every row stamped N or lower. Reads run on any pooled connection; a read of several
//! statements that must agree runs in one REPEATABLE READ transaction.
//!
//! The schema is versioned in `schema_version`; a database from a newer hub is refused, and
//! replicas starting together migrate under an advisory lock of its own.

mod auth;
mod fleet;
mod replicas;
mod retention;
mod rollouts;
mod schema;
mod store;
pub mod testing;
mod tls;
mod view;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use outpost_proto::Digest;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

pub use tls::StoreTls;

use super::{StoreError, StoredSnapshot};
use schema::MIGRATIONS;

/// Connections kept by one replica.
const POOL_SIZE: usize = 16;
/// The advisory lock every write transaction takes first.
const WRITE_LOCK: i64 = 0x6f75_7470_6f73_7401;
/// The advisory lock migrations run under.
const MIGRATE_LOCK: i64 = 0x6f75_7470_6f73_7402;

/// A parameter list.
pub(crate) type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Counts of store work, for tests and figures.
#[derive(Debug, Default)]
pub struct PostgresCounters {
    /// Read operations.
    pub reads: AtomicU64,
    /// Write transactions committed.
    pub writes: AtomicU64,
}

struct Inner {
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    /// For the connection that listens for other replicas' notices.
    config: tokio_postgres::Config,
    tls: StoreTls,
    notices: std::sync::OnceLock<tokio::sync::broadcast::Sender<super::Notice>>,
    target: String,
    counters: PostgresCounters,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // May be dropped on an async thread (a hub stopping): never block there.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The PostgreSQL store. Cheap to clone; clones share the pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
    /// Writes commit only while this names the leader lease (the leader's loops).
    fence: Option<Arc<super::Fence>>,
}

/// Whether `text` names a PostgreSQL store (`postgres://…` or `postgresql://…`).
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// `url` with any password in it (`user:secret@`, `?password=secret`) replaced, for messages
/// and logs.
pub fn redact(url: &str) -> String {
    let mut redacted = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if let Some((user, host)) = authority.rsplit_once('@')
            && let Some((name, _)) = user.split_once(':')
        {
            redacted = format!("{scheme}://{name}:***@{host}{tail}");
        }
    }
    match redacted.split_once('?') {
        Some((base, query)) => {
            let query: Vec<&str> = query
                .split('&')
                .map(|pair| match pair.starts_with("password=") {
                    true => "password=***",
                    false => pair,
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => redacted,
    }
}

fn db_error(error: tokio_postgres::Error) -> StoreError {
    StoreError::Postgres(match error.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        // tokio-postgres names what failed ("error performing TLS handshake") and keeps why
        // in its source: say both.
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    })
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        db_error(error)
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`; `password`, when
    /// given, overrides one in the URL), migrates it to the current schema, and keeps a pool.
    /// Plain unless the URL says `sslmode=require` (see [`PostgresStore::connect_with`]).
    pub fn connect(url: &str, password: Option<&str>) -> Result<PostgresStore, StoreError> {
        PostgresStore::connect_with(url, password, None)
    }

    /// [`PostgresStore::connect`], over TLS when the URL says `sslmode=require` or `ca_file`
    /// (PEM) is given: the server's certificate is checked against `ca_file` (else the Mozilla
    /// roots) and the URL's host name.
    pub fn connect_with(
        url: &str,
        password: Option<&str>,
        ca_file: Option<&std::path::Path>,
    ) -> Result<PostgresStore, StoreError> {
        let target = redact(url);
        let mut config: tokio_postgres::Config = url.parse().map_err(|error| {
            StoreError::Postgres(format!(
                "{target}: not a PostgreSQL URL ({error}); write postgres://USER@HOST:PORT/DATABASE"
            ))
        })?;
        if let Some(password) = password {
            config.password(password);
        }
        let tls = StoreTls::choose(&mut config, ca_file)
            .map_err(|error| StoreError::Postgres(format!("{target}: {error}")))?;
        if !tls.is_on() && tls::plain_to_remote(&config) {
            tracing::warn!(store = %target, "the connection to the database is not encrypted and crosses the network: add ?sslmode=require to the URL (and store_ca_file with the server's CA)");
        }
        config.application_name("outpost-hub");
        config.connect_timeout(Duration::from_secs(10));
        // A database host gone without a word is noticed in about half a minute.
        config.keepalives_idle(Duration::from_secs(15));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-postgres")
            .enable_all()
            .build()
            .map_err(|error| {
                StoreError::Postgres(format!("starting the store's runtime: {error}"))
            })?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(30)))
                .create_timeout(Some(Duration::from_secs(10)))
                .build()
                .map_err(|error| StoreError::Postgres(format!("{target}: {error}")))?
        };
        let store = PostgresStore {
            inner: Arc::new(Inner {
                runtime: Some(runtime),
                pool,
                config,
                tls,
                notices: std::sync::OnceLock::new(),
                target,
                counters: PostgresCounters::default(),
            }),
            fence: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database, its password elided.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Whether its connections are TLS.
    pub fn tls(&self) -> bool {
        self.inner.tls.is_on()
    }

    /// What the store did so far.
    pub fn counters(&self) -> &PostgresCounters {
        &self.inner.counters
    }

    /// Runs `work` to completion on the store's runtime. Called from blocking threads (the
    /// hub's blocking tasks, the CLI, tests), never from an async task.
    pub(crate) fn block<T>(&self, work: impl Future<Output = T>) -> T {
        match &self.inner.runtime {
            Some(runtime) => runtime.block_on(work),
            None => unreachable!("the runtime lives as long as the store"),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        self.inner.pool.get().await.map_err(|error| {
            let error = match error {
                deadpool_postgres::PoolError::Backend(error) => match db_error(error) {
                    StoreError::Postgres(text) => text,
                    other => other.to_string(),
                },
                other => other.to_string(),
            };
            StoreError::Postgres(format!("{}: {error}", self.inner.target))
        })
    }

    /// Runs `work` on a pooled connection.
    pub(crate) fn read<T>(
        &self,
        work: impl AsyncFnOnce(&deadpool_postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.inner.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.block(async {
            let client = self.client().await?;
            work(&client).await
        })
    }

    /// Runs `work` in one REPEATABLE READ, read-only transaction: its statements see one
    /// snapshot.
    pub(crate) fn read_consistent<T>(
        &self,
        work: impl AsyncFnOnce(&deadpool_postgres::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.inner.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.block(async {
            let mut client = self.client().await?;
            let transaction = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let value = work(&transaction).await?;
            transaction.commit().await?;
            Ok(value)
        })
    }

    /// Runs `work` in a write transaction (after every write committed before it, before every
    /// write after it) and returns once it is committed. `work` failing keeps nothing of it.
    pub(crate) fn write<T>(
        &self,
        work: impl AsyncFnOnce(&deadpool_postgres::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.block(async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .await?;
            if let Some(fence) = &self.fence {
                replicas::check_fence(&transaction, fence).await?;
            }
            let value = work(&transaction).await?;
            transaction
                .commit()
                .await
                .map_err(|error| StoreError::Commit(db_error(error).to_string()))?;
            self.inner.counters.writes.fetch_add(1, Ordering::Relaxed);
            Ok(value)
        })
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        self.read(async |client| {
            let row = one(client, "SELECT version FROM schema_version", &[]).await?;
            Ok(row.get::<_, i64>(0) as usize)
        })
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.block(async {
            let mut client = self.client().await?;
            let transaction = client.transaction().await?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
                .await?;
            transaction
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (
                         id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
                     INSERT INTO schema_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING;",
                )
                .await?;
            let found = transaction
                .query_one("SELECT version FROM schema_version", &[])
                .await?
                .get::<_, i64>(0) as usize;
            if found > MIGRATIONS.len() {
                return Err(StoreError::TooNew {
                    found,
                    known: MIGRATIONS.len(),
                });
            }
            for (index, sql) in MIGRATIONS.iter().enumerate().skip(found) {
                transaction.batch_execute(sql).await?;
                transaction
                    .execute(
                        "UPDATE schema_version SET version = $1",
                        &[&((index + 1) as i64)],
                    )
                    .await?;
            }
            transaction.commit().await?;
            Ok(())
        })
    }
}

/// Rows of a statement (prepared once per connection).
pub(crate) async fn query<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> Result<Vec<Row>, StoreError> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query(&statement, params).await?)
}

/// The one row of a statement, or none.
pub(crate) async fn optional<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> Result<Option<Row>, StoreError> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_opt(&statement, params).await?)
}

/// The one row of a statement.
pub(crate) async fn one<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> Result<Row, StoreError> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.query_one(&statement, params).await?)
}

/// Runs a statement; returns the rows it changed.
pub(crate) async fn execute<C: GenericClient>(
    client: &C,
    sql: &str,
    params: &Params<'_>,
) -> Result<u64, StoreError> {
    let statement = client.prepare_cached(sql).await?;
    Ok(client.execute(&statement, params).await?)
}

/// A 32-byte digest column; another length is an error, never a made-up digest.
pub(crate) fn digest_at(row: &Row, index: usize) -> Result<Digest, StoreError> {
    let bytes: &[u8] = row.try_get(index)?;
    Digest::from_slice(bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("column {index}: a digest is not 32 bytes")))
}

/// Selects whole snapshots (rows for [`snapshot_from_row`]) as `s`, their bodies joined.
const SNAPSHOT_SELECT: &str = "SELECT s.bundle, s.generation, s.digest, s.git_commit, s.git_ref, s.header, s.signature, b.body, s.object_count, s.created_at FROM snapshots s JOIN bodies b ON b.digest = s.digest";

fn snapshot_from_row(row: &Row) -> Result<StoredSnapshot, StoreError> {
    Ok(StoredSnapshot {
        bundle: row.try_get(0)?,
        generation: row.try_get::<_, i64>(1)? as u64,
        digest: digest_at(row, 2)?,
        git_commit: row.try_get(3)?,
        git_ref: row.try_get(4)?,
        header: row.try_get(5)?,
        signature: row.try_get(6)?,
        body: row.try_get(7)?,
        object_count: row.try_get::<_, i64>(8)? as u64,
        created_at: row.try_get(9)?,
    })
}

async fn insert_snapshot_row<C: GenericClient>(
    client: &C,
    snapshot: &StoredSnapshot,
) -> Result<(), StoreError> {
    // A body already stored (the same content signed again) is kept once.
    execute(
        client,
        "INSERT INTO bodies (digest, body) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&snapshot.digest.0.as_slice(), &snapshot.body],
    )
    .await?;
    execute(
        client,
        "INSERT INTO snapshots (bundle, generation, digest, git_commit, git_ref, header, signature, object_count, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &snapshot.bundle,
            &(snapshot.generation as i64),
            &snapshot.digest.0.as_slice(),
            &snapshot.git_commit,
            &snapshot.git_ref,
            &snapshot.header,
            &snapshot.signature,
            &(snapshot.object_count as i64),
            &snapshot.created_at,
        ],
    )
    .await?;
    Ok(())
}

async fn agent_exists<C: GenericClient>(client: &C, id: &str) -> Result<bool, StoreError> {
    Ok(
        optional(client, "SELECT 1 FROM agents WHERE id = $1", &[&id])
            .await?
            .is_some(),
    )
}

/// The next value of the change feed's counter (every write that concerns an agent or its
/// reports stamps its rows with one). Writers hold the write lock, so values commit in order.
/// Other replicas are notified when the transaction commits (PostgreSQL sends one notice per
/// transaction however many changes it stamps).
async fn next_change<C: GenericClient>(client: &C) -> Result<i64, StoreError> {
    Ok(one(
        client,
        "WITH bumped AS (UPDATE change_counter SET value = value + 1 WHERE id = 1 RETURNING value)
         SELECT value, pg_notify('outpost_changes', '')::text FROM bumped",
        &[],
    )
    .await?
    .try_get(0)?)
}

async fn add_event<C: GenericClient>(
    client: &C,
    at: i64,
    kind: &str,
    subject: &str,
    message: &str,
) -> Result<(), StoreError> {
    execute(
        client,
        "INSERT INTO events (at, kind, subject, message) VALUES ($1, $2, $3, $4)",
        &[&at, &kind, &subject, &message],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
