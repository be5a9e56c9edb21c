//! The hub at fleet scale, in one process: a thousand in-memory agents (each its own key and
//! QUIC connection on loopback, verifying what it installs) against the real hub runtime with
//! a Git source and its admin API. What is counted is the store's own read counter.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_hub::api::listener::HttpListener;
use outpost_hub::api::{EnrolmentInfo, auth::new_secret};
use outpost_hub::config::SourceConfig;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::runtime::{Hub, HubParts, HubSettings, SourceSettings};
use outpost_hub::store::{AuthStore, FleetStore, NewToken, Role, SqliteStore, Store};
use outpost_proto::Digest;
use outpost_proto::transport::{Tuning, hub_pin, server_config};
use outpost_sim::load::{Fleet, FleetOptions};

const AGENTS: usize = 1_000;

fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

fn config_map(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: shop\ndata:\n  value: \"{value}\"\n"
    )
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

fn wait(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {seconds} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The digest of a bundle's release on `main` for the agents' (empty or `role=kiosk`)
/// variant, once rendered.
fn released(store: &SqliteStore, bundle: &str) -> Option<Digest> {
    let release = store
        .releases()
        .ok()?
        .into_iter()
        .find(|release| release.bundle == bundle && release.git_ref == "refs/heads/main")?;
    store.snapshot_digest(bundle, release.generation?).ok()?
}

#[test]
fn a_label_change_on_one_of_a_thousand_agents_reads_for_that_agent_only() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::create_dir_all(repo.join("kiosk")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join("outpost.yaml"),
        "bundles:\n  - name: shop\n    path: shop\n  - name: kiosk\n    path: kiosk\n    selector:\n      matchLabels:\n        role: kiosk\n",
    )
    .unwrap();
    std::fs::write(repo.join("shop/app.yaml"), config_map("shop", "1")).unwrap();
    std::fs::write(repo.join("kiosk/app.yaml"), config_map("kiosk", "1")).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);

    let data = work.path().join("hub");
    let keys = Arc::new(HubKeys::create(&data.join("keys"), KeyPolicy::default(), now()).unwrap());
    let store = SqliteStore::open(&data.join("hub.db")).unwrap();
    let (admin_token, admin_digest) = new_secret().unwrap();
    store
        .create_admin_token(
            &NewToken {
                name: "ops".to_owned(),
                role: Role::Operator,
                expires_at: None,
            },
            &admin_digest,
            "test",
            now(),
        )
        .unwrap()
        .unwrap();
    let tokens: Vec<String> = (0..AGENTS).map(|_| new_secret().unwrap().0).collect();
    let digests: Vec<Digest> = tokens
        .iter()
        .map(|token| Digest::of(token.as_bytes()))
        .collect();
    store
        .create_tokens(&digests, &Default::default(), "test", now(), now() + 3_600)
        .unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (hub, admin, fleet) = runtime.block_on(async {
        let quic = server_config(keys.transport(), &Tuning::default()).unwrap();
        let (agents, _) = outpost_hub::udp::endpoint(
            "127.0.0.1:0".parse().unwrap(),
            Some(quic),
            outpost_hub::udp::WANTED_BUFFER,
        )
        .unwrap();
        let address = agents.local_addr().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = listener.local_addr().unwrap();
        let source = SourceSettings {
            config: SourceConfig {
                name: "fleet".to_owned(),
                url: repo.display().to_string(),
                credentials: None,
                track: Some("refs/heads/main".to_owned()),
                webhook_secret: None,
                kustomize: None,
                kustomize_unisolated: false,
                verify: None,
            },
            mirror: data.join("mirrors/fleet.git"),
        };
        let mut settings = HubSettings::new(vec![source], &keys);
        settings.poll_interval = Duration::from_secs(3_600);
        let hub = Hub::start(HubParts {
            settings,
            store: Arc::new(store.clone()),
            keys: keys.clone(),
            clock: now,
            agents,
            enrolment: EnrolmentInfo {
                hub_address: address.to_string(),
                hub_pin: hub_pin(&keys.transport().public_key()),
                root_key: keys.root(),
            },
            admin: Some(HttpListener::new(listener, None, "admin").unwrap()),
            hooks: None,
            replication: None,
        });
        let fleet = Fleet::start(
            FleetOptions {
                hub: address,
                per_socket: 500,
                connect_rate: 400,
            },
            Fleet::trusting(keys.root(), hub_pin(&keys.transport().public_key())),
            tokens,
        )
        .unwrap();
        (hub, admin, fleet)
    });
    wait("the first render", 60, || {
        released(&store, "shop").is_some()
    });
    let shop = released(&store, "shop").unwrap();
    wait("every agent on the shop bundle", 240, || {
        fleet.holding(&shop) == AGENTS
    });

    let reads = || store.counters().reads.load(Ordering::Relaxed);
    let service = hub.service().clone();
    let session_reads = || service.counters().session_reads.load(Ordering::Relaxed);
    let quiet = || {
        // Until nothing reads for a second (status reports, last-seen writes settle).
        let mut last = reads();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = reads();
            if now - last <= 2 {
                return now;
            }
            last = now;
        }
    };
    let before = quiet();
    let sessions_before = session_reads();
    let chosen = fleet.ids()[AGENTS / 2].clone();
    let mut response = ureq::post(&format!("http://{admin}/api/v1/agents/{chosen}/labels"))
        .header("authorization", &format!("Bearer {admin_token}"))
        .send_json(serde_json::json!({"labels": {"role": "kiosk"}}))
        .unwrap();
    assert!(
        response.status().is_success(),
        "{:?}",
        response.body_mut().read_to_string()
    );
    wait("the kiosk bundle rendered", 60, || {
        released(&store, "kiosk").is_some()
    });
    let kiosk = released(&store, "kiosk").unwrap();
    wait("the labelled agent on the kiosk bundle", 60, || {
        fleet.holding(&kiosk) == 1
    });
    let after = quiet();
    let label_reads = after - before;
    let label_sessions = session_reads() - sessions_before;
    eprintln!(
        "a label change on 1 of {AGENTS} connected agents: {label_reads} store reads, {label_sessions} sessions read their agent"
    );
    assert!(
        label_reads < 100,
        "{label_reads} store reads for one agent's label change: other connections re-read"
    );
    assert!(
        (1..=3).contains(&label_sessions),
        "{label_sessions} sessions read their agent again; only the labelled one should"
    );
    assert_eq!(
        fleet.holding(&shop),
        AGENTS,
        "the others kept what they had"
    );
    assert_eq!(
        store
            .assignments(&chosen)
            .unwrap()
            .entries
            .iter()
            .map(|entry| entry.bundle.as_str())
            .collect::<Vec<_>>(),
        ["kiosk", "shop"]
    );

    // The contrast: a commit every agent runs makes every connection read.
    std::fs::write(repo.join("shop/app.yaml"), config_map("shop", "2")).unwrap();
    git(&repo, &["commit", "-q", "-am", "second"]);
    let before = quiet();
    let sessions_before = session_reads();
    ureq::post(&format!("http://{admin}/api/v1/fetch"))
        .header("authorization", &format!("Bearer {admin_token}"))
        .send_json(serde_json::json!({}))
        .unwrap();
    wait("the second commit rendered", 60, || {
        released(&store, "shop") != Some(shop)
    });
    let second = released(&store, "shop").unwrap();
    wait("every agent on the second commit", 240, || {
        fleet.holding(&second) == AGENTS
    });
    let commit_reads = quiet() - before;
    let commit_sessions = session_reads() - sessions_before;
    eprintln!(
        "a commit to all {AGENTS}: {commit_reads} store reads (batched), {commit_sessions} sessions read their agent"
    );
    assert!(
        commit_sessions >= AGENTS as u64,
        "a change for everyone is read by everyone ({commit_sessions} sessions): the counters count"
    );
    drop(fleet);
    runtime.block_on(hub.shutdown());
}
