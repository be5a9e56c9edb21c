//! A hub sync against real Git repositories: rendering, unchanged trees, invalid YAML in one
//! bundle, force-moved and deleted tags, restarts, and a remote served by `git daemon`.

mod support;

use std::process::{Child, Command};

use outpost_hub::git::GitSource;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::store::{SqliteStore, Store};
use outpost_hub::sync::sync_source;
use outpost_proto::verify::{Expectation, verify_snapshot};
use support::{Upstream, config_map};

struct Hub {
    data: tempfile::TempDir,
    keys: HubKeys,
    store: SqliteStore,
}

impl Hub {
    fn new() -> Hub {
        let data = tempfile::tempdir().unwrap();
        Hub::open(data)
    }

    fn open(data: tempfile::TempDir) -> Hub {
        let dir = data.path().join("keys");
        let keys = match dir.join("root.pub").exists() {
            true => HubKeys::load(&dir, KeyPolicy::default()).unwrap(),
            false => HubKeys::create(&dir, KeyPolicy::default(), 1_800_000_000).unwrap(),
        };
        let store = SqliteStore::open(&data.path().join("hub.db")).unwrap();
        Hub { data, keys, store }
    }

    fn sync(&mut self, url: &str, now: i64) -> outpost_hub::sync::SyncReport {
        let source = GitSource::open_or_init(url, &self.data.path().join("mirror")).unwrap();
        sync_source(&self.store, &self.keys, &source, now).unwrap()
    }

    fn release(&self, git_ref: &str, bundle: &str) -> Option<outpost_hub::store::Release> {
        self.store
            .releases()
            .unwrap()
            .into_iter()
            .find(|r| r.git_ref == git_ref && r.bundle == bundle)
    }
}

fn two_bundles() -> Upstream {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.write("kiosk/app.yaml", &config_map("kiosk", "1"));
    upstream.write("README.md", "not a bundle");
    upstream.commit("first");
    upstream.git(&["tag", "v1"]);
    upstream
}

#[test]
fn renders_signed_snapshots_and_skips_unchanged_trees() {
    let upstream = two_bundles();
    let mut hub = Hub::new();
    let report = hub.sync(&upstream.url(), 1_800_000_100);
    // main and v1 name the same commit: each bundle is rendered once, reused once.
    assert_eq!(report.rendered.len(), 2, "{report:?}");
    assert_eq!(report.unchanged, 2);
    let pos = hub.release("refs/tags/v1", "pos").unwrap();
    assert_eq!(pos.generation, Some(1));
    let snapshot = hub.store.snapshot("pos", 1).unwrap().unwrap();
    let verified = verify_snapshot(
        &hub.keys.trust_store(),
        &snapshot.header,
        &snapshot.signature,
        snapshot.body.clone(),
        &Expectation {
            bundle: "pos",
            assigned_digest: Some(snapshot.digest),
            installed: None,
        },
    )
    .unwrap();
    // refs/heads/main sorts before refs/tags/v1, so the snapshot names the branch it came from.
    assert_eq!(verified.header().git_ref, "refs/heads/main");
    assert_eq!(verified.body().object_count(), 1);

    upstream.write("pos/app.yaml", &config_map("pos", "2"));
    upstream.commit("second");
    upstream.git(&["tag", "v2"]);
    let report = hub.sync(&upstream.url(), 1_800_000_200);
    assert_eq!(
        report.rendered,
        [("pos".to_owned(), 2, "refs/heads/main".to_owned())]
    );
    assert_eq!(
        hub.release("refs/tags/v2", "pos").unwrap().generation,
        Some(2)
    );
    assert_eq!(
        hub.release("refs/tags/v2", "kiosk").unwrap().generation,
        Some(1),
        "kiosk's tree did not change"
    );

    // A restarted hub renders nothing again.
    let Hub { data, .. } = hub;
    let mut hub = Hub::open(data);
    let report = hub.sync(&upstream.url(), 1_800_000_300);
    assert!(report.rendered.is_empty(), "{report:?}");
}

#[test]
fn invalid_yaml_refuses_that_bundle_only_with_file_and_line() {
    let upstream = two_bundles();
    upstream.write(
        "kiosk/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [broken\n",
    );
    upstream.write("pos/app.yaml", &config_map("pos", "3"));
    upstream.commit("bad kiosk");
    upstream.git(&["tag", "v3"]);
    let mut hub = Hub::new();
    let report = hub.sync(&upstream.url(), 1_800_000_100);
    let kiosk = hub.release("refs/tags/v3", "kiosk").unwrap();
    assert_eq!(kiosk.generation, None);
    let error = kiosk.error.unwrap();
    assert!(error.starts_with("kiosk/app.yaml:"), "{error}");
    assert!(
        report
            .failed
            .iter()
            .any(|(git_ref, bundle, _)| git_ref == "refs/tags/v3" && bundle == "kiosk")
    );
    assert!(
        hub.release("refs/tags/v3", "pos")
            .unwrap()
            .generation
            .is_some()
    );
    assert!(
        hub.release("refs/tags/v1", "kiosk")
            .unwrap()
            .generation
            .is_some(),
        "older releases unaffected"
    );
}

#[test]
fn force_moved_tag_gets_a_new_generation_and_deleted_tag_is_withdrawn() {
    let upstream = two_bundles();
    let mut hub = Hub::new();
    hub.sync(&upstream.url(), 1_800_000_100);
    assert_eq!(
        hub.release("refs/tags/v1", "pos").unwrap().generation,
        Some(1)
    );

    upstream.write("pos/app.yaml", &config_map("pos", "moved"));
    upstream.commit("fix");
    upstream.git(&["tag", "-f", "v1"]);
    upstream.git(&["tag", "gone"]);
    hub.sync(&upstream.url(), 1_800_000_200);
    assert_eq!(
        hub.release("refs/tags/v1", "pos").unwrap().generation,
        Some(2)
    );
    let events = hub.store.events(10).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "tag-moved" && e.subject == "refs/tags/v1"),
        "{events:?}"
    );

    upstream.git(&["tag", "-d", "gone"]);
    hub.sync(&upstream.url(), 1_800_000_300);
    assert!(hub.release("refs/tags/gone", "pos").is_none());
    assert!(
        hub.store
            .events(10)
            .unwrap()
            .iter()
            .any(|e| e.kind == "ref-deleted")
    );
    // The tag comes back at the old content: same body, but never generation 1 again for a new
    // render; here the body equals generation 2's, so that snapshot is reused.
    upstream.git(&["tag", "gone"]);
    hub.sync(&upstream.url(), 1_800_000_400);
    assert_eq!(
        hub.release("refs/tags/gone", "pos").unwrap().generation,
        Some(2)
    );
}

#[test]
fn outpost_yaml_declares_bundles_and_selectors() {
    let upstream = Upstream::new();
    upstream.write("apps/pos/app.yaml", &config_map("pos", "1"));
    upstream.write(
        "outpost.yaml",
        "bundles:\n- name: pos-eu\n  path: apps/pos\n  selector:\n    matchLabels: {region: eu}\n",
    );
    upstream.commit("declared");
    let mut hub = Hub::new();
    hub.sync(&upstream.url(), 1_800_000_100);
    let snapshot = hub.store.snapshot("pos-eu", 1).unwrap().unwrap();
    let header = outpost_proto::SnapshotHeader::decode(&snapshot.header).unwrap();
    assert_eq!(header.selector, "region=eu");

    upstream.write("outpost.yaml", "bundles:\n- name: pos-eu\n  path: apps/pos\n  selector: {matchLabels: {region: 'not valid!'}}\n");
    upstream.commit("broken definitions");
    let report = hub.sync(&upstream.url(), 1_800_000_200);
    assert!(
        report
            .failed
            .iter()
            .any(|(_, what, error)| what == "outpost.yaml"
                && error.contains("not a valid label value")),
        "{report:?}"
    );
}

#[test]
fn drift_report_in_outpost_yaml_annotates_every_object_unless_it_says_otherwise() {
    let upstream = Upstream::new();
    upstream.write("apps/pos/app.yaml", &config_map("pos", "1"));
    upstream.write(
        "apps/pos/own.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: own\n  namespace: shop\n  annotations: {outpost.io/drift: correct}\n",
    );
    upstream.write(
        "outpost.yaml",
        "bundles:\n- name: pos\n  path: apps/pos\n  drift: report\n",
    );
    upstream.commit("report drift");
    let mut hub = Hub::new();
    hub.sync(&upstream.url(), 1_800_000_100);
    let body = |hub: &Hub, generation| {
        let snapshot = hub.store.snapshot("pos", generation).unwrap().unwrap();
        String::from_utf8(snapshot.body).unwrap()
    };
    let first = body(&hub, 1);
    assert!(first.contains(r#""outpost.io/drift":"report""#), "{first}");
    assert!(
        first.contains(r#""outpost.io/drift":"correct""#),
        "an object's own annotation stands: {first}"
    );
    // Back to the default: the same tree renders again, without the annotation.
    upstream.write("outpost.yaml", "bundles:\n- name: pos\n  path: apps/pos\n");
    upstream.commit("correct drift");
    hub.sync(&upstream.url(), 1_800_000_200);
    let second = body(&hub, 2);
    assert!(
        !second.contains(r#""outpost.io/drift":"report""#),
        "{second}"
    );

    upstream.write(
        "outpost.yaml",
        "bundles:\n- name: pos\n  path: apps/pos\n  drift: ignore\n",
    );
    upstream.commit("unknown mode");
    let report = hub.sync(&upstream.url(), 1_800_000_300);
    assert!(
        report
            .failed
            .iter()
            .any(|(_, what, error)| what == "outpost.yaml"
                && error.contains("drift: \"ignore\" is neither")),
        "{report:?}"
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fetches_from_git_daemon_and_survives_it_going_away() {
    let upstream = two_bundles();
    let base = upstream.path().parent().unwrap().to_owned();
    let name = upstream
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let port = support::free_port();
    // Run git-daemon itself, not through the `git` wrapper, so killing it stops the server.
    let exec_path = upstream.git(&["--exec-path"]);
    let daemon = Daemon(
        Command::new(std::path::Path::new(&exec_path).join("git-daemon"))
            .args(["--export-all", "--reuseaddr", "--listen=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(&base)
            .spawn()
            .expect("git daemon"),
    );
    let url = format!("git://127.0.0.1:{port}/{name}");
    let mut hub = Hub::new();
    let mut report = hub.sync(&url, 1_800_000_100);
    for _ in 0..50 {
        if report.fetch_error.is_none() {
            break;
        }
        // The daemon may still be starting.
        std::thread::sleep(std::time::Duration::from_millis(100));
        report = hub.sync(&url, 1_800_000_100);
    }
    assert_eq!(report.fetch_error, None);
    assert_eq!(
        hub.release("refs/tags/v1", "pos").unwrap().generation,
        Some(1)
    );

    drop(daemon);
    let report = hub.sync(&url, 1_800_000_200);
    assert!(report.fetch_error.is_some());
    assert!(
        hub.store
            .events(5)
            .unwrap()
            .iter()
            .any(|e| e.kind == "fetch-failed")
    );
    assert_eq!(
        hub.release("refs/tags/v1", "pos").unwrap().generation,
        Some(1),
        "keeps serving what it has"
    );
}

#[test]
fn overlays_and_label_substitution_render_one_snapshot_per_variant() {
    let upstream = Upstream::new();
    upstream.write(
        "apps/pos/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pos, namespace: shop}\ndata: {store: 'store-${label:store-id}', currency: EUR}\n",
    );
    upstream.write(
        "apps/pos-us/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pos, namespace: shop}\ndata: {store: 'store-${label:store-id}', currency: USD}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: tax, namespace: shop}\ndata: {mode: sales-tax}\n",
    );
    upstream.write(
        "outpost.yaml",
        "bundles:\n- name: pos\n  path: apps/pos\n  selector: {matchLabels: {role: store}}\n  overlays:\n  - {selector: {matchLabels: {region: us}}, path: apps/pos-us}\n  substitute: [store-id]\n",
    );
    upstream.commit("pos with a US overlay");
    let mut hub = Hub::new();
    // Three agents: two in the EU (one store each), one in the US; one without a store-id.
    for (seed, labels) in [
        (
            1u8,
            vec![("role", "store"), ("region", "eu"), ("store-id", "17")],
        ),
        (
            2,
            vec![("role", "store"), ("region", "us"), ("store-id", "42")],
        ),
        (3, vec![("role", "store"), ("region", "eu")]),
    ] {
        let token = outpost_proto::Digest::of(&[seed]);
        let labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        hub.store
            .create_token(&token, &labels, "test", 0, i64::MAX)
            .unwrap();
        hub.store.enrol(&token, &[seed; 32], 1).unwrap().unwrap();
    }
    hub.sync(&upstream.url(), 1_800_000_100);
    let releases: Vec<_> = hub
        .store
        .releases()
        .unwrap()
        .into_iter()
        .filter(|r| r.git_ref == "refs/heads/main")
        .collect();
    let variants: Vec<&str> = releases.iter().map(|r| r.variant.as_str()).collect();
    assert_eq!(
        variants,
        ["overlays=0;store-id=42", "store-id=17"],
        "the agent without a store-id gets none"
    );
    let body = |variant: &str| {
        let release = releases.iter().find(|r| r.variant == variant).unwrap();
        let snapshot = hub
            .store
            .snapshot("pos", release.generation.unwrap())
            .unwrap()
            .unwrap();
        let header = outpost_proto::SnapshotHeader::decode(&snapshot.header).unwrap();
        (String::from_utf8(snapshot.body).unwrap(), header.selector)
    };
    let (us, us_selector) = body("overlays=0;store-id=42");
    assert!(
        us.contains(r#""currency":"USD","store":"store-42""#),
        "{us}"
    );
    assert!(us.contains(r#""name":"tax""#), "{us}");
    assert_eq!(us_selector, "region=us,role=store,store-id=42");
    let (eu, _) = body("store-id=17");
    assert!(
        eu.contains(r#""currency":"EUR","store":"store-17""#),
        "{eu}"
    );
    assert!(!eu.contains("tax"), "{eu}");

    // The EU agent moves to the US: its old variant is withdrawn, a new one rendered.
    let eu_agent = outpost_hub::store::agent_id(&[1; 32]);
    let changes = [("region".to_owned(), Some("us".to_owned()))].into();
    hub.store
        .label_agent(&eu_agent, &changes, "test", 2)
        .unwrap();
    let report = hub.sync(&upstream.url(), 1_800_000_200);
    assert_eq!(report.rendered.len(), 1, "{report:?}");
    let variants: Vec<String> = hub
        .store
        .releases()
        .unwrap()
        .into_iter()
        .filter(|r| r.git_ref == "refs/heads/main")
        .map(|r| r.variant)
        .collect();
    assert_eq!(
        variants,
        ["overlays=0;store-id=17", "overlays=0;store-id=42"]
    );
}

#[test]
fn a_branch_moved_back_to_an_earlier_commit_is_released_again() {
    // The hub's loop keeps a memo of what it released between syncs; a branch reset to a
    // commit it named before (a revert by force-push) must be released again, not skipped.
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    let first = upstream.commit("first");
    upstream.git(&["branch", "-M", "main"]);
    let mut hub = Hub::new();
    let source = GitSource::open_or_init(&upstream.url(), &hub.data.path().join("mirror")).unwrap();
    let mut memo = outpost_hub::sync::RenderMemo::default();
    let mut sync = |hub: &mut Hub, now: i64| {
        let fetched = source
            .fetch()
            .map(|_| ())
            .map_err(|error| error.to_string());
        outpost_hub::sync::render_remembering(
            &hub.store, &hub.keys, &source, fetched, now, &mut memo,
        )
        .unwrap()
    };
    sync(&mut hub, 1_800_000_100);
    let at_first = hub.release("refs/heads/main", "pos").unwrap();
    assert_eq!(at_first.git_commit, first);
    upstream.write("pos/app.yaml", &config_map("pos", "2"));
    let second = upstream.commit("second");
    sync(&mut hub, 1_800_000_200);
    assert_eq!(
        hub.release("refs/heads/main", "pos").unwrap().git_commit,
        second
    );
    upstream.git(&["reset", "--hard", &first]);
    sync(&mut hub, 1_800_000_300);
    let back = hub.release("refs/heads/main", "pos").unwrap();
    assert_eq!(
        back.git_commit, first,
        "the branch is back at the first commit"
    );
    assert_eq!(
        back.generation, at_first.generation,
        "the same render, reused"
    );
}
