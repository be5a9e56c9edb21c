//! An enrolment storm against a real `outpost-hub run` process that is killed (SIGKILL, as a
//! power cut would) and started again half-way: every agent ends up enrolled exactly once and
//! on the release. Agents are in-memory clients (`outpost_sim::load`), each with its own key,
//! token and QUIC connection.

use std::time::{Duration, Instant};

use outpost_e2e::processes::{HubProcess, git, git_init, wait_for};
use outpost_proto::{Digest, PublicKey};
use outpost_sim::load::{Fleet, FleetOptions};
use serde_json::{Value, json};

const AGENTS: usize = 400;

fn post(hub: &HubProcess, path: &str, body: Value) -> Value {
    ureq::post(&format!("{}{path}", hub.url))
        .header("authorization", &format!("Bearer {}", hub.token))
        .send_json(body)
        .expect("the admin API answers")
        .body_mut()
        .read_json()
        .expect("JSON")
}

/// The hub's TLS key pin and root key, from an enrolment bundle.
fn trust(hub: &HubProcess) -> (Digest, PublicKey) {
    let made = post(hub, "/api/v1/tokens", json!({"labels": {}}));
    let bundle = made["bundle"].as_str().expect("an enrolment bundle");
    let field = |name: &str| {
        bundle
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} = \"")))
            .map(|rest| rest.trim_end_matches('"').to_owned())
            .expect("the field is in the bundle")
    };
    let mut root = [0u8; 32];
    hex::decode_to_slice(field("root_key"), &mut root).unwrap();
    (
        Digest::from_hex(&field("hub_pin")).unwrap(),
        PublicKey::from_bytes(&root).unwrap(),
    )
}

fn release_digest(hub: &HubProcess) -> Option<Digest> {
    let releases = hub.get("/api/v1/releases");
    let generation = releases
        .as_array()?
        .iter()
        .find(|release| release["bundle"] == "shop" && release["ref"] == "refs/heads/main")?
        ["generation"]
        .as_u64()?;
    let snapshot = hub.get(&format!("/api/v1/snapshots/shop/{generation}"));
    Digest::from_hex(snapshot["digest"].as_str()?).ok()
}

#[test]
fn a_hub_killed_during_an_enrolment_storm_loses_no_enrolment() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::write(
        repo.join("shop/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: shop\ndata:\n  a: \"1\"\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    let mut hub = HubProcess::start(work.path(), &repo, "main");
    wait_for("the first release", 60, || release_digest(&hub).is_some());
    let release = release_digest(&hub).unwrap();
    let (pin, root) = trust(&hub);
    let made = post(
        &hub,
        "/api/v1/tokens",
        json!({"labels": {"role": "store"}, "count": AGENTS, "ttl_seconds": 3_600}),
    );
    let tokens: Vec<String> = made["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|token| token.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tokens.len(), AGENTS);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let agents: std::net::SocketAddr = format!("127.0.0.1:{}", hub.agents_port).parse().unwrap();
    let fleet = runtime.block_on(async {
        Fleet::start(
            FleetOptions {
                hub: agents,
                per_socket: 200,
                connect_rate: 200,
            },
            Fleet::trusting(root, pin),
            tokens,
        )
        .unwrap()
    });
    // Half-way through, the power goes.
    let started = Instant::now();
    wait_for("a quarter of the agents enrolled", 60, || {
        fleet.enrolled() >= AGENTS / 4
    });
    let mut process = hub.process.take().expect("the hub runs");
    process.0.kill().unwrap();
    process.0.wait().unwrap();
    let at_kill = fleet.enrolled();
    assert!(
        at_kill < AGENTS,
        "the storm was still going when the hub died"
    );
    std::thread::sleep(Duration::from_secs(1));
    hub.restart();
    wait_for("every agent enrolled and on the release", 240, || {
        fleet.enrolled() == AGENTS && fleet.holding(&release) == AGENTS
    });
    eprintln!(
        "killed with {at_kill} of {AGENTS} enrolled; all enrolled and installed {:.0} s after the storm began",
        started.elapsed().as_secs_f64()
    );

    // Every agent once, every token used once, nothing else.
    let mut ids = fleet.ids();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), AGENTS, "each agent was given one id");
    let summary = hub.get("/api/v1/fleet/summary");
    assert_eq!(summary["agents"], AGENTS, "{summary}");
    let listed = hub.get("/api/v1/fleet?limit=5000&label=role%3Dstore");
    let mut stored: Vec<String> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|agent| agent["id"].as_str().unwrap().to_owned())
        .collect();
    stored.sort();
    assert_eq!(
        stored, ids,
        "the store holds exactly the agents that were told they enrolled"
    );
    let tokens = hub.get("/api/v1/tokens");
    let used = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|token| !token["used"].is_null())
        .count();
    assert_eq!(used, AGENTS, "{tokens}");
    drop(fleet);
}
