//! The hub's configuration: a TOML file, then environment overrides, validated up front with
//! every problem reported at once.
//!
//! ```toml
//! data_dir = "/var/lib/outpost-hub"        # store, Git mirrors; required
//! key_dir = "/var/lib/outpost-hub/keys"    # optional; default: data_dir/keys
//! poll_interval_seconds = 60               # optional; default 60, at least 1
//!
//! [listen]                                 # optional
//! admin = "127.0.0.1:7070"                 # admin API (default shown)
//! agents = "0.0.0.0:7443"                  # QUIC for agents (default shown)
//! agents_public = "hub.example.com:7443"   # how agents reach it (enrolment bundles); default:
//!                                          # listen.agents, 0.0.0.0 read as 127.0.0.1
//!
//! [[sources]]                              # at least one
//! name = "fleet"                           # a-z, 0-9, '-'; unique
//! url = "https://git.example.com/fleet.git" # a path, file://, git://, ssh://, http(s)://
//! username = "outpost"                     # http(s) only, optional
//! password_env = "FLEET_GIT_TOKEN"         # or password_file = "/run/secrets/fleet-token"
//! track = "main"                           # branch (or full ref) agents run until a rollout
//!                                          # says otherwise; default main
//! ```
//!
//! Environment overrides: `OUTPOST_HUB_DATA_DIR`, `OUTPOST_HUB_KEY_DIR`,
//! `OUTPOST_HUB_POLL_INTERVAL_SECONDS`, `OUTPOST_HUB_LISTEN_ADMIN`, `OUTPOST_HUB_LISTEN_AGENTS`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::bundles::is_bundle_name;
use crate::git::{Credentials, GitError, GitSource};

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Store and Git mirrors.
    pub data_dir: PathBuf,
    /// Signing keys.
    pub key_dir: PathBuf,
    /// How often to fetch every source.
    pub poll_interval: Duration,
    /// Admin API address.
    pub listen_admin: SocketAddr,
    /// QUIC address for agents.
    pub listen_agents: SocketAddr,
    /// The address agents dial (written into enrolment bundles).
    pub agents_public: String,
    /// Git sources.
    pub sources: Vec<SourceConfig>,
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
    /// The full ref agents run by default (`refs/heads/main` unless configured).
    pub track: String,
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
    key_dir: Option<PathBuf>,
    poll_interval_seconds: Option<u64>,
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    sources: Vec<RawSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    admin: Option<String>,
    agents: Option<String>,
    agents_public: Option<String>,
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

        let data_dir = raw.data_dir.unwrap_or_default();
        if data_dir.as_os_str().is_empty() {
            problems.push("data_dir is required (or set OUTPOST_HUB_DATA_DIR)".to_owned());
        }
        let key_dir = raw.key_dir.unwrap_or_else(|| data_dir.join("keys"));
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
        let agents_public =
            raw.listen.agents_public.clone().unwrap_or_else(|| {
                match listen_agents.ip().is_unspecified() {
                    true => format!("127.0.0.1:{}", listen_agents.port()),
                    false => listen_agents.to_string(),
                }
            });
        if !agents_public.contains(':') {
            problems.push(format!(
                "listen.agents_public = {agents_public:?} needs a port, like \"hub.example.com:7443\""
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
            let track = match source.track.as_deref().unwrap_or("main") {
                full if full.starts_with("refs/") => full.to_owned(),
                branch => format!("refs/heads/{branch}"),
            };
            sources.push(SourceConfig {
                name: source.name.clone(),
                url: source.url.clone(),
                credentials,
                track,
            });
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Config {
            data_dir,
            key_dir,
            poll_interval: Duration::from_secs(poll_interval),
            listen_admin,
            listen_agents,
            agents_public,
            sources,
        })
    }
}

/// Resolves a source's credentials. Problems never quote the password.
fn credentials(
    source: &RawSource,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Credentials>, String> {
    let password = match (&source.password_env, &source.password_file) {
        (Some(_), Some(_)) => return Err("give password_env or password_file, not both".to_owned()),
        (Some(variable), None) => Some(
            env(variable)
                .ok_or_else(|| format!("password_env names {variable}, which is not set"))?,
        ),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|error| format!("password_file {}: {error}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, None) => None,
    };
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
                .with_credentials(source.credentials.clone()),
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
