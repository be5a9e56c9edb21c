//! The hub's bus of what changed and who must look: sources to fetch (all, or one after its
//! webhook), agent connections to re-read their agent (one, some, or all), the rollout loop to
//! step. Also each source's fetch record, for `GET /api/v1/sources`.
//!
//! Everything waits on it asynchronously, on tokio's clock, so the simulator's paused time
//! drives the hub's loops like real time does.
//!
//! With replicas, what only the leader acts on (fetches, agents to assign, rollouts to step,
//! a change for the whole fleet) is also relayed to the others as a [`Signal`]; a signal heard
//! from another replica is [`Changes::apply`]ed here without being relayed again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

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

/// A change another replica must hear of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Signal {
    /// Every source should fetch.
    FetchAll,
    /// One source should fetch (its webhook).
    FetchSource {
        /// Its name.
        source: String,
    },
    /// Agents to assign (enrolled, relabelled).
    Assign {
        /// Their ids.
        agents: Vec<String>,
    },
    /// Rollouts should be stepped.
    Rollouts,
    /// Every agent connection should look at its agent again.
    Fleet,
    /// An API token was revoked: cached token checks are stale.
    TokensRevoked,
}

/// What changed, for whom.
#[derive(Debug)]
pub struct Changes {
    /// Where signals for other replicas go (none: one hub).
    relay: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Signal>>>,
    requests: Mutex<Requests>,
    requested: Notify,
    rollout_requests: Mutex<u64>,
    rollouts_requested: Notify,
    /// Ticks when every agent connection should look at its agent again.
    pub fleet: tokio::sync::watch::Sender<u64>,
    agents: Mutex<HashMap<String, Arc<Notify>>>,
    /// Per source: agents to assign (new, or relabelled).
    pending: Mutex<BTreeMap<String, Vec<String>>>,
    records: Mutex<BTreeMap<String, SourceRecord>>,
    /// Token revocations seen, here or on another replica.
    token_revocations: AtomicU64,
}

/// Why a source loop woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Its poll interval passed.
    Poll,
    /// Someone asked it to fetch (fetch-now, its webhook).
    Fetch,
    /// Agents are waiting to be assigned (enrolled or relabelled); no fetch needed.
    Agents,
}

impl Default for Changes {
    fn default() -> Changes {
        Changes {
            relay: Mutex::default(),
            requests: Mutex::default(),
            requested: Notify::new(),
            rollout_requests: Mutex::default(),
            rollouts_requested: Notify::new(),
            fleet: tokio::sync::watch::Sender::new(0),
            agents: Mutex::default(),
            pending: Mutex::default(),
            records: Mutex::default(),
            token_revocations: AtomicU64::new(0),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An agent connection's place on the bus; dropped when it closes.
#[derive(Debug)]
pub struct AgentSubscription {
    changes: Arc<Changes>,
    agent: String,
    notify: Arc<Notify>,
}

impl AgentSubscription {
    /// Waits until something changed for this agent.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for AgentSubscription {
    fn drop(&mut self) {
        let mut agents = lock(&self.changes.agents);
        if agents
            .get(&self.agent)
            .is_some_and(|notify| Arc::ptr_eq(notify, &self.notify))
        {
            agents.remove(&self.agent);
        }
    }
}

/// Waits for `notify` unless `check` already holds; returns whether it holds before `until`.
async fn wait_until(notify: &Notify, until: Instant, mut check: impl FnMut() -> bool) -> bool {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if check() {
            return true;
        }
        tokio::select! {
            () = &mut notified => {}
            () = tokio::time::sleep_until(until) => return check(),
        }
    }
}

impl Changes {
    /// Sends what other replicas must hear of to `relay` from now on.
    pub fn relay_to(&self, relay: tokio::sync::mpsc::UnboundedSender<Signal>) {
        *lock(&self.relay) = Some(relay);
    }

    fn relay(&self, signal: Signal) {
        if let Some(relay) = lock(&self.relay).as_ref() {
            let _ = relay.send(signal);
        }
    }

    /// Acts on a signal from another replica (not relayed again).
    pub fn apply(&self, signal: Signal) {
        match signal {
            Signal::FetchAll => self.local_fetch_all(),
            Signal::FetchSource { source } => self.local_fetch_source(&source),
            Signal::Assign { agents } => self.local_agents_to_assign(&agents),
            Signal::Rollouts => self.local_rollouts_changed(),
            Signal::Fleet => self.local_fleet_changed(),
            Signal::TokensRevoked => self.local_token_revoked(),
        }
    }

    /// Asks every source to fetch now.
    pub fn fetch_all(&self) {
        self.local_fetch_all();
        self.relay(Signal::FetchAll);
    }

    fn local_fetch_all(&self) {
        lock(&self.requests).all += 1;
        self.requested.notify_waiters();
    }

    /// Asks one source to fetch now (its webhook): requests arriving close together become one
    /// fetch (see [`Changes::wait_for_fetch`]).
    pub fn fetch_source(&self, source: &str) {
        self.local_fetch_source(source);
        self.relay(Signal::FetchSource {
            source: source.to_owned(),
        });
    }

    fn local_fetch_source(&self, source: &str) {
        *lock(&self.requests)
            .per_source
            .entry(source.to_owned())
            .or_default() += 1;
        lock(&self.records)
            .entry(source.to_owned())
            .or_default()
            .webhook_requests += 1;
        self.requested.notify_waiters();
    }

    /// The requests for `source` so far: pass it to [`Changes::wait_for_fetch`].
    pub fn fetch_requests(&self, source: &str) -> u64 {
        lock(&self.requests).for_source(source)
    }

    /// Waits until `source` is asked to fetch or `timeout` passes. After a request it waits
    /// for `quiet` without another one (at most ten times `quiet`), so a burst of pushes
    /// becomes one fetch. Returns whether it was asked; `seen` is updated.
    pub async fn wait_for_fetch(
        &self,
        source: &str,
        seen: &mut u64,
        timeout: Duration,
        quiet: Duration,
    ) -> bool {
        self.wait_for_work(source, seen, timeout, quiet).await == Wake::Fetch
    }

    fn pending_for(&self, source: &str) -> usize {
        lock(&self.pending).get(source).map_or(0, Vec::len)
    }

    /// Waits until `source` has work: a fetch asked for, agents to assign, or its poll
    /// interval (`timeout`) passed. Requests arriving within `quiet` of each other (at most
    /// ten times `quiet` in all) are taken together, so a burst of pushes is one fetch and an
    /// enrolment storm is assigned in batches. `seen` is updated.
    pub async fn wait_for_work(
        &self,
        source: &str,
        seen: &mut u64,
        timeout: Duration,
        quiet: Duration,
    ) -> Wake {
        let woke = wait_until(&self.requested, Instant::now() + timeout, || {
            self.fetch_requests(source) != *seen || self.pending_for(source) > 0
        })
        .await;
        if !woke {
            return Wake::Poll;
        }
        let settle_by = Instant::now() + quiet * 10;
        loop {
            let (count, pending) = (self.fetch_requests(source), self.pending_for(source));
            let until = (Instant::now() + quiet).min(settle_by);
            if until <= Instant::now() {
                break;
            }
            let more = wait_until(&self.requested, until, || {
                self.fetch_requests(source) != count || self.pending_for(source) != pending
            })
            .await;
            if !more {
                break;
            }
        }
        let asked = self.fetch_requests(source) != *seen;
        *seen = self.fetch_requests(source);
        match asked {
            true => Wake::Fetch,
            false => Wake::Agents,
        }
    }

    /// Declares the sources that assign agents (each gets every enrolled or relabelled agent).
    pub fn add_source(&self, source: &str) {
        lock(&self.pending).entry(source.to_owned()).or_default();
    }

    /// Agents to assign again (enrolled, or relabelled): every source's loop hears of them.
    pub fn agents_to_assign(&self, agents: &[String]) {
        self.local_agents_to_assign(agents);
        self.relay(Signal::Assign {
            agents: agents.to_vec(),
        });
    }

    fn local_agents_to_assign(&self, agents: &[String]) {
        let mut pending = lock(&self.pending);
        for queue in pending.values_mut() {
            queue.extend(agents.iter().cloned());
        }
        drop(pending);
        self.requested.notify_waiters();
    }

    /// The agents waiting to be assigned by `source`, taken.
    pub fn take_agents(&self, source: &str) -> Vec<String> {
        lock(&self.pending)
            .get_mut(source)
            .map(std::mem::take)
            .unwrap_or_default()
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

    /// Puts an agent connection on the bus: [`Changes::agents_changed`] naming it wakes it.
    /// A newer subscription of the same agent takes over.
    pub fn subscribe(self: &Arc<Changes>, agent: &str) -> AgentSubscription {
        let notify = Arc::new(Notify::new());
        lock(&self.agents).insert(agent.to_owned(), notify.clone());
        AgentSubscription {
            changes: self.clone(),
            agent: agent.to_owned(),
            notify,
        }
    }

    /// Tells these agents' connections (if they are connected) to look at their agent again.
    pub fn agents_changed<'a>(&self, agents: impl IntoIterator<Item = &'a String>) {
        let subscribed = lock(&self.agents);
        for agent in agents {
            if let Some(notify) = subscribed.get(agent) {
                notify.notify_one();
            }
        }
    }

    /// Tells every agent connection to look at its agent again (after a change that concerns
    /// everyone).
    pub fn fleet_changed(&self) {
        self.local_fleet_changed();
        self.relay(Signal::Fleet);
    }

    fn local_fleet_changed(&self) {
        self.fleet.send_modify(|tick| *tick += 1);
    }

    /// Records an enrolment: the source loops render what the new agent needs and assign it.
    pub fn agent_enrolled(&self, agent: &str) {
        self.agents_to_assign(&[agent.to_owned()]);
    }

    /// Records that an API token was revoked, so that every replica stops trusting the token
    /// checks it cached (see [`Changes::token_revocations`]).
    pub fn token_revoked(&self) {
        self.local_token_revoked();
        self.relay(Signal::TokensRevoked);
    }

    fn local_token_revoked(&self) {
        self.token_revocations.fetch_add(1, Ordering::SeqCst);
    }

    /// How many token revocations this replica has heard of: a token check cached under an
    /// older count is not to be used.
    pub fn token_revocations(&self) -> u64 {
        self.token_revocations.load(Ordering::SeqCst)
    }

    /// Wakes the rollout loop (a rollout was created or commanded).
    pub fn rollouts_changed(&self) {
        self.local_rollouts_changed();
        self.relay(Signal::Rollouts);
    }

    fn local_rollouts_changed(&self) {
        *lock(&self.rollout_requests) += 1;
        self.rollouts_requested.notify_waiters();
    }

    /// Waits until the rollout loop is woken or `timeout` passes; `seen` is the count it last saw.
    pub async fn wait_for_rollouts(&self, seen: &mut u64, timeout: Duration) {
        wait_until(&self.rollouts_requested, Instant::now() + timeout, || {
            *lock(&self.rollout_requests) != *seen
        })
        .await;
        *seen = *lock(&self.rollout_requests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_requests_is_one_wake_and_other_sources_sleep_on() {
        let changes = Arc::new(Changes::default());
        let mut seen = changes.fetch_requests("a");
        let burst = changes.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                burst.fetch_source("a");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let quiet = Duration::from_millis(200);
        assert!(
            changes
                .wait_for_fetch("a", &mut seen, Duration::from_secs(5), quiet)
                .await
        );
        assert_eq!(seen, 5, "all five requests taken by one wake");
        assert!(
            !changes
                .wait_for_fetch("a", &mut seen, Duration::from_millis(50), quiet)
                .await
        );
        let mut other = changes.fetch_requests("b");
        assert!(
            !changes
                .wait_for_fetch("b", &mut other, Duration::from_millis(50), quiet)
                .await
        );
        changes.fetch_all();
        assert!(
            changes
                .wait_for_fetch("b", &mut other, Duration::from_secs(1), Duration::ZERO)
                .await
        );
        assert_eq!(changes.records()["a"].webhook_requests, 5);
    }

    #[test]
    fn a_token_revocation_reaches_the_other_replicas_once() {
        let (here, there) = (Changes::default(), Changes::default());
        let (relay, mut relayed) = tokio::sync::mpsc::unbounded_channel();
        here.relay_to(relay);
        let (other_relay, mut relayed_again) = tokio::sync::mpsc::unbounded_channel();
        there.relay_to(other_relay);
        here.token_revoked();
        assert_eq!(here.token_revocations(), 1);
        let signal = relayed.try_recv().expect("the revocation is relayed");
        // As it crosses between replicas.
        let signal: Signal =
            serde_json::from_str(&serde_json::to_string(&signal).unwrap()).unwrap();
        assert_eq!(signal, Signal::TokensRevoked);
        assert_eq!(there.token_revocations(), 0);
        there.apply(signal);
        assert_eq!(there.token_revocations(), 1);
        assert!(relayed_again.try_recv().is_err(), "not relayed back");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_agents_named_are_woken() {
        let changes = Arc::new(Changes::default());
        let (a, b) = (changes.subscribe("a"), changes.subscribe("b"));
        changes.agents_changed(&["a".to_owned(), "nobody".to_owned()]);
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .expect("a is woken");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), b.changed())
                .await
                .is_err(),
            "b is not"
        );
        // A newer subscription takes over; the old one leaving does not remove it.
        let newer = changes.subscribe("a");
        drop(a);
        changes.agents_changed(&["a".to_owned()]);
        tokio::time::timeout(Duration::from_secs(1), newer.changed())
            .await
            .expect("the newer subscription is woken");
    }
}
