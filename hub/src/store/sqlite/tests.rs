//! The store suite on SQLite, and what only SQLite does (files, schema versions, reopening).

use super::*;
use crate::store::{Store, suite::store_suite};

/// A fresh store in a temporary folder (kept as long as the store).
pub(crate) struct Fresh {
    pub(crate) store: SqliteStore,
    _dir: tempfile::TempDir,
}

pub(crate) fn fresh() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    Fresh { store, _dir: dir }
}

store_suite!(sqlite, fresh());

#[test]
fn generations_only_grow_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.next_generation("pos").unwrap(), 1);
    assert_eq!(store.next_generation("pos").unwrap(), 2);
    assert_eq!(store.next_generation("kiosk").unwrap(), 1);
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
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

#[test]
fn concurrent_writes_commit_together_and_a_failing_one_fails_alone() {
    use std::sync::atomic::Ordering::Relaxed;
    let made = fresh();
    let store = made.store.clone();
    let threads: Vec<_> = (0..8)
        .map(|thread| {
            let store = store.clone();
            std::thread::spawn(move || {
                for event in 0..50 {
                    store
                        .add_event(event, "test", &format!("t{thread}"), "hello")
                        .unwrap();
                }
            })
        })
        .collect();
    // A write that fails undoes only itself.
    let failed = store.write(|connection| {
        connection.execute(
            "INSERT INTO events (at, kind, subject, message) VALUES (0, 'doomed', 'x', 'y')",
            [],
        )?;
        Err::<(), _>(StoreError::Corrupt("on purpose".to_owned()))
    });
    assert!(failed.is_err());
    for thread in threads {
        thread.join().unwrap();
    }
    let events = store.events(1000).unwrap();
    assert_eq!(events.len(), 400);
    assert!(events.iter().all(|event| event.kind == "test"));
    let counters = store.counters();
    assert_eq!(counters.writes.load(Relaxed), 401);
    assert!(
        counters.commits.load(Relaxed) <= 401,
        "{} commits",
        counters.commits.load(Relaxed)
    );
}
