//! The hub's Prometheus metrics (`GET /metrics` on the admin listener, public like the probes:
//! counts and names of bundles, sources and rollouts, never an agent id, a token or a body).
//!
//! Two kinds: what happens ([`HubMetrics`]: counters and histograms the loops and the agent
//! service update as they work) and what is ([`FleetGauges`]: agents, phases and rollouts, read
//! from the store when scraped, so every replica reports the same fleet and nothing drifts).
//! Names follow Prometheus' conventions: `outpost_hub_` prefix, `_total` on counters, base
//! units (`_seconds`, `_bytes`). The list with their meaning is in docs/metrics.md.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::{FleetSummary, RolloutHead};
use crate::transport::ServiceCounters;

/// A source.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// Its name.
    pub source: String,
}

/// A fetch's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// The source.
    pub source: String,
    /// `ok` or `failed`.
    pub result: &'static str,
}

/// Why assignments changed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabel {
    /// `sync` (a tracked ref moved, an agent enrolled or was relabelled), `rollout`, or
    /// `keys` (snapshots signed again).
    pub cause: &'static str,
}

/// Drift reported by agents.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// The bundle.
    pub bundle: String,
    /// `corrected` or `left`.
    pub action: &'static str,
}

/// A payload encoding.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EncodingLabel {
    /// `whole` or `delta`.
    pub encoding: &'static str,
}

/// A payload cache lookup's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    /// `hit` or `miss`.
    pub result: &'static str,
}

/// A store operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// Its name (`record_statuses`, `session_reads`, `assign`, …).
    pub operation: &'static str,
}

fn seconds() -> Histogram {
    // 1 ms … ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// What the hub's loops and the agent service count as they work.
#[derive(Debug)]
pub struct HubMetrics {
    registry: Registry,
    syncs: Family<SyncLabels, Counter>,
    sync_seconds: Family<SourceLabel, Histogram>,
    renders: Family<SourceLabel, Counter>,
    refusals: Family<SourceLabel, Counter>,
    assignment_changes: Family<CauseLabel, Counter>,
    payload_cache: Family<CacheLabel, Counter>,
    compression_seconds: Family<EncodingLabel, Histogram>,
    bytes_sent: Family<EncodingLabel, Counter>,
    transfers: Family<EncodingLabel, Counter>,
    status_reports: Counter,
    pushed: Counter,
    drift_objects: Family<DriftLabels, Counter>,
    sessions: Counter,
    claims_refused: Counter,
    store_seconds: Family<OperationLabel, Histogram>,
}

impl Default for HubMetrics {
    fn default() -> HubMetrics {
        HubMetrics::new()
    }
}

impl HubMetrics {
    /// Every metric at zero, registered.
    pub fn new() -> HubMetrics {
        let mut metrics = HubMetrics {
            registry: Registry::with_prefix("outpost_hub"),
            syncs: Family::default(),
            sync_seconds: Family::new_with_constructor(seconds),
            renders: Family::default(),
            refusals: Family::default(),
            assignment_changes: Family::default(),
            payload_cache: Family::default(),
            compression_seconds: Family::new_with_constructor(seconds),
            bytes_sent: Family::default(),
            transfers: Family::default(),
            status_reports: Counter::default(),
            pushed: Counter::default(),
            drift_objects: Family::default(),
            sessions: Counter::default(),
            claims_refused: Counter::default(),
            store_seconds: Family::new_with_constructor(seconds),
        };
        metrics.registry.register(
            "syncs",
            "Fetches of a Git source, by result",
            metrics.syncs.clone(),
        );
        metrics.registry.register(
            "sync_duration_seconds",
            "Time to fetch a Git source",
            metrics.sync_seconds.clone(),
        );
        metrics.registry.register(
            "renders",
            "Bundle variants rendered into new snapshots",
            metrics.renders.clone(),
        );
        metrics.registry.register(
            "render_refusals",
            "Releases refused (a bundle that does not render or verify at a ref)",
            metrics.refusals.clone(),
        );
        metrics.registry.register(
            "assignment_changes",
            "Agents whose assignments changed, by cause",
            metrics.assignment_changes.clone(),
        );
        metrics.registry.register(
            "payload_cache_requests",
            "Payload lookups, by result (a miss compresses)",
            metrics.payload_cache.clone(),
        );
        metrics.registry.register(
            "compression_duration_seconds",
            "Time to compress one payload, by encoding",
            metrics.compression_seconds.clone(),
        );
        metrics.registry.register(
            "payload_sent_bytes",
            "Payload bytes sent to agents, by encoding (resumed transfers count what was sent)",
            metrics.bytes_sent.clone(),
        );
        metrics.registry.register(
            "transfers",
            "Snapshot transfers started, by encoding",
            metrics.transfers.clone(),
        );
        metrics.registry.register(
            "status_reports",
            "Status reports received from agents",
            metrics.status_reports.clone(),
        );
        metrics.registry.register(
            "payloads_pushed",
            "Payloads pushed ahead of the assignment that names them (no fetch round trip)",
            metrics.pushed.clone(),
        );
        metrics.registry.register(
            "drift_objects",
            "Drifted objects agents reported, by bundle and what the agent did (corrected, left in place)",
            metrics.drift_objects.clone(),
        );
        metrics.registry.register(
            "sessions",
            "Agent sessions started (identified connections)",
            metrics.sessions.clone(),
        );
        metrics.registry.register(
            "agent_claims_refused",
            "Claims in agents' Hello this hub could not verify (a generation or body without a header its keys signed, a sequence too far past the one it issued), refused without moving anything",
            metrics.claims_refused.clone(),
        );
        metrics.registry.register(
            "http_connections_refused",
            "Connections the admin and hooks listeners closed before serving a request, by listener and reason (source_share, header_timeout, handshake)",
            crate::api::listener::refused().clone(),
        );
        metrics.registry.register(
            "store_operation_duration_seconds",
            "Time of store operations on the hot paths, by operation",
            metrics.store_seconds.clone(),
        );
        metrics
    }

    /// An agent's `Hello` made `count` claims this hub refused.
    pub fn claims_refused(&self, count: usize) {
        self.claims_refused.inc_by(count as u64);
    }

    /// A fetch of `source` ended.
    pub fn synced(&self, source: &str, took: Duration, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.syncs
            .get_or_create(&SyncLabels {
                source: source.to_owned(),
                result,
            })
            .inc();
        self.sync_seconds
            .get_or_create(&SourceLabel {
                source: source.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// A sync of `source` rendered `rendered` snapshots and refused `refused` releases.
    pub fn rendered(&self, source: &str, rendered: usize, refused: usize) {
        let label = SourceLabel {
            source: source.to_owned(),
        };
        self.renders.get_or_create(&label).inc_by(rendered as u64);
        self.refusals.get_or_create(&label).inc_by(refused as u64);
    }

    /// `agents` agents' assignments changed because of `cause`.
    pub fn assignments_changed(&self, cause: &'static str, agents: usize) {
        self.assignment_changes
            .get_or_create(&CauseLabel { cause })
            .inc_by(agents as u64);
    }

    /// A payload lookup: a hit, or a miss that compressed for `took`.
    pub fn payload_lookup(&self, encoding: &'static str, compressed: Option<Duration>) {
        let result = if compressed.is_some() { "miss" } else { "hit" };
        self.payload_cache
            .get_or_create(&CacheLabel { result })
            .inc();
        if let Some(took) = compressed {
            self.compression_seconds
                .get_or_create(&EncodingLabel { encoding })
                .observe(took.as_secs_f64());
        }
    }

    /// A transfer started; `bytes` of payload are to be sent.
    pub fn transfer(&self, encoding: &'static str) {
        self.transfers
            .get_or_create(&EncodingLabel { encoding })
            .inc();
    }

    /// `bytes` of payload sent.
    pub fn sent(&self, encoding: &'static str, bytes: usize) {
        self.bytes_sent
            .get_or_create(&EncodingLabel { encoding })
            .inc_by(bytes as u64);
    }

    /// `count` status reports arrived.
    pub fn status_reports(&self, count: usize) {
        self.status_reports.inc_by(count as u64);
    }

    /// A payload was pushed with its assignment.
    pub fn pushed(&self) {
        self.pushed.inc();
    }

    /// An agent reported `objects` drifted objects of `bundle`.
    pub fn drift(&self, bundle: &str, action: &'static str, objects: u64) {
        self.drift_objects
            .get_or_create(&DriftLabels {
                bundle: bundle.to_owned(),
                action,
            })
            .inc_by(objects);
    }

    /// An agent session started.
    pub fn session_started(&self) {
        self.sessions.inc();
    }

    /// A store operation took `took`.
    pub fn store_operation(&self, operation: &'static str, took: Duration) {
        self.store_seconds
            .get_or_create(&OperationLabel { operation })
            .observe(took.as_secs_f64());
    }

    /// Runs `work` and records its time as `operation`.
    pub fn time<T>(&self, operation: &'static str, work: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let value = work();
        self.store_operation(operation, started.elapsed());
        value
    }

    /// The text exposition of these metrics and `gauges` (OpenMetrics text, which Prometheus
    /// reads).
    pub fn encode(&self, gauges: &FleetGauges) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = text::encode_registry(&mut out, &self.registry);
        let _ = text::encode_registry(&mut out, &gauges.registry);
        let _ = text::encode_eof(&mut out);
        out
    }
}

/// A bundle's agents in one phase.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BundlePhase {
    bundle: String,
    phase: String,
}

/// Rollouts in one phase.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutPhase {
    phase: &'static str,
}

/// One live rollout.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabels {
    rollout: String,
    bundle: String,
    phase: &'static str,
}

/// One wave of a live rollout, and the members in one state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaveLabels {
    rollout: String,
    bundle: String,
    wave: String,
    state: &'static str,
}

/// What the agent service refused or throttled.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: &'static str,
}

/// What is, read when scraped.
#[derive(Debug)]
pub struct FleetGauges {
    registry: Registry,
}

/// What a scrape reads.
#[derive(Debug)]
pub struct FleetReading<'a> {
    /// The fleet's counts (none: the store did not answer).
    pub summary: Option<&'a FleetSummary>,
    /// Every rollout (none: the store did not answer).
    pub rollouts: Option<&'a [RolloutHead]>,
    /// Agents connected to this replica now.
    pub connected: usize,
    /// Whether this replica leads (the only hub always does).
    pub leading: bool,
    /// The agent service's refusals and throttles.
    pub service: &'a ServiceCounters,
    /// Payload compressions run.
    pub compressions: u64,
}

impl FleetGauges {
    /// The gauges of one reading.
    pub fn read(reading: &FleetReading<'_>) -> FleetGauges {
        use std::sync::atomic::Ordering::Relaxed;
        let mut registry = Registry::with_prefix("outpost_hub");
        let gauge = |value: i64| {
            let gauge: Gauge = Gauge::default();
            gauge.set(value);
            gauge
        };
        registry.register(
            "store_up",
            "1 when the store answered this scrape",
            gauge(i64::from(
                reading.summary.is_some() && reading.rollouts.is_some(),
            )),
        );
        registry.register(
            "leader",
            "1 when this replica leads (syncs Git, steps rollouts)",
            gauge(i64::from(reading.leading)),
        );
        registry.register(
            "agents_connected",
            "Agents connected to this replica now",
            gauge(reading.connected as i64),
        );
        if let Some(summary) = reading.summary {
            registry.register(
                "agents_enrolled",
                "Agents enrolled and not revoked",
                gauge(summary.agents.saturating_sub(summary.revoked) as i64),
            );
            registry.register(
                "agents_revoked",
                "Agents revoked",
                gauge(summary.revoked as i64),
            );
            registry.register(
                "agents_stale",
                "Agents (not revoked) with at least one stale bundle",
                gauge(summary.stale as i64),
            );
            registry.register(
                "agents_drifted",
                "Agents (not revoked) with drift left in place (drift: report) in at least one bundle",
                gauge(summary.drifted as i64),
            );
            let phases: Family<BundlePhase, Gauge> = Family::default();
            for (bundle, phase, count) in &summary.phases {
                phases
                    .get_or_create(&BundlePhase {
                        bundle: bundle.clone(),
                        phase: phase.clone(),
                    })
                    .set(*count as i64);
            }
            registry.register(
                "bundle_agents",
                "Agents assigned a bundle, by the phase they last reported (Unknown: none yet)",
                phases,
            );
        }
        if let Some(rollouts) = reading.rollouts {
            let by_phase: Family<RolloutPhase, Gauge> = Family::default();
            for phase in ["running", "paused", "succeeded", "aborted", "rolled-back"] {
                by_phase.get_or_create(&RolloutPhase { phase }).set(0);
            }
            let live: Family<RolloutLabels, Gauge> = Family::default();
            let waves: Family<WaveLabels, Gauge> = Family::default();
            for head in rollouts {
                let phase = head.rollout.phase.name();
                by_phase.get_or_create(&RolloutPhase { phase }).inc();
                if !matches!(phase, "running" | "paused") {
                    continue;
                }
                let (rollout, bundle) = (
                    head.rollout.id.to_string(),
                    head.rollout.plan.bundle.clone(),
                );
                live.get_or_create(&RolloutLabels {
                    rollout: rollout.clone(),
                    bundle: bundle.clone(),
                    phase,
                })
                .set(head.rollout.wave as i64 + 1);
                for (index, wave) in head.progress.waves.iter().enumerate() {
                    for (state, count) in [
                        ("planned", wave.planned),
                        ("released", wave.released),
                        ("healthy", wave.healthy),
                        ("failed", wave.failed),
                        ("pending", wave.pending),
                        ("restored", wave.restored),
                    ] {
                        waves
                            .get_or_create(&WaveLabels {
                                rollout: rollout.clone(),
                                bundle: bundle.clone(),
                                wave: (index + 1).to_string(),
                                state,
                            })
                            .set(count as i64);
                    }
                }
            }
            registry.register("rollouts", "Rollouts, by phase", by_phase);
            registry.register(
                "rollout_open_wave",
                "The open wave (1-based, as the CLI shows it) of each running or paused rollout",
                live,
            );
            registry.register(
                "rollout_wave_members",
                "Members of each wave of a running or paused rollout, by state (planned: the wave's target)",
                waves,
            );
        }
        let service: Family<RefusalLabel, Counter> = Family::default();
        for (reason, value) in [
            ("retry", &reading.service.retries),
            ("refused", &reading.service.refused),
            ("replaced", &reading.service.replaced),
            ("throttled", &reading.service.throttled),
            ("busy", &reading.service.busy),
        ] {
            service
                .get_or_create(&RefusalLabel { reason })
                .inc_by(value.load(Relaxed));
        }
        registry.register(
            "service_pushbacks",
            "Peers the agent service pushed back: QUIC retry, refused (too many unidentified), replaced by a newer connection, throttled (rate limit), busy (enrolment storm)",
            service,
        );
        let reads: Counter = Counter::default();
        reads.inc_by(reading.service.session_reads.load(Relaxed));
        registry.register(
            "session_reads",
            "Times a session read its agent and assignments again",
            reads,
        );
        let compressions: Counter = Counter::default();
        compressions.inc_by(reading.compressions);
        registry.register(
            "compressions",
            "Payload compressions run (payload cache misses)",
            compressions,
        );
        FleetGauges { registry }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(metrics: &HubMetrics, summary: Option<&FleetSummary>) -> String {
        let counters = ServiceCounters::default();
        counters
            .throttled
            .fetch_add(2, std::sync::atomic::Ordering::Relaxed);
        metrics.encode(&FleetGauges::read(&FleetReading {
            summary,
            rollouts: Some(&[]),
            connected: 3,
            leading: true,
            service: &counters,
            compressions: 5,
        }))
    }

    #[test]
    fn what_happens_and_what_is_in_one_exposition() {
        let metrics = HubMetrics::new();
        metrics.synced("fleet", Duration::from_millis(30), true);
        metrics.synced("fleet", Duration::from_millis(30), false);
        metrics.rendered("fleet", 2, 1);
        metrics.assignments_changed("rollout", 7);
        metrics.payload_lookup("delta", Some(Duration::from_millis(4)));
        metrics.payload_lookup("delta", None);
        metrics.sent("delta", 1234);
        metrics.status_reports(3);
        metrics.drift("shop", "left", 2);
        metrics.time("record_statuses", || ());
        let summary = FleetSummary {
            agents: 10,
            revoked: 1,
            stale: 2,
            drifted: 1,
            phases: vec![("shop".to_owned(), "Healthy".to_owned(), 8)],
            assigned: Vec::new(),
            labels: Vec::new(),
        };
        let text = scrape(&metrics, Some(&summary));
        for line in [
            "# TYPE outpost_hub_syncs counter",
            "outpost_hub_syncs_total{source=\"fleet\",result=\"ok\"} 1",
            "outpost_hub_syncs_total{source=\"fleet\",result=\"failed\"} 1",
            "outpost_hub_sync_duration_seconds_count{source=\"fleet\"} 2",
            "outpost_hub_renders_total{source=\"fleet\"} 2",
            "outpost_hub_render_refusals_total{source=\"fleet\"} 1",
            "outpost_hub_assignment_changes_total{cause=\"rollout\"} 7",
            "outpost_hub_payload_cache_requests_total{result=\"miss\"} 1",
            "outpost_hub_payload_cache_requests_total{result=\"hit\"} 1",
            "outpost_hub_compression_duration_seconds_count{encoding=\"delta\"} 1",
            "outpost_hub_payload_sent_bytes_total{encoding=\"delta\"} 1234",
            "outpost_hub_status_reports_total 3",
            "outpost_hub_store_operation_duration_seconds_count{operation=\"record_statuses\"} 1",
            "outpost_hub_store_up 1",
            "outpost_hub_agents_connected 3",
            "outpost_hub_agents_enrolled 9",
            "outpost_hub_agents_revoked 1",
            "outpost_hub_agents_stale 2",
            "outpost_hub_agents_drifted 1",
            "outpost_hub_drift_objects_total{bundle=\"shop\",action=\"left\"} 2",
            "outpost_hub_bundle_agents{bundle=\"shop\",phase=\"Healthy\"} 8",
            "outpost_hub_rollouts{phase=\"running\"} 0",
            "outpost_hub_service_pushbacks_total{reason=\"throttled\"} 2",
            "outpost_hub_compressions_total 5",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        // A store that did not answer: said so, and no fleet gauges that would read as zero.
        let text = scrape(&metrics, None);
        assert!(text.contains("outpost_hub_store_up 0"), "{text}");
        assert!(!text.contains("outpost_hub_agents_enrolled"), "{text}");
    }
}
