//! Replicas of one hub on one shared store (PostgreSQL): the lease loop that makes one of them
//! the leader, the follower that wakes this replica's agent connections when another replica
//! changed what they should run, and the relay that tells the others what only the leader acts
//! on. See `store::replicas` for the lease and its fencing.
//!
//! Every replica serves agents and the admin API. The leader alone runs the Git sync with
//! rendering, the rollout driver, signing again and retention; its loops wait while this
//! replica does not lead, and start afresh (every agent assigned again, the rollout driver's
//! memory dropped) each time it takes the lease.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::changes::{Changes, Signal};
use crate::store::{Fence, HubStore, Lease, Notice, ReplicaStore};

/// How a hub runs as one of several replicas.
#[derive(Debug, Clone)]
pub struct Replication {
    /// The shared store, as replicas use it.
    pub store: Arc<dyn ReplicaStore>,
    /// This replica's name in the lease (unique per process: see [`replica_name`]).
    pub holder: String,
    /// How long the lease lasts unless renewed (renewed every fifth of it).
    pub lease: Duration,
    /// How often the change feed is read when no notice arrives.
    pub feed_poll: Duration,
}

impl Replication {
    /// Defaults: a 10 s lease (another replica leads within about 12 s of the leader's death),
    /// the change feed read at least every 2 s.
    pub fn new(store: Arc<dyn ReplicaStore>) -> Replication {
        Replication {
            store,
            holder: replica_name(),
            lease: Duration::from_secs(10),
            feed_poll: Duration::from_secs(2),
        }
    }
}

/// `host:pid:random`: unique for every process, so two replicas never take one lease for
/// theirs.
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "hub".to_owned());
    let mut random = [0u8; 3];
    let _ = getrandom::fill(&mut random);
    format!("{host}:{}:{}", std::process::id(), hex::encode(random))
}

/// Leadership as the loops see it: the epoch held (0: not leading).
pub type Leading = watch::Receiver<i64>;

/// Waits until this replica leads; returns the epoch it leads at.
pub async fn leading(watch: &mut Leading) -> i64 {
    loop {
        let epoch = *watch.borrow_and_update();
        if epoch > 0 {
            return epoch;
        }
        if watch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Whether this replica leads right now.
pub fn is_leading(watch: &Leading) -> bool {
    *watch.borrow() > 0
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(work).await.ok()
}

/// Takes or renews the lease every fifth of its lifetime; publishes the epoch held (and sets
/// it on `fence`, which the leader's writes are checked against). When the store cannot be
/// reached for a whole lease lifetime, this replica steps down: another may lead by then.
pub async fn lease_loop(replication: Replication, fence: Arc<Fence>, leading: watch::Sender<i64>) {
    let renew = (replication.lease / 5).max(Duration::from_millis(100));
    let mut last_held: Option<tokio::time::Instant> = None;
    let mut last_holder = String::new();
    loop {
        let (store, holder, ttl) = (
            replication.store.clone(),
            replication.holder.clone(),
            replication.lease,
        );
        let attempt = tokio::time::Instant::now();
        match blocking(move || store.acquire_lease(&holder, ttl)).await {
            Some(Ok(Lease::Held { epoch })) => {
                if fence.epoch() != epoch {
                    tracing::info!(replica = %replication.holder, epoch, "leading: this replica runs the Git sync and the rollouts");
                }
                fence.set_epoch(epoch);
                last_held = Some(attempt);
                leading.send_if_modified(|held| std::mem::replace(held, epoch) != epoch);
            }
            Some(Ok(Lease::Taken { holder, .. })) => {
                if fence.epoch() != 0 {
                    tracing::warn!(replica = %replication.holder, leader = %holder, "lost the lease; following");
                } else if holder != last_holder {
                    tracing::info!(replica = %replication.holder, leader = %holder, "following the leader");
                }
                last_holder = holder;
                fence.set_epoch(0);
                last_held = None;
                leading.send_if_modified(|held| std::mem::replace(held, 0) != 0);
            }
            outcome => {
                let error = match outcome {
                    Some(Err(error)) => error.to_string(),
                    _ => "the lease task failed".to_owned(),
                };
                tracing::warn!(replica = %replication.holder, %error, "cannot renew the lease");
                if last_held.is_some_and(|at| at.elapsed() >= replication.lease) {
                    tracing::warn!(replica = %replication.holder, "stepping down: the lease ran out while the store was unreachable");
                    fence.set_epoch(0);
                    last_held = None;
                    leading.send_if_modified(|held| std::mem::replace(held, 0) != 0);
                }
            }
        }
        tokio::time::sleep(renew.saturating_sub(attempt.elapsed())).await;
    }
}

/// A signal as it crosses between replicas.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Envelope {
    from: String,
    signal: Signal,
}

/// Agents per signal (a notice carries at most 8000 bytes).
const AGENTS_PER_SIGNAL: usize = 100;

/// Sends what `changes` relays to the other replicas.
pub async fn relay_loop(
    replication: Replication,
    mut signals: tokio::sync::mpsc::UnboundedReceiver<Signal>,
) {
    while let Some(signal) = signals.recv().await {
        let parts = match signal {
            Signal::Assign { agents } => agents
                .chunks(AGENTS_PER_SIGNAL)
                .map(|chunk| Signal::Assign {
                    agents: chunk.to_vec(),
                })
                .collect(),
            other => vec![other],
        };
        for signal in parts {
            let envelope = Envelope {
                from: replication.holder.clone(),
                signal,
            };
            let Ok(payload) = serde_json::to_string(&envelope) else {
                continue;
            };
            let store = replication.store.clone();
            if let Some(Err(error)) = blocking(move || store.signal(&payload)).await {
                tracing::warn!(%error, "could not tell the other replicas; they find out at their next poll");
            }
        }
    }
}

/// Wakes this replica's agent connections for what the change feed names (whoever wrote
/// it), at every notice and at least every `feed_poll`; applies other replicas' signals.
pub async fn follow_loop(
    replication: Replication,
    store: Arc<dyn HubStore>,
    changes: Arc<Changes>,
) {
    let mut notices = replication.store.notices();
    let mut cursor = loop {
        let reading = store.clone();
        match blocking(move || reading.change_cursor()).await {
            Some(Ok(cursor)) => break cursor,
            Some(Err(error)) => tracing::warn!(%error, "cannot read the change feed; retrying"),
            None => {}
        }
        tokio::time::sleep(replication.feed_poll).await;
    };
    loop {
        let mut read_feed = false;
        let mut handle = |notice: Result<Notice, tokio::sync::broadcast::error::RecvError>| {
            match notice {
                Ok(Notice::Signal(payload)) => match serde_json::from_str::<Envelope>(&payload) {
                    Ok(envelope) if envelope.from == replication.holder => {}
                    Ok(envelope) => changes.apply(envelope.signal),
                    Err(error) => {
                        tracing::debug!(%error, "a signal that does not decode, ignored")
                    }
                },
                Ok(Notice::Changes | Notice::Reconnected) => read_feed = true,
                // Missed some: the feed has them all.
                Err(_) => read_feed = true,
            }
        };
        let first = tokio::time::timeout(replication.feed_poll, notices.recv())
            .await
            // Nothing heard for a while: read the feed anyway.
            .unwrap_or(Ok(Notice::Changes));
        handle(first);
        while let Ok(notice) = notices.try_recv() {
            handle(Ok(notice));
        }
        if !read_feed {
            continue;
        }
        let reading = store.clone();
        match blocking(move || reading.changes_since(cursor)).await {
            Some(Ok(feed)) => {
                cursor = feed.cursor;
                if !feed.agents.is_empty() {
                    changes.agents_changed(&feed.agents);
                }
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot read the change feed; retrying");
                tokio::time::sleep(replication.feed_poll).await;
            }
            None => {}
        }
    }
}
