//! The install artifacts in `deploy/kubernetes/` as an operator uses them: each overlay is
//! rendered by the real `kubectl kustomize`, read by the project's own manifest reader (what
//! bundles go through), and applied to the Kubernetes API test server; then what matters is
//! checked — probes on the paths the binaries serve, the ports, the volumes, the hashed config
//! name the pods mount, and that the config inside is one the hub (or agent) accepts.

use std::path::Path;
use std::process::Command;

use outpost_agent::target::ClusterTarget;
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use serde_json::Value;

/// `kubectl kustomize deploy/kubernetes/<overlay>`; fails saying what to install without kubectl.
fn render(overlay: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(overlay);
    let output = Command::new("kubectl")
        .args(["kustomize", &dir.display().to_string()])
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run kubectl ({error}): these tests render the install manifests with \
                 the real `kubectl kustomize`; install kubectl (v1.32 or later, with kustomize \
                 v5) from https://kubernetes.io/releases/download/ — `.ci/run` checks for it"
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Renders `overlay`, reads it as a bundle would be read, applies every object; returns them.
async fn install(overlay: &str, server: &KubeApiServer) -> Vec<Value> {
    let text = render(overlay);
    let path = format!("kubectl kustomize {overlay}");
    let body = outpost_proto::Body::render(&[outpost_proto::SourceFile {
        path: &path,
        text: &text,
    }])
    .unwrap_or_else(|error| panic!("the manifest reader refuses {overlay}: {error}"));
    let target = server.target().await;
    let mut objects = Vec::new();
    for object in body.objects() {
        let object = object.unwrap();
        target
            .apply(&object, "install-test", false, false)
            .await
            .unwrap_or_else(|error| panic!("{overlay}: {error}: {object}"));
        objects.push(object);
    }
    objects
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|container| container["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {workload}"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|entry| entry["name"] == name)
}

/// The hub's ConfigMap as mounted by the StatefulSet (the generated, hashed name), parsed by
/// the hub's own config reader.
fn hub_config(server: &KubeApiServer, hub: &Value) -> outpost_hub::config::Config {
    let volume = hub["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|volume| volume["name"] == "config")
        .unwrap();
    let name = volume["configMap"]["name"].as_str().unwrap();
    assert!(
        name.starts_with("outpost-hub-config-") && name.len() > "outpost-hub-config-".len(),
        "the config's name carries its hash, so a change rolls the pods: {name}"
    );
    let map = server
        .object("v1", "ConfigMap", "outpost-system", name)
        .unwrap_or_else(|| panic!("the StatefulSet mounts {name}, which was not applied"));
    let text = map["data"]["hub.toml"].as_str().unwrap();
    // The TLS Secret's mount, as the pod would have it (the config checks the files exist).
    let mounted = tempfile::tempdir().unwrap();
    for file in ["tls.crt", "tls.key"] {
        std::fs::write(mounted.path().join(file), "").unwrap();
    }
    assert!(text.contains("\"/etc/outpost-hub/tls/"), "{text}");
    let text = &text.replace(
        "\"/etc/outpost-hub/tls/",
        &format!("\"{}/", mounted.path().display()),
    );
    outpost_hub::config::Config::parse(text, |name| {
        (name == "OUTPOST_DB_PASSWORD").then(|| "from-the-secret".to_owned())
    })
    .unwrap_or_else(|error| panic!("the shipped hub.toml is refused: {error}\n{text}"))
}

fn check_hub_workload(hub: &Value) {
    let container = container(hub, "hub");
    for (probe, path) in [
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/live"),
        ("startupProbe", "/live"),
    ] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "admin", "{probe}");
        assert_eq!(container[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    let ports = container["ports"].as_array().unwrap();
    assert!(ports.iter().any(|port| port["name"] == "admin"
        && port["containerPort"] == 7070
        && port["protocol"] == "TCP"));
    assert!(ports.iter().any(|port| port["name"] == "agents"
        && port["containerPort"] == 7443
        && port["protocol"] == "UDP"));
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mounted = |path: &str| mounts.iter().any(|mount| mount["mountPath"] == path);
    for path in [
        "/var/lib/outpost-hub",
        "/etc/outpost-hub/hub.toml",
        "/etc/outpost-hub/keys",
        "/etc/outpost-hub/tls",
    ] {
        assert!(mounted(path), "{path} is not mounted: {mounts:?}");
    }
    assert_eq!(
        hub["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        "data"
    );
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config", "/etc/outpost-hub/hub.toml"])
    );
}

fn check_hub_services(server: &KubeApiServer) {
    let admin = server
        .object("v1", "Service", "outpost-system", "outpost-hub")
        .unwrap();
    assert_eq!(admin["spec"]["ports"][0]["port"], 7070);
    assert_eq!(admin["spec"]["ports"][0]["protocol"], "TCP");
    let agents = server
        .object("v1", "Service", "outpost-system", "outpost-hub-agents")
        .unwrap();
    assert_eq!(agents["spec"]["ports"][0]["port"], 7443);
    assert_eq!(agents["spec"]["ports"][0]["protocol"], "UDP");
    assert_eq!(agents["spec"]["type"], "LoadBalancer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_hub_installs_with_probes_ports_and_a_config_it_accepts() {
    let server = KubeApiServer::start(ServerOptions::default()).await;
    let objects = install("hub/overlays/single", &server).await;
    assert!(
        objects
            .iter()
            .all(|object| object["metadata"]["labels"]["app.kubernetes.io/part-of"] == "outpost"),
        "every object says what it is part of"
    );
    let hub = server
        .object("apps/v1", "StatefulSet", "outpost-system", "outpost-hub")
        .expect("the hub's StatefulSet");
    assert_eq!(hub["spec"]["replicas"], 1, "SQLite has one writer");
    check_hub_workload(&hub);
    check_hub_services(&server);
    let config = hub_config(&server, &hub);
    assert_eq!(
        config.store,
        outpost_hub::config::StoreConfig::Sqlite,
        "the single hub runs on SQLite"
    );
    assert_eq!(config.sources.len(), 1);
    assert!(
        server
            .object("v1", "Namespace", "", "outpost-system")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_overlay_runs_replicas_with_the_password_from_a_secret() {
    let server = KubeApiServer::start(ServerOptions::default()).await;
    install("hub/overlays/postgres", &server).await;
    let hub = server
        .object("apps/v1", "StatefulSet", "outpost-system", "outpost-hub")
        .unwrap();
    assert_eq!(hub["spec"]["replicas"], 2);
    check_hub_workload(&hub);
    check_hub_services(&server);
    let container = container(&hub, "hub");
    let password = env_value(container, "OUTPOST_DB_PASSWORD").expect("the password variable");
    assert_eq!(
        password["valueFrom"]["secretKeyRef"]["name"],
        "outpost-hub-postgres"
    );
    assert!(
        env_value(container, "OUTPOST_LOG_FORMAT").is_some(),
        "the overlay's env merges with the base's"
    );
    match hub_config(&server, &hub).store {
        outpost_hub::config::StoreConfig::Postgres { url, password, .. } => {
            assert!(url.starts_with("postgres://"), "{url}");
            assert!(
                !url.contains("from-the-secret"),
                "the password is not in the URL"
            );
            assert!(password.is_some(), "the password comes from the variable");
        }
        other => panic!("the postgres overlay runs on {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_cluster_agent_installs_with_probes_on_its_metrics_listener() {
    let server = KubeApiServer::start(ServerOptions::default()).await;
    install("agent/overlays/default", &server).await;
    let agent = server
        .object("apps/v1", "Deployment", "outpost-system", "outpost-agent")
        .unwrap();
    assert_eq!(
        agent["spec"]["template"]["spec"]["serviceAccountName"],
        "outpost-agent"
    );
    assert_eq!(agent["spec"]["strategy"]["type"], "Recreate");
    let container = container(&agent, "agent");
    assert_eq!(
        container["image"], "registry.example.com/outpost/agent:0.1.0",
        "the overlay names the image"
    );
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    // The agent's own config reader accepts the environment the manifest gives it.
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|entry| {
            Some((
                entry["name"].as_str()?.to_owned(),
                entry["value"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let lookup = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let config = outpost_agent::config::AgentConfig::load(None, &lookup).unwrap();
    assert_eq!(
        config.metrics_address,
        Some("0.0.0.0:9464".parse().unwrap())
    );
    assert_eq!(
        config.cluster,
        outpost_agent::config::ClusterChoice::Kubernetes(
            outpost_agent::target::kubernetes::ClusterSource::InCluster
        )
    );
    assert!(
        server
            .object(
                "rbac.authorization.k8s.io/v1",
                "ClusterRoleBinding",
                "",
                "outpost-agent"
            )
            .is_some()
    );
}
