//! The Kubernetes API test server held against a client this project did not write: the real
//! `kubectl` (v1.32; on this project's machines, checked by scripts/setup.sh).

use std::path::Path;
use std::process::{Command, Output};

use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};

fn kubectl(kubeconfig: &Path, args: &[&str], input: Option<&str>) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| {
            panic!("cannot run kubectl ({error}): install kubectl v1.32 or later (https://kubernetes.io/releases/download/); scripts/setup.sh checks for it")
        });
    if let Some(input) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

/// A kubectl session against the test server: its own kubeconfig (no token: kubectl sends
/// none over plain http), each command run to completion.
struct Kubectl {
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

impl Kubectl {
    fn new(server: &KubeApiServer) -> Kubectl {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
        Kubectl {
            _dir: dir,
            kubeconfig,
        }
    }

    /// Runs kubectl; (exit code, stdout, stderr).
    fn run(&self, args: &[&str], input: Option<&str>) -> (i32, String, String) {
        let output = tokio::task::block_in_place(|| kubectl(&self.kubeconfig, args, input));
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Runs kubectl and expects success; stdout.
    fn ok(&self, args: &[&str], input: Option<&str>) -> String {
        let (code, out, err) = self.run(args, input);
        assert_eq!(code, 0, "kubectl {}: {out}{err}", args.join(" "));
        out
    }
}

fn deployment(replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: default\n  labels: {{app: web}}\nspec:\n  replicas: {replicas}\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: nginx:1\n"
    )
}

async fn server() -> KubeApiServer {
    KubeApiServer::start(ServerOptions {
        token: None,
        ..ServerOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_server_side_with_conflicts_and_force() {
    let server = server().await;
    let kubectl = Kubectl::new(&server);
    // With kubectl's default validation, which downloads the OpenAPI documents.
    let out = kubectl.ok(&["apply", "--server-side", "-f", "-"], Some(&deployment(1)));
    assert!(
        out.contains("deployment.apps/web serverside-applied"),
        "{out}"
    );
    let stored = server
        .object("apps/v1", "Deployment", "default", "web")
        .unwrap();
    assert!(
        stored["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .any(|entry| entry["manager"] == "kubectl" && entry["operation"] == "Apply"),
        "{stored}"
    );
    // Another field manager wants other replicas: a conflict naming kubectl and the field.
    let (code, out, err) = kubectl.run(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "ops",
            "-f",
            "-",
        ],
        Some(&deployment(3)),
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("conflict") && err.contains(".spec.replicas"),
        "{err}"
    );
    assert!(err.contains("\"kubectl\""), "names the owner: {err}");
    // Forced, it takes the field.
    kubectl.ok(
        &[
            "apply",
            "--server-side",
            "--field-manager",
            "ops",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&deployment(3)),
    );
    let stored = server
        .object("apps/v1", "Deployment", "default", "web")
        .unwrap();
    assert_eq!(stored["spec"]["replicas"], 3);
    // diff --server-side: a dry run, shown as a unified diff; exit 1 when something differs.
    let (code, out, err) = kubectl.run(
        &[
            "diff",
            "--server-side",
            "--field-manager",
            "ops",
            "--force-conflicts",
            "-f",
            "-",
        ],
        Some(&deployment(5)),
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("-  replicas: 3") && out.contains("+  replicas: 5"),
        "{out}"
    );
    assert_eq!(
        server
            .object("apps/v1", "Deployment", "default", "web")
            .unwrap()["spec"]["replicas"],
        3,
        "a diff changes nothing"
    );
    let (code, _, _) = kubectl.run(
        &["diff", "--server-side", "--field-manager", "ops", "-f", "-"],
        Some(&deployment(3)),
    );
    assert_eq!(code, 0, "no difference: exit 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_gets_tables_by_short_name_and_selector_and_deletes() {
    let server = server().await;
    let kubectl = Kubectl::new(&server);
    kubectl.ok(&["apply", "--server-side", "-f", "-"], Some(&deployment(2)));
    // (`kubectl create` sends built-in kinds as protobuf, which this server does not read.)
    kubectl.ok(
        &["apply", "--server-side", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: default}\ndata: {a: '1', b: '2'}\n"),
    );
    let table = kubectl.ok(&["get", "deploy"], None);
    let heading: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        heading,
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"],
        "{table}"
    );
    assert!(table.lines().nth(1).unwrap().starts_with("web"), "{table}");
    let configs = kubectl.ok(&["get", "cm", "settings"], None);
    let row: Vec<&str> = configs.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["settings", "2"], "the DATA column: {configs}");
    assert!(
        kubectl
            .ok(&["get", "deploy", "-l", "app=web"], None)
            .contains("web")
    );
    let (code, out, err) = kubectl.run(&["get", "deploy", "-l", "app=other"], None);
    assert_eq!(code, 0);
    assert!(
        !out.contains("web") && err.contains("No resources found"),
        "{out}{err}"
    );
    let labels = kubectl.ok(&["get", "deploy", "--show-labels"], None);
    assert!(labels.contains("app=web"), "{labels}");
    let json = kubectl.ok(&["get", "deployment", "web", "-o", "json"], None);
    let object: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(object["spec"]["replicas"], 2);
    let out = kubectl.ok(&["delete", "deploy", "web"], None);
    assert!(out.contains("deployment.apps \"web\" deleted"), "{out}");
    let (code, _, err) = kubectl.run(&["get", "deploy", "web"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("NotFound") && err.contains("\"web\" not found"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_a_crd_and_its_resources() {
    let server = server().await;
    let kubectl = Kubectl::new(&server);
    let crd = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.com\nspec:\n  group: example.com\n  scope: Namespaced\n  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}\n";
    kubectl.ok(&["apply", "--server-side", "-f", "-"], Some(crd));
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: blue\n  namespace: default\n  labels: {colour: blue}\nspec: {size: 3}\n";
    // The CRD is served once established (discovery is read again by every kubectl run).
    let mut applied = None;
    for _ in 0..50 {
        let (code, out, err) = kubectl.run(&["apply", "--server-side", "-f", "-"], Some(widget));
        if code == 0 {
            applied = Some(out);
            break;
        }
        assert!(
            err.contains("no matches for kind") || err.contains("resource mapping"),
            "{err}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let applied = applied.expect("the Widget applies once the CRD is established");
    assert!(
        applied.contains("widget.example.com/blue serverside-applied"),
        "{applied}"
    );
    let table = kubectl.ok(&["get", "wd", "-l", "colour=blue"], None);
    assert!(
        table.starts_with("NAME") && table.contains("blue"),
        "{table}"
    );
    let crds = kubectl.ok(&["get", "crd"], None);
    assert!(crds.contains("widgets.example.com"), "{crds}");
    kubectl.ok(&["delete", "crd", "widgets.example.com"], None);
    assert!(
        server
            .object("example.com/v1", "Widget", "default", "blue")
            .is_none(),
        "its resources go with it"
    );
    let (code, _, err) = kubectl.run(&["get", "widgets"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("could not find the requested resource")
            || err.contains("doesn't have a resource type"),
        "{err}"
    );
}
