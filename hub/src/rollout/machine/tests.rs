//! The rollout machine against generated fleets and event sequences, fed the way the hub feeds
//! it (every agent and the latest report each step), with its promises checked after every step.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const TIMEOUT: i64 = 600;

fn digest(byte: u8) -> Digest {
    Digest([byte; 32])
}

fn assigned(generation: u64, byte: u8, origin: &str) -> Assigned {
    Assigned {
        generation,
        digest: digest(byte),
        origin: origin.to_owned(),
    }
}

fn plan(waves: &[Size], max_failures: Size, on_failure: OnFailure) -> Plan {
    Plan {
        bundle: "shop".to_owned(),
        source: "file:///git".to_owned(),
        git_ref: "refs/tags/v2".to_owned(),
        git_commit: "c0ffee".to_owned(),
        selector: String::new(),
        waves: waves.to_vec(),
        health_timeout: TIMEOUT,
        max_failures,
        on_failure,
    }
}

/// An agent of the simulated fleet.
#[derive(Debug, Clone)]
struct Agent {
    canary: bool,
    matches: bool,
    current: Option<Assigned>,
    report: Option<(Digest, Health)>,
}

#[derive(Debug, Clone)]
enum Event {
    Tick(i64),
    Report(usize, bool, Health),
    Join(bool),
    Leave(usize),
    Command(Command),
    Restart,
}

fn health() -> impl Strategy<Value = Health> {
    prop_oneof![
        4 => Just(Health::Healthy),
        1 => Just(Health::Failed),
        1 => Just(Health::Degraded),
        1 => Just(Health::Applying),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (0..TIMEOUT * 2).prop_map(Event::Tick),
        8 => (0..64usize, prop::bool::weighted(0.9), health()).prop_map(|(a, t, h)| Event::Report(a, t, h)),
        1 => prop::bool::weighted(0.2).prop_map(Event::Join),
        1 => (0..64usize).prop_map(Event::Leave),
        1 => prop_oneof![
            Just(Command::Pause),
            Just(Command::Resume),
            Just(Command::Abort),
            Just(Command::Rollback)
        ]
        .prop_map(Event::Command),
        2 => Just(Event::Restart),
    ]
}

fn size() -> impl Strategy<Value = Size> {
    prop_oneof![
        (1..5u64).prop_map(Size::Count),
        (1..=100u8).prop_map(Size::Percent)
    ]
}

fn scenario() -> impl Strategy<Value = (Plan, Vec<Agent>, Vec<Event>)> {
    let waves = prop::collection::vec(size(), 0..4).prop_map(|mut waves| {
        waves.push(Size::Percent(100));
        waves
    });
    let budget = prop_oneof![
        (0..4u64).prop_map(Size::Count),
        (0..30u8).prop_map(Size::Percent)
    ];
    let on_failure = prop_oneof![Just(OnFailure::Pause), Just(OnFailure::Rollback)];
    let agent = (
        prop::bool::weighted(0.2),
        prop::option::weighted(0.8, 1..4u8),
    )
        .prop_map(|(canary, current)| Agent {
            canary,
            matches: true,
            current: current.map(|byte| assigned(u64::from(byte), byte, "track:x")),
            report: None,
        });
    (
        waves,
        budget,
        on_failure,
        prop::collection::vec(agent, 0..40),
        prop::collection::vec(event(), 1..80),
    )
        .prop_map(|(waves, budget, on_failure, agents, events)| {
            (plan(&waves, budget, on_failure), agents, events)
        })
}

const TARGET: u8 = 9;

/// Everything a run decided, for comparing runs.
#[derive(Debug, PartialEq)]
struct Outcome {
    changes: Vec<Vec<Change>>,
    refused: Vec<bool>,
    last: Rollout,
}

/// Runs the scenario, checking the promises after every step; `restarts` makes every `Restart`
/// event reload the rollout from its JSON, as a restarted hub does.
fn run(plan: &Plan, fleet: &[Agent], events: &[Event], restarts: bool) -> Outcome {
    let mut fleet: Vec<Agent> = fleet.to_vec();
    let mut rollout = Rollout::new(7, plan.clone(), "ops", "test", 1_000).unwrap();
    let mut now = 1_000;
    let mut outcome = Outcome {
        changes: Vec::new(),
        refused: Vec::new(),
        last: rollout.clone(),
    };
    // Promises tracked across steps.
    let mut previous_at_release: BTreeMap<String, Option<Assigned>> = BTreeMap::new();
    let mut latest: BTreeMap<String, Change> = BTreeMap::new();
    let mut spent = false;
    let id = |index: usize| format!("agent-{index:03}");
    for event in events.iter().cloned() {
        let changes = match event {
            Event::Restart => {
                if restarts {
                    let text = serde_json::to_string(&rollout).unwrap();
                    rollout = serde_json::from_str(&text).unwrap();
                }
                continue;
            }
            Event::Command(command) => {
                let result = rollout.command(command, "ops", "because", now);
                outcome.refused.push(result.is_err());
                if command == Command::Resume && result.is_ok() {
                    spent = false;
                }
                result.unwrap_or_default()
            }
            other => {
                match other {
                    Event::Tick(seconds) => now += seconds,
                    Event::Report(index, on_target, health) if !fleet.is_empty() => {
                        let index = index % fleet.len();
                        let byte = if on_target { TARGET } else { 1 };
                        fleet[index].report = Some((digest(byte), health));
                    }
                    Event::Join(canary) => fleet.push(Agent {
                        canary,
                        matches: true,
                        current: None,
                        report: None,
                    }),
                    Event::Leave(index) if !fleet.is_empty() => {
                        let index = index % fleet.len();
                        fleet[index].matches = false;
                    }
                    _ => {}
                }
                let mut inputs: Vec<Input> = fleet
                    .iter()
                    .enumerate()
                    .map(|(index, agent)| Input::Agent {
                        id: id(index),
                        matches: agent.matches,
                        canary: agent.canary,
                        target: Some(assigned(10, TARGET, "")),
                        current: agent.current.clone(),
                    })
                    .collect();
                inputs.extend(fleet.iter().enumerate().filter_map(|(index, agent)| {
                    agent.report.map(|(digest, health)| Input::Report {
                        agent: id(index),
                        digest,
                        health,
                        message: "m".to_owned(),
                    })
                }));
                rollout.step(&inputs, now)
            }
        };
        // The hub writes the changes: the fleet's current assignments follow them.
        for change in &changes {
            let index: usize = change.agent[6..].parse().unwrap();
            if change.kind == ChangeKind::Release {
                previous_at_release
                    .entry(change.agent.clone())
                    .or_insert_with(|| fleet[index].current.clone());
            }
            fleet[index].current = change.to.clone();
            latest.insert(change.agent.clone(), change.clone());
        }
        let releases: Vec<&Change> = changes
            .iter()
            .filter(|change| change.kind == ChangeKind::Release)
            .collect();

        // Never more agents on the release than the open waves allow.
        let on_release = latest
            .values()
            .filter(|change| change.kind == ChangeKind::Release)
            .count() as u64;
        assert_eq!(on_release, rollout.on_release());
        assert!(
            on_release <= rollout.allowed(),
            "{on_release} on the release, waves allow {}",
            rollout.allowed()
        );
        // Once the failure budget is spent, no further agent is given the release.
        if !releases.is_empty() {
            assert!(!spent, "released after the budget was spent: {releases:?}");
            assert!(rollout.failures() <= rollout.budget());
        }
        if rollout.failures() > rollout.budget() {
            spent = true;
        }
        // Canaries first.
        if releases.iter().any(|change| {
            let index: usize = change.agent[6..].parse().unwrap();
            !fleet[index].canary
        }) {
            assert!(
                !rollout
                    .members
                    .values()
                    .any(|member| member.canary && member.state == MemberState::Waiting),
                "a non-canary released before a waiting canary"
            );
        }
        // A roll back returns every agent it touched to what it had.
        if rollout.phase == Phase::RolledBack {
            for (agent, previous) in &previous_at_release {
                let change = &latest[agent];
                assert_eq!(change.kind, ChangeKind::Restore, "{agent} not restored");
                assert_eq!(
                    &change.to, previous,
                    "{agent} restored to the wrong release"
                );
            }
        }
        if outcome.last.phase == Phase::RolledBack {
            assert!(
                changes.is_empty(),
                "a rolled back rollout changed {changes:?}"
            );
        }
        outcome.changes.push(changes);
        outcome.last = rollout.clone();
    }
    outcome
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn promises_hold_and_a_restart_changes_no_decision((plan, fleet, events) in scenario()) {
        let straight = run(&plan, &fleet, &events, false);
        let restarted = run(&plan, &fleet, &events, true);
        prop_assert_eq!(straight, restarted);
    }
}

/// Every agent and its latest report, as a hub that re-reads the whole fleet feeds it.
fn everything(fleet: &[Agent]) -> Vec<Input> {
    let mut inputs: Vec<Input> = (0..fleet.len())
        .map(|index| agent_input(fleet, index))
        .collect();
    inputs.extend((0..fleet.len()).filter_map(|index| report_input(fleet, index)));
    inputs
}

fn agent_input(fleet: &[Agent], index: usize) -> Input {
    let agent = &fleet[index];
    Input::Agent {
        id: format!("agent-{index:03}"),
        matches: agent.matches,
        canary: agent.canary,
        target: Some(assigned(10, TARGET, "")),
        current: agent.current.clone(),
    }
}

fn report_input(fleet: &[Agent], index: usize) -> Option<Input> {
    fleet[index].report.map(|(digest, health)| Input::Report {
        agent: format!("agent-{index:03}"),
        digest,
        health,
        message: "m".to_owned(),
    })
}

/// Runs the scenario twice in lockstep. `full` is fed every agent and report on every event;
/// `lean` is fed the way the hub's driver feeds it — only the agents that changed (joined,
/// stopped matching, or had their assignment changed by the last step) with their latest
/// report, and the reports that arrived — and is stepped only when it has something to
/// observe, a health timeout is due ([`Rollout::next_deadline`]) or an operator commands. A
/// restart reloads both from JSON and feeds `lean` everything once, as a restarted driver
/// does. Both must decide the same at every point, and `lean` must name every member it
/// changed ([`Rollout::take_touched`]), since only those are written.
fn lockstep(plan: &Plan, fleet: &[Agent], events: &[Event]) {
    let mut fleet: Vec<Agent> = fleet.to_vec();
    let mut full = Rollout::new(7, plan.clone(), "ops", "test", 1_000).unwrap();
    let mut lean = full.clone();
    let mut now = 1_000;
    let mut dirty_agents: std::collections::BTreeSet<usize> = (0..fleet.len()).collect();
    let mut dirty_reports: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
    for event in events.iter().cloned() {
        let changes = match event {
            Event::Restart => {
                full = serde_json::from_str(&serde_json::to_string(&full).unwrap()).unwrap();
                lean = serde_json::from_str(&serde_json::to_string(&lean).unwrap()).unwrap();
                dirty_agents = (0..fleet.len()).collect();
                continue;
            }
            Event::Command(command) => {
                let before = lean.clone();
                let decided = full.command(command, "ops", "because", now);
                let lean_decided = lean.command(command, "ops", "because", now);
                assert_eq!(decided, lean_decided);
                check_touched(&before, &mut lean);
                decided.unwrap_or_default()
            }
            other => {
                match other {
                    Event::Tick(seconds) => now += seconds,
                    Event::Report(index, on_target, health) if !fleet.is_empty() => {
                        let index = index % fleet.len();
                        let byte = if on_target { TARGET } else { 1 };
                        fleet[index].report = Some((digest(byte), health));
                        dirty_reports.insert(index);
                    }
                    Event::Join(canary) => {
                        fleet.push(Agent {
                            canary,
                            matches: true,
                            current: None,
                            report: None,
                        });
                        dirty_agents.insert(fleet.len() - 1);
                    }
                    Event::Leave(index) if !fleet.is_empty() => {
                        let index = index % fleet.len();
                        fleet[index].matches = false;
                        dirty_agents.insert(index);
                    }
                    _ => {}
                }
                let decided = full.step(&everything(&fleet), now);
                let mut inputs: Vec<Input> = dirty_agents
                    .iter()
                    .map(|index| agent_input(&fleet, *index))
                    .collect();
                inputs.extend(
                    dirty_agents
                        .iter()
                        .chain(&dirty_reports)
                        .filter_map(|index| report_input(&fleet, *index)),
                );
                dirty_agents.clear();
                dirty_reports.clear();
                let due = lean.next_deadline().is_some_and(|deadline| deadline <= now);
                let lean_decided = match inputs.is_empty() && !due {
                    true => Vec::new(),
                    false => {
                        let before = lean.clone();
                        let decided = lean.step(&inputs, now);
                        check_touched(&before, &mut lean);
                        decided
                    }
                };
                assert_eq!(decided, lean_decided, "at {now}");
                decided
            }
        };
        for change in &changes {
            let index: usize = change.agent[6..].parse().unwrap();
            fleet[index].current = change.to.clone();
            dirty_agents.insert(index);
        }
        assert_eq!(full, lean, "at {now}");
    }
}

/// Every member that differs from `before` is among those `after` says it touched.
fn check_touched(before: &Rollout, after: &mut Rollout) {
    let touched = after.take_touched();
    for (id, member) in &after.members {
        if before.members.get(id) != Some(member) {
            assert!(touched.contains(id), "{id} changed but was not named");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn fed_only_what_changed_it_decides_as_if_fed_everything((plan, fleet, events) in scenario()) {
        lockstep(&plan, &fleet, &events);
    }
}

fn fleet_of(count: usize, canaries: &[usize]) -> Vec<Input> {
    (0..count)
        .map(|index| Input::Agent {
            id: format!("agent-{index:03}"),
            matches: true,
            canary: canaries.contains(&index),
            target: Some(assigned(10, TARGET, "")),
            current: Some(assigned(3, 3, "track:x")),
        })
        .collect()
}

fn healthy(agents: &[String]) -> Vec<Input> {
    agents
        .iter()
        .map(|agent| Input::Report {
            agent: agent.clone(),
            digest: digest(TARGET),
            health: Health::Healthy,
            message: String::new(),
        })
        .collect()
}

fn released(changes: &[Change]) -> Vec<String> {
    changes.iter().map(|change| change.agent.clone()).collect()
}

#[test]
fn waves_open_as_the_previous_one_turns_healthy_canaries_first() {
    let waves = [
        Size::Count(1),
        Size::Percent(10),
        Size::Percent(50),
        Size::Percent(100),
    ];
    let mut rollout = Rollout::new(
        1,
        plan(&waves, Size::Count(0), OnFailure::Pause),
        "ops",
        "",
        0,
    )
    .unwrap();
    let fleet = fleet_of(40, &[17]);
    let first = rollout.step(&fleet, 0);
    assert_eq!(released(&first), ["agent-017"], "the canary goes first");
    assert_eq!(first[0].to.as_ref().unwrap().origin, "rollout:1");
    // Nothing more until it is healthy.
    assert!(rollout.step(&fleet, 10).is_empty());
    let mut inputs = fleet.clone();
    inputs.extend(healthy(&released(&first)));
    let second = rollout.step(&inputs, 20);
    assert_eq!(second.len(), 3, "10% of 40 = 4 in all");
    assert_eq!(rollout.wave, 1);
    inputs.extend(healthy(&released(&second)));
    let third = rollout.step(&inputs, 30);
    assert_eq!(third.len(), 16, "50% of 40 = 20 in all");
    inputs.extend(healthy(&released(&third)));
    let fourth = rollout.step(&inputs, 40);
    assert_eq!(fourth.len(), 20);
    inputs.extend(healthy(&released(&fourth)));
    assert!(rollout.step(&inputs, 50).is_empty());
    assert_eq!(rollout.phase, Phase::Succeeded);
    let waves = rollout.waves();
    assert_eq!(
        waves.iter().map(|wave| wave.healthy).collect::<Vec<_>>(),
        [1, 3, 16, 20]
    );
    // A new agent that starts matching gets the release at once.
    let mut joined = inputs.clone();
    joined.extend(fleet_of(41, &[]).into_iter().skip(40));
    assert_eq!(released(&rollout.step(&joined, 60)), ["agent-040"]);
}

#[test]
fn offline_agents_become_pending_and_do_not_block() {
    let waves = [Size::Count(2), Size::Percent(100)];
    let mut rollout = Rollout::new(
        1,
        plan(&waves, Size::Count(0), OnFailure::Pause),
        "ops",
        "",
        0,
    )
    .unwrap();
    let fleet = fleet_of(5, &[]);
    let first = rollout.step(&fleet, 0);
    assert_eq!(first.len(), 2);
    // agent-000 reports healthy; agent-001 is offline and never reports.
    let mut inputs = fleet.clone();
    inputs.extend(healthy(&["agent-000".to_owned()]));
    assert!(rollout.step(&inputs, TIMEOUT - 1).is_empty());
    let second = rollout.step(&inputs, TIMEOUT);
    assert_eq!(
        second.len(),
        3,
        "the timeout made agent-001 pending; next wave"
    );
    assert_eq!(rollout.members["agent-001"].state, MemberState::Pending);
    // It reconnects later and reports healthy: it counts as healthy.
    inputs.extend(healthy(&["agent-001".to_owned()]));
    rollout.step(&inputs, TIMEOUT + 5);
    assert_eq!(rollout.members["agent-001"].state, MemberState::Healthy);
}

#[test]
fn failures_past_the_budget_roll_back_everyone_released() {
    let waves = [Size::Count(2), Size::Percent(100)];
    let mut rollout = Rollout::new(
        1,
        plan(&waves, Size::Count(0), OnFailure::Rollback),
        "ops",
        "",
        0,
    )
    .unwrap();
    let fleet = fleet_of(4, &[]);
    let first = rollout.step(&fleet, 0);
    let mut inputs = fleet.clone();
    inputs.push(Input::Report {
        agent: first[0].agent.clone(),
        digest: digest(TARGET),
        health: Health::Degraded,
        message: "pod crash-looping".to_owned(),
    });
    assert!(
        rollout.step(&inputs, 100).is_empty(),
        "degraded is not failed yet"
    );
    let back = rollout.step(&inputs, TIMEOUT);
    assert_eq!(rollout.phase, Phase::RolledBack);
    assert_eq!(back.len(), 2);
    assert!(
        back.iter().all(|change| change.kind == ChangeKind::Restore
            && change.to == Some(assigned(3, 3, "track:x")))
    );
    let MemberState::Restored { was, failed: true } = &rollout.members[&first[0].agent].state
    else {
        panic!("not restored: {:?}", rollout.members[&first[0].agent]);
    };
    assert!(
        was.contains("failed") && was.contains("crash-looping"),
        "{was}"
    );
    assert!(
        rollout
            .log
            .iter()
            .any(|record| record.who == "hub" && record.action == "rolled back")
    );
}

#[test]
fn pause_on_failure_then_resume_accepts_the_failures_so_far() {
    let waves = [Size::Count(1), Size::Percent(100)];
    let mut rollout = Rollout::new(
        1,
        plan(&waves, Size::Count(0), OnFailure::Pause),
        "ops",
        "",
        0,
    )
    .unwrap();
    let fleet = fleet_of(3, &[]);
    let first = rollout.step(&fleet, 0);
    let mut inputs = fleet.clone();
    inputs.push(Input::Report {
        agent: first[0].agent.clone(),
        digest: digest(TARGET),
        health: Health::Failed,
        message: "image pull".to_owned(),
    });
    assert!(rollout.step(&inputs, 5).is_empty());
    assert!(matches!(&rollout.phase, Phase::Paused { reason } if reason.contains("budget")));
    assert_eq!(
        rollout.command(Command::Pause, "ops", "x", 6),
        Err(CommandError {
            command: "pause",
            phase: "paused"
        })
    );
    let resumed = rollout
        .command(Command::Resume, "alice", "fixed the registry", 7)
        .unwrap();
    assert_eq!(resumed.len(), 2, "the rest are released");
    let record = rollout
        .log
        .iter()
        .find(|record| record.action == "resume")
        .unwrap();
    assert_eq!(
        (record.who.as_str(), record.why.as_str()),
        ("alice", "fixed the registry")
    );
}

#[test]
fn plans_are_checked() {
    assert_eq!(Size::parse("10%"), Ok(Size::Percent(10)));
    assert_eq!(Size::parse(" 3 "), Ok(Size::Count(3)));
    assert!(Size::parse("101%").is_err());
    assert!(Size::parse("ten").is_err());
    let mut bad = plan(&[Size::Count(1)], Size::Count(0), OnFailure::Pause);
    assert_eq!(bad.validate(), Err(PlanError::LastWave(Size::Count(1))));
    bad.waves = vec![Size::Count(0), Size::Percent(100)];
    assert_eq!(bad.validate(), Err(PlanError::EmptyWave(1)));
    bad.waves = vec![];
    assert_eq!(bad.validate(), Err(PlanError::NoWaves));
}
