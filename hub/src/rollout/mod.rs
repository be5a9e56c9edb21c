//! Rollouts by tag. [`machine`] is the pure state machine; this module is the hub's side of it:
//! creating a rollout from an operator's request, observing the fleet for it (agents, their
//! render variants and assignments, their status reports), and writing its decisions — one
//! transaction per step — re-signing an older body under a new generation when an agent is to
//! be given a snapshot older than the one it has (agents refuse to go back in generations).

pub mod machine;

use std::collections::HashMap;

use outpost_proto::Digest;
use outpost_proto::selector::LabelSelector;
use outpost_proto::wire::Phase as Reported;

use crate::bundles::BundleDefinition;
use crate::keys::HubKeys;
use crate::store::{AssignmentChange, Created, HubStore, StoreError};
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

/// Creates a rollout (it releases at the driver's next step).
pub fn create(
    store: &dyn HubStore,
    request: &Request,
    who: &str,
    why: &str,
    now: i64,
) -> Result<Rollout, CreateError> {
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
    let plan = Plan {
        bundle: request.bundle.clone(),
        source: first.source.clone(),
        git_ref,
        git_commit: first.git_commit.clone(),
        selector: request.selector.trim().to_owned(),
        waves,
        health_timeout: request.health_timeout,
        max_failures,
        on_failure: request.on_failure,
    };
    let mut rollout = Rollout::new(0, plan, who, why, now)?;
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
/// whose assignments changed.
pub fn command(
    store: &dyn HubStore,
    keys: &HubKeys,
    id: u64,
    command: Command,
    who: &str,
    why: &str,
    now: i64,
) -> Result<(Rollout, Vec<String>), CommandFailure> {
    let mut rollout = store
        .rollout(id)
        .map_err(RolloutError::from)?
        .ok_or(CommandFailure::NotFound(id))?;
    let changes = rollout.command(command, who, why, now)?;
    let changed = commit(store, keys, &rollout, &changes, now)?;
    tracing::info!(
        rollout = id,
        command = command.name(),
        who,
        why,
        phase = rollout.phase.name(),
        "rollout command"
    );
    Ok((rollout, changed))
}

/// Reads the bundle definitions of a source (URL) at a commit.
pub type DefinitionsAt<'a> = dyn FnMut(&str, &str) -> Result<Vec<BundleDefinition>, String> + 'a;

/// The hub's rollout loop body: observes the fleet for every live rollout, steps it, and writes
/// what it decided. `definitions_at(source url, commit)` reads the bundle definitions there
/// (cached here per commit).
#[derive(Debug, Default)]
pub struct Driver {
    definitions: HashMap<(String, String), Vec<BundleDefinition>>,
}

impl Driver {
    /// One step of every live rollout; returns the agents whose assignments changed.
    pub fn tick(
        &mut self,
        store: &dyn HubStore,
        keys: &HubKeys,
        definitions_at: &mut DefinitionsAt<'_>,
        now: i64,
    ) -> Result<Vec<String>, RolloutError> {
        let mut changed = Vec::new();
        for mut rollout in store.live_rollouts()? {
            let plan = &rollout.plan;
            let key = (plan.source.clone(), plan.git_commit.clone());
            if !self.definitions.contains_key(&key) {
                let read =
                    definitions_at(&key.0, &key.1).map_err(|reason| RolloutError::Definitions {
                        source_url: key.0.clone(),
                        commit: key.1.clone(),
                        reason,
                    });
                match read {
                    Ok(definitions) => {
                        self.definitions.insert(key.clone(), definitions);
                    }
                    Err(error) => {
                        tracing::error!(rollout = rollout.id, %error, "rollout stalled");
                        continue;
                    }
                }
            }
            let definition = self.definitions[&key]
                .iter()
                .find(|definition| definition.name == rollout.plan.bundle);
            let inputs = observe(store, definition, &rollout)?;
            let before = rollout.clone();
            let changes = rollout.step(&inputs, now);
            if rollout != before || !changes.is_empty() {
                changed.extend(commit(store, keys, &rollout, &changes, now)?);
            }
        }
        Ok(changed)
    }
}

fn health(phase: Reported) -> Health {
    match phase {
        Reported::Applying => Health::Applying,
        Reported::Healthy => Health::Healthy,
        Reported::Degraded => Health::Degraded,
        Reported::Failed => Health::Failed,
    }
}

/// What the rollout sees of the fleet now: every agent that matches it or is a member, and the
/// members' status reports. `definition` is the bundle at the pinned commit (`None`: the bundle
/// is gone there, so no agent can join).
pub fn observe(
    store: &dyn HubStore,
    definition: Option<&BundleDefinition>,
    rollout: &Rollout,
) -> Result<Vec<Input>, StoreError> {
    let plan = &rollout.plan;
    let selector = LabelSelector::parse(&plan.selector).ok();
    let mut targets: HashMap<String, Assigned> = HashMap::new();
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
    let current: HashMap<String, Assigned> = store
        .bundle_assignments(Some(&plan.bundle))?
        .into_iter()
        .map(|(row, origin)| {
            let assigned = Assigned {
                generation: row.generation,
                digest: row.digest,
                origin,
            };
            (row.agent, assigned)
        })
        .collect();
    let mut inputs = Vec::new();
    for agent in store.agents()? {
        let variant =
            definition.and_then(|definition| variants::variant_for(definition, &agent.labels));
        let selected = selector
            .as_ref()
            .is_some_and(|selector| selector.matches(&agent.labels));
        let matches = agent.revoked.is_none() && selected && matches!(variant, Some(Ok(_)));
        if !matches && !rollout.members.contains_key(&agent.id) {
            continue;
        }
        let target = match &variant {
            Some(Ok(variant)) => targets.get(&variant.key()).cloned(),
            _ => None,
        };
        inputs.push(Input::Agent {
            canary: agent.labels.get(machine::CANARY.0).map(String::as_str)
                == Some(machine::CANARY.1),
            current: current.get(&agent.id).cloned(),
            id: agent.id,
            matches,
            target,
        });
    }
    for stored in store.statuses(None)? {
        if stored.status.bundle == plan.bundle && rollout.members.contains_key(&stored.agent) {
            inputs.push(Input::Report {
                agent: stored.agent,
                digest: stored.status.digest,
                health: health(stored.status.phase),
                message: stored.status.message,
            });
        }
    }
    Ok(inputs)
}

/// Writes a rollout's state and its assignment changes in one transaction. An agent to be given
/// a generation below the one it is assigned gets the same body signed again under a new
/// generation, so it accepts it.
pub fn commit(
    store: &dyn HubStore,
    keys: &HubKeys,
    rollout: &Rollout,
    changes: &[Change],
    now: i64,
) -> Result<Vec<String>, RolloutError> {
    let bundle = &rollout.plan.bundle;
    let current: HashMap<String, u64> = if changes.is_empty() {
        HashMap::new()
    } else {
        store
            .bundle_assignments(Some(bundle))?
            .into_iter()
            .map(|(row, _)| (row.agent, row.generation))
            .collect()
    };
    let mut rows = Vec::with_capacity(changes.len());
    for change in changes {
        let to = match &change.to {
            None => None,
            Some(assigned) => {
                let floor = current.get(&change.agent).copied().unwrap_or(0);
                let generation = if assigned.generation < floor {
                    resign(store, keys, bundle, &assigned.digest, floor, now)?
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
    Ok(store.save_rollout(rollout, &rows, now)?)
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
