//! Previews of rollouts on a real Git repository and a real store: a change across two
//! bundles, one with an overlay (two render variants), agents on the tracked branch; the
//! preview names the agents, the waves the state machine would open, and per variant the
//! objects added, changed (field paths with both values) and removed — and writes nothing.

mod support;

use outpost_hub::assign::assign_tracked;
use outpost_hub::git::GitSource;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::rollout::machine::OnFailure;
use outpost_hub::rollout::preview::preview;
use outpost_hub::rollout::{CreateError, Request};
use outpost_hub::store::{RolloutStore, SqliteStore, Store};
use outpost_hub::sync::sync_source;
use serde_json::Value;
use support::Upstream;

fn deployment(image: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n  namespace: default\nspec:\n  replicas: 1\n  template:\n    spec:\n      containers:\n      - name: shop\n        image: {image}\n"
    )
}

fn config(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: default\ndata:\n  value: \"{value}\"\n"
    )
}

fn request(bundle: &str, selector: &str) -> Request {
    Request {
        bundle: bundle.to_owned(),
        tag: "v2".to_owned(),
        selector: selector.to_owned(),
        waves: "1,50%,100%".to_owned(),
        health_timeout: 600,
        max_failures: "0".to_owned(),
        on_failure: OnFailure::Pause,
    }
}

#[test]
fn a_preview_shows_waves_variants_and_field_changes_and_writes_nothing() {
    let upstream = Upstream::new();
    upstream.write(
        "outpost.yaml",
        "bundles:\n  - name: shop\n    path: shop\n    overlays:\n      - selector: {matchLabels: {region: us}}\n        path: shop-us\n  - name: tills\n    path: tills\n",
    );
    upstream.write("shop/app.yaml", &deployment("shop:1"));
    upstream.write("shop/settings.yaml", &config("settings", "1"));
    upstream.write("shop/old.yaml", &config("old", "1"));
    upstream.write("shop-us/settings.yaml", &config("settings", "us-1"));
    upstream.write("tills/app.yaml", &config("tills", "1"));
    upstream.commit("v1");
    upstream.git(&["tag", "v1"]);
    // v2: a new image, a changed setting (also in the US overlay), a removed and an added
    // ConfigMap; tills changes too.
    upstream.write("shop/app.yaml", &deployment("shop:2"));
    upstream.write("shop/settings.yaml", &config("settings", "2"));
    upstream.remove("shop/old.yaml");
    upstream.write("shop/new.yaml", &config("new", "1"));
    upstream.write("shop-us/settings.yaml", &config("settings", "us-2"));
    upstream.write("tills/app.yaml", &config("tills", "2"));
    upstream.commit("v2");
    upstream.git(&["tag", "v2"]);
    // The fleet tracks v1 (a branch at the v1 commit).
    upstream.git(&["branch", "stable", "v1"]);

    let data = tempfile::tempdir().unwrap();
    let keys = HubKeys::create(
        &data.path().join("keys"),
        KeyPolicy::default(),
        1_800_000_000,
    )
    .unwrap();
    let store = SqliteStore::open(&data.path().join("hub.db")).unwrap();
    let mut ids = Vec::new();
    for (seed, labels) in [
        (1u8, vec![("region", "eu"), ("ring", "canary")]),
        (2, vec![("region", "eu")]),
        (3, vec![("region", "eu")]),
        (4, vec![("region", "us")]),
    ] {
        let token = outpost_proto::Digest::of(&[seed]);
        let labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        store
            .create_token(&token, &labels, "test", 0, i64::MAX)
            .unwrap();
        ids.push(store.enrol(&token, &[seed; 32], 1).unwrap().unwrap().id);
    }
    let source = GitSource::open_or_init(&upstream.url(), &data.path().join("mirror")).unwrap();
    sync_source(&store, &keys, &source, 1_800_000_100).unwrap();
    assign_tracked(
        &store,
        &source,
        "refs/heads/stable",
        1_800_000_100,
        &mut |_| {},
    )
    .unwrap();
    let mut definitions_at = |_: &str, commit: &str| {
        outpost_hub::bundles::bundles_at(&source, commit).map_err(|error| error.to_string())
    };

    let shown = preview(
        &store,
        &mut definitions_at,
        &request("shop", ""),
        1_800_000_200,
    )
    .unwrap();
    assert_eq!(shown.agents, 4);
    // Waves: the canary alone, then half of the four (one more), then the rest.
    let waves: Vec<Vec<String>> = shown.waves.iter().map(|wave| wave.agents.clone()).collect();
    assert_eq!(waves[0], vec![ids[0].clone()], "the canary first");
    assert_eq!(waves[1].len(), 1);
    assert_eq!(waves[2].len(), 2);
    let mut everyone: Vec<String> = waves.concat();
    everyone.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(everyone, expected);
    // Two variants: the bundle as is (Europe) and with the US overlay.
    assert_eq!(shown.variants.len(), 2, "{shown:#?}");
    let plain = shown
        .variants
        .iter()
        .find(|v| v.variant.is_empty())
        .unwrap();
    let us = shown
        .variants
        .iter()
        .find(|v| !v.variant.is_empty())
        .unwrap();
    assert_eq!(plain.groups.len(), 1);
    assert_eq!(plain.groups[0].agents.len(), 3);
    assert_eq!(us.groups[0].agents, vec![ids[3].clone()]);
    let diff = &plain.groups[0].diff;
    let names = |objects: &[outpost_hub::diff::ObjectId]| -> Vec<String> {
        objects.iter().map(|object| object.name.clone()).collect()
    };
    assert_eq!(names(&diff.added), ["new"]);
    assert_eq!(names(&diff.removed), ["old"]);
    let changed: Vec<(String, String, Option<Value>, Option<Value>)> = diff
        .changed
        .iter()
        .flat_map(|(object, fields)| {
            fields.iter().map(|field| {
                (
                    object.name.clone(),
                    field.path.clone(),
                    field.from.clone(),
                    field.to.clone(),
                )
            })
        })
        .collect();
    assert!(changed.contains(&(
        "shop".to_owned(),
        "spec.template.spec.containers[0].image".to_owned(),
        Some("shop:1".into()),
        Some("shop:2".into())
    )));
    assert!(changed.contains(&(
        "settings".to_owned(),
        "data.value".to_owned(),
        Some("1".into()),
        Some("2".into())
    )));
    let us_settings = us.groups[0]
        .diff
        .changed
        .iter()
        .find(|(object, _)| object.name == "settings")
        .unwrap();
    assert_eq!(
        us_settings.1[0].to,
        Some("us-2".into()),
        "the overlay's value"
    );

    // A selector narrows it; another bundle has its own diff.
    let eu = preview(
        &store,
        &mut definitions_at,
        &request("shop", "region=eu"),
        1_800_000_200,
    )
    .unwrap();
    assert_eq!((eu.agents, eu.variants.len()), (3, 1));
    let tills = preview(
        &store,
        &mut definitions_at,
        &request("tills", ""),
        1_800_000_200,
    )
    .unwrap();
    assert_eq!(tills.variants[0].groups[0].diff.changed.len(), 1);
    // Nothing was written, and a bad request says why.
    assert!(store.rollouts().unwrap().is_empty());
    let missing = preview(
        &store,
        &mut definitions_at,
        &Request {
            tag: "v9".to_owned(),
            ..request("shop", "")
        },
        1_800_000_200,
    )
    .unwrap_err();
    assert!(
        matches!(missing, CreateError::NoRelease { .. }),
        "{missing}"
    );
}
