//! The store suite on PostgreSQL (a real server, started once for the test process; a new
//! database per test), and what only this backend does.

use std::sync::{Arc, OnceLock};

use super::testing::TestServer;
use super::*;
use crate::store::{Store, suite::store_suite};

/// The test process's server.
pub(crate) fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| match TestServer::start() {
        Ok(server) => server,
        Err(error) => panic!("the PostgreSQL tests need a server: {error}"),
    })
}

/// A store on a new database.
pub(crate) struct Fresh {
    pub(crate) store: PostgresStore,
}

pub(crate) fn fresh() -> Fresh {
    let url = server().create_database().unwrap();
    Fresh {
        store: PostgresStore::connect(&url, None).unwrap(),
    }
}

store_suite!(fresh());

#[test]
fn postgres_schema_is_versioned_and_a_newer_one_refused() {
    let url = server().create_database().unwrap();
    let store = PostgresStore::connect(&url, None).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    assert_eq!(store.next_generation("pos").unwrap(), 1);
    drop(store);
    // Connecting again migrates nothing and keeps the data.
    let store = PostgresStore::connect(&url, None).unwrap();
    assert_eq!(store.next_generation("pos").unwrap(), 2);
    store
        .write(async |transaction| {
            transaction
                .execute("UPDATE schema_version SET version = 99", &[])
                .await?;
            Ok(())
        })
        .unwrap();
    let error = PostgresStore::connect(&url, None).unwrap_err();
    assert!(
        matches!(error, StoreError::TooNew { found: 99, .. }),
        "{error}"
    );
}

#[test]
fn postgres_generations_are_never_handed_out_twice_under_concurrency() {
    let Fresh { store } = fresh();
    let handed: Vec<u64> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                scope.spawn(move || {
                    (0..25)
                        .map(|_| store.next_generation("pos").unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| worker.join().unwrap())
            .collect()
    });
    let mut sorted = handed.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 200, "a generation was handed out twice");
    assert_eq!(sorted, (1..=200).collect::<Vec<_>>());
}

#[test]
fn postgres_unreachable_database_is_a_clear_error_with_no_password_in_it() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://outpost:hunter2@127.0.0.1:{port}/hub");
    let error = PostgresStore::connect(&url, None).unwrap_err().to_string();
    assert!(error.contains(&format!("127.0.0.1:{port}/hub")), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
    assert_eq!(
        redact("postgres://hub:s3cret@db:5432/outpost?sslmode=disable&password=x"),
        "postgres://hub:***@db:5432/outpost?sslmode=disable&password=***"
    );
}

#[test]
fn postgres_lease_is_held_by_one_replica_and_fences_the_one_that_lost_it() {
    use crate::store::{Fence, Lease, ReplicaStore};
    use std::time::Duration;
    let url = server().create_database().unwrap();
    let (a, b) = (
        PostgresStore::connect(&url, None).unwrap(),
        PostgresStore::connect(&url, None).unwrap(),
    );
    let short = Duration::from_millis(400);
    assert_eq!(
        a.acquire_lease("a", short).unwrap(),
        Lease::Held { epoch: 1 }
    );
    assert!(matches!(
        b.acquire_lease("b", Duration::from_secs(10)).unwrap(),
        Lease::Taken { holder, .. } if holder == "a"
    ));
    // Renewed: the same epoch.
    assert_eq!(
        a.acquire_lease("a", short).unwrap(),
        Lease::Held { epoch: 1 }
    );
    let fence = Arc::new(Fence::new("a"));
    fence.set_epoch(1);
    let decisions = a.fenced(fence.clone());
    assert_eq!(decisions.next_generation("pos").unwrap(), 1);
    // A stalls past its lease; B takes it with a new epoch; A's decisions are refused and
    // leave nothing behind.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        b.acquire_lease("b", Duration::from_secs(10)).unwrap(),
        Lease::Held { epoch: 2 }
    );
    let refused = decisions.next_generation("pos").unwrap_err();
    assert!(
        matches!(refused, StoreError::Fenced { epoch: 1, .. }),
        "{refused}"
    );
    assert_eq!(b.next_generation("pos").unwrap(), 2);
    assert!(matches!(
        a.acquire_lease("a", short).unwrap(),
        Lease::Taken { holder, .. } if holder == "b"
    ));
    // A fence at epoch 0 (not leading) writes nothing either.
    fence.set_epoch(0);
    assert!(decisions.next_generation("pos").is_err());
    // Given up on stopping: taken over at once.
    b.release_lease("b").unwrap();
    assert_eq!(
        a.acquire_lease("a", short).unwrap(),
        Lease::Held { epoch: 3 }
    );
}

#[test]
fn postgres_replicas_hear_changes_and_signals_from_each_other() {
    use crate::store::{Notice, ReplicaStore};
    use std::time::{Duration, Instant};
    let url = server().create_database().unwrap();
    let (a, b) = (
        PostgresStore::connect(&url, None).unwrap(),
        PostgresStore::connect(&url, None).unwrap(),
    );
    let mut notices = b.notices();
    let next = |notices: &mut tokio::sync::broadcast::Receiver<Notice>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match notices.try_recv() {
                Ok(Notice::Reconnected) => {}
                Ok(notice) => return notice,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(error) => panic!("no notice in 10 s: {error}"),
            }
        }
    };
    // The listener connects in the background: wait for it before writing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(notices.try_recv(), Ok(Notice::Reconnected)) {
        assert!(Instant::now() < deadline, "the listener did not connect");
        std::thread::sleep(Duration::from_millis(20));
    }
    let token = outpost_proto::Digest::of(b"t");
    a.create_token(&token, &Default::default(), "ops", 100, 200)
        .unwrap();
    a.enrol(&token, &[3; 32], 150).unwrap().unwrap();
    assert_eq!(next(&mut notices), Notice::Changes);
    a.signal("fetch:fleet").unwrap();
    assert_eq!(next(&mut notices), Notice::Signal("fetch:fleet".to_owned()));
}

#[test]
fn postgres_migration_from_sqlite_copies_everything_and_checks_it() {
    use crate::store::{AuthStore, FleetStore, FleetView, RolloutStore, SqliteStore, suite};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let sqlite = SqliteStore::open(&path).unwrap();
    // A store with some of everything: what the suite leaves behind.
    suite::assignments_sessions_and_reports(&sqlite);
    suite::rollouts_keep_members_in_rows_and_refuse_lost_updates(&sqlite);
    suite::tokens_are_found_by_digest_expire_and_revoke(&sqlite);
    for generation in 1..=3u64 {
        let body = format!("body {generation}");
        let snapshot = crate::store::StoredSnapshot {
            bundle: "pos".to_owned(),
            generation: sqlite.next_generation("pos").unwrap(),
            digest: outpost_proto::Digest::of(body.as_bytes()),
            git_commit: format!("c{generation}"),
            git_ref: "refs/heads/main".to_owned(),
            header: vec![generation as u8; 40],
            signature: vec![7; 64],
            body: body.into_bytes(),
            object_count: 1,
            created_at: 100,
        };
        sqlite
            .insert_snapshot(&snapshot, &format!("tree{generation}"), "")
            .unwrap();
    }
    let url = server().create_database().unwrap();
    let postgres = PostgresStore::connect(&url, None).unwrap();
    let mut heard = Vec::new();
    let copied = crate::store::migrate::sqlite_to_postgres(&path, &postgres, |table| {
        heard.push(table.table)
    })
    .unwrap();
    assert_eq!(heard.len(), copied.len());
    let rows = |name: &str| copied.iter().find(|t| t.table == name).unwrap().rows;
    assert_eq!(rows("agents"), 3);
    assert_eq!(rows("snapshots"), 3);
    assert!(rows("status_history") > 0 && rows("rollout_members") > 0);
    // Read through the traits, both stores say the same.
    assert_eq!(postgres.agents().unwrap(), sqlite.agents().unwrap());
    assert_eq!(postgres.releases().unwrap(), sqlite.releases().unwrap());
    assert_eq!(
        postgres.snapshot("pos", 2).unwrap(),
        sqlite.snapshot("pos", 2).unwrap()
    );
    assert!(postgres.snapshot("pos", 2).unwrap().is_some());
    assert_eq!(postgres.tokens().unwrap(), sqlite.tokens().unwrap());
    assert_eq!(postgres.events(1000).unwrap(), sqlite.events(1000).unwrap());
    assert_eq!(
        postgres.statuses(None).unwrap(),
        sqlite.statuses(None).unwrap()
    );
    assert_eq!(
        postgres.bundle_assignments(None).unwrap(),
        sqlite.bundle_assignments(None).unwrap()
    );
    assert_eq!(
        postgres.admin_tokens().unwrap(),
        sqlite.admin_tokens().unwrap()
    );
    assert_eq!(
        postgres.fleet_summary().unwrap(),
        sqlite.fleet_summary().unwrap()
    );
    assert_eq!(
        postgres.change_cursor().unwrap(),
        sqlite.change_cursor().unwrap()
    );
    let ids: Vec<u64> = sqlite
        .rollouts()
        .unwrap()
        .iter()
        .map(|h| h.rollout.id)
        .collect();
    for id in ids {
        assert_eq!(postgres.rollout(id).unwrap(), sqlite.rollout(id).unwrap());
    }
    for agent in sqlite.agents().unwrap() {
        assert_eq!(
            postgres.delta_bases(&agent.id).unwrap().len(),
            sqlite.delta_bases(&agent.id).unwrap().len()
        );
        assert_eq!(
            postgres.status_history_len(&agent.id).unwrap(),
            sqlite.status_history_len(&agent.id).unwrap()
        );
    }
    // Counters and ids go on where they were.
    assert_eq!(
        postgres.next_generation("pos").unwrap(),
        sqlite.next_generation("pos").unwrap()
    );
    postgres.add_event(1, "after", "copy", "").unwrap();
    sqlite.add_event(1, "after", "copy", "").unwrap();
    assert_eq!(postgres.events(1).unwrap(), sqlite.events(1).unwrap());
    // A second copy into a database that holds a hub is refused, and changes nothing.
    let refused = crate::store::migrate::sqlite_to_postgres(&path, &postgres, |_| {}).unwrap_err();
    assert!(refused.to_string().contains("already holds"), "{refused}");
    let missing = crate::store::migrate::sqlite_to_postgres(
        &dir.path().join("nothing.db"),
        &postgres,
        |_| {},
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("no such SQLite store"),
        "{missing}"
    );
}

#[test]
fn postgres_over_tls_checks_the_servers_certificate_and_name() {
    use crate::store::{Notice, ReplicaStore};
    use std::time::{Duration, Instant};
    let (server, ca) = TestServer::start_tls().unwrap();
    let url = server.create_database().unwrap();
    let by_name = url.replace("127.0.0.1", "localhost");

    // The CA that signed the certificate, the name it was issued for: TLS, and the store works,
    // its notice listener too.
    let store = PostgresStore::connect_with(&by_name, None, Some(&ca)).unwrap();
    assert!(store.tls());
    let ssl: bool = store
        .read(async |client| {
            let row = one(
                client,
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
            Ok(row.get(0))
        })
        .unwrap();
    assert!(ssl, "the server says the session is not TLS");
    assert_eq!(store.next_generation("pos").unwrap(), 1);
    let mut notices = store.notices();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(notices.try_recv(), Ok(Notice::Reconnected)) {
        assert!(
            Instant::now() < deadline,
            "the listener did not connect over TLS"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    store.signal("over-tls").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match notices.try_recv() {
            Ok(Notice::Signal(payload)) if payload == "over-tls" => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("no signal over TLS: {other:?}"),
        }
    }

    // Another CA, a name the certificate does not carry, the public roots: refused.
    let other = super::testing::test_ca(server.dir(), "other").unwrap();
    let refused = |url: &str, ca: Option<&std::path::Path>| {
        PostgresStore::connect_with(url, None, ca)
            .unwrap_err()
            .to_string()
    };
    let error = refused(&by_name, Some(&other));
    assert!(error.contains("certificate"), "{error}");
    let error = refused(&url, Some(&ca));
    assert!(error.contains("certificate"), "{error}");
    let error = refused(&format!("{by_name}?sslmode=require"), None);
    assert!(error.contains("certificate"), "{error}");
    // Plain stays plain when asked for nothing.
    assert!(!PostgresStore::connect(&url, None).unwrap().tls());
}
