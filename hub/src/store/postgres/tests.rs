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
