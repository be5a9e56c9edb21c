//! The store suite on PostgreSQL (a real server, started once for the test process; a new
//! database per test), and what only this backend does.

use std::sync::OnceLock;

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
