//! Kustomize bundles against real Git repositories and the real `kubectl kustomize` (on this
//! project's machines; see scripts/setup.sh): a base and overlays with a configMapGenerator
//! (hashed names) and patches render to the same objects as `kubectl kustomize` on the same
//! tree; the render is cached by tree; a remote base, an exec plugin or a broken kustomization
//! refuses that release only, with kustomize's message.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use outpost_hub::git::GitSource;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::store::{SqliteStore, Store};
use outpost_hub::sync::sync_source;
use outpost_proto::{Body, SourceFile};
use serde_json::Value;
use support::{Upstream, config_map};

fn kubectl_kustomize(dir: &std::path::Path) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|error| {
            panic!("cannot run kubectl ({error}): install kubectl v1.32 or later (it bundles kustomize v5); scripts/setup.sh checks for it")
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Objects by (kind, namespace, name) → the object, from a rendered body.
fn objects(body: &[u8]) -> BTreeMap<(String, String, String), Value> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .map(|object| {
            let key = (
                object["kind"].as_str().unwrap_or_default().to_owned(),
                object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            (key, object)
        })
        .collect()
}

fn layered_repository() -> Upstream {
    let upstream = Upstream::new();
    upstream.write(
        "outpost.yaml",
        "bundles:\n  - name: shop-prod\n    path: shop/overlays/prod\n  - name: shop-dev\n    path: shop/overlays/dev\n  - name: plain\n    path: plain\n",
    );
    upstream.write(
        "shop/base/kustomization.yaml",
        "resources:\n- deployment.yaml\n- service.yaml\nconfigMapGenerator:\n- name: shop-settings\n  literals:\n  - currency=EUR\n  - locale=de\n",
    );
    upstream.write(
        "shop/base/deployment.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\nspec:\n  replicas: 1\n  selector:\n    matchLabels: {app: shop}\n  template:\n    metadata:\n      labels: {app: shop}\n    spec:\n      containers:\n      - name: shop\n        image: registry.example/shop:1\n        envFrom:\n        - configMapRef: {name: shop-settings}\n",
    );
    upstream.write(
        "shop/base/service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: shop\nspec:\n  selector: {app: shop}\n  ports:\n  - port: 80\n",
    );
    upstream.write(
        "shop/overlays/prod/kustomization.yaml",
        "namespace: shop-prod\nresources:\n- ../../base\n- namespace.yaml\nimages:\n- name: registry.example/shop\n  newTag: \"2\"\npatches:\n- path: replicas.yaml\nconfigMapGenerator:\n- name: shop-settings\n  behavior: merge\n  literals:\n  - locale=fr\n",
    );
    upstream.write(
        "shop/overlays/prod/namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop-prod\n",
    );
    upstream.write(
        "shop/overlays/prod/replicas.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\nspec:\n  replicas: 3\n",
    );
    upstream.write(
        "shop/overlays/dev/kustomization.yaml",
        "namespace: shop-dev\nnamePrefix: dev-\nresources:\n- ../../base\n",
    );
    upstream.write("plain/app.yaml", &config_map("plain", "1"));
    upstream.commit("first");
    upstream
}

struct Hub {
    data: tempfile::TempDir,
    keys: HubKeys,
    store: SqliteStore,
}

impl Hub {
    fn new() -> Hub {
        let data = tempfile::tempdir().unwrap();
        let keys = HubKeys::create(
            &data.path().join("keys"),
            KeyPolicy::default(),
            1_800_000_000,
        )
        .unwrap();
        let store = SqliteStore::open(&data.path().join("hub.db")).unwrap();
        Hub { data, keys, store }
    }

    fn sync(&self, url: &str, now: i64) -> outpost_hub::sync::SyncReport {
        let source = GitSource::open_or_init(url, &self.data.path().join("mirror")).unwrap();
        sync_source(&self.store, &self.keys, &source, now).unwrap()
    }

    fn body(&self, bundle: &str) -> Vec<u8> {
        let release = self
            .store
            .releases()
            .unwrap()
            .into_iter()
            .find(|release| release.bundle == bundle && release.git_ref == "refs/heads/main")
            .unwrap_or_else(|| panic!("no release of {bundle}"));
        let generation = release
            .generation
            .unwrap_or_else(|| panic!("{bundle} was refused: {:?}", release.error));
        self.store
            .snapshot(bundle, generation)
            .unwrap()
            .unwrap()
            .body
    }

    fn refusal(&self, bundle: &str) -> String {
        self.store
            .releases()
            .unwrap()
            .into_iter()
            .find(|release| release.bundle == bundle && release.git_ref == "refs/heads/main")
            .and_then(|release| release.error)
            .unwrap_or_else(|| panic!("{bundle} was not refused"))
    }
}

#[test]
fn a_kustomize_repository_renders_the_objects_kubectl_kustomize_makes() {
    let upstream = layered_repository();
    let hub = Hub::new();
    let report = hub.sync(&upstream.url(), 1_800_000_100);
    assert!(report.failed.is_empty(), "{report:?}");
    for (bundle, folder) in [
        ("shop-prod", "shop/overlays/prod"),
        ("shop-dev", "shop/overlays/dev"),
    ] {
        let ours = objects(&hub.body(bundle));
        let text = kubectl_kustomize(&upstream.path().join(folder));
        let theirs = Body::render(&[SourceFile {
            path: "kubectl",
            text: &text,
        }])
        .unwrap();
        assert_eq!(ours, objects(theirs.as_bytes()), "{bundle}");
    }
    let prod = objects(&hub.body("shop-prod"));
    // The generator's hashed name, referenced by the Deployment; the merge and the patch.
    let settings = prod
        .iter()
        .find(|((kind, _, name), _)| kind == "ConfigMap" && name.starts_with("shop-settings-"))
        .map(|(_, object)| object.clone())
        .expect("the generated ConfigMap with its hash suffix");
    assert_eq!(settings["data"]["locale"], "fr");
    assert_eq!(settings["data"]["currency"], "EUR");
    let deployment = &prod[&(
        "Deployment".to_owned(),
        "shop-prod".to_owned(),
        "shop".to_owned(),
    )];
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"],
        settings["metadata"]["name"]
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/shop:2"
    );
    let dev = objects(&hub.body("shop-dev"));
    assert!(dev.contains_key(&(
        "Deployment".to_owned(),
        "shop-dev".to_owned(),
        "dev-shop".to_owned()
    )));

    // Nothing changed: nothing is built again. A change to the base (outside the bundle's own
    // folder) renders both again.
    let again = hub.sync(&upstream.url(), 1_800_000_200);
    assert!(again.rendered.is_empty(), "{again:?}");
    upstream.write(
        "shop/base/service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: shop\nspec:\n  selector: {app: shop}\n  ports:\n  - port: 8080\n",
    );
    upstream.commit("port");
    let moved = hub.sync(&upstream.url(), 1_800_000_300);
    let rendered: Vec<&str> = moved
        .rendered
        .iter()
        .map(|(bundle, _, _)| bundle.as_str())
        .collect();
    assert!(
        rendered.contains(&"shop-prod") && rendered.contains(&"shop-dev"),
        "{moved:?}"
    );
}

#[test]
fn remote_bases_exec_plugins_and_broken_kustomizations_refuse_only_their_release() {
    let upstream = Upstream::new();
    upstream.write(
        "outpost.yaml",
        "bundles:\n  - name: remote\n    path: remote\n  - name: plugin\n    path: plugin\n  - name: broken\n    path: broken\n  - name: escape\n    path: escape\n  - name: plain\n    path: plain\n",
    );
    upstream.write(
        "remote/kustomization.yaml",
        "resources:\n- github.com/kubernetes-sigs/kustomize//examples/helloWorld?ref=v3.3.1\n",
    );
    upstream.write("plugin/kustomization.yaml", "generators:\n- gen.yaml\n");
    upstream.write(
        "plugin/gen.yaml",
        "apiVersion: example.com/v1\nkind: Inflator\nmetadata:\n  name: x\n  annotations:\n    config.kubernetes.io/function: |\n      exec:\n        path: /bin/sh\n",
    );
    upstream.write("broken/kustomization.yaml", "resources:\n- missing.yaml\n");
    // A file outside the kustomization's root, through a generator: the load restrictor.
    upstream.write("secret.txt", "hunter2");
    upstream.write(
        "escape/kustomization.yaml",
        "configMapGenerator:\n- name: stolen\n  files:\n  - ../secret.txt\n",
    );
    upstream.write("plain/app.yaml", &config_map("plain", "1"));
    upstream.commit("first");
    let hub = Hub::new();
    let report = hub.sync(&upstream.url(), 1_800_000_100);
    assert!(report.failed.iter().all(|(_, bundle, _)| bundle != "plain"));
    assert!(!hub.body("plain").is_empty(), "other bundles go on");
    let remote = hub.refusal("remote");
    assert!(remote.contains("remote"), "{remote}");
    assert!(remote.contains("remote/kustomization.yaml"), "{remote}");
    let plugin = hub.refusal("plugin");
    assert!(plugin.contains("plugin"), "{plugin}");
    let broken = hub.refusal("broken");
    assert!(
        broken.contains("missing.yaml"),
        "kustomize's own words: {broken}"
    );
    assert!(
        !broken.contains("outpost-kustomize-"),
        "no temporary paths: {broken}"
    );
    let escape = hub.refusal("escape");
    assert!(escape.contains("secret.txt"), "{escape}");
}

#[test]
fn outpost_hub_render_builds_a_local_kustomization_the_same_way() {
    let upstream = layered_repository();
    let output = Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .arg("render")
        .arg(upstream.path().join("shop/overlays/prod"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let hub = Hub::new();
    hub.sync(&upstream.url(), 1_800_000_100);
    let digest = outpost_proto::Digest::of(&hub.body("shop-prod"));
    assert!(
        text.contains(&digest.to_string()),
        "the same body as the hub renders ({digest}): {text}"
    );
    assert!(text.contains("shop-settings-"), "{text}");
    // A path relative to where the operator stands builds the same.
    let relative = Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .args(["render", "shop/overlays/prod"])
        .current_dir(upstream.path())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(
        relative.status.success(),
        "{}",
        String::from_utf8_lossy(&relative.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&relative.stdout), text);
}
