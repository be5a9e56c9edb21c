//! The store's side of the fleet page and API at fleet scale: counts the store computes
//! (agents by phase, by release, by label) and filtered lists read a page at a time, so that
//! what a browser fetches every few seconds does not grow with the fleet.

use outpost_proto::Digest;

use super::{Agent, AssignmentRow, Event, StoreError, StoredStatus};

/// Which agents a list shows. Every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetFilter {
    /// Labels the agent has (key, value), all of them.
    pub labels: Vec<(String, String)>,
    /// Label keys the agent lacks.
    pub without: Vec<String>,
    /// Assigned this bundle.
    pub bundle: Option<String>,
    /// Reported this phase (for `bundle` when given, else for any bundle), e.g. `Failed`;
    /// `Unknown` selects agents assigned the bundle that never reported it.
    pub phase: Option<String>,
    /// Assigned one of these snapshots (of `bundle` when given): a release by name, resolved
    /// by the caller.
    pub digests: Option<Vec<Digest>>,
    /// The id contains this text.
    pub search: Option<String>,
    /// Some bundle's status says its snapshot expired (`true`), or none does (`false`).
    pub stale: Option<bool>,
    /// Revoked (`true`) or not (`false`).
    pub revoked: Option<bool>,
}

/// One page of agents with what the page shows of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetDetails {
    /// The agents, by id.
    pub agents: Vec<Agent>,
    /// Their assignments, with origin.
    pub assignments: Vec<(AssignmentRow, String)>,
    /// Their last status per bundle.
    pub statuses: Vec<StoredStatus>,
    /// Their drift per bundle, where any was reported.
    pub drift: Vec<DriftState>,
}

/// Where drift stands for one agent and bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DriftState {
    /// The agent.
    pub agent: String,
    /// The bundle.
    pub bundle: String,
    /// Objects drifted and left in place now (`drift: report`).
    pub left_objects: u64,
    /// Since when (hub clock) drift has been left in place, while it is.
    pub left_since: Option<i64>,
    /// Objects found drifted and applied back, in all.
    pub corrected_objects: u64,
    /// When drift was last corrected (hub clock).
    pub corrected_at: Option<i64>,
}

/// Which drift reports to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriftQuery {
    /// Of this agent only.
    pub agent: Option<String>,
    /// Of this bundle only.
    pub bundle: Option<String>,
    /// Received at or after this time (hub clock, Unix seconds).
    pub since: Option<i64>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// One drift report as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriftRecord {
    /// Its id (grows with every report).
    pub id: u64,
    /// The agent.
    pub agent: String,
    /// The bundle.
    pub bundle: String,
    /// The generation enforced.
    pub generation: u64,
    /// `corrected` or `left`.
    pub action: String,
    /// The objects, as the agent reported them.
    pub objects: Vec<outpost_proto::wire::ObjectDrift>,
    /// How many objects drifted in all (more than `objects` holds when the agent cut the list).
    pub total: u64,
    /// When the agent observed it (its clock).
    pub observed_at: i64,
    /// When the hub received it.
    pub received_at: i64,
}

/// Counts over the whole fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetSummary {
    /// Agents enrolled (revoked included).
    pub agents: u64,
    /// Of them revoked.
    pub revoked: u64,
    /// Agents (not revoked) with at least one stale bundle.
    pub stale: u64,
    /// Agents (not revoked) with drift left in place in at least one bundle.
    pub drifted: u64,
    /// (bundle, phase, agents not revoked) from the last reports; agents assigned a bundle
    /// that never reported it count as `Unknown`.
    pub phases: Vec<(String, String, u64)>,
    /// (bundle, snapshot digest, agents not revoked assigned it).
    pub assigned: Vec<(String, Digest, u64)>,
    /// (key, value, agents not revoked with it).
    pub labels: Vec<(String, String, u64)>,
}

/// A parameter of a fleet filter's WHERE clause, before a backend types it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FilterValue {
    /// A text (label key or value, bundle, phase, search).
    Text(String),
    /// A set of snapshot digests.
    Digests(Vec<Digest>),
}

/// What differs between the backends' SQL for a fleet filter.
#[derive(Debug)]
pub(crate) struct FilterDialect {
    /// The placeholder of the n-th parameter (1-based).
    pub placeholder: fn(usize) -> String,
    /// `assignments.digest` is one of a [`FilterValue::Digests`] parameter.
    pub digest_in: fn(&str) -> String,
    /// `a.id` contains a text parameter.
    pub id_contains: fn(&str) -> String,
    /// A `bundle_status` row is stale.
    pub stale: &'static str,
    /// Always true.
    pub truth: &'static str,
}

/// The WHERE clause (over `agents a`) and its parameters for `filter`. Each condition is an
/// `IN` over an index (labels by key and value, assignments by bundle and phase), so the most
/// selective one can drive the query.
pub(crate) fn filter_clause(
    filter: &FleetFilter,
    dialect: &FilterDialect,
) -> (String, Vec<FilterValue>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut values: Vec<FilterValue> = Vec::new();
    let mut bind = |value: FilterValue| {
        values.push(value);
        (dialect.placeholder)(values.len())
    };
    let text = |text: &str| FilterValue::Text(text.to_owned());
    for (key, value) in &filter.labels {
        let (key, value) = (bind(text(key)), bind(text(value)));
        clauses.push(format!(
            "a.id IN (SELECT agent FROM agent_labels WHERE key = {key} AND value = {value})"
        ));
    }
    for key in &filter.without {
        let key = bind(text(key));
        clauses.push(format!(
            "a.id NOT IN (SELECT agent FROM agent_labels WHERE key = {key})"
        ));
    }
    let bundle = filter.bundle.as_deref().map(|bundle| bind(text(bundle)));
    let of_bundle = match &bundle {
        Some(bundle) => format!("bundle = {bundle}"),
        None => dialect.truth.to_owned(),
    };
    match filter.phase.as_deref() {
        Some("Unknown") => clauses.push(format!(
            "a.id IN (SELECT agent FROM assignments WHERE {of_bundle} AND phase IS NULL)"
        )),
        Some(phase) => {
            let phase = bind(text(phase));
            clauses.push(format!(
                "a.id IN (SELECT agent FROM assignments WHERE {of_bundle} AND phase = {phase})"
            ));
        }
        None if bundle.is_some() => clauses.push(format!(
            "a.id IN (SELECT agent FROM assignments WHERE {of_bundle})"
        )),
        None => {}
    }
    if let Some(digests) = &filter.digests {
        let list = bind(FilterValue::Digests(digests.clone()));
        clauses.push(format!(
            "a.id IN (SELECT agent FROM assignments WHERE {of_bundle} AND {})",
            (dialect.digest_in)(&list)
        ));
    }
    if let Some(search) = &filter.search {
        let search = bind(text(search));
        clauses.push((dialect.id_contains)(&search));
    }
    if let Some(stale) = filter.stale {
        let stale_ones = format!(
            "a.id IN (SELECT agent FROM bundle_status WHERE {})",
            dialect.stale
        );
        clauses.push(match stale {
            true => stale_ones,
            false => format!("NOT {stale_ones}"),
        });
    }
    match filter.revoked {
        Some(true) => clauses.push("a.revoked_at IS NOT NULL".to_owned()),
        Some(false) => clauses.push("a.revoked_at IS NULL".to_owned()),
        None => {}
    }
    let clause = match clauses.is_empty() {
        true => String::new(),
        false => format!("WHERE {}", clauses.join(" AND ")),
    };
    (clause, values)
}

impl FleetSummary {
    /// The phases and the snapshots assigned from one scan of the assignments: rows of (bundle,
    /// digest, phase or `Unknown`, agents).
    pub(crate) fn from_assignments(
        (agents, revoked, stale): (u64, u64, u64),
        rows: Vec<(String, Digest, String, u64)>,
        labels: Vec<(String, String, u64)>,
    ) -> FleetSummary {
        let mut phases: std::collections::BTreeMap<(String, String), u64> = Default::default();
        let mut assigned: std::collections::BTreeMap<(String, Digest), u64> = Default::default();
        for (bundle, digest, phase, count) in rows {
            *phases.entry((bundle.clone(), phase)).or_default() += count;
            *assigned.entry((bundle, digest)).or_default() += count;
        }
        let mut assigned: Vec<(String, Digest, u64)> = assigned
            .into_iter()
            .map(|((bundle, digest), count)| (bundle, digest, count))
            .collect();
        assigned.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
        FleetSummary {
            agents,
            revoked,
            stale,
            drifted: 0,
            phases: phases
                .into_iter()
                .map(|((bundle, phase), count)| (bundle, phase, count))
                .collect(),
            assigned,
            labels,
        }
    }
}

/// One page of a filtered list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetPage {
    /// The ids on the page, in id order.
    pub ids: Vec<String>,
    /// How many agents the filter selects in all.
    pub matched: u64,
    /// Whether more follow the page.
    pub more: bool,
}

/// What the fleet views need of a store.
pub trait FleetView {
    /// The ids of the agents `filter` selects, in id order.
    fn fleet_ids(&self, filter: &FleetFilter) -> Result<Vec<String>, StoreError>;
    /// Up to `limit` ids of the agents `filter` selects after `after`, in id order, and how
    /// many it selects in all.
    fn fleet_page(
        &self,
        filter: &FleetFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<FleetPage, StoreError>;
    /// The agents named (those that exist), their assignments and statuses.
    fn fleet_details(&self, ids: &[String]) -> Result<FleetDetails, StoreError>;
    /// Counts over the fleet.
    fn fleet_summary(&self) -> Result<FleetSummary, StoreError>;
    /// Events about `agent` — its enrolment, labels, revocation, staleness, and API writes
    /// naming it — newest first, at most `limit`.
    fn agent_events(&self, agent: &str, limit: usize) -> Result<Vec<Event>, StoreError>;
    /// `agent`'s status reports kept as history, newest first, at most `limit`.
    fn status_history(&self, agent: &str, limit: usize) -> Result<Vec<HistoricStatus>, StoreError>;
    /// The rollouts `agent` is or was a member of, newest first.
    fn rollouts_of(&self, agent: &str) -> Result<Vec<u64>, StoreError>;
    /// Drift reports, newest first.
    fn drift_reports(&self, query: &DriftQuery) -> Result<Vec<DriftRecord>, StoreError>;
}

/// One status report as history keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoricStatus {
    /// Bundle.
    pub bundle: String,
    /// The generation reported on.
    pub generation: u64,
    /// `Applying`, `Healthy`, `Degraded`, `Failed`.
    pub phase: String,
    /// The first problem, if any.
    pub message: String,
    /// When the agent observed it (its clock).
    pub observed_at: i64,
    /// When the hub received it.
    pub received_at: i64,
}

/// The objects of a stored drift report.
pub(crate) fn drift_findings(
    text: &str,
) -> Result<Vec<outpost_proto::wire::ObjectDrift>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("stored drift findings: {error}")))
}

/// The columns of `drift_state` a [`DriftState`] is read from, in order.
pub(crate) const DRIFT_STATE_COLUMNS: &str =
    "agent, bundle, left_objects, left_since, corrected_objects, corrected_at";

/// The columns of `drift_reports` a [`DriftRecord`] is read from, in order.
pub(crate) const DRIFT_REPORT_COLUMNS: &str =
    "id, agent, bundle, generation, action, objects, findings, observed_at, received_at";

/// The API-write events naming an agent carry this in their message.
pub(crate) fn agent_path(agent: &str) -> String {
    format!("/agents/{agent}")
}
