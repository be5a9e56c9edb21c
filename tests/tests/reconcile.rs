//! The reconcile loop against the Kubernetes API test server, through kube-rs: apply, update,
//! prune, drift, CRDs, conflicts, health, an unreachable API, offline restarts and damaged
//! state. Hub and agent are in-process over real QUIC, with real SQLite files.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use outpost_agent::ReconcileOptions;
use outpost_e2e::harness::{TestAgent, TestHub, quick_options, test_service_options, within};
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::lossy::{LinkProfile, Relay};
use outpost_hub::store::FleetStore;
use outpost_proto::transport::Tuning;
use outpost_proto::wire::{BundleStatus, Phase};
use serde_json::json;

fn fast() -> ReconcileOptions {
    ReconcileOptions {
        drift_interval: Duration::from_millis(400),
        health_poll: Duration::from_millis(50),
        health_timeout: Duration::from_secs(3),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(400),
        crd_timeout: Duration::from_secs(10),
        ..ReconcileOptions::default()
    }
}

const SHOP_V1: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop, labels: {team: pos, tier: front}}
data: {currency: EUR}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: old-promo, namespace: shop}
data: {text: summer}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: till, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: till}}
  template:
    metadata: {labels: {app: till}}
    spec: {containers: [{name: till, image: 'registry.example/till:1.0'}]}
";

/// v2: `old-promo` left, `settings` changed a value and dropped a label, `till` got a new image.
const SHOP_V2: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop, labels: {team: pos}}
data: {currency: CHF}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: till, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: till}}
  template:
    metadata: {labels: {app: till}}
    spec: {containers: [{name: till, image: 'registry.example/till:1.1'}]}
";

fn phase_is(phase: Phase, generation: u64) -> impl Fn(&BundleStatus) -> bool {
    move |status| status.phase == phase && status.generation == generation
}

fn api(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    plural: &str,
    namespace: &str,
) -> Api<DynamicObject> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(client.clone(), namespace, &resource)
}

struct Fleet {
    hub: TestHub,
    agent: TestAgent,
    id: String,
    server: KubeApiServer,
    _dir: tempfile::TempDir,
}

async fn fleet(server: ServerOptions, reconcile: ReconcileOptions) -> Fleet {
    let hub = TestHub::start(test_service_options(), &Tuning::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, id) = TestAgent::enrolled(
        &dir.path().join("agent"),
        &hub,
        hub.address,
        quick_options(7),
    )
    .await;
    let server = KubeApiServer::start(server).await;
    agent.reconcile(server.target().await, reconcile);
    Fleet {
        hub,
        agent,
        id,
        server,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_update_and_prune_only_what_the_agent_created() {
    let f = fleet(ServerOptions::default(), fast()).await;
    let v1 = f.hub.publish("shop", SHOP_V1);
    f.hub.assign(&f.id, "shop", v1);
    let status = within(
        30,
        "v1 healthy",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v1.generation)),
    )
    .await;
    assert_eq!((status.objects_total, status.objects_ready), (4, 4));

    let settings = f
        .server
        .object("v1", "ConfigMap", "shop", "settings")
        .expect("applied");
    assert_eq!(settings["data"]["currency"], "EUR");
    assert_eq!(settings["metadata"]["labels"]["outpost.io/bundle"], "shop");
    let managers: Vec<&str> = settings["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, ["outpost-agent"]);

    // Someone else's object in the same namespace, and a stray the agent created before it
    // lost track of it (labelled for the bundle, not in the inventory).
    let client = f.server.client().await;
    let configmaps = api(&client, "v1", "ConfigMap", "configmaps", "shop");
    let foreign: DynamicObject = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "foreign"}, "data": {"x": "1"}})).unwrap();
    configmaps
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    let stray: DynamicObject = serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "stray", "labels": {"outpost.io/bundle": "shop"}}})).unwrap();
    configmaps
        .create(&PostParams::default(), &stray)
        .await
        .unwrap();

    let v2 = f.hub.publish("shop", SHOP_V2);
    f.hub.assign(&f.id, "shop", v2);
    within(
        30,
        "v2 healthy",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v2.generation)),
    )
    .await;
    within(10, "pruned", async {
        while f
            .server
            .object("v1", "ConfigMap", "shop", "stray")
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let settings = f
        .server
        .object("v1", "ConfigMap", "shop", "settings")
        .unwrap();
    assert_eq!(settings["data"]["currency"], "CHF");
    assert!(
        settings["metadata"]["labels"].get("tier").is_none(),
        "a label removed in Git is removed: {settings}"
    );
    assert!(
        f.server
            .object("v1", "ConfigMap", "shop", "old-promo")
            .is_none()
    );
    assert!(
        f.server
            .object("v1", "ConfigMap", "shop", "foreign")
            .is_some(),
        "never touch what the agent did not create"
    );
    let till = f
        .server
        .object("apps/v1", "Deployment", "shop", "till")
        .unwrap();
    assert_eq!(
        till["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example/till:1.1"
    );
    assert_eq!(till["metadata"]["generation"], 2);
    assert_eq!(
        f.server.names("outpost.io/bundle=shop"),
        [
            ("ConfigMap".into(), "shop".into(), "settings".into()),
            ("Deployment".into(), "shop".into(), "till".into()),
            ("Namespace".into(), String::new(), "shop".into())
        ]
    );
    let inventory = f
        .agent
        .client
        .with_state(|state| state.inventory("shop"))
        .await
        .unwrap();
    assert_eq!(inventory.len(), 3, "{inventory:?}");

    // The statuses reached the hub.
    within(20, "status at the hub", async {
        loop {
            let statuses = f.hub.store.lock().unwrap().statuses(Some(&f.id)).unwrap();
            if statuses
                .iter()
                .any(|s| s.status.phase == Phase::Healthy && s.status.generation == v2.generation)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Unassigned: everything it created goes, in reverse order, the foreign object stays.
    f.hub.unassign(&f.id, "shop");
    within(20, "bundle removed", async {
        while !f.server.names("outpost.io/bundle=shop").is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(f.server.object("v1", "Namespace", "", "shop").is_none());
}
