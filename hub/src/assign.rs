//! Assignments from a source's tracked ref: until a rollout says otherwise, every agent a bundle
//! selects runs the bundle's release at the source's `track` ref (default `refs/heads/main`),
//! in the agent's render variant.
//!
//! Incremental: [`assign_tracked`] recomputes every agent (when the tracked ref moved or the
//! releases there changed); [`assign_agents`] only the agents named (an enrolment, a label
//! change). Each writes only the rows that change, [`CHUNK`] agents per transaction, and
//! names the agents of each chunk as soon as it is stored: at fleet scale the first agents
//! install while the rest are still being assigned. A hub stopped half-way writes the rest at
//! its next start (every start recomputes every agent).
//!
//! Failures never unassign: if the tracked ref is missing, its commit is not signed by an
//! allowed signer (a source with `verify`), the bundle definitions do not parse, or an agent's
//! variant did not render at the new commit, agents keep what they were assigned.
//! A bundle removed from the repository, or an agent it no longer selects, is unassigned.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use outpost_proto::Digest;

use crate::bundles::{self, BundleDefinition};
use crate::git::GitSource;
use crate::store::{AssignmentRow, HubStore};
use crate::sync::SyncError;
use crate::variants;

/// Agents whose assignments one transaction writes.
pub const CHUNK: usize = 5_000;

/// Told the agents of each chunk of assignments once it is stored.
pub type OnChanged<'a> = &'a mut dyn FnMut(&[String]);

/// The origin recorded for assignments that follow `url`'s tracked ref.
pub fn track_origin(url: &str) -> String {
    format!("track:{url}")
}

/// What the tracked ref names now: its commit and the bundle definitions there.
fn tracked(
    store: &dyn HubStore,
    source: &GitSource,
    track: &str,
) -> Result<Option<(String, Vec<BundleDefinition>)>, SyncError> {
    let url = source.url();
    let Some(target) = source
        .refs()?
        .into_iter()
        .find(|target| target.name == track)
    else {
        tracing::warn!(source = %url, track, "tracked ref not found; assignments unchanged");
        return Ok(None);
    };
    // Signed Git: a commit no allowed signer signed, or a rewritten history, decides nothing,
    // not even which bundles exist (an unsigned commit emptying outpost.yaml must not
    // unassign the fleet).
    let bases = crate::sync::released_commits(store, source)?;
    let base = bases.get(&target.name).map(String::as_str);
    if let Some((reason, _)) = crate::sync::ref_refusal(source, &target, base) {
        tracing::warn!(source = %url, track, %reason, "tracked commit refused; assignments unchanged");
        return Ok(None);
    }
    match bundles::bundles_at(source, &target.commit) {
        Ok(definitions) => Ok(Some((target.commit, definitions))),
        Err(error) => {
            tracing::warn!(source = %url, track, %error, "bundle definitions invalid; assignments unchanged");
            Ok(None)
        }
    }
}

/// The generation and body digest released for each (bundle, variant).
type Released = HashMap<(String, String), (u64, Digest)>;

/// The snapshot of each (bundle, variant) released at the tracked ref's commit.
fn released(
    store: &dyn HubStore,
    url: &str,
    track: &str,
    commit: &str,
) -> Result<Released, SyncError> {
    let mut found = HashMap::new();
    for release in store.releases()? {
        if release.source != url || release.git_ref != track || release.git_commit != commit {
            continue;
        }
        let Some(generation) = release.generation else {
            continue;
        };
        if let Some(digest) = store.snapshot_digest(&release.bundle, generation)? {
            found.insert((release.bundle, release.variant), (generation, digest));
        }
    }
    Ok(found)
}

/// Writes the tracked assignments of `agents` for `definitions`; `everyone` means `agents` is
/// the whole fleet (agents assigned before and not listed lose the bundle).
#[allow(clippy::too_many_arguments)]
fn write(
    store: &dyn HubStore,
    origin: &str,
    definitions: &[BundleDefinition],
    released: &HashMap<(String, String), (u64, Digest)>,
    agents: &[(String, BTreeMap<String, String>)],
    everyone: bool,
    now: i64,
    chunk_size: usize,
    on_changed: OnChanged<'_>,
) -> Result<Vec<String>, SyncError> {
    let mut changed = BTreeSet::new();
    let mut set = |bundle: &str,
                   wanted: &[AssignmentRow],
                   unassign: &[String],
                   changed: &mut BTreeSet<String>|
     -> Result<(), SyncError> {
        let written = store.set_tracked(origin, bundle, wanted, unassign, now)?;
        if !written.is_empty() {
            on_changed(&written);
        }
        changed.extend(written);
        Ok(())
    };
    for definition in definitions {
        let mut wanted = Vec::new();
        let mut selected = BTreeSet::new();
        let mut unassign = Vec::new();
        for (agent, labels) in agents {
            match variants::variant_for(definition, labels) {
                None => unassign.push(agent.clone()),
                Some(Ok(variant)) => {
                    selected.insert(agent.clone());
                    // Not rendered (yet, or refused): the agent keeps what it runs.
                    if let Some((generation, digest)) =
                        released.get(&(definition.name.clone(), variant.key()))
                    {
                        wanted.push(AssignmentRow {
                            agent: agent.clone(),
                            bundle: definition.name.clone(),
                            generation: *generation,
                            digest: *digest,
                        });
                    }
                }
                Some(Err(_)) => {
                    selected.insert(agent.clone());
                }
            }
        }
        if everyone {
            // Agents assigned by this origin before that are not in the fleet any more
            // (revoked) lose it too.
            unassign = store
                .assigned_by(origin, &definition.name)?
                .into_iter()
                .filter(|agent| !selected.contains(agent))
                .collect();
        }
        for chunk in wanted.chunks(chunk_size.max(1)) {
            set(&definition.name, chunk, &[], &mut changed)?;
        }
        for chunk in unassign.chunks(chunk_size.max(1)) {
            set(&definition.name, &[], chunk, &mut changed)?;
        }
    }
    if everyone {
        // A bundle that is gone from the repository is gone from its agents.
        let names: BTreeSet<&str> = definitions.iter().map(|d| d.name.as_str()).collect();
        for bundle in store.bundles_assigned_by(origin)? {
            if !names.contains(bundle.as_str()) {
                let agents = store.assigned_by(origin, &bundle)?;
                for chunk in agents.chunks(chunk_size.max(1)) {
                    set(&bundle, &[], chunk, &mut changed)?;
                }
            }
        }
    }
    Ok(changed.into_iter().collect())
}

/// Recomputes the tracked assignments of every agent for `source`; returns the agents whose
/// assignments changed (and tells `on_changed` each chunk of them as it is stored).
pub fn assign_tracked(
    store: &dyn HubStore,
    source: &GitSource,
    track: &str,
    now: i64,
    on_changed: OnChanged<'_>,
) -> Result<Vec<String>, SyncError> {
    let url = source.url().to_owned();
    let Some((commit, definitions)) = tracked(store, source, track)? else {
        return Ok(Vec::new());
    };
    let released = released(store, &url, track, &commit)?;
    let agents = store.agent_labels(None)?;
    write(
        store,
        &track_origin(&url),
        &definitions,
        &released,
        &agents,
        true,
        now,
        CHUNK,
        on_changed,
    )
}

/// Computes the tracked assignments of the agents named only (new, or relabelled); returns
/// those whose assignments changed (and tells `on_changed` each chunk of them).
pub fn assign_agents(
    store: &dyn HubStore,
    source: &GitSource,
    track: &str,
    ids: &[String],
    now: i64,
    on_changed: OnChanged<'_>,
) -> Result<Vec<String>, SyncError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let url = source.url().to_owned();
    let Some((commit, definitions)) = tracked(store, source, track)? else {
        return Ok(Vec::new());
    };
    let released = released(store, &url, track, &commit)?;
    let agents = store.agent_labels(Some(ids))?;
    write(
        store,
        &track_origin(&url),
        &definitions,
        &released,
        &agents,
        false,
        now,
        CHUNK,
        on_changed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FleetStore, SqliteStore, Store};

    #[test]
    fn assignments_are_written_and_announced_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
        let mut agents = Vec::new();
        for seed in 0..7u8 {
            let token = Digest::of(&[seed, 0xee]);
            store
                .create_token(&token, &BTreeMap::new(), "ops", 100, 10_000)
                .unwrap();
            let agent = store.enrol(&token, &[seed; 32], 100).unwrap().unwrap();
            agents.push((agent.id, BTreeMap::new()));
        }
        let definitions = bundles::implicit_bundles(&["pos/app.yaml".to_owned()]);
        let released: Released = [(("pos".to_owned(), String::new()), (1, Digest::of(b"v1")))]
            .into_iter()
            .collect();
        let mut announced: Vec<usize> = Vec::new();
        let changed = write(
            &store,
            "track:repo",
            &definitions,
            &released,
            &agents,
            true,
            200,
            3,
            &mut |chunk: &[String]| announced.push(chunk.len()),
        )
        .unwrap();
        assert_eq!(announced, [3, 3, 1]);
        assert_eq!(changed.len(), 7);
        for (agent, _) in &agents {
            let assigned = store.assignments(agent).unwrap();
            assert_eq!(assigned.entries.len(), 1, "{agent}");
            assert_eq!(assigned.sequence, 1);
        }
        // Nothing changed: nothing written, nothing announced.
        announced.clear();
        let again = write(
            &store,
            "track:repo",
            &definitions,
            &released,
            &agents,
            true,
            300,
            3,
            &mut |chunk: &[String]| announced.push(chunk.len()),
        )
        .unwrap();
        assert!(again.is_empty() && announced.is_empty());
    }
}
