//! The agent's configuration: an optional TOML file, then environment overrides, then command
//! line flags; every problem is reported at once.
//!
//! ```toml
//! state_dir = "/var/lib/outpost-agent"          # key, database; default shown
//! enrolment_bundle = "/etc/outpost-agent/enrol.toml"  # `run` enrols with it if not enrolled yet
//! hub = "hub.example.com:7443"                  # overrides the address from enrolment (hub moved);
//!                                               # several (replicas): "hub-a:7443,hub-b:7443"
//! metrics_address = "127.0.0.1:9464"  # /metrics, /live, /ready over plain HTTP; default: none
//!
//! [cluster]
//! target = "auto"        # auto | kubeconfig | in-cluster | none (cache snapshots only)
//! kubeconfig = "/etc/rancher/k3s/k3s.yaml"      # for target = "kubeconfig" (implies it)
//! context = "default"                           # kubeconfig context; default: its current one
//! force_conflicts = true # take over fields other managers changed (drift correction)
//! field_manager = "outpost-agent"
//!
//! [reconcile]
//! drift_seconds = 300          # re-apply everything this often
//! health_poll_seconds = 5      # re-read progressing objects this often
//! health_timeout_seconds = 600 # still progressing after this: Degraded
//! retry_max_seconds = 300      # longest wait between retries of a failing object
//! ```
//!
//! `auto` tries, in order: `KUBECONFIG`, the in-cluster service account
//! (`KUBERNETES_SERVICE_HOST`), k3s's `/etc/rancher/k3s/k3s.yaml`, `~/.kube/config`.
//!
//! Environment overrides: `OUTPOST_AGENT_STATE_DIR`, `OUTPOST_AGENT_ENROLMENT_BUNDLE`,
//! `OUTPOST_AGENT_HUB`, `OUTPOST_AGENT_METRICS_ADDRESS`, `OUTPOST_AGENT_CLUSTER`, `OUTPOST_AGENT_KUBECONFIG`,
//! `OUTPOST_AGENT_KUBE_CONTEXT`, `OUTPOST_AGENT_FORCE_CONFLICTS`, `OUTPOST_AGENT_DRIFT_SECONDS`,
//! `OUTPOST_AGENT_HEALTH_TIMEOUT_SECONDS`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::reconcile::ReconcileOptions;
use crate::target::ClusterSource;

/// Where the agent applies snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterChoice {
    /// A Kubernetes API.
    Kubernetes(ClusterSource),
    /// No cluster: fetch, verify and cache only.
    None,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Key and database.
    pub state_dir: PathBuf,
    /// Bundle to enrol with on `run` if not enrolled.
    pub enrolment_bundle: Option<PathBuf>,
    /// Hub address overriding the enrolled one.
    pub hub: Option<String>,
    /// Where to serve `/metrics`, `/live` and `/ready` (none: nowhere). Unauthenticated plain
    /// HTTP: keep it on loopback, or on a pod address only Prometheus reaches.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// The cluster.
    pub cluster: ClusterChoice,
    /// Reconcile loop settings.
    pub reconcile: ReconcileOptions,
}

/// Every problem found, one per line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid agent configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// The problems.
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<PathBuf>,
    enrolment_bundle: Option<PathBuf>,
    hub: Option<String>,
    metrics_address: Option<String>,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    reconcile: RawReconcile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    target: Option<String>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    force_conflicts: Option<bool>,
    field_manager: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReconcile {
    drift_seconds: Option<u64>,
    health_poll_seconds: Option<u64>,
    health_timeout_seconds: Option<u64>,
    retry_max_seconds: Option<u64>,
}

/// The default config file, read if it exists.
pub const DEFAULT_CONFIG: &str = "/etc/outpost-agent/agent.toml";

impl AgentConfig {
    /// Reads `file` (if given; a missing explicit file is an error), applies the environment
    /// (`env` looks a variable up), and validates.
    pub fn load(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let mut problems = Vec::new();
        let mut raw = match file {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => toml::from_str::<RawConfig>(&text).unwrap_or_else(|error| {
                    problems.push(format!("{}: {}", path.display(), error.message()));
                    RawConfig::default()
                }),
                Err(error) => {
                    problems.push(format!("reading {}: {error}", path.display()));
                    RawConfig::default()
                }
            },
            None => RawConfig::default(),
        };
        let mut number = |name: &str, slot: &mut Option<u64>| {
            if let Some(text) = env(name) {
                match text.trim().parse() {
                    Ok(value) => *slot = Some(value),
                    Err(_) => problems.push(format!("{name}={text:?} is not a whole number")),
                }
            }
        };
        number(
            "OUTPOST_AGENT_DRIFT_SECONDS",
            &mut raw.reconcile.drift_seconds,
        );
        number(
            "OUTPOST_AGENT_HEALTH_TIMEOUT_SECONDS",
            &mut raw.reconcile.health_timeout_seconds,
        );
        if let Some(dir) = env("OUTPOST_AGENT_STATE_DIR") {
            raw.state_dir = Some(dir.into());
        }
        if let Some(bundle) = env("OUTPOST_AGENT_ENROLMENT_BUNDLE") {
            raw.enrolment_bundle = Some(bundle.into());
        }
        if let Some(hub) = env("OUTPOST_AGENT_HUB") {
            raw.hub = Some(hub);
        }
        if let Some(address) = env("OUTPOST_AGENT_METRICS_ADDRESS") {
            raw.metrics_address = Some(address);
        }
        let metrics_address = match raw.metrics_address.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => match text.parse::<std::net::SocketAddr>() {
                Ok(address) => Some(address),
                Err(_) => {
                    problems.push(format!(
                        "metrics_address {text:?} is not an IP address and port (e.g. \"127.0.0.1:9464\")"
                    ));
                    None
                }
            },
        };
        if let Some(target) = env("OUTPOST_AGENT_CLUSTER") {
            raw.cluster.target = Some(target);
        }
        if let Some(path) = env("OUTPOST_AGENT_KUBECONFIG") {
            raw.cluster.kubeconfig = Some(path.into());
        }
        if let Some(context) = env("OUTPOST_AGENT_KUBE_CONTEXT") {
            raw.cluster.context = Some(context);
        }
        if let Some(text) = env("OUTPOST_AGENT_FORCE_CONFLICTS") {
            match text.trim() {
                "true" | "1" | "yes" => raw.cluster.force_conflicts = Some(true),
                "false" | "0" | "no" => raw.cluster.force_conflicts = Some(false),
                _ => problems.push(format!(
                    "OUTPOST_AGENT_FORCE_CONFLICTS={text:?} is not true or false"
                )),
            }
        }
        let cluster = match (raw.cluster.target.as_deref(), raw.cluster.kubeconfig) {
            (None | Some("kubeconfig"), Some(path)) => {
                ClusterChoice::Kubernetes(ClusterSource::Kubeconfig {
                    path,
                    context: raw.cluster.context.clone(),
                })
            }
            (Some("kubeconfig"), None) => {
                problems
                    .push("cluster.target = \"kubeconfig\" needs cluster.kubeconfig".to_owned());
                ClusterChoice::None
            }
            (None | Some("auto"), None) => ClusterChoice::Kubernetes(ClusterSource::Auto),
            (Some("in-cluster"), None) => ClusterChoice::Kubernetes(ClusterSource::InCluster),
            (Some("none"), None) => ClusterChoice::None,
            (Some(target @ ("auto" | "in-cluster" | "none")), Some(_)) => {
                problems.push(format!(
                    "cluster.kubeconfig is set but cluster.target is {target:?}; drop one"
                ));
                ClusterChoice::None
            }
            (Some(other), _) => {
                problems.push(format!(
                    "cluster.target {other:?} is not one of auto, kubeconfig, in-cluster, none"
                ));
                ClusterChoice::None
            }
        };
        if let Some(hub) = &raw.hub
            && let Err(problem) = crate::client::check_hub_addresses(hub)
        {
            problems.push(format!("hub: {problem}"));
        }
        let defaults = ReconcileOptions::default();
        let seconds =
            |value: Option<u64>, default: Duration, name: &str, problems: &mut Vec<String>| {
                match value {
                    Some(0) => {
                        problems.push(format!("reconcile.{name} must be at least 1"));
                        default
                    }
                    Some(value) => Duration::from_secs(value),
                    None => default,
                }
            };
        let reconcile = ReconcileOptions {
            field_manager: raw
                .cluster
                .field_manager
                .unwrap_or(defaults.field_manager.clone()),
            force_conflicts: raw
                .cluster
                .force_conflicts
                .unwrap_or(defaults.force_conflicts),
            drift_interval: seconds(
                raw.reconcile.drift_seconds,
                defaults.drift_interval,
                "drift_seconds",
                &mut problems,
            ),
            health_poll: seconds(
                raw.reconcile.health_poll_seconds,
                defaults.health_poll,
                "health_poll_seconds",
                &mut problems,
            ),
            health_timeout: seconds(
                raw.reconcile.health_timeout_seconds,
                defaults.health_timeout,
                "health_timeout_seconds",
                &mut problems,
            ),
            retry_max: seconds(
                raw.reconcile.retry_max_seconds,
                defaults.retry_max,
                "retry_max_seconds",
                &mut problems,
            ),
            ..defaults
        };
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(AgentConfig {
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/outpost-agent")),
            enrolment_bundle: raw.enrolment_bundle,
            hub: raw.hub,
            metrics_address,
            cluster,
            reconcile,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_without_a_file() {
        let config = AgentConfig::load(None, &no_env).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/outpost-agent"));
        assert_eq!(
            config.cluster,
            ClusterChoice::Kubernetes(ClusterSource::Auto)
        );
        assert!(config.reconcile.force_conflicts);
        assert_eq!(config.metrics_address, None);
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "state_dir = \"/srv/agent\"\nmetrics_address = \"127.0.0.1:9464\"\n[cluster]\nkubeconfig = \"/etc/rancher/k3s/k3s.yaml\"\n[reconcile]\ndrift_seconds = 60\n",
        )
        .unwrap();
        let env =
            |name: &str| (name == "OUTPOST_AGENT_FORCE_CONFLICTS").then(|| "false".to_owned());
        let config = AgentConfig::load(Some(&path), &env).unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/srv/agent"));
        assert_eq!(
            config.cluster,
            ClusterChoice::Kubernetes(ClusterSource::Kubeconfig {
                path: "/etc/rancher/k3s/k3s.yaml".into(),
                context: None
            })
        );
        assert_eq!(config.reconcile.drift_interval, Duration::from_secs(60));
        assert!(!config.reconcile.force_conflicts);
        assert_eq!(
            config.metrics_address,
            Some("127.0.0.1:9464".parse().unwrap())
        );
    }

    #[test]
    fn every_problem_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "hub = \"nowhere\"\n[cluster]\ntarget = \"k8s\"\n[reconcile]\ndrift_seconds = 0\n",
        )
        .unwrap();
        let env = |name: &str| match name {
            "OUTPOST_AGENT_DRIFT_SECONDS" => Some("soon".to_owned()),
            "OUTPOST_AGENT_METRICS_ADDRESS" => Some("localhost".to_owned()),
            _ => None,
        };
        let error = AgentConfig::load(Some(&path), &env)
            .unwrap_err()
            .to_string();
        for expected in [
            "needs a port",
            "\"k8s\" is not one of",
            "not a whole number",
            "metrics_address \"localhost\" is not an IP address and port",
        ] {
            assert!(error.contains(expected), "{expected:?} missing in {error}");
        }
        let error = AgentConfig::load(Some(&dir.path().join("missing.toml")), &no_env)
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing.toml"), "{error}");
    }
}
