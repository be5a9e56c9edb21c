//! Helpers for tests that run the real binaries as processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The path of a workspace binary built beside the running test (target/<profile>/).
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program` to completion and returns its stdout; panics with its output if it failed.
pub fn run(program: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Polls `check` every 200 ms for up to `seconds`; panics naming `what` on timeout.
pub fn wait_for(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {seconds}s waiting for {what}");
}

/// Enrols an agent process with the in-process `hub`: writes an enrolment bundle (fresh token)
/// to `work/enrol.toml`, runs `outpost-agent enrol` on `state_dir`, returns the agent id.
pub fn enrol_agent(
    agent: &Path,
    hub: &crate::harness::TestHub,
    work: &Path,
    state_dir: &str,
) -> String {
    let bundle = work.join("enrol.toml");
    std::fs::write(
        &bundle,
        format!(
            "hub = \"{}\"\nhub_pin = \"{}\"\nroot_key = \"{}\"\ntoken = \"{}\"\n",
            hub.address,
            hub.pin().to_hex(),
            hex::encode(hub.keys.root.public_key().to_bytes()),
            hub.token(&[])
        ),
    )
    .expect("write the enrolment bundle");
    let out = run(
        agent,
        &["enrol", "--bundle", &bundle.display().to_string()],
        &[("OUTPOST_AGENT_STATE_DIR", state_dir.to_owned())],
    );
    // "enrolled as agent ID; now run ..."
    out.split_whitespace()
        .nth(3)
        .expect("the agent id")
        .trim_end_matches(';')
        .to_owned()
}
