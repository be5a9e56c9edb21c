//! `outpost-hub run`: the configuration turned into a [`Hub`] — store, keys, the QUIC socket
//! for agents, the admin (and hooks) listeners — run until SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};
use outpost_hub::api::EnrolmentInfo;
use outpost_hub::api::listener::{HttpListener, tls_config};
use outpost_hub::config::Config;
use outpost_hub::replication::Replication;
use outpost_hub::resign::refresh_keys;
use outpost_hub::runtime::{Hub, HubParts, HubSettings, SourceSettings};
use outpost_hub::store::HubStore;
use outpost_proto::transport::{Tuning, hub_pin, server_config};

use crate::{load_keys, open_shared_store, unix_now};

/// Serves the hub until interrupted.
pub(crate) fn serve(config: &Config) -> Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Which protection kustomize builds have on this machine, said once at start.
    let unisolated = config
        .sources
        .iter()
        .any(|source| source.kustomize_unisolated);
    match outpost_hub::kustomize::describe_isolation(unisolated) {
        (true, said) => tracing::info!("{said}"),
        (false, said) => tracing::warn!("{said}"),
    }
    let (store, shared): (Arc<dyn HubStore>, _) = open_shared_store(config)?;
    let keys = Arc::new(load_keys(&config.key_dir, config.key_policy.clone())?);
    let replication = shared.map(Replication::new);
    match &replication {
        // Signing again is the leader's to decide; every replica reads the keys.
        Some(replication) => {
            keys.refresh(unix_now()).context("reading the key dir")?;
            tracing::info!(
                replica = %replication.holder,
                lease_seconds = replication.lease.as_secs(),
                "a replica: the one holding the lease syncs Git and steps rollouts"
            );
        }
        None => {
            refresh_keys(&*store, &keys, unix_now()).context("reading the key dir")?;
        }
    }
    let tls = config
        .tls
        .as_ref()
        .map(tls_config)
        .transpose()
        .context("setting up HTTPS for the admin API ([tls])")?;
    let sources = config
        .sources
        .iter()
        .map(|source| SourceSettings {
            config: source.clone(),
            mirror: config.mirror_path(source),
        })
        .collect();
    let mut settings = HubSettings::new(sources, &keys);
    settings.poll_interval = config.poll_interval;
    settings.admin_names = config.admin_names.clone();
    settings.api_writes_per_second = config.api_writes_per_second;
    settings.retention = config.retention;
    settings.retention_every = Some(config.retention_every);
    settings.notify = config.notify.clone();
    settings.offline_after = config.offline_after;
    settings.service.push_payloads = config.push_payloads;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let quic = server_config(keys.transport(), &Tuning::default())
            .context("setting up TLS for agents")?;
        let (agents, buffers) =
            outpost_hub::udp::endpoint(config.listen_agents, Some(quic), outpost_hub::udp::WANTED_BUFFER)
                .with_context(|| {
                    format!(
                        "binding the agent service to {} (listen.agents)",
                        config.listen_agents
                    )
                })?;
        if buffers.receive < outpost_hub::udp::WANTED_BUFFER {
            tracing::warn!(
                wanted = outpost_hub::udp::WANTED_BUFFER,
                granted = buffers.receive,
                "the UDP receive buffer is smaller than asked: raise net.core.rmem_max (sysctl) for enrolment storms"
            );
        }
        tracing::info!(receive = buffers.receive, send = buffers.send, "UDP buffers for agents");
        let enrolment = EnrolmentInfo {
            hub_address: config.agents_public.clone(),
            hub_pin: hub_pin(&keys.transport().public_key()),
            root_key: keys.root(),
        };
        tracing::info!(address = %config.listen_agents, pin = %enrolment.hub_pin.to_hex(), "agent service listening (QUIC)");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let admin = bind(config.listen_admin, "listen.admin", tls.clone()).await?;
        tracing::info!(address = %config.listen_admin, scheme, "admin API listening");
        let hooks = match config.listen_hooks {
            Some(address) => {
                let listener = bind(address, "listen.hooks", tls.clone()).await?;
                tracing::info!(%address, scheme, "Git webhooks listening");
                Some(listener)
            }
            None => None,
        };
        let hub = Hub::start(HubParts {
            settings,
            store,
            keys: keys.clone(),
            clock: unix_now,
            agents,
            enrolment,
            admin: Some(admin),
            hooks,
            replication: replication.clone(),
        });
        stop_signal().await;
        hub.shutdown().await;
        if let Some(replication) = replication {
            // Another replica leads at once instead of when the lease runs out.
            let released = tokio::task::spawn_blocking(move || {
                replication.store.release_lease(&replication.holder)
            })
            .await;
            if let Ok(Err(error)) = released {
                tracing::warn!(%error, "could not give up the lease; another replica takes it when it runs out");
            }
        }
        Ok(())
    })
}

async fn bind(
    address: std::net::SocketAddr,
    field: &str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<HttpListener> {
    let listener = outpost_hub::api::listener::bind(address)
        .with_context(|| format!("binding {address} ({field})"))?;
    let name = if field == "listen.hooks" {
        "hooks"
    } else {
        "admin"
    };
    HttpListener::new(listener, tls, name)
        .with_context(|| format!("listening on {address} ({field})"))
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
