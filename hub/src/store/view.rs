//! The store's side of the fleet page and API at fleet scale: counts the store computes
//! (agents by phase, by release, by label) and filtered lists read a page at a time, so that
//! what a browser fetches every few seconds does not grow with the fleet.

use outpost_proto::Digest;

use super::{Agent, AssignmentRow, StoreError, StoredStatus};

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
    /// (bundle, phase, agents not revoked) from the last reports; agents assigned a bundle
    /// that never reported it count as `Unknown`.
    pub phases: Vec<(String, String, u64)>,
    /// (bundle, snapshot digest, agents not revoked assigned it).
    pub assigned: Vec<(String, Digest, u64)>,
    /// (key, value, agents not revoked with it).
    pub labels: Vec<(String, String, u64)>,
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
}
