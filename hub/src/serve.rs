//! `outpost-hub run`: the admin API on tokio, and one thread per Git source that fetches on the
//! poll interval (backing off while the remote is down) or when the API asks it to.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outpost_hub::api::{AdminState, FetchNow, router};
use outpost_hub::config::{Config, SourceConfig};
use outpost_hub::keys::HubKeys;
use outpost_hub::store::SqliteStore;
use outpost_hub::sync::render_fetched;

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
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
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
        };
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("interrupted; stopping");
            })
            .await
            .context("serving the admin API")
    })
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
                match render_fetched(&mut *store, keys, &source, fetched, unix_now()) {
                    Ok(report) => print_report(&report),
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
