//! Transfers over bad links: heavy loss and latency, an agent killed again and again during a
//! transfer, and a relay that alters payload bytes. Real QUIC through the seeded lossy relay.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_e2e::harness::{TestAgent, TestHub, bulky_manifests, quick_options};
use outpost_e2e::lossy::{LinkProfile, Relay};
use outpost_hub::transport::ServiceOptions;
use outpost_proto::transport::Tuning;

fn options() -> ServiceOptions {
    ServiceOptions {
        compression_level: 3,
        ..ServiceOptions::default()
    }
}

async fn within<T>(seconds: u64, what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {seconds}s waiting for {what}"))
}

/// Five ConfigMaps of 1 MB random bytes each: a ~6.7 MB body (base64) whose payload is ~5 MB.
fn five_megabytes(seed: u64) -> String {
    bulky_manifests(5, 1_000_000, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabytes_at_30_percent_loss_and_300ms_rtt() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let link = LinkProfile::lossy(0.30, Duration::from_millis(300));
    let relay = Relay::start(hub.address, link.clone(), link, 30)
        .await
        .unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let token = hub.token(&[]);
    let mut agent = TestAgent::new(
        dirs.path(),
        &hub,
        relay.address(),
        &token,
        quick_options(30),
    );
    agent.start();
    let id = within(60, "enrolment over the lossy link", agent.enrolled()).await;
    let snapshot = hub.publish("big", &five_megabytes(1));
    let started = Instant::now();
    hub.assign(&id, "big", snapshot);
    within(300, "5 MB over the lossy link", agent.holds(snapshot)).await;
    let payload = agent
        .client
        .counters()
        .payload_bytes
        .load(Ordering::Relaxed);
    assert!(payload >= 5_000_000, "payload was {payload} bytes");
    eprintln!(
        "5 MB payload ({payload} B) at 30% loss each way, 300 ms RTT: {:.1}s, relay dropped {} packets",
        started.elapsed().as_secs_f64(),
        relay.stats().dropped.load(Ordering::Relaxed)
    );
    // What was kept verifies again from the file.
    let held = agent
        .client
        .with_state(move |state| state.load_snapshot("big", &snapshot.digest))
        .await
        .unwrap();
    assert!(held.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_killed_ten_times_resumes_each_time() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    // A 10 Mbit/s link with a 50 ms round trip and a 100 ms router queue. What is in flight
    // when the agent dies (about one bandwidth-delay product, here ~60 KB, plus the queue) is
    // lost whatever the protocol; everything the agent had received is kept.
    let link = LinkProfile {
        delay: Duration::from_millis(25),
        bandwidth_bps: Some(10_000_000),
        queue_limit: Duration::from_millis(100),
        ..LinkProfile::default()
    };
    let relay = Relay::start(hub.address, link.clone(), link, 10)
        .await
        .unwrap();
    let dirs = tempfile::tempdir().unwrap();
    let token = hub.token(&[]);
    let mut agent = TestAgent::new(
        dirs.path(),
        &hub,
        relay.address(),
        &token,
        quick_options(10),
    );
    agent.start();
    let id = within(30, "enrolment", agent.enrolled()).await;
    let snapshot = hub.publish("big", &five_megabytes(2));
    let before = relay.stats().down_bytes_delivered.load(Ordering::Relaxed);
    hub.assign(&id, "big", snapshot);

    let mut payload_size = 0;
    let mut received_by_agents = 0;
    for kill in 1..=10u64 {
        // Wait until the agent has durably kept about kill/11 of the payload, then kill it.
        let kept = within(60, "transfer progress", async {
            loop {
                let download = agent
                    .client
                    .with_state(move |state| state.download(&snapshot.digest))
                    .await
                    .unwrap();
                if let Some(download) = download {
                    payload_size = download.payload_size;
                    if download.received >= download.payload_size * kill / 11 {
                        return download.received;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        received_by_agents += agent
            .client
            .counters()
            .payload_bytes
            .load(Ordering::Relaxed);
        agent.restart();
        // The restarted agent's state still holds what was kept.
        let after = agent
            .client
            .with_state(move |state| state.download(&snapshot.digest))
            .await
            .unwrap()
            .map_or(0, |download| download.received);
        assert!(
            after >= kept,
            "kept {kept} bytes before the kill, {after} after"
        );
    }
    within(60, "the rest of the transfer", agent.holds(snapshot)).await;
    received_by_agents += agent
        .client
        .counters()
        .payload_bytes
        .load(Ordering::Relaxed);
    let on_the_wire = relay.stats().down_bytes_delivered.load(Ordering::Relaxed) - before;
    let resent = received_by_agents.saturating_sub(payload_size);
    eprintln!(
        "payload {payload_size} B; received by the agent processes {received_by_agents} B ({:.1}% twice); hub→agent on the wire {on_the_wire} B ({:.2}× the payload)",
        100.0 * resent as f64 / payload_size as f64,
        on_the_wire as f64 / payload_size as f64
    );
    assert!(
        resent * 5 < payload_size,
        "{resent} of {payload_size} payload bytes were received twice"
    );
    // On the wire, each kill also loses what was in flight and queued (the agent died with it):
    // about a bandwidth-delay product plus the router queue, whatever the protocol. Starting
    // over instead of resuming would cost ~5.5× the payload; resuming stays far below 2×.
    assert!(
        on_the_wire < payload_size * 2,
        "{on_the_wire} bytes on the wire for a payload of {payload_size}"
    );
}
