//! `outpost-hub run`: the admin API (HTTP or HTTPS) and the QUIC agent service on tokio, one
//! thread per Git source that fetches on the poll interval (backing off while the remote is
//! down) or when asked (its webhook, fetch-now), then recomputes the assignments that follow
//! the source's tracked ref; a rollout thread; and a keys thread that re-reads the key dir.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_hub::api::auth::Auth;
use outpost_hub::api::hooks::HooksState;
use outpost_hub::api::listener::{HttpListener, tls_config};
use outpost_hub::api::{AdminState, EnrolmentInfo, SourceSummary, router};
use outpost_hub::assign::assign_tracked;
use outpost_hub::bundles;
use outpost_hub::changes::Changes;
use outpost_hub::config::{Config, SourceConfig};
use outpost_hub::keys::HubKeys;
use outpost_hub::resign::refresh_keys;
use outpost_hub::rollout::Driver;
use outpost_hub::store::SqliteStore;
use outpost_hub::sync::render_fetched;
use outpost_hub::transport::{AgentService, ServiceOptions};
use outpost_proto::transport::{Tuning, hub_pin, server_config};

use crate::{load_keys, open_store, print_report, unix_now};

/// The wait after `failures` consecutive failed fetches: the interval doubled per failure, at
/// most 64 × the interval and at most an hour (never less than the interval).
fn backoff(interval: Duration, failures: u32) -> Duration {
    (interval * 2u32.pow(failures.min(6))).min(Duration::from_secs(3600).max(interval))
}

/// How long a source waits after a webhook for more pushes before it fetches.
const WEBHOOK_QUIET: Duration = Duration::from_millis(500);
/// How often the key dir is read again.
const KEYS_TICK: Duration = Duration::from_secs(30);

/// Serves the admin API and syncs every source until interrupted.
pub(crate) fn serve(config: &Config) -> Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let store = Arc::new(Mutex::new(open_store(&config.data_dir)?));
    let keys = Arc::new(load_keys(&config.key_dir, config.key_policy.clone())?);
    {
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        refresh_keys(&mut *store, &keys, unix_now()).context("reading the key dir")?;
    }
    let changes = Arc::new(Changes::default());
    for source in config.sources.clone() {
        let (store, keys, changes) = (store.clone(), keys.clone(), changes.clone());
        let config = config.clone();
        std::thread::Builder::new()
            .name(format!("source-{}", source.name))
            .spawn(move || source_loop(&config, &source, &store, &keys, &changes))
            .context("starting a source thread")?;
    }
    {
        let (store, keys, changes) = (store.clone(), keys.clone(), changes.clone());
        let config = config.clone();
        std::thread::Builder::new()
            .name("rollouts".to_owned())
            .spawn(move || rollout_loop(&config, &store, &keys, &changes))
            .context("starting the rollout thread")?;
    }
    {
        let (store, keys, changes) = (store.clone(), keys.clone(), changes.clone());
        std::thread::Builder::new()
            .name("keys".to_owned())
            .spawn(move || keys_loop(&store, &keys, &changes))
            .context("starting the keys thread")?;
    }
    let tls = config
        .tls
        .as_ref()
        .map(tls_config)
        .transpose()
        .context("setting up HTTPS for the admin API ([tls])")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let enrolment = Arc::new(EnrolmentInfo {
        hub_address: config.agents_public.clone(),
        hub_pin: hub_pin(&keys.transport().public_key()),
        root_key: keys.root(),
    });
    runtime.block_on(async {
        let quic = server_config(keys.transport(), &Tuning::default())
            .context("setting up TLS for agents")?;
        let endpoint = quinn::Endpoint::server(quic, config.listen_agents).with_context(|| {
            format!(
                "binding the agent service to {} (listen.agents)",
                config.listen_agents
            )
        })?;
        let on_enrol = changes.clone();
        let service = Arc::new(AgentService::new(
            store.clone(),
            keys.clone(),
            changes.fleet.subscribe(),
            Box::new(move || on_enrol.fetch_all()),
            unix_now,
            ServiceOptions::default(),
        ));
        tracing::info!(address = %config.listen_agents, pin = %enrolment.hub_pin.to_hex(), "agent service listening (QUIC)");
        let connected = service.connected();
        tokio::spawn(outpost_hub::transport::serve(endpoint.clone(), service));
        let hooks = HooksState {
            secrets: Arc::new(
                config
                    .sources
                    .iter()
                    .map(|source| (source.name.clone(), source.webhook_secret.clone()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            changes: changes.clone(),
        };
        let state = AdminState {
            store,
            changes,
            auth: Arc::new(Auth::new(
                config.admin_names.clone(),
                config.api_writes_per_second,
            )),
            sources: Arc::new(
                config
                    .sources
                    .iter()
                    .map(|source| SourceSummary {
                        name: source.name.clone(),
                        url: source.url.clone(),
                        track: source.track.clone(),
                        webhook: source.webhook_secret.is_some(),
                    })
                    .collect(),
            ),
            now: unix_now,
            enrolment,
            keys: keys.clone(),
            connected,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let admin = bind(config.listen_admin, "listen.admin", tls.clone()).await?;
        tracing::info!(address = %config.listen_admin, scheme, "admin API listening");
        let app = match config.listen_hooks {
            None => router(state, Some(hooks)),
            Some(address) => {
                let listener = bind(address, "listen.hooks", tls.clone()).await?;
                tracing::info!(%address, scheme, "Git webhooks listening");
                let hooks_app = outpost_hub::api::hooks::router(hooks);
                tokio::spawn(async move {
                    if let Err(error) = axum::serve(listener, hooks_app).await {
                        tracing::error!(%error, "the webhook listener stopped");
                    }
                });
                router(state, None)
            }
        };
        let served = axum::serve(admin, app)
            .with_graceful_shutdown(stop_signal())
            .await
            .context("serving the admin API");
        // Tell connected agents, so they reconnect to the next hub at once instead of waiting
        // for the idle timeout.
        endpoint.close(quinn::VarInt::from_u32(0), b"hub shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        served
    })
}

async fn bind(
    address: std::net::SocketAddr,
    field: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<HttpListener> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address} ({field})"))?;
    HttpListener::new(listener, tls).with_context(|| format!("listening on {address} ({field})"))
}

/// SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes).
async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("stopping: closing agent connections");
}

/// Re-reads the key dir every [`KEYS_TICK`] (more often for short snapshot lifetimes): new,
/// renewed or revoked keys reach agents, and snapshots a revoked key signed or about to expire
/// are signed again.
fn keys_loop(store: &Mutex<SqliteStore>, keys: &HubKeys, changes: &Changes) {
    let tick = match keys.policy().snapshot_lifetime {
        Some(lifetime) => KEYS_TICK.min(Duration::from_secs((lifetime / 6).max(1) as u64)),
        None => KEYS_TICK,
    };
    loop {
        std::thread::sleep(tick);
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        match refresh_keys(&mut *store, keys, unix_now()) {
            Ok(refreshed) if !refreshed.resigned.agents.is_empty() => {
                tracing::info!(
                    agents = refreshed.resigned.agents.len(),
                    snapshots = refreshed.resigned.resigned.len(),
                    "snapshots signed again; agents get the new headers"
                );
                changes.fleet_changed();
            }
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "reading the key dir failed; the keys in use stay")
            }
        }
    }
}

/// How often live rollouts look at the fleet when nothing wakes them.
const ROLLOUT_TICK: Duration = Duration::from_secs(2);

/// Steps every live rollout every [`ROLLOUT_TICK`], or at once when the API creates or commands
/// one; agent connections hear of the assignments it changes.
fn rollout_loop(config: &Config, store: &Mutex<SqliteStore>, keys: &HubKeys, changes: &Changes) {
    let mut driver = Driver::default();
    let mut definitions_at = |url: &str, commit: &str| -> Result<_, String> {
        let source = config
            .sources
            .iter()
            .find(|source| source.url == url)
            .ok_or_else(|| format!("source {url} is no longer configured"))?;
        let mirror = config
            .open_source(source)
            .map_err(|error| error.to_string())?;
        bundles::bundles_at(&mirror, commit).map_err(|error| error.to_string())
    };
    let mut seen = 0;
    loop {
        let Ok(mut store) = store.lock() else {
            tracing::error!("store lock poisoned; stopping rollouts");
            return;
        };
        match driver.tick(&mut *store, keys, &mut definitions_at, unix_now()) {
            Ok(changed) if !changed.is_empty() => {
                tracing::info!(agents = changed.len(), "rollouts changed assignments");
                changes.fleet_changed();
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "rollout step failed; retrying"),
        }
        drop(store);
        changes.wait_for_rollouts(&mut seen, ROLLOUT_TICK);
    }
}

fn source_loop(
    config: &Config,
    source_config: &SourceConfig,
    store: &Mutex<SqliteStore>,
    keys: &HubKeys,
    changes: &Changes,
) {
    let interval = config.poll_interval;
    let name = &source_config.name;
    let mut source = loop {
        match config.open_source(source_config) {
            Ok(source) => break source,
            Err(error) => {
                tracing::error!(source = %name, %error, "cannot open the mirror; retrying");
                std::thread::sleep(interval);
            }
        }
    };
    let mut seen = changes.fetch_requests(name);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let fetched = source
            .fetch()
            .map(|_| ())
            .map_err(|error| error.to_string());
        let failed = fetched.is_err();
        changes.fetched(
            name,
            unix_now(),
            started.elapsed(),
            fetched.as_ref().err().cloned(),
        );
        match store.lock() {
            Ok(mut store) => {
                let now = unix_now();
                let synced = render_fetched(&mut *store, keys, &source, fetched, now)
                    .inspect(print_report)
                    .and_then(|_| assign_tracked(&mut *store, &source, &source_config.track, now));
                match synced {
                    Ok(changed) if !changed.is_empty() => {
                        tracing::info!(agents = changed.len(), "assignments changed");
                        changes.fleet_changed();
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(source = %name, %error, "sync failed; retrying")
                    }
                }
            }
            Err(_) => {
                tracing::error!("store lock poisoned; stopping this source");
                return;
            }
        }
        failures = if failed { (failures + 1).min(6) } else { 0 };
        // Sleep until due, or until someone asks for a fetch (a burst of pushes: once).
        changes.wait_for_fetch(name, &mut seen, backoff(interval, failures), WEBHOOK_QUIET);
    }
}
