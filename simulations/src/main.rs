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
