//! What hub replicas sharing one store need of it: a leader lease, fencing, and a way to wake
//! each other.
//!
//! Exactly one replica at a time runs the Git sync, rendering, the rollout driver, key refresh
//! and retention: the one holding the lease. A replica renews it well within its lifetime;
//! one that dies or stalls loses it when it runs out, and another takes it with a larger
//! epoch. The leader's loops write through a [`Fence`]d store: a write commits only if, inside
//! its own transaction, the lease is still held at the fence's epoch, so a replica that lost
//! the lease (paused, cut off, slow) cannot write a decision afterwards.
//!
//! Replicas wake each other through the store: every write that stamps the change feed
//! notifies the others, which read the feed and wake the agents it names; requests that only
//! the leader can act on (fetch a source, assign new agents, step rollouts) travel as signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::{HubStore, StoreError};

/// The lease as a fenced store checks it: who, and at which epoch (0: not held).
#[derive(Debug)]
pub struct Fence {
    holder: String,
    epoch: AtomicI64,
}

impl Fence {
    /// A fence for `holder`, not yet holding the lease.
    pub fn new(holder: &str) -> Fence {
        Fence {
            holder: holder.to_owned(),
            epoch: AtomicI64::new(0),
        }
    }

    /// Who.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The epoch held (0: none).
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Records the epoch held (0: none).
    pub fn set_epoch(&self, epoch: i64) {
        self.epoch.store(epoch, Ordering::SeqCst);
    }
}

/// The outcome of asking for the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// Held (taken or renewed) at this epoch.
    Held {
        /// Grows with every change of holder.
        epoch: i64,
    },
    /// Another replica holds it.
    Taken {
        /// Who.
        holder: String,
        /// For how much longer, unless renewed (milliseconds).
        expires_in_ms: i64,
    },
}

/// What a replica hears from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The change feed moved: read it.
    Changes,
    /// A signal another replica sent (its payload).
    Signal(String),
    /// The connection that listens was (re)made: notices may have been missed, read the feed.
    Reconnected,
}

/// A store shared by replicas.
pub trait ReplicaStore: Send + Sync + std::fmt::Debug {
    /// Takes the lease for `holder` if it is free or ran out, or renews it if `holder` has it,
    /// for `ttl` from now (the database's clock).
    fn acquire_lease(&self, holder: &str, ttl: Duration) -> Result<Lease, StoreError>;
    /// Gives the lease up now if `holder` has it (a replica stopping), so another takes over
    /// at once.
    fn release_lease(&self, holder: &str) -> Result<(), StoreError>;
    /// The store whose writes commit only while `fence` names the lease as it is.
    fn fenced(&self, fence: Arc<Fence>) -> Arc<dyn HubStore>;
    /// Sends `payload` to every replica listening (this one included).
    fn signal(&self, payload: &str) -> Result<(), StoreError>;
    /// What the other replicas say, from now on.
    fn notices(&self) -> tokio::sync::broadcast::Receiver<Notice>;
}
