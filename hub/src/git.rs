//! Git sources read with gix: a bare mirror per source in the hub's data dir, fetched with forced
//! refspecs so moved tags and force-pushed branches follow the remote, and pruned so deleted refs
//! disappear. Trees and blobs are read straight from the object database; there is no work tree.
//!
//! gix is blocking here: call these from `spawn_blocking` in async code. A `GitSource` is
//! `Send + Sync` (it holds gix's thread-safe handle and makes a thread-local one per call), so
//! the sync task and the rollout driver can share it.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::bstr::ByteSlice;

/// The refspecs a source mirrors: every branch and every tag, forced.
const REFSPECS: [&str; 2] = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];

/// The most commits [`GitSource::descends`] walks.
pub const MAX_WALK: usize = 1_000_000;

/// A mirrored Git repository.
#[derive(Debug)]
pub struct GitSource {
    url: String,
    path: PathBuf,
    repo: std::sync::RwLock<gix::ThreadSafeRepository>,
    credentials: Option<Credentials>,
    /// The program that builds its kustomize bundles (none: found on `PATH` when needed).
    kustomize: Option<std::path::PathBuf>,
    /// Build kustomize bundles without a network namespace where none can be made.
    kustomize_unisolated: bool,
    /// Release only what these signers signed.
    verify: Option<std::sync::Arc<crate::signed::VerifyPolicy>>,
}

/// A username and password (or token) for http(s) remotes. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, password elided)", self.username)
    }
}

/// A branch or tag and the commit it names (annotated tags peeled).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RefTarget {
    /// Full name, e.g. `refs/tags/pos-v1.4.0`.
    pub name: String,
    /// Commit id, hex.
    pub commit: String,
}

/// A file read from a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// Path relative to the folder that was read.
    pub path: String,
    /// Contents.
    pub bytes: Vec<u8>,
}

/// A Git operation that failed, with the source it concerned.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// Opening or creating the local mirror failed.
    #[error("cannot open the mirror of {url} at {path}: {message}")]
    Open {
        /// Remote URL.
        url: String,
        /// Mirror path.
        path: PathBuf,
        /// What gix said.
        message: String,
    },
    /// Fetching from the remote failed (unreachable, refused, bad credentials).
    #[error("fetching {url} failed: {message}")]
    Fetch {
        /// Remote URL.
        url: String,
        /// What gix said.
        message: String,
    },
    /// Reading refs, commits, trees or blobs failed.
    #[error("reading {what} in the mirror of {url}: {message}")]
    Read {
        /// Remote URL.
        url: String,
        /// What was being read.
        what: String,
        /// What gix said.
        message: String,
    },
}

/// An error with its chain of causes, `outer: inner: innermost`.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What a fetch changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FetchSummary {
    /// Refs removed locally because the remote no longer has them.
    pub pruned: Vec<String>,
}

impl GitSource {
    /// Opens the mirror at `path`, creating an empty bare repository there first if needed.
    pub fn open_or_init(url: &str, path: &Path) -> Result<GitSource, GitError> {
        let open_error = |message: String| GitError::Open {
            url: url.to_owned(),
            path: path.to_owned(),
            message,
        };
        let repo = if path.join("HEAD").exists() {
            gix::open(path).map_err(|error| open_error(describe(&error)))?
        } else {
            std::fs::create_dir_all(path).map_err(|error| open_error(describe(&error)))?;
            gix::init_bare(path).map_err(|error| open_error(describe(&error)))?
        };
        Ok(GitSource {
            url: url.to_owned(),
            path: path.to_owned(),
            repo: std::sync::RwLock::new(repo.into_sync()),
            credentials: None,
            kustomize: None,
            kustomize_unisolated: false,
            verify: None,
        })
    }

    /// Uses these credentials when the remote asks for them (http(s) basic authentication).
    pub fn with_credentials(mut self, credentials: Option<Credentials>) -> GitSource {
        self.credentials = credentials;
        self
    }

    /// Builds kustomize bundles with this program (`kustomize`, or `kubectl`) instead of the
    /// first of them found on `PATH`; with `unisolated`, also where no network namespace can
    /// be made (see [`crate::kustomize::isolation`]).
    pub fn with_kustomize(
        mut self,
        program: Option<std::path::PathBuf>,
        unisolated: bool,
    ) -> GitSource {
        self.kustomize = program;
        self.kustomize_unisolated = unisolated;
        self
    }

    /// Releases only commits (or tags) these signers signed (see [`crate::signed`]).
    pub fn with_verify(
        mut self,
        policy: Option<std::sync::Arc<crate::signed::VerifyPolicy>>,
    ) -> GitSource {
        self.verify = policy;
        self
    }

    /// The source's `verify` policy, if any.
    pub fn verify_policy(&self) -> Option<&crate::signed::VerifyPolicy> {
        self.verify.as_deref()
    }

    /// Whether `commit` descends from (or is) `ancestor`: `None` when either is not in the
    /// mirror, or the history is too long to tell (more than [`MAX_WALK`] commits between).
    pub fn descends(&self, commit: &str, ancestor: &str) -> Option<bool> {
        let repo = self.repo();
        let from = gix::ObjectId::from_hex(commit.as_bytes()).ok()?;
        let ancestor = gix::ObjectId::from_hex(ancestor.as_bytes()).ok()?;
        repo.find_commit(ancestor).ok()?;
        let walk = repo.rev_walk([from]).all().ok()?;
        for (seen, info) in walk.enumerate() {
            let info = info.ok()?;
            if info.id == ancestor {
                return Some(true);
            }
            if seen >= MAX_WALK {
                return None;
            }
        }
        Some(false)
    }

    /// With a `verify` policy, whether `target` may be released: who signed it, or why not.
    /// `None` without a policy.
    pub fn check_signed(
        &self,
        target: &RefTarget,
    ) -> Option<Result<crate::signed::Verified, String>> {
        let policy = self.verify.as_deref()?;
        Some(self.signed_by(policy, target))
    }

    fn signed_by(
        &self,
        policy: &crate::signed::VerifyPolicy,
        target: &RefTarget,
    ) -> Result<crate::signed::Verified, String> {
        use crate::signed::{VerifyMode, split_tag, verify_signature};
        let repo = self.repo();
        let short = &target.commit[..target.commit.len().min(12)];
        match policy.mode {
            VerifyMode::Commits => {
                let id = gix::ObjectId::from_hex(target.commit.as_bytes())
                    .map_err(|error| format!("commit id {short}: {error}"))?;
                let commit = repo
                    .find_commit(id)
                    .map_err(|error| format!("reading commit {short}: {error}"))?;
                match commit
                    .signature()
                    .map_err(|error| format!("reading commit {short}: {error}"))?
                {
                    None => Err(format!(
                        "commit {short} is not signed (this source releases only commits signed by one of: {})",
                        policy.signers.expected()
                    )),
                    Some((signature, data)) => verify_signature(
                        &signature.to_str_lossy(),
                        &data.to_bstring(),
                        &policy.signers,
                    )
                    .map_err(|error| format!("commit {short}: {error}")),
                }
            }
            VerifyMode::Tags => {
                if !target.name.starts_with("refs/tags/") {
                    return Err(format!(
                        "{} is a branch, and this source releases only signed tags (verify.mode = \"tags\")",
                        target.name
                    ));
                }
                let reference = repo
                    .find_reference(target.name.as_str())
                    .map_err(|error| format!("reading {}: {error}", target.name))?;
                let id = reference
                    .target()
                    .try_id()
                    .map(|id| id.to_owned())
                    .ok_or_else(|| format!("{} is a symbolic ref", target.name))?;
                let object = repo
                    .find_object(id)
                    .map_err(|error| format!("reading {}: {error}", target.name))?;
                if object.kind != gix::object::Kind::Tag {
                    return Err(format!(
                        "{} is a lightweight tag, which cannot be signed: tag with `git tag -s` (SSH signing)",
                        target.name
                    ));
                }
                let Some((content, signature)) = split_tag(&object.data) else {
                    return Err(format!(
                        "tag {} is not signed (this source releases only tags signed by one of: {})",
                        target.name,
                        policy.signers.expected()
                    ));
                };
                verify_signature(signature, content, &policy.signers)
                    .map_err(|error| format!("tag {}: {error}", target.name))
            }
        }
    }

    /// The program that builds this source's kustomize bundles.
    pub fn kustomize(
        &self,
    ) -> Result<crate::kustomize::Kustomize, crate::kustomize::KustomizeError> {
        Ok(
            crate::kustomize::Kustomize::find(self.kustomize.as_deref())?
                .allow_unisolated(self.kustomize_unisolated),
        )
    }

    /// The remote URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A handle for this thread.
    fn repo(&self) -> gix::Repository {
        self.repo
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .to_thread_local()
    }

    /// Fetches every branch and tag from the remote, then prunes local refs the remote no
    /// longer has.
    pub fn fetch(&self) -> Result<FetchSummary, GitError> {
        let fetch_error = |message: String| GitError::Fetch {
            url: self.url.clone(),
            message,
        };
        // One fetch of this mirror at a time, across processes (the hub, `outpost-hub sync`):
        // an advisory lock the kernel drops when its holder dies. Holding it, any lock file Git
        // left in the mirror is from a fetch that was killed, and is removed — else every fetch
        // after a crash mid-update fails on it ("the lock … could not be obtained").
        let _guard = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path.join("outpost-fetch.lock"))
            .and_then(|file| file.lock().map(|()| file))
            .map_err(|error| fetch_error(format!("locking the mirror: {error}")))?;
        remove_stale_locks(&self.path);
        if self.url.starts_with("https://") && !curl::Version::get().feature_ssl() {
            return Err(fetch_error(
                "this hub was built with a libcurl without TLS, so https sources cannot be fetched: install libcurl4-openssl-dev and pkg-config (bash scripts/setup.sh), run `cargo clean -p curl-sys`, and build the hub again".to_owned(),
            ));
        }
        let repo = self.repo();
        let remote = repo
            .remote_at(self.url.as_str())
            .map_err(|error| fetch_error(describe(&error)))?
            .with_fetch_tags(gix::remote::fetch::Tags::None)
            .with_refspecs(REFSPECS, gix::remote::Direction::Fetch)
            .map_err(|error| fetch_error(describe(&error)))?;
        let interrupt = AtomicBool::new(false);
        let mut connection = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|error| fetch_error(describe(&error)))?;
        if let Some(credentials) = self.credentials.clone() {
            connection = connection.with_credentials(move |action| match action {
                gix::credentials::helper::Action::Get(context) => {
                    Ok(Some(gix::credentials::protocol::Outcome {
                        identity: gix::sec::identity::Account {
                            username: credentials.username.clone(),
                            password: credentials.password.clone(),
                            oauth_refresh_token: None,
                        },
                        next: context.into(),
                    }))
                }
                // Nothing to store or erase: the credentials come from the config.
                _ => Ok(None),
            });
        }
        // HEAD too, to learn which branch the remote calls its default.
        let head = gix::refspec::parse("HEAD".into(), gix::refspec::parse::Operation::Fetch)
            .map_err(|error| fetch_error(describe(&error)))?
            .to_owned();
        let options = gix::remote::ref_map::Options {
            extra_refspecs: vec![head],
            ..Default::default()
        };
        let outcome = connection
            .prepare_fetch(gix::progress::Discard, options)
            .map_err(|error| fetch_error(describe(&error)))?
            .receive(gix::progress::Discard, &interrupt)
            .map_err(|error| fetch_error(describe(&error)))?;
        let remote_names: std::collections::BTreeSet<String> = outcome
            .ref_map
            .remote_refs
            .iter()
            .map(|reference| reference.unpack().0.to_str_lossy().into_owned())
            .collect();
        let remote_head =
            outcome
                .ref_map
                .remote_refs
                .iter()
                .find_map(|reference| match reference {
                    gix::protocol::handshake::Ref::Symbolic {
                        full_ref_name,
                        target,
                        ..
                    } if full_ref_name == "HEAD" => Some(target.to_str_lossy().into_owned()),
                    _ => None,
                });
        if let Some(target) = remote_head.filter(|target| target.starts_with("refs/heads/")) {
            self.set_head(&repo, &target)?;
        }
        let mut summary = FetchSummary::default();
        for local in self.refs()? {
            if !remote_names.contains(&local.name) {
                self.delete_ref(&repo, &local.name)?;
                summary.pruned.push(local.name);
            }
        }
        // gix caches refs and packs per handle; reopen so reads see what the fetch wrote.
        let reopened = gix::open(&self.path).map_err(|error| fetch_error(describe(&error)))?;
        *self
            .repo
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reopened.into_sync();
        Ok(summary)
    }

    /// Every branch and tag with the commit it names, sorted by name.
    pub fn refs(&self) -> Result<Vec<RefTarget>, GitError> {
        let read_error = |what: &str, message: String| GitError::Read {
            url: self.url.clone(),
            what: what.to_owned(),
            message,
        };
        let repo = self.repo();
        let platform = repo
            .references()
            .map_err(|error| read_error("refs", describe(&error)))?;
        let mut out = Vec::new();
        for prefix in ["refs/heads/", "refs/tags/"] {
            let iter = platform
                .prefixed(prefix)
                .map_err(|error| read_error("refs", describe(&error)))?;
            for reference in iter {
                let mut reference =
                    reference.map_err(|error| read_error("refs", describe(&error)))?;
                let name = reference.name().as_bstr().to_str_lossy().into_owned();
                // A tag may name a tree or a blob; only commits can be released.
                let Ok(commit) = reference.peel_to_commit() else {
                    continue;
                };
                out.push(RefTarget {
                    name,
                    commit: commit.id.to_string(),
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// The id of the tree at `path` (relative, `""` for the root) in `commit`, or `None` if the
    /// commit has no folder there.
    pub fn tree_id(&self, commit: &str, path: &str) -> Result<Option<String>, GitError> {
        let repo = self.repo();
        Ok(self
            .tree_at(&repo, commit, path)?
            .map(|tree| tree.id.to_string()))
    }

    /// The paths of every file under `path` in `commit`, relative to `path`, sorted, without
    /// reading the files.
    pub fn list_files(&self, commit: &str, path: &str) -> Result<Vec<String>, GitError> {
        let repo = self.repo();
        let mut paths: Vec<String> = self
            .entries(&repo, commit, path)?
            .into_iter()
            .map(|entry| entry.filepath.to_str_lossy().into_owned())
            .collect();
        paths.sort();
        Ok(paths)
    }

    fn entries(
        &self,
        repo: &gix::Repository,
        commit: &str,
        path: &str,
    ) -> Result<Vec<gix::traverse::tree::recorder::Entry>, GitError> {
        let Some(tree) = self.tree_at(repo, commit, path)? else {
            return Ok(Vec::new());
        };
        let entries = tree
            .traverse()
            .breadthfirst
            .files()
            .map_err(|error| GitError::Read {
                url: self.url.clone(),
                what: format!("{path} at {commit}"),
                message: describe(&error),
            })?;
        Ok(entries
            .into_iter()
            .filter(|entry| entry.mode.is_blob())
            .collect())
    }

    /// Every file under `path` in `commit`, with paths relative to `path`, sorted by path.
    pub fn files(&self, commit: &str, path: &str) -> Result<Vec<TreeFile>, GitError> {
        let read_error = |message: String| GitError::Read {
            url: self.url.clone(),
            what: format!("{path} at {commit}"),
            message,
        };
        let repo = self.repo();
        let mut files = Vec::new();
        for entry in self.entries(&repo, commit, path)? {
            let object = repo
                .find_object(entry.oid)
                .map_err(|error| read_error(describe(&error)))?;
            files.push(TreeFile {
                path: entry.filepath.to_str_lossy().into_owned(),
                bytes: object.detach().data,
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// The file at `path` in `commit`, if it exists and is a file.
    pub fn read_file(&self, commit: &str, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        let repo = self.repo();
        let object = self.object_at(&repo, commit, path, gix::object::Kind::Blob)?;
        Ok(object.map(|object| object.detach().data))
    }

    fn tree_at<'repo>(
        &self,
        repo: &'repo gix::Repository,
        commit: &str,
        path: &str,
    ) -> Result<Option<gix::Tree<'repo>>, GitError> {
        let object = self.object_at(repo, commit, path, gix::object::Kind::Tree)?;
        Ok(object.map(gix::Object::into_tree))
    }

    /// The object at `path` (relative; `""` is the root tree) in `commit`, if it is of `kind`.
    fn object_at<'repo>(
        &self,
        repo: &'repo gix::Repository,
        commit: &str,
        path: &str,
        kind: gix::object::Kind,
    ) -> Result<Option<gix::Object<'repo>>, GitError> {
        let read_error = |error: &dyn std::error::Error| GitError::Read {
            url: self.url.clone(),
            what: format!("{path:?} at {commit}"),
            message: describe(error),
        };
        let id = gix::ObjectId::from_hex(commit.as_bytes()).map_err(|error| read_error(&error))?;
        let root = repo
            .find_commit(id)
            .map_err(|error| read_error(&error))?
            .tree()
            .map_err(|error| read_error(&error))?;
        let path = path.trim_matches('/');
        if path.is_empty() {
            if kind != gix::object::Kind::Tree {
                return Ok(None);
            }
            let root = repo
                .find_object(root.id)
                .map_err(|error| read_error(&error))?;
            return Ok(Some(root));
        }
        let Some(entry) = root
            .lookup_entry_by_path(path)
            .map_err(|error| read_error(&error))?
        else {
            return Ok(None);
        };
        let wanted = match kind {
            gix::object::Kind::Tree => entry.mode().is_tree(),
            gix::object::Kind::Blob => entry.mode().is_blob(),
            _ => false,
        };
        if !wanted {
            return Ok(None);
        }
        Ok(Some(entry.object().map_err(|error| read_error(&error))?))
    }

    /// The remote's default branch as last fetched (the mirror's HEAD, kept pointing where the
    /// remote's points), if the mirror has that branch.
    pub fn default_branch(&self) -> Option<String> {
        let repo = self.repo();
        let name = repo.head_name().ok().flatten()?;
        let name = name.as_bstr().to_str_lossy().into_owned();
        repo.find_reference(name.as_str()).ok().map(|_| name)
    }

    /// Points the mirror's HEAD at `target` (a branch), as the remote's does.
    fn set_head(&self, repo: &gix::Repository, target: &str) -> Result<(), GitError> {
        use gix::refs::transaction::{Change, LogChange, PreviousValue, RefEdit, RefLog};
        let write_error = |message: String| GitError::Read {
            url: self.url.clone(),
            what: "HEAD".to_owned(),
            message,
        };
        let current = repo.head_name().ok().flatten();
        if current
            .as_ref()
            .is_some_and(|name| name.as_bstr() == target)
        {
            return Ok(());
        }
        let target: gix::refs::FullName =
            target
                .try_into()
                .map_err(|error: gix::validate::reference::name::Error| {
                    write_error(error.to_string())
                })?;
        repo.edit_reference(RefEdit {
            change: Change::Update {
                log: LogChange {
                    mode: RefLog::AndReference,
                    force_create_reflog: false,
                    message: "outpost: the remote's default branch".into(),
                },
                expected: PreviousValue::Any,
                new: gix::refs::Target::Symbolic(target),
            },
            name: "HEAD"
                .try_into()
                .map_err(|error: gix::validate::reference::name::Error| {
                    write_error(error.to_string())
                })?,
            deref: false,
        })
        .map_err(|error| write_error(describe(&error)))?;
        Ok(())
    }

    fn delete_ref(&self, repo: &gix::Repository, name: &str) -> Result<(), GitError> {
        let read_error = |message: String| GitError::Read {
            url: self.url.clone(),
            what: format!("ref {name}"),
            message,
        };
        let reference = repo
            .find_reference(name)
            .map_err(|error| read_error(describe(&error)))?;
        reference
            .delete()
            .map_err(|error| read_error(describe(&error)))
    }
}

/// Removes Git's lock files (`*.lock`) under `mirror`'s refs and at its top: called only while
/// holding the mirror's fetch lock, when no other fetch can be writing them.
fn remove_stale_locks(mirror: &Path) {
    fn walk(dir: &Path, depth: usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() && depth < 16 {
                walk(&path, depth + 1);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "lock")
            {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::warn!(path = %path.display(), "removed a lock file a killed fetch left behind")
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "cannot remove a stale lock file")
                    }
                }
            }
        }
    }
    walk(&mirror.join("refs"), 0);
    for name in [
        "packed-refs.lock",
        "HEAD.lock",
        "config.lock",
        "shallow.lock",
    ] {
        let path = mirror.join(name);
        if path.exists() {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), "removed a lock file a killed fetch left behind");
        }
    }
}
