//! An in-process fleet for transport tests and benchmarks: a hub (its real SQLite store, keys and
//! QUIC agent service on loopback) and agents (their real key files, SQLite state and QUIC
//! client), with snapshots published and assigned directly in the hub's store so a test controls
//! exactly what each agent should run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use outpost_agent::client::AgentError;
use outpost_agent::target::ClusterTarget;
use outpost_agent::{Client, ClientOptions, ReconcileOptions, Reconciler, State, identity, paths};
use outpost_hub::api::EnrolmentInfo;
use outpost_hub::changes::Changes;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::runtime::{Hub, HubParts, HubSettings};
use outpost_hub::store::{AssignmentRow, FleetStore, SqliteStore, Store, StoredSnapshot};
use outpost_hub::transport::{AgentService, ServiceOptions};
use outpost_proto::transport::{Tuning, hub_pin, server_config};
use outpost_proto::{Body, Digest, SnapshotHeader, SourceFile};

/// Unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// A hub serving agents on loopback: the hub runtime with no Git source, its assignments
/// written directly in the store by the test.
#[derive(Debug)]
pub struct TestHub {
    /// Holds the store and keys.
    pub dir: tempfile::TempDir,
    /// The hub's store.
    pub store: SqliteStore,
    /// The hub's keys.
    pub keys: Arc<HubKeys>,
    /// The agent service.
    pub service: Arc<AgentService>,
    /// Wakes agent connections.
    pub changes: Arc<Changes>,
    /// The QUIC address.
    pub address: SocketAddr,
    hub: Option<Hub>,
    assignments: Mutex<BTreeMap<(String, String), AssignmentRow>>,
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.take() {
            drop(hub);
        }
    }
}

/// A published snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Its generation.
    pub generation: u64,
    /// Its body digest.
    pub digest: Digest,
}

/// A hub runtime on `store` and `keys` with its own agent listener on a free loopback port.
fn runtime(
    store: &SqliteStore,
    keys: &Arc<HubKeys>,
    options: ServiceOptions,
    tuning: &Tuning,
) -> (Hub, SocketAddr) {
    let config = server_config(keys.transport(), tuning).expect("server config");
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().expect("address"))
        .expect("hub endpoint");
    let address = endpoint.local_addr().expect("bound");
    let mut settings = HubSettings::new(Vec::new(), keys);
    settings.service = options;
    let hub = Hub::start(HubParts {
        settings,
        store: Arc::new(store.clone()),
        keys: keys.clone(),
        clock: unix_now,
        agents: endpoint,
        enrolment: EnrolmentInfo {
            hub_address: address.to_string(),
            hub_pin: hub_pin(&keys.transport().public_key()),
            root_key: keys.root(),
        },
        admin: None,
        hooks: None,
        replication: None,
    });
    (hub, address)
}

/// A second hub runtime on a [`TestHub`]'s store and keys: what a replica on a shared
/// database is. It serves agents from the shared state; the first hub's change bus does not
/// reach its sessions (an agent connected here sees a change when it next connects).
#[derive(Debug)]
pub struct Replica {
    /// Its QUIC address.
    pub address: SocketAddr,
    hub: Hub,
}

impl Replica {
    /// Wakes this replica's connections of `agents` (in-process replicas on one SQLite file
    /// share no change bus: what `TestHub::assign` writes, only the first hub hears of).
    pub fn wake(&self, agents: &[String]) {
        self.hub.changes().agents_changed(agents);
    }
}

impl TestHub {
    /// A replica of this hub (same store, same keys), listening on an address of its own.
    pub fn replica(&self, options: ServiceOptions, tuning: &Tuning) -> Replica {
        let (hub, address) = runtime(&self.store, &self.keys, options, tuning);
        Replica { address, hub }
    }

    /// Stops this hub's runtime: its agent listener closes, its connections end. The store
    /// stays (replicas go on with it).
    pub fn stop(&mut self) {
        self.hub.take();
    }
}

impl TestHub {
    /// Starts a hub with `options` and QUIC `tuning`.
    pub async fn start(options: ServiceOptions, tuning: &Tuning) -> TestHub {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(&dir.path().join("hub.db")).expect("hub store");
        let keys = HubKeys::create(&dir.path().join("keys"), KeyPolicy::default(), unix_now())
            .expect("hub keys");
        let keys = Arc::new(keys);
        let (hub, address) = runtime(&store, &keys, options, tuning);
        TestHub {
            dir,
            store,
            keys,
            service: hub.service().clone(),
            changes: hub.changes().clone(),
            address,
            hub: Some(hub),
            assignments: Mutex::new(BTreeMap::new()),
        }
    }

    /// Renders `yaml` as the next generation of `bundle`, signs and stores it.
    pub fn publish(&self, bundle: &str, yaml: &str) -> Published {
        let body = Body::render(&[SourceFile {
            path: "manifests.yaml",
            text: yaml,
        }])
        .expect("valid manifests");
        let store = &self.store;
        let generation = store.next_generation(bundle).expect("generation");
        let digest = body.digest();
        let (header, signature) = self
            .keys
            .sign(
                SnapshotHeader {
                    bundle: bundle.to_owned(),
                    generation,
                    git_commit: "0".repeat(40),
                    git_ref: "refs/heads/main".to_owned(),
                    body_digest: digest,
                    body_size: body.as_bytes().len() as u64,
                    object_count: body.object_count(),
                    created_at: unix_now(),
                    expires_at: None,
                    selector: String::new(),
                    key_id: self.keys.signer().key_id(),
                },
                unix_now(),
            )
            .expect("header");
        store
            .insert_snapshot(
                &StoredSnapshot {
                    bundle: bundle.to_owned(),
                    generation,
                    digest,
                    git_commit: "0".repeat(40),
                    git_ref: "refs/heads/main".to_owned(),
                    header,
                    signature: signature.0.to_vec(),
                    object_count: body.object_count(),
                    body: body.into_bytes(),
                    created_at: unix_now(),
                },
                &format!("tree-{generation}"),
                "",
            )
            .expect("insert snapshot");
        Published { generation, digest }
    }

    /// A single-use enrolment token granting `labels`.
    pub fn token(&self, labels: &[(&str, &str)]) -> String {
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).expect("randomness");
        let token = hex::encode(secret);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.store
            .create_token(
                &Digest::of(token.as_bytes()),
                &labels,
                "test",
                unix_now(),
                unix_now() + 3600,
            )
            .expect("token");
        token
    }

    /// Assigns `snapshot` of `bundle` to `agent` and tells connected agents.
    pub fn assign(&self, agent: &str, bundle: &str, snapshot: Published) {
        self.assign_all(&[agent.to_owned()], bundle, snapshot);
    }

    /// Assigns `snapshot` of `bundle` to every agent in `agents` in one change.
    pub fn assign_all(&self, agents: &[String], bundle: &str, snapshot: Published) {
        let rows: Vec<AssignmentRow> = {
            let mut assignments = self.assignments.lock().expect("assignments");
            for agent in agents {
                assignments.insert(
                    (agent.clone(), bundle.to_owned()),
                    AssignmentRow {
                        agent: agent.clone(),
                        bundle: bundle.to_owned(),
                        generation: snapshot.generation,
                        digest: snapshot.digest,
                    },
                );
            }
            assignments.values().cloned().collect()
        };
        self.write_assignments(&rows);
    }

    /// Takes `bundle` away from `agent`.
    pub fn unassign(&self, agent: &str, bundle: &str) {
        let rows: Vec<AssignmentRow> = {
            let mut assignments = self.assignments.lock().expect("assignments");
            assignments.remove(&(agent.to_owned(), bundle.to_owned()));
            assignments.values().cloned().collect()
        };
        self.write_assignments(&rows);
    }

    fn write_assignments(&self, rows: &[AssignmentRow]) {
        let changed = self
            .store
            .set_assignments("test", rows, unix_now())
            .expect("assign");
        self.changes.agents_changed(&changed);
    }

    /// Revokes an agent and tells its connection.
    pub fn revoke(&self, agent: &str, why: &str) {
        self.store
            .revoke_agent(agent, "test", why, unix_now())
            .expect("revoke");
        self.changes.agents_changed(&[agent.to_owned()]);
    }

    /// The pin agents need.
    pub fn pin(&self) -> Digest {
        hub_pin(&self.keys.transport().public_key())
    }
}

/// An agent with its own state dir, driven in-process.
#[derive(Debug)]
pub struct TestAgent {
    /// State dir.
    pub dir: PathBuf,
    /// The running client.
    pub client: Client,
    options: ClientOptions,
    task: Option<tokio::task::JoinHandle<AgentError>>,
    reconciler: Option<Respawn>,
    reconcile_task: Option<tokio::task::JoinHandle<()>>,
}

/// Starts a reconcile loop for a client.
#[derive(Clone)]
struct Respawn(Arc<dyn Fn(Client) -> tokio::task::JoinHandle<()> + Send + Sync>);

impl std::fmt::Debug for Respawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Respawn")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(task) = self.reconcile_task.take() {
            task.abort();
        }
    }
}

impl TestAgent {
    /// Creates an agent in `dir` set to enrol with `hub` (dialled at `address`) using `token`.
    pub fn new(
        dir: &Path,
        hub: &TestHub,
        address: SocketAddr,
        token: &str,
        options: ClientOptions,
    ) -> TestAgent {
        TestAgent::dialling(dir, hub, &address.to_string(), token, options)
    }

    /// Like [`TestAgent::new`], with the enrolment's `hub` as given: one or more addresses,
    /// comma separated (replicas).
    pub fn dialling(
        dir: &Path,
        hub: &TestHub,
        hubs: &str,
        token: &str,
        options: ClientOptions,
    ) -> TestAgent {
        let (_, _) = identity::load_or_create(&paths::key(dir)).expect("agent key");
        let mut state = State::open(&paths::database(dir)).expect("agent state");
        state
            .set_enrolment(hubs, &hub.pin(), &hub.keys.root(), token)
            .expect("enrolment");
        drop(state);
        TestAgent::open(dir, options)
    }

    /// Creates an agent in `dir` with a fresh token (no labels), starts it dialling `address`,
    /// and waits (at most two minutes) until the hub has enrolled it; returns it and its id.
    pub async fn enrolled(
        dir: &Path,
        hub: &TestHub,
        address: SocketAddr,
        options: ClientOptions,
    ) -> (TestAgent, String) {
        let mut agent = TestAgent::new(dir, hub, address, &hub.token(&[]), options);
        agent.start();
        let id = within(120, "enrolment", agent.enrolled_id()).await;
        (agent, id)
    }

    /// Opens an existing agent state dir (as a restarted process would).
    pub fn open(dir: &Path, options: ClientOptions) -> TestAgent {
        let (key, _) = identity::load_or_create(&paths::key(dir)).expect("agent key");
        let state = State::open(&paths::database(dir)).expect("agent state");
        TestAgent {
            dir: dir.to_owned(),
            client: Client::new(key, state, options.clone()),
            options,
            task: None,
            reconciler: None,
            reconcile_task: None,
        }
    }

    /// Runs a reconcile loop against `target` (again after every restart).
    pub fn reconcile<T: ClusterTarget>(&mut self, target: Arc<T>, options: ReconcileOptions) {
        let spawner = Respawn(Arc::new(move |client: Client| {
            let reconciler = Reconciler::new(client, target.clone(), options.clone());
            tokio::spawn(async move {
                let error = reconciler.run().await;
                eprintln!("reconcile loop stopped: {error}");
            })
        }));
        self.reconcile_task = Some((spawner.0)(self.client.clone()));
        self.reconciler = Some(spawner);
    }

    /// Stops the connection loop only (the reconcile loop goes on): the hub is gone for it.
    pub fn disconnect(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// The last status the agent queued for `bundle`.
    pub async fn last_status(&self, bundle: &str) -> Option<outpost_proto::wire::BundleStatus> {
        let statuses = self
            .client
            .with_state(|state| state.last_statuses())
            .await
            .expect("state");
        statuses.into_iter().find(|status| status.bundle == bundle)
    }

    /// Waits until the last status of `bundle` satisfies `test`; returns it.
    pub async fn status_where(
        &self,
        bundle: &str,
        test: impl Fn(&outpost_proto::wire::BundleStatus) -> bool,
    ) -> outpost_proto::wire::BundleStatus {
        loop {
            if let Some(status) = self.last_status(bundle).await
                && test(&status)
            {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    /// Starts the connection loop.
    pub fn start(&mut self) {
        let client = self.client.clone();
        self.task = Some(tokio::spawn(async move { client.run().await }));
    }

    /// Kills the agent (the task and its connection vanish, as with kill -9) and starts a
    /// fresh one on the same state dir.
    pub fn restart(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(task) = self.reconcile_task.take() {
            task.abort();
        }
        let (options, reconciler) = (self.options.clone(), self.reconciler.take());
        *self = TestAgent::open(&self.dir.clone(), options);
        self.start();
        if let Some(spawner) = reconciler {
            self.reconcile_task = Some((spawner.0)(self.client.clone()));
            self.reconciler = Some(spawner);
        }
    }

    /// Waits for the agent to stop (it stops only when refused) and returns why.
    pub async fn stopped(&mut self) -> AgentError {
        let task = self.task.take().expect("agent started");
        task.await.expect("agent task")
    }

    /// The agent id, once enrolled.
    pub async fn id(&self) -> Option<String> {
        self.client
            .with_state(|state| Ok(state.enrolment()?.and_then(|e| e.agent_id)))
            .await
            .expect("state")
    }

    /// Waits until the agent is enrolled; returns its id.
    pub async fn enrolled_id(&self) -> String {
        loop {
            if let Some(id) = self.id().await {
                return id;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits until the agent holds `snapshot`.
    pub async fn holds(&self, snapshot: Published) {
        let mut installed = self.client.installed();
        loop {
            let held = self
                .client
                .with_state(|state| state.held())
                .await
                .expect("state");
            if held.iter().any(|held| held.digest == snapshot.digest) {
                return;
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(200), installed.changed())
                    .await;
        }
    }
}

/// Client options for tests: fast reconnects.
pub fn quick_options(seed: u64) -> ClientOptions {
    ClientOptions {
        backoff_min: std::time::Duration::from_millis(50),
        backoff_max: std::time::Duration::from_millis(500),
        seed,
        ..ClientOptions::default()
    }
}

/// A manifest of `count` ConfigMaps carrying `bytes_each` of incompressible data (base64 of
/// seeded random bytes), so payload sizes are predictable.
pub fn bulky_manifests(count: usize, bytes_each: usize, seed: u64) -> String {
    let mut random = seed;
    let mut yaml = String::new();
    for index in 0..count {
        let mut raw = Vec::with_capacity(bytes_each);
        while raw.len() < bytes_each {
            random = random.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = random;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            raw.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        raw.truncate(bytes_each);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: blob-{index}\n  namespace: default\nbinaryData:\n  blob: {}\n",
            base64(&raw)
        ));
    }
    yaml
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Service options for tests: a fast compression level.
pub fn test_service_options() -> ServiceOptions {
    ServiceOptions {
        compression_level: 3,
        ..ServiceOptions::default()
    }
}

/// Awaits `future`, failing the test with `what` after `seconds`.
/// Polls `check` every 20 ms until it holds, for at most `seconds`; panics naming `what`.
pub async fn eventually(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    within(seconds, what, async {
        while !check().await {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Waits for `future` at most `seconds`; panics naming `what`.
pub async fn within<T>(
    seconds: u64,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(seconds), future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {seconds}s waiting for {what}"))
}
