//! Transport figures (docs/benchmarks.md):
//!
//! 1. Goodput of a 10 MB snapshot transfer through the lossy relay under a 10 Mbit/s cap, at
//!    0/5/20/40 % loss (both directions) and 50/300/1000 ms RTT, as a fraction of
//!    capacity × (1 − loss). Ours (BBR, 8 MiB windows) side by side with quinn's default
//!    congestion control (Cubic) at 20 % loss.
//! 2. Time for 1,000 agents on loopback to receive one delta from one hub, and how many
//!    compressions the hub ran for it.
//!
//! `cargo bench -p outpost-e2e --bench goodput` (all), or with `-- goodput` / `-- fleet`.
//! `OUTPOST_BENCH_AGENTS=N` changes the fleet size.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_e2e::harness::{TestAgent, TestHub, bulky_manifests, quick_options};
use outpost_e2e::lossy::{LinkProfile, Relay};
use outpost_hub::transport::ServiceOptions;
use outpost_proto::transport::{Congestion, Tuning};

const CAPACITY_BPS: u64 = 10_000_000;

struct Case {
    loss: f64,
    rtt_ms: u64,
    congestion: Congestion,
}

async fn transfer(case: &Case, seed: u64) -> (u64, Duration, bool) {
    let tuning = Tuning {
        congestion: case.congestion,
        ..Tuning::default()
    };
    let options = ServiceOptions {
        compression_level: 3,
        ..ServiceOptions::default()
    };
    let hub = TestHub::start(options, &tuning).await;
    let link = LinkProfile {
        loss: case.loss,
        delay: Duration::from_millis(case.rtt_ms / 2),
        bandwidth_bps: Some(CAPACITY_BPS),
        queue_limit: Duration::from_millis(200),
        ..LinkProfile::default()
    };
    let relay = Relay::start(hub.address, link.clone(), link, seed)
        .await
        .expect("relay");
    let dirs = tempfile::tempdir().expect("temp dir");
    let client = outpost_agent::ClientOptions {
        tuning,
        ..quick_options(seed)
    };
    let (agent, id) = TestAgent::enrolled(dirs.path(), &hub, relay.address(), client).await;
    let snapshot = hub.publish("big", &bulky_manifests(10, 1_000_000, seed));
    let started = Instant::now();
    hub.assign(&id, "big", snapshot);
    let done = tokio::time::timeout(Duration::from_secs(120), agent.holds(snapshot))
        .await
        .is_ok();
    let bytes = agent
        .client
        .counters()
        .payload_bytes
        .load(Ordering::Relaxed);
    (bytes, started.elapsed(), done)
}

async fn goodput() {
    println!("goodput: 10 MB payload, 10 Mbit/s cap, loss both ways, 200 ms router queue");
    println!(
        "{:<8} {:>6} {:>8} {:>10} {:>10} {:>12}",
        "cc", "loss", "rtt", "seconds", "Mbit/s", "of cap×(1-l)"
    );
    let mut cases = Vec::new();
    for loss in [0.0, 0.05, 0.20, 0.40] {
        for rtt_ms in [50, 300, 1000] {
            cases.push(Case {
                loss,
                rtt_ms,
                congestion: Congestion::Bbr,
            });
        }
    }
    // The baseline at 20 % loss: quinn's default congestion control, Cubic.
    for congestion in [Congestion::Cubic] {
        for rtt_ms in [50, 300, 1000] {
            cases.push(Case {
                loss: 0.20,
                rtt_ms,
                congestion,
            });
        }
    }
    let only: Option<f64> = std::env::var("OUTPOST_BENCH_LOSS")
        .ok()
        .and_then(|value| value.parse().ok());
    cases.retain(|case| only.is_none_or(|loss| (case.loss - loss).abs() < 1e-9));
    for (index, case) in cases.iter().enumerate() {
        let (bytes, elapsed, done) = transfer(case, 100 + index as u64).await;
        let mbps = bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
        let fraction = mbps * 1e6 / (CAPACITY_BPS as f64 * (1.0 - case.loss));
        println!(
            "{:<8} {:>5.0}% {:>6}ms {:>10.1} {:>10.2} {:>11.0}%{}",
            format!("{:?}", case.congestion),
            case.loss * 100.0,
            case.rtt_ms,
            elapsed.as_secs_f64(),
            mbps,
            fraction * 100.0,
            if done {
                ""
            } else {
                "  (stopped after 120 s; goodput of the bytes so far)"
            }
        );
    }
}

async fn fleet() {
    let agents: usize = std::env::var("OUTPOST_BENCH_AGENTS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1000);
    let options = ServiceOptions::default();
    let hub = TestHub::start(options, &Tuning::default()).await;
    let dirs = tempfile::tempdir().expect("temp dir");
    let base = bulky_manifests(20, 10_000, 1);
    let first = hub.publish("app", &base);
    let mut fleet = Vec::new();
    let started = Instant::now();
    for index in 0..agents {
        let mut agent = TestAgent::new(
            &dirs.path().join(index.to_string()),
            &hub,
            hub.address,
            &hub.token(&[]),
            quick_options(index as u64),
        );
        agent.start();
        fleet.push(agent);
    }
    let mut ids = Vec::new();
    for agent in &fleet {
        ids.push(agent.enrolled_id().await);
    }
    hub.assign_all(&ids, "app", first);
    for agent in &fleet {
        agent.holds(first).await;
    }
    println!(
        "fleet: {agents} agents enrolled and holding generation 1 ({} KB body) after {:.1}s",
        base.len() / 1000,
        started.elapsed().as_secs_f64()
    );
    let compressions_before = hub.service.payloads().compressions();
    let payload_bytes = |fleet: &[TestAgent]| -> u64 {
        fleet
            .iter()
            .map(|agent| {
                agent
                    .client
                    .counters()
                    .payload_bytes
                    .load(Ordering::Relaxed)
            })
            .sum()
    };
    let bytes_before = payload_bytes(&fleet);
    // One ConfigMap changes: every agent gets generation 2 as a delta.
    let second = hub.publish("app", &base.replacen("name: blob-3", "name: blob-3x", 1));
    let started = Instant::now();
    hub.assign_all(&ids, "app", second);
    for agent in &fleet {
        agent.holds(second).await;
    }
    let elapsed = started.elapsed();
    let bytes = payload_bytes(&fleet) - bytes_before;
    println!(
        "fleet: {agents} agents received one delta in {:.2}s on loopback; {} payload bytes each; the hub compressed {} time(s)",
        elapsed.as_secs_f64(),
        bytes / agents as u64,
        hub.service.payloads().compressions() - compressions_before
    );
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if wants("fleet") {
            fleet().await;
        }
        if wants("goodput") {
            goodput().await;
        }
    });
}
