//! A whole fleet in one process on tokio's paused clock: the real hub (store, keys, Git sync,
//! tracked assignments, QUIC agent service, rollout driver) and the real agents (client over
//! QUIC, SQLite state, reconcile loop) against in-memory clusters, all talking QUIC over the
//! simulated network ([`crate::net`]).
//!
//! What is simulated, not real: the network (datagrams through a seeded in-memory queue), the
//! clusters ([`MemoryTarget`], workloads ready at once unless their image is in the group's
//! `cannot_pull`), and the agents' SQLite databases live in memory (a file per agent would need
//! three file descriptors each; this machine allows 20,000). The hub's store is a real file.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outpost_agent::client::{Client, ClientOptions};
use outpost_agent::reconcile::{ReconcileOptions, Reconciler};
use outpost_agent::state::State;
use outpost_agent::target::memory::MemoryTarget;
use outpost_hub::api::EnrolmentInfo;
use outpost_hub::config::SourceConfig;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::rollout::machine::OnFailure;
use outpost_hub::rollout::{self, Request};
use outpost_hub::runtime::{Hub, HubParts, HubSettings, SourceSettings};
use outpost_hub::store::RolloutHead;
use outpost_hub::store::{FleetStore, RolloutStore, SqliteStore, Store};
use outpost_proto::Digest;
use outpost_proto::transport::{Tuning, hub_pin, server_config};
use outpost_proto::wire::Phase;
use serde::Serialize;
use tokio::time::Instant;

use crate::net::{self, Network, Traffic};
use crate::scenario::Scenario;

/// The virtual clock as Unix seconds: the real time at the start plus virtual time since.
static CLOCK: OnceLock<Mutex<(Instant, i64)>> = OnceLock::new();

fn clock() -> &'static Mutex<(Instant, i64)> {
    CLOCK.get_or_init(|| Mutex::new((Instant::now(), 0)))
}

/// Unix seconds on the virtual clock (the hub's `now`).
pub fn virtual_now() -> i64 {
    let (start, base) = *clock().lock().unwrap_or_else(|p| p.into_inner());
    base + Instant::now().duration_since(start).as_secs() as i64
}

fn wall_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// One sample of the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Virtual seconds since the start.
    pub t: u64,
    /// Agents enrolled.
    pub enrolled: usize,
    /// Agents whose last report is healthy on exactly what they are assigned.
    pub converged: usize,
    /// Per rollout: healthy agents per wave.
    pub waves: Vec<Vec<u64>>,
    /// UDP bytes so far, all agents, both ways.
    pub bytes: u64,
    /// Resident memory of the whole process (hub and agents), bytes.
    pub rss: u64,
}

/// What a run found.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Agents.
    pub agents: usize,
    /// Virtual time simulated, seconds.
    pub virtual_seconds: u64,
    /// Wall time taken, seconds.
    pub wall_seconds: f64,
    /// CPU time of the process (hub and agents), seconds.
    pub cpu_seconds: f64,
    /// Whether every rollout ended and every agent converged before `max_minutes`.
    pub settled: bool,
    /// Agents converged at the end.
    pub converged: usize,
    /// The rollouts as the hub's API shows them.
    pub rollouts: Vec<serde_json::Value>,
    /// UDP bytes per agent (QUIC, TLS and all): total, mean, median, 95th percentile, max.
    pub bytes: BytesSummary,
    /// Snapshot payload bytes the agents received (compressed bodies and deltas).
    pub payload_bytes: u64,
    /// Peak resident memory of the process, bytes.
    pub peak_rss: u64,
    /// The samples.
    pub samples: Vec<Sample>,
    /// Bytes per agent, sorted (for the plot).
    #[serde(skip)]
    pub per_agent_bytes: Vec<u64>,
    /// Wave sizes as planned, per rollout (for the plot).
    #[serde(skip)]
    pub wave_labels: Vec<Vec<String>>,
}

/// Bytes per agent.
#[derive(Debug, Default, Serialize)]
pub struct BytesSummary {
    /// All agents.
    pub total: u64,
    /// Mean.
    pub mean: u64,
    /// Median.
    pub median: u64,
    /// 95th percentile.
    pub p95: u64,
    /// Largest.
    pub max: u64,
}

fn summarise(sorted: &[u64]) -> BytesSummary {
    if sorted.is_empty() {
        return BytesSummary::default();
    }
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let total: u64 = sorted.iter().sum();
    BytesSummary {
        total,
        mean: total / sorted.len() as u64,
        median: at(0.5),
        p95: at(0.95),
        max: at(1.0),
    }
}

/// Resident set size of this process, bytes (Linux; 0 elsewhere).
pub fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|text| text.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// CPU seconds (user + system) of this process so far.
pub fn cpu_seconds() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = text.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git (is it installed?)")?;
    if !output.status.success() {
        bail!(
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Writes the scenario's Git history: one commit and tag per release, branch `stable` at the
/// first.
fn make_repository(scenario: &Scenario, repo: &Path) -> Result<()> {
    let folder = repo.join(&scenario.git.bundle);
    std::fs::create_dir_all(&folder)?;
    git(repo, &["init", "-q", "-b", "main"])?;
    git(repo, &["config", "user.email", "sim@outpost.invalid"])?;
    git(repo, &["config", "user.name", "outpost-sim"])?;
    let mut versions = vec![0usize; scenario.git.config_maps];
    for (index, release) in scenario.git.releases.iter().enumerate() {
        for version in versions.iter_mut().take(release.changed_config_maps) {
            *version += 1;
        }
        let mut yaml = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {bundle}, namespace: default}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: {bundle}}}}}\n  template:\n    metadata: {{labels: {{app: {bundle}}}}}\n    spec:\n      containers:\n      - name: {bundle}\n        image: {image}\n        resources: {{requests: {{cpu: 100m, memory: 128Mi}}}}\n",
            bundle = scenario.git.bundle,
            image = release.image
        );
        for (map, version) in versions.iter().enumerate() {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings-{map:03}, namespace: default}}\ndata:\n  version: \"{version}\"\n  receipt_footer: \"Thank you for shopping with us - store settings block {map} revision {version}\"\n  printer: \"tm-t88vi\"\n  currency: \"EUR\"\n  tax_table: \"standard=19,reduced=7,zero=0\"\n"
            ));
        }
        std::fs::write(folder.join("manifests.yaml"), yaml)?;
        git(repo, &["add", "-A"])?;
        git(repo, &["commit", "-qm", &release.tag])?;
        git(repo, &["tag", &release.tag])?;
        if index == 0 {
            git(repo, &["branch", "stable"])?;
        }
    }
    Ok(())
}

/// One simulated agent's handles.
struct SimAgent {
    traffic: Arc<Traffic>,
    client: Client,
}

/// Progress on stderr: a bar over virtual time with the fleet's state, redrawn in place on a
/// terminal, a line per five virtual minutes elsewhere.
fn progress(scenario: &Scenario, sample: &Sample, started: std::time::Instant, agents: usize) {
    const WIDTH: usize = 30;
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !terminal && sample.t % 300 >= scenario.sample_seconds.max(1) {
        return;
    }
    let total = scenario.max_minutes * 60;
    let done = ((sample.t as f64 / total as f64) * WIDTH as f64).round() as usize;
    eprint!(
        "{}[{}{}] virtual {:>3}m{:02}s · {}/{} enrolled · {}/{} converged · {:.1} MB on the wire · wall {:.0}s   {}",
        if terminal { "\r" } else { "" },
        "#".repeat(done.min(WIDTH)),
        ".".repeat(WIDTH - done.min(WIDTH)),
        sample.t / 60,
        sample.t % 60,
        sample.enrolled,
        agents,
        sample.converged,
        agents,
        sample.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        if terminal { "" } else { "\n" },
    );
}

/// Runs `scenario` to the end on a paused-clock runtime; `show_progress` draws a bar on stderr.
pub fn run(scenario: &Scenario, show_progress: bool) -> Result<Report> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .context("starting the runtime")?;
    runtime.block_on(simulate(scenario, show_progress))
}

async fn simulate(scenario: &Scenario, show_progress: bool) -> Result<Report> {
    let started = std::time::Instant::now();
    let cpu_before = cpu_seconds();
    *clock().lock().unwrap_or_else(|p| p.into_inner()) = (Instant::now(), wall_unix());
    let base = std::env::temp_dir();
    let shm = Path::new("/dev/shm");
    let work = tempfile::Builder::new()
        .prefix("outpost-sim-")
        .tempdir_in(if shm.is_dir() { shm } else { &base })
        .context("making a work dir")?;
    let repo = work.path().join("repo");
    make_repository(scenario, &repo)?;

    // The hub: the real runtime (sync, assignment, rollouts, keys, agent service), on the
    // simulated network and the virtual clock, without an admin API.
    let now = virtual_now();
    let store = SqliteStore::open(&work.path().join("hub.db")).context("hub store")?;
    let keys = Arc::new(HubKeys::create(
        &work.path().join("keys"),
        KeyPolicy::default(),
        now,
    )?);
    let url = format!("file://{}", repo.display());
    let network = Network::new(scenario.seed);
    tokio::spawn(network.clone().deliver());
    let hub_address = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 4433));
    let hub_socket = network.socket(hub_address, None);
    let hub_endpoint = net::endpoint(
        hub_socket,
        Some(server_config(keys.transport(), &Tuning::default())?),
    )?;
    let source = SourceSettings {
        config: SourceConfig {
            name: "fleet".to_owned(),
            url,
            credentials: None,
            track: Some("refs/heads/stable".to_owned()),
            webhook_secret: None,
            kustomize: None,
            kustomize_unisolated: false,
            verify: None,
        },
        mirror: work.path().join("mirror"),
    };
    let mut settings = HubSettings::new(vec![source], &keys);
    // Enrolments ask for syncs; nothing else changes the repository during a run.
    settings.poll_interval = Duration::from_secs(3600);
    let hub = Hub::start(HubParts {
        settings,
        store: Arc::new(store.clone()),
        keys: keys.clone(),
        clock: virtual_now,
        agents: hub_endpoint,
        enrolment: EnrolmentInfo {
            hub_address: hub_address.to_string(),
            hub_pin: hub_pin(&keys.transport().public_key()),
            root_key: keys.root(),
        },
        admin: None,
        hooks: None,
        replication: None,
    });
    let changes = hub.changes().clone();

    // The agents.
    let pin = hub_pin(&keys.transport().public_key());
    let root = keys.root();
    let mut agents: Vec<SimAgent> = Vec::with_capacity(scenario.agents());
    let mut serial = 0u32;
    for (group_index, group) in scenario.groups.iter().enumerate() {
        let link = scenario.links[&group.link].link();
        for _ in 0..group.count {
            serial += 1;
            let mut secret = [0u8; 16];
            secret[..8].copy_from_slice(&scenario.seed.to_le_bytes());
            secret[8..12].copy_from_slice(&serial.to_le_bytes());
            let token = hex::encode(secret);
            {
                store.create_token(
                    &Digest::of(token.as_bytes()),
                    &group.labels,
                    "outpost-sim",
                    virtual_now(),
                    virtual_now() + 365 * 86_400,
                )?;
            }
            let mut state = State::open(Path::new(":memory:"))?;
            state.set_enrolment(&hub_address.to_string(), &pin, &root, &token)?;
            let seed = Digest::of_parts(&[&scenario.seed.to_le_bytes(), &serial.to_le_bytes()]);
            let key = outpost_proto::SigningKey::from_seed(seed.0);
            let address = SocketAddr::from((
                Ipv4Addr::new(
                    10,
                    1 + group_index as u8,
                    (serial / 250) as u8,
                    (serial % 250) as u8 + 1,
                ),
                5000,
            ));
            let socket = network.socket(address, Some(link.clone()));
            let traffic = socket.traffic();
            let endpoint = net::endpoint(socket, None)?;
            let options = ClientOptions {
                seed: u64::from(serial) ^ scenario.seed,
                ..ClientOptions::default()
            };
            let client = Client::new(key, state, options);
            let target = Arc::new(MemoryTarget::new());
            if !group.cannot_pull.is_empty() {
                let images = group.cannot_pull.clone();
                target.fail_health(Some(Box::new(move |object| {
                    let containers = object["spec"]["template"]["spec"]["containers"].as_array()?;
                    containers
                        .iter()
                        .filter_map(|container| container["image"].as_str())
                        .find(|image| images.iter().any(|bad| bad == image))
                        .map(|image| format!("Back-off pulling image \"{image}\""))
                })));
            }
            let reconcile = ReconcileOptions {
                seed: u64::from(serial),
                ..ReconcileOptions::default()
            };
            let reconciler = Reconciler::new(client.clone(), target, reconcile);
            tokio::spawn(async move {
                let error = reconciler.run().await;
                tracing::error!(%error, "reconcile loop stopped");
            });
            let runner = client.clone();
            tokio::spawn(async move {
                let error = runner.run_on(endpoint).await;
                tracing::error!(%error, "agent stopped");
            });
            agents.push(SimAgent { traffic, client });
        }
    }

    // Rollouts, when the scenario says.
    for plan in scenario.rollouts.clone() {
        let store = store.clone();
        let changes = changes.clone();
        let bundle = scenario.git.bundle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(plan.at_minutes * 60.0)).await;
            let request = Request {
                bundle,
                tag: plan.tag.clone(),
                selector: plan.selector.clone(),
                waves: plan.waves.clone(),
                health_timeout: (plan.health_timeout_minutes * 60.0) as i64,
                max_failures: plan.max_failures.clone(),
                on_failure: match plan.on_failure.as_str() {
                    "pause" => OnFailure::Pause,
                    _ => OnFailure::Rollback,
                },
            };
            let created =
                { rollout::create(&store, &request, "outpost-sim", "scenario", virtual_now()) };
            match created {
                Ok(rollout) => tracing::info!(id = rollout.id, tag = %plan.tag, "rollout created"),
                Err(error) => tracing::error!(%error, "rollout not created"),
            }
            changes.rollouts_changed();
        });
    }

    // Sample until everything settled or time is up.
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut peak_rss = 0;
    let last_rollout = scenario
        .rollouts
        .iter()
        .map(|plan| plan.at_minutes)
        .fold(0.0, f64::max);
    let settled = loop {
        tokio::time::sleep(Duration::from_secs(scenario.sample_seconds.max(1))).await;
        let t = start.elapsed().as_secs();
        let (sample, rollouts) = sample_fleet(&store, &agents, t)?;
        peak_rss = peak_rss.max(sample.rss);
        if show_progress {
            progress(scenario, &sample, started, agents.len());
        }
        let ended = rollouts.len() == scenario.rollouts.len()
            && rollouts.iter().all(|head| !head.rollout.phase.is_active());
        let done = t as f64 >= last_rollout * 60.0 && ended && sample.converged == agents.len();
        samples.push(sample);
        if done {
            break true;
        }
        if t >= scenario.max_minutes * 60 {
            break false;
        }
    };
    if show_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    let mut rollouts: Vec<RolloutHead> = store.rollouts()?;
    hub.shutdown().await;
    rollouts.reverse();
    let mut per_agent: Vec<u64> = agents.iter().map(|agent| agent.traffic.total()).collect();
    per_agent.sort_unstable();
    let payload_bytes = agents
        .iter()
        .map(|agent| {
            agent
                .client
                .counters()
                .payload_bytes
                .load(Ordering::Relaxed)
        })
        .sum();
    Ok(Report {
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        agents: agents.len(),
        virtual_seconds: start.elapsed().as_secs(),
        wall_seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu_before,
        settled,
        converged: samples.last().map_or(0, |sample| sample.converged),
        rollouts: rollouts
            .iter()
            .map(outpost_hub::api::rollouts::head_json)
            .collect(),
        bytes: summarise(&per_agent),
        payload_bytes,
        peak_rss,
        samples,
        per_agent_bytes: per_agent,
        wave_labels: rollouts
            .iter()
            .map(|head| {
                head.rollout
                    .plan
                    .waves
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })
            .collect(),
    })
}

fn sample_fleet(
    store: &SqliteStore,
    agents: &[SimAgent],
    t: u64,
) -> Result<(Sample, Vec<RolloutHead>)> {
    let assigned: HashMap<(String, String), Digest> = store
        .bundle_assignments(None)?
        .into_iter()
        .map(|(row, _)| ((row.agent, row.bundle), row.digest))
        .collect();
    let mut healthy: BTreeMap<String, bool> = BTreeMap::new();
    for stored in store.statuses(None)? {
        let on_target = assigned
            .get(&(stored.agent.clone(), stored.status.bundle.clone()))
            .is_some_and(|digest| *digest == stored.status.digest);
        let entry = healthy.entry(stored.agent).or_insert(true);
        *entry &= on_target && stored.status.phase == Phase::Healthy;
    }
    let enrolled = store.agents()?.len();
    let mut rollouts = store.rollouts()?;
    rollouts.reverse();
    let waves = rollouts
        .iter()
        .map(|head| {
            head.progress
                .waves
                .iter()
                .map(|wave| wave.healthy)
                .collect()
        })
        .collect();
    let bytes = agents.iter().map(|agent| agent.traffic.total()).sum();
    Ok((
        Sample {
            t,
            enrolled,
            converged: healthy.values().filter(|healthy| **healthy).count(),
            waves,
            bytes,
            rss: rss(),
        },
        rollouts,
    ))
}

/// Where a run's files go: `report.json` and the plots.
pub fn output_paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    (
        dir.join("report.json"),
        dir.join("convergence.svg"),
        dir.join("bytes-per-agent.svg"),
        dir.join("memory.svg"),
    )
}
