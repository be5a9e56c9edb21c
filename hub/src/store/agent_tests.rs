//! Agents, labels and enrolment tokens in the SQLite store.

use super::*;

fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    (dir, store)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_token_enrols_one_agent_once() {
    let (_dir, mut store) = store();
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

#[test]
fn expired_tokens_and_enrolled_keys_are_refused() {
    let (_dir, mut store) = store();
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

#[test]
fn labels_change_and_revocation_is_recorded_with_who_and_why() {
    let (_dir, mut store) = store();
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
