//! One sync of a Git source: fetch, notice moved and deleted refs, and render every bundle at
//! every ref into a signed snapshot, skipping bundle trees rendered before (tree ids tell).
//!
//! Failures stay local: an unreachable remote leaves the last fetched refs in service; an invalid
//! manifest refuses that release of that bundle (file and line in the release's error) while other
//! bundles and refs go on; a force-moved tag is re-rendered under a new generation, never an old
//! one.

use outpost_proto::{Body, Digest, SnapshotHeader, SourceFile};

use crate::bundles::{self, BundleDefinition};
use crate::git::{GitError, GitSource, RefTarget};
use crate::keys::HubKeys;
use crate::store::{RefChange, Release, Store, StoreError, StoredSnapshot};

/// What a sync did, for logs and the CLI.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Why the fetch failed, if it did (the sync went on with what was fetched before).
    pub fetch_error: Option<String>,
    /// Ref changes since the last sync.
    pub ref_changes: Vec<RefChange>,
    /// Snapshots rendered and signed in this sync: (bundle, generation, ref).
    pub rendered: Vec<(String, u64, String)>,
    /// Releases whose bundle tree had been rendered before.
    pub unchanged: usize,
    /// Releases refused: (ref, bundle or `outpost.yaml`, error).
    pub failed: Vec<(String, String, String)>,
}

/// A failure that stops the sync (the store or the local mirror is unusable).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The local mirror cannot be read.
    #[error(transparent)]
    Git(#[from] GitError),
}

/// Why one release did not render.
#[derive(Debug, thiserror::Error)]
enum ReleaseError {
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("folder {0:?} does not exist at this commit")]
    MissingFolder(String),
    #[error("{0} is not UTF-8 text")]
    NotUtf8(String),
    #[error(transparent)]
    Manifest(#[from] outpost_proto::manifest::ManifestError),
    #[error("signing: {0}")]
    Header(#[from] outpost_proto::header::HeaderError),
}

/// Fetches `source` and renders what changed. `now` is Unix seconds.
pub fn sync_source(
    store: &mut impl Store,
    keys: &HubKeys,
    source: &mut GitSource,
    now: i64,
) -> Result<SyncReport, SyncError> {
    let fetched = source
        .fetch()
        .map(|_| ())
        .map_err(|error| error.to_string());
    render_fetched(store, keys, source, fetched, now)
}

/// The part of a sync after the fetch, given its outcome: lets a caller fetch without holding
/// the store (the network may be slow) and render with it.
pub fn render_fetched(
    store: &mut impl Store,
    keys: &HubKeys,
    source: &GitSource,
    fetched: Result<(), String>,
    now: i64,
) -> Result<SyncReport, SyncError> {
    let url = source.url().to_owned();
    let mut report = SyncReport::default();
    if let Err(error) = fetched {
        tracing::warn!(source = %url, %error, "fetch failed; serving what was fetched before");
        store.add_event(now, "fetch-failed", &url, &error)?;
        report.fetch_error = Some(error);
    }
    let refs = source.refs()?;
    report.ref_changes = store.record_refs(&url, &refs, now)?;
    for change in &report.ref_changes {
        match change {
            RefChange::Moved { target, previous } if target.name.starts_with("refs/tags/") => {
                let message = format!(
                    "tag moved by force from {previous} to {}; its bundles are rendered again under new generations",
                    target.commit
                );
                tracing::warn!(source = %url, tag = %target.name, "{message}");
                store.add_event(now, "tag-moved", &target.name, &message)?;
            }
            RefChange::Deleted(name) => {
                tracing::warn!(source = %url, git_ref = %name, "ref deleted on the remote");
                store.add_event(
                    now,
                    "ref-deleted",
                    name,
                    "deleted on the remote; its releases are withdrawn, its snapshots kept",
                )?;
                store.delete_releases(&url, name)?;
            }
            RefChange::New(_) | RefChange::Moved { .. } => {}
        }
    }
    for target in &refs {
        let definitions = match bundles::bundles_at(source, &target.commit) {
            Ok(definitions) => definitions,
            Err(error) => {
                store.add_event(now, "definitions-invalid", &target.name, &error.to_string())?;
                report.failed.push((
                    target.name.clone(),
                    bundles::DEFINITION_FILE.to_owned(),
                    error.to_string(),
                ));
                continue;
            }
        };
        for definition in &definitions {
            let outcome = release(store, keys, source, target, definition, now, &mut report);
            let (generation, error) = match outcome {
                Ok(generation) => (Some(generation), None),
                Err(ReleaseOutcome::Refused(error)) => {
                    tracing::warn!(bundle = %definition.name, git_ref = %target.name, %error, "release refused");
                    report.failed.push((
                        target.name.clone(),
                        definition.name.clone(),
                        error.clone(),
                    ));
                    (None, Some(error))
                }
                Err(ReleaseOutcome::Fatal(error)) => return Err(error),
            };
            store.upsert_release(&Release {
                source: url.clone(),
                git_ref: target.name.clone(),
                bundle: definition.name.clone(),
                git_commit: target.commit.clone(),
                generation,
                error,
                updated_at: now,
            })?;
        }
    }
    Ok(report)
}

enum ReleaseOutcome {
    Refused(String),
    Fatal(SyncError),
}

impl From<StoreError> for ReleaseOutcome {
    fn from(error: StoreError) -> Self {
        ReleaseOutcome::Fatal(error.into())
    }
}

impl From<ReleaseError> for ReleaseOutcome {
    fn from(error: ReleaseError) -> Self {
        ReleaseOutcome::Refused(error.to_string())
    }
}

/// Renders one bundle at one ref, or finds it rendered; returns the snapshot's generation.
fn release(
    store: &mut impl Store,
    keys: &HubKeys,
    source: &GitSource,
    target: &RefTarget,
    definition: &BundleDefinition,
    now: i64,
    report: &mut SyncReport,
) -> Result<u64, ReleaseOutcome> {
    let selector = definition.selector.to_string();
    let tree_id = source
        .tree_id(&target.commit, &definition.path)
        .map_err(ReleaseError::from)?
        .ok_or_else(|| ReleaseError::MissingFolder(definition.path.clone()))?;
    if let Some(generation) = store.rendered(&definition.name, &tree_id, &selector)? {
        report.unchanged += 1;
        return Ok(generation);
    }
    let body = render(source, &target.commit, definition)?;
    let digest = body.digest();
    if let Some(existing) = same_snapshot(store, &definition.name, &digest, &selector)? {
        store.insert_render(&definition.name, &tree_id, &selector, existing)?;
        report.unchanged += 1;
        return Ok(existing);
    }
    let generation = store.next_generation(&definition.name)?;
    let (header, signature) = SnapshotHeader {
        bundle: definition.name.clone(),
        generation,
        git_commit: target.commit.clone(),
        git_ref: target.name.clone(),
        body_digest: digest,
        body_size: body.as_bytes().len() as u64,
        object_count: body.object_count(),
        created_at: now,
        expires_at: None,
        selector: selector.clone(),
        key_id: keys.signer.key_id(),
    }
    .sign(&keys.signer)
    .map_err(ReleaseError::from)?;
    store.insert_snapshot(
        &StoredSnapshot {
            bundle: definition.name.clone(),
            generation,
            digest,
            git_commit: target.commit.clone(),
            git_ref: target.name.clone(),
            header,
            signature: signature.0.to_vec(),
            object_count: body.object_count(),
            body: body.into_bytes(),
            created_at: now,
        },
        &tree_id,
        &selector,
    )?;
    tracing::info!(bundle = %definition.name, generation, snapshot = %digest.short(), git_ref = %target.name, "rendered");
    report
        .rendered
        .push((definition.name.clone(), generation, target.name.clone()));
    Ok(generation)
}

/// The generation of an existing snapshot with the same body and selector, if any.
fn same_snapshot(
    store: &impl Store,
    bundle: &str,
    digest: &Digest,
    selector: &str,
) -> Result<Option<u64>, StoreError> {
    let Some(existing) = store.snapshot_by_digest(bundle, digest)? else {
        return Ok(None);
    };
    let same_selector =
        SnapshotHeader::decode(&existing.header).is_ok_and(|header| header.selector == selector);
    Ok(same_selector.then_some(existing.generation))
}

fn render(
    source: &GitSource,
    commit: &str,
    definition: &BundleDefinition,
) -> Result<Body, ReleaseError> {
    let files = source.files(commit, &definition.path)?;
    let mut texts = Vec::new();
    for file in files
        .into_iter()
        .filter(|file| bundles::is_manifest(&file.path))
    {
        let path = match definition.path.is_empty() {
            true => file.path,
            false => format!("{}/{}", definition.path, file.path),
        };
        let text =
            String::from_utf8(file.bytes).map_err(|_| ReleaseError::NotUtf8(path.clone()))?;
        texts.push((path, text));
    }
    let sources: Vec<SourceFile<'_>> = texts
        .iter()
        .map(|(path, text)| SourceFile { path, text })
        .collect();
    Ok(Body::render(&sources)?)
}
