//! The fleet simulation end to end: the demo scenario, scaled down, run twice with one seed.
//! (One test: the simulations share the process's virtual clock, so they run one at a time.)

use outpost_sim::scenario::{DEMO, Scenario};
use outpost_sim::{fleet, write_outputs};

/// Per wave: released, failed, restored.
type Waves = Vec<(u64, u64, u64)>;

/// Per rollout: phase, failures, waves.
fn outcome(report: &fleet::Report) -> Vec<(String, u64, Waves)> {
    report
        .rollouts
        .iter()
        .map(|rollout| {
            let waves = rollout["waves"]
                .as_array()
                .unwrap()
                .iter()
                .map(|wave| {
                    let n = |field: &str| wave[field].as_u64().unwrap();
                    (n("released"), n("failed"), n("restored"))
                })
                .collect();
            (
                rollout["phase"].as_str().unwrap().to_owned(),
                rollout["failures"].as_u64().unwrap(),
                waves,
            )
        })
        .collect()
}

#[test]
fn the_demo_rolls_back_when_berlin_fails_and_a_seed_repeats_the_outcome() {
    let scenario = Scenario::parse(DEMO).unwrap().scaled(40);
    let first = fleet::run(&scenario, false).unwrap();
    assert!(
        first.settled,
        "the fleet settled: {:?}",
        first.samples.last()
    );
    assert_eq!(first.converged, first.agents, "everyone healthy at the end");
    let rollout = &first.rollouts[0];
    assert_eq!(rollout["phase"], "rolled-back", "{rollout}");
    let failures = rollout["failures"].as_u64().unwrap();
    assert!(failures > rollout["budget"].as_u64().unwrap());
    let berlin = scenario
        .groups
        .iter()
        .find(|g| g.name == "berlin")
        .unwrap()
        .count as u64;
    assert!(
        failures <= berlin,
        "only Berlin fails: {failures} > {berlin}"
    );
    // Canary first: the first wave released exactly one agent.
    assert_eq!(rollout["waves"][0]["released"], 1);
    assert!(first.bytes.total > 0 && first.payload_bytes > 0);

    let out = tempfile::tempdir().unwrap();
    let files = write_outputs(&first, out.path()).unwrap();
    for file in &files {
        assert!(
            std::fs::metadata(file).unwrap().len() > 200,
            "{}",
            file.display()
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(report["agents"], first.agents);

    let again = fleet::run(&scenario, false).unwrap();
    assert_eq!(
        outcome(&first),
        outcome(&again),
        "same scenario and seed, same outcome"
    );
}
