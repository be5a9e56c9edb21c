//! Crash safety with real agent processes: `outpost-agent run` killed with SIGKILL at random
//! moments — while enrolling, fetching, installing, applying, pruning — many times, against an
//! in-process hub (real QUIC) and the Kubernetes API test server. After every kill the state
//! database must be whole, every held snapshot must verify, generations must never go down, and
//! every object the agent labelled in the cluster must be in its inventory. Then a truncated
//! database: moved aside, rebuilt from the hub, the cluster kept right.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_agent::{State, paths};
use outpost_e2e::harness::{Published, TestHub, bulky_manifests, test_service_options};
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{Process, binary, enrol_agent, run, wait_for};
use outpost_hub::store::FleetStore;
use outpost_proto::transport::Tuning;

/// Generation `round`'s manifests: a different number of blobs each time (so objects are
/// pruned), new bytes, and a marker saying which release this is.
fn release(round: u64) -> String {
    let count = blob_count(round);
    format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: marker, namespace: default}}\ndata: {{release: \"{round}\"}}\n",
        bulky_manifests(count, 6_000, round)
    )
}

fn blob_count(round: u64) -> usize {
    40 + (round as usize % 3) * 40
}

struct Setup {
    runtime: tokio::runtime::Runtime,
    hub: TestHub,
    cluster: KubeApiServer,
    work: tempfile::TempDir,
    id: String,
}

impl Setup {
    fn new() -> Setup {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let hub = runtime.block_on(TestHub::start(test_service_options(), &Tuning::default()));
        let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
        let work = tempfile::tempdir().unwrap();
        std::fs::write(work.path().join("kubeconfig"), cluster.kubeconfig()).unwrap();
        let id = enrol_agent(
            &binary("outpost-agent"),
            &hub,
            work.path(),
            &state_dir(work.path()),
        );
        Setup {
            runtime,
            hub,
            cluster,
            work,
            id,
        }
    }

    fn agent(&self) -> Process {
        Process(
            Command::new(binary("outpost-agent"))
                .args(["run", "--kubeconfig"])
                .arg(self.work.path().join("kubeconfig"))
                .env("OUTPOST_AGENT_STATE_DIR", state_dir(self.work.path()))
                .env("OUTPOST_AGENT_DRIFT_SECONDS", "2")
                .env("OUTPOST_LOG", "error")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn publish(&self, round: u64) -> Published {
        let published = self.hub.publish("blobs", &release(round));
        self.hub.assign(&self.id, "blobs", published);
        published
    }

    /// Waits until the cluster holds exactly release `round` and the agent reports it healthy.
    fn converged(&self, round: u64, published: Published) {
        let expected: BTreeSet<String> = (0..blob_count(round))
            .map(|i| format!("blob-{i}"))
            .chain(["marker".to_owned()])
            .collect();
        wait_for("the cluster to hold the last release", 120, || {
            let names: BTreeSet<String> = self
                .cluster
                .names("outpost.io/bundle=blobs")
                .into_iter()
                .map(|(_, _, name)| name)
                .collect();
            let marker = self.cluster.object("v1", "ConfigMap", "default", "marker");
            names == expected
                && marker.is_some_and(|m| m["data"]["release"] == round.to_string().as_str())
        });
        let dir = state_dir(self.work.path());
        wait_for("a healthy report of the last release", 60, || {
            let status: serde_json::Value = serde_json::from_str(&run(
                &binary("outpost-agent"),
                &["status", "--output", "json"],
                &[("OUTPOST_AGENT_STATE_DIR", dir.clone())],
            ))
            .unwrap();
            status["bundles"][0]["phase"] == "Healthy"
                && status["bundles"][0]["generation"] == published.generation
        });
    }
}

fn state_dir(work: &Path) -> String {
    work.join("agent").display().to_string()
}

/// The invariants a kill at any instant must keep; returns the newest generation held.
fn check_state(setup: &Setup, newest_before: u64) -> u64 {
    let dir = setup.work.path().join("agent");
    let state = State::open(&paths::database(&dir)).expect("the state opens after a kill");
    state.quick_check().expect("SQLite's quick check passes");
    let held = state.held().unwrap();
    let mut per_bundle: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for snapshot in &held {
        let verified = state
            .load_snapshot(&snapshot.bundle, &snapshot.digest)
            .expect("every held snapshot verifies")
            .expect("held");
        assert_eq!(verified.header().generation, snapshot.generation);
        per_bundle
            .entry(snapshot.bundle.clone())
            .or_default()
            .push(snapshot.generation);
    }
    let newest = per_bundle
        .get("blobs")
        .map_or(0, |g| g.iter().copied().max().unwrap_or(0));
    assert!(
        newest >= newest_before,
        "generation went down: {newest} < {newest_before}"
    );
    assert!(per_bundle.values().all(|g| g.len() <= 2), "{per_bundle:?}");
    let inventory: BTreeSet<_> = state
        .inventory("blobs")
        .unwrap()
        .into_iter()
        .map(|r| (r.kind, r.namespace, r.name))
        .collect();
    for object in setup.cluster.names("outpost.io/bundle=blobs") {
        assert!(
            inventory.contains(&object),
            "{object:?} is in the cluster with the agent's label but not in its inventory"
        );
    }
    state.outbox(0, 100_000).expect("the outbox decodes");
    eprintln!(
        "after the kill: newest generation {newest}, {} held, {} in the inventory, {} labelled in the cluster, {} downloads",
        held.len(),
        inventory.len(),
        setup.cluster.names("outpost.io/bundle=blobs").len(),
        state
            .assignments()
            .unwrap()
            .iter()
            .filter_map(|a| state.download(&a.digest).ok().flatten())
            .count()
    );
    newest
}

#[test]
fn kill_9_at_random_moments_leaves_the_old_state_or_the_new_one() {
    let setup = Setup::new();
    let mut random = 0x0DD5_EED5_u64;
    let mut next = || {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        random
    };
    let mut newest = 0;
    let mut published = setup.publish(0);
    let rounds = 24;
    for round in 0..rounds {
        if round % 4 == 3 {
            published = setup.publish(round / 4 + 1);
        }
        let agent = setup.agent();
        std::thread::sleep(Duration::from_millis(30 + next() % 900));
        drop(agent); // SIGKILL
        newest = check_state(&setup, newest);
    }
    let last = (rounds - 1) / 4 + u64::from((rounds - 1) % 4 == 3);
    assert!(
        newest > 0,
        "the agent installed something in {rounds} rounds"
    );
    let _agent = setup.agent();
    setup.converged(last, published);
    drop(setup.runtime);
}

#[test]
fn a_truncated_database_is_moved_aside_and_rebuilt_from_the_hub() {
    let setup = Setup::new();
    let published = setup.publish(1);
    {
        let _agent = setup.agent();
        setup.converged(1, published);
    }
    let database = setup.work.path().join("agent/agent.db");
    let bytes = std::fs::read(&database).unwrap();
    std::fs::write(&database, &bytes[..bytes.len() / 3]).unwrap();
    let _ = std::fs::remove_file(setup.work.path().join("agent/agent.db-wal"));
    // Meanwhile someone deletes the marker: the rebuilt agent must restore it.
    assert!(
        setup.runtime.block_on(setup.cluster.kubectl_delete(
            "v1",
            "ConfigMap",
            "default",
            "marker"
        ))
    );
    let reports_before = setup.hub.store.status_history_len(&setup.id).unwrap();
    let _agent = setup.agent();
    setup.converged(1, published);
    // Its new reports are stored by the hub, not dropped as replays of old sequences.
    wait_for("new reports at the hub", 60, || {
        setup.hub.store.status_history_len(&setup.id).unwrap() > reports_before
    });
    let moved: Vec<_> = std::fs::read_dir(setup.work.path().join("agent"))
        .unwrap()
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("agent.db.damaged-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "the damaged file is kept aside");
    drop(setup.runtime);
}
