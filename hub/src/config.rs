//! The hub's configuration: a TOML file, then environment overrides, validated up front with
//! every problem reported at once.
//!
//! ```toml
//! data_dir = "/var/lib/outpost-hub"        # store, Git mirrors; required
//! store = "sqlite"                         # optional: "sqlite" (data_dir/hub.db, the default)
//!                                          # or "postgres://USER@HOST:PORT/DB" for replicas
//! store_password_env = "OUTPOST_DB_PASS"   # or store_password_file: the database password
//! store_ca_file = "/etc/outpost/db-ca.pem" # TLS to the database, its certificate checked
//!                                          # against this CA (also: ?sslmode=require in the
//!                                          # URL, then the Mozilla roots without a CA file)
//! key_dir = "/var/lib/outpost-hub/keys"    # optional; default: data_dir/keys
//! poll_interval_seconds = 60               # optional; default 60, at least 1
//! insecure_admin = false                   # serve the admin API (and webhooks) as plain HTTP
//!                                          # on a non-loopback address; warned at every start
//! snapshot_lifetime = "30d"                # signed expiry of snapshots ("never": none);
//!                                          # signed again when a third is left; s, m, h, d
//! signing_certificate_days = 90            # lifetime of a signing key's certificate
//! key_rotation_grace_seconds = 300         # a new signing key is offered this long first
//! api_writes_per_second = 10               # per API token (bursts of five times that)
//! offline_after = "30m"                    # an agent not heard of this long: agent-offline event
//! push_payloads = true                     # small updates travel with the assignment (default)
//! kustomize = "/usr/local/bin/kustomize"   # builds kustomize bundles; default: kustomize, else
//!                                          # kubectl, on PATH
//! kustomize_isolation = "required"         # builds run in a network namespace of their own;
//!                                          # "none": build without one where the machine
//!                                          # cannot make one (warned at every start)
//!
//! [listen]                                 # optional
//! admin = "127.0.0.1:7070"                 # admin API (default shown)
//! admin_names = ["hub.example.com"]        # Host names the admin API answers to, besides
//!                                          # localhost and IP addresses (DNS rebinding)
//! hooks = "0.0.0.0:7071"                   # optional: Git webhooks on a listener of their own
//!                                          # (then not on the admin one)
//! agents = "0.0.0.0:7443"                  # QUIC for agents (default shown)
//! agents_public = "hub.example.com:7443"   # how agents reach it (enrolment bundles); default:
//!                                          # listen.agents, 0.0.0.0 read as 127.0.0.1;
//!                                          # replicas: "hub-a:7443,hub-b:7443" (tried in turn)
//!
//! [retention]                              # optional: what the store forgets (defaults shown)
//! events = "90d"                           # events older than this are deleted…
//! events_max = 1000000                     # …and the oldest beyond this many
//! status_history = "30d"                   # status reports kept as history (the last status
//! status_history_max = 1000000             # of each agent and bundle always stays)
//! snapshots_kept = 10                      # newest generations per bundle kept regardless;
//!                                          # older ones go once nothing references them
//! every = "1h"                             # how often retention runs
//!
//! [tls]                                    # optional: HTTPS for the admin and hooks listeners
//! cert = "/etc/outpost-hub/tls.crt"        # PEM certificate chain
//! key = "/etc/outpost-hub/tls.key"         # PEM private key (PKCS#8, RSA or SEC1)
//!
//! [[sources]]                              # at least one
//! name = "fleet"                           # a-z, 0-9, '-'; unique
//! url = "https://git.example.com/fleet.git" # a path, file://, git://, ssh://, http(s)://
//! username = "outpost"                     # http(s) only, optional
//! password_env = "FLEET_GIT_TOKEN"         # or password_file = "/run/secrets/fleet-token"
//! track = "main"                           # branch (or full ref) agents run until a rollout
//!                                          # says otherwise; default: the remote's default
//!                                          # branch (its HEAD)
//!                                          # says otherwise; default main
//! verify = { keys = ["/etc/outpost/allowed_signers"], mode = "commits" }
//!                                          # optional: release only commits ("tags": only
//!                                          # annotated tags) SSH-signed by these signers
//! webhook_secret_env = "FLEET_HOOK_SECRET" # or webhook_secret_file: enables
//!                                          # POST /hooks/git/fleet (GitHub, GitLab, Gitea)
//! ```
//!
//! Environment overrides: `OUTPOST_HUB_STORE`, `OUTPOST_HUB_DATA_DIR`, `OUTPOST_HUB_KEY_DIR`,
//! `OUTPOST_HUB_POLL_INTERVAL_SECONDS`, `OUTPOST_HUB_LISTEN_ADMIN`, `OUTPOST_HUB_LISTEN_AGENTS`,
//! `OUTPOST_HUB_LISTEN_HOOKS`, `OUTPOST_HUB_INSECURE_ADMIN` (`true`/`false`),
//! `OUTPOST_HUB_PUSH_PAYLOADS` (`true`/`false`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::bundles::is_bundle_name;
use crate::git::{Credentials, GitError, GitSource};
use crate::keys::{DAY, KeyPolicy};
use crate::store::Retention;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Store and Git mirrors.
    pub data_dir: PathBuf,
    /// Where the store lives.
    pub store: StoreConfig,
    /// Signing keys.
    pub key_dir: PathBuf,
    /// How often to fetch every source.
    pub poll_interval: Duration,
    /// Admin API address.
    pub listen_admin: SocketAddr,
    /// Host names the admin API answers to, besides `localhost` and IP addresses.
    pub admin_names: Vec<String>,
    /// A listener of its own for Git webhooks, if configured.
    pub listen_hooks: Option<SocketAddr>,
    /// Certificate and key for HTTPS on the admin and hooks listeners.
    pub tls: Option<TlsFiles>,
    /// Plain HTTP on a non-loopback admin or hooks address, explicitly allowed.
    pub insecure_admin: bool,
    /// QUIC address for agents.
    pub listen_agents: SocketAddr,
    /// The address agents dial (written into enrolment bundles).
    pub agents_public: String,
    /// How keys and snapshots age.
    pub key_policy: KeyPolicy,
    /// API writes per token per second.
    pub api_writes_per_second: f64,
    /// What the store forgets.
    pub retention: Retention,
    /// How often retention runs.
    pub retention_every: Duration,
    /// Where events are sent (`[[notify]]`).
    pub notify: Vec<crate::notify::Receiver>,
    /// An agent not heard of for this long is recorded as offline (`agent-offline`); none: never.
    pub offline_after: Option<Duration>,
    /// Push payloads up to 64 KiB ahead of the assignment that names them (the default); with
    /// `false` every agent fetches what it is assigned.
    pub push_payloads: bool,
    /// Git sources.
    pub sources: Vec<SourceConfig>,
}

/// Which store the hub keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// One SQLite file, `data_dir/hub.db`: one hub.
    Sqlite,
    /// A PostgreSQL database shared by replicas.
    Postgres {
        /// `postgres://USER@HOST:PORT/DATABASE` (a password in it is better given apart).
        url: String,
        /// The password, from `store_password_env` or `store_password_file`.
        password: Option<Secret>,
        /// The CA that signed the database's certificate (PEM): connections are TLS.
        ca_file: Option<PathBuf>,
    },
}

/// PEM files for HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// A secret read at start (from the environment or a file); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(elided)")
    }
}

/// One Git source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Name, unique among sources.
    pub name: String,
    /// URL or path.
    pub url: String,
    /// For http(s): user and password or token, read from the environment or a file at start.
    pub credentials: Option<Credentials>,
    /// The full ref agents run by default; `None`: the remote's default branch (its HEAD, as
    /// last fetched; see [`SourceConfig::track_in`]).
    pub track: Option<String>,
    /// The webhook secret: `POST /hooks/git/<name>` is served only when one is set.
    pub webhook_secret: Option<Secret>,
    /// The program that builds kustomize bundles (the config's `kustomize`; none: `kustomize`,
    /// else `kubectl`, on `PATH`).
    pub kustomize: Option<PathBuf>,
    /// Build kustomize bundles without a network namespace where none can be made
    /// (`kustomize_isolation = "none"`).
    pub kustomize_unisolated: bool,
    /// Release only commits (or tags) signed by these keys (`verify`; none: Git is trusted as
    /// it is).
    pub verify: Option<std::sync::Arc<crate::signed::VerifyPolicy>>,
}

impl SourceConfig {
    /// The full ref agents run by default: the configured one, else the default branch of the
    /// remote as `git` last saw it (`refs/heads/main` before anything was fetched).
    pub fn track_in(&self, git: &GitSource) -> String {
        self.track
            .clone()
            .or_else(|| git.default_branch())
            .unwrap_or_else(|| "refs/heads/main".to_owned())
    }

    /// The tracked ref as configured, for people (`HEAD` when it follows the remote's default).
    pub fn track_label(&self) -> String {
        self.track
            .clone()
            .unwrap_or_else(|| "HEAD (the remote's default branch)".to_owned())
    }
}

/// Every problem found in a configuration, one per line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid hub configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// The problems.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    store: Option<String>,
    store_password_env: Option<String>,
    store_password_file: Option<PathBuf>,
    store_ca_file: Option<PathBuf>,
    key_dir: Option<PathBuf>,
    poll_interval_seconds: Option<u64>,
    insecure_admin: Option<bool>,
    snapshot_lifetime: Option<String>,
    offline_after: Option<String>,
    push_payloads: Option<bool>,
    signing_certificate_days: Option<u64>,
    key_rotation_grace_seconds: Option<u64>,
    api_writes_per_second: Option<f64>,
    kustomize: Option<PathBuf>,
    kustomize_isolation: Option<String>,
    #[serde(default)]
    listen: RawListen,
    tls: Option<RawTls>,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    sources: Vec<RawSource>,
    #[serde(default)]
    notify: Vec<RawNotify>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    name: String,
    kind: String,
    url: Option<String>,
    url_env: Option<String>,
    url_file: Option<PathBuf>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    events: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    events: Option<String>,
    events_max: Option<u64>,
    status_history: Option<String>,
    status_history_max: Option<u64>,
    snapshots_kept: Option<u64>,
    every: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    admin: Option<String>,
    #[serde(default)]
    admin_names: Vec<String>,
    hooks: Option<String>,
    agents: Option<String>,
    agents_public: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    url: String,
    username: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    track: Option<String>,
    webhook_secret_env: Option<String>,
    webhook_secret_file: Option<PathBuf>,
    verify: Option<RawVerify>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    #[serde(default)]
    keys: Vec<PathBuf>,
    mode: Option<String>,
    #[serde(default)]
    allow_rewrite_to: Vec<String>,
}

impl Config {
    /// Parses `text` (TOML), applies overrides from `env`, validates. `env` is injected so tests
    /// do not touch the process environment.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut raw: RawConfig = toml::from_str(text).map_err(|error| ConfigError {
            problems: vec![error.to_string().trim().replace('\n', " ")],
        })?;
        if let Some(value) = env("OUTPOST_HUB_DATA_DIR") {
            raw.data_dir = Some(value.into());
        }
        if let Some(value) = env("OUTPOST_HUB_STORE") {
            raw.store = Some(value);
        }
        if let Some(value) = env("OUTPOST_HUB_KEY_DIR") {
            raw.key_dir = Some(value.into());
        }
        if let Some(value) = env("OUTPOST_HUB_POLL_INTERVAL_SECONDS") {
            match value.parse() {
                Ok(seconds) => raw.poll_interval_seconds = Some(seconds),
                Err(_) => problems.push(format!(
                    "OUTPOST_HUB_POLL_INTERVAL_SECONDS={value:?} is not a whole number of seconds"
                )),
            }
        }
        if let Some(value) = env("OUTPOST_HUB_LISTEN_ADMIN") {
            raw.listen.admin = Some(value);
        }
        if let Some(value) = env("OUTPOST_HUB_LISTEN_AGENTS") {
            raw.listen.agents = Some(value);
        }
        if let Some(value) = env("OUTPOST_HUB_LISTEN_HOOKS") {
            raw.listen.hooks = Some(value);
        }
        if let Some(value) = env("OUTPOST_HUB_PUSH_PAYLOADS") {
            match value.as_str() {
                "true" | "1" => raw.push_payloads = Some(true),
                "false" | "0" => raw.push_payloads = Some(false),
                _ => problems.push(format!(
                    "OUTPOST_HUB_PUSH_PAYLOADS={value:?}: write true or false"
                )),
            }
        }
        if let Some(value) = env("OUTPOST_HUB_INSECURE_ADMIN") {
            match value.as_str() {
                "true" | "1" => raw.insecure_admin = Some(true),
                "false" | "0" => raw.insecure_admin = Some(false),
                _ => problems.push(format!(
                    "OUTPOST_HUB_INSECURE_ADMIN={value:?}: write true or false"
                )),
            }
        }

        let data_dir = raw.data_dir.unwrap_or_default();
        if data_dir.as_os_str().is_empty() {
            problems.push("data_dir is required (or set OUTPOST_HUB_DATA_DIR)".to_owned());
        }
        let key_dir = raw.key_dir.unwrap_or_else(|| data_dir.join("keys"));
        let password = secret(
            "store_password",
            raw.store_password_env.as_deref(),
            raw.store_password_file.as_deref(),
            &env,
        )
        .unwrap_or_else(|problem| {
            problems.push(problem);
            None
        });
        let store = match raw.store.as_deref().map(str::trim) {
            None | Some("sqlite") => {
                if password.is_some() {
                    problems.push("store_password_env/store_password_file are for store = \"postgres://…\"; the SQLite store has no password".to_owned());
                }
                if raw.store_ca_file.is_some() {
                    problems.push("store_ca_file is for store = \"postgres://…\"; the SQLite store is a local file".to_owned());
                }
                StoreConfig::Sqlite
            }
            Some(url) if crate::store::postgres::is_postgres_url(url) => {
                if let Err(error) = url.parse::<tokio_postgres::Config>() {
                    problems.push(format!(
                        "store = {:?}: {error}; write postgres://USER@HOST:PORT/DATABASE",
                        crate::store::postgres::redact(url)
                    ));
                }
                if let Some(file) = &raw.store_ca_file
                    && !file.is_file()
                {
                    problems.push(format!(
                        "store_ca_file {}: no such file; give the PEM file of the CA that signed the database server's certificate",
                        file.display()
                    ));
                }
                StoreConfig::Postgres {
                    url: url.to_owned(),
                    password: password.map(Secret),
                    ca_file: raw.store_ca_file.clone(),
                }
            }
            Some(other) => {
                problems.push(format!(
                    "store = {:?}: write \"sqlite\" or a PostgreSQL URL like \"postgres://outpost@db.example.com:5432/outpost\"",
                    crate::store::postgres::redact(other)
                ));
                StoreConfig::Sqlite
            }
        };
        let poll_interval = raw.poll_interval_seconds.unwrap_or(60);
        if poll_interval == 0 {
            problems.push("poll_interval_seconds must be at least 1".to_owned());
        }
        let mut address = |field: &str, value: Option<String>, default: &str| {
            let value = value.unwrap_or_else(|| default.to_owned());
            value.parse::<SocketAddr>().unwrap_or_else(|_| {
                problems.push(format!(
                    "listen.{field} = {value:?} is not an address like \"{default}\""
                ));
                default.parse().expect("default address parses")
            })
        };
        let listen_admin = address("admin", raw.listen.admin, "127.0.0.1:7070");
        let listen_agents = address("agents", raw.listen.agents, "0.0.0.0:7443");
        let listen_hooks = raw
            .listen
            .hooks
            .map(|hooks| address("hooks", Some(hooks), "127.0.0.1:7071"));
        let tls = raw.tls.map(|tls| TlsFiles {
            cert: tls.cert,
            key: tls.key,
        });
        if let Some(tls) = &tls {
            for (field, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if let Err(error) = std::fs::metadata(path) {
                    problems.push(format!("tls.{field} = {}: {error}", path.display()));
                }
            }
        }
        let insecure_admin = raw.insecure_admin.unwrap_or(false);
        for (field, listener) in [("admin", Some(listen_admin)), ("hooks", listen_hooks)] {
            if let Some(listener) = listener
                && !listener.ip().is_loopback()
                && tls.is_none()
                && !insecure_admin
            {
                problems.push(format!(
                    "listen.{field} = \"{listener}\" is not a loopback address, and without [tls] API tokens and webhook secrets would cross the network in clear: add [tls] cert and key, or set insecure_admin = true if a TLS proxy in front of the hub takes care of it"
                ));
            }
        }
        let mut admin_names = Vec::new();
        for name in raw.listen.admin_names {
            let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if valid {
                admin_names.push(name);
            } else {
                problems.push(format!(
                    "listen.admin_names: {name:?} is not a host name like \"hub.example.com\" (no port, no scheme)"
                ));
            }
        }
        let certificate_days = raw.signing_certificate_days.unwrap_or(90);
        if certificate_days == 0 {
            problems.push("signing_certificate_days must be at least 1".to_owned());
        }
        let certificate_lifetime = certificate_days.clamp(1, 36_500) as i64 * DAY;
        let snapshot_lifetime = match raw.snapshot_lifetime.as_deref().map(str::trim) {
            None => Some(30 * DAY),
            Some("never") => None,
            Some(text) => match parse_duration(text) {
                Some(seconds) if seconds >= 10 => Some(seconds),
                _ => {
                    problems.push(format!(
                        "snapshot_lifetime = {text:?}: write a duration of at least 10s, such as \"30d\" or \"12h\", or \"never\""
                    ));
                    None
                }
            },
        };
        let key_policy = KeyPolicy {
            certificate_lifetime,
            rotation_grace: raw
                .key_rotation_grace_seconds
                .unwrap_or(300)
                .min(30 * 86_400) as i64,
            snapshot_lifetime,
        };
        let defaults = Retention::default();
        let mut age = |field: &str, text: Option<&str>, default: i64, least: i64| match text {
            None => default,
            Some(text) => match parse_duration(text.trim()) {
                Some(seconds) if seconds >= least => seconds,
                _ => {
                    problems.push(format!(
                        "retention.{field} = {text:?}: write a duration of at least {least}s, such as \"30d\" or \"12h\""
                    ));
                    default
                }
            },
        };
        let events_age = age(
            "events",
            raw.retention.events.as_deref(),
            defaults.events_age,
            60,
        );
        let history_age = age(
            "status_history",
            raw.retention.status_history.as_deref(),
            defaults.history_age,
            60,
        );
        let retention_every = age("every", raw.retention.every.as_deref(), 3_600, 10);
        let mut count = |field: &str, value: Option<u64>, default: u64| match value {
            Some(0) => {
                problems.push(format!("retention.{field} must be at least 1"));
                default
            }
            Some(value) => value,
            None => default,
        };
        let retention = Retention {
            events_age,
            events_max: count("events_max", raw.retention.events_max, defaults.events_max),
            history_age,
            history_max: count(
                "status_history_max",
                raw.retention.status_history_max,
                defaults.history_max,
            ),
            snapshots_kept: count(
                "snapshots_kept",
                raw.retention.snapshots_kept,
                defaults.snapshots_kept,
            ),
        };
        let api_writes_per_second = raw.api_writes_per_second.unwrap_or(10.0);
        if !(api_writes_per_second.is_finite() && api_writes_per_second > 0.0) {
            problems.push("api_writes_per_second must be a positive number".to_owned());
        }
        let agents_public =
            raw.listen.agents_public.clone().unwrap_or_else(|| {
                match listen_agents.ip().is_unspecified() {
                    true => format!("127.0.0.1:{}", listen_agents.port()),
                    false => listen_agents.to_string(),
                }
            });
        let addresses: Vec<&str> = agents_public
            .split(',')
            .map(str::trim)
            .filter(|address| !address.is_empty())
            .collect();
        if addresses.is_empty() {
            problems.push("listen.agents_public is empty; give the address agents dial, like \"hub.example.com:7443\"".to_owned());
        }
        for address in addresses.iter().filter(|address| !address.contains(':')) {
            problems.push(format!(
                "listen.agents_public: {address:?} needs a port, like \"hub.example.com:7443\" (replicas: several, separated by commas)"
            ));
        }
        if listen_admin == listen_agents {
            problems.push(format!(
                "listen.admin and listen.agents are both {listen_admin}"
            ));
        }
        if raw.sources.is_empty() {
            problems.push(
                "at least one [[sources]] entry with a name and a url is required".to_owned(),
            );
        }
        let kustomize_unisolated = match raw.kustomize_isolation.as_deref() {
            None | Some("required") => false,
            Some("none") => true,
            Some(other) => {
                problems.push(format!(
                    "kustomize_isolation = {other:?}: write \"required\" (the default: builds run in a network namespace of their own) or \"none\""
                ));
                false
            }
        };
        let mut names = std::collections::BTreeSet::new();
        let mut sources = Vec::new();
        for (index, source) in raw.sources.iter().enumerate() {
            let at = format!("sources[{index}] ({})", source.name);
            if !is_bundle_name(&source.name) {
                problems.push(format!(
                    "{at}: name must be 1-63 characters of a-z, 0-9 and '-'"
                ));
            }
            if !names.insert(source.name.as_str()) {
                problems.push(format!("{at}: name is used by an earlier source"));
            }
            if let Some(problem) = url_problem(&source.url) {
                problems.push(format!("{at}: {problem}"));
            }
            let credentials = match credentials(source, &env) {
                Ok(credentials) => credentials,
                Err(problem) => {
                    problems.push(format!("{at}: {problem}"));
                    None
                }
            };
            let track = source.track.as_deref().map(|track| match track {
                full if full.starts_with("refs/") => full.to_owned(),
                branch => format!("refs/heads/{branch}"),
            });
            let webhook_secret = match secret(
                "webhook_secret",
                source.webhook_secret_env.as_deref(),
                source.webhook_secret_file.as_deref(),
                &env,
            ) {
                Ok(Some(secret)) if secret.len() < 16 => {
                    problems.push(format!(
                        "{at}: the webhook secret is {} characters; use at least 16 random ones (e.g. `openssl rand -hex 32`)",
                        secret.len()
                    ));
                    None
                }
                Ok(secret) => secret.map(Secret),
                Err(problem) => {
                    problems.push(format!("{at}: {problem}"));
                    None
                }
            };
            sources.push(SourceConfig {
                name: source.name.clone(),
                url: source.url.clone(),
                credentials,
                track,
                webhook_secret,
                kustomize: raw.kustomize.clone(),
                kustomize_unisolated,
                verify: source.verify.as_ref().and_then(|verify| {
                    let mode = match verify.mode.as_deref() {
                        None | Some("commits") => crate::signed::VerifyMode::Commits,
                        Some("tags") => crate::signed::VerifyMode::Tags,
                        Some(other) => {
                            problems.push(format!(
                                "{at}: verify.mode = {other:?}: write \"commits\" (every ref's commit signed) or \"tags\" (only signed tags released)"
                            ));
                            return None;
                        }
                    };
                    if verify.keys.is_empty() {
                        problems.push(format!(
                            "{at}: verify.keys names no file: list allowed-signers files (OpenSSH format, as git's gpg.ssh.allowedSignersFile)"
                        ));
                        return None;
                    }
                    match crate::signed::AllowedSigners::load(&verify.keys) {
                        Ok(signers) => Some(std::sync::Arc::new(crate::signed::VerifyPolicy {
                            mode,
                            signers,
                            files: verify.keys.clone(),
                            allow_rewrite_to: verify.allow_rewrite_to.clone(),
                        })),
                        Err(problem) => {
                            problems.push(format!("{at}: verify.keys: {problem}"));
                            None
                        }
                    }
                }),
            });
        }
        let notify = receivers(&raw.notify, &env, &mut problems);
        let offline_after = match raw.offline_after.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => match parse_duration(text) {
                Some(seconds) if seconds >= 2 => Some(Duration::from_secs(seconds as u64)),
                _ => {
                    problems.push(format!(
                        "offline_after = {text:?}: write a duration of at least 2s, such as \"30m\" or \"2h\""
                    ));
                    None
                }
            },
        };
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Config {
            data_dir,
            store,
            key_dir,
            poll_interval: Duration::from_secs(poll_interval),
            listen_admin,
            admin_names,
            listen_hooks,
            tls,
            insecure_admin,
            listen_agents,
            agents_public,
            key_policy,
            api_writes_per_second,
            retention,
            retention_every: Duration::from_secs(retention_every as u64),
            sources,
            notify,
            offline_after,
            push_payloads: raw.push_payloads.unwrap_or(true),
        })
    }

    /// Warnings to log at every start (the configuration is valid, but an operator should know).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let StoreConfig::Postgres { url, .. } = &self.store
            && crate::store::postgres::redact(url) != *url
        {
            warnings.push("store: the URL holds a password; anyone who can read the config file can read it: give it with store_password_env or store_password_file instead".to_owned());
        }
        if self.insecure_admin && self.tls.is_none() {
            for (field, listener) in [
                ("admin", Some(self.listen_admin)),
                ("hooks", self.listen_hooks),
            ] {
                if let Some(listener) = listener
                    && !listener.ip().is_loopback()
                {
                    warnings.push(format!(
                        "insecure_admin = true: listen.{field} {listener} serves plain HTTP; API tokens and webhook secrets cross the network in clear unless a TLS proxy fronts the hub"
                    ));
                }
            }
        }
        warnings
    }
}

/// The `[[notify]]` receivers; problems go to `problems`, never quoting a URL or secret.
fn receivers(
    raw: &[RawNotify],
    env: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<crate::notify::Receiver> {
    use crate::notify::{DEFAULT_EVENTS, Receiver, ReceiverKind};
    let mut names = std::collections::BTreeSet::new();
    let mut receivers = Vec::new();
    for (index, entry) in raw.iter().enumerate() {
        let at = format!("notify[{index}] ({})", entry.name);
        if entry.name.is_empty()
            || !entry
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!("{at}: name must be letters, digits, '-' or '_'"));
        }
        if !names.insert(entry.name.clone()) {
            problems.push(format!("{at}: another receiver has this name"));
        }
        let url = match (&entry.url, &entry.url_env, &entry.url_file) {
            (Some(url), None, None) => Some(url.clone()),
            (None, variable, file) if variable.is_some() || file.is_some() => {
                match secret("url", variable.as_deref(), file.as_deref(), env) {
                    Ok(url) => url,
                    Err(problem) => {
                        problems.push(format!("{at}: {problem}"));
                        None
                    }
                }
            }
            (None, None, None) => {
                problems.push(format!(
                    "{at}: give url (or url_env / url_file: a Slack URL is a secret)"
                ));
                None
            }
            _ => {
                problems.push(format!("{at}: give one of url, url_env, url_file"));
                None
            }
        };
        if let Some(url) = &url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            problems.push(format!("{at}: the URL must start with https:// or http://"));
        }
        let secret_value = match secret(
            "secret",
            entry.secret_env.as_deref(),
            entry.secret_file.as_deref(),
            env,
        ) {
            Ok(value) => value,
            Err(problem) => {
                problems.push(format!("{at}: {problem}"));
                None
            }
        };
        let kind = match entry.kind.as_str() {
            "webhook" => Some(ReceiverKind::Webhook {
                secret: secret_value,
            }),
            "slack" | "alertmanager" if secret_value.is_some() => {
                problems.push(format!(
                    "{at}: secret_env / secret_file sign webhook bodies; a {} receiver takes none",
                    entry.kind
                ));
                None
            }
            "slack" => Some(ReceiverKind::Slack),
            "alertmanager" => Some(ReceiverKind::Alertmanager),
            other => {
                problems.push(format!(
                    "{at}: kind {other:?} is not one of webhook, slack, alertmanager"
                ));
                None
            }
        };
        let events = match &entry.events {
            None => DEFAULT_EVENTS
                .iter()
                .map(|kind| (*kind).to_owned())
                .collect(),
            Some(events) => {
                for event in events {
                    if event.is_empty()
                        || !event.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    {
                        problems.push(format!(
                            "{at}: event {event:?} is not an event kind (e.g. rollout-paused)"
                        ));
                    }
                }
                events.clone()
            }
        };
        if let (Some(kind), Some(url)) = (kind, url) {
            receivers.push(Receiver {
                name: entry.name.clone(),
                kind,
                url,
                events,
            });
        }
    }
    receivers
}

/// Reads the secret `{field}_env` or `{field}_file` names (one of them). Problems never quote
/// the secret.
fn secret(
    field: &str,
    variable: Option<&str>,
    file: Option<&std::path::Path>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    match (variable, file) {
        (Some(_), Some(_)) => Err(format!("give {field}_env or {field}_file, not both")),
        (Some(variable), None) => env(variable)
            .map(Some)
            .ok_or_else(|| format!("{field}_env names {variable}, which is not set")),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim_end_matches(['\n', '\r']).to_owned()))
            .map_err(|error| format!("{field}_file {}: {error}", path.display())),
        (None, None) => Ok(None),
    }
}

/// `90s`, `10m`, `12h`, `30d` (a bare number is seconds) → seconds.
fn parse_duration(text: &str) -> Option<i64> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => DAY,
        _ => return None,
    };
    number.parse::<i64>().ok()?.checked_mul(scale)
}

/// Resolves a source's credentials. Problems never quote the password.
fn credentials(
    source: &RawSource,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, String> {
    let password = secret(
        "password",
        source.password_env.as_deref(),
        source.password_file.as_deref(),
        env,
    )?;
    let is_http = source.url.starts_with("http://") || source.url.starts_with("https://");
    match (&source.username, password) {
        (None, None) => Ok(None),
        (Some(_), None) => Err("username needs password_env or password_file".to_owned()),
        (_, Some(_)) if !is_http => Err(
            "credentials are used for http(s) sources only; ssh uses the system's ssh keys"
                .to_owned(),
        ),
        (username, Some(password)) => Ok(Some(Credentials {
            // Hosting services accept any user name with an access token.
            username: username.clone().unwrap_or_else(|| "outpost".to_owned()),
            password,
        })),
    }
}

impl Config {
    /// Where a source's bare mirror lives: `data_dir/git/<name>`.
    pub fn mirror_path(&self, source: &SourceConfig) -> PathBuf {
        self.data_dir.join("git").join(&source.name)
    }

    /// Opens (creating if needed) a source's mirror, with its credentials.
    pub fn open_source(&self, source: &SourceConfig) -> Result<GitSource, GitError> {
        Ok(
            GitSource::open_or_init(&source.url, &self.mirror_path(source))?
                .with_credentials(source.credentials.clone())
                .with_kustomize(source.kustomize.clone(), source.kustomize_unisolated)
                .with_verify(source.verify.clone()),
        )
    }
}

fn url_problem(url: &str) -> Option<String> {
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        None if url.starts_with('/') => None,
        None => Some(format!(
            "url {url:?} must be an absolute path or a file://, git://, ssh:// or http(s):// URL"
        )),
        Some("file" | "git" | "ssh" | "http" | "https") => None,
        Some(other) => Some(format!(
            "url {url:?}: unknown scheme {other:?}; use file://, git://, ssh:// or https://"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = Config::parse(
            "data_dir = \"/var/lib/hub\"\n[[sources]]\nname = \"fleet\"\nurl = \"git://git.example/fleet.git\"\n",
            no_env,
        )
        .unwrap();
        assert_eq!(config.key_dir, PathBuf::from("/var/lib/hub/keys"));
        assert_eq!(config.poll_interval, Duration::from_secs(60));
        assert_eq!(config.listen_admin.to_string(), "127.0.0.1:7070");
        assert_eq!(config.sources[0].name, "fleet");
        assert_eq!(config.retention, Retention::default());
        assert_eq!(config.retention_every, Duration::from_secs(3_600));
    }

    #[test]
    fn receivers_read_their_secrets_and_every_mistake_is_named() {
        let base = "data_dir = \"/d\"\n[[sources]]\nname = \"fleet\"\nurl = \"/git\"\n";
        let env = |name: &str| match name {
            "HOOK" => Some("s3cret".to_owned()),
            "SLACK" => Some("https://hooks.slack.example/T000/B000/XXXX".to_owned()),
            _ => None,
        };
        let config = Config::parse(
            &format!("{base}[[notify]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"https://ops.example/hook\"\nsecret_env = \"HOOK\"\n[[notify]]\nname = \"chat\"\nkind = \"slack\"\nurl_env = \"SLACK\"\nevents = [\"rollout-paused\"]\n"),
            env,
        )
        .unwrap();
        assert_eq!(config.notify.len(), 2);
        assert_eq!(
            config.notify[0].kind,
            crate::notify::ReceiverKind::Webhook {
                secret: Some("s3cret".to_owned())
            }
        );
        assert_eq!(
            config.notify[0].events.len(),
            crate::notify::DEFAULT_EVENTS.len()
        );
        assert_eq!(config.notify[1].events, ["rollout-paused"]);
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("XXXX"),
            "{shown}"
        );
        let error = Config::parse(
            &format!("{base}[[notify]]\nname = \"a\"\nkind = \"pager\"\nurl = \"ftp://x\"\n[[notify]]\nname = \"a\"\nkind = \"slack\"\nsecret_env = \"HOOK\"\n[[notify]]\nname = \"b\"\nkind = \"webhook\"\nurl_env = \"NOPE\"\nevents = [\"Rollout Paused\"]\n"),
            env,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "kind \"pager\" is not one of",
            "must start with https://",
            "another receiver has this name",
            "give url",
            "a slack receiver takes none",
            "NOPE, which is not set",
            "\"Rollout Paused\" is not an event kind",
        ] {
            assert!(error.contains(expected), "{expected:?} missing in {error}");
        }
    }

    #[test]
    fn retention_reads_durations_and_counts_and_names_mistakes() {
        let base = "data_dir = \"/d\"\n[[sources]]\nname = \"fleet\"\nurl = \"/git\"\n";
        let config = Config::parse(
            &format!("{base}[retention]\nevents = \"7d\"\nstatus_history_max = 500\nsnapshots_kept = 3\nevery = \"15m\"\n"),
            no_env,
        )
        .unwrap();
        assert_eq!(config.retention.events_age, 7 * 86_400);
        assert_eq!(config.retention.history_max, 500);
        assert_eq!(config.retention.snapshots_kept, 3);
        assert_eq!(config.retention_every, Duration::from_secs(900));
        let error = Config::parse(
            &format!("{base}[retention]\nevents = \"soon\"\nsnapshots_kept = 0\n"),
            no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("retention.events = \"soon\""), "{error}");
        assert!(
            error.contains("retention.snapshots_kept must be at least 1"),
            "{error}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = |name: &str| match name {
            "OUTPOST_HUB_DATA_DIR" => Some("/data".to_owned()),
            "OUTPOST_HUB_POLL_INTERVAL_SECONDS" => Some("5".to_owned()),
            "OUTPOST_HUB_LISTEN_ADMIN" => Some("127.0.0.1:9000".to_owned()),
            _ => None,
        };
        let config = Config::parse(
            "data_dir = \"/var/lib/hub\"\n[[sources]]\nname = \"a\"\nurl = \"/srv/git/a\"\n",
            env,
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/data"));
        assert_eq!(config.poll_interval, Duration::from_secs(5));
        assert_eq!(config.listen_admin.to_string(), "127.0.0.1:9000");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let error = Config::parse(
            "poll_interval_seconds = 0\n[listen]\nadmin = \"nowhere\"\n[[sources]]\nname = \"Bad\"\nurl = \"https://example.com/x.git\"\npassword_env = \"NOT_SET\"\n[[sources]]\nname = \"Bad\"\nurl = \"relative/path\"\n",
            no_env,
        )
        .unwrap_err();
        let text = error.to_string();
        for expected in [
            "data_dir is required",
            "poll_interval_seconds must be at least 1",
            "listen.admin = \"nowhere\"",
            "sources[0] (Bad): name must be",
            "password_env names NOT_SET, which is not set",
            "sources[1] (Bad): name is used",
            "must be an absolute path",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(error.problems.len(), 8, "{text}");
    }

    #[test]
    fn credentials_come_from_env_or_file_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "data_dir = \"/d\"\n[[sources]]\nname = \"a\"\nurl = \"https://h/a.git\"\nusername = \"bot\"\npassword_env = \"TOKEN\"\n[[sources]]\nname = \"b\"\nurl = \"https://h/b.git\"\npassword_file = \"{}\"\n",
            file.display()
        );
        let config =
            Config::parse(&text, |name| (name == "TOKEN").then(|| "s3cret".to_owned())).unwrap();
        assert_eq!(
            config.sources[0].credentials,
            Some(Credentials {
                username: "bot".into(),
                password: "s3cret".into()
            })
        );
        assert_eq!(
            config.sources[1].credentials.as_ref().unwrap().password,
            "from-file"
        );
        assert!(!format!("{config:?}").contains("s3cret"));
        let error = Config::parse(
            "data_dir = \"/d\"\n[[sources]]\nname = \"a\"\nurl = \"git://h/a\"\nusername = \"bot\"\npassword_env = \"TOKEN\"\n",
            |name| (name == "TOKEN").then(|| "s3cret".to_owned()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("http(s) sources only") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn a_database_ca_file_is_for_postgres_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("db-ca.pem");
        std::fs::write(&ca, "PEM").unwrap();
        let text = format!(
            "data_dir = \"/d\"\nstore = \"postgres://outpost@db.example.com/outpost\"\nstore_ca_file = \"{}\"\n[[sources]]\nname = \"a\"\nurl = \"https://h/a.git\"\n",
            ca.display()
        );
        match Config::parse(&text, no_env).unwrap().store {
            StoreConfig::Postgres { ca_file, .. } => assert_eq!(ca_file, Some(ca.clone())),
            other => panic!("{other:?}"),
        }
        let missing = text.replace("db-ca.pem", "gone.pem");
        let error = Config::parse(&missing, no_env).unwrap_err().to_string();
        assert!(error.contains("gone.pem: no such file"), "{error}");
        let error = Config::parse(
            &format!("data_dir = \"/d\"\nstore_ca_file = \"{}\"\n", ca.display()),
            no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("store_ca_file is for store = \"postgres"),
            "{error}"
        );
    }

    #[test]
    fn typos_and_bad_toml_are_refused() {
        assert!(
            Config::parse("data_dri = \"/x\"\n", no_env)
                .unwrap_err()
                .to_string()
                .contains("data_dri")
        );
        assert!(Config::parse("data_dir = \n", no_env).is_err());
    }
}
