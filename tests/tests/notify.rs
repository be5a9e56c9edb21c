//! Notifications from a real `outpost-hub run` to HTTP receivers this test runs: a rollout
//! paused and a release refused reach a signed JSON webhook (valid HMAC-SHA256), a Slack
//! webhook and Alertmanager's API — also when the receivers were down when the events
//! happened: nothing is lost, nothing is sent twice, the order holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::routing::post;
use hmac::{KeyInit as _, Mac as _};
use outpost_e2e::processes::{HubProcess, free_port, git, git_init, wait_for};
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
