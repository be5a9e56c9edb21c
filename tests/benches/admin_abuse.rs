//! The admin listener under a slowloris attack (docs/benchmarks.md, "The admin API under
//! abuse"): a real `outpost-hub run` (built here with the bench profile), connections that send
//! half a request header and stop (each opened again as soon as the hub closes it), and the
//! time a real `GET /live` from another address takes to be answered beside them. Rows: no
//! attack; one machine (127.0.0.2) holding 2,000; 40 machines (127.0.1.1–40) holding 50 each
//! (2,000: more than the listener's 1,024 places).
//!
//! `cargo bench -p outpost-e2e --bench admin_abuse`

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost_e2e::abuse::{GET_LIVE, keep_half_open, timed_request};
use outpost_e2e::processes::{HubProcess, shop_repository};

/// Requests measured per row.
const REQUESTS: usize = 20;

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("admin_abuse: bench");
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--profile",
            "bench",
            "--locked",
            "-p",
            "outpost-hub",
        ])
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build --profile bench failed");
    let work = tempfile::tempdir().unwrap();
    let repo = shop_repository(work.path());
    let hub = HubProcess::start(work.path(), &repo, "main");
    let admin: SocketAddr = hub.url.trim_start_matches("http://").parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();

    println!(
        "| attack | half-open connections held | connections opened by the attacker | answered | median | slowest |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let rows: [(&str, Vec<IpAddr>, usize); 3] = [
        ("none", vec![], 0),
        ("one machine", vec![[127, 0, 0, 2].into()], 2000),
        (
            "40 machines, 50 each",
            (1..=40).map(|n| IpAddr::from([127, 0, 1, n])).collect(),
            50,
        ),
    ];
    for (attack, sources, each) in rows {
        let opened = Arc::new(AtomicUsize::new(0));
        let attackers: Vec<_> = sources
            .iter()
            .flat_map(|source| keep_half_open(&runtime, *source, admin, each, opened.clone()))
            .collect();
        // Let the attack fill the listener.
        std::thread::sleep(Duration::from_secs(3));
        let mut times = Vec::new();
        let mut answered = 0;
        for _ in 0..REQUESTS {
            let (status, took) = timed_request(admin, GET_LIVE, Duration::from_secs(30));
            if status.contains(" 200 ") {
                answered += 1;
            }
            times.push(took);
            std::thread::sleep(Duration::from_millis(100));
        }
        times.sort();
        for attacker in attackers {
            attacker.abort();
        }
        println!(
            "| {attack} | {} | {} | {answered}/{REQUESTS} | {:.1} ms | {:.1} ms |",
            sources.len() * each,
            opened.load(Ordering::Relaxed),
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() - 1].as_secs_f64() * 1000.0,
        );
        // Let the hub see them go before the next row.
        std::thread::sleep(Duration::from_secs(2));
    }
}
