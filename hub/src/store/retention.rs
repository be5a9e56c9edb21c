//! Retention: what the store forgets, and what it never does. Events and status history go by
//! age and by count; delta bases beyond the few newest per agent and bundle go; snapshots go
//! when nothing can need them — not assigned, not released, not among the newest generations
//! of their bundle, not a base an agent may hold for deltas, not what a rollout could release
//! or give back — and a body goes with the last snapshot that has it.

use super::StoreError;

/// How long things are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events older than this many seconds are deleted…
    pub events_age: i64,
    /// …and the oldest beyond this many.
    pub events_max: u64,
    /// Status history older than this many seconds is deleted…
    pub history_age: i64,
    /// …and the oldest beyond this many reports.
    pub history_max: u64,
    /// The newest generations of each bundle kept whatever references them.
    pub snapshots_kept: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            events_age: 90 * 86_400,
            events_max: 1_000_000,
            history_age: 30 * 86_400,
            history_max: 1_000_000,
            snapshots_kept: 10,
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Events.
    pub events: u64,
    /// Status history rows.
    pub status_history: u64,
    /// Drift reports (kept like the status history).
    pub drift_reports: u64,
    /// Delta bases past the newest few per agent and bundle.
    pub delta_bases: u64,
    /// Snapshots (signed headers of a generation).
    pub snapshots: u64,
    /// Memos of renders whose snapshot went.
    pub renders: u64,
    /// Bodies no snapshot has any more.
    pub bodies: u64,
}

impl Pruned {
    /// Whether anything was deleted.
    pub fn is_empty(&self) -> bool {
        *self == Pruned::default()
    }
}

/// What retention needs of a store. Deleting runs in small transactions, so a pass over a big
/// store does not hold up the writes of serving agents.
pub trait RetentionStore {
    /// One pass of `policy` at `now`.
    fn prune(&self, policy: &Retention, now: i64) -> Result<Pruned, StoreError>;
}
