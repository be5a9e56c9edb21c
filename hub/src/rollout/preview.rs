//! What a rollout would do, before it is created: which agents join it, in which waves (the
//! real state machine stepped on a copy, every member reporting healthy at once), in how many
//! render variants, and per variant and current release the objects added, changed (field by
//! field) and removed. Nothing is written.

use std::collections::{BTreeMap, HashMap};

use outpost_proto::Digest;
use serde::Serialize;
use serde_json::Value;

use super::machine::{ChangeKind, Health, Input, Rollout};
use super::{CreateError, DefinitionsAt, Request, observe, plan, targets};
use crate::diff::{self, BodyDiff};
use crate::store::HubStore;
use crate::variants;

/// One wave as it would run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreviewWave {
    /// Its planned size (`1`, `10%`).
    pub size: String,
    /// The agents it would release, in order (canaries first).
    pub agents: Vec<String>,
}

/// Agents of one render variant that run the same thing now, and what the rollout changes for
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreviewGroup {
    /// What they run now (generation, snapshot): `None` if they run nothing of the bundle.
    pub current: Option<(u64, String)>,
    /// The agents.
    pub agents: Vec<String>,
    /// What changes.
    pub diff: BodyDiff,
}

/// One render variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreviewVariant {
    /// Its key (overlays and substituted labels; empty: the plain bundle).
    pub variant: String,
    /// The release's generation for it.
    pub generation: u64,
    /// Its agents, grouped by what they run now.
    pub groups: Vec<PreviewGroup>,
}

/// What a rollout would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Preview {
    /// Bundle.
    pub bundle: String,
    /// The tag's full ref.
    pub git_ref: String,
    /// The commit it names now (the rollout pins it).
    pub git_commit: String,
    /// The selector asked for.
    pub selector: String,
    /// Agents that would join.
    pub agents: usize,
    /// The waves.
    pub waves: Vec<PreviewWave>,
    /// The variants they fall into.
    pub variants: Vec<PreviewVariant>,
    /// Agents the selector matches that could not join (the variant did not render at the
    /// commit, or a substituted label is missing): (agent, why).
    pub left_out: Vec<(String, String)>,
}

/// Previews `request` against the fleet as the store has it now.
pub fn preview(
    store: &dyn HubStore,
    definitions_at: &mut DefinitionsAt<'_>,
    request: &Request,
    now: i64,
) -> Result<Preview, CreateError> {
    let plan = plan(store, request)?;
    let definition = definitions_at(&plan.source, &plan.git_commit)
        .map_err(CreateError::Definitions)?
        .into_iter()
        .find(|definition| definition.name == plan.bundle);
    let mut rollout = Rollout::new(0, plan.clone(), "preview", "preview", now)?;
    let targets = targets(store, &rollout)?;
    let mut inputs = observe(store, definition.as_ref(), &rollout, &targets)?;
    // Every agent the selector names that does not join, and why.
    let selector = outpost_proto::LabelSelector::parse(&plan.selector).ok();
    let mut left_out = Vec::new();
    let mut labels_of = HashMap::new();
    for agent in store.agents()? {
        if agent.revoked.is_none()
            && selector
                .as_ref()
                .is_some_and(|selector| selector.matches(&agent.labels))
        {
            let why = match definition
                .as_ref()
                .and_then(|definition| variants::variant_for(definition, &agent.labels))
            {
                None => Some("the bundle does not select it".to_owned()),
                Some(Err(error)) => Some(error.to_string()),
                Some(Ok(variant)) if !targets.contains_key(&variant.key()) => Some(format!(
                    "its variant {:?} did not render at {}",
                    variant.key(),
                    plan.git_commit
                )),
                Some(Ok(_)) => None,
            };
            if let Some(why) = why {
                left_out.push((agent.id.clone(), why));
            }
        }
        labels_of.insert(agent.id.clone(), agent.labels);
    }
    // Step a copy: whoever is released reports healthy at once, until nothing moves.
    for _ in 0..(plan.waves.len() * 2 + 4) {
        let changes = rollout.step(&inputs, now);
        inputs = changes
            .iter()
            .filter(|change| change.kind == ChangeKind::Release)
            .filter_map(|change| {
                Some(Input::Report {
                    agent: change.agent.clone(),
                    digest: change.to.as_ref()?.digest,
                    health: Health::Healthy,
                    message: String::new(),
                })
            })
            .collect();
        if inputs.is_empty() {
            break;
        }
    }
    let mut waves: Vec<PreviewWave> = plan
        .waves
        .iter()
        .map(|size| PreviewWave {
            size: size.to_string(),
            agents: Vec::new(),
        })
        .collect();
    let mut order: Vec<(&String, &super::machine::Member)> = rollout.members.iter().collect();
    order.sort_by_key(|(id, member)| (member.wave, !member.canary, (*id).clone()));
    for (id, member) in &order {
        if let Some(wave) = member.wave.and_then(|wave| waves.get_mut(wave)) {
            wave.agents.push((*id).clone());
        }
    }
    // Group the members by variant and by what they run now; diff each group once.
    type Group = (String, u64, Digest, Option<(u64, Digest)>);
    let mut grouped: BTreeMap<Group, Vec<String>> = BTreeMap::new();
    for (id, member) in &rollout.members {
        let variant = definition
            .as_ref()
            .and_then(|definition| {
                variants::variant_for(definition, labels_of.get(id.as_str())?).and_then(Result::ok)
            })
            .map(|variant| variant.key())
            .unwrap_or_default();
        let current = member
            .previous
            .as_ref()
            .map(|previous| (previous.generation, previous.digest));
        grouped
            .entry((
                variant,
                member.target.generation,
                member.target.digest,
                current,
            ))
            .or_default()
            .push(id.clone());
    }
    let mut bodies: HashMap<Digest, Vec<Value>> = HashMap::new();
    let mut body = |digest: &Digest| -> Result<Vec<Value>, CreateError> {
        if let Some(objects) = bodies.get(digest) {
            return Ok(objects.clone());
        }
        let bytes = store
            .snapshot_body(&plan.bundle, digest)?
            .unwrap_or_default();
        let objects: Vec<Value> = outpost_proto::body::parse_lines(&bytes)
            .filter_map(Result::ok)
            .collect();
        bodies.insert(*digest, objects.clone());
        Ok(objects)
    };
    let mut variants_out: BTreeMap<(String, u64), PreviewVariant> = BTreeMap::new();
    for ((variant, generation, target, current), mut agents) in grouped {
        agents.sort();
        let after = body(&target)?;
        let before = match &current {
            Some((_, digest)) => body(digest)?,
            None => Vec::new(),
        };
        variants_out
            .entry((variant.clone(), generation))
            .or_insert_with(|| PreviewVariant {
                variant: variant.clone(),
                generation,
                groups: Vec::new(),
            })
            .groups
            .push(PreviewGroup {
                current: current.map(|(generation, digest)| (generation, digest.to_hex())),
                agents,
                diff: diff::bodies(&before, &after),
            });
    }
    Ok(Preview {
        bundle: plan.bundle.clone(),
        git_ref: plan.git_ref.clone(),
        git_commit: plan.git_commit.clone(),
        selector: plan.selector.clone(),
        agents: rollout.members.len(),
        waves,
        variants: variants_out.into_values().collect(),
        left_out,
    })
}
