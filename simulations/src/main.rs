//! `outpost-sim`: whole fleets on virtual time. `demo` runs the built-in scenario (about 200
//! shops, a tag rollout to Europe with a canary wave, one city that cannot pull the new image
//! and trips the roll back); `run FILE` runs any scenario; `pipeline` shows the snapshot
//! pipeline alone.

mod pipeline;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use outpost_sim::scenario::{DEMO, Scenario};
use outpost_sim::{fleet, summary, write_outputs};

/// Outpost simulations: the real hub and agents, a whole fleet in one process, virtual time.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The demo scenario (built in: simulations/scenarios/demo.toml): about 200 agents on
    /// lossy links, a tag rollout with a canary wave, one group that fails health and trips the
    /// roll back. Prints a summary and where the report and plots are.
    Demo(RunArgs),
    /// Run a scenario file (see docs/simulations.md).
    Run {
        /// The scenario (TOML).
        scenario: PathBuf,
        #[command(flatten)]
        args: RunArgs,
    },
    /// The snapshot pipeline alone: render, sign, whole and delta payloads, verify, and two
    /// attacks refused.
    Pipeline,
    /// Load a real `outpost-hub run` process with N agent clients (real QUIC on loopback, own
    /// keys and tokens, state in memory): enrol them all, then time one Git commit reaching
    /// every one. Starts a hub on a fresh data dir and repository unless --admin names one.
    /// The last line: `hub: N agents, RSS X MB (Y KB per agent), enrol Z s, propagate W s, hub
    /// CPU C s`.
    Load(LoadArgs),
    /// Replace a leader killed with SIGKILL, N times: two `outpost-hub run` replicas on a
    /// PostgreSQL server started for the run; each run commits, kills the leader, and times
    /// until the other replica leads and until it released the commit (its first decision).
    /// Prints each run, then minimum, median and maximum.
    Failover {
        /// How many failovers.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// The outpost-hub binary [default: beside this one, built with cargo when run by cargo].
        #[arg(long)]
        hub_binary: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// How many agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// A running hub's admin API (its token in OUTPOST_TOKEN); then also --hub, --repo, --pid.
    #[arg(long)]
    admin: Option<String>,
    /// The running hub's QUIC address.
    #[arg(long)]
    hub: Option<std::net::SocketAddr>,
    /// The Git repository the running hub watches (the run commits to it).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// The running hub's process id (RSS and CPU are read from /proc).
    #[arg(long)]
    pid: Option<u32>,
    /// Agent connections per UDP socket.
    #[arg(long, default_value_t = 2000)]
    per_socket: usize,
    /// New agents started per second: the storm's pace. On two cores shared by hub and load
    /// generator, 500 is kept up with; faster mostly adds handshake timeouts and retries.
    #[arg(long, default_value_t = 500)]
    connect_rate: usize,
    /// Objects in the bundle.
    #[arg(long, default_value_t = 40)]
    objects: usize,
    /// The outpost-hub binary [default: beside this one, built with cargo when run by cargo].
    #[arg(long)]
    hub_binary: Option<PathBuf>,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_seconds: u64,
    /// The started hub's store: sqlite (its data dir) or postgres (a PostgreSQL server started
    /// for the run, as the tests do).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    store: String,
    /// Hub replicas on the PostgreSQL store: with 2, the first leads (syncs Git, assigns) and
    /// the agents are all served by the second, so the run measures what one replica serving
    /// agents costs and how fast a decision on the leader reaches agents on another replica.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    replicas: u8,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Scale the fleet to about this many agents (groups keep their proportions).
    #[arg(long)]
    agents: Option<usize>,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Where the report and plots go (default: target/sim/<scenario name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn simulate(mut scenario: Scenario, args: RunArgs) -> Result<()> {
    if let Some(agents) = args.agents {
        scenario = scenario.scaled(agents);
    }
    if let Some(seed) = args.seed {
        scenario.seed = seed;
    }
    eprintln!(
        "simulating {:?}: {} agents, up to {} virtual minutes, seed {}",
        scenario.name,
        scenario.agents(),
        scenario.max_minutes,
        scenario.seed
    );
    let report = fleet::run(&scenario, !args.quiet)?;
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("target/sim").join(&scenario.name));
    let outputs = write_outputs(&report, &out)
        .with_context(|| format!("writing the report and plots to {}", out.display()))?;
    print!("{}", summary(&report, &outputs));
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(args) => simulate(Scenario::parse(DEMO)?, args),
        Command::Run { scenario, args } => {
            let text = std::fs::read_to_string(&scenario)
                .with_context(|| format!("reading {}", scenario.display()))?;
            let parsed =
                Scenario::parse(&text).with_context(|| format!("in {}", scenario.display()))?;
            simulate(parsed, args)
        }
        Command::Pipeline => pipeline::pipeline(),
        Command::Failover { runs, hub_binary } => {
            let runs = outpost_sim::failover::run(runs, hub_binary.as_deref())?;
            let (lease, decision): (Vec<f64>, Vec<f64>) = runs
                .iter()
                .map(|run| (run.lease.as_secs_f64(), run.decision.as_secs_f64()))
                .unzip();
            let (a, b, c) = outpost_sim::failover::spread(lease);
            let (d, e, f) = outpost_sim::failover::spread(decision);
            println!(
                "failover over {} runs: lease taken min {a:.2} s, median {b:.2} s, max {c:.2} s; first decision min {d:.2} s, median {e:.2} s, max {f:.2} s",
                runs.len()
            );
            Ok(())
        }
        Command::Load(args) => {
            let report = outpost_sim::load::run(&outpost_sim::load::LoadOptions {
                agents: args.agents,
                admin: args.admin,
                hub: args.hub,
                repo: args.repo,
                pid: args.pid,
                per_socket: args.per_socket,
                connect_rate: args.connect_rate,
                objects: args.objects,
                hub_binary: args.hub_binary,
                timeout: std::time::Duration::from_secs(args.timeout_seconds),
                postgres: args.store == "postgres" || args.replicas > 1,
                replicas: args.replicas as usize,
            })?;
            println!(
                "hub CPU: enrol {:.1} s ({:.2} ms per agent), propagate {:.1} s ({:.2} ms per agent); fleet page data {:.2} s, every agent listed {:.2} s; {} threads; {} busy answers, {} sessions retried",
                report.cpu_enrol,
                report.cpu_enrol * 1000.0 / report.agents.max(1) as f64,
                report.cpu_propagate,
                report.cpu_propagate * 1000.0 / report.agents.max(1) as f64,
                report.fleet_seconds,
                report.fleet_all_seconds,
                report.threads,
                report.busy,
                report.failures,
            );
            println!(
                "hub: {} agents, RSS {:.0} MB ({:.0} KB per agent), enrol {:.1} s, propagate {:.1} s, hub CPU {:.1} s",
                report.agents,
                report.rss_mb,
                report.per_agent_kb,
                report.enrol_seconds,
                report.propagate_seconds,
                report.cpu_seconds
            );
            Ok(())
        }
    }
}
