//! The agent's probes and Prometheus metrics, served on an optional listener
//! (`metrics_address`): `GET /metrics`, `GET /live`, `GET /ready`.
//!
//! Plain HTTP/1.1 without authentication, one short request per connection: keep it on
//! loopback (node exporters and a local Prometheus agent scrape there), or on a pod address only
//! the cluster's Prometheus reaches. Nothing secret is shown: bundle names, generations, phases
//! and counts.
//!
//! `/ready` is 200 when the state database answers and the cluster was reached (its API
//! answered the last call), or when the agent runs without a cluster (`cluster = none`);
//! otherwise 503 with what it waits for. `/live` is 200 while the process serves requests.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use outpost_proto::wire::Phase;
use prometheus_client::encoding::{EncodeLabelSet, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::client::Client;
use crate::reconcile::ReconcileCounters;

/// The longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// Connections served at once; more wait.
const MAX_CONNECTIONS: usize = 16;

/// What the agent is, for its probes and metrics.
#[derive(Debug)]
pub struct Observed {
    client: Client,
    /// `None`: no cluster configured (`cluster = none`).
    cluster: Option<OnceLock<Arc<ReconcileCounters>>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundleLabel {
    bundle: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    bundle: String,
    phase: &'static str,
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Applying => "Applying",
        Phase::Healthy => "Healthy",
        Phase::Degraded => "Degraded",
        Phase::Failed => "Failed",
    }
}

/// What the state database says, read at a scrape.
#[derive(Debug, Default)]
struct StateReading {
    /// (bundle, generation assigned, held).
    assigned: Vec<(String, u64, bool)>,
    /// (bundle, phase, generation) last reported.
    reported: Vec<(String, Phase, u64, bool)>,
    outbox: u64,
}

impl Observed {
    /// Probes over `client`'s state; with a cluster (`reconciling`), not ready until
    /// [`Observed::reconciling`] is called once the cluster is connected.
    pub fn new(client: Client, with_cluster: bool) -> Arc<Observed> {
        Arc::new(Observed {
            client,
            cluster: with_cluster.then(OnceLock::new),
        })
    }

    /// The cluster is connected and this reconcile loop keeps it.
    pub fn reconciling(&self, counters: Arc<ReconcileCounters>) {
        if let Some(cluster) = &self.cluster {
            let _ = cluster.set(counters);
        }
    }

    async fn read_state(&self) -> Result<StateReading, String> {
        self.client
            .with_state(|state| {
                let held = state.held()?;
                let assigned = state
                    .assignments()?
                    .into_iter()
                    .map(|a| {
                        let is_held = held.iter().any(|h| h.digest == a.digest);
                        (a.bundle, a.generation, is_held)
                    })
                    .collect();
                let reported = state
                    .last_statuses()?
                    .into_iter()
                    .map(|s| (s.bundle, s.phase, s.generation, s.stale))
                    .collect();
                Ok(StateReading {
                    assigned,
                    reported,
                    outbox: state.outbox_len()?,
                })
            })
            .await
            .map_err(|error| error.to_string())
    }

    /// What `/ready` waits for (empty: ready).
    pub async fn waiting_for(&self) -> Vec<String> {
        let mut waiting = Vec::new();
        if let Err(error) = self.read_state().await {
            waiting.push(format!("the state database: {error}"));
        }
        match &self.cluster {
            None => {}
            Some(cluster) => match cluster.get() {
                None => waiting.push("connecting to the cluster".to_owned()),
                Some(counters) if counters.cluster_unreachable.load(Relaxed) => {
                    waiting.push("the cluster API (unreachable at the last call)".to_owned())
                }
                Some(_) => {}
            },
        }
        waiting
    }

    /// The text exposition (OpenMetrics text, which Prometheus reads).
    pub async fn metrics(&self) -> String {
        let reading = self.read_state().await;
        let mut registry = Registry::with_prefix("outpost_agent");
        let gauge = |value: i64| {
            let gauge: Gauge = Gauge::default();
            gauge.set(value);
            gauge
        };
        let counter = |value: u64| {
            let counter: Counter = Counter::default();
            counter.inc_by(value);
            counter
        };
        let link = self.client.counters();
        registry.register(
            "hub_connected",
            "1 while a connection to the hub is up",
            gauge(i64::from(link.hub_connected.load(Relaxed))),
        );
        registry.register(
            "hub_connections",
            "Connections to the hub established",
            counter(link.connections.load(Relaxed)),
        );
        registry.register(
            "payload_received_bytes",
            "Snapshot payload bytes received from the hub",
            counter(link.payload_bytes.load(Relaxed)),
        );
        registry.register(
            "snapshots_installed",
            "Snapshots verified and installed",
            counter(link.installs.load(Relaxed)),
        );
        registry.register(
            "transfers_rejected",
            "Transfers whose bytes did not verify and were dropped",
            counter(link.rejected.load(Relaxed)),
        );
        registry.register(
            "assignments_refused",
            "Assignments refused: unsigned, not signed by a certified key, for another agent, or expired",
            counter(link.assignments_refused.load(Relaxed)),
        );
        registry.register(
            "status_reports_acknowledged",
            "Status reports the hub acknowledged",
            counter(link.acknowledged.load(Relaxed)),
        );
        registry.register(
            "state_up",
            "1 when the state database answered this scrape",
            gauge(i64::from(reading.is_ok())),
        );
        if let Ok(reading) = &reading {
            registry.register(
                "outbox_reports",
                "Status reports waiting for the hub",
                gauge(reading.outbox as i64),
            );
            let assigned: Family<BundleLabel, Gauge> = Family::default();
            let held: Family<BundleLabel, Gauge> = Family::default();
            for (bundle, generation, is_held) in &reading.assigned {
                let label = BundleLabel {
                    bundle: bundle.clone(),
                };
                assigned.get_or_create(&label).set(*generation as i64);
                held.get_or_create(&label).set(i64::from(*is_held));
            }
            registry.register(
                "bundle_assigned_generation",
                "The generation the hub assigned, per bundle",
                assigned,
            );
            registry.register(
                "bundle_held",
                "1 when the assigned snapshot is held (verified, cached)",
                held,
            );
            let phases: Family<PhaseLabels, Gauge> = Family::default();
            let generations: Family<BundleLabel, Gauge> = Family::default();
            let stale: Family<BundleLabel, Gauge> = Family::default();
            for (bundle, phase, generation, is_stale) in &reading.reported {
                for each in [
                    Phase::Applying,
                    Phase::Healthy,
                    Phase::Degraded,
                    Phase::Failed,
                ] {
                    phases
                        .get_or_create(&PhaseLabels {
                            bundle: bundle.clone(),
                            phase: phase_name(each),
                        })
                        .set(i64::from(each == *phase));
                }
                let label = BundleLabel {
                    bundle: bundle.clone(),
                };
                generations.get_or_create(&label).set(*generation as i64);
                stale.get_or_create(&label).set(i64::from(*is_stale));
            }
            registry.register(
                "bundle_phase",
                "1 for the phase each bundle last reported, 0 for the others",
                phases,
            );
            registry.register(
                "bundle_generation",
                "The generation each bundle last reported on (the one enforced)",
                generations,
            );
            registry.register(
                "bundle_stale",
                "1 when the enforced snapshot has expired (the hub was not heard from in time)",
                stale,
            );
        }
        if let Some(counters) = self.cluster.as_ref().and_then(OnceLock::get) {
            registry.register(
                "cluster_reachable",
                "1 when the cluster API answered the last call",
                gauge(i64::from(!counters.cluster_unreachable.load(Relaxed))),
            );
            registry.register(
                "reconcile_passes",
                "Reconcile passes run",
                counter(counters.passes.load(Relaxed)),
            );
            registry.register(
                "objects_applied",
                "Successful server-side applies",
                counter(counters.applied.load(Relaxed)),
            );
            registry.register(
                "apply_errors",
                "Applies that failed",
                counter(counters.failed.load(Relaxed)),
            );
            registry.register(
                "objects_pruned",
                "Objects deleted because no snapshot holds them any more",
                counter(counters.pruned.load(Relaxed)),
            );
            registry.register(
                "drift_corrections",
                "Re-applies that changed an object someone else had changed",
                counter(counters.drift_corrected.load(Relaxed)),
            );
            registry.register(
                "drift_left_objects",
                "Objects found drifted and left in place (drift: report), counted when reported",
                counter(counters.drift_left.load(Relaxed)),
            );
            registry.register(
                "drift_reports",
                "Drift reports queued for the hub",
                counter(counters.drift_reports.load(Relaxed)),
            );
            registry.register(
                "last_reconcile_success_timestamp_seconds",
                "Unix time of the last full apply of a bundle that applied every object",
                gauge(counters.last_success.load(Relaxed)),
            );
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = text::encode(&mut out, &registry);
        out
    }
}

/// Serves `/metrics`, `/live` and `/ready` on `listener` until dropped.
pub async fn serve(listener: tokio::net::TcpListener, observed: Arc<Observed>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let observed = observed.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = answer(stream, &observed).await {
                tracing::debug!(%peer, %error, "metrics request failed");
            }
        });
    }
}

/// Binds `address` for [`serve`].
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

async fn answer(mut stream: tokio::net::TcpStream, observed: &Observed) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|line| String::from_utf8_lossy(line).trim().to_owned())
        .unwrap_or_default();
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/live") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        ("GET", "/ready") => {
            let waiting = observed.waiting_for().await;
            if waiting.is_empty() {
                ("200 OK", "text/plain; charset=utf-8", "ready\n".to_owned())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain; charset=utf-8",
                    format!("waiting for: {}\n", waiting.join("; ")),
                )
            }
        }
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            observed.metrics().await,
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics, /live or /ready\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientOptions;
    use crate::state::State;

    fn client(dir: &std::path::Path) -> Client {
        let (key, _) = crate::identity::load_or_create(&dir.join("agent.key")).unwrap();
        let state = State::open(&dir.join("agent.db")).unwrap();
        Client::new(key, state, ClientOptions::default())
    }

    /// One raw request, the whole answer.
    async fn request(address: SocketAddr, head: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn ready_waits_for_the_cluster_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let observed = Observed::new(client(dir.path()), true);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, observed.clone()));
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");

        assert!(
            request(address, &get("/live"))
                .await
                .starts_with("HTTP/1.1 200")
        );
        let answer = request(address, &get("/ready")).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("connecting to the cluster"), "{answer}");

        let counters = Arc::new(ReconcileCounters::default());
        observed.reconciling(counters.clone());
        assert!(
            request(address, &get("/ready"))
                .await
                .starts_with("HTTP/1.1 200")
        );
        counters.cluster_unreachable.store(true, Relaxed);
        let answer = request(address, &get("/ready")).await;
        assert!(answer.contains("unreachable"), "{answer}");

        counters.drift_corrected.store(3, Relaxed);
        let answer = request(address, &get("/metrics?x=1")).await;
        assert!(answer.contains("application/openmetrics-text"), "{answer}");
        for line in [
            "outpost_agent_drift_corrections_total 3",
            "outpost_agent_cluster_reachable 0",
            "outpost_agent_hub_connected 0",
            "outpost_agent_state_up 1",
            "outpost_agent_outbox_reports 0",
            "# EOF",
        ] {
            assert!(answer.contains(line), "{line:?} missing in {answer}");
        }
        assert!(
            request(address, &get("/nothing"))
                .await
                .starts_with("HTTP/1.1 404")
        );
        let answer = request(address, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        // Garbage gets an answer too, never a panic.
        let answer = request(address, "\x00\x01\x02\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    }

    #[tokio::test]
    async fn without_a_cluster_the_state_alone_decides() {
        let dir = tempfile::tempdir().unwrap();
        let observed = Observed::new(client(dir.path()), false);
        assert!(observed.waiting_for().await.is_empty());
        let text = observed.metrics().await;
        assert!(!text.contains("cluster_reachable"), "{text}");
    }
}
