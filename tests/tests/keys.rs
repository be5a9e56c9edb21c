//! The key ceremony end to end, with a real `outpost-hub run`, a real `outpost-agent run`
//! reconciling the Kubernetes API test server, and the operator's commands:
//! - the root key moved offline: the hub keeps signing and makes no root of its own;
//! - `keys rotate`: the new certificate reaches the agent before anything it signs;
//! - `keys revoke` of a leaked key: a rogue hub that holds the stolen key (and the hub's
//!   identity) signs a new release and its assignment with it, and the agent refuses the
//!   assignment while it keeps enforcing what it verified before;
//! - snapshot expiry: with the hub gone, the agent keeps enforcing an expired snapshot and says
//!   it is stale; the hub, back, records it and signs the snapshot again.
//!
//! And the files with state or keys, hub's and agent's, are 0600 in 0700 folders under umask 022.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{
    HubProcess, Process, binary, git, git_init, run, shop_value, wait_for,
};
use serde_json::Value;

fn config_map(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\ndata:\n  value: \"{value}\"\n"
    )
}

fn commit(repo: &Path, value: &str) {
    std::fs::write(repo.join("shop/app.yaml"), config_map(value)).unwrap();
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-qm", value]);
}

fn agent_status(agent: &Path, state: &Path) -> Value {
    serde_json::from_str(&run(
        agent,
        &["status", "--output", "json"],
        &[("OUTPOST_AGENT_STATE_DIR", state.display().to_string())],
    ))
    .unwrap()
}

/// Starts `outpost-agent run` with a short drift interval and its metrics on `metrics`.
fn run_agent(agent: &Path, state: &Path, kubeconfig: &Path, metrics: &str) -> Process {
    Process(
        Command::new(agent)
            .args(["run", "--kubeconfig", &kubeconfig.display().to_string()])
            .env("OUTPOST_AGENT_STATE_DIR", state)
            .env("OUTPOST_AGENT_DRIFT_SECONDS", "2")
            .env("OUTPOST_AGENT_METRICS_ADDRESS", metrics)
            .env("OUTPOST_LOG", "warn")
            .spawn()
            .expect("start outpost-agent"),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn rotation_revocation_and_expiry_with_real_processes() {
    let agent_bin = binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    commit(&repo, "1");
    let mut hub = HubProcess::start_with(
        work.path(),
        &repo,
        "main",
        "key_rotation_grace_seconds = 1\nsnapshot_lifetime = \"20s\"",
    );
    let keys = hub.key_dir();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let kubeconfig = cluster.write_kubeconfig(work.path().join("kubeconfig"));
    let state = work.path().join("agent");
    let id = hub.enrol(&agent_bin, &state, &[]);
    let metrics = format!("127.0.0.1:{}", outpost_e2e::processes::free_port(false));
    let _agent = run_agent(&agent_bin, &state, &kubeconfig, &metrics);
    wait_for("the first release applied", 60, || {
        shop_value(&cluster).as_deref() == Some("1")
    });

    // The operator moves the root key offline; the hub goes on without it.
    let offline = work.path().join("offline-root.key");
    std::fs::rename(keys.join("root.key"), &offline).unwrap();
    let root_pub = std::fs::read(keys.join("root.pub")).unwrap();
    hub.restart();
    let first_key = hub.get("/api/v1/keys")["active"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    // The attacker's copy of the signing key in use, for later.
    let stolen = work.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for name in ["signing.key", "signing.cert"] {
        std::fs::copy(keys.join(name), stolen.join(name)).unwrap();
    }
    commit(&repo, "2");
    hub.cli(&["fetch-now"]);
    wait_for("the second release, signed without root.key", 60, || {
        shop_value(&cluster).as_deref() == Some("2")
    });
    assert!(
        !keys.join("root.key").exists(),
        "the hub never makes a root key"
    );
    assert_eq!(std::fs::read(keys.join("root.pub")).unwrap(), root_pub);
    let status = hub.cli(&["keys", "status"]);
    assert!(status.contains("offline"), "{status}");

    // Rotation, with the root key given as a file.
    let rotated = run(
        &hub.binary,
        &[
            "keys",
            "rotate",
            "--key-dir",
            &keys.display().to_string(),
            "--root-key",
            &offline.display().to_string(),
        ],
        &[],
    );
    let next_key = rotated.split_whitespace().nth(2).unwrap().to_owned();
    // The new key signs once its grace (1 s, counted in whole seconds) has passed.
    wait_for("the rotated key to become the active one", 15, || {
        hub.cli(&["keys", "reload"]);
        hub.get("/api/v1/keys")["active"]["key"]
            .as_str()
            .is_some_and(|active| active.starts_with(&next_key))
    });
    let active = hub.get("/api/v1/keys")["active"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("the agent to trust the new key", 30, || {
        agent_status(&agent_bin, &state)["signing_keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|key| key["key"] == active.as_str())
    });
    commit(&repo, "3");
    hub.cli(&["fetch-now"]);
    wait_for("a release signed with the rotated key applied", 60, || {
        shop_value(&cluster).as_deref() == Some("3")
    });
    let newest = hub.get("/api/v1/bundles")[0]["newest_generation"]
        .as_u64()
        .unwrap();
    let snapshot = hub.get(&format!("/api/v1/snapshots/shop/{newest}"));
    assert!(
        active.starts_with(snapshot["key_id"].as_str().unwrap()),
        "{snapshot}"
    );

    // The first key leaked: revoke it. Agents hear of it with the hub's keys.
    run(
        &hub.binary,
        &[
            "keys",
            "revoke",
            "--key-dir",
            &keys.display().to_string(),
            "--root-key",
            &offline.display().to_string(),
            &first_key[..12],
        ],
        &[],
    );
    hub.cli(&["keys", "reload"]);
    wait_for("the agent to hold the revocation", 30, || {
        let status = agent_status(&agent_bin, &state);
        status["revocations_version"] == 1
            && status["signing_keys"]
                .as_array()
                .unwrap()
                .iter()
                .any(|key| key["key"] == first_key.as_str() && key["revoked"] == true)
    });

    // Expiry: with the hub gone, the held snapshot expires (20 s); the agent keeps enforcing
    // it and says it is stale.
    hub.stop();
    wait_for("the agent to say it is stale", 60, || {
        agent_status(&agent_bin, &state)["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|bundle| bundle["stale"] == true)
    });
    assert!(runtime.block_on(cluster.kubectl_delete("v1", "ConfigMap", "default", "shop")));
    wait_for("a stale snapshot still enforced", 30, || {
        shop_value(&cluster).as_deref() == Some("3")
    });
    // The hub, back: it records the stale agent and signs the snapshot again; the agent takes
    // the fresh header (the same body) and is no longer stale.
    hub.restart();
    wait_for("the stale report at the hub", 60, || {
        hub.get("/api/v1/events?limit=1000")
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["kind"] == "agent-stale" && event["subject"] == id.as_str())
    });
    wait_for("fresh again", 60, || {
        hub.get(&format!("/api/v1/status?agent={id}"))
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["stale"] == false && row["phase"] == "Healthy")
    });
    assert_eq!(shop_value(&cluster).as_deref(), Some("3"));

    // A rogue hub with the stolen key and a copy of the hub's data (its identity too) takes
    // the hub's place, without the revocation list, and signs a new release with the old key.
    hub.stop();
    let rogue_data = work.path().join("rogue");
    copy_dir(&work.path().join("hub"), &rogue_data);
    let rogue_keys = rogue_data.join("keys");
    for name in ["signing.key", "signing.cert"] {
        std::fs::copy(stolen.join(name), rogue_keys.join(name)).unwrap();
    }
    std::fs::remove_file(rogue_keys.join("revocations")).unwrap();
    let _ = std::fs::remove_dir_all(rogue_keys.join("certificates"));
    let rogue_config = work.path().join("rogue.toml");
    std::fs::write(
        &rogue_config,
        std::fs::read_to_string(&hub.config).unwrap().replace(
            &format!("data_dir = \"{}\"", work.path().join("hub").display()),
            &format!("data_dir = \"{}\"", rogue_data.display()),
        ),
    )
    .unwrap();
    let mut rogue = HubProcess {
        process: None,
        url: hub.url.clone(),
        agents_port: hub.agents_port,
        config: rogue_config,
        binary: hub.binary.clone(),
        token: hub.token.clone(),
        json_log: None,
    };
    rogue.restart();
    assert!(
        rogue.get("/api/v1/keys")["active"]["key"] == first_key.as_str(),
        "the rogue signs with the stolen key"
    );
    commit(&repo, "evil");
    rogue.cli(&["fetch-now"]);
    // The rogue's assignment is signed with the revoked key too: the agent refuses it before
    // it fetches anything (signed assignments), and counts it.
    wait_for("the agent to refuse the rogue's assignment", 60, || {
        outpost_e2e::processes::Scrape::get(&format!("http://{metrics}/metrics"))
            .value("outpost_agent_assignments_refused_total", &[])
            .is_some_and(|refused| refused >= 1.0)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        shop_value(&cluster).as_deref(),
        Some("3"),
        "nothing the stolen key signed applied"
    );
    // The agent still enforces what it verified: a deleted object comes back.
    assert!(runtime.block_on(cluster.kubectl_delete("v1", "ConfigMap", "default", "shop")));
    wait_for("drift corrected from the held snapshot", 30, || {
        shop_value(&cluster).as_deref() == Some("3")
    });
    drop(rogue);
}

/// Runs `program args…` under `umask 022`.
fn with_umask(program: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("umask 022 && exec \"$@\"")
        .arg("sh")
        .arg(program)
        .args(args);
    command
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn files_with_state_or_keys_are_private_whatever_the_umask() {
    let (hub_bin, agent_bin) = (binary("outpost-hub"), binary("outpost-agent"));
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    commit(&repo, "1");
    let data = work.path().join("hub");
    let (admin, agents) = (
        outpost_e2e::processes::free_port(false),
        outpost_e2e::processes::free_port(true),
    );
    let config = work.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[listen]\nadmin = \"127.0.0.1:{admin}\"\nagents = \"127.0.0.1:{agents}\"\n[[sources]]\nname = \"fleet\"\nurl = \"file://{}\"\n",
            data.display(),
            repo.display()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let ok = |command: &mut Command| {
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    ok(&mut with_umask(
        &hub_bin,
        &["keys", "init", "--config", &config_arg],
    ));
    let token = ok(&mut with_umask(
        &hub_bin,
        &[
            "admin-token",
            "create",
            "--config",
            &config_arg,
            "--name",
            "ops",
            "--role",
            "admin",
        ],
    ));
    let _hub = Process(
        with_umask(&hub_bin, &["run", "--config", &config_arg])
            .env("OUTPOST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    wait_for("the hub", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok()
    });
    let bundle = work.path().join("enrol.toml");
    ok(with_umask(
        &hub_bin,
        &[
            "tokens",
            "create",
            "--bundle-file",
            &bundle.display().to_string(),
            "--hub",
            &format!("http://127.0.0.1:{admin}"),
        ],
    )
    .env("OUTPOST_TOKEN", token.trim()));
    let state = work.path().join("agent-state");
    ok(with_umask(
        &agent_bin,
        &["enrol", "--bundle", &bundle.display().to_string()],
    )
    .env("OUTPOST_AGENT_STATE_DIR", &state));
    let _agent = Process(
        with_umask(&agent_bin, &["run", "--cluster", "none"])
            .env("OUTPOST_AGENT_STATE_DIR", &state)
            .env("OUTPOST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    wait_for("the agent's snapshot", 60, || {
        ok(Command::new(&agent_bin)
            .args(["status", "--output", "json"])
            .env("OUTPOST_AGENT_STATE_DIR", &state))
        .contains("\"generation\": 1")
    });
    for dir in [&data, &data.join("keys"), &state] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    let keys = data.join("keys");
    for file in [
        data.join("hub.db"),
        data.join("hub.db-wal"),
        data.join("hub.db-shm"),
        keys.join("root.key"),
        keys.join("root.pub"),
        keys.join("signing.key"),
        keys.join("signing.cert"),
        keys.join("transport.key"),
        state.join("agent.db"),
        state.join("agent.db-wal"),
        state.join("agent.db-shm"),
        state.join("agent.key"),
        state.join("enrolment.toml"),
        bundle.clone(),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}
