//! The real `outpost-hub` binary: sync a repository, then read releases, objects and events.

mod support;

use std::process::{Command, Output};

use support::{Upstream, config_map};

fn hub(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run outpost-hub")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn sync_then_list_releases_objects_and_events() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.write(
        "pos/ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    upstream.commit("first");
    upstream.git(&["tag", "pos-v1"]);
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();

    let synced = stdout(&hub(&[
        "sync",
        "--data-dir",
        data_dir,
        "--source",
        &upstream.url(),
    ]));
    assert!(synced.contains("rendered  pos generation 1"), "{synced}");
    assert!(data.path().join("keys/root.pub").exists());

    let json = stdout(&hub(&[
        "releases",
        "--data-dir",
        data_dir,
        "--output",
        "json",
    ]));
    let releases: serde_json::Value = serde_json::from_str(&json).unwrap();
    let tagged = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ref"] == "refs/tags/pos-v1")
        .unwrap();
    assert_eq!(tagged["bundle"], "pos");
    assert_eq!(tagged["generation"], 1);

    let objects = stdout(&hub(&["objects", "--data-dir", data_dir, "pos", "1"]));
    let namespace = objects.find("Namespace").unwrap();
    let config_map = objects.find("ConfigMap").unwrap();
    assert!(namespace < config_map, "apply order: {objects}");

    let missing = hub(&["objects", "--data-dir", data_dir, "pos", "9"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("outpost-hub releases"));

    // An unreachable source: non-zero exit, and the failure is in the event log.
    let gone = format!("file://{}/nowhere", data_dir);
    let failed = hub(&["sync", "--data-dir", data_dir, "--source", &gone]);
    assert!(!failed.status.success());
    let events = stdout(&hub(&["events", "--data-dir", data_dir]));
    assert!(events.contains("fetch-failed"), "{events}");
}

#[test]
fn run_once_from_a_config_file_and_config_errors_listed_together() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.commit("first");
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[[sources]]\nname = \"fleet\"\nurl = \"{}\"\n",
            data.path().join("state").display(),
            upstream.url()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let ran = stdout(&hub(&["run", "--config", config, "--once"]));
    assert!(ran.contains("rendered  pos generation 1"), "{ran}");
    assert!(data.path().join("state/git/fleet/HEAD").exists());
    assert!(data.path().join("state/keys/signing.key").exists());

    let bad = data.path().join("bad.toml");
    std::fs::write(
        &bad,
        "poll_interval_seconds = 0\n[[sources]]\nname = \"x\"\nurl = \"https://h/x.git\"\n",
    )
    .unwrap();
    let checked = hub(&["check-config", "--config", bad.to_str().unwrap()]);
    assert!(!checked.status.success());
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(stderr.contains("data_dir is required"), "{stderr}");
    assert!(
        stderr.contains("poll_interval_seconds must be at least 1"),
        "{stderr}"
    );
    assert!(
        stderr.contains("http(s) sources are not supported"),
        "{stderr}"
    );
}
