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
    }
}
