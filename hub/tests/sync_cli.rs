//! The real `outpost-hub` binary: sync a repository, then read releases, objects and events.

mod support;

use std::process::{Command, Output};

use support::{Upstream, config_map};

fn hub(args: &[&str]) -> Output {
    hub_as("", args)
}

/// Runs the CLI with `OUTPOST_TOKEN` set to `token` (none if empty).
fn hub_as(token: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outpost-hub"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .env(
            "OUTPOST_CREDENTIALS",
            "/nonexistent/outpost-test-credentials.json",
        );
    match token.is_empty() {
        true => command.env_remove("OUTPOST_TOKEN"),
        false => command.env("OUTPOST_TOKEN", token),
    };
    command.output().expect("run outpost-hub")
}

/// Makes the keys and an admin API token for the hub `config` describes; returns the token.
fn bootstrap(config: &std::path::Path) -> String {
    let config = config.to_str().unwrap();
    stdout(&hub(&["keys", "init", "--config", config]));
    stdout(&hub(&[
        "admin-token",
        "create",
        "--config",
        config,
        "--name",
        "test-admin",
        "--role",
        "admin",
    ]))
    .trim()
    .to_owned()
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

struct Server {
    child: std::process::Child,
    url: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes keys and a token, starts `outpost-hub run` on a free loopback port and waits until it
/// answers.
fn serve(config: &std::path::Path) -> Server {
    let token = bootstrap(config);
    let port = support::free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("OUTPOST_HUB_LISTEN_ADMIN", format!("127.0.0.1:{port}"))
        .env(
            "OUTPOST_HUB_LISTEN_AGENTS",
            format!("127.0.0.1:{}", support::free_udp_port()),
        )
        .env("OUTPOST_HUB_POLL_INTERVAL_SECONDS", "3600")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        token,
    };
    support::wait_for_port(port);
    server
}

/// Runs a CLI command against the server and parses its JSON output.
fn api(server: &Server, args: &[&str]) -> serde_json::Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--hub", &server.url, "--output", "json"]);
    serde_json::from_str(&stdout(&hub_as(&server.token, &all))).unwrap()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn admin_api_and_cli_releases_objects_fetch_now_tokens_and_agents() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.write(
        "pos/ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    upstream.commit("first");
    upstream.git(&["tag", "pos-v1"]);
    let data = tempfile::tempdir().unwrap();
    let state = data.path().join("state");
    let config = data.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[[sources]]\nname = \"fleet\"\nurl = \"{}\"\n",
            state.display(),
            upstream.url()
        ),
    )
    .unwrap();
    let server = serve(&config);

    // The first sync runs at start.
    let tagged = |releases: &serde_json::Value, tag: &str| {
        releases
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["ref"] == format!("refs/tags/{tag}"))
            .cloned()
    };
    wait_for("the first sync", || {
        tagged(&api(&server, &["releases"]), "pos-v1").is_some()
    });
    let release = tagged(&api(&server, &["releases"]), "pos-v1").unwrap();
    assert_eq!(release["bundle"], "pos");
    let generation = release["generation"].as_u64().unwrap();

    let objects = api(&server, &["objects", "pos", &generation.to_string()]);
    let kinds: Vec<&str> = objects
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Namespace", "ConfigMap"]);
    let snapshot = api(&server, &["snapshot", "pos", &generation.to_string()]);
    assert_eq!(snapshot["object_count"], 2);

    // A push hook makes the hub fetch at once, long before the hour-long poll interval.
    upstream.write("pos/app.yaml", &config_map("pos", "2"));
    upstream.commit("second");
    upstream.git(&["tag", "pos-v2"]);
    // Without a token the API refuses, and says how to get one.
    let refused = hub(&["releases", "--hub", &server.url]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("outpost-hub login"),
        "{stderr}"
    );
    let hooked = hub_as(&server.token, &["fetch-now", "--hub", &server.url]);
    assert!(hooked.status.success());
    wait_for("the hooked fetch", || {
        tagged(&api(&server, &["releases"]), "pos-v2").is_some()
    });
    assert!(
        tagged(&api(&server, &["releases"]), "pos-v2").unwrap()["generation"]
            .as_u64()
            .unwrap()
            > generation
    );

    // Tokens: created with labels, shown once, listed by digest.
    let token = api(
        &server,
        &[
            "tokens",
            "create",
            "--label",
            "region=eu",
            "--label",
            "ring=canary",
        ],
    );
    let secret = token["token"].as_str().unwrap().to_owned();
    let listed = api(&server, &["tokens", "list"]);
    assert_eq!(listed[0]["digest"], token["digest"]);
    assert!(
        !listed.to_string().contains(&secret),
        "the secret is never listed"
    );
    let bad = hub_as(
        &server.token,
        &[
            "tokens",
            "create",
            "--label",
            "bad key=x",
            "--hub",
            &server.url,
        ],
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("400"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // An agent enrols with the token (the transport's step, done here on the same store).
    let agent_id = {
        use outpost_hub::store::{SqliteStore, Store};
        let store = SqliteStore::open(&state.join("hub.db")).unwrap();
        let digest = outpost_proto::Digest::of(secret.as_bytes());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        store.enrol(&digest, &[9; 32], now).unwrap().unwrap().id
    };
    let agents = api(&server, &["agents", "list"]);
    assert_eq!(agents[0]["labels"]["region"], "eu");
    let labelled = api(
        &server,
        &["agents", "label", &agent_id, "region=uk", "ring-"],
    );
    assert_eq!(labelled[0]["labels"], serde_json::json!({"region": "uk"}));
    let revoked = api(
        &server,
        &["agents", "revoke", &agent_id, "--why", "stolen van"],
    );
    assert_eq!(revoked[0]["revoked"]["why"], "stolen van");
    let missing = hub_as(
        &server.token,
        &[
            "agents",
            "revoke",
            "nope",
            "--why",
            "x",
            "--hub",
            &server.url,
        ],
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let events = api(&server, &["events"]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "agent-revoked")
    );
}

#[test]
fn sync_locally_without_a_running_hub() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.commit("first");
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap();
    let refused = hub(&["sync", "--data-dir", data_dir, "--source", &upstream.url()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("keys init"),
        "says how to make the keys: {stderr}"
    );
    stdout(&hub(&[
        "keys",
        "init",
        "--key-dir",
        &format!("{data_dir}/keys"),
    ]));
    let synced = stdout(&hub(&[
        "sync",
        "--data-dir",
        data_dir,
        "--source",
        &upstream.url(),
    ]));
    assert!(synced.contains("rendered  pos generation 1"), "{synced}");
    assert!(data.path().join("keys/root.pub").exists());
    let gone = format!("file://{data_dir}/nowhere");
    let failed = hub(&["sync", "--data-dir", data_dir, "--source", &gone]);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("still served"));
}

#[test]
fn cli_says_when_the_hub_is_unreachable() {
    let port = support::free_port();
    let output = hub(&["releases", "--hub", &format!("http://127.0.0.1:{port}")]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is `outpost-hub run` up"));
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
    let refused = hub(&["run", "--config", config, "--once"]);
    assert!(!refused.status.success(), "no keys, no run");
    assert!(
        !data.path().join("state/keys/root.key").exists(),
        "and no key made"
    );
    stdout(&hub(&["keys", "init", "--config", config]));
    let ran = stdout(&hub(&["run", "--config", config, "--once"]));
    assert!(ran.contains("rendered  pos generation 1"), "{ran}");
    assert!(data.path().join("state/git/fleet/HEAD").exists());
    assert!(data.path().join("state/keys/signing.key").exists());

    let bad = data.path().join("bad.toml");
    std::fs::write(
        &bad,
        "poll_interval_seconds = 0\n[[sources]]\nname = \"x\"\nurl = \"https://h/x.git\"\npassword_env = \"OUTPOST_TEST_NOT_SET\"\n",
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
        stderr.contains("OUTPOST_TEST_NOT_SET, which is not set"),
        "{stderr}"
    );
}
