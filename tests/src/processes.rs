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
