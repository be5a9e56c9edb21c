//! The trust chain, attacked with real processes (docs/security.md, "Attacks and their
//! defences"): a real `outpost-hub run`, real Git, real HTTP and TCP. Each test is an attack that
//! must fail; each asserts the refusal, what an operator sees of it, and that nothing else gave
//! way.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use outpost_e2e::abuse::{GET_LIVE, forged_session, half_open, keep_half_open, timed_request};
use outpost_e2e::processes::{HubProcess, Process, Scrape, git, git_init, wait_for};
use outpost_proto::transport::MessageReader;
use outpost_proto::wire::{Assign, HeldProof, HeldSnapshot, Hello, MAX_COUNTER, Message};
use serde_json::Value;

/// An HTTP server on loopback that answers every request with "stolen" and counts the
/// connections that reach it: what a kustomization would make the hub fetch.
struct Bait {
    address: SocketAddr,
    arrived: Arc<AtomicUsize>,
}

impl Bait {
    fn start() -> Bait {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicUsize::new(0));
        let counted = arrived.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = stream.read(&mut [0; 4096]);
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nstolen",
                );
            }
        });
        Bait { address, arrived }
    }

    fn url(&self) -> String {
        format!("http://{}/meta-data", self.address)
    }
}

/// Every field of kustomize v5 that takes a path, each in a bundle of its own naming a URL on
/// loopback; and a generator configuration file naming one. Not one connection reaches the
/// bait, every release is refused naming its field, each refusal is an event and a metric, and
/// a plain bundle beside them is released.
#[test]
fn trust_attack_kustomize_fields_reach_no_network() {
    let bait = Bait::start();
    let url = bait.url();
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    let write = |path: &str, text: &str| {
        let path = repo.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    let attacks: Vec<(&str, &str, String)> = vec![
        (
            "resources",
            "resources[0]",
            format!("resources:\n- {url}\n"),
        ),
        ("bases", "bases[0]", format!("bases:\n- {url}\n")),
        (
            "components",
            "components[0]",
            format!("components:\n- {url}\n"),
        ),
        ("crds", "crds[0]", format!("crds:\n- {url}\n")),
        (
            "configurations",
            "configurations[0]",
            format!("configurations:\n- {url}\n"),
        ),
        (
            "generators",
            "generators[0]",
            format!("generators:\n- {url}\n"),
        ),
        (
            "transformers",
            "transformers[0]",
            format!("transformers:\n- {url}\n"),
        ),
        (
            "validators",
            "validators[0]",
            format!("validators:\n- {url}\n"),
        ),
        (
            "psm",
            "patchesStrategicMerge[0]",
            format!("patchesStrategicMerge:\n- {url}\n"),
        ),
        (
            "patches",
            "patches[0].path",
            format!("patches:\n- path: {url}\n"),
        ),
        (
            "json6902",
            "patchesJson6902[0].path",
            format!("patchesJson6902:\n- path: {url}\n  target: {{kind: ConfigMap, name: x}}\n"),
        ),
        (
            "replacements",
            "replacements[0].path",
            format!("replacements:\n- path: {url}\n"),
        ),
        (
            "cmfiles",
            "configMapGenerator[0].files[0]",
            format!("configMapGenerator:\n- name: u\n  files:\n  - u={url}\n"),
        ),
        (
            "cmenvs",
            "configMapGenerator[0].envs[0]",
            format!("configMapGenerator:\n- name: u\n  envs:\n  - {url}\n"),
        ),
        (
            "secretfiles",
            "secretGenerator[0].files[0]",
            format!("secretGenerator:\n- name: u\n  files:\n  - {url}\n"),
        ),
        (
            "openapi",
            "openapi.path",
            format!("openapi:\n  path: {url}\n"),
        ),
        (
            "helm",
            "helmCharts",
            format!("helmCharts:\n- name: x\n  repo: {url}\n"),
        ),
        // A builtin generator's configuration in a file of the commit.
        (
            "plugin",
            "ConfigMapGenerator[0].files[0]",
            "generators:\n- gen.yaml\n".to_owned(),
        ),
    ];
    let mut outpost = String::from("bundles:\n  - name: plain\n    path: plain\n");
    for (name, _, kustomization) in &attacks {
        outpost.push_str(&format!("  - name: {name}\n    path: {name}\n"));
        write(&format!("{name}/kustomization.yaml"), kustomization);
    }
    write(
        "plugin/gen.yaml",
        &format!(
            "apiVersion: builtin\nkind: ConfigMapGenerator\nmetadata: {{name: u}}\nfiles:\n- u={url}\n"
        ),
    );
    write("outpost.yaml", &outpost);
    write(
        "plain/app.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shop, namespace: default}\ndata: {value: \"1\"}\n",
    );
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "kustomizations that fetch"]);

    let hub = HubProcess::start(work.path(), &repo, "main");
    let releases = || -> Vec<Value> {
        hub.get("/api/v1/releases")
            .as_array()
            .unwrap()
            .iter()
            .filter(|release| release["ref"] == "refs/heads/main")
            .cloned()
            .collect()
    };
    wait_for("every bundle to be released or refused", 60, || {
        releases().len() == attacks.len() + 1
    });
    let releases = releases();
    let plain = releases.iter().find(|r| r["bundle"] == "plain").unwrap();
    assert!(plain["generation"].as_u64().is_some(), "{plain}");
    for (bundle, field, _) in &attacks {
        let release = releases.iter().find(|r| r["bundle"] == *bundle).unwrap();
        let error = release["error"].as_str().unwrap_or_default();
        assert!(
            release["generation"].is_null(),
            "{bundle} refused: {release}"
        );
        assert!(
            error.contains(&format!("`{field}`"))
                || (*field == "helmCharts" && error.contains(field)),
            "{bundle}: the refusal names the field {field}: {error}"
        );
    }
    assert_eq!(
        bait.arrived.load(Ordering::SeqCst),
        0,
        "not one connection reached the bait"
    );
    let events = hub.get("/api/v1/events?limit=1000");
    let refused = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["kind"] == "release-refused")
        .count();
    assert!(refused >= attacks.len(), "an event per refusal: {events}");
    let scrape = Scrape::get(&format!("{}/metrics", hub.url));
    assert!(
        scrape.must("outpost_hub_render_refusals_total", &[("source", "fleet")])
            >= attacks.len() as f64,
        "the refusals are counted"
    );
}

/// The webhook secret of the hubs [`hub_with_hooks`] starts.
const HOOK_SECRET: &str = "0123456789abcdef0123456789abcdef";

/// A hub process whose source has a webhook secret, with webhooks on a listener of their own;
/// and that listener's address.
fn hub_with_hooks(work: &std::path::Path, repo: &std::path::Path) -> (HubProcess, SocketAddr) {
    let secret_file = work.join("hook-secret");
    std::fs::write(&secret_file, format!("{HOOK_SECRET}\n")).unwrap();
    let hooks_port = outpost_e2e::processes::free_port(false);
    let mut hub = HubProcess::start(work, repo, "main");
    let config = std::fs::read_to_string(&hub.config)
        .unwrap()
        .replace(
            "[listen]\n",
            &format!("[listen]\nhooks = \"127.0.0.1:{hooks_port}\"\n"),
        )
        .replace(
            "track = \"main\"\n",
            &format!(
                "track = \"main\"\nwebhook_secret_file = \"{}\"\n",
                secret_file.display()
            ),
        );
    std::fs::write(&hub.config, config).unwrap();
    hub.restart();
    wait_for("the hooks listener", 20, || {
        TcpStream::connect(("127.0.0.1", hooks_port)).is_ok()
    });
    (hub, SocketAddr::from(([127, 0, 0, 1], hooks_port)))
}

/// The admin listener's address of `hub`.
fn admin_address(hub: &HubProcess) -> SocketAddr {
    hub.url
        .trim_start_matches("http://")
        .parse()
        .expect("an address")
}

/// Slowloris on the admin listener: one machine (127.0.0.2) holds 2,000 connections with half
/// a request header each; a real `GET /live` from another address is answered; the hub closes
/// every held connection (those past the source's share at once, the others at the header
/// deadline) and counts both. Then 40 machines together hold more than the listener's places,
/// re-opening each as it is closed: the API still answers.
#[test]
fn trust_attack_slowloris_on_admin() {
    slowloris(false);
}

/// Slowloris on the webhook listener: as [`trust_attack_slowloris_on_admin`], with a webhook
/// delivery answered beside 2,000 half-open connections.
#[test]
fn trust_attack_slowloris_on_webhooks() {
    slowloris(true);
}

fn slowloris(on_hooks: bool) {
    let work = tempfile::tempdir().unwrap();
    let repo = outpost_e2e::processes::shop_repository(work.path());
    let (hub, hooks) = hub_with_hooks(work.path(), &repo);
    let admin = admin_address(&hub);
    let (target, listener) = match on_hooks {
        true => (hooks, "hooks"),
        false => (admin, "admin"),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let held = runtime.block_on(half_open(attacker, target, 2000));
    let since = Instant::now();
    let (live, took) = timed_request(admin, GET_LIVE, Duration::from_secs(30));
    assert!(live.contains(" 200 "), "GET /live answered: {live:?}");
    eprintln!("GET /live beside 2,000 half-open connections on {listener}: {took:?}");
    let body = r#"{"ref":"refs/heads/main"}"#;
    let (hook, took) = timed_request(
        hooks,
        &format!(
            "POST /hooks/git/fleet HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        Duration::from_secs(30),
    );
    assert!(
        hook.contains(" 401 "),
        "an unsigned delivery is answered (refused): {hook:?}"
    );
    eprintln!("a webhook delivery beside them: {took:?}");

    // Every held connection is closed by the hub: read each to its end.
    let closed = runtime.block_on(async {
        use tokio::io::AsyncReadExt as _;
        let mut closed = 0;
        for mut stream in held {
            let mut buffer = [0u8; 512];
            loop {
                match tokio::time::timeout(Duration::from_secs(40), stream.read(&mut buffer)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed += 1;
                        break;
                    }
                    Ok(Ok(_)) => continue,
                    Err(_) => break,
                }
            }
        }
        closed
    });
    assert_eq!(closed, 2000, "the hub closed every half-open connection");
    eprintln!("all closed {:?} after they were opened", since.elapsed());
    if !on_hooks {
        // Many machines together (40 addresses, 30 each: more than the listener's places),
        // each connection opened again as soon as the hub closes it: the API still answers,
        // the idle ones giving their places.
        let opened = Arc::new(AtomicUsize::new(0));
        let attackers: Vec<_> = (1..=40u8)
            .flat_map(|n| {
                keep_half_open(&runtime, [127, 0, 1, n].into(), admin, 30, opened.clone())
            })
            .collect();
        wait_for("the attack to fill the listener", 30, || {
            opened.load(Ordering::Relaxed) >= 1100
        });
        for _ in 0..5 {
            let (live, took) = timed_request(admin, GET_LIVE, Duration::from_secs(30));
            assert!(
                live.contains(" 200 "),
                "GET /live answered beside many machines: {live:?}"
            );
            eprintln!("GET /live beside 1,200 half-open connections from 40 addresses: {took:?}");
        }
        for attacker in attackers {
            attacker.abort();
        }
    }
    let scrape = Scrape::get(&format!("{}/metrics", hub.url));
    let refused = |reason: &str| {
        scrape
            .value(
                "outpost_hub_http_connections_refused_total",
                &[("listener", listener), ("reason", reason)],
            )
            .unwrap_or(0.0)
    };
    assert!(
        refused("source_share") >= 1900.0,
        "{listener}: closed at once, counted"
    );
    assert!(
        refused("header_timeout") >= 1.0,
        "{listener}: closed at the header deadline, counted"
    );
}

/// `outpost-agent status` of the agent in `state_dir`: the generation of its first assignment
/// once it holds that snapshot (0 before).
fn assigned_generation(agent_bin: &std::path::Path, state_dir: &std::path::Path) -> u64 {
    let env = [("OUTPOST_AGENT_STATE_DIR", state_dir.display().to_string())];
    let status: Value = serde_json::from_str(&outpost_e2e::processes::run(
        agent_bin,
        &["status", "--output", "json"],
        &env,
    ))
    .unwrap();
    let first = &status["assignments"][0];
    match first["held"].as_bool() {
        Some(true) => first["generation"].as_u64().unwrap_or(0),
        _ => 0,
    }
}

/// `outpost-agent run --cluster none` on `state_dir` (a device that keeps its cache only).
fn run_cache_only(agent_bin: &std::path::Path, state_dir: &std::path::Path) -> Process {
    Process(
        std::process::Command::new(agent_bin)
            .args(["run", "--cluster", "none"])
            .env("OUTPOST_AGENT_STATE_DIR", state_dir)
            .env("OUTPOST_LOG", "warn")
            .spawn()
            .expect("start outpost-agent"),
    )
}

/// Reads the control stream up to the first `Assign` (or the end: `None`).
async fn next_assign(reader: &mut MessageReader) -> Option<Assign> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), reader.next()).await {
            Ok(Ok(Some(Message::Assign(assign)))) => return Some(assign),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) | Ok(Err(_)) => return None,
            Err(_) => panic!("no answer from the hub within 20 s"),
        }
    }
}

/// What a forged `Hello` claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Generation 1,000,000 without evidence, a genuine header with its generation changed to
    /// it, and a sequence of 2^63 − 1: would raise the fleet's counters.
    RaiseCounters,
    /// Generation 2^63 − 1 (which froze the bundle for the fleet), and a sequence of 2^64 − 1
    /// (which does not even decode).
    Freeze,
}

/// A device's key in an attacker's hands says in its `Hello` what `claim` names. Nothing
/// moves: each is answered with the hub's own assignment (an undecodable frame ends the
/// session), recorded as `agent-claim-refused` and counted; the next commit is generation 2
/// for the fleet and another device installs it.
#[test]
fn trust_attack_forged_hello_raising_counters() {
    forged_hello(Claim::RaiseCounters);
}

/// A claim of generation 2^63 − 1 (and a sequence of 2^64 − 1): see [`forged_hello`].
#[test]
fn trust_attack_claim_of_generation_2_pow_63_minus_1() {
    forged_hello(Claim::Freeze);
}

fn forged_hello(claim: Claim) {
    let agent_bin = outpost_e2e::processes::binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = outpost_e2e::processes::shop_repository(work.path());
    let hub = HubProcess::start(work.path(), &repo, "main");
    let attacker = work.path().join("attacker");
    let honest = work.path().join("honest");
    hub.enrol(&agent_bin, &attacker, &["role=store"]);
    hub.enrol(&agent_bin, &honest, &["role=store"]);
    let _honest = run_cache_only(&agent_bin, &honest);
    {
        // The attacker's device fetched generation 1 once, as any device does.
        let _device = run_cache_only(&agent_bin, &attacker);
        wait_for("the devices to hold generation 1", 60, || {
            assigned_generation(&agent_bin, &attacker) == 1
                && assigned_generation(&agent_bin, &honest) == 1
        });
    }
    let (state, _) = outpost_agent::open_state(&attacker).unwrap();
    let genuine = state.held_proofs().unwrap().pop().expect("a held header");
    let sequence = state.assignment_sequence().unwrap();
    drop(state);
    let digest = outpost_proto::Digest([0x5a; 32]);
    let held = |generation: u64| HeldSnapshot {
        bundle: "shop".to_owned(),
        generation,
        digest,
    };
    // The genuine header with its generation (bytes after magic, version and bundle) changed.
    let mut tampered = genuine.clone();
    let at = 4 + 2 + 4 + "shop".len();
    tampered.header[at..at + 8].copy_from_slice(&1_000_000u64.to_be_bytes());
    let hello = |sequence: u64, have: Vec<HeldSnapshot>, proofs: Vec<HeldProof>| Hello {
        agent_version: "attacker".to_owned(),
        assignment_sequence: sequence,
        have,
        proofs,
    };
    let forged = match claim {
        Claim::RaiseCounters => vec![
            hello(sequence, vec![held(1_000_000)], vec![]),
            hello(MAX_COUNTER, vec![], vec![]),
            hello(sequence, vec![held(1_000_000)], vec![tampered]),
        ],
        Claim::Freeze => vec![hello(sequence, vec![held(MAX_COUNTER)], vec![])],
    };
    let claims = forged.len();
    let agents = SocketAddr::from(([127, 0, 0, 1], hub.agents_port));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for hello in forged {
        let claimed = format!("{hello:?}");
        let assign = runtime.block_on(async {
            let (_connection, _control, mut reader) =
                forged_session(&attacker, agents, hello).await;
            next_assign(&mut reader).await
        });
        let assign = assign.unwrap_or_else(|| panic!("the hub answers {claimed} with an Assign"));
        assert!(assign.sequence < 100, "the hub's own sequence: {assign:?}");
        assert_eq!(assign.assignments[0].generation, 1, "{claimed}: {assign:?}");
    }
    if claim == Claim::Freeze {
        // 2^64 − 1 does not even decode: the hub ends the session and keeps nothing.
        let ended = runtime.block_on(async {
            let (_connection, _control, mut reader) =
                forged_session(&attacker, agents, hello(u64::MAX, vec![], vec![])).await;
            next_assign(&mut reader).await
        });
        assert!(
            ended.is_none(),
            "no Assign for an undecodable Hello: {ended:?}"
        );
    }

    let events = hub.get("/api/v1/events?limit=200");
    let refused: Vec<&Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|event| event["kind"] == "agent-claim-refused")
        .collect();
    assert!(
        refused.len() >= claims,
        "an event per forged Hello: {events}"
    );
    assert!(
        !events.to_string().contains("hub-behind-agent"),
        "nothing moved: {events}"
    );
    let scrape = Scrape::get(&format!("{}/metrics", hub.url));
    assert!(scrape.must("outpost_hub_agent_claims_refused_total", &[]) >= claims as f64);

    // The fleet goes on: the next commit is generation 2, and the honest device installs it.
    std::fs::write(
        repo.join("shop/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shop, namespace: default}\ndata: {value: \"2\"}\n",
    )
    .unwrap();
    git(&repo, &["commit", "-qam", "second"]);
    hub.cli(&["fetch-now"]);
    wait_for("generation 2 on the honest device", 60, || {
        assigned_generation(&agent_bin, &honest) == 2
    });
    let releases = hub.get("/api/v1/releases");
    let newest = releases
        .as_array()
        .unwrap()
        .iter()
        .filter(|release| release["bundle"] == "shop")
        .filter_map(|release| release["generation"].as_u64())
        .max();
    assert_eq!(newest, Some(2), "{releases}");
}

/// HMAC-SHA256 of `body` under [`HOOK_SECRET`], as GitHub signs a delivery.
fn github_signature(body: &str) -> String {
    use hmac::{KeyInit as _, Mac as _};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A captured webhook delivery sent again — whole, with its delivery id changed, and with the
/// id removed — is refused (409, saying it is a replay) and makes no fetch; a new delivery is
/// taken.
#[test]
fn trust_attack_a_replayed_webhook_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let repo = outpost_e2e::processes::shop_repository(work.path());
    let (hub, hooks) = hub_with_hooks(work.path(), &repo);
    let deliver = |id: Option<&str>, body: &str| -> (u16, Value) {
        let mut request = ureq::http::Request::builder()
            .method("POST")
            .uri(format!("http://{hooks}/hooks/git/fleet"))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-hub-signature-256", github_signature(body));
        if let Some(id) = id {
            request = request.header("x-github-delivery", id);
        }
        let agent = ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build(),
        );
        let mut response = agent
            .run(request.body(body.as_bytes().to_vec()).unwrap())
            .unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    let fetches = || -> u64 {
        hub.get("/api/v1/sources")
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["name"] == "fleet")
            .and_then(|row| row["fetches"].as_u64())
            .unwrap_or(0)
    };
    wait_for("the first fetch", 30, || fetches() >= 1);
    let captured =
        r#"{"ref":"refs/heads/main","after":"1111111111111111111111111111111111111111"}"#;
    assert_eq!(deliver(Some("delivery-1"), captured).0, 202);
    wait_for("the delivery's fetch", 30, || fetches() >= 2);
    std::thread::sleep(Duration::from_secs(2));
    let before = fetches();
    for (what, id) in [
        ("replayed whole", Some("delivery-1")),
        ("its id changed", Some("delivery-2")),
        ("its id removed", None),
    ] {
        let (status, answer) = deliver(id, captured);
        assert_eq!(status, 409, "{what}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains("replay"),
            "{what}: {answer}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fetches(), before, "a replay makes no fetch");
    let fresh = r#"{"ref":"refs/heads/main","after":"2222222222222222222222222222222222222222"}"#;
    assert_eq!(
        deliver(Some("delivery-3"), fresh).0,
        202,
        "a new delivery is taken"
    );
}

/// An ed25519 key made by the real ssh-keygen under `dir`; its private key's path and its
/// public key line.
fn ssh_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(name);
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen is installed (Debian: openssh-client; scripts/setup.sh installs it)");
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_owned())
}

/// Commits everything in `repo` with `value` in the shop ConfigMap, signed with `key` (SSH, as
/// `git config gpg.format ssh` does) or unsigned.
fn commit_shop(repo: &std::path::Path, value: &str, key: Option<&std::path::Path>) {
    std::fs::write(
        repo.join("shop/app.yaml"),
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: shop, namespace: default}}\ndata: {{value: \"{value}\"}}\n"),
    )
    .unwrap();
    git(repo, &["add", "-A"]);
    match key {
        Some(key) => git(
            repo,
            &[
                "-c",
                "gpg.format=ssh",
                "-c",
                &format!("user.signingkey={}", key.display()),
                "commit",
                "-S",
                "-qm",
                value,
            ],
        ),
        None => git(repo, &["commit", "-qm", value]),
    }
}

/// What is pushed to a source that releases only commits signed by alice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// A commit without a signature.
    Unsigned,
    /// A commit signed by mallory's key.
    WronglySigned,
    /// main force-pushed back to alice's first (signed) commit after her second was released.
    Rewrite,
}

/// An unsigned commit is refused: see [`signed_git`].
#[test]
fn trust_attack_unsigned_commit() {
    signed_git(Push::Unsigned);
}

/// A commit signed by a key that is not an allowed signer is refused.
#[test]
fn trust_attack_wrongly_signed_commit() {
    signed_git(Push::WronglySigned);
}

/// A force-push (a history rewrite) is refused until the operator allows it.
#[test]
fn trust_attack_force_push() {
    signed_git(Push::Rewrite);
}

/// Signed Git: a source that releases only commits signed by alice gets `push`. An unsigned
/// commit and one signed by another key are refused — the release says who signed and who was
/// expected, an event and the refusal metric say so — and the device keeps enforcing what it
/// had; alice's next commit is released and reaches it. A force-push back to an older signed
/// commit is refused as a history rewrite until the operator allows that commit.
fn signed_git(push: Push) {
    let agent_bin = outpost_e2e::processes::binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let (alice, alice_public) = ssh_key(work.path(), "alice");
    let (mallory, mallory_public) = ssh_key(work.path(), "mallory");
    let allowed = work.path().join("allowed_signers");
    std::fs::write(&allowed, format!("alice@example.com {alice_public}\n")).unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    commit_shop(&repo, "1", Some(&alice));
    let first = head_of(&repo, "HEAD");
    let mut hub = HubProcess::start(work.path(), &repo, "main");
    let config = std::fs::read_to_string(&hub.config).unwrap();
    std::fs::write(
        &hub.config,
        format!(
            "{config}verify = {{ keys = [\"{}\"], mode = \"commits\" }}\n",
            allowed.display()
        ),
    )
    .unwrap();
    hub.restart();
    let main = |hub: &HubProcess| -> Value {
        hub.get("/api/v1/releases")
            .as_array()
            .unwrap()
            .iter()
            .find(|release| release["bundle"] == "shop" && release["ref"] == "refs/heads/main")
            .cloned()
            .unwrap_or(Value::Null)
    };
    wait_for("alice's commit released", 30, || {
        main(&hub)["generation"] == 1
    });
    let device = work.path().join("device");
    hub.enrol(&agent_bin, &device, &["role=store"]);
    let _device = run_cache_only(&agent_bin, &device);
    wait_for("the device to hold generation 1", 60, || {
        assigned_generation(&agent_bin, &device) == 1
    });

    let mallory_fingerprint =
        outpost_hub::signed::AllowedSigners::parse(&format!("m {mallory_public}"), "test")
            .unwrap()
            .signers()[0]
            .fingerprint
            .clone();
    let cases = [
        (
            Push::Unsigned,
            "unsigned",
            None,
            vec!["is not signed", "alice@example.com"],
        ),
        (
            Push::WronglySigned,
            "signed by mallory",
            Some(mallory.as_path()),
            vec![
                "not an allowed signer",
                mallory_fingerprint.as_str(),
                "alice@example.com",
            ],
        ),
    ];
    for (_, what, key, expected) in cases.into_iter().filter(|(case, ..)| *case == push) {
        commit_shop(&repo, what, key);
        hub.cli(&["fetch-now"]);
        wait_for(&format!("the {what} commit refused"), 30, || {
            main(&hub)["error"]
                .as_str()
                .is_some_and(|error| error.contains(expected[0]))
        });
        let error = main(&hub)["error"].as_str().unwrap().to_owned();
        for word in &expected {
            assert!(error.contains(word), "{what}: {error}");
        }
        let shown = hub.cli(&["releases"]);
        assert!(
            shown.contains(expected[0]),
            "outpost-hub releases shows why: {shown}"
        );
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            assigned_generation(&agent_bin, &device),
            1,
            "{what}: the device keeps enforcing what it had"
        );
    }
    if push != Push::Rewrite {
        let events = hub.get("/api/v1/events?limit=200").to_string();
        let said = match push {
            Push::Unsigned => "is not signed",
            _ => "not an allowed signer",
        };
        assert!(
            events.contains("release-refused") && events.contains(said),
            "{events}"
        );
        let scrape = Scrape::get(&format!("{}/metrics", hub.url));
        assert!(scrape.must("outpost_hub_render_refusals_total", &[("source", "fleet")]) >= 1.0);
    }

    commit_shop(&repo, "2", Some(&alice));
    hub.cli(&["fetch-now"]);
    wait_for("alice's next commit on the device", 60, || {
        assigned_generation(&agent_bin, &device) >= 2
    });
    assert!(main(&hub)["error"].is_null(), "{}", main(&hub));
    if push != Push::Rewrite {
        return;
    }
    let running = assigned_generation(&agent_bin, &device);

    // A force-push: main rewritten back to alice's first commit (signed, but not a descendant
    // of what was released). Refused until the operator allows that commit.
    git(&repo, &["reset", "-q", "--hard", &first]);
    hub.cli(&["fetch-now"]);
    wait_for("the rewrite refused", 30, || {
        main(&hub)["error"]
            .as_str()
            .is_some_and(|error| error.contains("history rewritten"))
    });
    let error = main(&hub)["error"].as_str().unwrap().to_owned();
    assert!(
        error.contains(&first) && error.contains("allow_rewrite_to"),
        "{error}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        assigned_generation(&agent_bin, &device),
        running,
        "the device keeps what it runs"
    );
    let config = std::fs::read_to_string(&hub.config).unwrap().replace(
        "mode = \"commits\" }",
        &format!("mode = \"commits\", allow_rewrite_to = [\"{first}\"] }}"),
    );
    std::fs::write(&hub.config, config).unwrap();
    hub.restart();
    wait_for("the allowed rewrite released", 30, || {
        main(&hub)["error"].is_null()
    });
    let events = hub.get("/api/v1/events?limit=200").to_string();
    assert!(events.contains("history rewritten"), "{events}");
}

/// The commit `revision` names in `repo`.
fn head_of(repo: &std::path::Path, revision: &str) -> String {
    let output = std::process::Command::new("git")
        .args(["rev-parse", revision])
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// `outpost-agent run --cluster none` on `state_dir` with its metrics on `metrics`.
fn run_cache_only_with_metrics(
    agent_bin: &std::path::Path,
    state_dir: &std::path::Path,
    metrics: &str,
) -> Process {
    Process(
        std::process::Command::new(agent_bin)
            .args(["run", "--cluster", "none"])
            .env("OUTPOST_AGENT_STATE_DIR", state_dir)
            .env("OUTPOST_AGENT_METRICS_ADDRESS", metrics)
            .env(
                "OUTPOST_LOG",
                std::env::var("OUTPOST_TEST_AGENT_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .spawn()
            .expect("start outpost-agent"),
    )
}

/// The transport key of `hub`, as an attacker who copied `keys/transport.key` holds it.
fn stolen_transport_key(hub: &HubProcess) -> outpost_proto::SigningKey {
    let seed = std::fs::read_to_string(hub.key_dir().join("transport.key")).unwrap();
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(seed.trim(), &mut bytes).unwrap();
    outpost_proto::SigningKey::from_seed(bytes)
}

/// A hub impostor on `address` with `transport` (the real hub's stolen key): the device that
/// dials it, once it said Hello.
struct Impostor {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    control: quinn::SendStream,
}

impl Impostor {
    /// Waits up to a minute for the device, reads its Hello and, as the real hub does once a
    /// peer said who it is, makes room for its fetch streams.
    async fn accept(transport: &outpost_proto::SigningKey, address: SocketAddr) -> Impostor {
        let config = outpost_proto::transport::server_config(
            transport,
            &outpost_proto::transport::Tuning::default(),
        )
        .unwrap();
        let endpoint = quinn::Endpoint::server(config, address).expect("the hub's address is free");
        let incoming = tokio::time::timeout(Duration::from_secs(60), endpoint.accept())
            .await
            .expect("the device dials the impostor")
            .unwrap();
        let connection = incoming.await.expect("the device takes the stolen key");
        let (control, recv) = connection.accept_bi().await.unwrap();
        let mut reader = MessageReader::new(recv);
        match reader.next().await.unwrap() {
            Some(Message::Hello(_)) => {}
            other => panic!("expected Hello, got {other:?}"),
        }
        outpost_proto::transport::allow_identified(&connection);
        Impostor {
            endpoint,
            connection,
            control,
        }
    }

    /// Sends `message` on the control stream.
    async fn send(&mut self, message: &Message) {
        outpost_proto::transport::send_message(&mut self.control, message)
            .await
            .unwrap();
    }

    /// Closes the connection and frees the address.
    async fn close(self) {
        self.connection.close(0u32.into(), b"gone");
        self.endpoint.close(0u32.into(), b"gone");
        self.endpoint.wait_idle().await;
    }
}

/// What a hub impostor holding only a copy of the real hub's `keys/transport.key` (a stolen
/// TLS key, a compromised relay) sends the device that connects to it as to its hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forgery {
    /// An unsigned `Assign` back to generation 1, which the device still caches.
    Rollback,
    /// An `Assign` of nothing (the device would prune everything), signed with the transport
    /// key.
    Empty,
    /// An `Assign` whose sequence is 2^63 − 1, jamming the device against the real hub.
    Jammed,
    /// Another device's genuine signed assignment, replayed as it was.
    OtherAgent,
}

/// An impostor rolls the device back to a cached older snapshot: refused (see [`impostor`]).
#[test]
fn trust_attack_assignment_rolling_back_to_a_cached_snapshot() {
    impostor(Forgery::Rollback);
}

/// An impostor assigns the device nothing: refused, nothing pruned.
#[test]
fn trust_attack_assignment_of_nothing() {
    impostor(Forgery::Empty);
}

/// An impostor jams the device's sequence at 2^63 − 1: refused.
#[test]
fn trust_attack_assignment_jamming_the_sequence() {
    impostor(Forgery::Jammed);
}

/// An impostor replays another device's genuine signed assignment: refused.
#[test]
fn trust_attack_assignment_of_another_agent() {
    impostor(Forgery::OtherAgent);
}

/// The device connects to an impostor with the hub's stolen transport key, which sends what
/// `forgery` names. The device does not take it (counted in
/// `outpost_agent_assignments_refused_total`), keeps the generation and sequence it has, and
/// goes on with the real hub when it returns.
fn impostor(forgery: Forgery) {
    let agent_bin = outpost_e2e::processes::binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = outpost_e2e::processes::shop_repository(work.path());
    let mut hub = HubProcess::start(work.path(), &repo, "main");
    let device = work.path().join("device");
    let other = work.path().join("other");
    let id = hub.enrol(&agent_bin, &device, &["role=store"]);
    hub.enrol(&agent_bin, &other, &["role=store"]);
    let metrics = format!("127.0.0.1:{}", outpost_e2e::processes::free_port(false));
    let _device = run_cache_only_with_metrics(&agent_bin, &device, &metrics);
    wait_for("generation 1 on the device", 60, || {
        assigned_generation(&agent_bin, &device) == 1
    });
    let first = hub.get("/api/v1/snapshots/shop/1")["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    commit_shop(&repo, "2", None);
    hub.cli(&["fetch-now"]);
    wait_for("generation 2 on the device", 60, || {
        assigned_generation(&agent_bin, &device) == 2
    });
    let agents = SocketAddr::from(([127, 0, 0, 1], hub.agents_port));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A genuine assignment, signed for the other device, captured from its session.
    let (other_state, _) = outpost_agent::open_state(&other).unwrap();
    let other_sequence = other_state.assignment_sequence().unwrap();
    drop(other_state);
    let captured = runtime
        .block_on(async {
            let hello = Hello {
                agent_version: "capture".to_owned(),
                assignment_sequence: other_sequence,
                have: vec![],
                proofs: vec![],
            };
            let (_connection, _control, mut reader) = forged_session(&other, agents, hello).await;
            next_assign(&mut reader).await
        })
        .expect("the other device's assignment");
    assert!(!captured.signature.is_empty(), "assignments are signed");
    let (state, _) = outpost_agent::open_state(&device).unwrap();
    let sequence = state.assignment_sequence().unwrap();
    drop(state);

    // The impostor: the real hub stops, and a server with only its transport key takes its
    // address.
    hub.stop();
    let transport = stolen_transport_key(&hub);
    let shop = |generation: u64, digest: &str| outpost_proto::wire::Assignment {
        bundle: "shop".to_owned(),
        generation,
        digest: outpost_proto::Digest(hex::decode(digest).unwrap().try_into().unwrap()),
    };
    let far = outpost_e2e::harness::unix_now() + 86_400;
    let mut signed_by_transport = Assign {
        sequence: sequence + 2,
        assignments: vec![],
        agent: id.clone(),
        expires_at: far,
        ..Assign::default()
    };
    outpost_proto::assignment::sign(&mut signed_by_transport, &transport).unwrap();
    let all = vec![
        // Back to generation 1, which the device still caches: unsigned.
        Assign {
            sequence: sequence + 1,
            assignments: vec![shop(1, &first)],
            agent: id.clone(),
            expires_at: far,
            ..Assign::default()
        },
        // Nothing at all (the device would prune everything), signed with the transport key.
        signed_by_transport,
        // The sequence jammed at 2^63 − 1.
        Assign {
            sequence: MAX_COUNTER,
            assignments: vec![shop(1, &first)],
            agent: id.clone(),
            expires_at: far,
            ..Assign::default()
        },
        // Another device's genuine signed assignment, replayed as it was.
        captured,
    ];
    let kinds = [
        Forgery::Rollback,
        Forgery::Empty,
        Forgery::Jammed,
        Forgery::OtherAgent,
    ];
    let forged: Vec<Assign> = kinds
        .into_iter()
        .zip(all)
        .filter(|(kind, _)| *kind == forgery)
        .map(|(_, assign)| assign)
        .collect();
    let sent = forged.len();
    assert_eq!(sent, 1);
    runtime.block_on(async move {
        let mut impostor = Impostor::accept(&transport, agents).await;
        for assign in forged {
            impostor.send(&Message::Assign(assign)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        impostor.close().await;
    });
    drop(runtime);
    let scrape = Scrape::get(&format!("http://{metrics}/metrics"));
    assert_eq!(
        scrape.must("outpost_agent_assignments_refused_total", &[]),
        sent as f64,
        "every forged assignment refused"
    );
    assert_eq!(
        assigned_generation(&agent_bin, &device),
        2,
        "the device keeps the generation it runs"
    );
    let (state, _) = outpost_agent::open_state(&device).unwrap();
    assert_eq!(
        state.assignment_sequence().unwrap(),
        sequence,
        "its sequence is not jammed"
    );
    drop(state);

    // The real hub returns; its next commit reaches the device.
    hub.restart();
    commit_shop(&repo, "3", None);
    hub.cli(&["fetch-now"]);
    wait_for("generation 3 on the device", 60, || {
        assigned_generation(&agent_bin, &device) == 3
    });
}

/// What a device's own key gets from the hub in one session, as an attacker holding that key
/// would record it: the `Trust` and `Assign` sent after `Hello`, and the fetch of the assigned
/// snapshot (its `TransferStart` and whole payload).
async fn record_session(
    state_dir: &std::path::Path,
    hub: SocketAddr,
) -> (Message, Assign, outpost_proto::wire::TransferStart, Vec<u8>) {
    let hello = Hello {
        agent_version: "recorder".to_owned(),
        assignment_sequence: 0,
        have: vec![],
        proofs: vec![],
    };
    let (connection, _control, mut reader) = forged_session(state_dir, hub, hello).await;
    let mut trust = None;
    let assign = loop {
        match reader.next().await.unwrap() {
            // The assignment made at enrolment may follow an empty first one.
            Some(Message::Assign(assign)) if !assign.assignments.is_empty() => break assign,
            Some(message @ Message::Trust(_)) => trust = Some(message),
            Some(_) => continue,
            None => panic!("the session ended before an Assign"),
        }
    };
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let fetch = outpost_proto::wire::Fetch {
        snapshot: assign.assignments[0].digest,
        have: vec![],
        resume: None,
    };
    outpost_proto::transport::send_message(&mut send, &Message::Fetch(fetch))
        .await
        .unwrap();
    let mut reader = MessageReader::new(recv);
    let Some(Message::TransferStart(start)) = reader.next().await.unwrap() else {
        panic!("expected TransferStart");
    };
    let mut payload = Vec::new();
    while (payload.len() as u64) < start.payload_size {
        match reader.next().await.unwrap() {
            Some(Message::TransferChunk(chunk)) => payload.extend_from_slice(&chunk.bytes),
            other => panic!("expected a chunk, got {other:?}"),
        }
    }
    (trust.expect("Trust before Assign"), assign, start, payload)
}

/// A snapshot replayed after its signed expiry, to a device installing it for the first time:
/// an impostor with the hub's transport key replays what it recorded of the device's own
/// session — the genuine `Trust`, the genuine signed `Assign`, the genuine snapshot, now
/// expired. The device takes the assignment (it is genuine and in date) but refuses the
/// snapshot (`outpost_agent_transfers_rejected_total`) and installs nothing.
#[test]
fn trust_attack_expired_snapshot_on_first_install() {
    let agent_bin = outpost_e2e::processes::binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = outpost_e2e::processes::shop_repository(work.path());
    let mut hub = HubProcess::start_with(work.path(), &repo, "main", "snapshot_lifetime = \"12s\"");
    let device = work.path().join("device");
    hub.enrol(&agent_bin, &device, &["role=store"]);
    let agents = SocketAddr::from(([127, 0, 0, 1], hub.agents_port));
    wait_for("a release", 30, || {
        hub.get("/api/v1/releases")
            .as_array()
            .is_some_and(|rows| rows.iter().any(|row| row["generation"].is_u64()))
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (trust, assign, start, payload) = runtime.block_on(record_session(&device, agents));
    let header = outpost_proto::SnapshotHeader::decode(&start.header).unwrap();
    let expires_at = header.expires_at.expect("snapshots expire");
    hub.stop();
    let wait = expires_at + 2 - outpost_e2e::harness::unix_now();
    if wait > 0 {
        std::thread::sleep(Duration::from_secs(wait as u64));
    }

    let transport = stolen_transport_key(&hub);
    let metrics = format!("127.0.0.1:{}", outpost_e2e::processes::free_port(false));
    let _device = run_cache_only_with_metrics(&agent_bin, &device, &metrics);
    runtime.block_on(async move {
        let mut impostor = Impostor::accept(&transport, agents).await;
        impostor.send(&trust).await;
        impostor.send(&Message::Assign(assign)).await;
        // Serve the device's fetches with the recorded, now expired, snapshot.
        let connection = impostor.connection.clone();
        let serving = async {
            loop {
                let Ok((mut send, recv)) = connection.accept_bi().await else {
                    return;
                };
                let mut reader = MessageReader::new(recv);
                if !matches!(reader.next().await, Ok(Some(Message::Fetch(_)))) {
                    continue;
                }
                let chunk = outpost_proto::wire::TransferChunk {
                    payload_digest: start.payload_digest,
                    offset: 0,
                    bytes: payload.clone(),
                };
                for message in [
                    Message::TransferStart(start.clone()),
                    Message::TransferChunk(chunk),
                ] {
                    let _ = outpost_proto::transport::send_message(&mut send, &message).await;
                }
                let _ = send.finish();
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
        impostor.close().await;
    });
    drop(runtime);
    let scrape = Scrape::get(&format!("http://{metrics}/metrics"));
    assert!(
        scrape.must("outpost_agent_transfers_rejected_total", &[]) >= 1.0,
        "the expired snapshot refused: {}",
        scrape.text
    );
    assert_eq!(
        scrape.must("outpost_agent_snapshots_installed_total", &[]),
        0.0,
        "nothing installed"
    );
    let (state, _) = outpost_agent::open_state(&device).unwrap();
    assert!(state.held().unwrap().is_empty(), "the device holds nothing");
    assert_eq!(
        state.assignments().unwrap().len(),
        1,
        "the genuine assignment was taken"
    );
}
