//! Kustomize bundles: a bundle folder holding a `kustomization.yaml` is rendered by
//! `kustomize build` (or `kubectl kustomize`), and its output goes through the same manifest
//! reader, canonical body and signature as a plain folder.
//!
//! The repository is untrusted input, and no byte may reach the hub's network during a build
//! (a URL in a generator would otherwise be fetched and its answer shipped, signed). In depth:
//! - a check of every kustomization the build reaches, and of every generator, transformer and
//!   validator configuration they name, before anything runs: each field of kustomize v5 that
//!   takes a path ([`PATH_FIELDS`]: resources, bases, components, crds, configurations,
//!   generators, transformers, validators, patches, patchesStrategicMerge, patchesJson6902,
//!   replacements, configMap/secretGenerator files, envs and env, openapi.path) must name a
//!   relative path that stays inside the repository and exists in the commit; a URL, a remote
//!   base, an absolute path or a missing path (which kustomize reads as remote) is refused with
//!   the field named; Helm charts are refused;
//! - the build itself runs in a new user and network namespace ([`isolation`]: `unshare
//!   --user --map-root-user --net`), which has no network at all; where the machine cannot make
//!   one, builds are refused unless the operator sets `kustomize_isolation = "none"`; the hub
//!   says at start which protection it has;
//! - on a copy of the commit's tree (regular files only: no symlinks, no submodules) in a fresh
//!   temporary folder, so it sees that commit and nothing else of the hub's disk;
//! - with load restrictions on (`--load-restrictor LoadRestrictionsRootOnly`), exec and Go
//!   plugins off (kustomize's defaults, never enabled here), Helm off;
//! - with an empty environment: `PATH` an empty folder (no `git` to clone with), `HOME` and the
//!   plugin home empty folders, and HTTP(S) proxies pointing at a closed port;
//! - for at most a minute, and with at most 64 MiB of output.

use std::io::Read as _;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::git::{GitError, GitSource};

/// The file names kustomize reads as a kustomization, in its order.
pub const KUSTOMIZATION_FILES: [&str; 3] =
    ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// The longest a build may run.
const BUILD_TIMEOUT: Duration = Duration::from_secs(60);
/// The most output a build may write.
const MAX_OUTPUT: usize = 64 << 20;
/// The most bytes and files of a commit's tree copied for a build.
const MAX_TREE_BYTES: usize = 256 << 20;
const MAX_TREE_FILES: usize = 50_000;

/// Why a kustomization did not build.
#[derive(Debug, thiserror::Error)]
pub enum KustomizeError {
    /// Neither the configured program nor `kustomize` nor `kubectl` could be found.
    #[error(
        "this bundle is a kustomization, and no kustomize was found: install kustomize (or kubectl, which bundles it) on the hub's PATH, or set `kustomize = \"/path/to/kustomize\"` in the hub config"
    )]
    NotFound,
    /// The kustomization asks for something the hub does not allow.
    #[error("{file}: {message}")]
    Refused {
        /// The kustomization file, relative to the repository root.
        file: String,
        /// What and why.
        message: String,
    },
    /// kustomize failed; its message.
    #[error("kustomize build {folder} failed: {message}")]
    Failed {
        /// The bundle folder.
        folder: String,
        /// What kustomize said (its last lines).
        message: String,
    },
    /// No network namespace can be made on this machine, and unisolated builds are not
    /// allowed.
    #[error(
        "kustomize builds need a network namespace of their own, and {0}; or set kustomize_isolation = \"none\" in the hub config to build without (not recommended)"
    )]
    NoIsolation(String),
    /// Reading the commit or writing the copy failed.
    #[error("preparing the build: {0}")]
    Io(String),
    /// The commit could not be read.
    #[error(transparent)]
    Git(#[from] GitError),
}

/// A kustomize program, and whether it may run where no network namespace can be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kustomize {
    program: PathBuf,
    /// `kubectl kustomize DIR` rather than `kustomize build DIR`.
    kubectl: bool,
    /// Build without network isolation when this machine offers none (the operator's
    /// `kustomize_isolation = "none"`); otherwise such builds are refused.
    unisolated: bool,
}

/// How a build is kept off the network on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Each build runs in a new user and network namespace of its own (`unshare --user
    /// --map-root-user --net`, this program): it has a loopback interface that is down and no
    /// other, so every connection fails with "network is unreachable".
    Namespace(PathBuf),
    /// No namespace can be made here; why.
    Unavailable(String),
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Isolation::Namespace(unshare) => write!(
                f,
                "each build runs in a network namespace of its own ({} --user --net): no network at all",
                unshare.display()
            ),
            Isolation::Unavailable(why) => {
                write!(f, "no network namespace can be made here: {why}")
            }
        }
    }
}

/// What this machine offers, found once per process by making a namespace with `unshare`.
pub fn isolation() -> &'static Isolation {
    static PROBED: std::sync::OnceLock<Isolation> = std::sync::OnceLock::new();
    PROBED.get_or_init(|| {
        let Some(unshare) = on_path(Path::new("unshare")) else {
            return Isolation::Unavailable(
                "no `unshare` on PATH (Debian: package util-linux)".to_owned(),
            );
        };
        let probe = Command::new(&unshare)
            .args(["--user", "--map-root-user", "--net", "--"])
            .arg(&unshare)
            .arg("--help")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match probe {
            Ok(output) if output.status.success() => Isolation::Namespace(unshare),
            Ok(output) => Isolation::Unavailable(format!(
                "`unshare --user --net` failed ({}): allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0; in a container, a seccomp profile that permits unshare)",
                first_line(String::from_utf8_lossy(&output.stderr).trim())
            )),
            Err(error) => {
                Isolation::Unavailable(format!("cannot run {}: {error}", unshare.display()))
            }
        }
    })
}

/// The hub's words at start about kustomize builds: which protection they have, and, when
/// none, what happens to them.
pub fn describe_isolation(unisolated_allowed: bool) -> (bool, String) {
    match (isolation(), unisolated_allowed) {
        (Isolation::Namespace(_), _) => (true, format!("kustomize builds: {}", isolation())),
        (Isolation::Unavailable(_), false) => (
            false,
            format!(
                "kustomize builds are refused: {}; or set kustomize_isolation = \"none\" to build with only the checks of each kustomization (not recommended: a kustomization could make the hub fetch from its network)",
                isolation()
            ),
        ),
        (Isolation::Unavailable(_), true) => (
            false,
            format!(
                "kustomize builds run WITHOUT network isolation (kustomize_isolation = \"none\"): {}; only the checks of each kustomization stand between a kustomization and the hub's network",
                isolation()
            ),
        ),
    }
}

/// `name` as a path: itself when it has more than one component (made absolute), else the
/// first such file on `PATH`.
fn on_path(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name
            .is_file()
            .then(|| std::fs::canonicalize(name).unwrap_or_else(|_| name.to_owned()));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl Kustomize {
    /// The program at `path` (`kubectl` by file name, else a kustomize binary).
    pub fn at(path: impl Into<PathBuf>) -> Kustomize {
        let program = path.into();
        let kubectl = program
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("kubectl"));
        Kustomize {
            program,
            kubectl,
            unisolated: false,
        }
    }

    /// `configured` (a path, or a name looked up on `PATH`), else `kustomize` on `PATH`, else
    /// `kubectl` on `PATH`.
    pub fn find(configured: Option<&Path>) -> Result<Kustomize, KustomizeError> {
        match configured {
            Some(path) => on_path(path)
                .map(Kustomize::at)
                .ok_or(KustomizeError::NotFound),
            None => on_path(Path::new("kustomize"))
                .or_else(|| on_path(Path::new("kubectl")))
                .map(Kustomize::at)
                .ok_or(KustomizeError::NotFound),
        }
    }

    /// Lets builds run without network isolation where this machine offers none.
    pub fn allow_unisolated(mut self, allowed: bool) -> Kustomize {
        self.unisolated = allowed;
        self
    }

    /// Builds the kustomization in `folder` (relative to the repository root) of `commit`:
    /// copies the commit's tree, checks its kustomizations, runs the build; returns its YAML.
    pub fn build_commit(
        &self,
        source: &GitSource,
        commit: &str,
        folder: &str,
    ) -> Result<String, KustomizeError> {
        let files = source.files(commit, "")?;
        if files.len() > MAX_TREE_FILES {
            return Err(KustomizeError::Io(format!(
                "the commit holds {} files; kustomize bundles are built from trees of at most {MAX_TREE_FILES}",
                files.len()
            )));
        }
        let total: usize = files.iter().map(|file| file.bytes.len()).sum();
        if total > MAX_TREE_BYTES {
            return Err(KustomizeError::Io(format!(
                "the commit holds {total} bytes; kustomize bundles are built from trees of at most {MAX_TREE_BYTES}"
            )));
        }
        let by_path: std::collections::HashMap<&str, &[u8]> = files
            .iter()
            .map(|file| (file.path.as_str(), file.bytes.as_slice()))
            .collect();
        // Every file and every folder holding one.
        let mut present: std::collections::HashSet<&str> = by_path.keys().copied().collect();
        for file in &files {
            let mut path = file.path.as_str();
            while let Some((folder, _)) = path.rsplit_once('/') {
                if !present.insert(folder) {
                    break;
                }
                path = folder;
            }
        }
        let read = |path: &str| by_path.get(path).map(|bytes| bytes.to_vec());
        let exists = |path: &str| present.contains(path);
        check_tree(
            folder,
            &Tree {
                read: &read,
                exists: &exists,
            },
        )?;
        let work = tempfile::Builder::new()
            .prefix("outpost-kustomize-")
            .tempdir()
            .map_err(|error| KustomizeError::Io(error.to_string()))?;
        let tree = work.path().join("tree");
        for file in &files {
            let relative = safe_relative(&file.path).ok_or_else(|| KustomizeError::Refused {
                file: file.path.clone(),
                message: "a path that leaves the repository".to_owned(),
            })?;
            let path = tree.join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|error| KustomizeError::Io(error.to_string()))?;
            }
            std::fs::write(&path, &file.bytes)
                .map_err(|error| KustomizeError::Io(error.to_string()))?;
        }
        self.run(work.path(), &tree.join(folder.trim_matches('/')), folder)
    }

    /// Builds the kustomization in a local `folder` (`outpost-hub render`), in place, under the
    /// same restrictions; the tree its paths may reach is the local disk.
    pub fn build_local(&self, folder: &Path) -> Result<String, KustomizeError> {
        let folder = std::fs::canonicalize(folder)
            .map_err(|error| KustomizeError::Io(format!("{}: {error}", folder.display())))?;
        let root = Path::new("/");
        let read = |path: &str| std::fs::read(root.join(path)).ok();
        let exists = |path: &str| root.join(path).exists();
        let relative = folder.strip_prefix(root).unwrap_or(&folder);
        check_tree(
            &relative.to_string_lossy(),
            &Tree {
                read: &read,
                exists: &exists,
            },
        )
        .map_err(|error| match error {
            KustomizeError::Refused { file, message } => KustomizeError::Refused {
                file: root.join(file).display().to_string(),
                message,
            },
            other => other,
        })?;
        let work = tempfile::Builder::new()
            .prefix("outpost-kustomize-")
            .tempdir()
            .map_err(|error| KustomizeError::Io(error.to_string()))?;
        self.run(work.path(), &folder, &folder.display().to_string())
    }

    fn run(&self, work: &Path, dir: &Path, folder: &str) -> Result<String, KustomizeError> {
        let empty = work.join("empty");
        let home = work.join("home");
        for made in [&empty, &home] {
            std::fs::create_dir_all(made).map_err(|error| KustomizeError::Io(error.to_string()))?;
        }
        let mut command = match isolation() {
            Isolation::Namespace(unshare) => {
                let mut command = Command::new(unshare);
                command
                    .args(["--user", "--map-root-user", "--net", "--"])
                    .arg(&self.program);
                command
            }
            Isolation::Unavailable(_) if self.unisolated => Command::new(&self.program),
            Isolation::Unavailable(why) => {
                return Err(KustomizeError::NoIsolation(why.clone()));
            }
        };
        if self.kubectl {
            command.arg("kustomize");
        } else {
            command.arg("build");
        }
        command
            .arg(dir)
            .arg("--load-restrictor=LoadRestrictionsRootOnly")
            .env_clear()
            .env("PATH", &empty)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("KUSTOMIZE_PLUGIN_HOME", &empty)
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("HTTPS_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .env("https_proxy", "http://127.0.0.1:9")
            .current_dir(work)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let failed = |message: String| KustomizeError::Failed {
            folder: folder.to_owned(),
            message,
        };
        let mut child = command
            .spawn()
            .map_err(|error| failed(format!("cannot start {}: {error}", self.program.display())))?;
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| failed("no stdout".to_owned()))?;
        let mut stderr = child
            .stderr
            .take()
            .ok_or_else(|| failed("no stderr".to_owned()))?;
        let reading = std::thread::spawn(move || {
            let mut out = Vec::new();
            let read = (&mut stdout)
                .take(MAX_OUTPUT as u64 + 1)
                .read_to_end(&mut out);
            read.map(|_| out)
        });
        let errors = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = (&mut stderr).take(1 << 20).read_to_string(&mut text);
            text
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() > BUILD_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(failed(format!(
                        "still running after {}s; stopped",
                        BUILD_TIMEOUT.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => return Err(failed(error.to_string())),
            }
        };
        let out = reading
            .join()
            .map_err(|_| failed("reading its output failed".to_owned()))?
            .map_err(|error| failed(error.to_string()))?;
        let errors = errors.join().unwrap_or_default();
        if !status.success() {
            return Err(failed(kustomize_message(&errors, dir)));
        }
        if out.len() > MAX_OUTPUT {
            return Err(failed(format!("more than {MAX_OUTPUT} bytes of output")));
        }
        String::from_utf8(out).map_err(|_| failed("its output is not UTF-8".to_owned()))
    }
}

/// kustomize's error without the temporary folder's path (it means nothing to the operator)
/// and without kubectl's log prefix (`E1201 18:43:32.779457 4973 run.go:72] "command failed"
/// err="…"`).
fn kustomize_message(errors: &str, dir: &Path) -> String {
    let text = errors.trim().replace(&format!("{}/", dir.display()), "");
    let text = text.replace(&dir.display().to_string(), ".");
    let unwrap = |line: &str| -> String {
        let bytes = line.as_bytes();
        let klog = bytes.len() > 5
            && matches!(bytes[0], b'E' | b'W' | b'I' | b'F')
            && bytes[1..5].iter().all(u8::is_ascii_digit);
        let line = match (klog, line.split_once("] ")) {
            (true, Some((_, rest))) => rest,
            _ => line,
        };
        match line.strip_prefix("\"command failed\" err=\"") {
            Some(inner) => inner
                .strip_suffix('"')
                .unwrap_or(inner)
                .replace("\\\"", "\""),
            None => line.to_owned(),
        }
    };
    let last: Vec<String> = text.lines().rev().take(5).map(unwrap).collect();
    let message = last.into_iter().rev().collect::<Vec<_>>().join(" ");
    if message.is_empty() {
        "it exited with an error and said nothing".to_owned()
    } else {
        message
    }
}

/// The kustomization file in `folder` of `commit`, if there is one.
pub fn kustomization_in(
    source: &GitSource,
    commit: &str,
    folder: &str,
) -> Result<Option<String>, GitError> {
    for name in KUSTOMIZATION_FILES {
        let path = match folder.trim_matches('/') {
            "" => name.to_owned(),
            folder => format!("{folder}/{name}"),
        };
        if source.read_file(commit, &path)?.is_some() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `path` as a relative path of normal components only.
fn safe_relative(path: &str) -> Option<PathBuf> {
    let relative = Path::new(path);
    let normal = relative
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    (normal && !path.is_empty()).then(|| relative.to_owned())
}

/// Where a kustomization's paths may lead: the folders of one tree (a commit's, or the local
/// disk's for `outpost-hub render`), read through these two functions.
struct Tree<'a> {
    /// The bytes of a file, by its path relative to the tree's root.
    read: &'a dyn Fn(&str) -> Option<Vec<u8>>,
    /// Whether a file or folder exists, by its path relative to the tree's root.
    exists: &'a dyn Fn(&str) -> bool,
}

/// Checks the kustomization in `folder` and every kustomization it reaches (resources, bases,
/// components, generators, transformers and validators that are folders), transitively; and
/// every generator, transformer and validator configuration file they name.
fn check_tree(folder: &str, tree: &Tree<'_>) -> Result<(), KustomizeError> {
    let mut folders = vec![folder.trim_matches('/').to_owned()];
    let mut seen = std::collections::HashSet::new();
    while let Some(next) = folders.pop() {
        if !seen.insert(next.clone()) {
            continue;
        }
        let found = KUSTOMIZATION_FILES.iter().find_map(|name| {
            let path = join(&next, name);
            (tree.read)(&path).map(|bytes| (path, bytes))
        });
        let Some((path, bytes)) = found else {
            continue;
        };
        let named = check_kustomization(&path, &bytes, tree.exists)?;
        for config in &named.configs {
            if let Some(bytes) = (tree.read)(config) {
                check_plugin_config(&path, config, &bytes, &next, tree.exists)?;
            }
        }
        folders.extend(named.folders);
    }
    Ok(())
}

fn join(folder: &str, name: &str) -> String {
    match folder {
        "" => name.to_owned(),
        folder => format!("{folder}/{name}"),
    }
}

/// What a kustomization names that must be looked at too.
#[derive(Debug, Default, PartialEq, Eq)]
struct Named {
    /// Paths that may be folders holding kustomizations (relative to the tree's root).
    folders: Vec<String>,
    /// Files holding generator, transformer or validator configurations.
    configs: Vec<String>,
}

/// The fields of a kustomization (kustomize v5) that name files or folders: (field, what they
/// hold). Every one of them is checked; a field not listed here names no path.
const PATH_FIELDS: [(&str, Holds); 15] = [
    ("resources", Holds::Paths),
    ("bases", Holds::Paths),
    ("components", Holds::Paths),
    ("crds", Holds::Paths),
    ("configurations", Holds::Paths),
    ("generators", Holds::PathsOrInline),
    ("transformers", Holds::PathsOrInline),
    ("validators", Holds::PathsOrInline),
    ("patchesStrategicMerge", Holds::PathsOrInline),
    ("patches", Holds::ObjectsWithPath),
    ("patchesJson6902", Holds::ObjectsWithPath),
    ("replacements", Holds::ObjectsWithPath),
    ("configMapGenerator", Holds::Generators),
    ("secretGenerator", Holds::Generators),
    ("openapi", Holds::ObjectWithPath),
];

/// What a path field holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holds {
    /// A list of paths.
    Paths,
    /// A list of paths, or of inline YAML documents (strings of more than one line).
    PathsOrInline,
    /// A list of objects whose `path` names a file.
    ObjectsWithPath,
    /// One object whose `path` names a file.
    ObjectWithPath,
    /// A list of generators whose `files` (`key=path` or `path`), `envs` and `env` name files.
    Generators,
}

/// Fields refused whatever they hold: Helm reaches the network.
const REFUSED_FIELDS: [&str; 3] = ["helmCharts", "helmGlobals", "helmChartInflationGenerator"];

/// Refuses what a kustomization may not ask for here. `file` is its path relative to the
/// tree's root; `exists` says whether a path relative to the root exists in the tree. Every
/// path it names must be a relative path that stays inside the tree and exists there: no URL,
/// no remote base, no absolute path, nothing the build would have to fetch.
fn check_kustomization(
    file: &str,
    bytes: &[u8],
    exists: &dyn Fn(&str) -> bool,
) -> Result<Named, KustomizeError> {
    let refuse = |message: String| KustomizeError::Refused {
        file: file.to_owned(),
        message,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| refuse("not UTF-8 text".to_owned()))?;
    let value: Value = serde_saphyr::from_str(text).map_err(|error| {
        refuse(format!(
            "not valid YAML: {}",
            first_line(&error.to_string())
        ))
    })?;
    let folder = file.rsplit_once('/').map_or("", |(folder, _)| folder);
    for field in REFUSED_FIELDS {
        if !value[field].is_null() {
            return Err(refuse(format!(
                "`{field}`: Helm charts are not rendered by the hub (no helm, and charts come from the network); render the chart into the repository instead"
            )));
        }
    }
    let check = |field: &str, entry: &str| -> Result<String, KustomizeError> {
        check_path(folder, field, entry, exists).map_err(refuse)
    };
    let mut named = Named::default();
    for (field, holds) in PATH_FIELDS {
        let value = &value[field];
        if value.is_null() {
            continue;
        }
        let entries = || value.as_array().into_iter().flatten().enumerate();
        match holds {
            Holds::Paths | Holds::PathsOrInline => {
                for (index, entry) in entries() {
                    let at = format!("{field}[{index}]");
                    let Some(entry) = entry.as_str() else {
                        return Err(refuse(format!("`{at}` is not a string")));
                    };
                    if holds == Holds::PathsOrInline && is_inline(entry) {
                        // An inline document (a patch or a plugin's configuration).
                        continue;
                    }
                    let path = check(&at, entry)?;
                    if matches!(field, "generators" | "transformers" | "validators") {
                        named.configs.push(path.clone());
                    }
                    if matches!(
                        field,
                        "resources"
                            | "bases"
                            | "components"
                            | "generators"
                            | "transformers"
                            | "validators"
                    ) {
                        named.folders.push(path);
                    }
                }
            }
            Holds::ObjectsWithPath => {
                for (index, entry) in entries() {
                    if let Some(path) = entry.get("path") {
                        let at = format!("{field}[{index}].path");
                        let path = path
                            .as_str()
                            .ok_or_else(|| refuse(format!("`{at}` is not a string")))?;
                        check(&at, path)?;
                    }
                }
            }
            Holds::ObjectWithPath => {
                if let Some(path) = value.get("path") {
                    let at = format!("{field}.path");
                    let path = path
                        .as_str()
                        .ok_or_else(|| refuse(format!("`{at}` is not a string")))?;
                    check(&at, path)?;
                }
            }
            Holds::Generators => {
                for (index, generator) in entries() {
                    check_generator_files(&format!("{field}[{index}]"), generator, &check)
                        .map_err(refuse)?;
                }
            }
        }
    }
    Ok(named)
}

/// A generator's `files` (`key=path` or `path`), `envs` and `env`, each a path checked by
/// `check`.
fn check_generator_files(
    at: &str,
    generator: &Value,
    check: &dyn Fn(&str, &str) -> Result<String, KustomizeError>,
) -> Result<(), String> {
    let message = |error: KustomizeError| match error {
        KustomizeError::Refused { message, .. } => message,
        other => other.to_string(),
    };
    for list in ["files", "envs"] {
        for (index, entry) in generator[list].as_array().into_iter().flatten().enumerate() {
            let at = format!("{at}.{list}[{index}]");
            let entry = entry
                .as_str()
                .ok_or_else(|| format!("`{at}` is not a string"))?;
            // `key=path`: the key may not hold `=`, the path may.
            let path = match (list, entry.split_once('=')) {
                ("files", Some((key, path))) if !key.contains('/') && !key.contains(':') => path,
                _ => entry,
            };
            check(&at, path).map_err(message)?;
        }
    }
    if let Some(env) = generator.get("env") {
        let at = format!("{at}.env");
        let env = env
            .as_str()
            .ok_or_else(|| format!("`{at}` is not a string"))?;
        check(&at, env).map_err(message)?;
    }
    Ok(())
}

/// A generator, transformer or validator configuration file: each of its documents is a
/// builtin plugin's configuration (`ConfigMapGenerator`, `PatchTransformer`, …) whose `files`,
/// `envs`, `env` and `path` are paths like a kustomization's. Helm's generator is refused.
fn check_plugin_config(
    kustomization: &str,
    config: &str,
    bytes: &[u8],
    folder: &str,
    exists: &dyn Fn(&str) -> bool,
) -> Result<(), KustomizeError> {
    let refuse = |message: String| KustomizeError::Refused {
        file: config.to_owned(),
        message: format!("(named by {kustomization}) {message}"),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| refuse("not UTF-8 text".to_owned()))?;
    let documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|error| {
        refuse(format!(
            "not valid YAML: {}",
            first_line(&error.to_string())
        ))
    })?;
    let check = |field: &str, entry: &str| -> Result<String, KustomizeError> {
        check_path(folder, field, entry, exists).map_err(|message| KustomizeError::Refused {
            file: config.to_owned(),
            message,
        })
    };
    for (index, document) in documents.iter().enumerate() {
        if document.is_null() {
            continue;
        }
        let kind = document["kind"].as_str().unwrap_or_default();
        if kind.starts_with("Helm") {
            return Err(refuse(format!(
                "document {index} is a `{kind}`: Helm charts are not rendered by the hub; render the chart into the repository instead"
            )));
        }
        let at = format!("{kind}[{index}]");
        check_generator_files(&at, document, &check).map_err(refuse)?;
        if let Some(path) = document.get("path") {
            let at = format!("{at}.path");
            let path = path
                .as_str()
                .ok_or_else(|| refuse(format!("`{at}` is not a string")))?;
            check(&at, path).map_err(|error| refuse(message_of(error)))?;
        }
    }
    Ok(())
}

fn message_of(error: KustomizeError) -> String {
    match error {
        KustomizeError::Refused { message, .. } => message,
        other => other.to_string(),
    }
}

/// A path named by `field` of a kustomization in `folder`: refused unless it is a relative
/// path that stays inside the tree and exists there. Returns it relative to the tree's root.
fn check_path(
    folder: &str,
    field: &str,
    entry: &str,
    exists: &dyn Fn(&str) -> bool,
) -> Result<String, String> {
    let entry = entry.trim();
    if entry.contains("://") || entry.starts_with("git@") || entry.contains('?') {
        return Err(format!(
            "`{field}` names {entry:?}, which is remote: bundles build from their own commit only, and no byte may come from the network; vendor it into the repository"
        ));
    }
    if entry.starts_with('/') || entry.starts_with('~') {
        return Err(format!(
            "`{field}` names the absolute path {entry:?}: name files of the repository, relative to the kustomization"
        ));
    }
    let mut parts: Vec<&str> = folder.split('/').filter(|part| !part.is_empty()).collect();
    for part in entry.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "`{field}` names {entry:?}, which leaves the repository"
                    ));
                }
            }
            part => parts.push(part),
        }
    }
    let resolved = parts.join("/");
    if resolved.is_empty() || !exists(&resolved) {
        // kustomize would read a missing resource as a remote one (`host/org/repo`).
        return Err(format!(
            "`{field}` names {entry:?}, which is not in this commit (kustomize would read it as a remote and fetch it): name files and folders of the repository"
        ));
    }
    Ok(resolved)
}

/// Whether an entry of a field that takes paths or documents is a document: more than one
/// line, or a JSON object.
fn is_inline(entry: &str) -> bool {
    let entry = entry.trim();
    entry.contains('\n') || entry.starts_with('{')
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, existing: &[&str]) -> Result<Vec<String>, KustomizeError> {
        let exists = |path: &str| existing.contains(&path);
        check_kustomization("apps/shop/kustomization.yaml", text.as_bytes(), &exists)
            .map(|named| named.folders)
    }

    #[test]
    fn remote_and_absolute_references_are_refused_local_ones_pass() {
        for remote in [
            "https://github.com/org/repo//base?ref=v1",
            "github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v3.3.1",
            "git@github.com:org/repo.git//base",
            "example.com/org/repo",
            "ssh://git@example.com/org/repo",
            "../base?ref=main",
        ] {
            let error = check(&format!("resources:\n- {remote}\n"), &[]).unwrap_err();
            assert!(error.to_string().contains("remote"), "{remote}: {error}");
        }
        let error = check("components:\n- /etc/outpost\n", &[]).unwrap_err();
        assert!(error.to_string().contains("absolute"), "{error}");
        let error = check("helmCharts:\n- name: x\n", &[]).unwrap_err();
        assert!(error.to_string().contains("Helm"), "{error}");
        // Local folders and files, also ones with dots in their names.
        let named = check(
            "resources:\n- ../base\n- deployment.yaml\n- v1.2/extra\n",
            &[
                "apps/base",
                "apps/shop/deployment.yaml",
                "apps/shop/v1.2/extra",
            ],
        )
        .unwrap();
        assert_eq!(
            named,
            [
                "apps/base",
                "apps/shop/deployment.yaml",
                "apps/shop/v1.2/extra"
            ],
            "what it names, resolved against the root"
        );
        assert!(check("resources: [\n", &[]).is_err(), "bad YAML is refused");
        let error = check("resources:\n- ../../../etc\n", &[]).unwrap_err();
        assert!(
            error.to_string().contains("leaves the repository"),
            "{error}"
        );
    }

    /// Every field of kustomize v5 that takes a path, with a URL in it: refused, the field
    /// named; the same field with a file of the commit passes.
    #[test]
    fn every_path_field_refuses_a_url_and_names_the_field() {
        let url = "http://127.0.0.1:9/x";
        let cases = [
            ("resources[0]", format!("resources:\n- {url}\n")),
            ("bases[0]", format!("bases:\n- {url}\n")),
            ("components[0]", format!("components:\n- {url}\n")),
            ("crds[0]", format!("crds:\n- {url}\n")),
            ("configurations[0]", format!("configurations:\n- {url}\n")),
            ("generators[0]", format!("generators:\n- {url}\n")),
            ("transformers[0]", format!("transformers:\n- {url}\n")),
            ("validators[0]", format!("validators:\n- {url}\n")),
            (
                "patchesStrategicMerge[0]",
                format!("patchesStrategicMerge:\n- {url}\n"),
            ),
            ("patches[0].path", format!("patches:\n- path: {url}\n")),
            (
                "patchesJson6902[0].path",
                format!(
                    "patchesJson6902:\n- path: {url}\n  target: {{kind: ConfigMap, name: x}}\n"
                ),
            ),
            (
                "replacements[0].path",
                format!("replacements:\n- path: {url}\n"),
            ),
            (
                "configMapGenerator[0].files[0]",
                format!("configMapGenerator:\n- name: u\n  files:\n  - u={url}\n"),
            ),
            (
                "configMapGenerator[0].files[0]",
                format!("configMapGenerator:\n- name: u\n  files:\n  - {url}\n"),
            ),
            (
                "configMapGenerator[0].envs[0]",
                format!("configMapGenerator:\n- name: u\n  envs:\n  - {url}\n"),
            ),
            (
                "secretGenerator[0].files[0]",
                format!("secretGenerator:\n- name: u\n  files:\n  - u={url}\n"),
            ),
            (
                "secretGenerator[0].env",
                format!("secretGenerator:\n- name: u\n  env: {url}\n"),
            ),
            ("openapi.path", format!("openapi:\n  path: {url}\n")),
        ];
        for (field, text) in &cases {
            let error = check(text, &[]).unwrap_err().to_string();
            assert!(
                error.contains(&format!("`{field}`")) && error.contains(url),
                "{field}: {error}"
            );
            let local = text
                .replace(&format!("u={url}"), "u=x.txt")
                .replace(url, "x.txt");
            assert!(
                check(&local, &["apps/shop/x.txt"]).is_ok(),
                "{field} with a file of the commit: {local}"
            );
        }
        // Inline patches and plugin configurations are documents, not paths.
        assert!(check(
            "patchesStrategicMerge:\n- |\n  apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: x}\n",
            &[]
        )
        .is_ok());
        for refused in ["helmCharts", "helmGlobals", "helmChartInflationGenerator"] {
            let error = check(&format!("{refused}:\n- name: x\n"), &[]).unwrap_err();
            assert!(error.to_string().contains(refused), "{error}");
        }
    }

    /// A generator's configuration file is checked like a kustomization: a builtin
    /// ConfigMapGenerator with a URL in `files` is refused, naming that file.
    #[test]
    fn plugin_configurations_are_checked_too() {
        let files: std::collections::HashMap<&str, &str> = [
            ("shop/kustomization.yaml", "generators:\n- gen.yaml\n"),
            (
                "shop/gen.yaml",
                "apiVersion: builtin\nkind: ConfigMapGenerator\nmetadata: {name: u}\nfiles:\n- u=https://169.254.169.254/latest/meta-data\n",
            ),
        ]
        .into_iter()
        .collect();
        let read = |path: &str| files.get(path).map(|text| text.as_bytes().to_vec());
        let exists = |path: &str| files.contains_key(path) || path == "shop";
        let error = check_tree(
            "shop",
            &Tree {
                read: &read,
                exists: &exists,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("shop/gen.yaml")
                && error.contains("files[0]")
                && error.contains("169.254"),
            "{error}"
        );
    }

    /// The second wall: with the checks bypassed, a build whose generator names a URL on
    /// loopback reaches no network (a namespace of its own), and not one connection arrives.
    #[test]
    fn a_build_reaches_no_network_even_past_the_checks() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("tree");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!("configMapGenerator:\n- name: u\n  files:\n  - u=http://127.0.0.1:{port}/x\n"),
        )
        .unwrap();
        assert!(
            matches!(isolation(), Isolation::Namespace(_)),
            "this machine must make network namespaces for the hub's kustomize builds: {}",
            isolation()
        );
        let kustomize = Kustomize::find(None)
            .expect("kubectl (or kustomize) is installed: scripts/setup.sh checks for it");
        let error = kustomize
            .run(work.path(), &dir, "tree")
            .unwrap_err()
            .to_string();
        assert!(error.contains("network is unreachable"), "{error}");
        assert_eq!(
            listener.accept().map_err(|error| error.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "no connection arrived"
        );
    }

    #[test]
    fn kubectl_log_prefixes_and_temporary_paths_are_dropped() {
        let dir = Path::new("/tmp/outpost-kustomize-x/tree/shop");
        let said = "E1201 18:43:32.779457    4973 run.go:72] \"command failed\" err=\"accumulating resources from '/tmp/outpost-kustomize-x/tree/shop/missing.yaml': no such file\"";
        assert_eq!(
            kustomize_message(said, dir),
            "accumulating resources from 'missing.yaml': no such file"
        );
        assert_eq!(
            kustomize_message("Error: plain words\n", dir),
            "Error: plain words"
        );
    }

    #[test]
    fn only_plain_relative_paths_are_copied() {
        assert!(safe_relative("apps/shop/a.yaml").is_some());
        for bad in ["", "/etc/passwd", "apps/../../x", "./a"] {
            assert!(safe_relative(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn kubectl_is_told_apart_from_kustomize() {
        assert!(Kustomize::at("/usr/bin/kubectl").kubectl);
        assert!(!Kustomize::at("/usr/local/bin/kustomize").kubectl);
        assert!(matches!(
            Kustomize::find(Some(Path::new("/nonexistent/kustomize"))),
            Err(KustomizeError::NotFound)
        ));
    }
}
