//! Hub replicas on PostgreSQL with the real binaries: three `outpost-hub run` processes on one
//! database (a real server these tests start: initdb on a temporary directory), agents split
//! across them, each agent given every replica's address. A rollout created through one
//! replica advances with agents on all; the leader killed with SIGKILL mid-rollout hands the
//! lease to another within 15 s and the rollout ends as it would have; a non-leader killed
//! sends its agents elsewhere; PostgreSQL restarted under them is ridden out.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{
    HubProcess, Process, binary, git, git_init, run, run_agent, shop_value, wait_for,
};
use outpost_hub::store::postgres::testing::TestServer;
use serde_json::Value;

fn config_map(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\ndata:\n  value: \"{value}\"\n"
    )
}

fn commit(repo: &Path, value: &str, tag: Option<&str>) {
    std::fs::write(repo.join("shop/app.yaml"), config_map(value)).unwrap();
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-qm", value]);
    if let Some(tag) = tag {
        git(repo, &["tag", tag]);
    }
}

struct Site {
    #[allow(dead_code)]
    id: String,
    cluster: KubeApiServer,
    _agent: Process,
}

impl Site {
    fn value(&self) -> Option<String> {
        shop_value(&self.cluster)
    }
}

/// Enrols an agent through `via` with a bundle that lists every replica, `via` first.
fn enrol_everywhere(via: &HubProcess, all: &[&HubProcess], state: &Path) -> String {
    let bundle = state.with_extension("enrol.toml");
    via.cli(&[
        "tokens",
        "create",
        "--label",
        "region=eu",
        "--bundle-file",
        &bundle.display().to_string(),
    ]);
    let mut ports = vec![via.agents_port];
    ports.extend(
        all.iter()
            .map(|hub| hub.agents_port)
            .filter(|port| *port != via.agents_port),
    );
    let hubs: Vec<String> = ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let text = std::fs::read_to_string(&bundle).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|line| match line.starts_with("hub = ") {
            true => format!("hub = \"{}\"", hubs.join(",")),
            false => line.to_owned(),
        })
        .collect();
    std::fs::write(&bundle, text.join("\n") + "\n").unwrap();
    let out = run(
        &binary("outpost-agent"),
        &[
            "enrol",
            "--bundle",
            &bundle.display().to_string(),
            "--timeout-seconds",
            "30",
        ],
        &[("OUTPOST_AGENT_STATE_DIR", state.display().to_string())],
    );
    out.split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches(';')
        .to_owned()
}

/// Whether each replica leads, asked of each (a dead one: None).
fn leaders(hubs: &[&HubProcess]) -> Vec<Option<bool>> {
    hubs.iter()
        .map(|hub| {
            hub.process.as_ref()?;
            let answer = ureq::get(&format!("{}/api/v1/replica", hub.url))
                .header("authorization", &format!("Bearer {}", hub.token))
                .call()
                .ok()?
                .body_mut()
                .read_json::<Value>()
                .ok()?;
            answer["leading"].as_bool()
        })
        .collect()
}

fn the_leader(hubs: &[&HubProcess]) -> Option<usize> {
    let leading = leaders(hubs);
    let mut which = leading
        .iter()
        .enumerate()
        .filter(|(_, leads)| **leads == Some(true))
        .map(|(index, _)| index);
    match (which.next(), which.next()) {
        (Some(index), None) => Some(index),
        _ => None,
    }
}

fn rollout(hub: &HubProcess, id: u64) -> Value {
    serde_json::from_str(&hub.cli(&["rollout", "show", &id.to_string(), "--output", "json"]))
        .unwrap()
}

/// Three replicas, five agents (two on the first, one or two on the others), all on `stable`.
/// Dropped in this order: agents and hubs first, the database last.
struct Fleet {
    sites: Vec<Site>,
    hubs: Vec<HubProcess>,
    _runtime: tokio::runtime::Runtime,
    repo: std::path::PathBuf,
    work: tempfile::TempDir,
    server: TestServer,
}

fn fleet() -> Fleet {
    let server = TestServer::start().expect("a PostgreSQL server for the test");
    let url = server.create_database().unwrap();
    let store_line = format!("store = \"{url}\"");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    commit(&repo, "1", Some("v1"));
    git(&repo, &["branch", "stable"]);
    commit(&repo, "2", Some("v2"));
    git(&repo, &["checkout", "-q", "stable"]);
    std::fs::create_dir_all(work.path().join("a")).unwrap();
    let first = HubProcess::start_with(&work.path().join("a"), &repo, "stable", &store_line);
    let second = first.replica(&work.path().join("b"), &store_line);
    let third = first.replica(&work.path().join("c"), &store_line);
    let hubs = vec![first, second, third];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut sites = Vec::new();
    for (n, via) in [0, 0, 1, 2, 2].into_iter().enumerate() {
        let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
        let state = work.path().join(format!("site{n}"));
        let all: Vec<&HubProcess> = hubs.iter().collect();
        let id = enrol_everywhere(&hubs[via], &all, &state);
        let kubeconfig = cluster.write_kubeconfig(work.path().join(format!("site{n}.kubeconfig")));
        let agent = run_agent(&binary("outpost-agent"), &state, &kubeconfig);
        sites.push(Site {
            id,
            cluster,
            _agent: agent,
        });
    }
    wait_for("every site on stable (1)", 90, || {
        sites
            .iter()
            .all(|site| site.value().as_deref() == Some("1"))
    });
    let all: Vec<&HubProcess> = hubs.iter().collect();
    wait_for("exactly one leader", 30, || the_leader(&all).is_some());
    Fleet {
        server,
        work,
        repo,
        hubs,
        sites,
        _runtime: runtime,
    }
}

#[test]
fn postgres_replicas_run_a_rollout_across_them_and_survive_the_leader_dying() {
    let mut fleet = fleet();
    let all: Vec<&HubProcess> = fleet.hubs.iter().collect();
    let leader = the_leader(&all).unwrap();
    let other = (leader + 1) % 3;
    // Created through a replica that does not lead; stepped by the leader; one agent a wave.
    let created = fleet.hubs[other].cli(&[
        "rollout",
        "create",
        "--bundle",
        "shop",
        "--tag",
        "v2",
        "--waves",
        "1,2,3,4,100%",
        // Longer than an agent takes to notice its replica died (the QUIC idle timeout, 60 s)
        // and reconnect to another.
        "--health-timeout",
        "150s",
        "--why",
        "replicas",
    ]);
    assert!(created.contains("rollout 1 created"), "{created}");
    wait_for("the first waves released", 60, || {
        fleet
            .sites
            .iter()
            .filter(|site| site.value().as_deref() == Some("2"))
            .count()
            >= 2
    });
    let before = rollout(&fleet.hubs[other], 1);
    assert_eq!(before["phase"], "running", "{before}");
    // SIGKILL the leader mid-rollout: no goodbye, the lease runs out.
    let killed_at = Instant::now();
    fleet.hubs[leader].kill();
    let all: Vec<&HubProcess> = fleet.hubs.iter().collect();
    wait_for("another replica to take the lease", 20, || {
        the_leader(&all).is_some()
    });
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the lease was taken after {took:?}"
    );
    let new_leader = the_leader(&all).unwrap();
    assert_ne!(new_leader, leader);
    // The rollout goes on from where it was and ends as an uninterrupted one does.
    let asked = (leader + 2) % 3;
    eprintln!("the lease was taken over {took:?} after the leader was killed");
    wait_for("the rollout to succeed", 240, || {
        rollout(&fleet.hubs[asked], 1)["phase"] == "succeeded"
    });
    wait_for("every site on v2", 60, || {
        fleet
            .sites
            .iter()
            .all(|site| site.value().as_deref() == Some("2"))
    });
    let after = rollout(&fleet.hubs[asked], 1);
    let waves = |rollout: &Value| -> Vec<(String, Option<u64>)> {
        let mut rows: Vec<(String, Option<u64>)> = rollout["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["agent"].as_str().unwrap().to_owned(),
                    row["wave"].as_u64(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    // Decisions made before the kill stand; every agent got one wave of its own, in order.
    for (agent, wave) in waves(&before) {
        if wave.is_some() {
            assert!(
                waves(&after).contains(&(agent.clone(), wave)),
                "{agent} moved waves: {after}"
            );
        }
    }
    // What an uninterrupted run decides: members in id order (no canaries here), one a wave.
    let decided: Vec<Option<u64>> = waves(&after).into_iter().map(|(_, wave)| wave).collect();
    assert_eq!(
        decided,
        [Some(1), Some(2), Some(3), Some(4), Some(5)],
        "{after}"
    );
    let opened: Vec<&str> = after["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|record| record["action"].as_str())
        .filter(|action| action.starts_with("wave "))
        .collect();
    assert_eq!(opened.len(), 4, "each later wave opened once: {after}");
    assert!(
        after["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|row| row["state"] == "healthy"),
        "{after}"
    );
}

/// `POST /api/v1/fetch` through `hub`; whether it was taken.
fn fetch_now(hub: &HubProcess) -> bool {
    ureq::post(&format!("{}/api/v1/fetch", hub.url))
        .header("authorization", &format!("Bearer {}", hub.token))
        .send_empty()
        .is_ok()
}

#[test]
fn postgres_replicas_ride_out_a_non_leader_dying_and_the_database_restarting() {
    let mut fleet = fleet();
    let all: Vec<&HubProcess> = fleet.hubs.iter().collect();
    let leader = the_leader(&all).unwrap();
    let follower = (leader + 1) % 3;
    // A replica that does not lead dies: its agents go to the others and follow the next
    // change of the tracked branch like everyone else.
    fleet.hubs[follower].kill();
    commit(&fleet.repo, "3", None);
    assert!(
        fetch_now(&fleet.hubs[(leader + 2) % 3]),
        "fetch through a replica that does not lead"
    );
    wait_for("every site on 3", 150, || {
        fleet
            .sites
            .iter()
            .all(|site| site.value().as_deref() == Some("3"))
    });
    // PostgreSQL restarts under the replicas: they reconnect, one leads, changes flow again.
    fleet.server.stop();
    std::thread::sleep(Duration::from_secs(3));
    fleet.server.resume().unwrap();
    commit(&fleet.repo, "4", None);
    let live: Vec<&HubProcess> = fleet
        .hubs
        .iter()
        .filter(|hub| hub.process.is_some())
        .collect();
    wait_for("a replica to take the fetch request", 60, || {
        fetch_now(live[0])
    });
    wait_for("every site on 4", 150, || {
        fleet
            .sites
            .iter()
            .all(|site| site.value().as_deref() == Some("4"))
    });
    wait_for("one leader among the live replicas", 30, || {
        the_leader(&live).is_some()
    });
    let _ = &fleet.work;
}

#[test]
fn postgres_migration_moves_a_hub_and_its_fleet_from_sqlite() {
    let server = TestServer::start().expect("a PostgreSQL server for the test");
    let url = server.create_database().unwrap();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    commit(&repo, "1", None);
    std::fs::create_dir_all(work.path().join("a")).unwrap();
    let mut hub = HubProcess::start(&work.path().join("a"), &repo, "main");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let state = work.path().join("site");
    let agent_bin = binary("outpost-agent");
    hub.enrol(&agent_bin, &state, &["region=eu"]);
    let kubeconfig = cluster.write_kubeconfig(work.path().join("site.kubeconfig"));
    let _agent = run_agent(&agent_bin, &state, &kubeconfig);
    let site_value = || shop_value(&cluster);
    wait_for("the site on 1", 90, || site_value().as_deref() == Some("1"));
    let before = hub.get("/api/v1/agents");

    // Stopped, copied, checked; the config names the database; started again.
    hub.stop();
    let database = work.path().join("a/hub/hub.db");
    let out = run(
        &hub.binary,
        &[
            "migrate",
            "--from",
            &format!("sqlite:{}", database.display()),
            "--to",
            &url,
        ],
        &[],
    );
    assert!(out.contains("copied and checked"), "{out}");
    // Into a database that holds a hub now: refused, saying why.
    let again = std::process::Command::new(&hub.binary)
        .args([
            "migrate",
            "--from",
            &format!("sqlite:{}", database.display()),
            "--to",
            &url,
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let config = std::fs::read_to_string(&hub.config).unwrap();
    std::fs::write(&hub.config, format!("store = \"{url}\"\n{config}")).unwrap();
    hub.restart();
    assert_eq!(hub.get("/api/v1/replica")["replicated"], true);
    // The same agents (the API token made before the move works: it was copied too), and the
    // agent goes on: a new commit reaches it through the hub on PostgreSQL.
    let after = hub.get("/api/v1/agents");
    let ids = |list: &Value| -> Vec<String> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|agent| agent["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&after), ids(&before));
    commit(&repo, "2", None);
    wait_for("the fetch to be taken", 30, || fetch_now(&hub));
    wait_for("the site on 2", 90, || site_value().as_deref() == Some("2"));
}
