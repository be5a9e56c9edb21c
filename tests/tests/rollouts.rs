//! Rollouts by tag with the real binaries: `outpost-hub run` on a real Git repository with
//! tags, four `outpost-agent run` processes (labels region, ring=canary) each reconciling its
//! own Kubernetes API test server, and the operator's CLI: `rollout create --watch`, `show`,
//! `pause`, a hub restart mid-rollout, `resume`, a group whose nodes cannot pull the new image,
//! and the automatic roll back. Then the fleet page in headless Chromium: its DOM and a
//! screenshot. Along the way the hub's and the agents' `/metrics` are scraped and must move
//! with what happens (agents connected, phases, generations, rollout phases).

use std::path::Path;
use std::process::{Command, Stdio};

use outpost_e2e::harness::unix_now;
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{
    HubProcess, OPERATOR, Process, Scrape, binary, free_port, git, git_init, run, run_agent_with,
    wait_for,
};
use serde_json::{Value, json};

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n  namespace: default\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {{app: shop}}\n  template:\n    metadata:\n      labels: {{app: shop}}\n    spec:\n      containers:\n      - name: shop\n        image: {image}\n"
    )
}

fn commit_and_tag(repo: &Path, image: &str, tag: &str) {
    std::fs::write(repo.join("shop/app.yaml"), deployment(image)).unwrap();
    git(repo, &["add", "-A"]);
    git(repo, &["commit", "-qm", tag]);
    git(repo, &["tag", tag]);
}

struct Site {
    id: String,
    cluster: KubeApiServer,
    _agent: Process,
    /// The agent's metrics listener.
    metrics: String,
}

impl Site {
    fn scrape(&self) -> Scrape {
        Scrape::get(&format!("{}/metrics", self.metrics))
    }

    fn image(&self) -> Option<String> {
        self.cluster
            .object("apps/v1", "Deployment", "default", "shop")
            .and_then(|object| {
                object["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .map(str::to_owned)
            })
    }
}

/// The release name and health the hub shows for an agent's `shop` bundle.
fn shown(hub: &HubProcess, agent: &str) -> (String, String) {
    let fleet = hub.get("/api/v1/fleet");
    let row = fleet["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["id"] == agent)
        .cloned()
        .unwrap_or(Value::Null);
    let bundle = &row["bundles"][0];
    (
        bundle["release"].as_str().unwrap_or("-").to_owned(),
        bundle["status"]["phase"].as_str().unwrap_or("-").to_owned(),
    )
}

fn rollout(hub: &HubProcess, id: u64) -> Value {
    serde_json::from_str(&hub.cli(&["rollout", "show", &id.to_string(), "--output", "json"]))
        .unwrap()
}

#[test]
fn a_tag_rolls_out_in_waves_survives_a_restart_and_rolls_back_on_failure() {
    let agent_bin = binary("outpost-agent");
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    // v1 is what the fleet runs (branch `stable`, tracked); v2 and v3 are releases to roll out.
    commit_and_tag(&repo, "registry.example/shop:1", "v1");
    git(&repo, &["branch", "stable"]);
    commit_and_tag(&repo, "registry.example/shop:2", "v2");
    commit_and_tag(&repo, "registry.example/shop:3", "v3");
    let mut hub = HubProcess::start(work.path(), &repo, "stable");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut sites = Vec::new();
    let fleet: [(&str, &[&str], bool); 4] = [
        ("canary", &["region=eu", "ring=canary"], false),
        ("paris", &["region=eu"], false),
        ("berlin", &["region=eu"], true),
        ("boston", &["region=us"], false),
    ];
    for (name, labels, cannot_pull_v3) in fleet {
        let options = ServerOptions {
            unpullable_images: match cannot_pull_v3 {
                true => vec!["registry.example/shop:3".to_owned()],
                false => Vec::new(),
            },
            ..ServerOptions::default()
        };
        let cluster = runtime.block_on(KubeApiServer::start(options));
        let state = work.path().join(name);
        let id = hub.enrol(&agent_bin, &state, labels);
        let kubeconfig = cluster.write_kubeconfig(work.path().join(format!("{name}.kubeconfig")));
        let metrics = format!("127.0.0.1:{}", free_port(false));
        let agent = run_agent_with(
            &agent_bin,
            &state,
            &kubeconfig,
            &[("OUTPOST_AGENT_METRICS_ADDRESS", metrics.clone())],
        );
        sites.push(Site {
            id,
            cluster,
            _agent: agent,
            metrics: format!("http://{metrics}"),
        });
    }
    // Enrolments ask the hub to sync: everyone gets the tracked branch.
    wait_for("every site healthy on stable", 90, || {
        sites
            .iter()
            .all(|site| shown(&hub, &site.id) == ("stable, v1".to_owned(), "Healthy".to_owned()))
    });

    // The hub's metrics (public, like the probes) and each agent's.
    let scraped = Scrape::get(&format!("{}/metrics", hub.url));
    assert_eq!(scraped.must("outpost_hub_agents_connected", &[]), 4.0);
    assert_eq!(scraped.must("outpost_hub_agents_enrolled", &[]), 4.0);
    assert_eq!(scraped.must("outpost_hub_store_up", &[]), 1.0);
    assert_eq!(scraped.must("outpost_hub_leader", &[]), 1.0);
    assert_eq!(
        scraped.must(
            "outpost_hub_bundle_agents",
            &[("bundle", "shop"), ("phase", "Healthy")]
        ),
        4.0
    );
    assert!(scraped.must("outpost_hub_syncs_total", &[("result", "ok")]) >= 1.0);
    assert!(scraped.must("outpost_hub_renders_total", &[]) >= 1.0);
    assert!(scraped.must("outpost_hub_status_reports_total", &[]) >= 4.0);
    assert!(scraped.must("outpost_hub_sessions_total", &[]) >= 4.0);
    assert!(
        scraped.must(
            "outpost_hub_payload_sent_bytes_total",
            &[("encoding", "whole")]
        ) > 0.0
    );
    assert!(
        scraped.must(
            "outpost_hub_store_operation_duration_seconds_count",
            &[("operation", "record_statuses")]
        ) >= 1.0
    );
    assert_eq!(
        scraped.must("outpost_hub_rollouts", &[("phase", "running")]),
        0.0
    );
    let canary_before = sites[0].scrape();
    assert_eq!(canary_before.must("outpost_agent_hub_connected", &[]), 1.0);
    assert_eq!(canary_before.must("outpost_agent_state_up", &[]), 1.0);
    assert_eq!(
        canary_before.must("outpost_agent_cluster_reachable", &[]),
        1.0
    );
    assert_eq!(
        canary_before.must(
            "outpost_agent_bundle_phase",
            &[("bundle", "shop"), ("phase", "Healthy")]
        ),
        1.0
    );
    assert_eq!(
        canary_before.must(
            "outpost_agent_bundle_phase",
            &[("bundle", "shop"), ("phase", "Failed")]
        ),
        0.0
    );
    assert!(canary_before.must("outpost_agent_objects_applied_total", &[]) >= 1.0);
    assert!(canary_before.must("outpost_agent_payload_received_bytes_total", &[]) > 0.0);
    assert!(
        canary_before.must(
            "outpost_agent_last_reconcile_success_timestamp_seconds",
            &[]
        ) >= (unix_now() - 120) as f64
    );
    let generation_before =
        canary_before.must("outpost_agent_bundle_generation", &[("bundle", "shop")]);
    for probe in ["live", "ready"] {
        let status = ureq::get(&format!("{}/{probe}", sites[0].metrics))
            .call()
            .map(|response| response.status().as_u16());
        assert_eq!(status.ok(), Some(200), "agent /{probe}");
    }

    let fleet = hub.get("/api/v1/fleet");
    assert!(
        fleet["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|agent| agent["connected"] == true),
        "the hub knows who is connected now: {fleet}"
    );
    // What the fleet page reads at scale: counts the hub computes, and filtered pages.
    let summary = hub.get("/api/v1/fleet/summary");
    assert_eq!(
        (summary["agents"].as_u64(), summary["connected"].as_u64()),
        (Some(4), Some(4)),
        "{summary}"
    );
    assert_eq!(summary["bundles"][0]["phases"]["Healthy"], 4, "{summary}");
    assert_eq!(
        summary["bundles"][0]["releases"][0]["release"], "stable, v1",
        "{summary}"
    );
    assert_eq!(
        summary["bundles"][0]["releases"][0]["agents"], 4,
        "{summary}"
    );
    let region = summary["labels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|label| label["key"] == "region")
        .cloned()
        .unwrap();
    assert_eq!(
        region["values"][0],
        json!({"value": "eu", "agents": 3}),
        "{summary}"
    );
    let first = hub.get("/api/v1/fleet?label=region%3Deu&limit=2");
    assert_eq!(first["matched"], 3, "{first}");
    assert_eq!(first["agents"].as_array().unwrap().len(), 2, "{first}");
    let next = first["next"].as_str().expect("a next page").to_owned();
    let second = hub.get(&format!(
        "/api/v1/fleet?label=region%3Deu&limit=2&after={next}"
    ));
    assert_eq!(second["agents"].as_array().unwrap().len(), 1, "{second}");
    assert!(second["next"].is_null(), "{second}");
    let mut paged: Vec<String> = first["agents"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["agents"].as_array().unwrap())
        .map(|agent| agent["id"].as_str().unwrap().to_owned())
        .collect();
    paged.sort();
    let mut eu: Vec<String> = sites[..3].iter().map(|site| site.id.clone()).collect();
    eu.sort();
    assert_eq!(paged, eu);
    assert_eq!(
        hub.get("/api/v1/fleet?label=region%3Deu,!ring")["matched"],
        2
    );
    assert_eq!(
        hub.get("/api/v1/fleet?bundle=shop&phase=Failed")["matched"],
        0
    );
    assert_eq!(
        hub.get("/api/v1/fleet?release=v1&connected=true")["matched"],
        4
    );

    // Before: what a rollout of v2 to Europe would change, and its waves (nothing created).
    let diff = hub.cli(&["diff", "--bundle", "shop", "--tag", "v2", "-l", "region=eu"]);
    assert!(diff.contains("3 agent(s)"), "{diff}");
    assert!(diff.contains("~ Deployment default/shop"), "{diff}");
    assert!(
        diff.contains(
            "spec.template.spec.containers[0].image: \"registry.example/shop:1\" → \"registry.example/shop:2\""
        ),
        "{diff}"
    );
    let dry = hub.cli(&[
        "rollout",
        "create",
        "--bundle",
        "shop",
        "--tag",
        "v2",
        "--selector",
        "region=eu",
        "--waves",
        "1,50%,100%",
        "--dry-run",
    ]);
    assert!(dry.contains("nothing created"), "{dry}");
    assert!(
        dry.contains(&format!("wave 1 (up to 1): 1 agent(s): {}", sites[0].id)),
        "the canary alone in the first wave: {dry}"
    );
    assert!(
        !dry.contains(&sites[3].id),
        "the US site is not selected: {dry}"
    );
    assert_eq!(
        hub.get("/api/v1/rollouts"),
        json!([]),
        "a dry run creates nothing"
    );

    // Roll v2 out to Europe: the canary first, then the rest; the US site stays on stable.
    let watched = hub.cli(&[
        "rollout",
        "create",
        "--bundle",
        "shop",
        "--tag",
        "v2",
        "--selector",
        "region=eu",
        "--waves",
        "1,50%,100%",
        "--health-timeout",
        "20s",
        "--why",
        "spring release",
        "--watch",
    ]);
    assert!(watched.contains("succeeded"), "{watched}");
    assert!(watched.contains("wave 1"), "{watched}");
    let first = rollout(&hub, 1);
    assert_eq!(first["phase"], "succeeded");
    let wave_of = |rollout: &Value, agent: &str| {
        rollout["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["agent"] == agent)
            .map(|row| row["wave"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(wave_of(&first, &sites[0].id), 1, "the canary went first");
    let mut later = [wave_of(&first, &sites[1].id), wave_of(&first, &sites[2].id)];
    later.sort_by_key(|wave| wave.as_u64());
    assert_eq!(
        later,
        [2, 3],
        "then one agent per wave (50% of 3 rounds up to 2 in all)"
    );
    assert_eq!(wave_of(&first, &sites[3].id), Value::Null, "not selected");
    wait_for("Europe on v2, the US on v1", 60, || {
        sites[..3]
            .iter()
            .all(|site| site.image().as_deref() == Some("registry.example/shop:2"))
            && sites[3].image().as_deref() == Some("registry.example/shop:1")
    });
    wait_for(
        "the canary's metrics to show the new generation, healthy",
        30,
        || {
            let scraped = sites[0].scrape();
            scraped.value("outpost_agent_bundle_generation", &[("bundle", "shop")])
                > Some(generation_before)
                && scraped.value(
                    "outpost_agent_bundle_phase",
                    &[("bundle", "shop"), ("phase", "Healthy")],
                ) == Some(1.0)
        },
    );
    let scraped = Scrape::get(&format!("{}/metrics", hub.url));
    assert_eq!(
        scraped.must("outpost_hub_rollouts", &[("phase", "succeeded")]),
        1.0
    );
    assert!(
        scraped.must(
            "outpost_hub_assignment_changes_total",
            &[("cause", "rollout")]
        ) >= 3.0,
        "three agents were released"
    );
    let history = &first["log"][0];
    assert_eq!(
        (&history["who"], &history["why"]),
        (&OPERATOR.into(), &"spring release".into())
    );

    // v3: a new rollout, paused by the operator at once; the hub restarts; the pause holds.
    let created = hub.cli(&[
        "rollout",
        "create",
        "--bundle",
        "shop",
        "--tag",
        "v3",
        "--selector",
        "region=eu",
        "--waves",
        "1,100%",
        "--health-timeout",
        "15s",
        "--on-failure",
        "rollback",
    ]);
    assert!(created.contains("rollout 2 created"), "{created}");
    // A second rollout of the bundle while one runs is refused, saying why.
    let refused = Command::new(&hub.binary)
        .args([
            "rollout", "create", "--bundle", "shop", "--tag", "v2", "--hub", &hub.url,
        ])
        .envs(hub.cli_env())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("still running or paused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    hub.cli(&["rollout", "pause", "2", "--why", "change freeze"]);
    let released_before = rollout(&hub, 2)["on_release"].as_u64().unwrap();
    let restarted_at = unix_now();
    hub.restart();
    wait_for("every agent to reconnect", 60, || {
        hub.get("/api/v1/fleet")["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|agent| {
                agent["last_seen"]
                    .as_i64()
                    .is_some_and(|seen| seen >= restarted_at)
            })
    });
    let paused = rollout(&hub, 2);
    assert_eq!(paused["phase"], "paused", "{paused}");
    let scraped = Scrape::get(&format!("{}/metrics", hub.url));
    let paused_scrape = scraped.clone();
    assert_eq!(
        scraped.must("outpost_hub_rollouts", &[("phase", "paused")]),
        1.0
    );
    assert_eq!(
        scraped.must(
            "outpost_hub_rollout_open_wave",
            &[("rollout", "2"), ("bundle", "shop"), ("phase", "paused")]
        ),
        paused["wave"].as_f64().unwrap_or(0.0)
    );
    assert_eq!(
        scraped.must(
            "outpost_hub_rollout_wave_members",
            &[("rollout", "2"), ("wave", "1"), ("state", "planned")]
        ),
        1.0,
        "the first wave is the canary"
    );
    assert!(paused["reason"].as_str().unwrap().contains("change freeze"));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        rollout(&hub, 2)["on_release"].as_u64().unwrap(),
        released_before,
        "nothing released while paused, across the restart"
    );

    // Resume: Berlin cannot pull v3, does not turn healthy within the timeout, the budget (0)
    // is spent and every site the rollout touched goes back to v2.
    hub.cli(&["rollout", "resume", "2", "--why", "freeze over"]);
    let watch = Command::new(&hub.binary)
        .args(["rollout", "watch", "2", "--hub", &hub.url])
        .envs(hub.cli_env())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        !watch.status.success(),
        "watch exits non-zero on a roll back: {}\n{}",
        String::from_utf8_lossy(&watch.stdout),
        hub.cli(&["rollout", "show", "2"])
    );
    assert!(String::from_utf8_lossy(&watch.stderr).contains("rolled-back"));
    let rolled = rollout(&hub, 2);
    assert_eq!(rolled["phase"], "rolled-back");
    let berlin = rolled["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["agent"] == sites[2].id.as_str())
        .unwrap()
        .clone();
    assert!(
        berlin["detail"].as_str().unwrap().contains("shop:3"),
        "the failure names the image: {berlin}"
    );
    let log: Vec<(String, String)> = rolled["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| {
            (
                record["action"].as_str().unwrap().to_owned(),
                record["why"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(log.contains(&("pause".to_owned(), "change freeze".to_owned())));
    assert!(log.contains(&("resume".to_owned(), "freeze over".to_owned())));
    assert!(log.iter().any(|(action, _)| action == "rolled back"));
    let scraped = Scrape::get(&format!("{}/metrics", hub.url));
    assert_eq!(
        scraped.must("outpost_hub_rollouts", &[("phase", "rolled-back")]),
        1.0
    );
    assert!(
        scraped
            .value("outpost_hub_rollout_open_wave", &[("rollout", "2")])
            .is_none(),
        "a finished rollout has no open wave"
    );
    wait_for("Europe back on v2, healthy", 90, || {
        sites[..3].iter().all(|site| {
            site.image().as_deref() == Some("registry.example/shop:2")
                && shown(&hub, &site.id) == ("v2".to_owned(), "Healthy".to_owned())
        })
    });

    // Berlin's time line: enrolled, released by both rollouts (who and why), failed on v3,
    // given back v2, and what it reported along the way.
    let history: Value =
        serde_json::from_str(&hub.cli(&["history", "--agent", &sites[2].id, "-o", "json"]))
            .unwrap();
    let rows = history.as_array().unwrap();
    let has = |kind: &str, text: &str| {
        rows.iter().any(|row| {
            row["kind"] == kind && row["what"].as_str().unwrap_or_default().contains(text)
        })
    };
    assert!(has("agent-enrolled", "token"), "{history:#}");
    assert!(has("rollout-released", "rollout 1 released"), "{history:#}");
    assert!(has("rollout-released", "rollout 2 released"), "{history:#}");
    assert!(
        has("rollout-restored", "rollout 2 gave back"),
        "{history:#}"
    );
    assert!(has("rollout", "pause; why: change freeze"), "{history:#}");
    assert!(has("report", "Healthy"), "{history:#}");
    assert!(has("assigned", "now assigned"), "{history:#}");
    assert!(
        rows.iter()
            .any(|row| row["kind"] == "rollout" && row["who"] == OPERATOR),
        "who did it: {history:#}"
    );
    let times: Vec<&str> = rows.iter().filter_map(|row| row["at"].as_str()).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "oldest first (RFC 3339 dates sort as text)");
    let table = hub.cli(&["history", "--agent", &sites[2].id, "--since", "1h"]);
    assert!(table.contains("rollout-restored"), "{table}");
    let recent = hub.cli(&[
        "history",
        "--agent",
        &sites[2].id,
        "--since",
        "2100-01-01T00:00:00Z",
    ]);
    assert_eq!(recent.lines().count(), 1, "only the heading: {recent}");

    // Every series the Grafana dashboard asks for exists in what the hub and agents serve.
    let served = [
        paused_scrape,
        Scrape::get(&format!("{}/metrics", hub.url)),
        sites[2].scrape(),
    ];
    dashboard_queries_exist(&served);

    fleet_page(
        &hub,
        work.path(),
        &sites.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
    );
}

/// Each metric name in `deploy/grafana/outpost.json`'s queries is served by someone.
fn dashboard_queries_exist(served: &[Scrape]) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/outpost.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("outpost_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(names.len() > 20, "{names:?}");
    for name in names {
        assert!(
            served
                .iter()
                .any(|scrape| scrape.value(&name, &[]).is_some()),
            "the dashboard asks for {name}, which no scrape holds"
        );
    }
}

/// The fleet page in headless Chromium (Debian's `chromium`; `.ci/run` installs it): the DOM
/// its script builds, and a screenshot with healthy badges and rolled-back wave bars in it.
fn fleet_page(hub: &HubProcess, work: &Path, agents: &[String]) {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|name| Command::new(name).arg("--version").output().is_ok())
        .expect("headless Chromium is needed for the fleet page test: apt-get install chromium");
    // The page asks for a token; one in the fragment (never sent to the server) signs it in.
    let page = format!("{}/fleet#token={}", hub.url, hub.token);
    let browse = |extra: &[&str]| {
        let profile = tempfile::tempdir().unwrap();
        let profile = format!("--user-data-dir={}", profile.path().display());
        let mut args = vec![
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,900",
            "--virtual-time-budget=5000",
            &profile,
        ];
        args.extend(extra);
        args.push(&page);
        run(Path::new(chromium), &args, &[])
    };
    let dom = browse(&["--dump-dom"]);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page's script ran: {dom}"
    );
    for agent in agents {
        assert!(
            dom.contains(&format!("data-agent=\"{agent}\"")),
            "{agent} listed"
        );
    }
    assert!(
        dom.contains("data-rollout=\"1\" data-phase=\"succeeded\""),
        "{dom}"
    );
    assert!(
        dom.contains("data-rollout=\"2\" data-phase=\"rolled-back\""),
        "{dom}"
    );
    assert_eq!(dom.matches("data-health=\"Healthy\"").count(), agents.len());
    assert_eq!(dom.matches(">connected<").count(), agents.len(), "{dom}");

    let shot = match std::env::var_os("OUTPOST_KEEP_SCREENSHOT") {
        Some(path) => std::path::PathBuf::from(path),
        None => work.join("fleet.png"),
    };
    browse(&[&format!("--screenshot={}", shot.display())]);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1200, 900));
    let channels = frame.color_type.samples();
    let count = |rgb: [u8; 3]| {
        pixels[..frame.buffer_size()]
            .chunks(channels)
            .filter(|pixel| pixel[..3] == rgb)
            .count()
    };
    // Healthy badges (#1e8e3e) and the rolled-back rollout's restored wave segments (#80868b).
    assert!(count([0x1e, 0x8e, 0x3e]) > 200, "healthy badges drawn");
    assert!(count([0x80, 0x86, 0x8b]) > 500, "restored wave bars drawn");
}
