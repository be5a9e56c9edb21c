//! The hub runtime: every loop of a running hub in one place — one task per Git source that
//! fetches on the poll interval (backing off while the remote is down) or when asked (its
//! webhook, fetch-now, an enrolment), renders and assigns; the rollout driver; the keys
//! refresher; the QUIC agent service; the admin API and webhooks — with its store, keys, clock
//! and listeners injected. `outpost-hub run`, the simulator and the test harness all run this,
//! so what they measure and test is the hub itself.
//!
//! Every loop is a tokio task on tokio's clock (the simulator pauses it); blocking work (Git,
//! rendering, the store) runs in `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::auth::Auth;
use crate::api::hooks::HooksState;
use crate::api::listener::HttpListener;
use crate::api::{AdminState, EnrolmentInfo, SourceSummary};
use crate::assign::{assign_agents, assign_tracked};
use crate::bundles;
use crate::changes::{Changes, Wake};
use crate::config::SourceConfig;
use crate::git::GitSource;
use crate::keys::HubKeys;
use crate::metrics::HubMetrics;
use crate::replication::{
    Leading, Replication, follow_loop, is_leading, leading, lease_loop, relay_loop,
};
use crate::resign::refresh_keys;
use crate::rollout::Driver;
use crate::store::{HubStore, Retention};
use crate::sync::{RenderMemo, SyncReport, render_remembering};
use crate::transport::{AgentService, ServiceOptions};

/// Unix seconds now (injected: the simulator's clock is virtual).
pub type Clock = fn() -> i64;

/// One Git source to follow.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// Its configuration.
    pub config: SourceConfig,
    /// Where its bare mirror lives.
    pub mirror: PathBuf,
}

/// How the hub's loops behave.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The Git sources.
    pub sources: Vec<SourceSettings>,
    /// How often every source is fetched when nothing asks.
    pub poll_interval: Duration,
    /// After a webhook, how long to wait for more pushes before fetching.
    pub webhook_quiet: Duration,
    /// How often live rollouts are stepped when nothing wakes them.
    pub rollout_tick: Duration,
    /// How often the key dir is read again.
    pub keys_tick: Duration,
    /// The agent service.
    pub service: ServiceOptions,
    /// Host names the admin API answers to besides `localhost` and IP addresses.
    pub admin_names: Vec<String>,
    /// API writes per token per second.
    pub api_writes_per_second: f64,
    /// What the store forgets.
    pub retention: Retention,
    /// How often retention runs (`None`: never, as in short simulations).
    pub retention_every: Option<Duration>,
    /// Where events are sent (none: nowhere).
    pub notify: Vec<crate::notify::Receiver>,
    /// An agent not heard of for this long is recorded as offline; none: never.
    pub offline_after: Option<Duration>,
}

impl HubSettings {
    /// Defaults for `sources`: poll every minute, rollouts every 2 s, keys every 30 s (more often
    /// for short snapshot lifetimes).
    pub fn new(sources: Vec<SourceSettings>, keys: &HubKeys) -> HubSettings {
        let keys_tick = match keys.policy().snapshot_lifetime {
            Some(lifetime) => {
                Duration::from_secs(30).min(Duration::from_secs((lifetime / 6).max(1) as u64))
            }
            None => Duration::from_secs(30),
        };
        HubSettings {
            sources,
            poll_interval: Duration::from_secs(60),
            webhook_quiet: Duration::from_millis(500),
            rollout_tick: Duration::from_secs(2),
            keys_tick,
            service: ServiceOptions::default(),
            admin_names: Vec::new(),
            api_writes_per_second: 10.0,
            retention: Retention::default(),
            retention_every: Some(Duration::from_secs(3_600)),
            notify: Vec::new(),
            offline_after: None,
        }
    }
}

/// What a hub is made of.
pub struct HubParts {
    /// How it behaves.
    pub settings: HubSettings,
    /// Its store.
    pub store: Arc<dyn HubStore>,
    /// Its keys.
    pub keys: Arc<HubKeys>,
    /// Its clock.
    pub clock: Clock,
    /// The QUIC endpoint agents reach it on (a real socket, or the simulator's network).
    pub agents: quinn::Endpoint,
    /// What enrolment bundles tell agents (address, pin, root key).
    pub enrolment: EnrolmentInfo,
    /// The admin API's listener (none in the simulator).
    pub admin: Option<HttpListener>,
    /// A listener of its own for webhooks (else they are served on the admin listener).
    pub hooks: Option<HttpListener>,
    /// One of several replicas on a shared store (none: the only hub, always leading).
    pub replication: Option<Replication>,
}

impl std::fmt::Debug for HubParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubParts")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A running hub.
#[derive(Debug)]
pub struct Hub {
    store: Arc<dyn HubStore>,
    keys: Arc<HubKeys>,
    changes: Arc<Changes>,
    service: Arc<AgentService>,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    clock: Clock,
    /// The only hub's leadership, kept so its loops never see it end.
    _always_leading: Option<tokio::sync::watch::Sender<i64>>,
}

/// The wait after `failures` consecutive failed fetches: the interval doubled per failure, at
/// most 64 × the interval and at most an hour (never less than the interval).
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    (interval * 2u32.pow(failures.min(6))).min(Duration::from_secs(3600).max(interval))
}

impl Hub {
    /// Starts every loop of the hub (call from within a tokio runtime).
    pub fn start(parts: HubParts) -> Hub {
        let HubParts {
            settings,
            store,
            keys,
            clock,
            agents,
            enrolment,
            admin,
            hooks,
            replication,
        } = parts;
        let changes = Arc::new(Changes::default());
        let metrics = Arc::new(HubMetrics::new());
        let mut tasks = Vec::new();
        let replica_name = replication.as_ref().map(|r| r.holder.clone());
        // The leader's loops wait for the lease and write through the fence; the only hub
        // leads from the start.
        let (lead, leading_now) = tokio::sync::watch::channel(match replication {
            Some(_) => 0,
            None => 1,
        });
        let mut always_leading = None;
        let decisions: Arc<dyn HubStore> = match &replication {
            Some(replication) => {
                let fence = Arc::new(crate::store::Fence::new(&replication.holder));
                let (relay, signals) = tokio::sync::mpsc::unbounded_channel();
                changes.relay_to(relay);
                tasks.push(tokio::spawn(lease_loop(
                    replication.clone(),
                    fence.clone(),
                    lead,
                )));
                tasks.push(tokio::spawn(relay_loop(replication.clone(), signals)));
                tasks.push(tokio::spawn(follow_loop(
                    replication.clone(),
                    store.clone(),
                    changes.clone(),
                )));
                replication.store.fenced(fence)
            }
            None => {
                always_leading = Some(lead);
                store.clone()
            }
        };
        for source in &settings.sources {
            changes.add_source(&source.config.name);
        }
        let service = Arc::new(AgentService::new(
            store.clone(),
            keys.clone(),
            changes.clone(),
            clock,
            settings.service.clone(),
            metrics.clone(),
        ));
        let sources: Vec<(SourceSettings, Arc<tokio::sync::OnceCell<Arc<GitSource>>>)> = settings
            .sources
            .iter()
            .map(|source| (source.clone(), Arc::new(tokio::sync::OnceCell::new())))
            .collect();
        for (source, opened) in &sources {
            tasks.push(tokio::spawn(source_loop(
                source.clone(),
                opened.clone(),
                settings.poll_interval,
                settings.webhook_quiet,
                decisions.clone(),
                keys.clone(),
                changes.clone(),
                metrics.clone(),
                clock,
                leading_now.clone(),
            )));
        }
        tasks.push(tokio::spawn(rollout_loop(
            sources.clone(),
            settings.rollout_tick,
            decisions.clone(),
            keys.clone(),
            changes.clone(),
            metrics.clone(),
            clock,
            leading_now.clone(),
        )));
        tasks.push(tokio::spawn(keys_loop(
            settings.keys_tick,
            decisions.clone(),
            keys.clone(),
            changes.clone(),
            metrics.clone(),
            clock,
            leading_now.clone(),
        )));
        if let Some(every) = settings.retention_every {
            tasks.push(tokio::spawn(retention_loop(
                every,
                settings.retention,
                decisions.clone(),
                clock,
                leading_now.clone(),
            )));
        }
        if let Some(after) = settings.offline_after {
            tasks.push(tokio::spawn(heartbeat_loop(
                after,
                service.connected(),
                store.clone(),
                clock,
            )));
            tasks.push(tokio::spawn(offline_loop(
                after,
                decisions.clone(),
                clock,
                leading_now.clone(),
            )));
        }
        if !settings.notify.is_empty() {
            tasks.push(tokio::spawn(crate::notify::notify_loop(
                settings.notify.clone(),
                decisions.clone(),
                leading_now.clone(),
            )));
        }
        tasks.push(tokio::spawn(crate::transport::serve(
            agents.clone(),
            service.clone(),
        )));
        if let Some(admin) = admin {
            let hooks_state = HooksState {
                deliveries: Arc::default(),
                secrets: Arc::new(
                    settings
                        .sources
                        .iter()
                        .map(|source| {
                            (
                                source.config.name.clone(),
                                source.config.webhook_secret.clone(),
                            )
                        })
                        .collect::<BTreeMap<_, _>>(),
                ),
                changes: changes.clone(),
            };
            let state = AdminState {
                store: store.clone(),
                changes: changes.clone(),
                auth: Arc::new(Auth::new(
                    settings.admin_names.clone(),
                    settings.api_writes_per_second,
                )),
                sources: Arc::new(
                    settings
                        .sources
                        .iter()
                        .map(|source| SourceSummary {
                            name: source.config.name.clone(),
                            url: source.config.url.clone(),
                            track: source.config.track_label(),
                            webhook: source.config.webhook_secret.is_some(),
                        })
                        .collect(),
                ),
                now: clock,
                enrolment: Arc::new(enrolment),
                keys: keys.clone(),
                connected: service.connected(),
                service: service.clone(),
                mirrors: Arc::new(
                    sources
                        .iter()
                        .map(|(source, opened)| (source.config.url.clone(), opened.clone()))
                        .collect(),
                ),
                replica: crate::api::ReplicaState {
                    name: replica_name.clone(),
                    leading: leading_now.clone(),
                },
            };
            let app = match hooks {
                None => crate::api::router(state, Some(hooks_state)),
                Some(listener) => {
                    let hooks_app = crate::api::hooks::router(hooks_state);
                    tasks.push(tokio::spawn(async move {
                        crate::api::listener::serve(listener, hooks_app).await;
                        tracing::error!("the webhook listener stopped");
                    }));
                    crate::api::router(state, None)
                }
            };
            tasks.push(tokio::spawn(async move {
                crate::api::listener::serve(admin, app).await;
                tracing::error!("the admin API stopped");
            }));
        }
        Hub {
            store,
            keys,
            changes,
            service,
            endpoint: agents,
            tasks,
            clock,
            _always_leading: always_leading,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn HubStore> {
        &self.store
    }

    /// The keys.
    pub fn keys(&self) -> &Arc<HubKeys> {
        &self.keys
    }

    /// The bus of changes (fetch now, fleet changed, rollouts changed).
    pub fn changes(&self) -> &Arc<Changes> {
        &self.changes
    }

    /// The hub's metrics (what `GET /metrics` shows besides the fleet's gauges).
    pub fn metrics(&self) -> &Arc<HubMetrics> {
        self.service.metrics()
    }

    /// The agent service (connections, counters, payload cache).
    pub fn service(&self) -> &Arc<AgentService> {
        &self.service
    }

    /// The hub's clock.
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Stops: tells connected agents (so they reconnect to another hub at once instead of
    /// waiting for the idle timeout), waits up to two seconds for them to hear it, ends the loops.
    pub async fn shutdown(self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"hub shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"hub stopped");
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Runs blocking work off the async threads; a panic there is logged, not propagated.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(%error, "blocking hub work failed");
            None
        }
    }
}

/// Opens a source's mirror, retrying every `interval` while it cannot be opened.
async fn open_source(settings: &SourceSettings, interval: Duration) -> Arc<GitSource> {
    loop {
        let (config, mirror) = (settings.config.clone(), settings.mirror.clone());
        let opened = blocking(move || {
            GitSource::open_or_init(&config.url, &mirror).map(|source| {
                source
                    .with_credentials(config.credentials.clone())
                    .with_kustomize(config.kustomize.clone(), config.kustomize_unisolated)
                    .with_verify(config.verify.clone())
            })
        })
        .await;
        match opened {
            Some(Ok(source)) => return Arc::new(source),
            Some(Err(error)) => {
                tracing::error!(source = %settings.config.name, %error, "cannot open the mirror; retrying")
            }
            None => {}
        }
        tokio::time::sleep(interval).await;
    }
}

pub(crate) fn print_report(report: &SyncReport) {
    if let Some(error) = &report.fetch_error {
        tracing::warn!(%error, "fetch failed");
    }
    for (bundle, generation, git_ref) in &report.rendered {
        tracing::info!(%bundle, generation, %git_ref, "rendered");
    }
    for (git_ref, bundle, error) in &report.failed {
        tracing::warn!(%bundle, %git_ref, %error, "refused");
    }
}

#[allow(clippy::too_many_arguments)]
async fn source_loop(
    settings: SourceSettings,
    opened: Arc<tokio::sync::OnceCell<Arc<GitSource>>>,
    interval: Duration,
    quiet: Duration,
    store: Arc<dyn HubStore>,
    keys: Arc<HubKeys>,
    changes: Arc<Changes>,
    metrics: Arc<HubMetrics>,
    clock: Clock,
    mut lead: Leading,
) {
    let name = settings.config.name.clone();
    let source = opened
        .get_or_init(|| open_source(&settings, interval))
        .await
        .clone();
    let mut seen = changes.fetch_requests(&name);
    let mut failures = 0u32;
    let mut memo = Some(RenderMemo::default());
    // The first pass assigns everyone (the hub may have been down while Git moved).
    let mut assign_everyone = true;
    let mut wake = Wake::Fetch;
    let mut led_at = 0;
    // The ref last assigned to everyone (the remote's default branch may move).
    let mut tracked: Option<String> = None;
    loop {
        // Only the leader syncs; a new term starts afresh (another replica led meanwhile).
        let epoch = leading(&mut lead).await;
        if epoch != led_at {
            led_at = epoch;
            assign_everyone = true;
            memo = Some(RenderMemo::default());
            wake = Wake::Fetch;
        }
        let fetched = match wake {
            Wake::Poll | Wake::Fetch => {
                let started = tokio::time::Instant::now();
                let fetching = source.clone();
                let fetched = blocking(move || {
                    fetching
                        .fetch()
                        .map(|_| ())
                        .map_err(|error| error.to_string())
                })
                .await
                .unwrap_or_else(|| Err("the fetch task failed".to_owned()));
                failures = if fetched.is_err() {
                    (failures + 1).min(6)
                } else {
                    0
                };
                changes.fetched(
                    &name,
                    clock(),
                    started.elapsed(),
                    fetched.as_ref().err().cloned(),
                );
                metrics.synced(&name, started.elapsed(), fetched.is_ok());
                fetched
            }
            // Nothing new in Git: render what new label sets need from the mirror as it is.
            Wake::Agents => Ok(()),
        };
        let agents = changes.take_agents(&name);
        let (store, keys, syncing, config, mut taken, timing) = (
            store.clone(),
            keys.clone(),
            source.clone(),
            settings.config.clone(),
            memo.take().unwrap_or_default(),
            metrics.clone(),
        );
        let (everyone, tracked_before) = (assign_everyone, tracked.clone());
        let waking = changes.clone();
        let synced = blocking(move || {
            let now = clock();
            // The configured ref, or the remote's default branch as just fetched.
            let track = config.track_in(&syncing);
            let result = timing
                .time("render", || {
                    render_remembering(&*store, &keys, &syncing, fetched, now, &mut taken)
                })
                .inspect(print_report)
                .inspect(|report| {
                    timing.rendered(&config.name, report.rendered.len(), report.failed.len())
                })
                .and_then(|report| {
                    let moved = tracked_before.as_deref() != Some(track.as_str());
                    // Each chunk's agents are woken as soon as it is stored.
                    let mut wake = |agents: &[String]| waking.agents_changed(agents);
                    timing.time("assign", || {
                        if everyone || moved || report.changed_refs.contains(&track) {
                            assign_tracked(&*store, &syncing, &track, now, &mut wake)
                        } else {
                            assign_agents(&*store, &syncing, &track, &agents, now, &mut wake)
                        }
                    })
                });
            (taken, track, result)
        })
        .await;
        match synced {
            Some((returned, track, result)) => {
                memo = Some(returned);
                if result.is_ok() {
                    tracked = Some(track);
                }
                match result {
                    Ok(changed) => {
                        assign_everyone = false;
                        if !changed.is_empty() {
                            metrics.assignments_changed("sync", changed.len());
                            tracing::info!(source = %name, agents = changed.len(), "assignments changed");
                        }
                    }
                    Err(error) => {
                        tracing::error!(source = %name, %error, "sync failed; retrying")
                    }
                }
            }
            None => assign_everyone = true,
        }
        // Sleep until due, or until someone asks for a fetch or agents wait (a burst: once).
        wake = changes
            .wait_for_work(&name, &mut seen, backoff(interval, failures), quiet)
            .await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn rollout_loop(
    sources: Vec<(SourceSettings, Arc<tokio::sync::OnceCell<Arc<GitSource>>>)>,
    tick: Duration,
    store: Arc<dyn HubStore>,
    keys: Arc<HubKeys>,
    changes: Arc<Changes>,
    metrics: Arc<HubMetrics>,
    clock: Clock,
    mut lead: Leading,
) {
    let mut driver = Some(Driver::default());
    let mut led_at = 0;
    let mut seen = 0;
    // A rollout reads its bundle definitions from its source's mirror: give the sources a
    // moment to open after a start, so a restart does not begin with a stalled step.
    let opening = tokio::time::Instant::now();
    while sources.iter().any(|(_, opened)| opened.get().is_none())
        && opening.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    loop {
        // Only the leader steps rollouts; a new term forgets what the driver knew.
        let epoch = leading(&mut lead).await;
        if epoch != led_at {
            led_at = epoch;
            driver = Some(Driver::default());
        }
        let mut taken = driver.take().unwrap_or_default();
        let (store, keys, sources, timing) = (
            store.clone(),
            keys.clone(),
            sources.clone(),
            metrics.clone(),
        );
        let stepped = blocking(move || {
            let mut definitions_at = |url: &str, commit: &str| -> Result<_, String> {
                let source = sources
                    .iter()
                    .find(|(settings, _)| settings.config.url == url)
                    .and_then(|(_, opened)| opened.get().cloned())
                    .ok_or_else(|| format!("source {url} is not configured or not opened yet"))?;
                bundles::bundles_at(&source, commit).map_err(|error| error.to_string())
            };
            let result = timing.time("rollout_step", || {
                taken.tick(&*store, &keys, &mut definitions_at, clock())
            });
            (taken, result)
        })
        .await;
        if let Some((returned, result)) = stepped {
            driver = Some(returned);
            match result {
                Ok(stepped) if !stepped.changed.is_empty() => {
                    metrics.assignments_changed("rollout", stepped.changed.len());
                    tracing::info!(
                        agents = stepped.changed.len(),
                        "rollouts changed assignments"
                    );
                    changes.agents_changed(&stepped.changed);
                }
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "rollout step failed; retrying"),
            }
        }
        changes.wait_for_rollouts(&mut seen, tick).await;
    }
}

/// Re-reads the key dir every `tick`: new, renewed or revoked keys reach agents, and snapshots
/// a revoked key signed or about to expire are signed again.
async fn keys_loop(
    tick: Duration,
    store: Arc<dyn HubStore>,
    keys: Arc<HubKeys>,
    changes: Arc<Changes>,
    metrics: Arc<HubMetrics>,
    clock: Clock,
    lead: Leading,
) {
    loop {
        tokio::time::sleep(tick).await;
        let (store, keys) = (store.clone(), keys.clone());
        if !is_leading(&lead) {
            // Every replica serves with the keys on disk; the leader alone signs again.
            if let Some(Err(error)) = blocking(move || keys.refresh(clock())).await {
                tracing::error!(%error, "reading the key dir failed; the keys in use stay");
            }
            continue;
        }
        match blocking(move || refresh_keys(&*store, &keys, clock())).await {
            Some(Ok(refreshed)) if !refreshed.resigned.agents.is_empty() => {
                metrics.assignments_changed("keys", refreshed.resigned.agents.len());
                tracing::info!(
                    agents = refreshed.resigned.agents.len(),
                    snapshots = refreshed.resigned.resigned.len(),
                    "snapshots signed again; agents get the new headers"
                );
                changes.agents_changed(&refreshed.resigned.agents);
            }
            Some(Ok(_)) | None => {}
            Some(Err(error)) => {
                tracing::error!(%error, "reading the key dir failed; the keys in use stay")
            }
        }
    }
}

/// Every replica: records every quarter of `after` that the agents connected to it are there
/// (the store otherwise knows only when each connected), so the leader can tell who is gone.
async fn heartbeat_loop(
    after: Duration,
    connected: Arc<crate::transport::Connected>,
    store: Arc<dyn HubStore>,
    clock: Clock,
) {
    let every = (after / 4).max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        let (ids, store) = (connected.ids(), store.clone());
        if ids.is_empty() {
            continue;
        }
        if let Some(Err(error)) = blocking(move || store.agents_seen(&ids, clock())).await {
            tracing::warn!(%error, "recording connected agents failed; trying again");
        }
    }
}

/// Records the agents `gone` (id, last seen) as offline: one `agent-offline` event each, or,
/// when a site loses its link and more than [`OFFLINE_ONE_BY_ONE`] go at once, one
/// `agents-offline` event for them all, so a receiver (a chat channel) gets one message.
fn record_offline(
    store: &dyn HubStore,
    gone: &[(String, i64)],
    after: i64,
    now: i64,
) -> Result<(), crate::store::StoreError> {
    if gone.len() > OFFLINE_ONE_BY_ONE {
        let named: Vec<&str> = gone
            .iter()
            .take(OFFLINE_ONE_BY_ONE)
            .map(|(agent, _)| agent.as_str())
            .collect();
        return store.add_event(
            now,
            "agents-offline",
            &format!("{} agents", gone.len()),
            &format!(
                "not heard of for more than {after} s: {}, …",
                named.join(", ")
            ),
        );
    }
    for (agent, seen) in gone {
        store.add_event(
            now,
            "agent-offline",
            agent,
            &format!(
                "not heard of for {} (last seen {})",
                outpost_proto::time::age(*seen, now).trim_end_matches(" ago"),
                outpost_proto::time::rfc3339(*seen)
            ),
        )?;
    }
    Ok(())
}

/// More agents gone in one look than this are recorded as one `agents-offline` event.
const OFFLINE_ONE_BY_ONE: usize = 20;

/// The leader: every quarter of `after`, records as `agent-offline` each agent last heard of
/// more than `after` ago that crossed that line since the last look — once per absence.
async fn offline_loop(after: Duration, store: Arc<dyn HubStore>, clock: Clock, mut lead: Leading) {
    let every = (after / 4).max(Duration::from_secs(1));
    let after = after.as_secs() as i64;
    // The first look covers one more period back: an absence that began while no hub led.
    let mut looked = clock() - after - every.as_secs() as i64 * 4;
    // Heartbeats first: a connected agent's last look must be recorded before the first check.
    tokio::time::sleep(every).await;
    loop {
        tokio::time::sleep(every).await;
        leading(&mut lead).await;
        let now = clock();
        let (from, to, store) = (looked, now - after, store.clone());
        let recorded = blocking(move || -> Result<usize, crate::store::StoreError> {
            let gone = store.last_seen_between(from, to)?;
            record_offline(&*store, &gone, after, now)?;
            Ok(gone.len())
        })
        .await;
        match recorded {
            Some(Ok(count)) => {
                if count > 0 {
                    tracing::warn!(agents = count, "agents offline");
                }
                looked = to;
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "looking for offline agents failed; trying again")
            }
            None => {}
        }
    }
}

/// Runs retention a minute after start, then every `every`: old events and status history
/// go, and snapshots nothing references.
async fn retention_loop(
    every: Duration,
    policy: Retention,
    store: Arc<dyn HubStore>,
    clock: Clock,
    mut lead: Leading,
) {
    let mut wait = every.min(Duration::from_secs(60));
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        leading(&mut lead).await;
        let store = store.clone();
        match blocking(move || store.prune(&policy, clock())).await {
            Some(Ok(pruned)) if !pruned.is_empty() => tracing::info!(
                events = pruned.events,
                status_history = pruned.status_history,
                delta_bases = pruned.delta_bases,
                snapshots = pruned.snapshots,
                renders = pruned.renders,
                bodies = pruned.bodies,
                "retention deleted what nothing needs"
            ),
            Some(Ok(_)) | None => {}
            Some(Err(error)) => tracing::error!(%error, "retention failed; trying again later"),
        }
    }
}

#[cfg(test)]
mod offline_tests {
    use super::*;
    use crate::store::Store as _;

    #[test]
    fn a_few_agents_gone_are_named_each_many_are_one_event() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let few: Vec<(String, i64)> = (0..3).map(|i| (format!("agent-{i}"), 100)).collect();
        record_offline(&store, &few, 60, 1_000).unwrap();
        let events = store.events(100).unwrap();
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|event| event.kind == "agent-offline"));
        assert!(events[0].message.contains("15m"), "{}", events[0].message);
        let many: Vec<(String, i64)> = (0..500).map(|i| (format!("agent-{i:03}"), 100)).collect();
        record_offline(&store, &many, 60, 2_000).unwrap();
        let events = store.events(100).unwrap();
        assert_eq!(events.len(), 4, "one more event, not 500");
        assert_eq!(events[0].kind, "agents-offline");
        assert_eq!(events[0].subject, "500 agents");
        assert!(
            events[0].message.contains("agent-019") && !events[0].message.contains("agent-020")
        );
    }
}
