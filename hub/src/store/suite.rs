//! The store suite: what every backend must do, as functions over a `&dyn HubStore`, run
//! for each backend by [`store_suite!`] with a fresh store per test.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use outpost_proto::Digest;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn target(name: &str, commit: &str) -> RefTarget {
    RefTarget {
        name: name.to_owned(),
        commit: commit.to_owned(),
    }
}

fn token(name: &str, role: Role, expires_at: Option<i64>) -> NewToken {
    NewToken {
        name: name.to_owned(),
        role,
        expires_at,
    }
}

pub(crate) fn a_token_enrols_one_agent_once(store: &dyn HubStore) {
    let token = Digest::of(b"secret token");
    store
        .create_token(&token, &labels(&[("region", "eu")]), "ops", 100, 200)
        .unwrap();
    let agent = store.enrol(&token, &[7; 32], 150).unwrap().unwrap();
    assert_eq!(agent.labels, labels(&[("region", "eu")]));
    assert_eq!(
        store.enrol(&token, &[8; 32], 151).unwrap(),
        Err(TokenError::Used(agent.id.clone()))
    );
    assert_eq!(
        store.enrol(&Digest::of(b"other"), &[8; 32], 151).unwrap(),
        Err(TokenError::Unknown)
    );
    let listed = store.tokens().unwrap();
    assert_eq!(listed[0].used, Some((150, agent.id.clone())));
    assert_eq!(store.agents().unwrap(), [agent]);
}

pub(crate) fn expired_tokens_and_enrolled_keys_are_refused(store: &dyn HubStore) {
    let token = Digest::of(b"t");
    store
        .create_token(&token, &BTreeMap::new(), "ops", 100, 200)
        .unwrap();
    assert_eq!(
        store.enrol(&token, &[1; 32], 201).unwrap(),
        Err(TokenError::Expired(200))
    );
    let second = Digest::of(b"u");
    store
        .create_token(&second, &BTreeMap::new(), "ops", 100, 300)
        .unwrap();
    let third = Digest::of(b"v");
    store
        .create_token(&third, &BTreeMap::new(), "ops", 100, 300)
        .unwrap();
    let agent = store.enrol(&second, &[1; 32], 150).unwrap().unwrap();
    assert_eq!(
        store.enrol(&third, &[1; 32], 150).unwrap(),
        Err(TokenError::AlreadyEnrolled(agent.id))
    );
}

pub(crate) fn labels_change_and_revocation_is_recorded_with_who_and_why(store: &dyn HubStore) {
    let token = Digest::of(b"t");
    store
        .create_token(
            &token,
            &labels(&[("region", "eu"), ("ring", "canary")]),
            "ops",
            100,
            200,
        )
        .unwrap();
    let agent = store.enrol(&token, &[1; 32], 150).unwrap().unwrap();
    let changes: BTreeMap<String, Option<String>> = [
        ("region".to_owned(), Some("uk".to_owned())),
        ("ring".to_owned(), None),
    ]
    .into();
    assert!(
        store
            .label_agent(&agent.id, &changes, "alice", 160)
            .unwrap()
    );
    assert!(!store.label_agent("nope", &changes, "alice", 160).unwrap());
    assert_eq!(
        store.agent(&agent.id).unwrap().unwrap().labels,
        labels(&[("region", "uk")])
    );
    assert!(
        store
            .revoke_agent(&agent.id, "bob", "stolen van", 170)
            .unwrap()
    );
    assert_eq!(
        store.agent(&agent.id).unwrap().unwrap().revoked,
        Some((170, "bob".to_owned(), "stolen van".to_owned()))
    );
    let events = store.events(10).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "agent-revoked" && e.message == "by bob: stolen van")
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "agent-labelled" && e.message.contains("by alice"))
    );
}

pub(crate) fn tokens_are_found_by_digest_expire_and_revoke(store: &dyn HubStore) {
    let (a, b) = (Digest::of(b"secret-a"), Digest::of(b"secret-b"));
    store
        .create_admin_token(
            &token("ci", Role::Operator, Some(100)),
            &a,
            "local:root",
            10,
        )
        .unwrap()
        .unwrap();
    store
        .create_admin_token(&token("ops", Role::Admin, None), &b, "ci", 10)
        .unwrap()
        .unwrap();
    assert!(
        matches!(store.check_admin_token(&a, 50).unwrap(), TokenCheck::Valid(t) if t.role == Role::Operator)
    );
    assert!(matches!(
        store.check_admin_token(&a, 101).unwrap(),
        TokenCheck::Expired(_)
    ));
    assert_eq!(
        store.check_admin_token(&Digest::of(b"x"), 50).unwrap(),
        TokenCheck::Unknown
    );
    let revoked = store.revoke_admin_token("ops", "ci", 60).unwrap().unwrap();
    assert_eq!(revoked.revoked, Some((60, "ci".to_owned())));
    assert!(matches!(
        store.check_admin_token(&b, 61).unwrap(),
        TokenCheck::Revoked(_)
    ));
    assert!(
        store
            .revoke_admin_token("nobody", "ci", 60)
            .unwrap()
            .is_none()
    );
    // Names stay unique, also after revocation.
    let taken = store
        .create_admin_token(
            &token("ops", Role::Viewer, None),
            &Digest::of(b"c"),
            "ci",
            70,
        )
        .unwrap()
        .unwrap_err();
    assert!(taken.contains("revoked at 60"), "{taken}");
    store
        .touch_admin_tokens(&[("ci".to_owned(), 80), ("ci".to_owned(), 70)])
        .unwrap();
    let listed = store.admin_tokens().unwrap();
    assert_eq!(
        listed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["ci", "ops"]
    );
    assert_eq!(listed[0].last_used_at, Some(80));
    let events = store.events(10).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "api-token-revoked" && e.message == "by ci")
    );
}

pub(crate) fn ref_changes_are_new_moved_and_deleted(store: &dyn HubStore) {
    let changes = store
        .record_refs(
            "s",
            &[target("refs/tags/a", "1"), target("refs/tags/b", "1")],
            10,
        )
        .unwrap();
    assert_eq!(changes.len(), 2);
    assert!(
        store
            .record_refs(
                "s",
                &[target("refs/tags/a", "1"), target("refs/tags/b", "1")],
                11
            )
            .unwrap()
            .is_empty()
    );
    let changes = store
        .record_refs("s", &[target("refs/tags/a", "2")], 12)
        .unwrap();
    assert_eq!(
        changes,
        [
            RefChange::Moved {
                target: target("refs/tags/a", "2"),
                previous: "1".to_owned()
            },
            RefChange::Deleted("refs/tags/b".to_owned()),
        ]
    );
}

/// Generations only grow, per bundle.
pub(crate) fn generations_only_grow(store: &dyn HubStore) {
    assert_eq!(store.next_generation("pos").unwrap(), 1);
    assert_eq!(store.next_generation("pos").unwrap(), 2);
    assert_eq!(store.next_generation("kiosk").unwrap(), 1);
    assert_eq!(store.next_generation("pos").unwrap(), 3);
}

/// Generates one `#[test]` per suite function, each on a store made by `$make` (an
/// expression evaluated per test that yields something holding a store, and `$store`, how to
/// borrow it as `&dyn HubStore`).
macro_rules! store_suite {
    ($prefix:ident, $make:expr) => {
        #[test]
        fn a_token_enrols_one_agent_once() {
            let made = $make;
            crate::store::suite::a_token_enrols_one_agent_once(&made.store);
        }
        #[test]
        fn expired_tokens_and_enrolled_keys_are_refused() {
            let made = $make;
            crate::store::suite::expired_tokens_and_enrolled_keys_are_refused(&made.store);
        }
        #[test]
        fn labels_change_and_revocation_is_recorded_with_who_and_why() {
            let made = $make;
            crate::store::suite::labels_change_and_revocation_is_recorded_with_who_and_why(
                &made.store,
            );
        }
        #[test]
        fn tokens_are_found_by_digest_expire_and_revoke() {
            let made = $make;
            crate::store::suite::tokens_are_found_by_digest_expire_and_revoke(&made.store);
        }
        #[test]
        fn ref_changes_are_new_moved_and_deleted() {
            let made = $make;
            crate::store::suite::ref_changes_are_new_moved_and_deleted(&made.store);
        }
        #[test]
        fn generations_only_grow() {
            let made = $make;
            crate::store::suite::generations_only_grow(&made.store);
        }
    };
}
pub(crate) use store_suite;
