//! Edge agent figures (docs/benchmarks.md):
//!
//! 1. Time to reconcile 1,000 objects (10 namespaces × 50 ConfigMaps, 25 Services,
//!    25 Deployments) against the Kubernetes API test server through kube-rs: the agent's first
//!    pass (creates, inventory, health) and a drift pass (nothing changed), side by side with the
//!    baseline of the same target's bare apply calls in a loop (no inventory, no health).
//! 2. Idle RSS of a release `outpost-agent run` process holding and enforcing 3 bundles, and
//!    the stripped size of its binary (built here with `cargo build --release -p outpost-agent`).
//!
//! `cargo bench -p outpost-e2e --bench agent` (all), or with `-- reconcile` / `-- footprint`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_agent::target::ClusterTarget;
use outpost_agent::{ReconcileOptions, Reconciler};
use outpost_e2e::harness::{TestAgent, TestHub, quick_options, test_service_options};
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{Process, enrol_agent, run, wait_for};
use outpost_proto::transport::Tuning;
use outpost_proto::wire::Phase;

fn thousand_objects() -> String {
    let mut yaml = String::new();
    for ns in 0..10 {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: store-{ns}}}\n"
        ));
        for i in 0..50 {
            yaml.push_str(&format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: config-{i}, namespace: store-{ns}, labels: {{app: pos}}}}\ndata: {{price-list: \"{}\", region: eu}}\n", i * 7 + ns));
        }
        for i in 0..25 {
            yaml.push_str(&format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: store-{ns}}}\nspec: {{selector: {{app: app-{i}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"));
            yaml.push_str(&format!("---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: app-{i}, namespace: store-{ns}}}\nspec: {{replicas: 1, selector: {{matchLabels: {{app: app-{i}}}}}, template: {{metadata: {{labels: {{app: app-{i}}}}}, spec: {{containers: [{{name: app, image: \"registry.example/app:{i}\", ports: [{{containerPort: 8080}}]}}]}}}}}}\n"));
        }
    }
    yaml
}

async fn reconcile_figures() {
    let yaml = thousand_objects();
    let objects: Vec<serde_json::Value> =
        outpost_proto::Body::render(&[outpost_proto::SourceFile {
            path: "bench.yaml",
            text: &yaml,
        }])
        .expect("render")
        .objects()
        .collect::<Result<_, _>>()
        .expect("objects");
    println!(
        "## Reconciling {} objects against the Kubernetes API test server (kube-rs over HTTP/1.1 on loopback)\n",
        objects.len()
    );
    println!("| run | seconds | objects/s | ratio to baseline |\n|---|---:|---:|---:|");

    // Baseline: the same target's apply in a bare loop.
    let server = KubeApiServer::start(ServerOptions::default()).await;
    let target = server.target().await;
    let started = Instant::now();
    for object in &objects {
        target
            .apply(object, "baseline", true, false)
            .await
            .expect("apply");
    }
    let baseline = started.elapsed();
    let row = |name: &str, took: Duration| {
        println!(
            "| {name} | {:.2} | {:.0} | {:.2}× |",
            took.as_secs_f64(),
            objects.len() as f64 / took.as_secs_f64(),
            took.as_secs_f64() / baseline.as_secs_f64()
        );
    };
    row("baseline: bare server-side apply loop", baseline);

    // The agent: a snapshot held, then passes of the reconcile loop.
    let hub = TestHub::start(test_service_options(), &Tuning::default()).await;
    let dir = tempfile::tempdir().expect("dir");
    let (agent, id) = TestAgent::enrolled(
        &dir.path().join("agent"),
        &hub,
        hub.address,
        quick_options(5),
    )
    .await;
    let published = hub.publish("stores", &yaml);
    hub.assign(&id, "stores", published);
    agent.holds(published).await;
    let server = KubeApiServer::start(ServerOptions::default()).await;
    let options = ReconcileOptions {
        drift_interval: Duration::ZERO,
        ..ReconcileOptions::default()
    };
    let mut reconciler = Reconciler::new(agent.client.clone(), server.target().await, options);
    let started = Instant::now();
    reconciler.pass().await.expect("pass");
    let first = started.elapsed();
    let status = agent.last_status("stores").await.expect("status");
    assert_eq!(
        (status.phase, status.objects_ready),
        (Phase::Healthy, objects.len() as u64),
        "{}",
        status.message
    );
    row("agent: first pass (create, inventory, health)", first);
    let writes = server.writes();
    let started = Instant::now();
    reconciler.pass().await.expect("pass");
    let drift = started.elapsed();
    row("agent: drift pass (nothing changed)", drift);
    assert_eq!(
        server.writes(),
        writes,
        "an unchanged re-apply writes nothing"
    );
    println!(
        "\nRequests the agent sent: {} for the first pass and the drift pass together.\n",
        server.requests()
    );
}

fn footprint_figures() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    eprintln!("building the release agent (fat LTO; takes a few minutes on 2 cores)...");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--locked", "-p", "outpost-agent"])
        .current_dir(&root)
        .status()
        .expect("run cargo");
    assert!(status.success(), "cargo build --release failed");
    let binary = root.join("target/release/outpost-agent");
    let size = std::fs::metadata(&binary).expect("binary").len();
    println!("## Agent footprint\n");
    println!("| figure | value | target |\n|---|---:|---:|");
    println!(
        "| stripped release binary (x86_64, fat LTO, panic=abort) | {:.1} MB | < 15 MB |",
        size as f64 / 1e6
    );

    let small: Vec<(&str, String)> = vec![
        ("pos", outpost_e2e::harness::bulky_manifests(20, 2_000, 1)),
        (
            "telemetry",
            outpost_e2e::harness::bulky_manifests(10, 1_000, 2),
        ),
        ("kiosk", outpost_e2e::harness::bulky_manifests(10, 1_000, 3)),
    ];
    let (rss, hwm) = idle_rss(&binary, &small);
    println!(
        "| idle RSS, 3 bundles (40 objects) held and enforced, 10 s after healthy | {rss:.1} MB | < 20 MB |"
    );
    println!("| peak RSS (VmHWM) of that run | {hwm:.1} MB | — |");
    let large: Vec<(&str, String)> = vec![
        ("stores", thousand_objects()),
        ("pos", outpost_e2e::harness::bulky_manifests(10, 2_000, 1)),
        (
            "telemetry",
            outpost_e2e::harness::bulky_manifests(10, 1_000, 2),
        ),
    ];
    let (rss, hwm) = idle_rss(&binary, &large);
    println!(
        "| idle RSS, 3 bundles (1,030 objects) held and enforced, 10 s after healthy | {rss:.1} MB | — |"
    );
    println!("| peak RSS (VmHWM) of that run | {hwm:.1} MB | — |");
}

/// Runs the release agent against an in-process hub and API test server with `bundles`
/// assigned; returns (VmRSS, VmHWM) in MB once it has been idle and healthy for 10 s.
fn idle_rss(binary: &std::path::Path, bundles: &[(&str, String)]) -> (f64, f64) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let hub = runtime.block_on(TestHub::start(test_service_options(), &Tuning::default()));
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let work = tempfile::tempdir().expect("dir");
    let kubeconfig = cluster.write_kubeconfig(work.path().join("kubeconfig"));
    let state = work.path().join("agent").display().to_string();
    let env = [("OUTPOST_AGENT_STATE_DIR", state.clone())];
    let id = enrol_agent(binary, &hub, work.path(), &state);
    for (name, text) in bundles {
        let published = hub.publish(name, text);
        hub.assign(&id, name, published);
    }
    let agent = Process(
        Command::new(binary)
            .args(["run", "--kubeconfig", kubeconfig.to_str().expect("path")])
            .env("OUTPOST_AGENT_STATE_DIR", &state)
            .env("OUTPOST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("agent"),
    );
    wait_for("healthy bundles", 300, || {
        let status: serde_json::Value =
            serde_json::from_str(&run(binary, &["status", "--output", "json"], &env))
                .expect("json");
        status["bundles"]
            .as_array()
            .is_some_and(|b| b.len() == bundles.len() && b.iter().all(|b| b["phase"] == "Healthy"))
    });
    std::thread::sleep(Duration::from_secs(10));
    let proc_status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.0.id())).expect("proc");
    let field = |name: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    let figures = (field("VmRSS:"), field("VmHWM:"));
    drop(agent);
    drop(runtime);
    figures
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    if filter.is_empty() || "reconcile".contains(filter.as_str()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(reconcile_figures());
        println!();
    }
    if filter.is_empty() || "footprint".contains(filter.as_str()) {
        footprint_figures();
    }
}
