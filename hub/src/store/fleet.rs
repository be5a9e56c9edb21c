//! The store's side of serving agents: assignments (what each agent should run, with a sequence
//! that grows on every change), what agents report, and when they were last connected.

use super::StoreError;
use std::collections::BTreeMap;

/// An agent's labels, key to value.
pub type Labels = BTreeMap<String, String>;

use outpost_proto::Digest;
use outpost_proto::wire::{BundleDrift, BundleStatus, DriftAction, Phase};

/// How many of an agent's latest assignments of a bundle count as delta bases (the hub
/// compresses only against these; older ones are pruned by retention).
pub(crate) const DELTA_BASES_KEPT: i64 = 4;

/// A phase as the stores write it.
/// The `hub-behind-agent` event's message for what [`FleetStore::advance_past`] moved.
pub(crate) fn behind_message(moved: &[String]) -> String {
    format!(
        "the agent has seen more than this hub knows (restored from a backup?); moved {}",
        moved.join(", ")
    )
}

pub(crate) fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Applying => "Applying",
        Phase::Healthy => "Healthy",
        Phase::Degraded => "Degraded",
        Phase::Failed => "Failed",
    }
}

/// A phase from [`phase_name`]'s text.
pub(crate) fn phase_from(name: &str) -> Phase {
    match name {
        "Healthy" => Phase::Healthy,
        "Degraded" => Phase::Degraded,
        "Failed" => Phase::Failed,
        _ => Phase::Applying,
    }
}

/// What storing one status report came to: whether it was new, or why it failed.
pub type StatusOutcome = Result<bool, String>;

/// A snapshot's signed header bytes and signature.
pub type SignedHeader = (Vec<u8>, Vec<u8>);

/// One agent's assignment for one bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentRow {
    /// Agent id.
    pub agent: String,
    /// Bundle name.
    pub bundle: String,
    /// Generation of the snapshot.
    pub generation: u64,
    /// Body digest of the snapshot.
    pub digest: Digest,
}

/// One assignment to set (`to` = `None` removes the bundle from the agent), made by `origin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignmentChange {
    /// Agent id.
    pub agent: String,
    /// Bundle name.
    pub bundle: String,
    /// Generation and body digest, or nothing.
    pub to: Option<(u64, Digest)>,
    /// Who sets it (`rollout:<id>`, `track:<url>`).
    pub origin: String,
}

/// All of an agent's assignments and their sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentAssignments {
    /// Grows with every change.
    pub sequence: u64,
    /// One per bundle, by bundle.
    pub entries: Vec<AssignmentRow>,
}

/// The last status an agent reported for a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStatus {
    /// Agent id.
    pub agent: String,
    /// What it reported.
    pub status: BundleStatus,
    /// When the hub received it.
    pub received_at: i64,
}

/// What changed in the fleet since a cursor of the change feed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetChanges {
    /// Ask from here next time.
    pub cursor: u64,
    /// Agents enrolled, labelled, revoked or assigned differently, by id.
    pub agents: Vec<String>,
    /// Status reports received (the latest per agent and bundle).
    pub statuses: Vec<StoredStatus>,
}

/// One agent as its connection needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRead {
    /// The agent (`None`: unknown).
    pub agent: Option<super::Agent>,
    /// Its assignments.
    pub assignments: AgentAssignments,
    /// Its delta bases (the snapshots of each bundle it was assigned lately), when asked for.
    pub bases: Vec<(String, Digest)>,
}

/// One status report to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusWrite {
    /// The agent.
    pub agent: String,
    /// The report's sequence in the agent's outbox.
    pub sequence: u64,
    /// What it says.
    pub bundles: Vec<BundleStatus>,
    /// Drift found (a `Drift` message: then `bundles` is empty).
    pub drift: Vec<BundleDrift>,
    /// When it arrived.
    pub now: i64,
}

/// A drift action as the stores write it.
pub(crate) fn drift_action_name(action: DriftAction) -> &'static str {
    match action {
        DriftAction::Corrected => "corrected",
        DriftAction::Left => "left",
    }
}

/// The event a drift report adds to the log: `drift-corrected`, `drift-found` (left in
/// place) or `drift-gone`, with the objects and who changed them.
pub(crate) fn drift_event(drift: &BundleDrift) -> (&'static str, String) {
    let total = drift.objects.len() as u64 + u64::from(drift.more_objects);
    drift_message(
        &drift.bundle,
        drift.generation,
        drift.action,
        &drift.objects,
        total,
    )
}

/// [`drift_event`] of a report's parts: `total` objects drifted, `objects` of them listed.
pub(crate) fn drift_message(
    bundle: &str,
    generation: u64,
    action: DriftAction,
    objects: &[outpost_proto::wire::ObjectDrift],
    total: u64,
) -> (&'static str, String) {
    let mut objects: Vec<String> = objects
        .iter()
        .take(5)
        .map(|object| {
            let name = match object.namespace.is_empty() {
                true => object.name.clone(),
                false => format!("{}/{}", object.namespace, object.name),
            };
            if object.deleted {
                return format!("{} {name} deleted", object.kind);
            }
            let fields: Vec<String> = object
                .fields
                .iter()
                .map(|field| match &field.manager {
                    Some(manager) => format!("{} by {manager}", field.path),
                    None => field.path.clone(),
                })
                .collect();
            format!("{} {name} ({})", object.kind, fields.join(", "))
        })
        .collect();
    let shown = objects.len() as u64;
    if total > shown {
        objects.push(format!("{} more", total - shown));
    }
    let what = format!("bundle {bundle} generation {generation}");
    let plural = if total == 1 { "object" } else { "objects" };
    match (action, total) {
        (DriftAction::Left, 0) => (
            "drift-gone",
            format!("{what}: the drift left in place is gone (the cluster or Git changed)"),
        ),
        (DriftAction::Left, _) => (
            "drift-found",
            format!(
                "{what}: {total} {plural} drifted, left in place (drift: report): {}",
                objects.join("; ")
            ),
        ),
        (DriftAction::Corrected, _) => (
            "drift-corrected",
            format!(
                "{what}: {total} {plural} drifted and applied back: {}",
                objects.join("; ")
            ),
        ),
    }
}

/// What serving agents needs of the store.
pub trait FleetStore {
    /// Replaces the assignments that `origin` (e.g. `track:<source url>`) made with `wanted`,
    /// in one transaction, and bumps the sequence of every agent whose assignments changed.
    /// Rows another origin holds (a rollout's) are left alone. Returns the agents changed.
    fn set_assignments(
        &self,
        origin: &str,
        wanted: &[AssignmentRow],
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Sets single assignments whatever their origin (a rollout's decisions), in one
    /// transaction, bumping the sequence of each agent changed; returns those agents.
    fn change_assignments(
        &self,
        changes: &[AssignmentChange],
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Every agent's assignment of one bundle (or of all), with its origin.
    fn bundle_assignments(
        &self,
        bundle: Option<&str>,
    ) -> Result<Vec<(AssignmentRow, String)>, StoreError>;
    /// An agent's assignments.
    fn assignments(&self, agent: &str) -> Result<AgentAssignments, StoreError>;
    /// Records a connection: last seen and the agent's version.
    fn agent_connected(&self, agent: &str, version: &str, now: i64) -> Result<(), StoreError>;
    /// Records many connections (agent, version, when) in one transaction.
    fn agents_connected(&self, connections: &[(String, String, i64)]) -> Result<(), StoreError>;
    /// Many agents as their connections need them, in one read: one per id, in order
    /// (`with_bases`: their delta bases too).
    fn session_reads(
        &self,
        ids: &[String],
        with_bases: bool,
    ) -> Result<Vec<SessionRead>, StoreError>;
    /// Stores a status report unless its sequence was stored before (a retransmission after a
    /// lost acknowledgement): returns whether it was new. Either way the agent may delete it.
    fn record_status(
        &self,
        agent: &str,
        sequence: u64,
        bundles: &[BundleStatus],
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Where the change feed is now: [`FleetStore::changes_since`] this returns what comes after.
    fn change_cursor(&self) -> Result<u64, StoreError>;
    /// What changed after `cursor`: agents enrolled, labelled, revoked or assigned differently,
    /// and status reports (only the latest of each agent and bundle is kept, so one that was
    /// overwritten shows as its successor). Work grows with what changed, not with the fleet.
    fn changes_since(&self, cursor: u64) -> Result<FleetChanges, StoreError>;
    /// Many status reports in one transaction, each on its own (one that fails is undone
    /// alone): per report, whether it was new, or why it failed.
    fn record_statuses(&self, reports: &[StatusWrite]) -> Result<Vec<StatusOutcome>, StoreError>;
    /// The last status of every bundle on every agent (or one agent).
    fn statuses(&self, agent: Option<&str>) -> Result<Vec<StoredStatus>, StoreError>;
    /// Number of status reports stored for an agent (history).
    fn status_history_len(&self, agent: &str) -> Result<u64, StoreError>;
    /// The signed header and signature of a bundle's generation, without its body.
    fn signed_header(
        &self,
        bundle: &str,
        generation: u64,
    ) -> Result<Option<SignedHeader>, StoreError>;
    /// The body of a bundle's snapshot with this digest.
    fn snapshot_body(&self, bundle: &str, digest: &Digest) -> Result<Option<Vec<u8>>, StoreError>;
    /// The body digest of a bundle's generation.
    fn snapshot_digest(&self, bundle: &str, generation: u64) -> Result<Option<Digest>, StoreError>;
    /// What the hub may compress against for `agent`: the snapshots of each bundle it was
    /// assigned lately (the last few assignments count), so it may hold them.
    fn delta_bases(&self, agent: &str) -> Result<Vec<(String, Digest)>, StoreError>;
    /// The signed headers of the snapshots in use: assigned to an agent or named by a release.
    fn headers_in_use(&self) -> Result<Vec<(String, u64, Vec<u8>)>, StoreError>;
    /// The distinct label sets of the agents not revoked (what decides the render variants).
    fn label_sets(&self) -> Result<Vec<BTreeMap<String, String>>, StoreError>;
    /// Every agent not revoked with its labels (or only those in `ids`), by id.
    fn agent_labels(&self, ids: Option<&[String]>) -> Result<Vec<(String, Labels)>, StoreError>;
    /// The agents `origin` assigned `bundle` to.
    fn assigned_by(&self, origin: &str, bundle: &str) -> Result<Vec<String>, StoreError>;
    /// The bundles `origin` assigned to anyone.
    fn bundles_assigned_by(&self, origin: &str) -> Result<Vec<String>, StoreError>;
    /// Sets `origin`'s assignments of `bundle` for the agents in `wanted` and removes them for
    /// the agents in `unassign`, in one transaction; rows another origin holds (a rollout's)
    /// are left alone, agents in neither list are untouched. Bumps the sequence of each agent
    /// changed; returns them.
    fn set_tracked(
        &self,
        origin: &str,
        bundle: &str,
        wanted: &[AssignmentRow],
        unassign: &[String],
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Records that the agents `ids` are connected at `now` (a heartbeat: `last_seen` only
    /// moves forward), in one transaction.
    fn agents_seen(&self, ids: &[String], now: i64) -> Result<(), StoreError>;
    /// The agents not revoked whose `last_seen` is after `after` and at most `up_to`: those
    /// last heard of in that window, (id, last seen), by id.
    fn last_seen_between(&self, after: i64, up_to: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Moves this hub past what `agent` has seen (a hub restored from a backup is behind its
    /// agents): its assignment sequence above `sequence` if it is not already, and each
    /// bundle's generation counter to at least the generation given, so none is handed out
    /// again. One transaction; returns whether anything moved.
    fn advance_past(
        &self,
        agent: &str,
        sequence: u64,
        generations: &[(String, u64)],
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Points every release, render and assignment of `bundle` at generation `old` to `new` (the
    /// same body signed again), in one transaction; returns the agents whose assignments changed.
    fn replace_generation(
        &self,
        bundle: &str,
        old: u64,
        new: u64,
        now: i64,
    ) -> Result<Vec<String>, StoreError>;
}
