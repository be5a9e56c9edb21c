//! One sync of a Git source: fetch, notice moved and deleted refs, and render every bundle at
//! every ref into a signed snapshot, skipping bundle trees rendered before (tree ids tell).
//!
//! Failures stay local: an unreachable remote leaves the last fetched refs in service; an invalid
//! manifest refuses that release of that bundle (file and line in the release's error) while other
//! bundles and refs go on; a force-moved tag is re-rendered under a new generation, never an old
//! one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use outpost_proto::manifest::{self, ManifestError};
use outpost_proto::{Body, Digest, Object, ObjectKey, SnapshotHeader, SourceFile};

use crate::bundles::{self, BundleDefinition};
use crate::git::{GitError, GitSource, RefTarget};
use crate::keys::HubKeys;
use crate::store::{HubStore, RefChange, Release, StoreError, StoredSnapshot};
use crate::variants::{self, Variant};

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
    /// Refs whose releases changed in this sync (a new generation or a new variant).
    pub changed_refs: BTreeSet<String>,
}

/// What a source's syncs have done before, kept between syncs by the hub runtime, so a sync
/// where no ref moved and no agent needs a new variant renders nothing and writes nothing.
#[derive(Debug, Default)]
pub struct RenderMemo {
    /// Bundle definitions by commit (a commit's never change), for the commits refs name now.
    definitions: HashMap<String, Vec<BundleDefinition>>,
    /// (ref, bundle) → the commit and the variant keys kept there.
    variants: HashMap<(String, String), (String, Vec<String>)>,
    /// (ref, bundle, variant key) → the commit released there (rendered or found rendered).
    /// Keyed by ref, not commit: a ref that moves back to a commit it named before is
    /// released again.
    released: HashMap<(String, String, String), String>,
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
    #[error(transparent)]
    Sign(#[from] crate::keys::SignError),
    #[error(transparent)]
    Kustomize(#[from] crate::kustomize::KustomizeError),
}

/// Fetches `source` and renders what changed. `now` is Unix seconds.
pub fn sync_source(
    store: &dyn HubStore,
    keys: &HubKeys,
    source: &GitSource,
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
    store: &dyn HubStore,
    keys: &HubKeys,
    source: &GitSource,
    fetched: Result<(), String>,
    now: i64,
) -> Result<SyncReport, SyncError> {
    render_remembering(
        store,
        keys,
        source,
        fetched,
        now,
        &mut RenderMemo::default(),
    )
}

/// [`render_fetched`] that skips what `memo` says earlier syncs of this source released.
pub fn render_remembering(
    store: &dyn HubStore,
    keys: &HubKeys,
    source: &GitSource,
    fetched: Result<(), String>,
    now: i64,
    memo: &mut RenderMemo,
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
    // The label sets of enrolled, not revoked agents decide which variants are rendered.
    let label_sets = store.label_sets()?;
    // With a verify policy, what each ref released last (read once per sync).
    let bases = released_commits(store, source)?;
    for target in &refs {
        let read = match memo.definitions.get(&target.commit) {
            Some(definitions) => Ok(definitions.clone()),
            None => bundles::bundles_at(source, &target.commit),
        };
        let definitions = match read {
            Ok(definitions) => {
                memo.definitions
                    .insert(target.commit.clone(), definitions.clone());
                definitions
            }
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
        // Signed Git: a ref whose commit (or tag) no allowed signer signed, or a branch whose
        // history was rewritten, releases nothing.
        if let Some((reason, kept)) =
            ref_refusal(source, target, bases.get(&target.name).map(String::as_str))
        {
            for definition in &definitions {
                tracing::warn!(bundle = %definition.name, git_ref = %target.name, %reason, "release refused");
                report
                    .failed
                    .push((target.name.clone(), definition.name.clone(), reason.clone()));
                memo.released.retain(|(name, bundle, _), _| {
                    name != &target.name || bundle != &definition.name
                });
                memo.variants
                    .remove(&(target.name.clone(), definition.name.clone()));
                // The release keeps naming the last commit released here (so a rewrite is
                // judged against it next time too); the error says what came instead.
                let release = Release {
                    source: url.clone(),
                    git_ref: target.name.clone(),
                    bundle: definition.name.clone(),
                    variant: String::new(),
                    git_commit: kept.clone(),
                    generation: None,
                    error: Some(reason.clone()),
                    updated_at: now,
                };
                store.retain_variants(&url, &target.name, &definition.name, &[String::new()])?;
                if store.upsert_release(&release)? {
                    report.changed_refs.insert(target.name.clone());
                    store.add_event(
                        now,
                        "release-refused",
                        &format!("{} at {}", release.bundle, release.git_ref),
                        &reason,
                    )?;
                }
            }
            continue;
        }
        for definition in &definitions {
            let needed = variants::variants(definition, label_sets.iter());
            let variant_keys: Vec<String> = needed.iter().map(Variant::key).collect();
            let place = (target.name.clone(), definition.name.clone());
            let kept = (target.commit.clone(), variant_keys.clone());
            if memo.variants.get(&place) != Some(&kept) {
                store.retain_variants(&url, &target.name, &definition.name, &variant_keys)?;
                memo.variants.insert(place, kept);
            }
            for variant in &needed {
                let done = (target.name.clone(), definition.name.clone(), variant.key());
                if memo.released.get(&done) == Some(&target.commit) {
                    report.unchanged += 1;
                    continue;
                }
                let job = Job {
                    source,
                    target,
                    definition,
                    variant,
                    now,
                };
                let (generation, error) = match release(store, keys, &job, &mut report) {
                    Ok(generation) => {
                        memo.released.insert(done, target.commit.clone());
                        (Some(generation), None)
                    }
                    Err(ReleaseOutcome::Refused(error)) => {
                        tracing::warn!(bundle = %definition.name, variant = %variant.key(), git_ref = %target.name, %error, "release refused");
                        report.failed.push((
                            target.name.clone(),
                            definition.name.clone(),
                            error.clone(),
                        ));
                        (None, Some(error))
                    }
                    Err(ReleaseOutcome::Fatal(error)) => return Err(error),
                };
                let release = Release {
                    source: url.clone(),
                    git_ref: target.name.clone(),
                    bundle: definition.name.clone(),
                    variant: variant.key(),
                    git_commit: target.commit.clone(),
                    generation,
                    error,
                    updated_at: now,
                };
                if store.upsert_release(&release)? {
                    report.changed_refs.insert(target.name.clone());
                    // A release newly refused (or refused for a new reason) is an event: the
                    // log, and the notifications that follow it, say so once.
                    if let Some(error) = &release.error {
                        store.add_event(
                            now,
                            "release-refused",
                            &format!("{} at {}", release.bundle, release.git_ref),
                            error,
                        )?;
                    }
                }
            }
        }
    }
    // Forget what no ref names any more (the memo does not grow with history).
    let named: HashSet<&str> = refs.iter().map(|target| target.name.as_str()).collect();
    let commits: HashSet<&str> = refs.iter().map(|target| target.commit.as_str()).collect();
    memo.definitions
        .retain(|commit, _| commits.contains(commit.as_str()));
    memo.variants
        .retain(|(name, _), _| named.contains(name.as_str()));
    memo.released
        .retain(|(name, _, _), _| named.contains(name.as_str()));
    Ok(report)
}

/// The last commit released at each ref of `source` (the one its releases name, preferring
/// releases that were not refused): what a move of the ref is judged against. Empty without a
/// `verify` policy (nothing is judged).
pub fn released_commits(
    store: &dyn HubStore,
    source: &GitSource,
) -> Result<HashMap<String, String>, StoreError> {
    let mut bases: HashMap<String, (bool, String)> = HashMap::new();
    if source.verify_policy().is_none() {
        return Ok(HashMap::new());
    }
    for release in store.releases()? {
        if release.source != source.url() {
            continue;
        }
        let good = release.generation.is_some();
        match bases.get(&release.git_ref) {
            Some((true, _)) if !good => {}
            _ => {
                bases.insert(release.git_ref, (good, release.git_commit));
            }
        }
    }
    Ok(bases
        .into_iter()
        .map(|(git_ref, (_, commit))| (git_ref, commit))
        .collect())
}

/// With a `verify` policy, why nothing at `target` may be released, and the commit its
/// releases keep naming: the commit (or tag) is not signed by an allowed signer, or `target` is
/// a branch whose history was rewritten — it moved to a commit that does not descend from
/// `base`, the last commit released there ([`released_commits`]), and the operator did not
/// allow that commit (`verify.allow_rewrite_to`). `None`: it may be released (or there is no
/// policy).
pub fn ref_refusal(
    source: &GitSource,
    target: &RefTarget,
    base: Option<&str>,
) -> Option<(String, String)> {
    let policy = source.verify_policy()?;
    let base = base.map(str::to_owned);
    let kept = base.clone().unwrap_or_else(|| target.commit.clone());
    if let Some(Err(reason)) = source.check_signed(target) {
        return Some((reason, kept));
    }
    let base = base?;
    if !target.name.starts_with("refs/heads/")
        || base == target.commit
        || policy.allow_rewrite_to.contains(&target.commit)
    {
        return None;
    }
    let short = |commit: &str| commit[..commit.len().min(12)].to_owned();
    match source.descends(&target.commit, &base) {
        Some(true) => None,
        found => Some((
            format!(
                "history rewritten: {} moved from {} (released) to {}, which {}; if that is intended, add \"{}\" to this source's verify.allow_rewrite_to and restart the hub",
                target.name,
                short(&base),
                short(&target.commit),
                match found {
                    Some(_) => "does not descend from it",
                    None => "cannot be shown to descend from it (not in the mirror)",
                },
                target.commit
            ),
            kept,
        )),
    }
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

/// One variant of one bundle at one ref: what a release renders.
struct Job<'a> {
    source: &'a GitSource,
    target: &'a RefTarget,
    definition: &'a BundleDefinition,
    variant: &'a Variant,
    now: i64,
}

/// Renders a job, or finds it rendered; returns the snapshot's generation.
fn release(
    store: &dyn HubStore,
    keys: &HubKeys,
    job: &Job<'_>,
    report: &mut SyncReport,
) -> Result<u64, ReleaseOutcome> {
    let Job {
        source,
        target,
        definition,
        variant,
        now,
    } = *job;
    let selector = variants::variant_selector(definition, variant).to_string();
    // The render key: the variant's selector and key; the tree key: every folder it reads.
    let mut render_key = format!("{selector}#{}", variant.key());
    if definition.drift_report {
        render_key.push_str("#drift=report");
    }
    let mut folders = vec![definition.path.clone()];
    folders.extend(
        variant
            .overlays
            .iter()
            .filter_map(|index| definition.overlays.get(*index))
            .map(|overlay| overlay.path.clone()),
    );
    let mut tree_ids = Vec::new();
    for folder in &folders {
        let tree_id = source
            .tree_id(&target.commit, folder)
            .map_err(ReleaseError::from)?
            .ok_or_else(|| ReleaseError::MissingFolder(folder.clone()))?;
        tree_ids.push(tree_id);
    }
    // A kustomization may read any folder of its commit (`../base`): its render is keyed by
    // the commit's whole tree.
    let kustomized = crate::kustomize::kustomization_in(source, &target.commit, &definition.path)
        .map_err(ReleaseError::from)?
        .is_some();
    if kustomized {
        let root = source
            .tree_id(&target.commit, "")
            .map_err(ReleaseError::from)?
            .unwrap_or_default();
        tree_ids[0] = format!("kustomize:{root}");
    }
    let tree_key = tree_ids.join("+");
    if let Some(generation) = store.rendered(&definition.name, &tree_key, &render_key)? {
        report.unchanged += 1;
        return Ok(generation);
    }
    let body = render(
        source,
        &target.commit,
        &folders,
        kustomized,
        &variant.labels,
        definition.drift_report,
    )?;
    let digest = body.digest();
    if let Some(existing) = same_snapshot(store, keys, &definition.name, &digest, &selector, now)? {
        store.insert_render(&definition.name, &tree_key, &render_key, existing)?;
        report.unchanged += 1;
        return Ok(existing);
    }
    let unsigned = SnapshotHeader {
        bundle: definition.name.clone(),
        generation: 0,
        git_commit: target.commit.clone(),
        git_ref: target.name.clone(),
        body_digest: digest,
        body_size: body.as_bytes().len() as u64,
        object_count: body.object_count(),
        created_at: now,
        expires_at: None,
        selector: selector.clone(),
        key_id: keys.signer().key_id(),
    };
    // Checked before a generation is spent on it.
    unsigned.encode().map_err(ReleaseError::from)?;
    let generation = store.next_generation(&definition.name)?;
    let (header, signature) = keys
        .sign(
            SnapshotHeader {
                generation,
                ..unsigned
            },
            now,
        )
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
        &tree_key,
        &render_key,
    )?;
    tracing::info!(bundle = %definition.name, variant = %variant.key(), generation, snapshot = %digest.short(), git_ref = %target.name, "rendered");
    report
        .rendered
        .push((definition.name.clone(), generation, target.name.clone()));
    Ok(generation)
}

/// The generation of an existing snapshot with the same body and selector, if any, whose
/// signature is still good (its key not revoked, not about to expire).
fn same_snapshot(
    store: &dyn HubStore,
    keys: &HubKeys,
    bundle: &str,
    digest: &Digest,
    selector: &str,
    now: i64,
) -> Result<Option<u64>, StoreError> {
    let Some(existing) = store.snapshot_by_digest(bundle, digest)? else {
        return Ok(None);
    };
    let reusable = SnapshotHeader::decode(&existing.header).is_ok_and(|header| {
        header.selector == selector && keys.needs_resigning(&header, now).is_none()
    });
    Ok(reusable.then_some(existing.generation))
}

/// Reads the manifests of `folders` (the bundle's, then its overlays'), lets later folders'
/// objects replace earlier ones with the same key, substitutes labels, and builds the body.
/// With `kustomized`, the bundle's own folder is a kustomization: its objects are what
/// `kustomize build` makes of it (see [`crate::kustomize`]). With `drift_report`, objects
/// without their own drift annotation get `outpost.io/drift: report`.
fn render(
    source: &GitSource,
    commit: &str,
    folders: &[String],
    kustomized: bool,
    labels: &BTreeMap<String, String>,
    drift_report: bool,
) -> Result<Body, ReleaseError> {
    let mut objects: BTreeMap<ObjectKey, Object> = BTreeMap::new();
    for (index, folder) in folders.iter().enumerate() {
        let mut in_this_folder: BTreeMap<ObjectKey, String> = BTreeMap::new();
        // (where the text came from, the text): the kustomize build's output, or each
        // manifest file of the folder.
        let texts: Vec<(String, String)> = if index == 0 && kustomized {
            let program = source.kustomize()?;
            let built = program.build_commit(source, commit, folder)?;
            vec![(format!("kustomize build {folder}"), built)]
        } else {
            let mut texts = Vec::new();
            for file in source.files(commit, folder)? {
                if !bundles::is_manifest(&file.path) {
                    continue;
                }
                let path = match folder.is_empty() {
                    true => file.path,
                    false => format!("{folder}/{}", file.path),
                };
                let text = String::from_utf8(file.bytes)
                    .map_err(|_| ReleaseError::NotUtf8(path.clone()))?;
                texts.push((path, text));
            }
            texts
        };
        for (path, text) in texts {
            for object in manifest::parse_file(SourceFile {
                path: &path,
                text: &text,
            })? {
                // The same object twice in one folder is an error; an overlay replacing a base
                // object is the point of overlays.
                if let Some(first) =
                    in_this_folder.insert(object.key.clone(), object.origin.clone())
                {
                    return Err(ReleaseError::Manifest(ManifestError::Duplicate {
                        key: Box::new(object.key),
                        first,
                        second: object.origin,
                    }));
                }
                objects.insert(object.key.clone(), object);
            }
        }
    }
    let mut objects: Vec<Object> = objects.into_values().collect();
    if !labels.is_empty() {
        for object in &mut objects {
            variants::substitute(&mut object.value, labels);
        }
    }
    if drift_report {
        for object in &mut objects {
            let metadata = &mut object.value["metadata"];
            if !metadata["annotations"].is_object() {
                metadata["annotations"] = serde_json::Value::Object(Default::default());
            }
            let annotations = &mut metadata["annotations"];
            if annotations.get(bundles::DRIFT_ANNOTATION).is_none() {
                annotations[bundles::DRIFT_ANNOTATION] =
                    serde_json::Value::String("report".to_owned());
            }
        }
    }
    Ok(Body::from_objects(objects)?)
}
