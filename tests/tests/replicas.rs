//! Agents given several hub addresses: one that does not answer is skipped, and when the
//! replica an agent is connected to stops, the agent goes on with another one on the same
//! store — from the shared state: enrolment, assignment sequence, held snapshots. Real QUIC on
//! loopback, real SQLite files; the replicas are two hub runtimes on one store.

use std::time::Duration;

use outpost_e2e::harness::{
    TestAgent, TestHub, eventually, quick_options, test_service_options as options, within,
};
use outpost_hub::store::FleetStore;
use outpost_proto::transport::Tuning;
use outpost_proto::wire::{BundleStatus, Phase};

const APP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: default\ndata:\n  version: \"1\"\n";

fn edited(version: u32) -> String {
    APP.replace("version: \"1\"", &format!("version: \"{version}\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_does_not_answer_is_skipped() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    // A socket nobody reads: handshakes sent there vanish (no ICMP answer on a bound port).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // The live hub by name: "localhost" may also resolve to ::1, which this IPv4 agent
    // socket cannot dial — one more address to pass over.
    let hubs = format!(
        "{},localhost:{}",
        silent.local_addr().unwrap(),
        hub.address.port()
    );
    let dirs = tempfile::tempdir().unwrap();
    let mut agent = TestAgent::dialling(
        &dirs.path().join("a"),
        &hub,
        &hubs,
        &hub.token(&[]),
        outpost_agent::ClientOptions {
            connect_timeout: Duration::from_secs(1),
            ..quick_options(1)
        },
    );
    agent.start();
    let id = within(60, "enrolment past the silent address", agent.enrolled_id()).await;
    let first = hub.publish("app", APP);
    hub.assign(&id, "app", first);
    within(30, "the snapshot", agent.holds(first)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_a_stopped_replica_go_on_with_another() {
    let mut hub = TestHub::start(options(), &Tuning::default()).await;
    let replica = hub.replica(options(), &Tuning::default());
    let hubs = format!("{},{}", hub.address, replica.address);
    let dirs = tempfile::tempdir().unwrap();
    let mut agents = Vec::new();
    for index in 0..3u64 {
        let mut agent = TestAgent::dialling(
            &dirs.path().join(format!("agent-{index}")),
            &hub,
            &hubs,
            &hub.token(&[]),
            quick_options(10 + index),
        );
        agent.start();
        let id = within(60, "enrolment", agent.enrolled_id()).await;
        agents.push((agent, id));
    }
    let first = hub.publish("app", APP);
    for (agent, id) in &agents {
        hub.assign(id, "app", first);
        // An agent that reached the replica first (a slow handshake) hears of it from there.
        replica.wake(std::slice::from_ref(id));
        within(30, "v1", agent.holds(first)).await;
    }
    let before: Vec<u64> = agents
        .iter()
        .map(|(agent, _)| {
            agent
                .client
                .counters()
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .collect();

    // The first replica goes away; the next release is decided in the shared store only.
    hub.stop();
    let second = hub.publish("app", &edited(2));
    for (_, id) in &agents {
        hub.assign(id, "app", second);
        replica.wake(std::slice::from_ref(id));
    }
    for ((agent, id), connections) in agents.iter().zip(before) {
        within(60, "v2 through the other replica", agent.holds(second)).await;
        assert!(
            agent
                .client
                .counters()
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
                > connections,
            "agent {id} never reconnected"
        );
        // Its report reaches the shared store through the replica it is connected to now.
        agent
            .client
            .report(vec![BundleStatus {
                bundle: "app".to_owned(),
                digest: second.digest,
                generation: second.generation,
                phase: Phase::Healthy,
                objects_total: 1,
                objects_ready: 1,
                message: String::new(),
                observed_at: 0,
                stale: false,
            }])
            .await
            .unwrap();
        eventually(30, "the report of v2", async || {
            hub.store.statuses(Some(id)).unwrap().iter().any(|stored| {
                stored.status.generation == second.generation
                    && stored.status.phase == Phase::Healthy
            })
        })
        .await;
    }
}
