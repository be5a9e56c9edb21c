//! `outpost-agent`: the edge agent binary. The agent itself (SQLite cache, QUIC client, reconcile
//! loop) is the subject of the edge-agent issue; until it lands this binary says so plainly
//! instead of pretending to run.

use clap::Parser;

/// Outpost edge agent: caches verified snapshots and keeps the local cluster at them.
///
/// Not built yet: this build knows the snapshot format (outpost-proto) but has no hub client and
/// no reconcile loop. It exits with status 2 so that no service manager mistakes it for a
/// running agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {}

fn main() -> std::process::ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "outpost-agent {}: the edge agent is not built yet (no hub client, no reconcile loop); \
         see README.md for what exists today",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
