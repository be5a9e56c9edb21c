//! The reconcile loop: keeps the cluster at the snapshots the agent holds, on its own clock,
//! whether or not the hub is reachable.
//!
//! Per assigned bundle it enforces the assigned snapshot once held (until then the newest held
//! one), in the body's order (Namespaces, CRDs, the rest):
//! 1. objects are resolved against the cluster's API and written to the inventory in one
//!    transaction *before* they are applied, so a crash can never leave an object the agent
//!    does not know it created;
//! 2. each object is server-side applied (field manager `outpost-agent`, forced or not as
//!    configured) with the label `outpost.io/bundle=<bundle>`; after a CRD the loop waits until
//!    it is Established and refreshes discovery before its custom resources;
//! 3. a failing object is retried with its own backoff while the others go on; an unreachable
//!    API stops the pass and is retried with backoff;
//! 4. once every object applied, objects that left the snapshot are pruned: those in the
//!    inventory and those the cluster lists with the bundle label (only the inventory's kinds),
//!    deleted in reverse apply order, and only if they carry the bundle's label — the agent
//!    never deletes what it did not create;
//! 5. health is read from what the API returns, then polled while objects progress;
//! 6. a status (Applying, Healthy, Degraded, Failed, counts, the first problem) is queued in
//!    the outbox whenever it changes.
//!
//! Everything is re-applied every `drift_interval` (server-side apply of an unchanged object
//! writes nothing), which corrects drift. Bundles no longer assigned are pruned entirely.
//!
//! Drift is also reported (see [`crate::drift`]): once an object was applied (in this run, or
//! the bundle's last status says its snapshot was), each full pass reads it before applying
//! and compares. Objects whose drift mode is `correct` are applied and the difference is
//! queued as a `Corrected` drift report; objects in `report` mode get a dry-run apply instead,
//! the live change stays, and the set of such differences is queued as `Left` whenever it
//! changes (an empty set once Git or the cluster made it go away).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outpost_proto::wire::{
    BundleDrift, BundleStatus, DriftAction, HeldSnapshot, ObjectDrift, Phase,
};
use outpost_proto::{Digest, VerifiedSnapshot};
use serde_json::Value;
use tokio::time::Instant;

use crate::client::{Client, backoff_delay, next_random, unix_now};
use crate::drift::{self, Mode};
use crate::health::{Health, assess};
use crate::state::StateError;
use crate::target::{BUNDLE_LABEL, ClusterTarget, ObjectRef, TargetError};

/// How the loop behaves.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Server-side apply field manager.
    pub field_manager: String,
    /// Take over fields another manager owns (drift correction against `kubectl edit` needs it).
    pub force_conflicts: bool,
    /// Re-apply everything this often.
    pub drift_interval: Duration,
    /// Re-read progressing objects this often.
    pub health_poll: Duration,
    /// After this long, objects still progressing make the bundle Degraded.
    pub health_timeout: Duration,
    /// First retry of a failing object (or an unreachable API).
    pub retry_min: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
    /// How long to wait for a CRD to be Established.
    pub crd_timeout: Duration,
    /// Seed for retry jitter.
    pub seed: u64,
}

impl Default for ReconcileOptions {
    fn default() -> ReconcileOptions {
        ReconcileOptions {
            field_manager: "outpost-agent".to_owned(),
            force_conflicts: true,
            drift_interval: Duration::from_secs(300),
            health_poll: Duration::from_secs(5),
            health_timeout: Duration::from_secs(600),
            retry_min: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            crd_timeout: Duration::from_secs(60),
            seed: 0,
        }
    }
}

/// Figures the loop keeps.
#[derive(Debug, Default)]
pub struct ReconcileCounters {
    /// Passes run.
    pub passes: AtomicU64,
    /// Objects applied (successful apply calls).
    pub applied: AtomicU64,
    /// Apply calls that failed.
    pub failed: AtomicU64,
    /// Objects deleted by pruning.
    pub pruned: AtomicU64,
    /// Status reports queued.
    pub reports: AtomicU64,
    /// Re-applies of the same snapshot that changed the object: someone else had changed a
    /// field the agent manages (or deleted the object), and the apply put it back. Counted by
    /// the object's `metadata.generation`, or its `resourceVersion` for kinds without one.
    pub drift_corrected: AtomicU64,
    /// Objects found drifted and left in place (`drift: report`), counted when reported.
    pub drift_left: AtomicU64,
    /// Drift reports queued.
    pub drift_reports: AtomicU64,
    /// Unix seconds of the last full apply of a bundle that applied every object (0: none yet).
    pub last_success: std::sync::atomic::AtomicI64,
    /// Whether the last call to the cluster found it unreachable.
    pub cluster_unreachable: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone)]
struct ObjectState {
    reference: Option<ObjectRef>,
    health: Health,
    error: Option<String>,
    /// What the last apply of this snapshot left: (generation, resourceVersion).
    applied: Option<(Option<i64>, String)>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    retry_at: Instant,
}

/// What the loop knows about one bundle's enforced snapshot.
#[derive(Debug)]
struct BundleRun {
    digest: Digest,
    generation: u64,
    expires_at: Option<i64>,
    started: Instant,
    /// The canonical body; objects are parsed from it for each full pass only, so an idle
    /// agent holds bytes, not trees.
    body: outpost_proto::Body,
    states: Vec<ObjectState>,
    backoff: HashMap<usize, Backoff>,
    last_full: Option<Instant>,
    last_poll: Option<Instant>,
    cluster_error: Option<String>,
    body_error: Option<String>,
    /// What was reported last: digest, generation, phase, ready, message, stale.
    reported: Option<(Digest, u64, Phase, u64, String, bool)>,
    /// The bundle's last status says this snapshot was applied before (an earlier run of the
    /// agent): the first pass already looks for drift.
    applied_before: bool,
    /// Drift found by the last full pass, to be reported: per object, its mode and drift; and
    /// whether the pass visited every object.
    drift: Option<(Vec<(Mode, ObjectDrift)>, bool)>,
}

impl BundleRun {
    fn new(snapshot: &VerifiedSnapshot) -> BundleRun {
        let body = snapshot.body().clone();
        let count = body.object_count() as usize;
        let states = (0..count)
            .map(|_| ObjectState {
                reference: None,
                health: Health::Progressing("not applied yet".to_owned()),
                error: None,
                applied: None,
            })
            .collect();
        let header = snapshot.header();
        BundleRun {
            digest: snapshot.digest(),
            generation: header.generation,
            expires_at: header.expires_at,
            started: Instant::now(),
            body,
            states,
            backoff: HashMap::new(),
            last_full: None,
            last_poll: None,
            cluster_error: None,
            body_error: None,
            reported: None,
            applied_before: false,
            drift: None,
        }
    }

    /// The desired objects, labelled for `bundle`, parsed from the body.
    fn objects(&mut self, bundle: &str) -> Vec<Value> {
        let mut objects = Vec::with_capacity(self.states.len());
        for object in self.body.objects() {
            match object {
                Ok(mut object) => {
                    if !object["metadata"]["labels"].is_object() {
                        object["metadata"]["labels"] = Value::Object(Default::default());
                    }
                    object["metadata"]["labels"][BUNDLE_LABEL] = Value::String(bundle.to_owned());
                    objects.push(object);
                }
                Err(error) => self.body_error = Some(error.to_string()),
            }
        }
        objects.truncate(self.states.len());
        objects
    }

    fn progressing(&self) -> bool {
        self.states
            .iter()
            .any(|state| state.error.is_none() && matches!(state.health, Health::Progressing(_)))
    }

    fn all_applied(&self) -> bool {
        self.body_error.is_none()
            && self
                .states
                .iter()
                .all(|state| state.error.is_none() && state.reference.is_some())
    }

    fn name(&self, index: usize) -> String {
        self.states[index]
            .reference
            .as_ref()
            .map_or_else(|| format!("object {}", index + 1), ToString::to_string)
    }

    /// Phase, objects ready, and the first problem.
    fn phase(&self, health_timeout: Duration) -> (Phase, u64, String) {
        let ready = self
            .states
            .iter()
            .filter(|state| state.error.is_none() && state.health == Health::Ready)
            .count() as u64;
        if let Some(error) = self.cluster_error.as_ref().or(self.body_error.as_ref()) {
            return (Phase::Failed, ready, error.clone());
        }
        let failed: Vec<usize> = (0..self.states.len())
            .filter(|&i| self.states[i].error.is_some())
            .collect();
        if let Some(&first) = failed.first() {
            let error = self.states[first].error.clone().unwrap_or_default();
            return (
                Phase::Failed,
                ready,
                format!(
                    "{} of {} objects failed to apply; {}: {error}",
                    failed.len(),
                    self.states.len(),
                    self.name(first)
                ),
            );
        }
        let failing = self
            .states
            .iter()
            .enumerate()
            .find_map(|(i, state)| match &state.health {
                Health::Failed(message) => Some((i, message)),
                _ => None,
            });
        if let Some((index, message)) = failing {
            return (
                Phase::Degraded,
                ready,
                format!("{}: {message}", self.name(index)),
            );
        }
        let progressing =
            self.states
                .iter()
                .enumerate()
                .find_map(|(i, state)| match &state.health {
                    Health::Progressing(message) => Some((i, message)),
                    _ => None,
                });
        if let Some((index, message)) = progressing {
            if self.started.elapsed() >= health_timeout {
                return (
                    Phase::Degraded,
                    ready,
                    format!(
                        "{}: not ready after {}s: {message}",
                        self.name(index),
                        health_timeout.as_secs()
                    ),
                );
            }
            return (
                Phase::Applying,
                ready,
                format!("{}: {message}", self.name(index)),
            );
        }
        (Phase::Healthy, ready, String::new())
    }
}

/// The reconcile loop for one cluster.
#[derive(Debug)]
pub struct Reconciler<T> {
    client: Client,
    target: Arc<T>,
    options: ReconcileOptions,
    bundles: BTreeMap<String, BundleRun>,
    counters: Arc<ReconcileCounters>,
    cluster_failures: u32,
    cluster_retry_at: Option<Instant>,
    random: u64,
}

impl<T: ClusterTarget> Reconciler<T> {
    /// A loop reconciling `target` against the snapshots `client`'s state holds.
    pub fn new(client: Client, target: Arc<T>, options: ReconcileOptions) -> Reconciler<T> {
        let random = options.seed ^ 0xC0FFEE;
        Reconciler {
            client,
            target,
            options,
            bundles: BTreeMap::new(),
            counters: Arc::new(ReconcileCounters::default()),
            cluster_failures: 0,
            cluster_retry_at: None,
            random,
        }
    }

    /// The loop's figures.
    pub fn counters(&self) -> Arc<ReconcileCounters> {
        self.counters.clone()
    }

    /// Runs until the state database fails. Passes run when the client installs a snapshot or
    /// accepts assignments, and when a timer (drift, retry, health poll) is due.
    pub async fn run(mut self) -> StateError {
        let mut changed = self.client.changed();
        loop {
            let next = match self.pass().await {
                Ok(next) => next,
                Err(
                    error @ (StateError::Sqlite(_)
                    | StateError::Damaged(_)
                    | StateError::TooNew { .. }),
                ) => {
                    return error;
                }
                Err(error) => {
                    tracing::error!(%error, "reconcile pass failed");
                    Instant::now() + self.options.retry_min
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                _ = changed.changed() => {}
            }
        }
    }

    /// One pass over every bundle; returns when the next one is due.
    pub async fn pass(&mut self) -> Result<Instant, StateError> {
        self.counters.passes.fetch_add(1, Ordering::Relaxed);
        let (assignments, held, in_inventory, sequence) = self
            .client
            .with_state(|state| {
                Ok((
                    state.assignments()?,
                    state.held()?,
                    state.inventory_bundles()?,
                    state.assignment_sequence()?,
                ))
            })
            .await?;
        let mut next = Instant::now() + self.options.drift_interval;
        let assigned: BTreeSet<String> = assignments.iter().map(|a| a.bundle.clone()).collect();
        for assignment in &assignments {
            let bundle = assignment.bundle.clone();
            let Some((digest, generation)) = enforced_snapshot(&held, &bundle, &assignment.digest)
            else {
                continue;
            };
            let renewed = self
                .bundles
                .get(&bundle)
                .is_some_and(|run| run.digest == digest && run.generation != generation);
            if renewed {
                // The same body under a new header (fresh expiry, new key): nothing to apply
                // again; take the header's generation and expiry.
                let (lookup, lookup_digest) = (bundle.clone(), digest);
                if let Ok(Some(snapshot)) = self
                    .client
                    .with_state(move |state| state.load_snapshot(&lookup, &lookup_digest))
                    .await
                    && let Some(run) = self.bundles.get_mut(&bundle)
                {
                    run.generation = snapshot.header().generation;
                    run.expires_at = snapshot.header().expires_at;
                    tracing::info!(%bundle, generation = run.generation, snapshot = %digest.short(), "snapshot header renewed");
                }
            }
            if self
                .bundles
                .get(&bundle)
                .is_none_or(|run| run.digest != digest)
            {
                let (lookup, lookup_digest) = (bundle.clone(), digest);
                match self
                    .client
                    .with_state(move |state| state.load_snapshot(&lookup, &lookup_digest))
                    .await
                {
                    Ok(Some(snapshot)) => {
                        tracing::info!(%bundle, generation = snapshot.header().generation, snapshot = %digest.short(), "enforcing snapshot");
                        let mut run = BundleRun::new(&snapshot);
                        let name = bundle.clone();
                        run.applied_before = self
                            .client
                            .with_state(move |state| state.last_statuses())
                            .await?
                            .iter()
                            .any(|status| {
                                status.bundle == name
                                    && status.digest == digest
                                    && matches!(status.phase, Phase::Healthy | Phase::Degraded)
                            });
                        self.bundles.insert(bundle.clone(), run);
                    }
                    Ok(None) => continue,
                    Err(StateError::Corrupt(reason)) => {
                        self.drop_damaged(&bundle, digest, assignment.generation, reason)
                            .await?;
                        continue;
                    }
                    Err(error) => return Err(error),
                }
            }
            next = next.min(self.reconcile_bundle(&bundle).await?);
            // Wake when the snapshot expires, to report the agent stale.
            if let Some(expires_at) = self.bundles.get(&bundle).and_then(|run| run.expires_at) {
                let left = expires_at.saturating_sub(unix_now());
                if left >= 0 {
                    next = next.min(Instant::now() + Duration::from_secs(left as u64 + 1));
                }
            }
        }
        self.bundles.retain(|bundle, _| assigned.contains(bundle));
        if sequence > 0 {
            for bundle in in_inventory.iter().filter(|b| !assigned.contains(*b)) {
                tracing::info!(%bundle, "bundle no longer assigned; removing its objects");
                match self.prune(bundle, &HashSet::new()).await {
                    Ok(true) => {
                        let bundle = bundle.clone();
                        self.client
                            .with_state(move |state| state.forget_status(&bundle))
                            .await?;
                    }
                    Ok(false) => next = next.min(Instant::now() + self.options.retry_min),
                    Err(TargetError::Unreachable(_)) => {
                        next = next.min(self.cluster_down());
                    }
                    Err(error) => tracing::warn!(%bundle, %error, "pruning an unassigned bundle"),
                }
            }
        }
        Ok(next)
    }

    /// A held snapshot no longer verifies: drop it (never apply it), report, fetch it again.
    async fn drop_damaged(
        &mut self,
        bundle: &str,
        digest: Digest,
        generation: u64,
        reason: String,
    ) -> Result<(), StateError> {
        tracing::error!(%bundle, snapshot = %digest.short(), %reason, "held snapshot is damaged; dropping it and fetching it again");
        let name = bundle.to_owned();
        self.client
            .with_state(move |state| state.drop_snapshot(&name, &digest))
            .await?;
        self.bundles.remove(bundle);
        self.client.refetch();
        self.client
            .report(vec![BundleStatus {
                bundle: bundle.to_owned(),
                digest,
                generation,
                phase: Phase::Failed,
                objects_total: 0,
                objects_ready: 0,
                message: format!("held snapshot damaged ({reason}); fetching it again"),
                observed_at: unix_now(),
                stale: false,
            }])
            .await?;
        self.counters.reports.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn cluster_down(&mut self) -> Instant {
        self.counters
            .cluster_unreachable
            .store(true, Ordering::Relaxed);
        self.cluster_failures = self.cluster_failures.saturating_add(1);
        let delay = backoff_delay(
            self.options.retry_min,
            self.options.retry_max,
            self.cluster_failures.saturating_sub(1),
            next_random(&mut self.random),
        );
        let at = Instant::now() + delay;
        self.cluster_retry_at = Some(at);
        at
    }

    async fn reconcile_bundle(&mut self, bundle: &str) -> Result<Instant, StateError> {
        let Some(mut run) = self.bundles.remove(bundle) else {
            return Ok(Instant::now() + self.options.drift_interval);
        };
        let outcome = self.reconcile_run(bundle, &mut run).await;
        let drift = self.report_drift(bundle, &mut run).await;
        let report = self.report_if_changed(bundle, &mut run).await;
        self.bundles.insert(bundle.to_owned(), run);
        drift?;
        report?;
        Ok(outcome)
    }

    /// Applies, prunes or polls as due; returns when this bundle next needs attention.
    async fn reconcile_run(&mut self, bundle: &str, run: &mut BundleRun) -> Instant {
        let now = Instant::now();
        if let Some(at) = self.cluster_retry_at.filter(|at| *at > now) {
            return at;
        }
        let full_due = run
            .last_full
            .is_none_or(|at| now >= at + self.options.drift_interval)
            || run.cluster_error.is_some()
            || run.backoff.values().any(|backoff| backoff.retry_at <= now);
        let result = if full_due {
            self.apply_all(bundle, run).await
        } else if run.progressing()
            && run
                .last_poll
                .is_none_or(|at| now >= at + self.options.health_poll)
        {
            self.poll(run).await
        } else {
            Ok(())
        };
        match result {
            Ok(()) => {}
            Err(error @ TargetError::Unreachable(_)) => {
                run.cluster_error = Some(error.to_string());
                tracing::warn!(%bundle, %error, "cluster API unreachable; retrying");
                return self.cluster_down();
            }
            Err(error) => {
                // The state database failed under the pass (inventory): nothing more is applied
                // until it works again.
                run.cluster_error = Some(error.to_string());
                tracing::error!(%bundle, %error, "reconcile pass stopped");
                return Instant::now() + self.options.retry_min;
            }
        }
        self.cluster_failures = 0;
        self.cluster_retry_at = None;
        run.cluster_error = None;
        self.counters
            .cluster_unreachable
            .store(false, Ordering::Relaxed);
        if full_due && run.all_applied() {
            self.counters
                .last_success
                .store(unix_now(), Ordering::Relaxed);
        }
        let mut next = run
            .last_full
            .map_or(now, |at| at + self.options.drift_interval);
        if let Some(retry) = run.backoff.values().map(|b| b.retry_at).min() {
            next = next.min(retry);
        }
        if run.progressing() {
            next = next.min(Instant::now() + self.options.health_poll);
        }
        next
    }

    /// Resolves the objects at `indexes` and records those that resolve in the inventory, in
    /// one transaction; only then do they get their reference. Returns the last resolve error
    /// (an unknown kind, say); `Err` when the API is unreachable or the inventory cannot be
    /// written — without the inventory nothing may be applied.
    async fn resolve_and_record(
        &self,
        bundle: &str,
        objects: &[Value],
        indexes: &[usize],
        run: &mut BundleRun,
    ) -> Result<Option<TargetError>, TargetError> {
        let mut resolved = Vec::new();
        let mut last_error = None;
        for &index in indexes {
            match self.target.resolve(&objects[index]).await {
                Ok(reference) => resolved.push((index, reference)),
                Err(error @ TargetError::Unreachable(_)) => return Err(error),
                Err(error) => last_error = Some(error),
            }
        }
        if resolved.is_empty() {
            return Ok(last_error);
        }
        let (name, references): (String, Vec<ObjectRef>) = (
            bundle.to_owned(),
            resolved.iter().map(|(_, r)| r.clone()).collect(),
        );
        self.client
            .with_state(move |state| state.inventory_add(&name, &references))
            .await
            .map_err(|error| TargetError::Other(format!("recording the inventory: {error}")))?;
        for (index, reference) in resolved {
            run.states[index].reference = Some(reference);
        }
        Ok(last_error)
    }

    /// Applies every object not waiting for a retry. `Err` when the API is unreachable or the
    /// inventory cannot be written; a failing object is recorded in the run instead.
    async fn apply_all(&mut self, bundle: &str, run: &mut BundleRun) -> Result<(), TargetError> {
        let objects = run.objects(bundle);
        let count = objects.len();
        let mut refreshed = false;
        let now = Instant::now();
        let mut drifted = Vec::new();
        let mut complete = true;
        run.drift = None;
        for index in 0..count {
            if run.backoff.get(&index).is_some_and(|b| b.retry_at > now) {
                complete = false;
                continue;
            }
            // An object with a reference is in the inventory already (recorded earlier in this
            // pass or in an earlier pass over the same snapshot).
            if run.states[index].reference.is_none() {
                let pending: Vec<usize> = (index..count)
                    .filter(|&i| run.states[i].reference.is_none())
                    .collect();
                self.resolve_and_record(bundle, &objects, &pending, run)
                    .await?;
            }
            if run.states[index].reference.is_none() {
                // An unknown kind: perhaps a CRD applied since discovery ran.
                if !refreshed {
                    refreshed = true;
                    self.target.refresh().await?;
                }
                if let Some(error) = self
                    .resolve_and_record(bundle, &objects, &[index], run)
                    .await?
                {
                    self.fail(run, index, &error);
                    continue;
                }
            }
            // Once applied, an object is read first: what the apply changes back is drift.
            let mode = drift::mode_of(&objects[index]);
            let before = match &run.states[index].reference {
                Some(reference) if run.states[index].applied.is_some() || run.applied_before => {
                    match self.target.get(reference).await {
                        Ok(live) => Some(live),
                        Err(TargetError::Unreachable(message)) => {
                            return Err(TargetError::Unreachable(message));
                        }
                        Err(error) => {
                            tracing::debug!(object = %reference, %error, "reading an object before applying it; its drift is not looked at");
                            None
                        }
                    }
                }
                _ => None,
            };
            if mode == Mode::Report
                && let Some(live) = &before
                && let Some(found) = self
                    .left_in_place(&objects[index], live.as_ref(), run, index)
                    .await?
            {
                if let Some(found) = found {
                    drifted.push((Mode::Report, found));
                }
                continue;
            }
            match self
                .target
                .apply(
                    &objects[index],
                    &self.options.field_manager,
                    self.options.force_conflicts,
                    false,
                )
                .await
            {
                Ok(live) => {
                    self.counters.applied.fetch_add(1, Ordering::Relaxed);
                    let version = (
                        live["metadata"]["generation"].as_i64(),
                        live["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                    run.states[index].applied = Some(version);
                    if let (Some(before), Some(reference)) = (&before, &run.states[index].reference)
                        && let Some(found) = drift::object_drift(
                            reference,
                            before.as_ref(),
                            &live,
                            &self.options.field_manager,
                        )
                    {
                        self.counters
                            .drift_corrected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%bundle, object = %run.name(index), fields = %drift_paths(&found), "drift corrected: the object had been changed and was applied again");
                        drifted.push((Mode::Correct, found));
                    }
                    run.backoff.remove(&index);
                    run.states[index].error = None;
                    run.states[index].health = assess(&live);
                    if let Some(reference) = ObjectRef::of(&live) {
                        run.states[index].reference = Some(reference);
                    }
                    if run.states[index]
                        .reference
                        .as_ref()
                        .is_some_and(|r| r.rank() == 1)
                    {
                        self.wait_established(run, index).await?;
                        self.target.refresh().await?;
                        refreshed = false;
                    }
                }
                Err(TargetError::Unreachable(message)) => {
                    return Err(TargetError::Unreachable(message));
                }
                Err(error) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    self.fail(run, index, &error);
                }
            }
        }
        run.last_full = Some(now);
        run.last_poll = Some(Instant::now());
        run.drift = Some((drifted, complete));
        if run.all_applied() {
            let desired: HashSet<_> = run
                .states
                .iter()
                .filter_map(|state| state.reference.as_ref().map(ObjectRef::identity))
                .collect();
            self.prune(bundle, &desired).await?;
        }
        Ok(())
    }

    /// An object in `report` mode on a drift pass: compares `live` with a dry-run apply.
    /// `Some(drift)` when the apply is not to be made: the drift found (`None`: none, and then
    /// there is nothing to write either); `None` when the dry run failed and the real apply is
    /// to be tried (its error is recorded as any other).
    async fn left_in_place(
        &mut self,
        desired: &Value,
        live: Option<&Value>,
        run: &mut BundleRun,
        index: usize,
    ) -> Result<Option<Option<ObjectDrift>>, TargetError> {
        let Some(reference) = run.states[index].reference.clone() else {
            return Ok(None);
        };
        let Some(live) = live else {
            run.states[index].health =
                Health::Failed("deleted from the cluster; left so (drift: report)".to_owned());
            run.states[index].error = None;
            run.backoff.remove(&index);
            return Ok(Some(drift::object_drift(&reference, None, desired, "")));
        };
        let would = match self
            .target
            .apply(
                desired,
                &self.options.field_manager,
                self.options.force_conflicts,
                true,
            )
            .await
        {
            Ok(would) => would,
            Err(TargetError::Unreachable(message)) => {
                return Err(TargetError::Unreachable(message));
            }
            Err(_) => return Ok(None),
        };
        run.states[index].health = assess(live);
        run.states[index].error = None;
        run.backoff.remove(&index);
        Ok(Some(drift::object_drift(
            &reference,
            Some(live),
            &would,
            &self.options.field_manager,
        )))
    }

    /// Queues what the last full pass found: corrected drift each time, drift left in place
    /// when it differs from what was reported last (an empty report once it is gone).
    async fn report_drift(&mut self, bundle: &str, run: &mut BundleRun) -> Result<(), StateError> {
        let Some((found, complete)) = run.drift.take() else {
            return Ok(());
        };
        let (left, corrected): (Vec<_>, Vec<_>) = found
            .into_iter()
            .partition(|(mode, _)| *mode == Mode::Report);
        let report = |action, mut objects: Vec<ObjectDrift>| {
            let more_objects = drift::cap_objects(&mut objects);
            BundleDrift {
                bundle: bundle.to_owned(),
                digest: run.digest,
                generation: run.generation,
                action,
                objects,
                more_objects,
                observed_at: unix_now(),
            }
        };
        let mut reports = Vec::new();
        if !corrected.is_empty() {
            reports.push(report(
                DriftAction::Corrected,
                corrected.into_iter().map(|(_, d)| d).collect(),
            ));
        }
        let mut updates = Vec::new();
        if complete {
            let left = report(
                DriftAction::Left,
                left.into_iter().map(|(_, d)| d).collect(),
            );
            let now = (!left.objects.is_empty())
                .then(|| drift::fingerprint(&left.objects, left.more_objects));
            let name = bundle.to_owned();
            let before = self
                .client
                .with_state(move |state| state.drift_left(&name))
                .await?;
            if before != now {
                match left.objects.is_empty() {
                    true => tracing::info!(%bundle, "drift left in place is gone"),
                    false => {
                        let objects: Vec<String> = left
                            .objects
                            .iter()
                            .map(|o| format!("{} {}: {}", o.kind, o.name, drift_paths(o)))
                            .collect();
                        tracing::warn!(%bundle, objects = %objects.join("; "), "drift found and left in place (drift: report)");
                    }
                }
                self.counters.drift_left.fetch_add(
                    left.objects.len() as u64 + u64::from(left.more_objects),
                    Ordering::Relaxed,
                );
                reports.push(left);
                updates.push((bundle.to_owned(), now));
            }
        }
        if reports.is_empty() {
            return Ok(());
        }
        self.client.report_drift(reports, updates).await?;
        self.counters.drift_reports.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn fail(&mut self, run: &mut BundleRun, index: usize, error: &TargetError) {
        let failures = run.backoff.get(&index).map_or(0, |b| b.failures) + 1;
        let delay = backoff_delay(
            self.options.retry_min,
            self.options.retry_max,
            failures - 1,
            next_random(&mut self.random),
        );
        run.backoff.insert(
            index,
            Backoff {
                failures,
                retry_at: Instant::now() + delay,
            },
        );
        let mut message = error.to_string();
        if matches!(error, TargetError::Conflict(_)) && !self.options.force_conflicts {
            message.push_str(" (the agent does not force conflicts: set cluster.force_conflicts = true to take these fields over)");
        }
        tracing::warn!(object = %run.name(index), error = %message, failures, "apply failed; retrying later");
        run.states[index].error = Some(message);
    }

    /// Waits until the CRD at `index` is Established (or fails it after `crd_timeout`).
    async fn wait_established(
        &mut self,
        run: &mut BundleRun,
        index: usize,
    ) -> Result<(), TargetError> {
        let Some(reference) = run.states[index].reference.clone() else {
            return Ok(());
        };
        let deadline = Instant::now() + self.options.crd_timeout;
        let mut wait = Duration::from_millis(20);
        while run.states[index].health != Health::Ready {
            if Instant::now() >= deadline {
                let error = TargetError::Other(format!(
                    "not established after {}s",
                    self.options.crd_timeout.as_secs()
                ));
                self.fail(run, index, &error);
                return Ok(());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
            if let Some(live) = self.target.get(&reference).await? {
                run.states[index].health = assess(&live);
            }
        }
        Ok(())
    }

    /// Re-reads objects that are still progressing.
    async fn poll(&mut self, run: &mut BundleRun) -> Result<(), TargetError> {
        for index in 0..run.states.len() {
            let state = &run.states[index];
            if state.error.is_some() || !matches!(state.health, Health::Progressing(_)) {
                continue;
            }
            let Some(reference) = state.reference.clone() else {
                continue;
            };
            match self.target.get(&reference).await? {
                Some(live) => run.states[index].health = assess(&live),
                None => {
                    run.states[index].health = Health::Progressing(
                        "deleted from the cluster; applying it again".to_owned(),
                    );
                    run.last_full = None;
                }
            }
        }
        run.last_poll = Some(Instant::now());
        Ok(())
    }

    /// Deletes objects of `bundle` not in `desired` (identities) that carry the bundle's label;
    /// `Ok(true)` when nothing is left to prune.
    async fn prune(
        &mut self,
        bundle: &str,
        desired: &HashSet<(String, String, String, String)>,
    ) -> Result<bool, TargetError> {
        let name = bundle.to_owned();
        let inventory = self
            .client
            .with_state(move |state| state.inventory(&name))
            .await
            .map_err(|error| TargetError::Other(format!("reading the inventory: {error}")))?;
        let mut candidates: BTreeMap<(String, String, String, String), ObjectRef> = inventory
            .iter()
            .filter(|r| !desired.contains(&r.identity()))
            .map(|r| (r.identity(), r.clone()))
            .collect();
        let kinds: BTreeMap<(String, String), String> = inventory
            .iter()
            .map(|r| {
                (
                    (r.group().to_owned(), r.kind.clone()),
                    r.api_version.clone(),
                )
            })
            .collect();
        let selector = format!("{BUNDLE_LABEL}={bundle}");
        for ((_, kind), api_version) in &kinds {
            match self.target.list(api_version, kind, &selector).await {
                Ok(items) => {
                    for reference in items.iter().filter_map(ObjectRef::of) {
                        if !desired.contains(&reference.identity()) {
                            candidates.entry(reference.identity()).or_insert(reference);
                        }
                    }
                }
                Err(TargetError::Unreachable(message)) => {
                    return Err(TargetError::Unreachable(message));
                }
                Err(TargetError::UnknownKind(_)) => {}
                Err(error) => tracing::warn!(%bundle, %kind, %error, "listing for prune"),
            }
        }
        if candidates.is_empty() {
            return Ok(true);
        }
        // Reverse apply order: the rest, then CRDs, then Namespaces.
        let mut ordered: Vec<ObjectRef> = candidates.into_values().collect();
        ordered.sort_by_key(|r| std::cmp::Reverse((r.rank(), r.identity())));
        let mut forgotten = Vec::new();
        let mut complete = true;
        let mut outcome = Ok(());
        for reference in ordered {
            let live = match self.target.get(&reference).await {
                Ok(live) => live,
                Err(TargetError::UnknownKind(_)) => None,
                Err(error) => {
                    complete = false;
                    if matches!(error, TargetError::Unreachable(_)) {
                        outcome = Err(error);
                        break;
                    }
                    tracing::warn!(object = %reference, %error, "reading an object to prune");
                    continue;
                }
            };
            match live {
                None => forgotten.push(reference),
                Some(live) if live["metadata"]["labels"][BUNDLE_LABEL] == bundle => {
                    // Only the object just read: one re-created or changed since is looked
                    // at again at the next pass.
                    match self.target.delete(&reference, &live).await {
                        Ok(_) => {
                            tracing::info!(%bundle, object = %reference, "pruned");
                            self.counters.pruned.fetch_add(1, Ordering::Relaxed);
                            forgotten.push(reference);
                        }
                        Err(error) => {
                            complete = false;
                            if matches!(error, TargetError::Unreachable(_)) {
                                outcome = Err(error);
                                break;
                            }
                            match error {
                                TargetError::Conflict(_) => {
                                    tracing::info!(object = %reference, %error, "not pruned: it changed (or was re-created) since it was read; looked at again at the next pass")
                                }
                                _ => {
                                    tracing::warn!(object = %reference, %error, "prune failed; retrying at the next pass")
                                }
                            }
                        }
                    }
                }
                Some(_) => {
                    tracing::warn!(%bundle, object = %reference, "not pruned: it does not carry this bundle's label, so the agent did not create it");
                    forgotten.push(reference);
                }
            }
        }
        let name = bundle.to_owned();
        self.client
            .with_state(move |state| state.inventory_remove(&name, &forgotten))
            .await
            .map_err(|error| TargetError::Other(format!("updating the inventory: {error}")))?;
        outcome.map(|()| complete)
    }

    async fn report_if_changed(
        &mut self,
        bundle: &str,
        run: &mut BundleRun,
    ) -> Result<(), StateError> {
        let (phase, ready, message) = run.phase(self.options.health_timeout);
        let stale = run.expires_at.is_some_and(|at| at < unix_now());
        let key = (
            run.digest,
            run.generation,
            phase,
            ready,
            message.clone(),
            stale,
        );
        if run.reported.as_ref() == Some(&key) {
            return Ok(());
        }
        tracing::info!(%bundle, generation = run.generation, ?phase, ready, total = run.states.len(), %message, "bundle status");
        self.client
            .report(vec![BundleStatus {
                bundle: bundle.to_owned(),
                digest: run.digest,
                generation: run.generation,
                phase,
                objects_total: run.states.len() as u64,
                objects_ready: ready,
                message,
                observed_at: unix_now(),
                stale,
            }])
            .await?;
        self.counters.reports.fetch_add(1, Ordering::Relaxed);
        run.reported = Some(key);
        Ok(())
    }
}

/// The paths of an object's drift, for logs: `deleted` or `data.a, spec.replicas`.
fn drift_paths(drift: &ObjectDrift) -> String {
    if drift.deleted {
        return "deleted".to_owned();
    }
    let paths: Vec<&str> = drift.fields.iter().map(|f| f.path.as_str()).collect();
    paths.join(", ")
}

/// The snapshot to enforce for `bundle`: the assigned one once held, else the newest held; its
/// digest and newest generation held.
fn enforced_snapshot(
    held: &[HeldSnapshot],
    bundle: &str,
    assigned: &Digest,
) -> Option<(Digest, u64)> {
    let mine = held.iter().filter(|h| h.bundle == bundle);
    let digest = mine
        .clone()
        .find(|h| h.digest == *assigned)
        .or_else(|| mine.clone().max_by_key(|h| h.generation))
        .map(|h| h.digest)?;
    let generation = mine
        .filter(|h| h.digest == digest)
        .map(|h| h.generation)
        .max()?;
    Some((digest, generation))
}
