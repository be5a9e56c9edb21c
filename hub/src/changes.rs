//! The hub's bus of what changed and who must look: sources to fetch (all, or one after its
//! webhook), agent connections to re-read the fleet, the rollout loop to step. Also each
//! source's fetch record, for `GET /api/v1/sources`.
//!
//! Threads wait on it with [`Changes::wait_for_fetch`] and [`Changes::wait_for_rollouts`];
//! async tasks subscribe to [`Changes::fleet`].

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Fetch requests, counted: every source's and one source's.
#[derive(Debug, Default)]
struct Requests {
    all: u64,
    per_source: BTreeMap<String, u64>,
}

impl Requests {
    fn for_source(&self, source: &str) -> u64 {
        self.all + self.per_source.get(source).copied().unwrap_or(0)
    }
}

/// One source's fetches so far (since the hub started).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceRecord {
    /// Fetches made.
    pub fetches: u64,
    /// When the last one ended (Unix seconds).
    pub last_fetch_at: Option<i64>,
    /// How long it took.
    pub last_duration_ms: Option<u64>,
    /// Why it failed, if it did.
    pub last_error: Option<String>,
    /// Fetches asked for by the source's webhook.
    pub webhook_requests: u64,
}

/// What changed, for whom.
#[derive(Debug)]
pub struct Changes {
    requests: Mutex<Requests>,
    signal: Condvar,
    /// Ticks when agent connections should look at their agent again.
    pub fleet: tokio::sync::watch::Sender<u64>,
    rollout_requests: Mutex<u64>,
    rollout_signal: Condvar,
    records: Mutex<BTreeMap<String, SourceRecord>>,
}

impl Default for Changes {
    fn default() -> Changes {
        Changes {
            requests: Mutex::default(),
            signal: Condvar::new(),
            fleet: tokio::sync::watch::Sender::new(0),
            rollout_requests: Mutex::default(),
            rollout_signal: Condvar::new(),
            records: Mutex::default(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Changes {
    /// Asks every source to fetch now.
    pub fn fetch_all(&self) {
        lock(&self.requests).all += 1;
        self.signal.notify_all();
    }

    /// Asks one source to fetch now (its webhook): requests arriving close together become one
    /// fetch (see [`Changes::wait_for_fetch`]).
    pub fn fetch_source(&self, source: &str) {
        *lock(&self.requests)
            .per_source
            .entry(source.to_owned())
            .or_default() += 1;
        lock(&self.records)
            .entry(source.to_owned())
            .or_default()
            .webhook_requests += 1;
        self.signal.notify_all();
    }

    /// The requests for `source` so far: pass it to [`Changes::wait_for_fetch`].
    pub fn fetch_requests(&self, source: &str) -> u64 {
        lock(&self.requests).for_source(source)
    }

    /// Waits until `source` is asked to fetch or `timeout` passes. After a request it waits
    /// for `quiet` without another one (at most ten times `quiet`), so a burst of pushes
    /// becomes one fetch. Returns whether it was asked; `seen` is updated.
    pub fn wait_for_fetch(
        &self,
        source: &str,
        seen: &mut u64,
        timeout: Duration,
        quiet: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut requests = lock(&self.requests);
        while requests.for_source(source) == *seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            requests = self
                .signal
                .wait_timeout(requests, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        let settle_by = Instant::now() + quiet * 10;
        loop {
            let count = requests.for_source(source);
            let left = quiet.min(settle_by.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                break;
            }
            requests = self
                .signal
                .wait_timeout_while(requests, left, |requests| {
                    requests.for_source(source) == count
                })
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            if requests.for_source(source) == count {
                break;
            }
        }
        *seen = requests.for_source(source);
        true
    }

    /// Records a finished fetch of `source`.
    pub fn fetched(&self, source: &str, at: i64, took: Duration, error: Option<String>) {
        let mut records = lock(&self.records);
        let record = records.entry(source.to_owned()).or_default();
        record.fetches += 1;
        record.last_fetch_at = Some(at);
        record.last_duration_ms = Some(took.as_millis() as u64);
        record.last_error = error;
    }

    /// Every source's fetch record.
    pub fn records(&self) -> BTreeMap<String, SourceRecord> {
        lock(&self.records).clone()
    }

    /// Tells every agent connection to re-read its agent (revocation, assignments).
    pub fn fleet_changed(&self) {
        self.fleet.send_modify(|tick| *tick += 1);
    }

    /// Wakes the rollout loop (a rollout was created or commanded).
    pub fn rollouts_changed(&self) {
        *lock(&self.rollout_requests) += 1;
        self.rollout_signal.notify_all();
    }

    /// Waits until the rollout loop is woken or `timeout` passes; `seen` is the count it last saw.
    pub fn wait_for_rollouts(&self, seen: &mut u64, timeout: Duration) {
        let requests = lock(&self.rollout_requests);
        let (requests, _) = self
            .rollout_signal
            .wait_timeout_while(requests, timeout, |requests| *requests == *seen)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *seen = *requests;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_burst_of_requests_is_one_wake_and_other_sources_sleep_on() {
        let changes = Arc::new(Changes::default());
        let mut seen = changes.fetch_requests("a");
        let burst = changes.clone();
        let sender = std::thread::spawn(move || {
            for _ in 0..5 {
                burst.fetch_source("a");
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let quiet = Duration::from_millis(200);
        assert!(changes.wait_for_fetch("a", &mut seen, Duration::from_secs(5), quiet));
        sender.join().unwrap();
        assert_eq!(seen, 5, "all five requests taken by one wake");
        assert!(!changes.wait_for_fetch("a", &mut seen, Duration::from_millis(50), quiet));
        let mut other = changes.fetch_requests("b");
        assert!(!changes.wait_for_fetch("b", &mut other, Duration::from_millis(50), quiet));
        changes.fetch_all();
        assert!(changes.wait_for_fetch("b", &mut other, Duration::from_secs(1), Duration::ZERO));
        assert_eq!(changes.records()["a"].webhook_requests, 5);
    }
}
