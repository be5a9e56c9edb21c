//! Transport: enrolment and identity, assignments, fetches whole and by delta, status reports.
//! Real QUIC on loopback, real SQLite files on both sides.

use std::time::Duration;

use outpost_agent::client::AgentError;
use outpost_e2e::harness::{
    TestAgent, TestHub, bulky_manifests, quick_options, test_service_options as options, within,
};
use outpost_hub::store::FleetStore;
use outpost_proto::transport::Tuning;
use outpost_proto::transport::{MessageReader, send_message};
use outpost_proto::wire::{ErrorCode, Fetch, Hello, Message, Phase};

const APP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: default\ndata:\n  version: \"1\"\n";

fn refusal(error: AgentError) -> (ErrorCode, String) {
    match error {
        AgentError::Refused { code, message } => (code, message),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_fetch_report_and_token_reuse_refused() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let first = hub.publish("app", APP);
    let token = hub.token(&[("region", "eu")]);
    let dirs = tempfile::tempdir().unwrap();

    let mut agent = TestAgent::new(
        &dirs.path().join("a"),
        &hub,
        hub.address,
        &token,
        quick_options(1),
    );
    agent.start();
    let id = within(20, "enrolment", agent.enrolled_id()).await;
    let record = outpost_hub::store::Store::agent(&hub.store, &id)
        .unwrap()
        .unwrap();
    assert_eq!(record.labels.get("region").map(String::as_str), Some("eu"));

    hub.assign(&id, "app", first);
    within(20, "first snapshot", agent.holds(first)).await;

    // The install is reported, stored by the hub and acknowledged (the outbox empties).
    within(20, "status report", async {
        loop {
            let statuses = hub.store.statuses(Some(&id)).unwrap();
            let outbox = agent
                .client
                .with_state(|state| state.outbox_len())
                .await
                .unwrap();
            if statuses.len() == 1 && outbox == 0 {
                assert_eq!(statuses[0].status.digest, first.digest);
                assert_eq!(statuses[0].status.phase, Phase::Applying);
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // A new generation arrives as a delta against the held one.
    let second = hub.publish("app", &APP.replace("\"1\"", "\"2\""));
    let mut installed = agent.client.installed();
    hub.assign(&id, "app", second);
    within(20, "second install", installed.changed())
        .await
        .unwrap();
    // Whoever is told of an install finds its report queued already: nothing that reacts to the
    // new snapshot (a reconcile loop reporting Healthy) can report before it.
    let last = agent.last_status("app").await.expect("a status for app");
    assert_eq!(
        (last.generation, last.phase),
        (second.generation, Phase::Applying)
    );
    within(20, "second snapshot", agent.holds(second)).await;
    let held = agent.client.with_state(|state| state.held()).await.unwrap();
    assert_eq!(held.len(), 2, "the previous generation is kept: {held:?}");

    // The same token again, from another key: refused, and the agent stops with the reason.
    let mut thief = TestAgent::new(
        &dirs.path().join("b"),
        &hub,
        hub.address,
        &token,
        quick_options(2),
    );
    thief.start();
    let (code, message) = refusal(within(20, "token refusal", thief.stopped()).await);
    assert_eq!(code, ErrorCode::BadToken);
    assert!(message.contains("already used"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_is_refused() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let dirs = tempfile::tempdir().unwrap();
    let mut agent = TestAgent::new(
        dirs.path(),
        &hub,
        hub.address,
        "never-issued",
        quick_options(3),
    );
    // Pretend the agent enrolled (it did not): it says Hello with a key the hub never saw.
    agent
        .client
        .with_state(|state| state.enrolled("0123456789abcdef"))
        .await
        .unwrap();
    agent.start();
    let (code, message) = refusal(within(20, "refusal", agent.stopped()).await);
    assert_eq!(code, ErrorCode::UnknownAgent);
    assert!(message.contains("not enrolled"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_cut_off_and_stays_out() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let dirs = tempfile::tempdir().unwrap();
    let (mut agent, id) =
        TestAgent::enrolled(dirs.path(), &hub, hub.address, quick_options(4)).await;
    let snapshot = hub.publish("app", APP);
    hub.assign(&id, "app", snapshot);
    within(20, "snapshot", agent.holds(snapshot)).await;

    hub.revoke(&id, "device stolen");
    let (code, message) = refusal(within(20, "cut-off", agent.stopped()).await);
    assert_eq!(code, ErrorCode::Revoked);
    assert!(message.contains("device stolen"), "{message}");

    // Reconnecting does not help.
    agent.restart();
    let (code, _) = refusal(within(20, "refusal on reconnect", agent.stopped()).await);
    assert_eq!(code, ErrorCode::Revoked);
    // What it held stays held (offline autonomy is the agent's business, not the hub's).
    let held = agent.client.with_state(|state| state.held()).await.unwrap();
    assert_eq!(held.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_only_what_is_assigned_to_it() {
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let dirs = tempfile::tempdir().unwrap();
    let (a, id_a) =
        TestAgent::enrolled(&dirs.path().join("a"), &hub, hub.address, quick_options(5)).await;
    let (b, id_b) =
        TestAgent::enrolled(&dirs.path().join("b"), &hub, hub.address, quick_options(6)).await;
    let secret = hub.publish("secret", &bulky_manifests(1, 1000, 7));
    let public = hub.publish("public", APP);
    hub.assign(&id_a, "secret", secret);
    hub.assign(&id_b, "public", public);
    within(20, "a's snapshot", a.holds(secret)).await;
    within(20, "b's snapshot", b.holds(public)).await;
    let held_b = b.client.with_state(|state| state.held()).await.unwrap();
    assert!(
        held_b.iter().all(|held| held.bundle == "public"),
        "{held_b:?}"
    );

    // b asks for a's snapshot by digest, speaking the protocol itself: the hub declines.
    let (key, _) =
        outpost_agent::identity::load_or_create(&outpost_agent::paths::key(&b.dir)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config =
        outpost_proto::transport::client_config(&key, hub.pin(), &Tuning::default()).unwrap();
    let connection = endpoint
        .connect_with(config, hub.address, "outpost-hub")
        .unwrap()
        .await
        .unwrap();
    let (mut control, _control_recv) = connection.open_bi().await.unwrap();
    let hello = Hello {
        agent_version: "test".into(),
        assignment_sequence: 0,
        have: vec![],
        proofs: vec![],
    };
    send_message(&mut control, &Message::Hello(hello))
        .await
        .unwrap();
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let fetch = Fetch {
        snapshot: secret.digest,
        have: vec![],
        resume: None,
    };
    send_message(&mut send, &Message::Fetch(fetch))
        .await
        .unwrap();
    let reply = within(20, "reply", MessageReader::new(recv).next())
        .await
        .unwrap();
    match reply {
        Some(Message::Error(error)) => {
            assert_eq!(error.code, ErrorCode::NotAssigned);
            assert!(error.message.contains(&id_b), "{}", error.message);
        }
        other => panic!("expected NotAssigned, got {other:?}"),
    }
    assert_ne!(id_a, id_b);
}

/// A new snapshot of a bundle the agent runs travels with its assignment (no fetch round
/// trip); when the agent lacks the pushed delta's base it fetches as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_updates_are_pushed_with_the_assignment_and_a_missing_base_means_a_fetch() {
    use std::sync::atomic::Ordering::Relaxed;
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let dirs = tempfile::tempdir().unwrap();
    let (agent, id) = TestAgent::enrolled(dirs.path(), &hub, hub.address, quick_options(12)).await;
    let pushed = || hub.service.counters().pushed.load(Relaxed);
    let v1 = hub.publish("app", APP);
    hub.assign(&id, "app", v1);
    within(20, "v1", agent.holds(v1)).await;
    assert_eq!(pushed(), 0, "the first snapshot of a bundle is fetched");
    let bytes = || agent.client.counters().payload_bytes.load(Relaxed);
    let before = bytes();
    let v2 = hub.publish("app", &APP.replace("\"1\"", "\"2\""));
    hub.assign(&id, "app", v2);
    within(20, "v2", agent.holds(v2)).await;
    assert_eq!(pushed(), 1);
    assert!(
        bytes() - before < 1024,
        "a delta: {} bytes",
        bytes() - before
    );

    // The agent no longer holds v2 (the push's base): the pushed v3 cannot be used.
    let digest = v2.digest;
    agent
        .client
        .with_state(move |state| state.drop_snapshot("app", &digest))
        .await
        .unwrap();
    let v3 = hub.publish("app", &APP.replace("\"1\"", "\"3\""));
    hub.assign(&id, "app", v3);
    within(20, "v3, fetched", agent.holds(v3)).await;
    assert_eq!(pushed(), 2, "pushed, and not used");
    let rejected = agent.client.counters().rejected.load(Relaxed);
    assert_eq!(rejected, 0, "an unusable push is not a rejected transfer");
}

/// Opens a raw protocol connection with `dir`'s agent key and says Hello; returns the
/// connection and the control stream (reader and writer).
async fn raw_session(
    hub: &TestHub,
    dir: &std::path::Path,
) -> (quinn::Connection, quinn::SendStream, MessageReader) {
    let (key, _) =
        outpost_agent::identity::load_or_create(&outpost_agent::paths::key(dir)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let config =
        outpost_proto::transport::client_config(&key, hub.pin(), &Tuning::default()).unwrap();
    let connection = endpoint
        .connect_with(config, hub.address, "outpost-hub")
        .unwrap()
        .await
        .unwrap();
    let (mut control, recv) = connection.open_bi().await.unwrap();
    let hello = Hello {
        agent_version: "test".into(),
        assignment_sequence: 0,
        have: vec![],
        proofs: vec![],
    };
    send_message(&mut control, &Message::Hello(hello))
        .await
        .unwrap();
    (connection, control, MessageReader::new(recv))
}

/// Fetches `snapshot` naming `have` as held; returns how the hub encoded the payload.
async fn fetch_encoding(
    connection: &quinn::Connection,
    snapshot: outpost_proto::Digest,
    have: Vec<outpost_proto::Digest>,
) -> outpost_proto::wire::PayloadEncoding {
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let fetch = Fetch {
        snapshot,
        have,
        resume: None,
    };
    send_message(&mut send, &Message::Fetch(fetch))
        .await
        .unwrap();
    match within(20, "transfer start", MessageReader::new(recv).next()).await {
        Ok(Some(Message::TransferStart(start))) => start.encoding,
        other => panic!("expected TransferStart, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_only_against_what_was_assigned_and_status_only_for_assigned_bundles() {
    use outpost_proto::wire::{BundleStatus, PayloadEncoding, StatusReport};
    let hub = TestHub::start(options(), &Tuning::default()).await;
    let dirs = tempfile::tempdir().unwrap();
    let (agent, id) = TestAgent::enrolled(dirs.path(), &hub, hub.address, quick_options(11)).await;
    let first = hub.publish("app", APP);
    let second = hub.publish("app", &APP.replace("\"1\"", "\"2\""));
    let third = hub.publish("app", &APP.replace("\"1\"", "\"3\""));
    hub.assign(&id, "app", first);
    within(20, "first", agent.holds(first)).await;
    hub.assign(&id, "app", third);
    within(20, "third", agent.holds(third)).await;
    drop(agent);

    // The agent's key, on a raw connection (it replaces the agent's own).
    let (connection, mut control, mut reader) = raw_session(&hub, dirs.path()).await;
    // Assigned once: a delta base. Never assigned to this agent: not one, whatever it claims.
    assert_eq!(
        fetch_encoding(&connection, third.digest, vec![second.digest]).await,
        PayloadEncoding::Whole,
        "second was never assigned to this agent"
    );
    assert_eq!(
        fetch_encoding(&connection, third.digest, vec![second.digest, first.digest]).await,
        PayloadEncoding::Delta { base: first.digest }
    );

    // Status for a bundle not assigned to the agent is acknowledged and not stored.
    let status = |bundle: &str, digest| BundleStatus {
        bundle: bundle.to_owned(),
        digest,
        generation: third.generation,
        phase: Phase::Healthy,
        objects_total: 1,
        objects_ready: 1,
        message: String::new(),
        observed_at: outpost_e2e::harness::unix_now(),
        stale: false,
    };
    let report = StatusReport {
        sequence: u64::MAX / 2,
        bundles: vec![
            status("app", third.digest),
            status("intruder", third.digest),
        ],
    };
    send_message(&mut control, &Message::StatusReport(report))
        .await
        .unwrap();
    loop {
        match within(20, "ack", reader.next()).await.unwrap() {
            Some(Message::Ack(ack)) => {
                assert_eq!(ack.sequence, u64::MAX / 2);
                break;
            }
            Some(_) => continue,
            None => panic!("control stream closed"),
        }
    }
    let stored = hub.store.statuses(Some(&id)).unwrap();
    let bundles: Vec<&str> = stored.iter().map(|s| s.status.bundle.as_str()).collect();
    assert_eq!(bundles, ["app"]);
    // One connection per agent: a newer one replaces this one, which is told why.
    let (_newer, _control, _reader) = raw_session(&hub, dirs.path()).await;
    let closed = within(20, "the older connection closed", connection.closed()).await;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                outpost_hub::transport::close::REPLACED.into()
            )
        }
        other => panic!("expected a close by the hub, got {other}"),
    }
    assert!(
        hub.service
            .counters()
            .replaced
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_peers_prove_their_address_and_beyond_the_cap_are_refused() {
    use std::sync::atomic::Ordering::Relaxed;
    // Every new peer must answer a Retry first: agents still get through.
    let hub = TestHub::start(
        outpost_hub::transport::ServiceOptions {
            retry_above: 0,
            ..options()
        },
        &Tuning::default(),
    )
    .await;
    let dirs = tempfile::tempdir().unwrap();
    let (agent, id) = TestAgent::enrolled(dirs.path(), &hub, hub.address, quick_options(12)).await;
    let snapshot = hub.publish("app", APP);
    hub.assign(&id, "app", snapshot);
    within(20, "snapshot after a Retry", agent.holds(snapshot)).await;
    assert!(hub.service.counters().retries.load(Relaxed) >= 1);

    // No room for unidentified peers: refused at once, nothing enrolled.
    let full = TestHub::start(
        outpost_hub::transport::ServiceOptions {
            max_unidentified: 0,
            ..options()
        },
        &Tuning::default(),
    )
    .await;
    let mut refused = TestAgent::new(
        &dirs.path().join("refused"),
        &full,
        full.address,
        &full.token(&[]),
        quick_options(13),
    );
    refused.start();
    within(20, "refusals", async {
        while full.service.counters().refused.load(Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(full.store.bundle_assignments(None).unwrap().is_empty());
    assert!(
        outpost_hub::store::Store::agents(&full.store)
            .unwrap()
            .is_empty()
    );
}
