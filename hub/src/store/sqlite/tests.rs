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

store_suite!(fresh());

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

#[test]
fn rollouts_stored_whole_as_json_move_to_rows_on_upgrade() {
    use crate::rollout::machine::{Assigned, Input, Rollout};
    use crate::store::RolloutStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    // A store as schema 8 left it: the rollout's members and history inside its JSON.
    let plan = crate::store::suite::two_wave_plan();
    let mut rollout = Rollout::new(1, plan, "alice", "ship it", 100).unwrap();
    let inputs: Vec<Input> = (0..4)
        .map(|index| Input::Agent {
            id: format!("agent-{index}"),
            matches: true,
            canary: index == 2,
            target: Some(Assigned {
                generation: 2,
                digest: outpost_proto::Digest::of(b"v2"),
                origin: String::new(),
            }),
            current: None,
        })
        .collect();
    rollout.step(&inputs, 110);
    rollout.take_touched();
    {
        let mut connection = Connection::open(&path).unwrap();
        for (index, sql) in MIGRATIONS.iter().enumerate().take(8) {
            let transaction = connection.transaction().unwrap();
            transaction.execute_batch(sql).unwrap();
            transaction
                .pragma_update(None, "user_version", (index + 1) as i64)
                .unwrap();
            transaction.commit().unwrap();
        }
        connection
            .execute(
                "INSERT INTO rollouts (id, bundle, phase, state, created_at, updated_at) VALUES (1, 'pos', 'running', ?1, 100, 110)",
                [serde_json::to_string(&rollout).unwrap()],
            )
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    let stored = store.rollout(1).unwrap().unwrap();
    assert_eq!(stored.rollout, rollout);
    assert_eq!(stored.rollout.members.len(), 4);
    assert_eq!(stored.rollout.log.len(), rollout.log.len());
    let heads = store.rollouts().unwrap();
    assert_eq!(heads[0].progress, rollout.progress());
    assert_eq!(heads[0].created_by, "alice");
    assert_eq!(store.live_rollouts().unwrap(), vec![(1, 1)]);
}

#[test]
fn a_body_signed_again_is_stored_once() {
    let made = fresh();
    let store = &made.store;
    let body = b"the same manifests".to_vec();
    let snapshot = |generation: u64| crate::store::StoredSnapshot {
        bundle: "pos".to_owned(),
        generation,
        digest: outpost_proto::Digest::of(&body),
        git_commit: "c".to_owned(),
        git_ref: "refs/tags/v1".to_owned(),
        header: vec![generation as u8],
        signature: vec![0; 64],
        body: body.clone(),
        object_count: 1,
        created_at: 100,
    };
    store.insert_snapshot(&snapshot(1), "tree", "").unwrap();
    store.insert_resigned(&snapshot(2)).unwrap();
    let count = |table: &str| -> i64 {
        store
            .read(|connection| {
                Ok(
                    connection.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                        row.get(0)
                    })?,
                )
            })
            .unwrap()
    };
    assert_eq!(count("snapshots"), 2);
    assert_eq!(count("bodies"), 1);
    assert_eq!(store.snapshot("pos", 2).unwrap().unwrap().body, body);
}

#[test]
fn an_agents_rollouts_are_found_by_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(SqliteStore::open(&path).unwrap());
    let connection = Connection::open(&path).unwrap();
    let plan: Vec<String> = connection
        .prepare(
            "EXPLAIN QUERY PLAN SELECT rollout FROM rollout_members WHERE agent = ?1 ORDER BY rollout DESC",
        )
        .unwrap()
        .query_map(["agent-1"], |row| row.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("rollout_members_by_agent")),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}
