//! kill -9 a real hub at random moments during a sync, many times: the store must stay
//! consistent (every release names a stored snapshot that verifies; the keys survive), and a
//! final sync must complete the work. A kill between reserving a generation and storing its
//! snapshot leaves a gap in the numbers, never a reuse.

mod support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::store::{SqliteStore, Store};
use outpost_proto::verify::{Expectation, verify_snapshot};
use support::{Upstream, config_map};

#[test]
fn killed_mid_sync_loses_nothing_committed_and_mixes_nothing() {
    let upstream = Upstream::new();
    for bundle in 0..30 {
        for file in 0..20 {
            upstream.write(
                &format!("b{bundle:02}/f{file}.yaml"),
                &config_map(&format!("c{file}"), &format!("{bundle}")),
            );
        }
    }
    upstream.commit("fleet");
    upstream.git(&["tag", "v1"]);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let keys = Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .args(["keys", "init", "--key-dir", &format!("{data_dir}/keys")])
        .output()
        .unwrap();
    assert!(
        keys.status.success(),
        "{}",
        String::from_utf8_lossy(&keys.stderr)
    );
    let sync = || {
        Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
            .args(["sync", "--data-dir", &data_dir, "--source", &upstream.url()])
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // Kill at spread-out moments: before the fetch ends, during rendering, near the end.
    let mut seed: u64 = 0x0dd5_eed5;
    for round in 0..12 {
        if round == 6 {
            // Change half the bundles so later kills land in a second wave of renders.
            for bundle in 0..15 {
                upstream.write(
                    &format!("b{bundle:02}/f0.yaml"),
                    &config_map("c0", "changed"),
                );
            }
            upstream.commit("half");
            upstream.git(&["tag", "v2"]);
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = sync();
        std::thread::sleep(Duration::from_millis(20 + seed % 400));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        check_consistent(data.path());
    }
    let finished = Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .args(["sync", "--data-dir", &data_dir, "--source", &upstream.url()])
        .env("RUST_LOG", "off")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(
        finished.status.success(),
        "{}{}",
        String::from_utf8_lossy(&finished.stdout),
        String::from_utf8_lossy(&finished.stderr)
    );
    let store = check_consistent(data.path());
    let releases = store.releases().unwrap();
    for tag in ["refs/tags/v1", "refs/tags/v2"] {
        let rendered = releases
            .iter()
            .filter(|r| r.git_ref == tag && r.generation.is_some())
            .count();
        assert_eq!(
            rendered, 30,
            "{tag}: every bundle released after the final sync"
        );
    }
}

/// Opens the store as a restarted hub would and checks its invariants.
fn check_consistent(data: &std::path::Path) -> SqliteStore {
    let store = SqliteStore::open(&data.join("hub.db")).unwrap();
    let keys =
        HubKeys::load(&data.join("keys"), KeyPolicy::default()).expect("keys survive a kill");
    let trust = keys.trust_store();
    let mut seen = BTreeSet::new();
    for release in store.releases().unwrap() {
        let Some(generation) = release.generation else {
            assert!(
                release.error.is_some(),
                "release {release:?} has neither a generation nor an error"
            );
            continue;
        };
        let snapshot = store
            .snapshot(&release.bundle, generation)
            .unwrap()
            .unwrap_or_else(|| panic!("release {release:?} names a missing snapshot"));
        if seen.insert((release.bundle.clone(), generation)) {
            verify_snapshot(
                &trust,
                &snapshot.header,
                &snapshot.signature,
                snapshot.body.clone(),
                &Expectation {
                    bundle: &release.bundle,
                    assigned_digest: Some(snapshot.digest),
                    installed: None,
                },
            )
            .unwrap_or_else(|error| {
                panic!(
                    "snapshot {}/{generation} does not verify: {error}",
                    release.bundle
                )
            });
        }
    }
    store
}
