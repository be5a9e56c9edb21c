//! Notifications from a real `outpost-hub run` to HTTP receivers this test runs: a rollout
//! paused and a release refused reach a signed JSON webhook (valid HMAC-SHA256), a Slack
//! webhook and Alertmanager's API — also when the receivers were down when the events
//! happened: nothing is lost, nothing is sent twice, the order holds. And drift: an agent
//! process finds an edit made by another field manager, leaves it (`drift: report`), and the
//! hub shows it (CLI, fleet API, metrics) and sends it to a webhook.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::routing::post;
use hmac::{KeyInit as _, Mac as _};
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::processes::{
    HubProcess, Scrape, binary, free_port, git, git_init, run_agent_with, shop_value, wait_for,
};
use serde_json::Value;

const SECRET: &str = "webhook-secret-for-tests";

#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Received>>>;

async fn record(State(log): State<Log>, uri: Uri, headers: HeaderMap, body: Bytes) -> &'static str {
    log.lock().unwrap().push(Received {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    "ok"
}

fn config_map(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shop\n  namespace: default\ndata:\n  value: \"{value}\"\n"
    )
}

#[test]
fn events_reach_webhook_slack_and_alertmanager_after_the_receivers_come_back() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::write(repo.join("shop/app.yaml"), config_map("1")).unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "v1"]);
    git(&repo, &["tag", "v1"]);
    let secret_file = work.path().join("notify.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    // The receivers' port: nothing listens there yet.
    let port = free_port(false);
    let extra = format!(
        "[[notify]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = \"{}\"\n\n[[notify]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"http://127.0.0.1:{port}/slack\"\nevents = [\"rollout-paused\"]\n\n[[notify]]\nname = \"am\"\nkind = \"alertmanager\"\nurl = \"http://127.0.0.1:{port}/am\"\n",
        secret_file.display()
    );
    let hub = HubProcess::start_with(work.path(), &repo, "main", &extra);

    // While the receivers are down: a rollout is paused by its operator, and a commit does not
    // render (invalid YAML): a refused release.
    let created = hub.cli(&["rollout", "create", "--bundle", "shop", "--tag", "v1"]);
    assert!(created.contains("rollout 1 created"), "{created}");
    hub.cli(&["rollout", "pause", "1", "--why", "change freeze"]);
    std::fs::write(repo.join("shop/app.yaml"), "kind: [broken").unwrap();
    git(&repo, &["commit", "-qam", "broken"]);
    hub.cli(&["fetch-now"]);
    wait_for("the refused release in the event log", 30, || {
        hub.cli(&["events"]).contains("release-refused")
    });
    std::thread::sleep(Duration::from_secs(3));

    // The receivers come up.
    let log: Log = Arc::default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = Router::new()
        .route("/hook", post(record))
        .route("/slack", post(record))
        .route("/am/api/v2/alerts", post(record))
        .with_state(log.clone());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .unwrap();
    runtime.spawn(async move { axum::serve(listener, app).await });
    let at = |path: &str| -> Vec<Received> {
        log.lock()
            .unwrap()
            .iter()
            .filter(|received| received.path == path)
            .cloned()
            .collect()
    };
    wait_for(
        "both events at the webhook, the pause at Slack and both at Alertmanager",
        60,
        || at("/hook").len() >= 2 && !at("/slack").is_empty() && at("/am/api/v2/alerts").len() >= 2,
    );
    // Let any duplicate arrive before counting.
    std::thread::sleep(Duration::from_secs(3));

    let hooks = at("/hook");
    let bodies: Vec<Value> = hooks
        .iter()
        .map(|received| serde_json::from_slice(&received.body).unwrap())
        .collect();
    let kinds: Vec<&str> = bodies
        .iter()
        .map(|body| body["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["rollout-paused", "release-refused"],
        "in order, once each: {bodies:?}"
    );
    assert!(
        bodies[0]["message"]
            .as_str()
            .unwrap()
            .contains("change freeze")
    );
    assert!(
        bodies[1]["subject"]
            .as_str()
            .unwrap()
            .contains("shop at refs/heads/main")
    );
    let ids: Vec<i64> = bodies
        .iter()
        .map(|body| body["id"].as_i64().unwrap())
        .collect();
    assert!(ids[0] < ids[1]);
    for received in &hooks {
        let signature = received.headers["x-outpost-signature"].to_str().unwrap();
        let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(&received.body);
        assert_eq!(
            signature,
            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
            "a valid HMAC of the body"
        );
        assert!(received.headers.contains_key("x-outpost-delivery"));
    }
    let slack = at("/slack");
    assert_eq!(slack.len(), 1, "Slack takes only what it asked for");
    let text: Value = serde_json::from_slice(&slack[0].body).unwrap();
    assert!(
        text["text"].as_str().unwrap().contains("rollout-paused"),
        "{text}"
    );
    let alerts: Vec<Value> = at("/am/api/v2/alerts")
        .iter()
        .map(|received| serde_json::from_slice(&received.body).unwrap())
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0][0]["labels"]["alertname"], "OutpostRolloutPaused");
    assert_eq!(alerts[1][0]["labels"]["alertname"], "OutpostReleaseRefused");
}

/// An agent process against the API test server, a hub process with a webhook receiver: an
/// edit by `kubectl-edit` to a bundle declared `drift: report` is left in place and reported,
/// with its path, values and manager, to `outpost-hub drift`, the fleet API, the metrics and
/// the webhook (signed); reverting it reports the drift gone.
#[test]
fn drift_from_an_agent_process_reaches_the_cli_the_fleet_page_metrics_and_a_webhook() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::write(repo.join("shop/app.yaml"), config_map("1")).unwrap();
    std::fs::write(
        repo.join("outpost.yaml"),
        "bundles:\n- name: shop\n  path: shop\n  drift: report\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "v1"]);
    let secret_file = work.path().join("notify.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let log: Log = Arc::default();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = Router::new()
        .route("/hook", post(record))
        .with_state(log.clone());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move { axum::serve(listener, app).await });
    let extra = format!(
        "[[notify]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_file = \"{}\"\n",
        secret_file.display()
    );
    let hub = HubProcess::start_with(work.path(), &repo, "main", &extra);
    let agent_bin = binary("outpost-agent");
    let state = work.path().join("agent");
    let id = hub.enrol(&agent_bin, &state, &["role=store"]);
    let cluster = runtime.block_on(KubeApiServer::start(ServerOptions::default()));
    let kubeconfig = cluster.write_kubeconfig(work.path().join("kubeconfig"));
    let _agent = run_agent_with(
        &agent_bin,
        &state,
        &kubeconfig,
        &[("OUTPOST_AGENT_DRIFT_SECONDS", "1".to_owned())],
    );
    let value = || shop_value(&cluster);
    wait_for("the agent to apply its bundle", 60, || {
        value().as_deref() == Some("1")
    });
    let edit = |to: &str| {
        let client = runtime.block_on(cluster.client());
        let resource = kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("", "v1", "ConfigMap"),
            "configmaps",
        );
        let api: kube::Api<kube::core::DynamicObject> =
            kube::Api::namespaced_with(client, "default", &resource);
        runtime
            .block_on(api.patch(
                "shop",
                &kube::api::PatchParams {
                    field_manager: Some("kubectl-edit".into()),
                    ..Default::default()
                },
                &kube::api::Patch::Merge(serde_json::json!({"data": {"value": to}})),
            ))
            .unwrap();
    };
    edit("hand-edited");

    let drift = || -> Value {
        serde_json::from_str(&hub.cli(&["drift", "--agent", &id, "-o", "json"])).unwrap()
    };
    wait_for("the drift at the hub", 60, || {
        drift()
            .as_array()
            .is_some_and(|reports| !reports.is_empty())
    });
    let reports = drift();
    assert_eq!(reports.as_array().unwrap().len(), 1, "{reports}");
    let report = &reports[0];
    assert_eq!(
        (report["bundle"].as_str(), report["action"].as_str()),
        (Some("shop"), Some("left"))
    );
    let field = &report["findings"][0]["fields"][0];
    assert_eq!(field["path"], "data.value");
    assert_eq!(field["desired"], "\"1\"");
    assert_eq!(field["live"], "\"hand-edited\"");
    assert_eq!(field["manager"], "kubectl-edit");
    let table = hub.cli(&["drift", "--bundle", "shop", "--since", "1h"]);
    assert!(
        table.contains("ConfigMap default/shop")
            && table.contains("data.value")
            && table.contains("kubectl-edit"),
        "{table}"
    );
    // Left in place, through many drift passes; the device says so too.
    let status = outpost_e2e::processes::run(
        &agent_bin,
        &["status", "--output", "json"],
        &[("OUTPOST_AGENT_STATE_DIR", state.display().to_string())],
    );
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["bundles"][0]["drift_left"], true, "{status}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(value().as_deref(), Some("hand-edited"));
    assert_eq!(drift().as_array().unwrap().len(), 1, "reported once");
    // The fleet page's data and the metrics.
    let fleet = hub.get("/api/v1/fleet");
    assert_eq!(
        fleet["agents"][0]["bundles"][0]["drift"]["left_objects"], 1,
        "{fleet}"
    );
    assert_eq!(hub.get("/api/v1/fleet/summary")["drifted"], 1);
    let scrape = Scrape::get(&format!("{}/metrics", hub.url));
    assert_eq!(scrape.must("outpost_hub_agents_drifted", &[]), 1.0);
    assert_eq!(
        scrape.must(
            "outpost_hub_drift_objects_total",
            &[("bundle", "shop"), ("action", "left")]
        ),
        1.0
    );

    // Reverted by hand: the drift is reported gone.
    edit("1");
    wait_for("the drift gone", 60, || {
        drift().as_array().is_some_and(|reports| {
            reports.len() == 2 && reports[0]["findings"].as_array().is_some_and(Vec::is_empty)
        })
    });
    assert_eq!(hub.get("/api/v1/fleet/summary")["drifted"], 0);
    wait_for("the drift at the webhook", 60, || {
        log.lock().unwrap().iter().any(|received| {
            serde_json::from_slice::<Value>(&received.body)
                .is_ok_and(|body| body["kind"] == "drift-found")
        })
    });
    let found = log
        .lock()
        .unwrap()
        .iter()
        .find(|received| {
            serde_json::from_slice::<Value>(&received.body)
                .is_ok_and(|body| body["kind"] == "drift-found")
        })
        .cloned()
        .unwrap();
    let body: Value = serde_json::from_slice(&found.body).unwrap();
    assert_eq!(body["subject"].as_str(), Some(id.as_str()));
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("data.value by kubectl-edit"),
        "{body}"
    );
    let mut mac = <hmac::Hmac<sha2::Sha256>>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&found.body);
    assert_eq!(
        found.headers["x-outpost-signature"].to_str().unwrap(),
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
}
