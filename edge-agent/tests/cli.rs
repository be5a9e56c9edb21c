//! The `outpost-agent` binary's answers to operators when something is missing or wrong.
//! (Its work with a hub is tested with real processes in `tests/tests/processes.rs`.)

use std::process::{Command, Output};

fn agent(state_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .args(args)
        .env("OUTPOST_AGENT_STATE_DIR", state_dir)
        .output()
        .expect("run outpost-agent")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn status_and_run_before_enrolment_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let status = agent(dir.path(), &["status"]);
    assert!(!status.status.success());
    assert!(
        stderr(&status).contains("enrol first"),
        "{}",
        stderr(&status)
    );
    let run = agent(dir.path(), &["run"]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("not enrolled"), "{}", stderr(&run));
}

#[test]
fn a_bad_enrolment_bundle_is_refused_with_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("enrol.toml");
    std::fs::write(&bundle, "hub = \"nowhere\"\n").unwrap();
    let output = agent(
        &dir.path().join("state"),
        &["enrol", "--bundle", bundle.to_str().unwrap()],
    );
    assert!(!output.status.success());
    let text = stderr(&output);
    for expected in ["missing hub_pin", "missing token", "needs a port"] {
        assert!(text.contains(expected), "{expected:?} missing in {text}");
    }
    let missing = agent(
        dir.path(),
        &["enrol", "--bundle", "/nonexistent/enrol.toml"],
    );
    assert!(
        stderr(&missing).contains("reading the enrolment bundle"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn a_bad_config_names_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "[cluster]\ntarget = \"k8s\"\n[reconcile]\nhealth_poll_seconds = 0\n",
    )
    .unwrap();
    let output = agent(dir.path(), &["--config", config.to_str().unwrap(), "run"]);
    assert!(!output.status.success());
    let text = stderr(&output);
    for expected in [
        "invalid agent configuration",
        "\"k8s\" is not one of",
        "health_poll_seconds must be at least 1",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in {text}");
    }
}
