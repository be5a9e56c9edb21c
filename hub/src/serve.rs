//! `outpost-hub run`: the admin API and the QUIC agent service on tokio, and one thread per Git
//! source that fetches on the poll interval (backing off while the remote is down) or when the
//! API asks it to, then recomputes the assignments that follow the source's tracked ref.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_hub::api::{AdminState, EnrolmentInfo, FetchNow, router};
use outpost_hub::assign::assign_tracked;
use outpost_hub::bundles;
use outpost_hub::config::{Config, SourceConfig};
use outpost_hub::keys::HubKeys;
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

/// Serves the admin API and syncs every source until interrupted.
pub(crate) fn serve(config: &Config) -> Result<()> {
    let store = Arc::new(Mutex::new(open_store(&config.data_dir)?));
    let keys = Arc::new(load_keys(&config.key_dir)?);
    let fetch_now = Arc::new(FetchNow::default());
    for source in config.sources.clone() {
        let (store, keys, fetch_now) = (store.clone(), keys.clone(), fetch_now.clone());
        let config = config.clone();
        std::thread::Builder::new()
            .name(format!("source-{}", source.name))
            .spawn(move || source_loop(&config, &source, &store, &keys, &fetch_now))
            .context("starting a source thread")?;
    }
    {
        let (store, keys, fetch_now) = (store.clone(), keys.clone(), fetch_now.clone());
        let config = config.clone();
        std::thread::Builder::new()
            .name("rollouts".to_owned())
            .spawn(move || rollout_loop(&config, &store, &keys, &fetch_now))
            .context("starting the rollout thread")?;
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let enrolment = Arc::new(EnrolmentInfo {
        hub_address: config.agents_public.clone(),
        hub_pin: hub_pin(&keys.transport.public_key()),
        root_key: keys.root.public_key(),
    });
    runtime.block_on(async {
        let quic = server_config(&keys.transport, &Tuning::default())
            .context("setting up TLS for agents")?;
        let endpoint = quinn::Endpoint::server(quic, config.listen_agents).with_context(|| {
            format!(
                "binding the agent service to {} (listen.agents)",
                config.listen_agents
            )
        })?;
        let on_enrol = fetch_now.clone();
        let service = Arc::new(AgentService::new(
            store.clone(),
            keys.clone(),
            fetch_now.fleet.subscribe(),
            Box::new(move || on_enrol.request()),
            unix_now,
            ServiceOptions::default(),
        ));
        tracing::info!(address = %config.listen_agents, pin = %enrolment.hub_pin.to_hex(), "agent service listening (QUIC)");
        let connected = service.connected();
        tokio::spawn(outpost_hub::transport::serve(endpoint.clone(), service));
        let listener = tokio::net::TcpListener::bind(config.listen_admin)
            .await
            .with_context(|| {
                format!(
                    "binding the admin API to {} (listen.admin)",
                    config.listen_admin
                )
            })?;
        tracing::info!(address = %config.listen_admin, "admin API listening");
        let state = AdminState {
            store,
            fetch_now,
            now: unix_now,
            enrolment,
            keys: keys.clone(),
            connected,
        };
        let served = axum::serve(listener, router(state))
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

/// How often live rollouts look at the fleet when nothing wakes them.
const ROLLOUT_TICK: Duration = Duration::from_secs(2);

/// Steps every live rollout every [`ROLLOUT_TICK`], or at once when the API creates or commands
/// one; agent connections hear of the assignments it changes.
fn rollout_loop(config: &Config, store: &Mutex<SqliteStore>, keys: &HubKeys, fetch_now: &FetchNow) {
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
                fetch_now.fleet_changed();
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "rollout step failed; retrying"),
        }
        drop(store);
        fetch_now.wait_for_rollouts(&mut seen, ROLLOUT_TICK);
    }
}

fn source_loop(
    config: &Config,
    source_config: &SourceConfig,
    store: &Mutex<SqliteStore>,
    keys: &HubKeys,
    fetch_now: &FetchNow,
) {
    let interval = config.poll_interval;
    let mut source = loop {
        match config.open_source(source_config) {
            Ok(source) => break source,
            Err(error) => {
                tracing::error!(source = %source_config.name, %error, "cannot open the mirror; retrying");
                std::thread::sleep(interval);
            }
        }
    };
    let mut seen = fetch_now.requests.lock().map_or(0, |requests| *requests);
    let mut failures = 0u32;
    loop {
        let fetched = source
            .fetch()
            .map(|_| ())
            .map_err(|error| error.to_string());
        let failed = fetched.is_err();
        match store.lock() {
            Ok(mut store) => {
                let now = unix_now();
                let synced = render_fetched(&mut *store, keys, &source, fetched, now)
                    .inspect(print_report)
                    .and_then(|_| assign_tracked(&mut *store, &source, &source_config.track, now));
                match synced {
                    Ok(changed) if !changed.is_empty() => {
                        tracing::info!(agents = changed.len(), "assignments changed");
                        fetch_now.fleet_changed();
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::error!(source = %source_config.name, %error, "sync failed; retrying")
                    }
                }
            }
            Err(_) => {
                tracing::error!("store lock poisoned; stopping this source");
                return;
            }
        }
        failures = if failed { (failures + 1).min(6) } else { 0 };
        // Sleep until due, or until someone asks for a fetch.
        let deadline = Instant::now() + backoff(interval, failures);
        let Ok(mut requests) = fetch_now.requests.lock() else {
            return;
        };
        while *requests == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            requests = match fetch_now.signal.wait_timeout(requests, left) {
                Ok((requests, _)) => requests,
                Err(_) => return,
            };
        }
        seen = *requests;
    }
}
