//! Runs the real `outpost-sim pipeline` binary: every release verifies, every attack is refused.

use std::process::Command;

#[test]
fn pipeline_verifies_releases_and_refuses_attacks() {
    let output = Command::new(env!("CARGO_BIN_EXE_outpost-sim"))
        .arg("pipeline")
        .output()
        .expect("run outpost-sim");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.matches("verified ").count(), 3, "{stdout}");
    assert!(stdout.contains("rollback refused"), "{stdout}");
    assert!(stdout.contains("the signed header says"), "{stdout}");
    assert!(!stdout.contains("ACCEPTED"), "{stdout}");
}
