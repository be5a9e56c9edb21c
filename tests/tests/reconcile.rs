//! The reconcile loop against the Kubernetes API test server, through kube-rs: apply, update,
//! prune, drift, CRDs, conflicts, health, an unreachable API, offline restarts and damaged
//! state. Hub and agent are in-process over real QUIC, with real SQLite files.

use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use outpost_agent::ReconcileOptions;
use outpost_e2e::harness::{
    Published, TestAgent, TestHub, eventually, quick_options, test_service_options, within,
};
use outpost_e2e::kubeapi::{KubeApiServer, ServerOptions};
use outpost_e2e::lossy::{LinkProfile, Relay};
use outpost_hub::store::{DriftQuery, DriftRecord, FleetStore, FleetView};
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

/// The drift reports the hub stored for `agent`, oldest first.
fn drift_of(hub: &TestHub, agent: &str) -> Vec<DriftRecord> {
    let mut reports = hub
        .store
        .drift_reports(&DriftQuery {
            agent: Some(agent.to_owned()),
            limit: 1000,
            ..DriftQuery::default()
        })
        .unwrap();
    reports.reverse();
    reports
}

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

impl Fleet {
    /// Publishes `yaml` as `bundle`, assigns it to the agent, waits until it is Healthy.
    async fn deploy(&self, bundle: &str, yaml: &str) -> Published {
        self.roll_out(bundle, yaml, Phase::Healthy).await.0
    }

    /// Publishes `yaml` as `bundle`, assigns it to the agent, waits until the agent reports
    /// that generation in `phase`; returns it and the report.
    async fn roll_out(&self, bundle: &str, yaml: &str, phase: Phase) -> (Published, BundleStatus) {
        let published = self.hub.publish(bundle, yaml);
        self.hub.assign(&self.id, bundle, published);
        let status = within(
            30,
            &format!("generation {} {phase:?}", published.generation),
            self.agent
                .status_where(bundle, phase_is(phase, published.generation)),
        )
        .await;
        (published, status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_update_and_prune_only_what_the_agent_created() {
    let f = fleet(ServerOptions::default(), fast()).await;
    let (_, status) = f.roll_out("shop", SHOP_V1, Phase::Healthy).await;
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

    let v2 = f.deploy("shop", SHOP_V2).await;
    eventually(10, "pruned", async || {
        f.server
            .object("v1", "ConfigMap", "shop", "stray")
            .is_none()
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
            let statuses = f.hub.store.statuses(Some(&f.id)).unwrap();
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
    eventually(20, "bundle removed", async || {
        f.server.names("outpost.io/bundle=shop").is_empty()
    })
    .await;
    assert!(f.server.object("v1", "Namespace", "", "shop").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected() {
    let f = fleet(ServerOptions::default(), fast()).await;
    f.deploy("shop", SHOP_V1).await;

    // `kubectl edit` changes a value the agent owns; someone deletes the deployment.
    let client = f.server.client().await;
    let configmaps = api(&client, "v1", "ConfigMap", "configmaps", "shop");
    configmaps
        .patch(
            "settings",
            &PatchParams {
                field_manager: Some("kubectl-edit".into()),
                ..Default::default()
            },
            &Patch::Merge(
                json!({"data": {"currency": "USD"}, "metadata": {"labels": {"extra": "yes"}}}),
            ),
        )
        .await
        .unwrap();
    api(&client, "apps/v1", "Deployment", "deployments", "shop")
        .delete("till", &Default::default())
        .await
        .unwrap();
    assert_eq!(
        f.server
            .object("v1", "ConfigMap", "shop", "settings")
            .unwrap()["data"]["currency"],
        "USD"
    );

    within(20, "drift corrected", async {
        loop {
            let settings = f
                .server
                .object("v1", "ConfigMap", "shop", "settings")
                .unwrap();
            if settings["data"]["currency"] == "EUR"
                && f.server
                    .object("apps/v1", "Deployment", "shop", "till")
                    .is_some()
            {
                // A field the agent never set stays as the editor left it.
                assert_eq!(settings["metadata"]["labels"]["extra"], "yes");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // And reported: the edited field with both values and its editor, the deleted object.
    eventually(20, "drift reported to the hub", async || {
        let reports = drift_of(&f.hub, &f.id);
        let objects: Vec<_> = reports.iter().flat_map(|r| r.objects.iter()).collect();
        objects.iter().any(|o| o.name == "till" && o.deleted)
            && objects.iter().any(|o| o.name == "settings")
    })
    .await;
    let reports = drift_of(&f.hub, &f.id);
    assert!(
        reports
            .iter()
            .all(|r| r.action == "corrected" && r.bundle == "shop")
    );
    let settings = reports
        .iter()
        .flat_map(|r| r.objects.iter())
        .find(|o| o.name == "settings")
        .unwrap();
    assert_eq!(
        (settings.kind.as_str(), settings.namespace.as_str()),
        ("ConfigMap", "shop")
    );
    assert_eq!(
        settings.fields.len(),
        1,
        "only the field the agent manages: {settings:?}"
    );
    let field = &settings.fields[0];
    assert_eq!(field.path, "data.currency");
    assert_eq!(field.desired.as_deref(), Some("\"EUR\""));
    assert_eq!(field.live.as_deref(), Some("\"USD\""));
    assert_eq!(field.manager.as_deref(), Some("kubectl-edit"));
    assert!(field.changed_at.is_some());
    let events = f.hub.store.agent_events(&f.id, 100).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "drift-corrected"
                && e.message.contains("data.currency by kubectl-edit")),
        "{events:?}"
    );
}

/// `shop`'s settings with `drift: report` (the annotation the hub renders for a bundle declared
/// so), and one more object in the default mode.
const REPORTED: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop, annotations: {outpost.io/drift: report}}
data: {currency: EUR, mode: live}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: prices, namespace: shop, annotations: {outpost.io/drift: report}}
data: {coffee: '2.50'}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_leaves_the_edit_in_place_and_reports_each_change_once() {
    let f = fleet(ServerOptions::default(), fast()).await;
    f.deploy("shop", REPORTED).await;
    let client = f.server.client().await;
    let configmaps = api(&client, "v1", "ConfigMap", "configmaps", "shop");
    let edit = |patch: serde_json::Value| {
        let configmaps = configmaps.clone();
        async move {
            configmaps
                .patch(
                    "settings",
                    &PatchParams {
                        field_manager: Some("kubectl-edit".into()),
                        ..Default::default()
                    },
                    &Patch::Merge(patch),
                )
                .await
                .unwrap();
        }
    };
    let left = |reports: &[DriftRecord]| {
        reports
            .iter()
            .filter(|r| r.action == "left")
            .cloned()
            .collect::<Vec<_>>()
    };
    edit(json!({"data": {"currency": "USD", "mode": null}})).await;
    configmaps
        .delete("prices", &Default::default())
        .await
        .unwrap();
    eventually(20, "drift reported as left in place", async || {
        !left(&drift_of(&f.hub, &f.id)).is_empty()
    })
    .await;
    // Many drift passes later: the edit and the deletion stand, and were reported once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settings = f
        .server
        .object("v1", "ConfigMap", "shop", "settings")
        .unwrap();
    assert_eq!(settings["data"]["currency"], "USD");
    assert!(settings["data"].get("mode").is_none());
    assert!(
        f.server
            .object("v1", "ConfigMap", "shop", "prices")
            .is_none()
    );
    let reports = left(&drift_of(&f.hub, &f.id));
    assert_eq!(reports.len(), 1, "{reports:?}");
    let mut objects = reports[0].objects.clone();
    objects.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(objects.len(), 2);
    assert!(objects[0].name == "prices" && objects[0].deleted);
    let paths: Vec<(&str, Option<&str>, Option<&str>)> = objects[1]
        .fields
        .iter()
        .map(|f| (f.path.as_str(), f.desired.as_deref(), f.live.as_deref()))
        .collect();
    assert_eq!(
        paths,
        [
            ("data.currency", Some("\"EUR\""), Some("\"USD\"")),
            ("data.mode", Some("\"live\""), None)
        ]
    );
    assert_eq!(
        objects[1].fields[0].manager.as_deref(),
        Some("kubectl-edit")
    );
    // The bundle is Degraded (an object is missing) and the fleet page shows the drift.
    let details = f
        .hub
        .store
        .fleet_details(std::slice::from_ref(&f.id))
        .unwrap();
    assert_eq!(details.drift.len(), 1);
    assert_eq!(details.drift[0].left_objects, 2);
    assert_eq!(f.hub.store.fleet_summary().unwrap().drifted, 1);

    // The cluster changes again: one more report.
    edit(json!({"data": {"currency": "GBP"}})).await;
    eventually(20, "the new drift reported", async || {
        left(&drift_of(&f.hub, &f.id)).len() == 2
    })
    .await;
    let reports = left(&drift_of(&f.hub, &f.id));
    assert!(reports[1].objects.iter().any(|o| {
        o.fields
            .iter()
            .any(|f| f.live.as_deref() == Some("\"GBP\""))
    }));

    // Git changes: the new release is applied over the edit, and the drift is reported gone.
    let v2 = f.hub.publish("shop", &REPORTED.replace("'2.50'", "'2.60'"));
    f.hub.assign(&f.id, "shop", v2);
    eventually(20, "drift gone after the new release", async || {
        left(&drift_of(&f.hub, &f.id))
            .last()
            .is_some_and(|r| r.objects.is_empty())
    })
    .await;
    let settings = f
        .server
        .object("v1", "ConfigMap", "shop", "settings")
        .unwrap();
    assert_eq!(settings["data"]["currency"], "EUR");
    assert_eq!(
        f.server
            .object("v1", "ConfigMap", "shop", "prices")
            .unwrap()["data"]["coffee"],
        "2.60"
    );
    assert_eq!(f.hub.store.fleet_summary().unwrap().drifted, 0);
    let events = f.hub.store.agent_events(&f.id, 100).unwrap();
    for kind in ["drift-found", "drift-gone"] {
        assert!(events.iter().any(|e| e.kind == kind), "{kind}: {events:?}");
    }
}

const WIDGETS: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
---
apiVersion: example.com/v1
kind: Widget
metadata: {name: front-door, namespace: factory}
spec: {size: 3}
---
apiVersion: v1
kind: Namespace
metadata: {name: factory}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_and_its_custom_resources_in_one_snapshot() {
    let server = ServerOptions {
        crd_establish_delay: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let f = fleet(server, fast()).await;
    let (_, status) = f.roll_out("widgets", WIDGETS, Phase::Healthy).await;
    assert_eq!(status.objects_ready, 3);
    let widget = f
        .server
        .object("example.com/v1", "Widget", "factory", "front-door")
        .expect("custom resource applied");
    assert_eq!(widget["spec"]["size"], 3);
    let crd = f
        .server
        .object(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "",
            "widgets.example.com",
        )
        .unwrap();
    assert_eq!(crd["status"]["conditions"][1]["type"], "Established");

    // Unassigned: the custom resource goes first, then the CRD, then the namespace.
    f.hub.unassign(&f.id, "widgets");
    eventually(20, "removed", async || {
        f.server.names("outpost.io/bundle=widgets").is_empty()
    })
    .await;
    assert!(
        f.server
            .object(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "",
                "widgets.example.com"
            )
            .is_none()
    );
}

/// An object the API refuses (422 Invalid: a label value with a space) fails with the API's
/// words and the object's name; the bundle's other objects are applied all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_the_api_refuses_fails_with_its_reason_and_the_rest_is_applied() {
    let f = fleet(ServerOptions::default(), fast()).await;
    let (_, failed) = f
        .roll_out(
            "shop",
            "apiVersion: v1
kind: ConfigMap
metadata:
  name: bad
  namespace: default
  labels:
    tier: front end
data:
  a: \"1\"
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: good
  namespace: default
data:
  a: \"1\"
",
            Phase::Failed,
        )
        .await;
    for expected in ["bad", "metadata.labels[tier]", "a valid label must be"] {
        assert!(
            failed.message.contains(expected),
            "{expected:?} missing in {}",
            failed.message
        );
    }
    eventually(30, "the other object applied", async || {
        f.server
            .object("v1", "ConfigMap", "default", "good")
            .is_some()
    })
    .await;
    assert!(
        f.server
            .object("v1", "ConfigMap", "default", "bad")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_with_another_field_manager_is_reported_unless_forced() {
    let careful = ReconcileOptions {
        force_conflicts: false,
        ..fast()
    };
    let mut f = fleet(ServerOptions::default(), careful).await;
    let v1 = f.deploy("shop", SHOP_V1).await;

    // `kubectl scale` takes spec.replicas over.
    let client = f.server.client().await;
    let deployments = api(&client, "apps/v1", "Deployment", "deployments", "shop");
    deployments
        .patch(
            "till",
            &PatchParams {
                field_manager: Some("kubectl".into()),
                ..Default::default()
            },
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    let failed = within(
        20,
        "conflict reported",
        f.agent
            .status_where("shop", phase_is(Phase::Failed, v1.generation)),
    )
    .await;
    for expected in [
        "conflict with \"kubectl\"",
        ".spec.replicas",
        "force_conflicts",
    ] {
        assert!(
            failed.message.contains(expected),
            "{expected:?} missing in {}",
            failed.message
        );
    }
    assert_eq!(
        f.server
            .object("apps/v1", "Deployment", "shop", "till")
            .unwrap()["spec"]["replicas"],
        5,
        "not forced"
    );

    // With force the agent takes the field back.
    f.agent.reconcile(f.server.target().await, fast());
    f.agent.restart();
    within(
        20,
        "forced",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v1.generation)),
    )
    .await;
    let till = f
        .server
        .object("apps/v1", "Deployment", "shop", "till")
        .unwrap();
    assert_eq!(till["spec"]["replicas"], 2);
    let managers: Vec<&str> = till["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert!(!managers.contains(&"kubectl"), "{managers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_status_the_controllers_write() {
    let server = ServerOptions {
        controllers: false,
        ..ServerOptions::default()
    };
    let f = fleet(server, fast()).await;
    let v1 = f.hub.publish("shop", SHOP_V1);
    f.hub.assign(&f.id, "shop", v1);
    let applying = within(
        30,
        "applying",
        f.agent.status_where("shop", |s| {
            phase_is(Phase::Applying, v1.generation)(s)
                && s.message.contains("Deployment shop/till")
        }),
    )
    .await;
    assert!(
        applying.message.contains("waiting for the controller"),
        "{}",
        applying.message
    );
    assert_eq!(applying.objects_ready, 3);

    let client = f.server.client().await;
    let deployments = api(&client, "apps/v1", "Deployment", "deployments", "shop");
    let status = |value: serde_json::Value| Patch::Merge(json!({"status": value}));
    let params = PatchParams {
        field_manager: Some("kube-controller-manager".into()),
        ..Default::default()
    };
    deployments.patch_status("till", &params, &status(json!({"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}))).await.unwrap();
    within(
        20,
        "healthy",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v1.generation)),
    )
    .await;

    // A new image that never becomes available: Degraded with the controller's words.
    let v2 = f.hub.publish("shop", SHOP_V2);
    f.hub.assign(&f.id, "shop", v2);
    within(
        30,
        "applying v2",
        f.agent
            .status_where("shop", phase_is(Phase::Applying, v2.generation)),
    )
    .await;
    deployments
        .patch_status("till", &params, &status(json!({"observedGeneration": 2, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet till-2 has timed out progressing"}]})))
        .await
        .unwrap();
    let degraded = within(
        20,
        "degraded",
        f.agent
            .status_where("shop", phase_is(Phase::Degraded, v2.generation)),
    )
    .await;
    assert!(
        degraded.message.contains("timed out progressing"),
        "{}",
        degraded.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_down_then_up() {
    let f = fleet(ServerOptions::default(), fast()).await;
    f.deploy("shop", SHOP_V1).await;

    f.server.stop().await;
    let (v2, down) = f.roll_out("shop", SHOP_V2, Phase::Failed).await;
    assert!(down.message.contains("unreachable"), "{}", down.message);

    f.server.resume().await;
    within(
        30,
        "healthy again",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v2.generation)),
    )
    .await;
    assert_eq!(
        f.server
            .object("v1", "ConfigMap", "shop", "settings")
            .unwrap()["data"]["currency"],
        "CHF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_the_agent_keeps_reconciling_across_restarts_and_reports_on_reconnect() {
    let hub = TestHub::start(test_service_options(), &Tuning::default()).await;
    let relay = Relay::start(
        hub.address,
        LinkProfile::default(),
        LinkProfile::default(),
        3,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut agent, id) = TestAgent::enrolled(
        &dir.path().join("agent"),
        &hub,
        relay.address(),
        quick_options(9),
    )
    .await;
    let server = KubeApiServer::start(ServerOptions::default()).await;
    agent.reconcile(server.target().await, fast());
    let v1 = hub.publish("shop", SHOP_V1);
    hub.assign(&id, "shop", v1);
    within(
        30,
        "healthy",
        agent.status_where("shop", phase_is(Phase::Healthy, v1.generation)),
    )
    .await;
    eventually(20, "outbox drained", async || {
        agent
            .client
            .with_state(|state| state.outbox_len())
            .await
            .unwrap()
            == 0
    })
    .await;
    let stored_before = hub.store.status_history_len(&id).unwrap();

    // The link goes dark; the agent restarts (twice) and the cluster loses objects meanwhile.
    relay.set_blackout(true);
    let client = server.client().await;
    for round in 0..2 {
        let sequence_before = agent
            .client
            .with_state(|state| state.outbox_sequence())
            .await
            .unwrap();
        agent.restart();
        api(&client, "apps/v1", "Deployment", "deployments", "shop")
            .delete("till", &Default::default())
            .await
            .unwrap();
        within(30, "restored offline, and a new report queued", async {
            loop {
                let sequence = agent
                    .client
                    .with_state(|state| state.outbox_sequence())
                    .await
                    .unwrap();
                let healthy = agent
                    .last_status("shop")
                    .await
                    .is_some_and(|s| phase_is(Phase::Healthy, v1.generation)(&s));
                if sequence > sequence_before
                    && healthy
                    && server
                        .object("apps/v1", "Deployment", "shop", "till")
                        .is_some()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        eprintln!("round {round}: restored while offline");
    }
    let queued = agent
        .client
        .with_state(|state| state.outbox_len())
        .await
        .unwrap();
    assert!(queued >= 2, "statuses queued offline: {queued}");

    // Back online: every queued report is stored once, and the outbox empties.
    relay.set_blackout(false);
    eventually(60, "reports delivered", async || {
        agent
            .client
            .with_state(|state| state.outbox_len())
            .await
            .unwrap()
            == 0
    })
    .await;
    let drift = drift_of(&hub, &id);
    let stored_after = hub.store.status_history_len(&id).unwrap() + drift.len() as u64;
    let sent = agent
        .client
        .with_state(|state| state.outbox_sequence())
        .await
        .unwrap();
    assert_eq!(
        stored_after, sent,
        "each status and drift report stored exactly once (before: {stored_before}, queued offline: {queued})"
    );
    // The deletions made while the agent was offline (and restarting) were reported as drift.
    let deleted = drift
        .iter()
        .filter(|r| r.objects.iter().any(|o| o.name == "till" && o.deleted))
        .count();
    assert_eq!(deleted, 2, "{drift:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_never_applied_and_is_fetched_again() {
    let mut f = fleet(ServerOptions::default(), fast()).await;
    let v1 = f.hub.publish("shop", SHOP_V1);
    f.hub.assign(&f.id, "shop", v1);
    within(30, "held", f.agent.holds(v1)).await;
    within(
        30,
        "healthy",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v1.generation)),
    )
    .await;

    // Stop the agent, damage the stored body (same length, one value changed), start it again.
    f.agent.disconnect();
    f.agent.client.with_state(|state| state.tamper_for_tests("UPDATE snapshots SET body = CAST(REPLACE(CAST(body AS TEXT), 'EUR', 'XXX') AS BLOB)")).await.unwrap();
    let client = f.server.client().await;
    api(&client, "v1", "ConfigMap", "configmaps", "shop")
        .delete("settings", &Default::default())
        .await
        .unwrap();
    f.agent.restart();

    let recovered = within(30, "healthy again", async {
        loop {
            if let Some(settings) = f.server.object("v1", "ConfigMap", "shop", "settings") {
                return settings;
            }
            assert!(
                f.server
                    .names("outpost.io/bundle=shop")
                    .iter()
                    .all(|(_, _, name)| name != "settings")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(
        recovered["data"]["currency"], "EUR",
        "the damaged bytes were never applied"
    );
    within(
        30,
        "healthy",
        f.agent
            .status_where("shop", phase_is(Phase::Healthy, v1.generation)),
    )
    .await;
    let history = f.hub.store.status_history_len(&f.id).unwrap();
    assert!(history > 0);
}

/// Pruning deletes only the object it read: one deleted and re-created since (a new uid) or
/// changed since (a new resourceVersion) is refused with a conflict by the API's
/// preconditions, and stays; a fresh read deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_names_the_object_it_read_by_uid_and_resource_version() {
    use outpost_agent::target::{ClusterTarget, ObjectRef, TargetError};
    let server = KubeApiServer::start(ServerOptions::default()).await;
    let target = server.target().await;
    let config = |value: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "shop", "namespace": "default",
                            "labels": {"outpost.io/bundle": "shop"}},
               "data": {"value": value}})
    };
    let reference = ObjectRef {
        api_version: "v1".to_owned(),
        kind: "ConfigMap".to_owned(),
        namespace: "default".to_owned(),
        name: "shop".to_owned(),
    };
    target
        .apply(&config("1"), "outpost-agent", true, false)
        .await
        .unwrap();
    let read = target.get(&reference).await.unwrap().unwrap();
    // Someone deletes it and creates it again (same name, new uid).
    assert!(
        server
            .kubectl_delete("v1", "ConfigMap", "default", "shop")
            .await
    );
    target
        .apply(&config("1"), "someone-else", true, false)
        .await
        .unwrap();
    let error = target.delete(&reference, &read).await.unwrap_err();
    assert!(
        matches!(&error, TargetError::Conflict(message) if message.contains("UID in precondition")),
        "{error}"
    );
    assert!(
        server
            .object("v1", "ConfigMap", "default", "shop")
            .is_some(),
        "still there"
    );
    // Changed since it was read: the resourceVersion no longer holds either.
    let read = target.get(&reference).await.unwrap().unwrap();
    target
        .apply(&config("2"), "someone-else", true, false)
        .await
        .unwrap();
    let error = target.delete(&reference, &read).await.unwrap_err();
    assert!(matches!(error, TargetError::Conflict(_)), "{error}");
    // Read again: deleted.
    let read = target.get(&reference).await.unwrap().unwrap();
    assert!(target.delete(&reference, &read).await.unwrap());
    assert!(
        server
            .object("v1", "ConfigMap", "default", "shop")
            .is_none()
    );
}
