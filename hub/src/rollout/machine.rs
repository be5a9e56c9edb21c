//! The rollout state machine. Pure: no I/O and no clock — `now` (Unix seconds) is passed in.
//!
//! Inputs are what the hub observes (agents that match the selector, with their current
//! assignment and the release their render variant gets; the status they report for the
//! bundle), the passage of time, and operator commands. Outputs are assignment changes. The
//! whole state is plain data ([`Rollout`] is `serde`), so a hub that stores it after each step
//! and loads it after a restart makes the same decisions as one that never stopped.
//!
//! Semantics:
//! - Members are ordered `ring=canary` first, then by agent id (agent ids are hashes of keys,
//!   so this order is stable and spread across sites).
//! - Waves are cumulative sizes (counts or percents of the members); wave *k* is open when every
//!   agent released before it is resolved: healthy, failed, or pending.
//! - An agent is *pending* when the health timeout passed without it reporting the release
//!   (offline, or still downloading). It does not hold the rollout up; it keeps its assignment
//!   and reports when it reconnects — late health counts, late failures too: a pending agent
//!   that reports the release not (yet) healthy gets a fresh health timeout from then.
//! - An agent that reported the release but is not healthy when the timeout passes has failed;
//!   so has one that reports `Failed`. Failures are sticky for the budget.
//! - Once failures exceed the budget no further agent is given the release: the rollout pauses
//!   or rolls back, as planned. Resuming accepts the failures so far.
//! - Agents that start matching mid-rollout join it (and its total); agents that stop matching
//!   before they were released leave it; released agents stay members.
//! - A succeeded rollout goes on releasing to agents that start matching, until a newer rollout
//!   of the bundle supersedes it.
//! - Rolling back assigns every agent the rollout released what it had before (nothing, if it
//!   had nothing: the bundle is then removed from it); members still waiting leave.
//! - Fed only what changed since the last step (agents that changed, with their latest
//!   report, and new reports), and stepped only when there is something new or a health
//!   timeout is due ([`Rollout::next_deadline`]), it decides exactly as if fed the whole fleet
//!   every time (a property test holds it to that): the hub's driver relies on it.

use std::collections::BTreeMap;
use std::fmt;

use outpost_proto::Digest;
use serde::{Deserialize, Serialize};

/// The label value that puts an agent in the first waves: `ring=canary`.
pub const CANARY: (&str, &str) = ("ring", "canary");

/// A wave size or a failure budget: a number of agents or a percentage of the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Size {
    /// This many agents.
    Count(u64),
    /// This percentage (0–100) of the members.
    Percent(u8),
}

impl Size {
    /// Parses `5` or `10%`.
    pub fn parse(text: &str) -> Result<Size, PlanError> {
        let text = text.trim();
        let bad = || PlanError::Size(text.to_owned());
        match text.strip_suffix('%') {
            Some(percent) => {
                let value: u8 = percent.trim().parse().map_err(|_| bad())?;
                if value > 100 {
                    return Err(bad());
                }
                Ok(Size::Percent(value))
            }
            None => text.parse().map(Size::Count).map_err(|_| bad()),
        }
    }

    /// A wave's size among `total` members: percentages round up, so a wave is never empty.
    fn wave_of(self, total: u64) -> u64 {
        match self {
            Size::Count(count) => count.min(total),
            Size::Percent(percent) => (u64::from(percent) * total).div_ceil(100),
        }
    }

    /// A failure budget among `total` members: percentages round down.
    fn budget_of(self, total: u64) -> u64 {
        match self {
            Size::Count(count) => count,
            Size::Percent(percent) => u64::from(percent) * total / 100,
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Count(count) => write!(f, "{count}"),
            Size::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

/// What to do when failures exceed the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Stop releasing; an operator resumes, aborts or rolls back.
    Pause,
    /// Return every released agent to what it had before.
    Rollback,
}

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The bundle.
    pub bundle: String,
    /// The Git source (URL) the release comes from.
    pub source: String,
    /// The Git ref of the release (`refs/tags/v1.2`).
    pub git_ref: String,
    /// The commit the ref named when the rollout was created; the release is pinned to it.
    pub git_commit: String,
    /// Which agents (label selector text; empty = every agent the bundle selects).
    pub selector: String,
    /// Cumulative wave sizes; the last is 100%.
    pub waves: Vec<Size>,
    /// Seconds a released agent has to report healthy.
    pub health_timeout: i64,
    /// Failures tolerated.
    pub max_failures: Size,
    /// What happens when they are exceeded.
    pub on_failure: OnFailure,
}

/// A plan that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Not a count or a percentage.
    #[error("{0:?} is not a size: write a count of agents (5) or a percentage (10%, at most 100%)")]
    Size(String),
    /// No waves.
    #[error("give at least one wave, e.g. --waves 1,10%,50%,100%")]
    NoWaves,
    /// A wave of 0.
    #[error("wave {0} is empty; every wave must release at least one agent")]
    EmptyWave(usize),
    /// The last wave does not reach everyone.
    #[error("the last wave is {0}; it must be 100% so the rollout reaches every agent it selects")]
    LastWave(Size),
    /// Timeout of zero or less.
    #[error("the health timeout must be positive")]
    Timeout,
}

impl Plan {
    /// Checks the waves and the timeout.
    pub fn validate(&self) -> Result<(), PlanError> {
        let last = self.waves.last().ok_or(PlanError::NoWaves)?;
        if let Some(index) = self
            .waves
            .iter()
            .position(|size| matches!(size, Size::Count(0) | Size::Percent(0)))
        {
            return Err(PlanError::EmptyWave(index + 1));
        }
        if *last != Size::Percent(100) {
            return Err(PlanError::LastWave(*last));
        }
        if self.health_timeout <= 0 {
            return Err(PlanError::Timeout);
        }
        Ok(())
    }
}

/// A snapshot assignment: generation, body digest, and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    /// Generation.
    pub generation: u64,
    /// Body digest.
    #[serde(with = "digest_hex")]
    pub digest: Digest,
    /// The assignment's origin (`track:<url>`, `rollout:<id>`).
    pub origin: String,
}

/// Where the rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    /// Releasing wave by wave.
    Running,
    /// Not releasing; why.
    Paused {
        /// Why it paused.
        reason: String,
    },
    /// Every member released; new matching agents still get the release.
    Succeeded,
    /// Stopped by an operator; agents keep what they have.
    Aborted,
    /// Every released agent was given back what it had.
    RolledBack,
}

impl Phase {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused { .. } => "paused",
            Phase::Succeeded => "succeeded",
            Phase::Aborted => "aborted",
            Phase::RolledBack => "rolled-back",
        }
    }

    /// Running or paused: the rollout still moves agents.
    pub fn is_active(&self) -> bool {
        matches!(self, Phase::Running | Phase::Paused { .. })
    }
}

/// Where one member is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum MemberState {
    /// Not released yet.
    Waiting,
    /// Given the release; waiting for its health.
    Released,
    /// Reported healthy on the release.
    Healthy,
    /// Failed on the release (sticky).
    Failed {
        /// What it reported, or that it timed out.
        message: String,
    },
    /// Did not report the release before the health timeout (offline or still fetching).
    Pending,
    /// Given back what it had before (rolled back).
    Restored {
        /// Where it was before.
        was: String,
        /// It had failed on the release (still counted as a failure).
        failed: bool,
    },
    /// Stopped matching before it was released (still counted in the rollout's total, so the
    /// open waves never shrink).
    Left,
}

impl MemberState {
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            MemberState::Waiting => "waiting",
            MemberState::Released => "released",
            MemberState::Healthy => "healthy",
            MemberState::Failed { .. } => "failed",
            MemberState::Pending => "pending",
            MemberState::Restored { .. } => "restored",
            MemberState::Left => "left",
        }
    }
}

/// One agent in the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Labelled `ring=canary`.
    pub canary: bool,
    /// The release for its render variant.
    pub target: Assigned,
    /// Where it is.
    #[serde(flatten)]
    pub state: MemberState,
    /// What it had before: recorded while waiting, frozen when released.
    pub previous: Option<Assigned>,
    /// The wave (0-based) that released it.
    pub wave: Option<usize>,
    /// When it was released.
    pub released_at: Option<i64>,
    /// The last thing it reported about the release, if not healthy.
    pub report: Option<String>,
}

impl Member {
    fn on_release(&self) -> bool {
        !matches!(
            self.state,
            MemberState::Waiting | MemberState::Restored { .. } | MemberState::Left
        )
    }
}

/// One line of the rollout's history: who did what, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When.
    pub at: i64,
    /// Who (an operator's login name, or `hub` for the rollout's own decisions).
    pub who: String,
    /// What happened.
    pub action: String,
    /// Why.
    pub why: String,
}

/// How an agent's health on the bundle was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Applying.
    Applying,
    /// Healthy.
    Healthy,
    /// Applied, not all objects healthy.
    Degraded,
    /// Could not apply, or an object failed.
    Failed,
}

/// What the hub observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// An enrolled agent, as seen now.
    Agent {
        /// Its id.
        id: String,
        /// Whether the rollout's selector (and the bundle's) matches it, and it is not revoked.
        matches: bool,
        /// Labelled `ring=canary`.
        canary: bool,
        /// The release for its render variant (`None`: the variant did not render at the
        /// pinned commit; it cannot join).
        target: Option<Assigned>,
        /// What it is assigned for the bundle now.
        current: Option<Assigned>,
    },
    /// The agent's latest status for the bundle.
    Report {
        /// Agent id.
        agent: String,
        /// The snapshot it reported about.
        digest: Digest,
        /// Its health.
        health: Health,
        /// Its message.
        message: String,
    },
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Command {
    /// Stop releasing.
    Pause,
    /// Release again.
    Resume,
    /// Stop for good; agents keep what they have.
    Abort,
    /// Give every released agent back what it had.
    Rollback,
}

impl Command {
    /// Its name, as in the API path.
    pub fn name(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
            Command::Rollback => "rollback",
        }
    }

    /// Parses a name.
    pub fn parse(name: &str) -> Option<Command> {
        [
            Command::Pause,
            Command::Resume,
            Command::Abort,
            Command::Rollback,
        ]
        .into_iter()
        .find(|command| command.name() == name)
    }
}

/// A command that does not apply now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} a rollout that is {phase}")]
pub struct CommandError {
    /// The command.
    pub command: &'static str,
    /// The phase it met.
    pub phase: &'static str,
}

/// Why an assignment changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// Given the rollout's release.
    Release,
    /// Given back what it had before.
    Restore,
}

/// An assignment change: `to` = `None` removes the bundle from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Agent id.
    pub agent: String,
    /// The new assignment.
    pub to: Option<Assigned>,
    /// Why.
    pub kind: ChangeKind,
}

/// Per-wave progress, for people.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WaveProgress {
    /// The wave's cumulative size as planned.
    pub size: String,
    /// Agents this wave should have released by the time it closes.
    pub planned: u64,
    /// Agents it released.
    pub released: u64,
    /// Of those: healthy.
    pub healthy: u64,
    /// Failed (also those since rolled back).
    pub failed: u64,
    /// Pending (offline past the timeout).
    pub pending: u64,
    /// Given back.
    pub restored: u64,
    /// `done`, `open`, `paused`, `stopped` (aborted or rolled back) or `closed` (not open yet).
    pub state: String,
}

/// A rollout's counts, for lists: what the fleet page shows of it without its members.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Members.
    pub members: u64,
    /// Members on the release now.
    pub on_release: u64,
    /// How many the open waves allow on the release.
    pub allowed: u64,
    /// Members that failed on the release.
    pub failures: u64,
    /// Failures tolerated.
    pub budget: u64,
    /// Per wave.
    pub waves: Vec<WaveProgress>,
}

/// The members a step touched, for a store that writes only those. Bookkeeping, not state:
/// never serialized, and equal to any other (two rollouts in the same state are equal
/// whatever they touched on the way).
#[derive(Debug, Clone, Default)]
pub struct Touched(std::collections::BTreeSet<String>);

impl PartialEq for Touched {
    fn eq(&self, _: &Touched) -> bool {
        true
    }
}

impl Eq for Touched {}

/// A rollout: its plan and everything it decided so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id (the store's).
    pub id: u64,
    /// What was asked.
    pub plan: Plan,
    /// Where it is.
    #[serde(flatten)]
    pub phase: Phase,
    /// The open wave (0-based).
    pub wave: usize,
    /// Agents, by id.
    #[serde(default)]
    pub members: BTreeMap<String, Member>,
    /// Failures accepted by a resume: the budget counts beyond them.
    pub tolerated: u64,
    /// When created.
    pub created_at: i64,
    /// When anything last changed.
    pub updated_at: i64,
    /// Who did what, why.
    #[serde(default)]
    pub log: Vec<Record>,
    /// Members changed since [`Rollout::take_touched`] was last called.
    #[serde(skip)]
    pub touched: Touched,
}

/// Who the rollout's own decisions are recorded as.
const HUB: &str = "hub";

impl Rollout {
    /// A new rollout, running, with no members yet (they come with the first step).
    pub fn new(id: u64, plan: Plan, who: &str, why: &str, now: i64) -> Result<Rollout, PlanError> {
        plan.validate()?;
        let waves = plan
            .waves
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let action = format!(
            "created: {} at {} to {}, waves {waves}, health timeout {}s, max failures {}, on failure {:?}",
            plan.bundle,
            plan.git_ref,
            if plan.selector.is_empty() {
                "every agent"
            } else {
                &plan.selector
            },
            plan.health_timeout,
            plan.max_failures,
            plan.on_failure,
        );
        Ok(Rollout {
            id,
            plan,
            phase: Phase::Running,
            wave: 0,
            members: BTreeMap::new(),
            tolerated: 0,
            created_at: now,
            updated_at: now,
            log: vec![Record {
                at: now,
                who: who.to_owned(),
                action,
                why: why.to_owned(),
            }],
            touched: Touched::default(),
        })
    }

    /// The rollout without its members and history, as JSON: what a store keeps beside them
    /// ([`Rollout`] reads it back with no members and no history).
    pub fn head_json(&self) -> Result<String, serde_json::Error> {
        #[derive(Serialize)]
        struct Head<'a> {
            id: u64,
            plan: &'a Plan,
            #[serde(flatten)]
            phase: &'a Phase,
            wave: usize,
            tolerated: u64,
            created_at: i64,
            updated_at: i64,
        }
        serde_json::to_string(&Head {
            id: self.id,
            plan: &self.plan,
            phase: &self.phase,
            wave: self.wave,
            tolerated: self.tolerated,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }

    /// The members changed (added or modified) since the last call, by id.
    pub fn take_touched(&mut self) -> Vec<String> {
        std::mem::take(&mut self.touched.0).into_iter().collect()
    }

    /// When a step with nothing new to observe would decide something: the first health
    /// timeout of a released member. Between events and before this, a step changes nothing.
    pub fn next_deadline(&self) -> Option<i64> {
        self.members
            .values()
            .filter(|member| member.state == MemberState::Released)
            .filter_map(|member| member.released_at)
            .map(|at| at.saturating_add(self.plan.health_timeout))
            .min()
    }

    /// Its counts and per-wave progress.
    pub fn progress(&self) -> Progress {
        Progress {
            members: self.members.len() as u64,
            on_release: self.on_release(),
            allowed: self.allowed(),
            failures: self.failures(),
            budget: self.budget(),
            waves: self.waves(),
        }
    }

    /// The origin of the assignments this rollout makes.
    pub fn origin(&self) -> String {
        origin(self.id)
    }

    /// Members that have failed on the release (also those since given back what they had).
    pub fn failures(&self) -> u64 {
        self.count(|member| {
            matches!(
                member.state,
                MemberState::Failed { .. } | MemberState::Restored { failed: true, .. }
            )
        })
    }

    /// Failures tolerated among the current members.
    pub fn budget(&self) -> u64 {
        self.plan
            .max_failures
            .budget_of(self.members.len() as u64)
            .max(self.tolerated)
    }

    /// Members on the release now.
    pub fn on_release(&self) -> u64 {
        self.count(Member::on_release)
    }

    /// How many agents the open waves allow on the release.
    pub fn allowed(&self) -> u64 {
        self.cap(self.wave)
    }

    fn count(&self, keep: impl Fn(&Member) -> bool) -> u64 {
        self.members.values().filter(|member| keep(member)).count() as u64
    }

    /// Wave `index`'s cumulative cap: never below an earlier wave's.
    fn cap(&self, index: usize) -> u64 {
        let total = self.members.len() as u64;
        self.plan
            .waves
            .iter()
            .take(index + 1)
            .map(|size| size.wave_of(total))
            .max()
            .unwrap_or(0)
            .min(total)
    }

    /// Takes in what was observed, then decides. Returns the assignment changes to make.
    pub fn step(&mut self, inputs: &[Input], now: i64) -> Vec<Change> {
        for input in inputs {
            self.observe(input, now);
        }
        self.advance(now)
    }

    /// Carries out an operator's command, then decides.
    pub fn command(
        &mut self,
        command: Command,
        who: &str,
        why: &str,
        now: i64,
    ) -> Result<Vec<Change>, CommandError> {
        let refuse = |phase: &Phase| CommandError {
            command: command.name(),
            phase: phase.name(),
        };
        let mut changes = Vec::new();
        match (command, &self.phase) {
            (Command::Pause, Phase::Running) => {
                self.phase = Phase::Paused {
                    reason: format!("paused by {who}: {why}"),
                };
            }
            (Command::Resume, Phase::Paused { .. }) => {
                self.tolerated = self.tolerated.max(self.failures());
                self.phase = Phase::Running;
            }
            (Command::Abort, Phase::Running | Phase::Paused { .. }) => self.phase = Phase::Aborted,
            (Command::Rollback, phase) if *phase != Phase::RolledBack => {
                changes = self.roll_back();
            }
            (_, phase) => return Err(refuse(phase)),
        }
        self.record(now, who, command.name(), why);
        changes.extend(self.advance(now));
        Ok(changes)
    }

    fn record(&mut self, now: i64, who: &str, action: &str, why: &str) {
        self.updated_at = now;
        self.log.push(Record {
            at: now,
            who: who.to_owned(),
            action: action.to_owned(),
            why: why.to_owned(),
        });
    }

    fn observe(&mut self, input: &Input, now: i64) {
        match input {
            Input::Agent {
                id,
                matches,
                canary,
                target,
                current,
            } => {
                let joinable = *matches && target.is_some() && self.phase != Phase::RolledBack;
                match self.members.get_mut(id) {
                    Some(member) => {
                        if matches!(member.state, MemberState::Waiting | MemberState::Left) {
                            let before = member.clone();
                            match target.as_ref().filter(|_| joinable) {
                                None => member.state = MemberState::Left,
                                Some(target) => {
                                    member.state = MemberState::Waiting;
                                    member.canary = *canary;
                                    member.target = target.clone();
                                    member.previous = current.clone();
                                }
                            }
                            if *member != before {
                                self.touched.0.insert(id.clone());
                            }
                        }
                    }
                    None if joinable && self.phase != Phase::Aborted => {
                        if let Some(target) = target {
                            self.touched.0.insert(id.clone());
                            self.members.insert(
                                id.clone(),
                                Member {
                                    canary: *canary,
                                    target: target.clone(),
                                    state: MemberState::Waiting,
                                    previous: current.clone(),
                                    wave: None,
                                    released_at: None,
                                    report: None,
                                },
                            );
                        }
                    }
                    None => {}
                }
            }
            Input::Report {
                agent,
                digest,
                health,
                message,
            } => {
                let Some(member) = self.members.get_mut(agent) else {
                    return;
                };
                let before = member.clone();
                if member.target.digest != *digest
                    || matches!(
                        member.state,
                        MemberState::Waiting
                            | MemberState::Restored { .. }
                            | MemberState::Failed { .. }
                            | MemberState::Left
                    )
                {
                    return;
                }
                match health {
                    Health::Healthy => {
                        member.state = MemberState::Healthy;
                        member.report = None;
                    }
                    Health::Failed => {
                        member.state = MemberState::Failed {
                            message: message.clone(),
                        }
                    }
                    Health::Applying | Health::Degraded => {
                        member.report = Some(format!("{health:?}: {message}"));
                        // Back from offline: its health clock starts now.
                        if member.state == MemberState::Pending {
                            member.state = MemberState::Released;
                            member.released_at = Some(now);
                        }
                    }
                }
                if *member != before {
                    self.touched.0.insert(agent.clone());
                }
            }
        }
    }

    /// Timeouts, the failure budget, and waves.
    fn advance(&mut self, now: i64) -> Vec<Change> {
        let timeout = self.plan.health_timeout;
        for (id, member) in self.members.iter_mut() {
            let due = member
                .released_at
                .is_some_and(|at| now >= at.saturating_add(timeout));
            if member.state == MemberState::Released && due {
                self.touched.0.insert(id.clone());
                member.state = match &member.report {
                    Some(report) => MemberState::Failed {
                        message: format!("not healthy {timeout}s after release: {report}"),
                    },
                    None => MemberState::Pending,
                };
            }
        }
        if !matches!(self.phase, Phase::Running | Phase::Succeeded) {
            return Vec::new();
        }
        // Late failures count after success too: agents that start matching then wait.
        let (failures, budget) = (self.failures(), self.budget());
        if failures > budget {
            let why = format!("{failures} agents failed; the budget allows {budget}");
            return match self.plan.on_failure {
                OnFailure::Pause => {
                    self.phase = Phase::Paused {
                        reason: format!("failure budget spent: {why}"),
                    };
                    self.record(now, HUB, "paused", &why);
                    Vec::new()
                }
                OnFailure::Rollback => {
                    let changes = self.roll_back();
                    self.record(now, HUB, "rolled back", &why);
                    changes
                }
            };
        }
        match self.phase {
            // Agents that start matching after success get the release at once.
            Phase::Succeeded => self.release_waiting(u64::MAX, now),
            _ => self.run_waves(now),
        }
    }

    fn run_waves(&mut self, now: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        loop {
            if self.members.is_empty() {
                return changes;
            }
            let room = self.cap(self.wave).saturating_sub(self.on_release());
            changes.extend(self.release_waiting(room, now));
            // Everyone the open waves allow is released now; the wave closes when all of them
            // are resolved.
            if self.count(|member| member.state == MemberState::Released) > 0 {
                return changes;
            }
            if self.wave + 1 < self.plan.waves.len() {
                self.wave += 1;
                let action = format!(
                    "wave {} of {} opened ({} agents)",
                    self.wave + 1,
                    self.plan.waves.len(),
                    self.plan.waves[self.wave]
                );
                self.record(now, HUB, &action, "the previous wave is resolved");
                continue;
            }
            if self.count(|member| member.state == MemberState::Waiting) == 0 {
                self.phase = Phase::Succeeded;
                let why = format!(
                    "{} healthy, {} pending, {} failed",
                    self.count(|m| m.state == MemberState::Healthy),
                    self.count(|m| m.state == MemberState::Pending),
                    self.failures()
                );
                self.record(now, HUB, "succeeded", &why);
            }
            return changes;
        }
    }

    /// Releases up to `room` waiting members, canaries first, then by id.
    fn release_waiting(&mut self, room: u64, now: i64) -> Vec<Change> {
        if room == 0 {
            return Vec::new();
        }
        let mut order: Vec<(bool, &String)> = self
            .members
            .iter()
            .filter(|(_, member)| member.state == MemberState::Waiting)
            .map(|(id, member)| (!member.canary, id))
            .collect();
        order.sort();
        let chosen: Vec<String> = order
            .into_iter()
            .take(usize::try_from(room).unwrap_or(usize::MAX))
            .map(|(_, id)| id.clone())
            .collect();
        let origin = self.origin();
        let wave = self.wave;
        let mut changes = Vec::with_capacity(chosen.len());
        for id in chosen {
            if let Some(member) = self.members.get_mut(&id) {
                self.touched.0.insert(id.clone());
                member.state = MemberState::Released;
                member.wave = Some(wave);
                member.released_at = Some(now);
                member.target.origin = origin.clone();
                changes.push(Change {
                    agent: id,
                    to: Some(member.target.clone()),
                    kind: ChangeKind::Release,
                });
            }
        }
        if !changes.is_empty() {
            self.updated_at = now;
        }
        changes
    }

    /// Gives every released member back what it had; the rollout is then rolled back, and the
    /// members still waiting leave it (a rolled-back rollout takes no one).
    fn roll_back(&mut self) -> Vec<Change> {
        let mut changes = Vec::new();
        for (id, member) in &mut self.members {
            if member.state == MemberState::Waiting {
                member.state = MemberState::Left;
                self.touched.0.insert(id.clone());
            }
            if member.on_release() {
                let (was, failed) = match &member.state {
                    MemberState::Failed { message } => (format!("failed: {message}"), true),
                    state => (state.name().to_owned(), false),
                };
                member.state = MemberState::Restored { was, failed };
                self.touched.0.insert(id.clone());
                changes.push(Change {
                    agent: id.clone(),
                    to: member.previous.clone(),
                    kind: ChangeKind::Restore,
                });
            }
        }
        self.phase = Phase::RolledBack;
        changes
    }

    /// Progress per wave.
    pub fn waves(&self) -> Vec<WaveProgress> {
        let mut waves: Vec<WaveProgress> = (0..self.plan.waves.len())
            .map(|index| WaveProgress {
                size: self.plan.waves[index].to_string(),
                planned: self.cap(index) - if index == 0 { 0 } else { self.cap(index - 1) },
                state: match index.cmp(&self.wave) {
                    std::cmp::Ordering::Less => "done",
                    std::cmp::Ordering::Equal => match self.phase {
                        Phase::Succeeded => "done",
                        Phase::Running => "open",
                        Phase::Paused { .. } => "paused",
                        Phase::Aborted | Phase::RolledBack => "stopped",
                    },
                    std::cmp::Ordering::Greater => "closed",
                }
                .to_owned(),
                ..WaveProgress::default()
            })
            .collect();
        for member in self.members.values() {
            let Some(wave) = member.wave.and_then(|wave| waves.get_mut(wave)) else {
                continue;
            };
            wave.released += 1;
            match member.state {
                MemberState::Healthy => wave.healthy += 1,
                MemberState::Failed { .. } => wave.failed += 1,
                MemberState::Pending => wave.pending += 1,
                MemberState::Restored { failed, .. } => {
                    wave.restored += 1;
                    wave.failed += u64::from(failed);
                }
                MemberState::Waiting | MemberState::Released | MemberState::Left => {}
            }
        }
        waves
    }
}

/// The origin of rollout `id`'s assignments.
pub fn origin(id: u64) -> String {
    format!("rollout:{id}")
}

mod digest_hex {
    use outpost_proto::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        digest: &Digest,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&digest.to_hex())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Digest, D::Error> {
        let text = String::deserialize(deserializer)?;
        Digest::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
