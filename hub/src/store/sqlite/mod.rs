//! The SQLite store: one file in WAL mode, read through a small pool of read-only connections
//! and written by one writer thread that commits what is queued together (group commit: one
//! fsync for many small writes — status reports, last-seen times, enrolments — under load).
//!
//! Each write runs inside a savepoint of the batch's transaction, so a write that fails leaves
//! nothing behind and does not fail the others; its caller hears of it only after the batch is
//! committed (`synchronous=FULL`: a crash or power loss loses nothing that was answered).
//! Readers see every committed write (WAL snapshots), never half of one. No lock is held
//! while rendering, signing or talking to agents: callers hold a connection only for the
//! duration of one operation.
//!
//! A write closure runs on the writer thread and must use only the connection it is given: a
//! store call from inside it would wait for itself.

mod auth;
mod fleet;
mod retention;
mod rollouts;
mod store;
mod view;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use outpost_proto::Digest;
use rusqlite::{Connection, OptionalExtension};

use super::{StoreError, StoredSnapshot};

/// Schema migrations, applied in order; the index + 1 is the schema version.
mod migrations;
use migrations::MIGRATIONS;

/// Read-only connections kept open.
const READERS: usize = 4;
/// The most writes committed in one transaction.
const MAX_BATCH: usize = 512;

/// Counts of store work, for tests and figures.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Read operations.
    pub reads: AtomicU64,
    /// Write operations.
    pub writes: AtomicU64,
    /// Transactions committed by the writer (each holding one or more writes).
    pub commits: AtomicU64,
}

type Finish = Box<dyn FnOnce(Option<String>) + Send>;
/// A queued write: run on the connection (or told why it cannot run), it says whether it
/// succeeded and returns what answers its caller once the batch's fate is known.
type Job = Box<dyn FnOnce(Result<&Connection, String>) -> (bool, Finish) + Send>;

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    reader_free: Condvar,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: StoreCounters,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread once it has committed what was queued.
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
        if let Ok(mut thread) = self.writer_thread.lock()
            && let Some(thread) = thread.take()
        {
            let _ = thread.join();
        }
    }
}

/// The SQLite store. Cheap to clone; clones share the connections and the writer.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: path.to_owned(),
        error,
    }
}

fn configure(connection: &Connection) -> Result<(), StoreError> {
    // First, so that opening beside a running hub (the CLI's local commands) waits for its
    // transactions instead of failing.
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path`, migrates it to the current schema, and
    /// starts its writer. The file, its WAL and its shared-memory file are made readable by the
    /// owner only, whatever the umask (SQLite gives the WAL and SHM files the database's mode).
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        crate::files::create_private(path).map_err(io_error(path))?;
        let mut writer = Connection::open(path)?;
        configure(&writer)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        writer.pragma_update(None, "synchronous", "FULL")?;
        migrate(&mut writer)?;
        for suffix in ["-wal", "-shm"] {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            let side = PathBuf::from(name);
            if side.exists() {
                crate::files::make_private(&side).map_err(io_error(&side))?;
            }
        }
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let reader = Connection::open(path)?;
            configure(&reader)?;
            reader.pragma_update(None, "query_only", "ON")?;
            readers.push(reader);
        }
        let (sender, jobs) = mpsc::channel::<Job>();
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            readers: Mutex::new(readers),
            reader_free: Condvar::new(),
            writer: Mutex::new(Some(sender)),
            writer_thread: Mutex::new(None),
            counters: StoreCounters::default(),
        });
        let commits = Arc::downgrade(&inner);
        let thread = std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || write_loop(writer, jobs, commits))
            .map_err(io_error(path))?;
        if let Ok(mut slot) = inner.writer_thread.lock() {
            *slot = Some(thread);
        }
        Ok(SqliteStore { inner })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// What the store did so far.
    pub fn counters(&self) -> &StoreCounters {
        &self.inner.counters
    }

    /// The schema version.
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        self.read(|connection| {
            let version: i64 =
                connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
            Ok(version as usize)
        })
    }

    /// Runs `work` on a read-only connection (waiting for one if all are busy).
    pub(crate) fn read<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.inner.counters.reads.fetch_add(1, Ordering::Relaxed);
        let connection = {
            let mut readers = self
                .inner
                .readers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            loop {
                if let Some(connection) = readers.pop() {
                    break connection;
                }
                readers = self
                    .inner
                    .reader_free
                    .wait(readers)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        let result = work(&connection);
        self.inner
            .readers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(connection);
        self.inner.reader_free.notify_one();
        result
    }

    /// Runs `work` on the writer inside a transaction (with other writes queued beside it) and
    /// returns once that transaction is committed. `work` failing undoes only its own changes.
    pub(crate) fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.inner.counters.writes.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = mpsc::sync_channel::<Result<T, StoreError>>(1);
        let job: Job = Box::new(move |connection| {
            let result = match connection {
                Ok(connection) => {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(connection)))
                        .unwrap_or_else(|_| {
                            Err(StoreError::Corrupt("a store write panicked".to_owned()))
                        })
                }
                Err(error) => Err(StoreError::Commit(error)),
            };
            let succeeded = result.is_ok();
            let finish: Finish = Box::new(move |commit_error| {
                let _ = reply.send(match commit_error {
                    Some(error) => Err(StoreError::Commit(error)),
                    None => result,
                });
            });
            (succeeded, finish)
        });
        let sent = self
            .inner
            .writer
            .lock()
            .ok()
            .and_then(|writer| writer.as_ref().map(|writer| writer.send(job).is_ok()));
        if sent != Some(true) {
            return Err(StoreError::Closed);
        }
        answer.recv().unwrap_or(Err(StoreError::Closed))
    }
}

/// The writer thread: takes what is queued (up to [`MAX_BATCH`]), runs each in a savepoint of
/// one transaction, commits once, then answers every caller.
fn write_loop(connection: Connection, jobs: mpsc::Receiver<Job>, inner: std::sync::Weak<Inner>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut finishes = Vec::with_capacity(batch.len());
        if let Err(error) = connection.execute_batch("BEGIN IMMEDIATE") {
            // The file is locked by another process for longer than the busy timeout, or broken:
            // run nothing, answer every caller with the failure.
            let error = error.to_string();
            for job in batch {
                let (_, finish) = job(Err(error.clone()));
                finish(None);
            }
            continue;
        }
        for job in batch {
            let savepoint = connection.execute_batch("SAVEPOINT write");
            let (succeeded, finish) = job(Ok(&connection));
            if savepoint.is_ok() {
                let end = match succeeded {
                    true => "RELEASE write",
                    false => "ROLLBACK TO write; RELEASE write",
                };
                let _ = connection.execute_batch(end);
            }
            finishes.push(finish);
        }
        let committed = connection.execute_batch("COMMIT").map_err(|error| {
            let _ = connection.execute_batch("ROLLBACK");
            error.to_string()
        });
        if let Some(inner) = inner.upgrade() {
            inner.counters.commits.fetch_add(1, Ordering::Relaxed);
        }
        for finish in finishes {
            finish(committed.as_ref().err().cloned());
        }
    }
}

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let found = found as usize;
    if found > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found,
            known: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(sql)?;
        transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
        transaction.commit()?;
    }
    Ok(())
}

/// Selects whole snapshots (rows for [`snapshot_from_row`]) as `s`, their bodies joined.
const SNAPSHOT_SELECT: &str = "SELECT s.bundle, s.generation, s.digest, s.git_commit, s.git_ref, s.header, s.signature, b.body, s.object_count, s.created_at FROM snapshots s JOIN bodies b ON b.digest = s.digest";

fn insert_snapshot_row(
    connection: &Connection,
    snapshot: &StoredSnapshot,
) -> Result<(), StoreError> {
    // A body already stored (the same content signed again) is kept once.
    connection
        .prepare_cached("INSERT OR IGNORE INTO bodies (digest, body) VALUES (?1, ?2)")?
        .execute(rusqlite::params![
            snapshot.digest.0.as_slice(),
            snapshot.body
        ])?;
    connection
        .prepare_cached(
            "INSERT INTO snapshots (bundle, generation, digest, git_commit, git_ref, header, signature, object_count, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(rusqlite::params![
            snapshot.bundle,
            snapshot.generation as i64,
            snapshot.digest.0.as_slice(),
            snapshot.git_commit,
            snapshot.git_ref,
            snapshot.header,
            snapshot.signature,
            snapshot.object_count as i64,
            snapshot.created_at,
        ])?;
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

/// The next value of the change feed's counter (every write that concerns an agent or its
/// reports stamps its rows with one).
fn next_change(connection: &Connection) -> rusqlite::Result<i64> {
    connection
        .prepare_cached("UPDATE change_counter SET value = value + 1 WHERE id = 1 RETURNING value")?
        .query_row([], |row| row.get(0))
}

fn add_event(
    connection: &Connection,
    at: i64,
    kind: &str,
    subject: &str,
    message: &str,
) -> Result<(), StoreError> {
    connection.execute(
        "INSERT INTO events (at, kind, subject, message) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![at, kind, subject, message],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
