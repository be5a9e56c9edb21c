//! Assignments from a source's tracked ref: until a rollout says otherwise, every agent a bundle
//! selects runs the bundle's release at the source's `track` ref (default `refs/heads/main`),
//! in the agent's render variant.
//!
//! Failures never unassign: if the tracked ref is missing, the bundle definitions do not parse,
//! or an agent's variant did not render at the new commit, agents keep what they were assigned.

use outpost_proto::Digest;

use crate::bundles;
use crate::git::GitSource;
use crate::store::{AssignmentRow, HubStore, Release};
use crate::sync::SyncError;
use crate::variants;

/// The origin recorded for assignments that follow `url`'s tracked ref.
pub fn track_origin(url: &str) -> String {
    format!("track:{url}")
}

/// Recomputes the tracked assignments of `source`; returns the agents whose assignments changed.
pub fn assign_tracked(
    store: &dyn HubStore,
    source: &GitSource,
    track: &str,
    now: i64,
) -> Result<Vec<String>, SyncError> {
    let url = source.url().to_owned();
    let Some(target) = source
        .refs()?
        .into_iter()
        .find(|target| target.name == track)
    else {
        tracing::warn!(source = %url, track, "tracked ref not found; assignments unchanged");
        return Ok(Vec::new());
    };
    let definitions = match bundles::bundles_at(source, &target.commit) {
        Ok(definitions) => definitions,
        Err(error) => {
            tracing::warn!(source = %url, track, %error, "bundle definitions invalid; assignments unchanged");
            return Ok(Vec::new());
        }
    };
    let releases: Vec<Release> = store
        .releases()?
        .into_iter()
        .filter(|release| release.source == url && release.git_ref == track)
        .collect();
    let agents = store.agents()?;
    let mut wanted = Vec::new();
    for agent in agents.iter().filter(|agent| agent.revoked.is_none()) {
        for definition in &definitions {
            let Some(Ok(variant)) = variants::variant_for(definition, &agent.labels) else {
                continue;
            };
            let key = variant.key();
            let generation = releases
                .iter()
                .find(|release| release.bundle == definition.name && release.variant == key)
                .filter(|release| release.git_commit == target.commit)
                .and_then(|release| release.generation);
            let digest: Option<(u64, Digest)> = match generation {
                Some(generation) => store
                    .snapshot_digest(&definition.name, generation)?
                    .map(|digest| (generation, digest)),
                None => None,
            };
            match digest {
                Some((generation, digest)) => wanted.push(AssignmentRow {
                    agent: agent.id.clone(),
                    bundle: definition.name.clone(),
                    generation,
                    digest,
                }),
                // Not rendered (yet, or refused): keep whatever the agent runs now.
                None => wanted.extend(
                    store
                        .assignments(&agent.id)?
                        .entries
                        .into_iter()
                        .filter(|row| row.bundle == definition.name),
                ),
            }
        }
    }
    Ok(store.set_assignments(&track_origin(&url), &wanted, now)?)
}
