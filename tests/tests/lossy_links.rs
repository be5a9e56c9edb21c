//! Transfers over bad links: heavy loss and latency, an agent killed again and again during a
//! transfer, and a relay that alters payload bytes. Real QUIC through the seeded lossy relay.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_e2e::harness::{
    TestAgent, TestHub, bulky_manifests, quick_options, test_service_options as options, within,
};
use outpost_e2e::lossy::{LinkProfile, Relay};
use outpost_proto::transport::Tuning;

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
    let (agent, id) =
        TestAgent::enrolled(dirs.path(), &hub, relay.address(), quick_options(30)).await;
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
    let (mut agent, id) =
        TestAgent::enrolled(dirs.path(), &hub, relay.address(), quick_options(10)).await;
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

/// A man in the middle holding the hub's stolen TLS key and the agent's key: it relays every
/// stream, and rewrites the first `tamper` transfers — one payload byte flipped, the payload
/// digest recomputed so the transport-level check passes. Only the signed body digest is left
/// to catch it.
async fn malicious_relay(
    agent_side: quinn::Endpoint,
    hub: std::net::SocketAddr,
    upstream_config: quinn::ClientConfig,
    tamper: std::sync::Arc<std::sync::atomic::AtomicU32>,
) {
    use outpost_proto::transport::{MessageReader, send_message};
    use outpost_proto::wire::Message;
    let upstream_endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    while let Some(incoming) = agent_side.accept().await {
        let Ok(downstream) = incoming.await else {
            continue;
        };
        // Posing as the hub, the relay lets the agent open its fetch streams.
        outpost_proto::transport::allow_identified(&downstream);
        let Ok(connecting) =
            upstream_endpoint.connect_with(upstream_config.clone(), hub, "outpost-hub")
        else {
            continue;
        };
        let Ok(upstream) = connecting.await else {
            continue;
        };
        let tamper = tamper.clone();
        tokio::spawn(async move {
            let mut first = true;
            while let Ok((mut down_send, mut down_recv)) = downstream.accept_bi().await {
                let Ok((mut up_send, mut up_recv)) = upstream.open_bi().await else {
                    return;
                };
                if first {
                    // The control stream: pass bytes through both ways.
                    first = false;
                    tokio::spawn(async move {
                        let mut buffer = vec![0u8; 65536];
                        while let Ok(Some(n)) = down_recv.read(&mut buffer).await {
                            if up_send.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    tokio::spawn(async move {
                        let mut buffer = vec![0u8; 65536];
                        while let Ok(Some(n)) = up_recv.read(&mut buffer).await {
                            if down_send.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                    continue;
                }
                let tamper = tamper.clone();
                tokio::spawn(async move {
                    // A fetch: forward the request, take the whole answer, maybe rewrite it.
                    let mut request = MessageReader::new(down_recv);
                    let Ok(Some(fetch)) = request.next().await else {
                        return;
                    };
                    if send_message(&mut up_send, &fetch).await.is_err() {
                        return;
                    }
                    let _ = up_send.finish();
                    let mut answer = Vec::new();
                    let mut replies = MessageReader::new(up_recv);
                    while let Ok(Some(message)) = replies.next().await {
                        answer.push(message);
                    }
                    let should_tamper = tamper
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if should_tamper {
                        let mut payload = Vec::new();
                        for message in &answer {
                            if let Message::TransferChunk(chunk) = message {
                                payload.extend_from_slice(&chunk.bytes);
                            }
                        }
                        let middle = payload.len() / 2;
                        payload[middle] ^= 0x20;
                        let digest = outpost_proto::Digest::of(&payload);
                        let mut position = 0;
                        for message in &mut answer {
                            match message {
                                Message::TransferStart(start) => start.payload_digest = digest,
                                Message::TransferChunk(chunk) => {
                                    let end = position + chunk.bytes.len();
                                    chunk.bytes = payload[position..end].to_vec();
                                    chunk.payload_digest = digest;
                                    position = end;
                                }
                                _ => {}
                            }
                        }
                    }
                    for message in &answer {
                        if send_message(&mut down_send, message).await.is_err() {
                            return;
                        }
                    }
                    let _ = down_send.finish();
                    let _ = down_send.stopped().await;
                });
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_altered_by_a_malicious_relay_are_rejected_and_fetched_again() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let dirs = tempfile::tempdir().unwrap();
    // Enrol directly, then steal the agent's key for the relay's upstream leg.
    let (agent, id) = TestAgent::enrolled(dirs.path(), &hub, hub.address, quick_options(40)).await;
    drop(agent);
    let (agent_key, _) =
        outpost_agent::identity::load_or_create(&outpost_agent::paths::key(dirs.path())).unwrap();
    let upstream_config =
        outpost_proto::transport::client_config(&agent_key, hub.pin(), &Tuning::default()).unwrap();
    let stolen =
        outpost_proto::transport::server_config(hub.keys.transport(), &Tuning::default()).unwrap();
    let relay_endpoint = quinn::Endpoint::server(stolen, "127.0.0.1:0".parse().unwrap()).unwrap();
    let relay_address = relay_endpoint.local_addr().unwrap();
    let tamper = Arc::new(AtomicU32::new(1));
    tokio::spawn(malicious_relay(
        relay_endpoint,
        hub.address,
        upstream_config,
        tamper.clone(),
    ));

    // The agent now reaches the hub only through the relay.
    outpost_agent::State::open(&outpost_agent::paths::database(dirs.path()))
        .unwrap()
        .set_enrolment(
            &relay_address.to_string(),
            &hub.pin(),
            &hub.keys.root(),
            "spent",
        )
        .unwrap();
    let mut agent = TestAgent::open(dirs.path(), quick_options(41));
    agent.start();
    let snapshot = hub.publish("app", &bulky_manifests(3, 20_000, 9));
    hub.assign(&id, "app", snapshot);
    within(30, "the snapshot, fetched again", agent.holds(snapshot)).await;
    assert_eq!(
        tamper.load(Ordering::SeqCst),
        0,
        "the relay tampered with a transfer"
    );
    assert_eq!(agent.client.counters().rejected.load(Ordering::Relaxed), 1);
    assert_eq!(agent.client.counters().installs.load(Ordering::Relaxed), 1);
    let held = agent
        .client
        .with_state(move |state| state.load_snapshot("app", &snapshot.digest))
        .await
        .unwrap()
        .expect("held");
    assert_eq!(held.digest(), snapshot.digest);
}
