//! Kustomize bundles: a bundle folder holding a `kustomization.yaml` is rendered by
//! `kustomize build` (or `kubectl kustomize`), and its output goes through the same manifest
//! reader, canonical body and signature as a plain folder.
//!
//! The repository is untrusted input, so a build runs:
//! - on a copy of the commit's tree (regular files only: no symlinks, no submodules) in a fresh
//!   temporary folder, so it sees that commit and nothing else of the hub's disk;
//! - after a check of every kustomization file in the tree that refuses remote bases and
//!   resources (URLs, `git@…`, `host/org/repo//path?ref=…`), absolute paths and Helm charts;
//! - with load restrictions on (`--load-restrictor LoadRestrictionsRootOnly`), exec and Go
//!   plugins off (kustomize's defaults, never enabled here), Helm off;
//! - with an empty environment: `PATH` an empty folder (no `git` to clone with), `HOME` and the
//!   plugin home empty folders, and HTTP(S) proxies pointing at a closed port, so a fetch the
//!   check missed fails instead of reaching the network;
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
    /// Reading the commit or writing the copy failed.
    #[error("preparing the build: {0}")]
    Io(String),
    /// The commit could not be read.
    #[error(transparent)]
    Git(#[from] GitError),
}

/// A kustomize program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kustomize {
    program: PathBuf,
    /// `kubectl kustomize DIR` rather than `kustomize build DIR`.
    kubectl: bool,
}

impl Kustomize {
    /// The program at `path` (`kubectl` by file name, else a kustomize binary).
    pub fn at(path: impl Into<PathBuf>) -> Kustomize {
        let program = path.into();
        let kubectl = program
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("kubectl"));
        Kustomize { program, kubectl }
    }

    /// `configured` (a path, or a name looked up on `PATH`), else `kustomize` on `PATH`, else
    /// `kubectl` on `PATH`.
    pub fn find(configured: Option<&Path>) -> Result<Kustomize, KustomizeError> {
        let on_path = |name: &Path| -> Option<PathBuf> {
            if name.components().count() > 1 {
                return name.is_file().then(|| name.to_owned());
            }
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        };
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
        let work = tempfile::Builder::new()
            .prefix("outpost-kustomize-")
            .tempdir()
            .map_err(|error| KustomizeError::Io(error.to_string()))?;
        let tree = work.path().join("tree");
        let exists = |path: &str| {
            files
                .iter()
                .any(|file| file.path == path || file.path.starts_with(&format!("{path}/")))
        };
        // The kustomizations this build reaches: the bundle's, and those its resources,
        // bases and components name, transitively.
        let by_path: std::collections::HashMap<&str, &[u8]> = files
            .iter()
            .map(|file| (file.path.as_str(), file.bytes.as_slice()))
            .collect();
        let mut folders = vec![folder.trim_matches('/').to_owned()];
        let mut seen = std::collections::HashSet::new();
        while let Some(next) = folders.pop() {
            if !seen.insert(next.clone()) {
                continue;
            }
            let found = KUSTOMIZATION_FILES.iter().find_map(|name| {
                let path = match next.as_str() {
                    "" => (*name).to_owned(),
                    folder => format!("{folder}/{name}"),
                };
                by_path.get(path.as_str()).map(|bytes| (path, *bytes))
            });
            if let Some((path, bytes)) = found {
                folders.extend(check_kustomization(&path, bytes, &exists)?);
            }
        }
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
    /// same restrictions.
    pub fn build_local(&self, folder: &Path) -> Result<String, KustomizeError> {
        let work = tempfile::Builder::new()
            .prefix("outpost-kustomize-")
            .tempdir()
            .map_err(|error| KustomizeError::Io(error.to_string()))?;
        for entry in KUSTOMIZATION_FILES {
            if let Ok(bytes) = std::fs::read(folder.join(entry)) {
                // Paths resolve against the folder: the file is named relative to it.
                let exists = |relative: &str| folder.join(relative).exists();
                check_kustomization(entry, &bytes, &exists).map_err(|error| match error {
                    KustomizeError::Refused { file, message } => KustomizeError::Refused {
                        file: folder.join(file).display().to_string(),
                        message,
                    },
                    other => other,
                })?;
            }
        }
        self.run(work.path(), folder, &folder.display().to_string())
    }

    fn run(&self, work: &Path, dir: &Path, folder: &str) -> Result<String, KustomizeError> {
        let empty = work.join("empty");
        let home = work.join("home");
        for made in [&empty, &home] {
            std::fs::create_dir_all(made).map_err(|error| KustomizeError::Io(error.to_string()))?;
        }
        let mut command = Command::new(&self.program);
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

/// Whether a kustomization entry names something remote: a URL, an ssh address, a
/// `?ref=`/`?version=` query, or a `host.tld/…` path that is not a folder of the tree.
fn is_remote(entry: &str, local: &dyn Fn(&str) -> bool) -> bool {
    if entry.contains("://") || entry.starts_with("git@") || entry.contains("?ref=") {
        return true;
    }
    if entry.contains("?version=") || entry.contains("?timeout=") || entry.contains("?submodules=")
    {
        return true;
    }
    // `host.tld/org/repo…`, as kustomize reads a remote: more than one segment, a dot in the
    // first, and no such path in the tree.
    let mut segments = entry.split('/');
    let first = segments.next().unwrap_or_default();
    let host_like = first.contains('.')
        && first != "."
        && first != ".."
        && ![".yaml", ".yml", ".json"]
            .iter()
            .any(|extension| first.ends_with(extension));
    host_like && segments.next().is_some() && !local(entry)
}

/// Refuses what a kustomization may not ask for here. `file` is its path relative to the
/// repository root; `exists` says whether a path relative to the root exists in the tree.
/// Returns the paths (relative to the root) its resources, bases and components name, which
/// may be folders holding kustomizations of their own.
fn check_kustomization(
    file: &str,
    bytes: &[u8],
    exists: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, KustomizeError> {
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
    let resolve = |entry: &str| -> String {
        let mut parts: Vec<&str> = folder.split('/').filter(|part| !part.is_empty()).collect();
        for part in entry.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                part => parts.push(part),
            }
        }
        parts.join("/")
    };
    let local = |entry: &str| exists(&resolve(entry));
    for field in ["helmCharts", "helmGlobals", "helmChartInflationGenerator"] {
        if !value[field].is_null() {
            return Err(refuse(format!(
                "`{field}`: Helm charts are not rendered by the hub (no helm, and charts come from the network); render the chart into the repository instead"
            )));
        }
    }
    let mut named = Vec::new();
    for field in [
        "resources",
        "bases",
        "components",
        "crds",
        "generators",
        "transformers",
        "validators",
    ] {
        for entry in value[field].as_array().into_iter().flatten() {
            let Some(entry) = entry.as_str() else {
                continue;
            };
            if is_remote(entry, &local) {
                return Err(refuse(format!(
                    "`{field}` names {entry:?}, which is remote (no such path in this commit): bundles build from their own commit only; vendor it into the repository"
                )));
            }
            if entry.starts_with('/') {
                return Err(refuse(format!(
                    "`{field}` names the absolute path {entry:?}: name files of the repository, relative to the kustomization"
                )));
            }
            if matches!(field, "resources" | "bases" | "components") {
                named.push(resolve(entry));
            }
        }
    }
    Ok(named)
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
