//! The real binaries: `outpost-hub run` serving a real Git repository, an enrolment bundle made
//! with `outpost-hub tokens create --bundle-file`, and `outpost-agent enrol` / `run` / `status`
//! as separate processes talking QUIC on loopback; the agent reconciles the Kubernetes API test
//! server (in this test process) through a kubeconfig, as it would k3s. The binaries are those `cargo test
//! --workspace` builds (target/<profile>/); run `cargo build --workspace` first otherwise.

use std::process::Command;

use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{
    HubProcess, binary, git, git_init, run, run_agent, shop_value, wait_for,
};

#[test]
fn hub_and_agent_processes_enrol_fetch_and_report() {
    let (hub_bin, agent_bin) = (binary("outpost-hub"), binary("outpost-agent"));
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    // A repository whose default branch is not `main`, and a config that names no branch: the
    // hub follows the remote's default.
    git(&repo, &["symbolic-ref", "HEAD", "refs/heads/master"]);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    let config_map = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\ndata:\n  value: \"{value}\"\n"
        )
    };
    std::fs::write(repo.join("shop/app.yaml"), config_map("1")).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);

    // Both binaries name the commit they were built from.
    for (binary, name) in [(&hub_bin, "outpost-hub"), (&agent_bin, "outpost-agent")] {
        let version = run(binary, &["version"], &[]);
        assert!(
            version.starts_with(&format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{version}"
        );
        assert_eq!(run(binary, &["--version"], &[]).trim(), version.trim());
    }
    let mut hub = HubProcess::start(work.path(), &repo, "");
    // The hub logs JSON lines (OUTPOST_LOG_FORMAT=json) into a file this test reads at the end.
    let log = work.path().join("hub.log.json");
    hub.json_log = Some(log.clone());
    hub.restart();
    let (url, agents) = (hub.url.clone(), hub.agents_port);

    // The operator makes an enrolment bundle; the device enrols with it.
    let bundle = work.path().join("enrol.toml");
    run(
        &hub_bin,
        &[
            "tokens",
            "create",
            "--label",
            "role=store",
            "--bundle-file",
            bundle.to_str().unwrap(),
            "--hub",
            &url,
        ],
        &hub.cli_env(),
    );
    let text = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        text.contains(&format!("hub = \"127.0.0.1:{agents}\"")),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let state = work.path().join("agent");
    let env = [
        ("OUTPOST_AGENT_STATE_DIR", state.display().to_string()),
        ("OUTPOST_LOG_FORMAT", "json".to_owned()),
    ];
    let enrolled = run(
        &agent_bin,
        &[
            "enrol",
            "--bundle",
            bundle.to_str().unwrap(),
            "--timeout-seconds",
            "30",
        ],
        &env,
    );
    assert!(enrolled.contains("enrolled as agent"), "{enrolled}");
    // The same bundle on a second device is refused, with the reason.
    let second = Command::new(&agent_bin)
        .args([
            "enrol",
            "--bundle",
            bundle.to_str().unwrap(),
            "--timeout-seconds",
            "30",
        ])
        .env("OUTPOST_AGENT_STATE_DIR", work.path().join("agent2"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );

    // The agent runs; the hub renders the bundle for it and assigns main's release; the agent
    // applies it to the cluster.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let kubeconfig = cluster.write_kubeconfig(work.path().join("kubeconfig"));
    let _agent = run_agent(&agent_bin, &state, &kubeconfig);
    let status = || -> serde_json::Value {
        serde_json::from_str(&run(&agent_bin, &["status", "--output", "json"], &env)).unwrap()
    };
    let holds_all = |status: &serde_json::Value| {
        let assignments = status["assignments"].as_array().unwrap();
        !assignments.is_empty() && assignments.iter().all(|a| a["held"] == true)
    };
    wait_for("the agent to hold its assignment", 60, || {
        holds_all(&status())
    });
    let applied = |value: &str| shop_value(&cluster).as_deref() == Some(value);
    wait_for("the agent to apply it", 60, || applied("1"));
    let first = status()["assignments"][0]["snapshot"]
        .as_str()
        .unwrap()
        .to_owned();

    // A new commit: the hub hears of it (push hook), renders, assigns; the agent follows.
    std::fs::write(repo.join("shop/app.yaml"), config_map("2")).unwrap();
    git(&repo, &["commit", "-qam", "second"]);
    run(&hub_bin, &["fetch-now", "--hub", &url], &hub.cli_env());
    wait_for("the agent to hold the new release", 60, || {
        let status = status();
        holds_all(&status) && status["assignments"][0]["snapshot"] != first.as_str()
    });
    wait_for("the agent to apply the new release", 60, || applied("2"));
    wait_for("the agent to report it healthy", 60, || {
        let status = status();
        status["bundles"][0]["phase"] == "Healthy"
            && status["bundles"][0]["snapshot"] != first.as_str()
    });
    assert_eq!(status()["applied_objects"], 1);
    // Status reports reached the hub.
    wait_for("status at the hub", 30, || {
        let body: serde_json::Value = serde_json::from_str(&run(
            &hub_bin,
            &["status", "--hub", &url, "--output", "json"],
            &hub.cli_env(),
        ))
        .unwrap();
        body.as_array()
            .is_some_and(|rows| rows.iter().any(|row| row["bundle"] == "shop"))
    });
    let id = status()["agent_id"].as_str().unwrap_or_default().to_owned();
    cli_for_people(&hub, &id);
    // Every line of the hub's log is a JSON object; what a session logs carries its agent.
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    let connected = lines
        .iter()
        .find(|line| line["fields"]["message"] == "agent connected")
        .unwrap_or_else(|| panic!("no \"agent connected\" line in {text}"));
    assert_eq!(connected["span"]["agent"], id.as_str(), "{connected}");
    assert!(connected["level"].is_string() && connected["timestamp"].is_string());
}

/// The CLI's formats: a table with ages and `k=v` labels, wide with more columns and dates,
/// JSON and YAML with RFC 3339 dates, `--selector`, completions.
fn cli_for_people(hub: &HubProcess, id: &str) {
    let table = hub.cli(&["agents", "list"]);
    let row = table
        .lines()
        .find(|line| line.starts_with(id))
        .unwrap_or_else(|| panic!("{id} not in\n{table}"));
    assert!(row.contains("role=store"), "labels as k=v: {row}");
    assert!(
        row.contains(" ago") || row.contains("now"),
        "times as ages: {row}"
    );
    assert!(table.starts_with("ID"), "{table}");
    assert!(!table.contains("PUBLIC KEY"), "{table}");
    let wide = hub.cli(&["agents", "list", "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("PUBLIC KEY"),
        "{wide}"
    );
    assert!(wide.contains("Z "), "dates in wide: {wide}");
    let json: serde_json::Value =
        serde_json::from_str(&hub.cli(&["agents", "list", "--output", "json"])).unwrap();
    let enrolled = json[0]["enrolled_at"]
        .as_str()
        .expect("a date, not seconds");
    assert!(
        enrolled.len() == 20 && enrolled.ends_with('Z') && enrolled.as_bytes()[10] == b'T',
        "RFC 3339: {enrolled}"
    );
    let yaml = hub.cli(&["agents", "list", "-o", "yaml"]);
    let parsed: Vec<serde_json::Value> =
        serde_saphyr::from_str(&yaml).unwrap_or_else(|error| panic!("{error}: {yaml}"));
    assert_eq!(parsed[0]["id"], id, "{yaml}");
    assert_eq!(parsed[0]["enrolled_at"], enrolled, "{yaml}");
    // Selectors filter list commands; a bad one is refused saying why.
    assert!(
        hub.cli(&["agents", "list", "-l", "role=store"])
            .contains(id)
    );
    assert!(
        !hub.cli(&["agents", "list", "--selector", "role!=store"])
            .contains(id)
    );
    assert!(hub.cli(&["status", "-l", "role=store"]).contains("shop"));
    assert!(!hub.cli(&["status", "-l", "role=kiosk"]).contains("shop"));
    assert!(
        hub.cli(&["tokens", "list", "-l", "role"])
            .contains("role=store")
    );
    let refused = Command::new(&hub.binary)
        .args([
            "agents",
            "list",
            "--selector",
            "role in (",
            "--hub",
            &hub.url,
        ])
        .envs(hub.cli_env())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--selector"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&hub.binary, &["completions", shell], &[]);
        assert!(script.contains("rollout"), "{shell}: {script}");
    }
    let script = run(&binary("outpost-agent"), &["completions", "bash"], &[]);
    assert!(script.contains("enrol"), "{script}");
}

/// `GET /ready` without a token, as a probe calls it: the status and the answer.
fn ready(hub: &HubProcess) -> (u16, serde_json::Value) {
    let mut response = ureq::get(&format!("{}/ready", hub.url))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.body_mut().read_json().unwrap())
}

#[test]
fn the_hub_is_ready_only_once_every_source_was_fetched() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::write(
        repo.join("shop/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    let mut hub = HubProcess::start(work.path(), &repo, "main");
    wait_for("ready with one source fetched", 30, || ready(&hub).0 == 200);
    assert_eq!(ready(&hub).1["ready"], true);
    // A second source whose Git server accepts the connection and never answers: the hub
    // serves, but is not ready, and says what it waits for.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    let mut config = std::fs::read_to_string(&hub.config).unwrap();
    config.push_str(&format!(
        "[[sources]]\nname = \"silent\"\nurl = \"git://127.0.0.1:{port}/fleet.git\"\n"
    ));
    std::fs::write(&hub.config, config).unwrap();
    hub.restart();
    wait_for("the first source fetched again", 30, || {
        hub.get("/api/v1/sources")
            .as_array()
            .unwrap()
            .iter()
            .any(|source| source["name"] == "fleet" && source["fetches"].as_u64() > Some(0))
    });
    let (status, answer) = ready(&hub);
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["ready"], false);
    let waiting = answer["waiting_for"].to_string();
    assert!(
        waiting.contains("source silent") && !waiting.contains("source fleet"),
        "{answer}"
    );
    // Alive all the same, and serving its API.
    let live = ureq::get(&format!("{}/live", hub.url)).call().unwrap();
    assert_eq!(live.status().as_u16(), 200);
}

/// A revoked agent keeps enforcing what it verified: the process goes on, drift is still
/// corrected, nothing new is fetched, and `status` says the hub refused it.
#[test]
fn a_revoked_agent_keeps_enforcing_what_it_verified() {
    let agent_bin = binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    let config_map = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\ndata:\n  value: \"{value}\"\n"
        )
    };
    std::fs::write(repo.join("shop/app.yaml"), config_map("1")).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    let hub = HubProcess::start(work.path(), &repo, "main");
    let state = work.path().join("agent");
    let id = hub.enrol(&agent_bin, &state, &["role=store"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let kubeconfig = cluster.write_kubeconfig(work.path().join("kubeconfig"));
    let mut agent = outpost_e2e::processes::run_agent_with(
        &agent_bin,
        &state,
        &kubeconfig,
        &[("OUTPOST_AGENT_DRIFT_SECONDS", "1".to_owned())],
    );
    let value = || shop_value(&cluster);
    wait_for("the agent to apply its bundle", 60, || {
        value().as_deref() == Some("1")
    });

    hub.cli(&["agents", "revoke", &id, "--why", "device stolen"]);
    let env = [("OUTPOST_AGENT_STATE_DIR", state.display().to_string())];
    let status = || -> serde_json::Value {
        serde_json::from_str(&run(&agent_bin, &["status", "--output", "json"], &env)).unwrap()
    };
    wait_for("the agent to record the refusal", 60, || {
        status()["refused_by_hub"].is_string()
    });
    assert!(
        status()["refused_by_hub"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{}",
        status()
    );
    let table = run(&agent_bin, &["status"], &env);
    assert!(table.contains("REFUSED"), "{table}");
    // Still running, still enforcing: someone deletes the object; the agent puts it back.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent process goes on after the hub refused it"
    );
    assert!(runtime.block_on(cluster.kubectl_delete("v1", "ConfigMap", "default", "shop")));
    wait_for("the agent to correct the drift", 30, || {
        value().as_deref() == Some("1")
    });
    // Nothing new reaches it.
    std::fs::write(repo.join("shop/app.yaml"), config_map("2")).unwrap();
    git(&repo, &["commit", "-qam", "second"]);
    hub.cli(&["fetch-now"]);
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        value().as_deref(),
        Some("1"),
        "a revoked agent fetches nothing new"
    );
    assert!(agent.0.try_wait().unwrap().is_none());
}

/// A hub restored from a backup never hands an agent a generation or a sequence it has seen:
/// the agent held generation 3; the hub's store goes back to a copy taken at generation 1; on
/// the agent's return the hub moves past what the agent reports holding, and the next commit
/// reaches the agent (before, it was rendered as generation 3 again and ignored for good).
#[test]
fn a_hub_restored_from_a_backup_moves_past_what_its_agents_hold() {
    let agent_bin = binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    let commit = |value: &str| {
        std::fs::write(
            repo.join("shop/app.yaml"),
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\ndata:\n  value: \"{value}\"\n"
            ),
        )
        .unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-qm", value]);
    };
    commit("1");
    let mut hub = HubProcess::start(work.path(), &repo, "main");
    let state = work.path().join("agent");
    hub.enrol(&agent_bin, &state, &["role=store"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let kubeconfig = cluster.write_kubeconfig(work.path().join("kubeconfig"));
    let _agent = run_agent(&agent_bin, &state, &kubeconfig);
    let value = || shop_value(&cluster);
    wait_for("generation 1 applied", 60, || {
        value().as_deref() == Some("1")
    });

    // The backup: the hub's store as it is now (stopped, so the file is whole).
    let data = work.path().join("hub");
    let backup = work.path().join("backup");
    std::fs::create_dir_all(&backup).unwrap();
    hub.stop();
    for file in ["hub.db", "hub.db-wal", "hub.db-shm"] {
        if data.join(file).exists() {
            std::fs::copy(data.join(file), backup.join(file)).unwrap();
        }
    }
    hub.restart();
    for value_now in ["2", "3"] {
        commit(value_now);
        hub.cli(&["fetch-now"]);
        wait_for("the agent to apply the new generation", 60, || {
            value().as_deref() == Some(value_now)
        });
    }
    let env = [("OUTPOST_AGENT_STATE_DIR", state.display().to_string())];
    let held = || -> u64 {
        let status: serde_json::Value =
            serde_json::from_str(&run(&agent_bin, &["status", "--output", "json"], &env)).unwrap();
        status["assignments"][0]["generation"].as_u64().unwrap_or(0)
    };
    let before = held();
    assert!(before >= 3, "the agent runs generation {before}");

    // Restore the backup, start the hub, commit again.
    hub.stop();
    for file in ["hub.db", "hub.db-wal", "hub.db-shm"] {
        let _ = std::fs::remove_file(data.join(file));
        if backup.join(file).exists() {
            std::fs::copy(backup.join(file), data.join(file)).unwrap();
        }
    }
    hub.restart();
    commit("4");
    hub.cli(&["fetch-now"]);
    wait_for(
        "the commit after the restore to reach the agent",
        90,
        || value().as_deref() == Some("4"),
    );
    assert!(held() > before, "a generation above any the agent held");
    let events = hub.cli(&["events", "--limit", "200"]);
    assert!(events.contains("hub-behind-agent"), "{events}");
}

/// With `offline_after`, an agent gone longer than that is recorded once as `agent-offline`
/// (an event, so notifications carry it); one that stays connected is not.
#[test]
fn an_agent_gone_longer_than_offline_after_is_recorded_once() {
    let agent_bin = binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::write(
        repo.join("shop/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    let hub = HubProcess::start_with(work.path(), &repo, "main", "offline_after = \"2s\"");
    let start = |name: &str| {
        let state = work.path().join(name);
        let id = hub.enrol(&agent_bin, &state, &["role=store"]);
        let process = outpost_e2e::processes::Process(
            Command::new(&agent_bin)
                .args(["run", "--cluster", "none"])
                .env("OUTPOST_AGENT_STATE_DIR", &state)
                .env("OUTPOST_LOG", "warn")
                .spawn()
                .unwrap(),
        );
        (id, process)
    };
    let (staying, _stays) = start("staying");
    let (leaving, leaves) = start("leaving");
    // Running (not only enrolled): each holds its assignment.
    for name in ["staying", "leaving"] {
        let env = [(
            "OUTPOST_AGENT_STATE_DIR",
            work.path().join(name).display().to_string(),
        )];
        wait_for("the agent to hold its assignment", 60, || {
            let status: serde_json::Value =
                serde_json::from_str(&run(&agent_bin, &["status", "--output", "json"], &env))
                    .unwrap();
            status["assignments"][0]["held"] == true
        });
    }
    // Stopped as systemd stops it: SIGTERM, and the agent closes its connection (one that just
    // vanishes counts from the QUIC idle timeout, a minute).
    let _ = Command::new("kill")
        .args(["-TERM", &leaves.0.id().to_string()])
        .status();
    let offline = || -> Vec<String> {
        hub.get("/api/v1/events?limit=500")
            .as_array()
            .unwrap()
            .iter()
            .filter(|event| event["kind"] == "agent-offline")
            .map(|event| event["subject"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_for("the hub to hear the agent leave", 10, || {
        hub.get("/api/v1/fleet/summary")["connected"] == 1
    });
    wait_for("the leaving agent recorded offline", 30, || {
        offline().contains(&leaving)
    });
    std::thread::sleep(std::time::Duration::from_secs(5));
    let recorded = offline();
    assert_eq!(
        recorded.iter().filter(|id| **id == leaving).count(),
        1,
        "once per absence: {recorded:?}"
    );
    assert!(
        !recorded.contains(&staying),
        "a connected agent is not offline: {recorded:?}"
    );
}
