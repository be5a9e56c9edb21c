//! Scenario files (TOML): the fleet (groups of agents with labels and a link profile, some whose
//! clusters cannot pull an image), the Git history (releases as tags), and rollouts at given
//! times. `scenarios/demo.toml` is built in; see docs/simulations.md for every field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::net::Link;

/// The demo scenario, built into the binary.
pub const DEMO: &str = include_str!("../scenarios/demo.toml");

/// A whole simulation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in the report.
    pub name: String,
    /// Seeds agent keys, losses and jitter.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Stop after this much virtual time even if the fleet has not settled.
    pub max_minutes: u64,
    /// Virtual seconds between samples (plots, progress).
    #[serde(default = "default_sample")]
    pub sample_seconds: u64,
    /// The bundle and its releases.
    pub git: Git,
    /// Link profiles by name.
    pub links: BTreeMap<String, LinkProfile>,
    /// Agent groups.
    pub groups: Vec<Group>,
    /// Rollouts, in order.
    #[serde(default)]
    pub rollouts: Vec<RolloutPlan>,
}

fn default_seed() -> u64 {
    1
}
fn default_sample() -> u64 {
    15
}

/// The bundle in Git.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Git {
    /// Bundle (folder) name.
    pub bundle: String,
    /// ConfigMaps beside the Deployment (each a few hundred bytes).
    pub config_maps: usize,
    /// Releases, oldest first; the first is on the tracked branch `stable` at the start.
    pub releases: Vec<Release>,
}

/// One release: a tag and what it changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Git tag.
    pub tag: String,
    /// The Deployment's image.
    pub image: String,
    /// How many ConfigMaps change from the release before.
    #[serde(default)]
    pub changed_config_maps: usize,
}

/// A link profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkProfile {
    /// Datagram loss each way, 0–1.
    #[serde(default)]
    pub loss: f64,
    /// Round-trip time in ms.
    pub rtt_ms: u64,
    /// Kbit/s each way (0: unlimited).
    #[serde(default)]
    pub bandwidth_kbps: u64,
    /// Outages as [start, end] virtual minutes.
    #[serde(default)]
    pub outages_minutes: Vec<[f64; 2]>,
}

impl LinkProfile {
    /// As the network uses it.
    pub fn link(&self) -> Link {
        Link {
            loss: self.loss.clamp(0.0, 1.0),
            rtt: Duration::from_millis(self.rtt_ms),
            bandwidth: self.bandwidth_kbps * 1000,
            outages: self
                .outages_minutes
                .iter()
                .map(|[start, end]| {
                    (
                        Duration::from_secs_f64(start.max(0.0) * 60.0),
                        Duration::from_secs_f64(end.max(0.0) * 60.0),
                    )
                })
                .collect(),
            ..Link::default()
        }
    }
}

/// A group of agents alike.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Name (reports).
    pub name: String,
    /// How many agents.
    pub count: usize,
    /// Their labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The link profile's name.
    pub link: String,
    /// Images their clusters cannot pull: Deployments using them never become ready.
    #[serde(default)]
    pub cannot_pull: Vec<String>,
}

/// A rollout the scenario starts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// Virtual minute it is created.
    pub at_minutes: f64,
    /// The tag.
    pub tag: String,
    /// Label selector ("" = everyone).
    #[serde(default)]
    pub selector: String,
    /// Waves.
    pub waves: String,
    /// Health timeout in minutes.
    pub health_timeout_minutes: f64,
    /// Failure budget ("2", "5%").
    pub max_failures: String,
    /// "pause" or "rollback".
    pub on_failure: String,
}

/// A scenario that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Not valid TOML or unknown fields.
    #[error("scenario file: {0}")]
    Parse(#[from] toml::de::Error),
    /// Semantically wrong.
    #[error("scenario: {0}")]
    Invalid(String),
}

impl Scenario {
    /// Parses and checks a scenario.
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.check()?;
        Ok(scenario)
    }

    fn check(&self) -> Result<(), ScenarioError> {
        let invalid = |message: String| Err(ScenarioError::Invalid(message));
        if self.git.releases.is_empty() {
            return invalid("git.releases: give at least one release".to_owned());
        }
        for group in &self.groups {
            if !self.links.contains_key(&group.link) {
                return invalid(format!(
                    "group {}: no link profile {:?} (have: {})",
                    group.name,
                    group.link,
                    self.links.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        for rollout in &self.rollouts {
            if !self
                .git
                .releases
                .iter()
                .any(|release| release.tag == rollout.tag)
            {
                return invalid(format!("rollout of {}: no such release", rollout.tag));
            }
            if !["pause", "rollback"].contains(&rollout.on_failure.as_str()) {
                return invalid(format!(
                    "rollout of {}: on_failure must be pause or rollback",
                    rollout.tag
                ));
            }
        }
        if self.agents() == 0 {
            return invalid("the fleet is empty: give groups a count".to_owned());
        }
        Ok(())
    }

    /// Agents in all groups.
    pub fn agents(&self) -> usize {
        self.groups.iter().map(|group| group.count).sum()
    }

    /// The same scenario with every group scaled to `agents` in all (at least one per group).
    pub fn scaled(mut self, agents: usize) -> Scenario {
        let total = self.agents().max(1);
        for group in &mut self.groups {
            group.count = (group.count * agents).div_ceil(total).max(1);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_parses_and_scales() {
        let demo = Scenario::parse(DEMO).unwrap();
        assert!(demo.agents() >= 150);
        assert!(demo.scaled(10_000).agents() >= 10_000);
    }

    #[test]
    fn mistakes_are_named() {
        let broken = DEMO.replace("link = \"lte\"", "link = \"carrier-pigeon\"");
        let error = Scenario::parse(&broken).unwrap_err().to_string();
        assert!(error.contains("carrier-pigeon"), "{error}");
        let error = Scenario::parse("name = 1").unwrap_err().to_string();
        assert!(error.contains("scenario file"), "{error}");
    }
}
