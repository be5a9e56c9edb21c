//! `outpost-agent`: the edge agent binary, a thin shell over the library.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use outpost_agent::config::{AgentConfig, ClusterChoice, DEFAULT_CONFIG};
use outpost_agent::target::kubernetes::KubernetesTarget;
use outpost_agent::{
    Client, ClientOptions, EnrolmentBundle, ReconcileOptions, Reconciler, State, identity,
    open_state, paths, write_enrolment_record,
};

/// The version and the Git commit built from (`--version`, `version`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OUTPOST_GIT_COMMIT"),
    ")"
);

/// Outpost edge agent: keeps verified snapshots of its bundles from the hub and reconciles the
/// local Kubernetes cluster against them, also while the hub is unreachable.
///
/// First `enrol` with the bundle file the operator made (`outpost-hub tokens create
/// --bundle-file`), then `run` (under systemd or in the cluster). `status` works offline.
/// Settings come from the config file (default /etc/outpost-agent/agent.toml, if present), then
/// OUTPOST_AGENT_* variables, then flags; see docs/agent-config.md.
#[derive(Debug, Parser)]
#[command(version = VERSION, about)]
struct Cli {
    /// Config file (TOML). Default: /etc/outpost-agent/agent.toml if it exists.
    #[arg(long, global = true, env = "OUTPOST_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// State dir: the agent's key (agent.key), database (agent.db) and enrolment copy.
    /// Overrides `state_dir` in the config (default /var/lib/outpost-agent).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the version and the Git commit this binary was built from.
    Version,
    /// Print a shell completion script: `outpost-agent completions bash >
    /// /etc/bash_completion.d/outpost-agent` (or zsh into a folder on $fpath as `_outpost-agent`, fish into
    /// ~/.config/fish/completions/outpost-agent.fish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
    /// Stay connected to the hub (fetch, verify and cache assigned snapshots, send status
    /// reports) and reconcile the cluster against the cached snapshots, with or without the hub.
    Run {
        /// Seed for reconnect jitter (default: from the agent's key).
        #[arg(long)]
        seed: Option<u64>,
        /// Where to apply: auto, kubeconfig, in-cluster, or none (cache only). Overrides
        /// cluster.target.
        #[arg(long)]
        cluster: Option<String>,
        /// Kubeconfig file (implies --cluster kubeconfig). Overrides cluster.kubeconfig.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// What the agent holds, what it applied and last reported (reads the state only; works
    /// offline).
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
    outpost_proto::logging::init("info");
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The configuration from the file, the environment and `overrides` (flag name, value).
fn load_config(cli: &Cli, overrides: &[(&str, Option<String>)]) -> Result<AgentConfig> {
    let file = match &cli.config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|path| path.exists()),
    };
    let env = |name: &str| {
        overrides
            .iter()
            .find(|(key, value)| *key == name && value.is_some())
            .and_then(|(_, value)| value.clone())
            .or_else(|| std::env::var(name).ok())
    };
    let mut config = AgentConfig::load(file.as_deref(), &env)?;
    if let Some(dir) = &cli.state_dir {
        config.state_dir = dir.clone();
    }
    Ok(config)
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "outpost-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Version => {
            println!("outpost-agent {VERSION}");
            Ok(())
        }
        Command::Enrol {
            bundle,
            timeout_seconds,
        } => {
            let config = load_config(&cli, &[])?;
            enrol(
                &config.state_dir,
                bundle,
                Duration::from_secs(*timeout_seconds),
            )
        }
        Command::Run {
            seed,
            cluster,
            kubeconfig,
        } => {
            let kubeconfig = kubeconfig.as_ref().map(|p| p.display().to_string());
            let config = load_config(
                &cli,
                &[
                    ("OUTPOST_AGENT_CLUSTER", cluster.clone()),
                    ("OUTPOST_AGENT_KUBECONFIG", kubeconfig),
                ],
            )?;
            serve(&config, *seed)
        }
        Command::Status { output } => {
            let config = load_config(&cli, &[])?;
            status(&config.state_dir, *output)
        }
    }
}

fn open(state_dir: &Path) -> Result<(outpost_proto::SigningKey, State)> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating the state dir {}", state_dir.display()))?;
    let (key, created) = identity::load_or_create(&paths::key(state_dir))?;
    if created {
        tracing::info!(path = %paths::key(state_dir).display(), "generated the agent's key");
    }
    let (state, moved) = open_state(state_dir).with_context(|| {
        format!(
            "opening the agent state {}",
            paths::database(state_dir).display()
        )
    })?;
    if let Some(moved) = moved {
        tracing::warn!(moved_to = %moved.display(), "started a fresh state database; snapshots come again from the hub");
    }
    Ok((key, state))
}

/// One thread runs everything async (the agent's work is I/O-bound; fewer threads mean fewer
/// stacks and allocator arenas on a small device); SQLite work goes to blocking threads.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn seed_from(key: &outpost_proto::SigningKey) -> u64 {
    let id = key.key_id();
    u64::from_be_bytes(id.0[..8].try_into().unwrap_or_default())
}

fn read_bundle(path: &Path) -> Result<EnrolmentBundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the enrolment bundle {}", path.display()))?;
    EnrolmentBundle::parse(&text).map_err(anyhow::Error::msg)
}

fn enrol(state_dir: &Path, bundle: &Path, timeout: Duration) -> Result<()> {
    let bundle = read_bundle(bundle)?;
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
    bundle.store_in(&mut state)?;
    let options = ClientOptions {
        seed: seed_from(&key),
        ..ClientOptions::default()
    };
    let client = Client::new(key, state, options);
    let runtime = runtime()?;
    runtime.block_on(async {
        let result = tokio::select! {
            id = enrolled(&client, state_dir) => {
                println!("enrolled as agent {}; now run `outpost-agent run`", id?);
                Ok(())
            }
            error = client.run() => Err(anyhow::Error::new(error).context("enrolment failed")),
            () = tokio::time::sleep(timeout) => Err(anyhow::anyhow!(
                "the hub at {} did not confirm within {}s; the enrolment is kept and completes on `outpost-agent run`",
                bundle.hub, timeout.as_secs()
            )),
        };
        client.shutdown().await;
        result
    })
}

/// Waits until the hub confirmed the enrolment, keeps a copy of it beside the database, and
/// returns the agent id.
async fn enrolled(client: &Client, state_dir: &Path) -> Result<String> {
    loop {
        let enrolment = client.with_state(|state| state.enrolment()).await?;
        if let Some(enrolment) = enrolment
            && let Some(id) = enrolment.agent_id.clone()
        {
            write_enrolment_record(state_dir, &enrolment)
                .with_context(|| format!("writing {}", paths::enrolment(state_dir).display()))?;
            return Ok(id);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for SIGTERM or Ctrl-C on `terminate` (made with [`stop_signal`] before anything else
/// runs, so a signal that comes early is not missed).
async fn terminated(mut terminate: tokio::signal::unix::Signal) -> Result<()> {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("stopping");
    Ok(())
}

/// Listens for SIGTERM (within the runtime).
fn stop_signal() -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")
}

fn serve(config: &AgentConfig, seed: Option<u64>) -> Result<()> {
    let state_dir = &config.state_dir;
    let (key, mut state) = open(state_dir)?;
    if state.enrolment()?.is_none() {
        match &config.enrolment_bundle {
            Some(path) => {
                let bundle = read_bundle(path)?;
                tracing::info!(hub = %bundle.hub, "enrolling with {}", path.display());
                bundle.store_in(&mut state)?;
            }
            None => bail!(
                "this agent is not enrolled; run `outpost-agent enrol --bundle FILE` first (or set enrolment_bundle in the config)"
            ),
        }
    }
    if let Some(hub) = &config.hub {
        state.set_hub(hub)?;
    }
    let options = ClientOptions {
        seed: seed.unwrap_or_else(|| seed_from(&key)),
        ..ClientOptions::default()
    };
    let reconcile = ReconcileOptions {
        seed: options.seed,
        ..config.reconcile.clone()
    };
    let client = Client::new(key, state, options);
    let runtime = runtime()?;
    runtime.block_on(async {
        let terminate = stop_signal()?;
        let observed = outpost_agent::metrics::Observed::new(
            client.clone(),
            config.cluster != ClusterChoice::None,
        );
        if let Some(address) = config.metrics_address {
            let listener = outpost_agent::metrics::bind(address)
                .await
                .with_context(|| {
                    format!("binding the metrics listener on {address} (metrics_address)")
                })?;
            tracing::info!(%address, "serving /metrics, /live and /ready");
            tokio::spawn(outpost_agent::metrics::serve(listener, observed.clone()));
        }
        let reconciling = async {
            match &config.cluster {
                ClusterChoice::None => {
                    tracing::info!("no cluster configured: fetching and caching snapshots only");
                    std::future::pending::<Result<()>>().await
                }
                ClusterChoice::Kubernetes(source) => {
                    let target = KubernetesTarget::connect(source)
                        .await
                        .context("connecting to the cluster")?;
                    tracing::info!(?source, "reconciling the cluster");
                    let reconciler = Reconciler::new(client.clone(), Arc::new(target), reconcile);
                    observed.reconciling(reconciler.counters());
                    let error = reconciler.run().await;
                    Err(anyhow::Error::new(error).context("the reconcile loop stopped"))
                }
            }
        };
        let recorded = async {
            enrolled(&client, state_dir).await?;
            std::future::pending::<Result<()>>().await
        };
        let result = tokio::select! {
            () = keep_linking(&client) => Ok(()),
            result = reconciling => result,
            result = recorded => result,
            result = terminated(terminate) => result,
        };
        // Tell the hub (it counts the agent gone at once, not at the idle timeout).
        client.shutdown().await;
        result
    })
}

/// The link to the hub, for as long as the agent runs: whatever ends a session — the hub
/// refusing this agent (revoked, unknown key), its state failing for a while — the reconcile
/// loop goes on enforcing the snapshots it verified, and the link tries again later. A refusal
/// is recorded (`status` shows it) and tried again every hour, in case the hub was restored or
/// the agent re-admitted; nothing new is fetched meanwhile.
async fn keep_linking(client: &Client) {
    let mut failures = 0u32;
    loop {
        let error = client.run().await;
        let wait = match &error {
            outpost_agent::client::AgentError::Refused { .. } => {
                let text = error.to_string();
                tracing::error!(error = %text, "the hub refused this agent: it keeps enforcing what it verified and fetches nothing new; trying again in an hour");
                let recorded = client
                    .with_state(move |state| state.set_link_refusal(Some(&text)))
                    .await;
                if let Err(error) = recorded {
                    tracing::warn!(%error, "cannot record the refusal in the state");
                }
                Duration::from_secs(3_600)
            }
            _ => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_secs(5 * 2u64.pow(failures.min(6)));
                tracing::error!(%error, ?wait, "the link to the hub stopped; enforcing goes on, the link tries again");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
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
    let statuses = state.last_statuses()?;
    let drift_left: Vec<bool> = statuses
        .iter()
        .map(|s| Ok(state.drift_left(&s.bundle)?.is_some()))
        .collect::<Result<_, outpost_agent::state::StateError>>()?;
    let inventory = state.inventory_len()?;
    let trust = match &enrolment {
        Some(_) => Some(state.trust_store()?),
        None => None,
    };
    let signing_keys: Vec<serde_json::Value> = trust
        .iter()
        .flat_map(|trust| {
            trust.signing_key_ids().filter_map(|id| {
                let window = trust.signing_key(id)?;
                Some(serde_json::json!({
                    "key": hex::encode(id.0), "not_before": window.not_before,
                    "not_after": window.not_after, "revoked": trust.is_revoked(id),
                }))
            })
        })
        .collect();
    let revocations = trust
        .as_ref()
        .map_or(0, |trust| trust.revocations_version());
    let refused = state.link_refusal()?;
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
        "refused_by_hub": refused,
        "applied_objects": inventory,
        "signing_keys": signing_keys,
        "revocations_version": revocations,
        "bundles": statuses.iter().zip(&drift_left).map(|(s, drift)| serde_json::json!({
            "bundle": s.bundle, "generation": s.generation, "snapshot": s.digest.to_hex(),
            "phase": format!("{:?}", s.phase), "ready": s.objects_ready, "total": s.objects_total,
            "message": s.message, "observed_at": s.observed_at, "stale": s.stale,
            "drift_left": drift,
        })).collect::<Vec<_>>(),
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
            for key in &signing_keys {
                let date = |field: &str| {
                    key[field]
                        .as_i64()
                        .map_or("?".to_owned(), outpost_proto::time::rfc3339)
                };
                println!(
                    "trusts     signing key {} valid {} .. {}{}",
                    &key["key"].as_str().unwrap_or_default()[..16],
                    date("not_before"),
                    date("not_after"),
                    if key["revoked"] == true {
                        " REVOKED"
                    } else {
                        ""
                    }
                );
            }
            if let Some(refused) = &refused {
                println!(
                    "REFUSED    {refused}\n           enforcing what it verified; fetching nothing new until the hub admits it again"
                );
            }
            if revocations > 0 {
                println!("revoked    by the root's list version {revocations}");
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
            println!("applied    {inventory} object(s) in the inventory");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs() as i64);
            for (s, drift) in statuses.iter().zip(&drift_left) {
                println!(
                    "  {:<24} generation {:<6} {:<9} {}/{} ready, {}{}{}{}",
                    s.bundle,
                    s.generation,
                    format!("{:?}", s.phase),
                    s.objects_ready,
                    s.objects_total,
                    outpost_proto::time::age(s.observed_at, now),
                    if s.stale { " (stale)" } else { "" },
                    if *drift {
                        " (drift left in place: drift: report)"
                    } else {
                        ""
                    },
                    if s.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.message)
                    },
                );
            }
            println!("outbox     {outbox} status report(s) waiting for the hub");
        }
    }
    Ok(())
}
