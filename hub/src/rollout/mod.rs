//! Rollouts by tag. [`machine`] is the pure state machine; this module is the hub's side of it:
//! creating a rollout from an operator's request, observing the fleet for it (agents, their
//! render variants and assignments, their status reports), and writing its decisions — one
//! transaction per step — re-signing an older body under a new generation when an agent is to
//! be given a snapshot older than the one it has (agents refuse to go back in generations).

pub mod machine;
pub mod preview;

use std::collections::{BTreeMap, HashMap};

use outpost_proto::Digest;
use outpost_proto::selector::LabelSelector;
use outpost_proto::wire::Phase as Reported;

use crate::bundles::BundleDefinition;
use crate::keys::HubKeys;
use crate::store::{
    Agent, AssignmentChange, AssignmentRow, Created, FleetChanges, FleetDetails, HubStore,
    RolloutSave, Saved, StoreError, StoredRollout, StoredStatus,
};
use crate::variants;
use machine::{Assigned, Change, Command, CommandError, Health, Input, Plan, PlanError, Rollout};

/// A rollout step that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Signing a snapshot again failed.
    #[error("re-signing {bundle} {digest} under a new generation: {reason}")]
    Resign {
        /// Bundle.
        bundle: String,
        /// Body digest.
        digest: String,
        /// What failed.
        reason: String,
    },
    /// Operators' commands and the driver kept changing the rollout at once.
    #[error("rollout {0} kept changing while the command was carried out; try again")]
    Busy(u64),
    /// The bundle's definitions at the pinned commit could not be read.
    #[error("bundle definitions of {source_url} at {commit}: {reason}")]
    Definitions {
        /// Source URL.
        source_url: String,
        /// Commit.
        commit: String,
        /// Why.
        reason: String,
    },
}

/// What an operator asks for when creating a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bundle.
    pub bundle: String,
    /// A tag name (`v1.2`) or a full ref (`refs/tags/v1.2`, `refs/heads/release`).
    pub tag: String,
    /// Label selector text; empty = every agent the bundle selects.
    pub selector: String,
    /// Wave sizes, e.g. `1,10%,50%,100%`.
    pub waves: String,
    /// Seconds a released agent has to report healthy.
    pub health_timeout: i64,
    /// Failures tolerated: `2` or `2%`.
    pub max_failures: String,
    /// Pause or roll back when they are exceeded.
    pub on_failure: machine::OnFailure,
}

/// Why a rollout was not created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The plan is invalid.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The selector does not parse.
    #[error("selector {0:?}: {1}")]
    Selector(String, String),
    /// No release of the bundle at the ref.
    #[error(
        "no release of bundle {bundle:?} at {git_ref}; is the tag pushed and fetched? (`outpost-hub fetch-now`, then `outpost-hub releases`)"
    )]
    NoRelease {
        /// Bundle.
        bundle: String,
        /// Ref.
        git_ref: String,
    },
    /// The ref did not render for any variant.
    #[error("bundle {bundle:?} at {git_ref} did not render: {error}")]
    NotRendered {
        /// Bundle.
        bundle: String,
        /// Ref.
        git_ref: String,
        /// The render error.
        error: String,
    },
    /// The ref exists in more than one source.
    #[error(
        "bundle {bundle:?} at {git_ref} exists in several sources ({sources}); rename the bundle in one"
    )]
    Ambiguous {
        /// Bundle.
        bundle: String,
        /// Ref.
        git_ref: String,
        /// Their URLs.
        sources: String,
    },
    /// Another rollout of the bundle is running or paused.
    #[error(
        "rollout {0} of this bundle is still running or paused; wait for it, or abort it first (one rollout per bundle at a time)"
    )]
    Busy(u64),
    /// The bundle definitions at the commit could not be read.
    #[error("reading the bundle definitions at the tag's commit: {0}")]
    Definitions(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The full ref a tag name means.
pub fn full_ref(tag: &str) -> String {
    if tag.starts_with("refs/") {
        tag.to_owned()
    } else {
        format!("refs/tags/{tag}")
    }
}

/// What `request` plans: its waves and budget parsed, its selector checked, the tag's commit
/// pinned (the release must exist and have rendered for some variant).
pub fn plan(store: &dyn HubStore, request: &Request) -> Result<Plan, CreateError> {
    let waves = request
        .waves
        .split(',')
        .map(machine::Size::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let max_failures = machine::Size::parse(&request.max_failures)?;
    LabelSelector::parse(&request.selector)
        .map_err(|error| CreateError::Selector(request.selector.clone(), error.to_string()))?;
    let git_ref = full_ref(&request.tag);
    let releases: Vec<_> = store
        .releases()?
        .into_iter()
        .filter(|release| release.bundle == request.bundle && release.git_ref == git_ref)
        .collect();
    let mut sources: Vec<&str> = releases
        .iter()
        .map(|release| release.source.as_str())
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let (Some(first), [_]) = (releases.first(), sources.as_slice()) else {
        return Err(match sources.len() {
            0 => CreateError::NoRelease {
                bundle: request.bundle.clone(),
                git_ref,
            },
            _ => CreateError::Ambiguous {
                bundle: request.bundle.clone(),
                git_ref,
                sources: sources.join(", "),
            },
        });
    };
    if releases.iter().all(|release| release.generation.is_none()) {
        return Err(CreateError::NotRendered {
            bundle: request.bundle.clone(),
            git_ref,
            error: first.error.clone().unwrap_or_default(),
        });
    }
    Ok(Plan {
        bundle: request.bundle.clone(),
        source: first.source.clone(),
        git_ref,
        git_commit: first.git_commit.clone(),
        selector: request.selector.trim().to_owned(),
        waves,
        health_timeout: request.health_timeout,
        max_failures,
        on_failure: request.on_failure,
    })
}

/// Creates a rollout (it releases at the driver's next step).
pub fn create(
    store: &dyn HubStore,
    request: &Request,
    who: &str,
    why: &str,
    now: i64,
) -> Result<Rollout, CreateError> {
    let mut rollout = Rollout::new(0, plan(store, request)?, who, why, now)?;
    match store.create_rollout(&mut rollout)? {
        Created::Created(_) => Ok(rollout),
        Created::Busy(id) => Err(CreateError::Busy(id)),
    }
}

/// Why an operator's command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandFailure {
    /// No such rollout.
    #[error("no rollout {0}; see `outpost-hub rollout list`")]
    NotFound(u64),
    /// Not in this phase.
    #[error(transparent)]
    Refused(#[from] CommandError),
    /// Writing it failed.
    #[error(transparent)]
    Failed(#[from] RolloutError),
}

/// Carries out an operator's command on a rollout; returns it as it is after, and the agents
/// whose assignments changed. A save that loses to the driver's step (the rollout moved
/// between reading and writing) is read and carried out again.
pub fn command(
    store: &dyn HubStore,
    keys: &HubKeys,
    id: u64,
    command: Command,
    who: &str,
    why: &str,
    now: i64,
) -> Result<(Rollout, Vec<String>), CommandFailure> {
    for _ in 0..8 {
        let StoredRollout {
            mut rollout,
            version,
        } = store
            .rollout(id)
            .map_err(RolloutError::from)?
            .ok_or(CommandFailure::NotFound(id))?;
        let log_from = rollout.log.len();
        let changes = rollout.command(command, who, why, now)?;
        let touched = rollout.take_touched();
        match commit(
            store, keys, &rollout, version, &touched, log_from, &changes, now,
        )? {
            Saved::Saved { agents, .. } => {
                tracing::info!(
                    rollout = id,
                    command = command.name(),
                    who,
                    why,
                    phase = rollout.phase.name(),
                    "rollout command"
                );
                return Ok((rollout, agents));
            }
            Saved::Conflict => continue,
        }
    }
    Err(CommandFailure::Failed(RolloutError::Busy(id)))
}

/// Reads the bundle definitions of a source (URL) at a commit.
pub type DefinitionsAt<'a> = dyn FnMut(&str, &str) -> Result<Vec<BundleDefinition>, String> + 'a;

/// A live rollout as the driver holds it between steps.
#[derive(Debug)]
struct Live {
    rollout: Rollout,
    version: u64,
    /// Whether it has seen the whole fleet since it was read (after that, only changes).
    observed: bool,
    /// The release for each render variant at the pinned commit.
    targets: HashMap<String, Assigned>,
}

/// What a driver step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stepped {
    /// Agents whose assignments changed.
    pub changed: Vec<String>,
    /// The earliest health timeout of a live rollout: nothing needs a step before it unless
    /// the fleet changes.
    pub next_deadline: Option<i64>,
    /// Rollouts stepped (the others had nothing new and nothing due).
    pub stepped: usize,
}

/// The hub's rollout loop body. It holds the live rollouts between steps and reads the fleet's
/// change feed, so a step reads and writes what changed, not the fleet: a rollout is observed
/// whole once when it is read (created, restarted, or changed by an operator's command), then
/// fed only the agents that changed with their latest report and the reports that arrived,
/// and stepped only when there is something new or a health timeout is due (the state
/// machine decides exactly as if fed everything; its property tests hold it to that).
/// Aborted, rolled-back and superseded rollouts are never read. `definitions_at(source url,
/// commit)` reads the bundle definitions there (cached here per commit).
#[derive(Debug, Default)]
pub struct Driver {
    definitions: HashMap<(String, String), Vec<BundleDefinition>>,
    live: BTreeMap<u64, Live>,
    cursor: Option<u64>,
}

/// Agents read per query when the feed names many.
const DETAILS_CHUNK: usize = 5_000;

impl Driver {
    /// One step of every live rollout that has something to do.
    pub fn tick(
        &mut self,
        store: &dyn HubStore,
        keys: &HubKeys,
        definitions_at: &mut DefinitionsAt<'_>,
        now: i64,
    ) -> Result<Stepped, RolloutError> {
        let versions = store.live_rollouts()?;
        self.live.retain(|id, live| {
            versions
                .iter()
                .any(|(live_id, version)| live_id == id && *version == live.version)
        });
        if versions.is_empty() {
            self.cursor = None;
            return Ok(Stepped::default());
        }
        // The feed first, then anything read whole: a change in between is seen twice, which
        // the machine takes as once; none is missed.
        let feed = match self.cursor {
            Some(cursor) => store.changes_since(cursor)?,
            None => FleetChanges {
                cursor: store.change_cursor()?,
                ..FleetChanges::default()
            },
        };
        self.cursor = Some(feed.cursor);
        for (id, version) in &versions {
            if self.live.contains_key(id) {
                continue;
            }
            if let Some(stored) = store.rollout(*id)? {
                self.live.insert(
                    *id,
                    Live {
                        rollout: stored.rollout,
                        version: stored.version.max(*version),
                        observed: false,
                        targets: HashMap::new(),
                    },
                );
            }
        }
        let mut details = FleetDetails::default();
        for chunk in feed.agents.chunks(DETAILS_CHUNK) {
            let more = store.fleet_details(chunk)?;
            details.agents.extend(more.agents);
            details.assignments.extend(more.assignments);
            details.statuses.extend(more.statuses);
        }
        let mut stepped = Stepped::default();
        let mut conflicts = Vec::new();
        for (id, live) in &mut self.live {
            let plan = &live.rollout.plan;
            let key = (plan.source.clone(), plan.git_commit.clone());
            if !self.definitions.contains_key(&key) {
                match definitions_at(&key.0, &key.1) {
                    Ok(definitions) => {
                        self.definitions.insert(key.clone(), definitions);
                    }
                    Err(reason) => {
                        let error = RolloutError::Definitions {
                            source_url: key.0.clone(),
                            commit: key.1.clone(),
                            reason,
                        };
                        tracing::warn!(rollout = id, %error, "rollout waiting for its bundle definitions");
                        continue;
                    }
                }
            }
            let definition = self.definitions[&key]
                .iter()
                .find(|definition| definition.name == live.rollout.plan.bundle);
            let inputs = match live.observed {
                false => {
                    live.targets = targets(store, &live.rollout)?;
                    observe(store, definition, &live.rollout, &live.targets)?
                }
                true => observe_changes(store, definition, live, &details, &feed)?,
            };
            let due = live
                .rollout
                .next_deadline()
                .is_some_and(|deadline| deadline <= now);
            if live.observed && inputs.is_empty() && !due {
                continue;
            }
            live.observed = true;
            stepped.stepped += 1;
            let log_from = live.rollout.log.len();
            let head = head_of(&live.rollout);
            let changes = live.rollout.step(&inputs, now);
            let touched = live.rollout.take_touched();
            if touched.is_empty()
                && changes.is_empty()
                && live.rollout.log.len() == log_from
                && head_of(&live.rollout) == head
            {
                continue;
            }
            match commit(
                store,
                keys,
                &live.rollout,
                live.version,
                &touched,
                log_from,
                &changes,
                now,
            )? {
                Saved::Saved { version, agents } => {
                    live.version = version;
                    stepped.changed.extend(agents);
                }
                Saved::Conflict => conflicts.push(*id),
            }
        }
        // Changed by someone else meanwhile: read again (and observe whole) next step.
        for id in conflicts {
            self.live.remove(&id);
        }
        stepped.next_deadline = self
            .live
            .values()
            .filter_map(|live| live.rollout.next_deadline())
            .min();
        Ok(stepped)
    }
}

/// What a step may change of a rollout besides its members and history.
fn head_of(rollout: &Rollout) -> (String, usize, u64, i64) {
    (
        format!("{:?}", rollout.phase),
        rollout.wave,
        rollout.tolerated,
        rollout.updated_at,
    )
}

fn health(phase: Reported) -> Health {
    match phase {
        Reported::Applying => Health::Applying,
        Reported::Healthy => Health::Healthy,
        Reported::Degraded => Health::Degraded,
        Reported::Failed => Health::Failed,
    }
}

/// The release of the rollout's bundle at its pinned commit, for each render variant.
pub(crate) fn targets(
    store: &dyn HubStore,
    rollout: &Rollout,
) -> Result<HashMap<String, Assigned>, StoreError> {
    let plan = &rollout.plan;
    let mut targets = HashMap::new();
    for release in store.releases()? {
        if release.source != plan.source
            || release.git_ref != plan.git_ref
            || release.bundle != plan.bundle
            || release.git_commit != plan.git_commit
        {
            continue;
        }
        let Some(generation) = release.generation else {
            continue;
        };
        if let Some(digest) = store.snapshot_digest(&plan.bundle, generation)? {
            targets.insert(
                release.variant,
                Assigned {
                    generation,
                    digest,
                    origin: rollout.origin(),
                },
            );
        }
    }
    Ok(targets)
}

/// How the rollout sees one agent, or nothing if it neither matches nor is a member. A variant
/// with no release at the pinned commit (it did not render there) gives no target: the agent
/// cannot join.
fn agent_input(
    definition: Option<&BundleDefinition>,
    selector: Option<&LabelSelector>,
    rollout: &Rollout,
    targets: &HashMap<String, Assigned>,
    agent: &Agent,
    current: Option<Assigned>,
) -> Option<Input> {
    let variant =
        definition.and_then(|definition| variants::variant_for(definition, &agent.labels));
    let selected = selector.is_some_and(|selector| selector.matches(&agent.labels));
    let matches = agent.revoked.is_none() && selected && matches!(variant, Some(Ok(_)));
    if !matches && !rollout.members.contains_key(&agent.id) {
        return None;
    }
    let target = match &variant {
        Some(Ok(variant)) => targets.get(&variant.key()).cloned(),
        _ => None,
    };
    Some(Input::Agent {
        canary: agent.labels.get(machine::CANARY.0).map(String::as_str) == Some(machine::CANARY.1),
        current,
        id: agent.id.clone(),
        matches,
        target,
    })
}

/// Whether `agent`'s render variant has no release among `targets` (one rendered since they
/// were read, perhaps).
fn lacks_target(
    definition: Option<&BundleDefinition>,
    targets: &HashMap<String, Assigned>,
    agent: &Agent,
) -> bool {
    match definition.and_then(|definition| variants::variant_for(definition, &agent.labels)) {
        Some(Ok(variant)) => !targets.contains_key(&variant.key()),
        _ => false,
    }
}

fn report_input(stored: &StoredStatus) -> Input {
    Input::Report {
        agent: stored.agent.clone(),
        digest: stored.status.digest,
        health: health(stored.status.phase),
        message: stored.status.message.clone(),
    }
}

fn assigned_from(row: &AssignmentRow, origin: &str) -> Assigned {
    Assigned {
        generation: row.generation,
        digest: row.digest,
        origin: origin.to_owned(),
    }
}

/// What the rollout sees of the whole fleet now: every agent that matches it or is a member,
/// and the members' status reports. `definition` is the bundle at the pinned commit (`None`:
/// the bundle is gone there, so no agent can join).
pub fn observe(
    store: &dyn HubStore,
    definition: Option<&BundleDefinition>,
    rollout: &Rollout,
    targets: &HashMap<String, Assigned>,
) -> Result<Vec<Input>, StoreError> {
    let plan = &rollout.plan;
    let selector = LabelSelector::parse(&plan.selector).ok();
    let current: HashMap<String, Assigned> = store
        .bundle_assignments(Some(&plan.bundle))?
        .into_iter()
        .map(|(row, origin)| {
            let assigned = assigned_from(&row, &origin);
            (row.agent, assigned)
        })
        .collect();
    let mut inputs = Vec::new();
    for agent in store.agents()? {
        let current = current.get(&agent.id).cloned();
        inputs.extend(agent_input(
            definition,
            selector.as_ref(),
            rollout,
            targets,
            &agent,
            current,
        ));
    }
    for stored in store.statuses(None)? {
        if stored.status.bundle == plan.bundle && rollout.members.contains_key(&stored.agent) {
            inputs.push(report_input(&stored));
        }
    }
    Ok(inputs)
}

/// What the rollout sees of what changed: the agents the feed names (with their latest report
/// of the bundle) and the reports that arrived.
fn observe_changes(
    store: &dyn HubStore,
    definition: Option<&BundleDefinition>,
    live: &mut Live,
    details: &FleetDetails,
    feed: &FleetChanges,
) -> Result<Vec<Input>, StoreError> {
    let rollout = &live.rollout;
    let bundle = &rollout.plan.bundle;
    let selector = LabelSelector::parse(&rollout.plan.selector).ok();
    let current: HashMap<&str, Assigned> = details
        .assignments
        .iter()
        .filter(|(row, _)| row.bundle == *bundle)
        .map(|(row, origin)| (row.agent.as_str(), assigned_from(row, origin)))
        .collect();
    if details
        .agents
        .iter()
        .any(|agent| lacks_target(definition, &live.targets, agent))
    {
        live.targets = targets(store, &live.rollout)?;
    }
    let mut inputs = Vec::new();
    for agent in &details.agents {
        let current = current.get(agent.id.as_str()).cloned();
        inputs.extend(agent_input(
            definition,
            selector.as_ref(),
            &live.rollout,
            &live.targets,
            agent,
            current,
        ));
    }
    let rollout = &live.rollout;
    let members = |agent: &str| rollout.members.contains_key(agent);
    for stored in details.statuses.iter().chain(&feed.statuses) {
        if stored.status.bundle == *bundle && members(&stored.agent) {
            inputs.push(report_input(stored));
        }
    }
    Ok(inputs)
}

/// Writes a rollout's step — its head, the members it touched, the records it added and its
/// assignment changes — in one transaction, unless its version moved. An agent to be given a
/// generation below the one it is assigned gets the same body signed again under a new
/// generation, so it accepts it.
#[allow(clippy::too_many_arguments)]
pub fn commit(
    store: &dyn HubStore,
    keys: &HubKeys,
    rollout: &Rollout,
    version: u64,
    touched: &[String],
    log_from: usize,
    changes: &[Change],
    now: i64,
) -> Result<Saved, RolloutError> {
    let bundle = &rollout.plan.bundle;
    let mut current: HashMap<String, u64> = HashMap::new();
    let agents: Vec<String> = changes.iter().map(|change| change.agent.clone()).collect();
    for chunk in agents.chunks(DETAILS_CHUNK) {
        for (row, _) in store.fleet_details(chunk)?.assignments {
            if row.bundle == *bundle {
                current.insert(row.agent, row.generation);
            }
        }
    }
    // The newest generation known of each body, so one re-signing serves every agent.
    let mut newest: HashMap<Digest, u64> = HashMap::new();
    let mut rows = Vec::with_capacity(changes.len());
    for change in changes {
        let to = match &change.to {
            None => None,
            Some(assigned) => {
                let floor = current.get(&change.agent).copied().unwrap_or(0);
                let known = newest
                    .get(&assigned.digest)
                    .copied()
                    .unwrap_or(assigned.generation)
                    .max(assigned.generation);
                let generation = if known < floor {
                    let generation = resign(store, keys, bundle, &assigned.digest, floor, now)?;
                    newest.insert(assigned.digest, generation);
                    generation
                } else if assigned.generation < floor {
                    known
                } else {
                    assigned.generation
                };
                Some((generation, assigned.digest))
            }
        };
        rows.push(AssignmentChange {
            agent: change.agent.clone(),
            bundle: bundle.clone(),
            to,
            origin: change
                .to
                .as_ref()
                .map_or_else(|| rollout.origin(), |assigned| assigned.origin.clone()),
        });
    }
    Ok(store.save_rollout(&RolloutSave {
        rollout,
        version,
        members: touched,
        log_from,
        changes: &rows,
        now,
    })?)
}

/// The generation under which `digest`'s body is at least `floor`: the newest existing one if
/// it is, else the body signed again under a new generation.
fn resign(
    store: &dyn HubStore,
    keys: &HubKeys,
    bundle: &str,
    digest: &Digest,
    floor: u64,
    now: i64,
) -> Result<u64, RolloutError> {
    let newest = store
        .snapshot_by_digest(bundle, digest)?
        .ok_or_else(|| RolloutError::Resign {
            bundle: bundle.to_owned(),
            digest: digest.short(),
            reason: "the snapshot is not in the store".to_owned(),
        })?;
    if newest.generation >= floor {
        return Ok(newest.generation);
    }
    crate::resign::sign_again(store, keys, newest, now).map_err(|error| match error {
        crate::resign::ResignError::Store(error) => RolloutError::Store(error),
        crate::resign::ResignError::Sign { reason, .. } => RolloutError::Resign {
            bundle: bundle.to_owned(),
            digest: digest.short(),
            reason,
        },
    })
}
