//! `outpost-sim load --agents N`: a load generator against a real `outpost-hub run` process.
//!
//! N agent clients — each with its own key, its own enrolment token and connection, speaking
//! the real protocol over real QUIC on loopback UDP and verifying every snapshot with the
//! agent's verification code — but with their state in memory (a held body is shared by every
//! agent that verified the same digest), so a hundred thousand fit beside the hub on one
//! machine. Many connections share one UDP socket (a quinn endpoint carries many client
//! connections, each with its own client config): the open-file limit here is 20,000.
//!
//! The run: start a hub on a fresh data dir and Git repository (unless `--admin` names a
//! running one), make the tokens through the admin API, let every agent enrol and install the
//! current release, then commit a ConfigMap edit, ask the hub to fetch, and time until every
//! agent installed the new release. RSS and CPU are read from the hub process's /proc entry.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_proto::transport::{MessageReader, SERVER_NAME, Tuning, client_config, send_message};
use outpost_proto::verify::{Expectation, Installed, verify_header};
use outpost_proto::wire::{
    Assignment, BundleStatus, Enrol, ErrorCode, Fetch, HeldSnapshot, Hello, Message,
    PayloadEncoding, Phase, StatusReport, TransferStart,
};
use outpost_proto::{Digest, PublicKey, SignedKeyCertificate, SigningKey, TrustStore};
use serde_json::{Value, json};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Agents.
    pub agents: usize,
    /// A running hub's admin API (else one is started).
    pub admin: Option<String>,
    /// Its QUIC address (with `admin`).
    pub hub: Option<SocketAddr>,
    /// Its Git repository, to commit to (with `admin`).
    pub repo: Option<PathBuf>,
    /// Its process id, for RSS and CPU (with `admin`).
    pub pid: Option<u32>,
    /// Agent connections per UDP socket.
    pub per_socket: usize,
    /// New connections started per second while enrolling.
    pub connect_rate: usize,
    /// Objects in the bundle.
    pub objects: usize,
    /// The `outpost-hub` binary (default: beside this one, built if missing).
    pub hub_binary: Option<PathBuf>,
    /// How long to wait for a phase before giving up.
    pub timeout: Duration,
    /// Start the hub on a PostgreSQL store (a server started for the run).
    pub postgres: bool,
    /// Replicas on that store (1 or 2; with 2 the agents are served by the one not leading).
    pub replicas: usize,
}

/// The hub's process figures.
#[derive(Debug, Clone, Copy, Default)]
struct ProcessFigures {
    rss_kb: u64,
    cpu_seconds: f64,
    threads: u64,
}

fn process_figures(pid: u32) -> Result<ProcessFigures> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is the hub running?)"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    let per_second = 100.0;
    Ok(ProcessFigures {
        rss_kb: field("VmRSS:"),
        cpu_seconds: (ticks(11) + ticks(12)) / per_second,
        threads: field("Threads:"),
    })
}

/// The hub under load: one started here, or a running one.
struct HubUnderTest {
    admin: String,
    token: String,
    agents: SocketAddr,
    repo: PathBuf,
    pid: u32,
    child: Option<Child>,
    /// The leader, when the agents are served by another replica.
    leader: Option<(Child, u32)>,
    _work: Option<tempfile::TempDir>,
    /// Dropped last: the hubs stop before their database.
    _database: Option<outpost_hub::store::postgres::testing::TestServer>,
}

impl Drop for HubUnderTest {
    fn drop(&mut self) {
        for child in self
            .child
            .iter_mut()
            .chain(self.leader.iter_mut().map(|(child, _)| child))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .context("running git (is it installed?)")?;
    if !status.success() {
        bail!("git {args:?} failed in {}", dir.display());
    }
    Ok(())
}

fn bundle(objects: usize, edit: u64) -> String {
    (0..objects)
        .map(|index| {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: config-{index:03}\n  namespace: shop\ndata:\n  setting: \"value {index} of a typical shop configuration\"\n  edit: \"{}\"\n---\n",
                if index == 0 { edit } else { 0 }
            )
        })
        .collect()
}

pub(crate) fn write_commit(repo: &Path, objects: usize, edit: u64) -> Result<()> {
    std::fs::create_dir_all(repo.join("shop"))?;
    std::fs::write(repo.join("shop/config.yaml"), bundle(objects, edit))?;
    git(repo, &["add", "-A"])?;
    git(repo, &["commit", "-qm", &format!("edit {edit}")])
}

pub(crate) fn free_port(udp: bool) -> Result<u16> {
    Ok(match udp {
        true => std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
        false => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
    })
}

/// The `outpost-hub` binary beside this one; built with cargo when missing (or older than the
/// hub's sources would warrant: cargo decides).
pub(crate) fn hub_binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let mut dir = std::env::current_exe()?;
    dir.pop();
    let path = dir.join("outpost-hub");
    if let Ok(cargo) = std::env::var("CARGO") {
        let profile = dir
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("release");
        eprintln!("load: building outpost-hub ({profile}) with cargo so the hub is current");
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "outpost-hub", "--bin", "outpost-hub"]);
        match profile {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        let status = build
            .status()
            .context("running cargo build for outpost-hub")?;
        if !status.success() {
            bail!("building outpost-hub failed");
        }
    }
    if !path.exists() {
        bail!(
            "{} is missing: build it (cargo build --release -p outpost-hub) or give --hub-binary",
            path.display()
        );
    }
    Ok(path)
}

fn start_hub(options: &LoadOptions) -> Result<HubUnderTest> {
    let binary = hub_binary(options.hub_binary.as_deref())?;
    let work = tempfile::Builder::new()
        .prefix("outpost-load-")
        .tempdir()
        .context("making a work dir")?;
    let repo = work.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["config", "user.email", "load@outpost.invalid"])?;
    git(&repo, &["config", "user.name", "Load"])?;
    write_commit(&repo, options.objects, 0)?;
    let database = match options.postgres {
        true => {
            let server = outpost_hub::store::postgres::testing::TestServer::start()
                .map_err(anyhow::Error::msg)
                .context("starting a PostgreSQL server for the run")?;
            let url = server.create_database().map_err(anyhow::Error::msg)?;
            eprintln!("load: store on PostgreSQL ({url})");
            Some((server, url))
        }
        false => None,
    };
    let store_line = database
        .as_ref()
        .map(|(_, url)| format!("store = \"{url}\"\n"))
        .unwrap_or_default();
    let hub_config = |name: &str, key_dir: &str| -> Result<(String, u16, u16)> {
        let (admin_port, agents_port) = (free_port(false)?, free_port(true)?);
        let config = work.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n{key_dir}{store_line}poll_interval_seconds = 3600\napi_writes_per_second = 1000\n[listen]\nadmin = \"127.0.0.1:{admin_port}\"\nagents = \"127.0.0.1:{agents_port}\"\n[[sources]]\nname = \"fleet\"\nurl = \"file://{}\"\n",
                work.path().join(name).display(),
                repo.display()
            ),
        )?;
        Ok((config.display().to_string(), admin_port, agents_port))
    };
    let (config, admin_port, agents_port) = hub_config("hub", "")?;
    let run = |args: &[&str]| -> Result<String> {
        let output = Command::new(&binary).args(args).output()?;
        if !output.status.success() {
            bail!(
                "outpost-hub {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    run(&["keys", "init", "--config", &config])?;
    let token = run(&[
        "admin-token",
        "create",
        "--config",
        &config,
        "--name",
        "load",
        "--role",
        "admin",
    ])?;
    // The hub logs warnings only, unless OUTPOST_LOAD_HUB_LOG asks for more (say "info", to see
    // when it rendered and assigned relative to the load generator's lines).
    let level = std::env::var("OUTPOST_LOAD_HUB_LOG").unwrap_or_else(|_| "warn".to_owned());
    let start = |config: &str, admin_port: u16| -> Result<Child> {
        let child = Command::new(&binary)
            .args(["run", "--config", config])
            .env("OUTPOST_LOG", &level)
            .env("RUST_LOG", &level)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting outpost-hub run")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
            if Instant::now() > deadline {
                bail!("the hub did not open its admin API within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(child)
    };
    let first = start(&config, admin_port)?;
    let (child, leader, admin_port, agents_port) = match options.replicas {
        1 => (first, None, admin_port, agents_port),
        _ => {
            // The first leads before the second starts; the second serves every agent.
            let admin = Admin::new(&format!("http://127.0.0.1:{admin_port}"), &token);
            let deadline = Instant::now() + Duration::from_secs(60);
            while admin.get("/api/v1/replica")?["leading"] != true {
                if Instant::now() > deadline {
                    bail!("the first replica did not take the lease within 60 s");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let keys = work.path().join("hub").join("keys");
            let (second, admin_2, agents_2) =
                hub_config("replica", &format!("key_dir = \"{}\"\n", keys.display()))?;
            let pid = first.id();
            let child = start(&second, admin_2)?;
            eprintln!(
                "load: two replicas: the leader (pid {pid}) syncs and assigns; the agents are served by the other (pid {})",
                child.id()
            );
            (child, Some((first, pid)), admin_2, agents_2)
        }
    };
    Ok(HubUnderTest {
        admin: format!("http://127.0.0.1:{admin_port}"),
        token,
        agents: SocketAddr::from(([127, 0, 0, 1], agents_port)),
        repo,
        pid: child.id(),
        child: Some(child),
        leader,
        _work: Some(work),
        _database: database.map(|(server, _)| server),
    })
}

/// A blocking admin API client.
pub(crate) struct Admin {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Admin {
    pub(crate) fn new(base: &str, token: &str) -> Admin {
        Admin {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(300)))
                    .build(),
            ),
        }
    }

    fn answer(mut response: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = response.status();
        let value: Value = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_json()
            .context("reading the hub's answer")?;
        if !status.is_success() {
            bail!("the hub answered {status}: {value}");
        }
        Ok(value)
    }

    pub(crate) fn get(&self, path: &str) -> Result<Value> {
        let response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("authorization", &format!("Bearer {}", self.token))
            .call()?;
        Admin::answer(response)
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("authorization", &format!("Bearer {}", self.token))
            .send_json(body)?;
        Admin::answer(response)
    }
}

/// What the agents share: the hub's trust, verified bodies by digest, progress.
#[derive(Debug)]
pub struct Shared {
    pin: Digest,
    trust: RwLock<TrustStore>,
    bodies: Mutex<HashMap<Digest, Arc<outpost_proto::Body>>>,
    /// How many agents hold each digest now.
    holding: Mutex<HashMap<Digest, usize>>,
    enrolled: AtomicUsize,
    /// The ids agents were given, in enrolment order.
    ids: Mutex<Vec<String>>,
    connected: AtomicUsize,
    busy: AtomicU64,
    failures: AtomicU64,
    installs: AtomicU64,
    /// Of them, from a payload the hub pushed with the assignment.
    pushed: AtomicU64,
    payload_bytes: AtomicU64,
}

impl Shared {
    fn new(root: PublicKey, pin: Digest) -> Arc<Shared> {
        Arc::new(Shared {
            pin,
            trust: RwLock::new(TrustStore::new(root)),
            bodies: Mutex::new(HashMap::new()),
            holding: Mutex::new(HashMap::new()),
            enrolled: AtomicUsize::new(0),
            ids: Mutex::new(Vec::new()),
            connected: AtomicUsize::new(0),
            busy: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            installs: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            payload_bytes: AtomicU64::new(0),
        })
    }

    fn hold(&self, before: Option<Digest>, now: Digest) {
        let mut holding = self.holding.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(before) = before
            && let Some(count) = holding.get_mut(&before)
        {
            *count = count.saturating_sub(1);
        }
        *holding.entry(now).or_default() += 1;
    }

    fn holding(&self, digest: &Digest) -> usize {
        self.holding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(digest)
            .copied()
            .unwrap_or(0)
    }
}

/// How a [`Fleet`] connects.
#[derive(Debug, Clone, Copy)]
pub struct FleetOptions {
    /// The hub's QUIC address.
    pub hub: SocketAddr,
    /// Agent connections per UDP socket.
    pub per_socket: usize,
    /// New connections started per second.
    pub connect_rate: usize,
}

/// In-memory agents, each with its own key and connection, enrolling with one token each and
/// then installing whatever the hub assigns (verified with the agent's code), reporting
/// healthy. They stop when the fleet is dropped.
#[derive(Debug)]
pub struct Fleet {
    shared: Arc<Shared>,
    starter: tokio::task::JoinHandle<()>,
    agents: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.starter.abort();
        for agent in self.agents.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            agent.abort();
        }
    }
}

impl Fleet {
    /// Starts one agent per token at the connect rate (call inside a tokio runtime). `shared`
    /// holds the hub's pin and root key ([`Fleet::trusting`]).
    pub fn start(
        options: FleetOptions,
        shared: Arc<Shared>,
        tokens: Vec<String>,
    ) -> std::io::Result<Fleet> {
        let sockets = tokens.len().div_ceil(options.per_socket.max(1)).max(1);
        let endpoints: Vec<quinn::Endpoint> = (0..sockets)
            .map(|_| {
                outpost_hub::udp::endpoint(
                    "127.0.0.1:0".parse().expect("address"),
                    None,
                    outpost_hub::udp::WANTED_BUFFER,
                )
                .map(|(endpoint, _)| endpoint)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let agents = Arc::new(Mutex::new(Vec::with_capacity(tokens.len())));
        let starter = {
            let (shared, agents) = (shared.clone(), agents.clone());
            tokio::spawn(async move {
                let pause = Duration::from_secs_f64(1.0 / options.connect_rate.max(1) as f64);
                let mut next = tokio::time::Instant::now();
                for (index, token) in tokens.into_iter().enumerate() {
                    let mut seed = [0u8; 32];
                    seed[..8].copy_from_slice(&(index as u64 + 1).to_le_bytes());
                    seed[8..16].copy_from_slice(&0x10ad_u64.to_le_bytes());
                    let agent = LoadAgent {
                        key: SigningKey::from_seed(Digest::of(&seed).0),
                        token,
                        agent_id: None,
                        sequence: 0,
                        held: BTreeMap::new(),
                        outbox: 0,
                    };
                    let endpoint = endpoints[index % endpoints.len()].clone();
                    let task = tokio::spawn(run_agent(
                        agent,
                        endpoint,
                        options.hub,
                        shared.clone(),
                        index as u64,
                    ));
                    agents.lock().unwrap_or_else(|e| e.into_inner()).push(task);
                    next += pause;
                    tokio::time::sleep_until(next).await;
                }
            })
        };
        Ok(Fleet {
            shared,
            starter,
            agents,
        })
    }

    /// What agents of a hub share: its root key and its TLS key's pin.
    pub fn trusting(root: PublicKey, pin: Digest) -> Arc<Shared> {
        Shared::new(root, pin)
    }

    /// Agents enrolled so far.
    pub fn enrolled(&self) -> usize {
        self.shared.enrolled.load(Ordering::Relaxed)
    }

    /// Agents connected now.
    pub fn connected(&self) -> usize {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Agents holding this body now.
    pub fn holding(&self, digest: &Digest) -> usize {
        self.shared.holding(digest)
    }

    /// The agents' ids, in enrolment order.
    pub fn ids(&self) -> Vec<String> {
        self.shared
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Snapshots installed so far.
    pub fn installs(&self) -> u64 {
        self.shared.installs.load(Ordering::Relaxed)
    }
}

/// One agent's state, in memory.
struct LoadAgent {
    key: SigningKey,
    token: String,
    agent_id: Option<String>,
    sequence: u64,
    /// What it holds, by bundle: generation and body digest.
    held: BTreeMap<String, (u64, Digest)>,
    outbox: u64,
}

/// Why one session ended.
enum SessionEnd {
    Busy(Duration),
    Lost(String),
}

async fn run_agent(
    mut agent: LoadAgent,
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    shared: Arc<Shared>,
    seed: u64,
) {
    let tuning = Tuning::default();
    let Ok(config) = client_config(&agent.key, shared.pin, &tuning) else {
        shared.failures.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut failures = 0u32;
    let mut random = seed;
    loop {
        let ended = session(&mut agent, &endpoint, &config, hub, &shared).await;
        let wait = match ended {
            SessionEnd::Busy(wait) => {
                shared.busy.fetch_add(1, Ordering::Relaxed);
                wait
            }
            SessionEnd::Lost(reason) => {
                tracing::debug!(%reason, "load agent session ended");
                failures = (failures + 1).min(8);
                shared.failures.fetch_add(1, Ordering::Relaxed);
                outpost_agent::client::backoff_delay(
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                    failures,
                    outpost_agent::client::next_random(&mut random),
                )
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn session(
    agent: &mut LoadAgent,
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    hub: SocketAddr,
    shared: &Shared,
) -> SessionEnd {
    let lost = |error: &dyn std::fmt::Display| SessionEnd::Lost(error.to_string());
    let connecting = match endpoint.connect_with(config.clone(), hub, SERVER_NAME) {
        Ok(connecting) => connecting,
        Err(error) => return lost(&error),
    };
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(error) => return lost(&error),
    };
    let (mut send, recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(error) => return lost(&error),
    };
    let mut reader = MessageReader::new(recv);
    if agent.agent_id.is_none() {
        let enrol = Message::Enrol(Enrol {
            token: agent.token.clone(),
            agent_version: "load".to_owned(),
        });
        if let Err(error) = send_message(&mut send, &enrol).await {
            return lost(&error);
        }
        match reader.next().await {
            Ok(Some(Message::Enrolled(enrolled))) => {
                shared
                    .ids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(enrolled.agent_id.clone());
                agent.agent_id = Some(enrolled.agent_id);
                shared.enrolled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Message::Error(error))) => return refused(&error),
            Ok(other) => return lost(&format!("expected Enrolled, got {other:?}")),
            Err(error) => return lost(&error),
        }
    }
    let hello = Message::Hello(Hello {
        agent_version: "load".to_owned(),
        assignment_sequence: agent.sequence,
        have: agent
            .held
            .iter()
            .map(|(bundle, (generation, digest))| HeldSnapshot {
                bundle: bundle.clone(),
                generation: *generation,
                digest: *digest,
            })
            .collect(),
        // Load agents keep no headers: they hold only what this hub assigned them.
        proofs: Vec::new(),
    });
    if let Err(error) = send_message(&mut send, &hello).await {
        return lost(&error);
    }
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let ended = control(agent, &connection, &mut send, &mut reader, shared).await;
    shared.connected.fetch_sub(1, Ordering::Relaxed);
    ended
}

fn refused(error: &outpost_proto::wire::ErrorMessage) -> SessionEnd {
    match error.code {
        ErrorCode::Busy => SessionEnd::Busy(Duration::from_secs(u64::from(
            error.retry_after.unwrap_or(5).max(1),
        ))),
        code => SessionEnd::Lost(format!("refused ({code:?}): {}", error.message)),
    }
}

async fn control(
    agent: &mut LoadAgent,
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    reader: &mut MessageReader,
    shared: &Shared,
) -> SessionEnd {
    // A payload the hub pushed ahead of the Assign naming it: start, and the chunk once it came.
    let mut pushed: Option<(TransferStart, Option<Vec<u8>>)> = None;
    loop {
        let message = match reader.next().await {
            Ok(Some(message)) => message,
            Ok(None) => return SessionEnd::Lost("the hub closed the stream".to_owned()),
            Err(error) => return SessionEnd::Lost(error.to_string()),
        };
        match message {
            Message::Trust(trust) => {
                let mut store = shared.trust.write().unwrap_or_else(|e| e.into_inner());
                for wire in &trust.certificates {
                    if let Ok(certificate) = SignedKeyCertificate::from_wire(wire) {
                        let _ = store.add_certificate(&certificate);
                    }
                }
            }
            Message::Assign(assign) => {
                if assign.sequence <= agent.sequence && agent.sequence != 0 {
                    continue;
                }
                // The sequence is taken only once everything it assigns is held: a session
                // lost mid-fetch says the older sequence on reconnecting, so the hub sends
                // the assignments again and the fetch is retried.
                for assignment in assign.assignments {
                    let held = agent
                        .held
                        .get(&assignment.bundle)
                        .is_some_and(|(_, digest)| *digest == assignment.digest);
                    if held {
                        continue;
                    }
                    let installed = match pushed.take() {
                        Some((start, Some(payload))) if start.snapshot == assignment.digest => {
                            shared.pushed.fetch_add(1, Ordering::Relaxed);
                            install(agent, &assignment, &start, payload, shared)
                        }
                        _ => fetch(agent, connection, &assignment, shared).await,
                    };
                    match installed {
                        Ok(()) => {
                            agent.outbox += 1;
                            let report = Message::StatusReport(StatusReport {
                                sequence: agent.outbox,
                                bundles: vec![BundleStatus {
                                    bundle: assignment.bundle.clone(),
                                    digest: assignment.digest,
                                    generation: assignment.generation,
                                    phase: Phase::Healthy,
                                    objects_total: 1,
                                    objects_ready: 1,
                                    message: String::new(),
                                    observed_at: unix_now(),
                                    stale: false,
                                }],
                            });
                            if let Err(error) = send_message(send, &report).await {
                                return SessionEnd::Lost(error.to_string());
                            }
                        }
                        Err(error) => return SessionEnd::Lost(error),
                    }
                }
                agent.sequence = assign.sequence;
            }
            Message::Error(error) => return refused(&error),
            Message::TransferStart(start) => pushed = Some((start, None)),
            Message::TransferChunk(chunk) => {
                if let Some((start, payload)) = &mut pushed
                    && chunk.payload_digest == start.payload_digest
                    && chunk.offset == 0
                {
                    *payload = Some(chunk.bytes);
                }
            }
            Message::Ack(_) => {}
            _ => {}
        }
    }
}

async fn fetch(
    agent: &mut LoadAgent,
    connection: &quinn::Connection,
    assignment: &Assignment,
    shared: &Shared,
) -> Result<(), String> {
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|error| error.to_string())?;
    let fetch = Message::Fetch(Fetch {
        snapshot: assignment.digest,
        have: agent.held.values().map(|(_, digest)| *digest).collect(),
        resume: None,
    });
    send_message(&mut send, &fetch)
        .await
        .map_err(|error| error.to_string())?;
    let _ = send.finish();
    let mut reader = MessageReader::new(recv);
    let start = match reader.next().await.map_err(|error| error.to_string())? {
        Some(Message::TransferStart(start)) => start,
        other => return Err(format!("expected TransferStart, got {other:?}")),
    };
    let mut payload = Vec::with_capacity(start.payload_size as usize);
    while (payload.len() as u64) < start.payload_size {
        match reader.next().await.map_err(|error| error.to_string())? {
            Some(Message::TransferChunk(chunk)) => payload.extend_from_slice(&chunk.bytes),
            other => return Err(format!("expected a chunk, got {other:?}")),
        }
    }
    install(agent, assignment, &start, payload, shared)
}

/// Verifies a transfer's header and payload (fetched or pushed) and holds the snapshot.
fn install(
    agent: &mut LoadAgent,
    assignment: &Assignment,
    start: &TransferStart,
    payload: Vec<u8>,
    shared: &Shared,
) -> Result<(), String> {
    let installed = agent
        .held
        .get(&assignment.bundle)
        .map(|(generation, digest)| Installed {
            generation: *generation,
            digest: *digest,
        });
    let header = {
        let trust = shared.trust.read().unwrap_or_else(|e| e.into_inner());
        verify_header(
            &trust,
            &start.header,
            &start.signature,
            &Expectation {
                bundle: &assignment.bundle,
                assigned_digest: Some(assignment.digest),
                installed,
            },
        )
        .map_err(|error| error.to_string())?
    };
    shared
        .payload_bytes
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    let reference = match start.encoding {
        PayloadEncoding::Whole => None,
        PayloadEncoding::Delta { base } => Some(
            shared
                .bodies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&base)
                .cloned()
                .ok_or("a delta against a body this agent does not hold")?,
        ),
    };
    let snapshot = header
        .accept_payload(&payload, start.payload_digest, reference.as_deref())
        .map_err(|error| error.to_string())?;
    let digest = snapshot.digest();
    shared
        .bodies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(digest)
        .or_insert_with(|| Arc::new(snapshot.body().clone()));
    let before = agent
        .held
        .insert(
            assignment.bundle.clone(),
            (snapshot.header().generation, digest),
        )
        .map(|(_, digest)| digest);
    shared.hold(before, digest);
    shared.installs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// The digest every agent should end up holding: the bundle's release at the tracked branch.
pub(crate) fn current_digest(admin: &Admin) -> Result<Option<(u64, Digest)>> {
    let releases = admin.get("/api/v1/releases")?;
    let Some(generation) = releases
        .as_array()
        .into_iter()
        .flatten()
        .find(|release| release["ref"] == "refs/heads/main" && release["bundle"] == "shop")
        .and_then(|release| release["generation"].as_u64())
    else {
        return Ok(None);
    };
    let snapshot = admin.get(&format!("/api/v1/snapshots/shop/{generation}"))?;
    let digest = snapshot["digest"]
        .as_str()
        .and_then(|hex| Digest::from_hex(hex).ok())
        .context("the snapshot has no digest")?;
    Ok(Some((generation, digest)))
}

fn wait_until(
    what: &str,
    timeout: Duration,
    shared: &Shared,
    total: usize,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        if done()? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "{what}: not done after {timeout:?} ({} enrolled, {} connected, {} installs, {} busy answers, {} failed sessions)",
                shared.enrolled.load(Ordering::Relaxed),
                shared.connected.load(Ordering::Relaxed),
                shared.installs.load(Ordering::Relaxed),
                shared.busy.load(Ordering::Relaxed),
                shared.failures.load(Ordering::Relaxed),
            );
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "load: {what}: {:.0} s, {}/{total} enrolled, {} connected, {} installs, {} busy, {} failed sessions",
                started.elapsed().as_secs_f64(),
                shared.enrolled.load(Ordering::Relaxed),
                shared.connected.load(Ordering::Relaxed),
                shared.installs.load(Ordering::Relaxed),
                shared.busy.load(Ordering::Relaxed),
                shared.failures.load(Ordering::Relaxed),
            );
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Agents.
    pub agents: usize,
    /// Hub RSS before any agent connected (MB).
    pub rss_before_mb: f64,
    /// Hub RSS with every agent connected and idle (MB).
    pub rss_mb: f64,
    /// (RSS connected - RSS before) per agent (KB).
    pub per_agent_kb: f64,
    /// From the first token to every agent holding the release (s).
    pub enrol_seconds: f64,
    /// From the commit's fetch request to every agent holding the new release (s).
    pub propagate_seconds: f64,
    /// Hub CPU over the whole run (s).
    pub cpu_seconds: f64,
    /// Hub CPU during enrolment and during propagation (s).
    pub cpu_enrol: f64,
    /// Hub CPU during propagation (s).
    pub cpu_propagate: f64,
    /// What the fleet page fetches (the summary and one page of 100 agents): answer time (s).
    pub fleet_seconds: f64,
    /// Every agent through the fleet API, 5,000 a page: answer time (s).
    pub fleet_all_seconds: f64,
    /// Hub threads at the end.
    pub threads: u64,
    /// Busy answers, failed sessions.
    pub busy: u64,
    /// Sessions that failed (and were retried).
    pub failures: u64,
}

/// Runs the load and prints progress; returns the figures.
pub fn run(options: &LoadOptions) -> Result<LoadReport> {
    let hub = match &options.admin {
        Some(admin) => HubUnderTest {
            admin: admin.clone(),
            token: std::env::var("OUTPOST_TOKEN")
                .context("with --admin, give an admin token in OUTPOST_TOKEN")?,
            agents: options
                .hub
                .context("with --admin, give --hub (the QUIC address)")?,
            repo: options
                .repo
                .clone()
                .context("with --admin, give --repo (the repository the hub watches)")?,
            pid: options
                .pid
                .context("with --admin, give --pid (the hub's process id)")?,
            child: None,
            leader: None,
            _work: None,
            _database: None,
        },
        None => start_hub(options)?,
    };
    let admin = Admin::new(&hub.admin, &hub.token);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = process_figures(hub.pid)?;
    // Enrolment bundles name the hub's pin and root key; take them from one.
    let one = admin.post("/api/v1/tokens", json!({"labels": {}}))?;
    let bundle = one["bundle"].as_str().unwrap_or_default();
    let field = |name: &str| {
        bundle
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} = \"")))
            .map(|rest| rest.trim_end_matches('"').to_owned())
            .with_context(|| format!("no {name} in the enrolment bundle"))
    };
    let (pin, root) = (field("hub_pin")?, field("root_key")?);
    let mut root_bytes = [0u8; 32];
    hex::decode_to_slice(&root, &mut root_bytes).context("root key")?;
    let root = PublicKey::from_bytes(&root_bytes).context("root key")?;
    let shared = Shared::new(root, Digest::from_hex(&pin).context("pin")?);
    // Wait for the first release.
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(found) = current_digest(&admin)? {
            break found;
        }
        if Instant::now() > deadline {
            bail!("the hub rendered no release of the bundle within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = process_figures(hub.pid)?;
    eprintln!(
        "load: hub pid {}, RSS {:.1} MB before agents; making {} tokens",
        hub.pid,
        before.rss_kb as f64 / 1024.0,
        options.agents
    );

    // Enrolment: tokens in batches, then the agents, started at the connect rate.
    let enrol_started = Instant::now();
    let mut tokens = Vec::with_capacity(options.agents);
    while tokens.len() < options.agents {
        let count = (options.agents - tokens.len()).min(10_000);
        let made = admin.post(
            "/api/v1/tokens",
            json!({"labels": {"role": "store"}, "count": count, "ttl_seconds": 86_400}),
        )?;
        for token in made["tokens"].as_array().into_iter().flatten() {
            tokens.push(token.as_str().unwrap_or_default().to_owned());
        }
    }
    let fleet = runtime.block_on(async {
        Fleet::start(
            FleetOptions {
                hub: hub.agents,
                per_socket: options.per_socket,
                connect_rate: options.connect_rate,
            },
            shared.clone(),
            tokens,
        )
    })?;
    let total = options.agents;
    wait_until("enrolment", options.timeout, &shared, total, || {
        Ok(shared.holding(&first.1) >= total)
    })?;
    let enrol = enrol_started.elapsed();
    let after_enrol = process_figures(hub.pid)?;
    eprintln!(
        "load: {total} agents enrolled and on generation {} in {:.1} s",
        first.0,
        enrol.as_secs_f64()
    );
    // Idle RSS with everyone connected.
    std::thread::sleep(Duration::from_secs(5));
    let idle = process_figures(hub.pid)?;
    let fleet_started = Instant::now();
    let summary = admin.get("/api/v1/fleet/summary")?;
    let page = admin.get("/api/v1/fleet?limit=100")?;
    let fleet_seconds = fleet_started.elapsed().as_secs_f64();
    if summary["agents"].as_u64() != Some(total as u64) && options.admin.is_none() {
        eprintln!(
            "load: warning: the fleet summary counts {} agents, expected {}",
            summary["agents"], total
        );
    }
    drop(page);
    let all_started = Instant::now();
    let mut listed = 0usize;
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(after) => format!("/api/v1/fleet?limit=5000&after={after}"),
            None => "/api/v1/fleet?limit=5000".to_owned(),
        };
        let page = admin.get(&path)?;
        listed += page["agents"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let fleet_all_seconds = all_started.elapsed().as_secs_f64();
    eprintln!(
        "load: fleet page data (summary + 100 agents) {fleet_seconds:.2} s; all {listed} agents in pages of 5,000 {fleet_all_seconds:.2} s"
    );

    // One commit to all.
    write_commit(&hub.repo, options.objects, 1)?;
    let commit_cpu = process_figures(hub.pid)?;
    let propagate_started = Instant::now();
    admin.post("/api/v1/fetch", json!({}))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        match current_digest(&admin)? {
            Some(found) if found.1 != first.1 => break found,
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("the hub rendered no new release within 60 s of the fetch request");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "load: generation {} released {:.1} s after the fetch request",
        second.0,
        propagate_started.elapsed().as_secs_f64()
    );
    wait_until("propagation", options.timeout, &shared, total, || {
        Ok(shared.holding(&second.1) >= total)
    })?;
    let propagate = propagate_started.elapsed();
    let end = process_figures(hub.pid)?;
    eprintln!(
        "load: generation {} on all {total} agents {:.1} s after the fetch request ({} of the payloads pushed with the assignment); {} busy answers, {} failed sessions retried, {} payload bytes",
        second.0,
        propagate.as_secs_f64(),
        shared.pushed.load(Ordering::Relaxed),
        shared.busy.load(Ordering::Relaxed),
        shared.failures.load(Ordering::Relaxed),
        shared.payload_bytes.load(Ordering::Relaxed),
    );
    if let Some((_, pid)) = &hub.leader
        && let Ok(leader) = process_figures(*pid)
    {
        eprintln!(
            "load: the leader (serving no agent): RSS {:.1} MB, CPU {:.1} s over the run",
            leader.rss_kb as f64 / 1024.0,
            leader.cpu_seconds
        );
    }
    drop(fleet);
    runtime.shutdown_timeout(Duration::from_secs(1));
    let per_agent_kb = (idle.rss_kb.saturating_sub(before.rss_kb)) as f64 / total.max(1) as f64;
    Ok(LoadReport {
        agents: total,
        rss_before_mb: before.rss_kb as f64 / 1024.0,
        rss_mb: idle.rss_kb as f64 / 1024.0,
        per_agent_kb,
        enrol_seconds: enrol.as_secs_f64(),
        propagate_seconds: propagate.as_secs_f64(),
        cpu_seconds: end.cpu_seconds - started.cpu_seconds,
        cpu_enrol: after_enrol.cpu_seconds - before.cpu_seconds,
        cpu_propagate: end.cpu_seconds - commit_cpu.cpu_seconds,
        fleet_seconds,
        fleet_all_seconds,
        threads: end.threads,
        busy: shared.busy.load(Ordering::Relaxed),
        failures: shared.failures.load(Ordering::Relaxed),
    })
}
