//! `outpost-agent`: the edge agent binary, a thin shell over the library.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use outpost_agent::{Client, ClientOptions, EnrolmentBundle, State, identity, paths};

/// Outpost edge agent: keeps verified snapshots of its bundles from the hub, also while the hub
/// is unreachable.
///
/// First `enrol` with the bundle file the operator made (`outpost-hub tokens create
/// --bundle-file`), then `run` (under systemd or in the cluster). `status` works offline.
/// The reconcile loop against the local cluster is not built yet: this build fetches, verifies,
/// caches and reports.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// State dir: the agent's key (agent.key) and database (agent.db).
    #[arg(
        long,
        global = true,
        env = "OUTPOST_AGENT_STATE_DIR",
        default_value = "/var/lib/outpost-agent"
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrol with the hub using an enrolment bundle (hub address, hub key pin, root key,
    /// single-use token), and wait until the hub confirms.
    Enrol {
        /// The bundle file.
        #[arg(long)]
        bundle: PathBuf,
        /// Give up waiting for the hub after this many seconds (the enrolment is kept and
        /// completes on the next `run`).
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
    /// Stay connected to the hub, fetch and cache assigned snapshots, send status reports.
    Run {
        /// Seed for reconnect jitter (default: from the agent's key).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// What the agent holds and what it is waiting for (reads the state only; works offline).
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Enrol {
            bundle,
            timeout_seconds,
        } => enrol(
            &cli.state_dir,
            &bundle,
            Duration::from_secs(timeout_seconds),
        ),
        Command::Run { seed } => serve(&cli.state_dir, seed),
        Command::Status { output } => status(&cli.state_dir, output),
    }
}

fn open(state_dir: &Path) -> Result<(outpost_proto::SigningKey, State)> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
    let (key, created) = identity::load_or_create(&paths::key(state_dir))?;
    if created {
        tracing::info!(path = %paths::key(state_dir).display(), "generated the agent's key");
    }
    let state = State::open(&paths::database(state_dir)).with_context(|| {
        format!(
            "opening the agent state {}",
            paths::database(state_dir).display()
        )
    })?;
    Ok((key, state))
}

fn seed_from(key: &outpost_proto::SigningKey) -> u64 {
    let id = key.key_id();
    u64::from_be_bytes(id.0[..8].try_into().unwrap_or_default())
}

fn enrol(state_dir: &Path, bundle: &Path, timeout: Duration) -> Result<()> {
    let text = std::fs::read_to_string(bundle)
        .with_context(|| format!("reading the enrolment bundle {}", bundle.display()))?;
    let bundle = EnrolmentBundle::parse(&text).map_err(anyhow::Error::msg)?;
    let (key, mut state) = open(state_dir)?;
    if let Some(existing) = state.enrolment()?
        && let Some(id) = existing.agent_id
    {
        bail!(
            "this agent is already enrolled as {id} with {}; to enrol again, move {} aside first",
            existing.hub,
            state_dir.display()
        );
    }
    state.set_enrolment(
        &bundle.hub,
        &bundle.hub_pin,
        &bundle.root_key,
        &bundle.token,
    )?;
    let options = ClientOptions {
        seed: seed_from(&key),
        ..ClientOptions::default()
    };
    let client = Client::new(key, state, options);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let waiting = async {
            loop {
                let id = client
                    .with_state(|state| Ok(state.enrolment()?.and_then(|e| e.agent_id)))
                    .await?;
                if let Some(id) = id {
                    return Ok::<_, anyhow::Error>(id);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            id = waiting => {
                println!("enrolled as agent {}; now run `outpost-agent run`", id?);
                Ok(())
            }
            error = client.run() => Err(anyhow::Error::new(error).context("enrolment failed")),
            () = tokio::time::sleep(timeout) => bail!(
                "the hub at {} did not confirm within {}s; the enrolment is kept and completes on `outpost-agent run`",
                bundle.hub, timeout.as_secs()
            ),
        }
    })
}

fn serve(state_dir: &Path, seed: Option<u64>) -> Result<()> {
    let (key, state) = open(state_dir)?;
    if state.enrolment()?.is_none() {
        bail!("this agent is not enrolled; run `outpost-agent enrol --bundle FILE` first");
    }
    let options = ClientOptions {
        seed: seed.unwrap_or_else(|| seed_from(&key)),
        ..ClientOptions::default()
    };
    let client = Client::new(key, state, options);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            error = client.run() => Err(anyhow::Error::new(error)),
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted; stopping");
                Ok(())
            }
        }
    })
}

fn status(state_dir: &Path, output: Output) -> Result<()> {
    let database = paths::database(state_dir);
    if !database.exists() {
        bail!(
            "no agent state at {}; enrol first (`outpost-agent enrol --bundle FILE`)",
            database.display()
        );
    }
    let state = State::open(&database)
        .with_context(|| format!("opening the agent state {}", database.display()))?;
    let enrolment = state.enrolment()?;
    let assignments = state.assignments()?;
    let held = state.held()?;
    let downloads: Vec<_> = assignments
        .iter()
        .filter_map(|assignment| state.download(&assignment.digest).transpose())
        .collect::<Result<_, _>>()?;
    let outbox = state.outbox_len()?;
    let value = serde_json::json!({
        "hub": enrolment.as_ref().map(|e| e.hub.clone()),
        "agent_id": enrolment.as_ref().and_then(|e| e.agent_id.clone()),
        "enrolled": enrolment.as_ref().is_some_and(|e| e.agent_id.is_some()),
        "assignment_sequence": state.assignment_sequence()?,
        "assignments": assignments.iter().map(|a| serde_json::json!({
            "bundle": a.bundle, "generation": a.generation, "snapshot": a.digest.to_hex(),
            "held": held.iter().any(|h| h.digest == a.digest),
        })).collect::<Vec<_>>(),
        "held": held.iter().map(|h| serde_json::json!({
            "bundle": h.bundle, "generation": h.generation, "snapshot": h.digest.to_hex(),
        })).collect::<Vec<_>>(),
        "downloads": downloads.iter().map(|d| serde_json::json!({
            "bundle": d.bundle, "snapshot": d.snapshot.to_hex(), "received": d.received, "size": d.payload_size,
        })).collect::<Vec<_>>(),
        "outbox": outbox,
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => {
            match &enrolment {
                Some(e) => println!(
                    "hub        {}\nagent      {}",
                    e.hub,
                    e.agent_id
                        .as_deref()
                        .unwrap_or("(enrolment not confirmed yet)")
                ),
                None => println!("not enrolled"),
            }
            println!("assigned   (sequence {})", state.assignment_sequence()?);
            for a in &assignments {
                let held = held.iter().any(|h| h.digest == a.digest);
                println!(
                    "  {:<24} generation {:<6} {}  {}",
                    a.bundle,
                    a.generation,
                    a.digest.short(),
                    if held { "held" } else { "missing" }
                );
            }
            println!("held");
            for h in &held {
                println!(
                    "  {:<24} generation {:<6} {}",
                    h.bundle,
                    h.generation,
                    h.digest.short()
                );
            }
            for d in &downloads {
                println!(
                    "downloading {} {}: {} of {} bytes",
                    d.bundle,
                    d.snapshot.short(),
                    d.received,
                    d.payload_size
                );
            }
            println!("outbox     {outbox} status report(s) waiting for the hub");
        }
    }
    Ok(())
}
