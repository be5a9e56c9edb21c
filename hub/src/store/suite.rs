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
    // An unused token is revoked at once; a used, expired or unknown one is not.
    let leaked = Digest::of(b"leaked");
    store
        .create_token(&leaked, &BTreeMap::new(), "ops", 100, 10_000)
        .unwrap();
    assert!(
        store
            .revoke_token(&leaked, "ops", "left in a ticket", 120)
            .unwrap()
    );
    assert!(matches!(
        store.enrol(&leaked, &[9; 32], 121).unwrap(),
        Err(TokenError::Expired(_))
    ));
    assert!(!store.revoke_token(&leaked, "ops", "again", 122).unwrap());
    assert!(
        !store
            .revoke_token(&token, "ops", "expired already", 300)
            .unwrap()
    );
    assert!(
        !store
            .revoke_token(&Digest::of(b"nothing"), "ops", "?", 122)
            .unwrap()
    );
    assert!(
        store.events(20).unwrap().iter().any(
            |event| event.kind == "token-revoked" && event.message.contains("left in a ticket")
        )
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

/// Assigns generation 1 of `pos` (digest of "v1") to each of `agents`, tracked, at `at`.
fn assign_pos_v1(store: &dyn HubStore, agents: &[&Agent], at: i64) {
    let changes: Vec<AssignmentChange> = agents
        .iter()
        .map(|agent| AssignmentChange {
            agent: agent.id.clone(),
            bundle: "pos".to_owned(),
            to: Some((1, Digest::of(b"v1"))),
            origin: "track:repo".to_owned(),
        })
        .collect();
    store.change_assignments(&changes, at).unwrap();
}

fn enrolled(store: &dyn HubStore, seed: u8, pairs: &[(&str, &str)]) -> Agent {
    let token = Digest::of(&[seed, 0xee]);
    store
        .create_token(&token, &labels(pairs), "ops", 100, 10_000)
        .unwrap();
    store.enrol(&token, &[seed; 32], 100).unwrap().unwrap()
}

fn status(
    bundle: &str,
    digest: Digest,
    phase: outpost_proto::wire::Phase,
    stale: bool,
) -> outpost_proto::wire::BundleStatus {
    outpost_proto::wire::BundleStatus {
        bundle: bundle.to_owned(),
        digest,
        generation: 1,
        phase,
        objects_total: 3,
        objects_ready: 3,
        message: String::new(),
        observed_at: 120,
        stale,
    }
}

pub(crate) fn fleet_views_filter_count_and_read_pages(store: &dyn HubStore) {
    use outpost_proto::wire::Phase;
    let eu_canary = enrolled(store, 1, &[("region", "eu"), ("ring", "canary")]);
    let eu = enrolled(store, 2, &[("region", "eu")]);
    let us = enrolled(store, 3, &[("region", "us")]);
    let gone = enrolled(store, 4, &[("region", "eu")]);
    let (v1, v2) = (Digest::of(b"v1"), Digest::of(b"v2"));
    let assign = |agent: &Agent, digest: Digest| AssignmentChange {
        agent: agent.id.clone(),
        bundle: "pos".to_owned(),
        to: Some((1, digest)),
        origin: "track:repo".to_owned(),
    };
    store
        .change_assignments(
            &[
                assign(&eu_canary, v2),
                assign(&eu, v1),
                assign(&us, v1),
                assign(&gone, v1),
            ],
            110,
        )
        .unwrap();
    store
        .record_status(
            &eu_canary.id,
            1,
            &[status("pos", v2, Phase::Failed, false)],
            120,
        )
        .unwrap();
    store
        .record_status(&eu.id, 1, &[status("pos", v1, Phase::Healthy, true)], 120)
        .unwrap();
    store.revoke_agent(&gone.id, "ops", "stolen", 130).unwrap();
    let ids = |filter: FleetFilter| store.fleet_ids(&filter).unwrap();
    let mut all = vec![
        eu_canary.id.clone(),
        eu.id.clone(),
        us.id.clone(),
        gone.id.clone(),
    ];
    all.sort();
    assert_eq!(ids(FleetFilter::default()), all);
    let mut eu_ids = vec![eu_canary.id.clone(), eu.id.clone()];
    eu_ids.sort();
    let eu_live = FleetFilter {
        labels: vec![("region".to_owned(), "eu".to_owned())],
        revoked: Some(false),
        ..FleetFilter::default()
    };
    assert_eq!(ids(eu_live.clone()), eu_ids);
    assert_eq!(
        ids(FleetFilter {
            without: vec!["ring".to_owned()],
            ..eu_live.clone()
        }),
        vec![eu.id.clone()]
    );
    let phase = |phase: &str| FleetFilter {
        bundle: Some("pos".to_owned()),
        phase: Some(phase.to_owned()),
        revoked: Some(false),
        ..FleetFilter::default()
    };
    assert_eq!(ids(phase("Failed")), vec![eu_canary.id.clone()]);
    assert_eq!(ids(phase("Healthy")), vec![eu.id.clone()]);
    assert_eq!(ids(phase("Unknown")), vec![us.id.clone()]);
    assert!(
        ids(FleetFilter {
            bundle: Some("kiosk".to_owned()),
            ..FleetFilter::default()
        })
        .is_empty()
    );
    assert_eq!(
        ids(FleetFilter {
            digests: Some(vec![v2]),
            ..FleetFilter::default()
        }),
        vec![eu_canary.id.clone()]
    );
    assert_eq!(
        ids(FleetFilter {
            stale: Some(true),
            ..FleetFilter::default()
        }),
        vec![eu.id.clone()]
    );
    assert_eq!(
        ids(FleetFilter {
            search: Some(us.id[3..9].to_owned()),
            ..FleetFilter::default()
        }),
        vec![us.id.clone()]
    );
    assert_eq!(
        ids(FleetFilter {
            revoked: Some(true),
            ..FleetFilter::default()
        }),
        vec![gone.id.clone()]
    );

    let details = store
        .fleet_details(&[us.id.clone(), eu.id.clone(), "nobody".to_owned()])
        .unwrap();
    let mut page = vec![eu.id.clone(), us.id.clone()];
    page.sort();
    assert_eq!(
        details
            .agents
            .iter()
            .map(|agent| agent.id.clone())
            .collect::<Vec<_>>(),
        page
    );
    assert_eq!(
        details
            .agents
            .iter()
            .find(|a| a.id == us.id)
            .unwrap()
            .labels,
        labels(&[("region", "us")])
    );
    assert_eq!(details.assignments.len(), 2);
    assert_eq!(details.statuses.len(), 1);
    assert_eq!(details.statuses[0].agent, eu.id);

    let summary = store.fleet_summary().unwrap();
    assert_eq!((summary.agents, summary.revoked, summary.stale), (4, 1, 1));
    assert_eq!(
        summary.phases,
        [
            ("pos".to_owned(), "Failed".to_owned(), 1),
            ("pos".to_owned(), "Healthy".to_owned(), 1),
            ("pos".to_owned(), "Unknown".to_owned(), 1)
        ]
    );
    assert_eq!(
        summary.assigned,
        [("pos".to_owned(), v1, 2), ("pos".to_owned(), v2, 1)]
    );
    assert_eq!(
        summary.labels,
        [
            ("region".to_owned(), "eu".to_owned(), 2),
            ("region".to_owned(), "us".to_owned(), 1),
            ("ring".to_owned(), "canary".to_owned(), 1)
        ]
    );
}

pub(crate) fn the_change_feed_names_what_changed_and_nothing_else(store: &dyn HubStore) {
    use outpost_proto::wire::Phase;
    let start = store.change_cursor().unwrap();
    let first = enrolled(store, 1, &[("region", "eu")]);
    let second = enrolled(store, 2, &[("region", "us")]);
    let feed = store.changes_since(start).unwrap();
    let mut both = vec![first.id.clone(), second.id.clone()];
    both.sort();
    assert_eq!(feed.agents, both);
    assert!(feed.statuses.is_empty());
    // Nothing new: nothing named.
    let quiet = store.changes_since(feed.cursor).unwrap();
    assert!(quiet.agents.is_empty() && quiet.statuses.is_empty());
    assert_eq!(quiet.cursor, feed.cursor);
    // A label change, an assignment and a report each name their agent.
    let mut change = BTreeMap::new();
    change.insert("ring".to_owned(), Some("canary".to_owned()));
    store.label_agent(&second.id, &change, "ops", 200).unwrap();
    let labelled = store.changes_since(feed.cursor).unwrap();
    assert_eq!(labelled.agents, vec![second.id.clone()]);
    let digest = Digest::of(b"v1");
    store
        .change_assignments(
            &[AssignmentChange {
                agent: first.id.clone(),
                bundle: "pos".to_owned(),
                to: Some((1, digest)),
                origin: "track:repo".to_owned(),
            }],
            210,
        )
        .unwrap();
    let assigned = store.changes_since(labelled.cursor).unwrap();
    assert_eq!(assigned.agents, vec![first.id.clone()]);
    store
        .record_status(
            &first.id,
            1,
            &[status("pos", digest, Phase::Healthy, false)],
            220,
        )
        .unwrap();
    let reported = store.changes_since(assigned.cursor).unwrap();
    assert!(reported.agents.is_empty());
    assert_eq!(reported.statuses.len(), 1);
    assert_eq!(reported.statuses[0].agent, first.id);
    store.revoke_agent(&second.id, "ops", "lost", 230).unwrap();
    let revoked = store.changes_since(reported.cursor).unwrap();
    assert_eq!(revoked.agents, vec![second.id.clone()]);
    assert_eq!(store.change_cursor().unwrap(), revoked.cursor);
}

/// A rollout plan for the store tests: tag v2 of `pos`, waves 1 then 100 %, no failure allowed.
pub(crate) fn two_wave_plan() -> crate::rollout::machine::Plan {
    use crate::rollout::machine::{OnFailure, Plan, Size};
    Plan {
        bundle: "pos".to_owned(),
        source: "file:///git".to_owned(),
        git_ref: "refs/tags/v2".to_owned(),
        git_commit: "c0ffee".to_owned(),
        selector: String::new(),
        waves: vec![Size::Count(1), Size::Percent(100)],
        health_timeout: 600,
        max_failures: Size::Count(0),
        on_failure: OnFailure::Pause,
    }
}

pub(crate) fn rollouts_keep_members_in_rows_and_refuse_lost_updates(store: &dyn HubStore) {
    use crate::rollout::machine::{Input, Rollout};
    let mut rollout = Rollout::new(0, two_wave_plan(), "alice", "ship it", 100).unwrap();
    assert_eq!(
        store.create_rollout(&mut rollout).unwrap(),
        Created::Created(1)
    );
    let mut again = rollout.clone();
    assert_eq!(store.create_rollout(&mut again).unwrap(), Created::Busy(1));
    assert_eq!(store.live_rollouts().unwrap(), vec![(1, 1)]);
    let target = crate::rollout::machine::Assigned {
        generation: 2,
        digest: Digest::of(b"v2"),
        origin: String::new(),
    };
    let inputs: Vec<Input> = (0..3)
        .map(|index| Input::Agent {
            id: format!("agent-{index}"),
            matches: true,
            canary: false,
            target: Some(target.clone()),
            current: None,
        })
        .collect();
    let log_from = rollout.log.len();
    let changes = rollout.step(&inputs, 110);
    assert_eq!(changes.len(), 1, "the first wave: one agent");
    let touched = rollout.take_touched();
    assert_eq!(touched.len(), 3);
    let save = |rollout: &Rollout, version: u64, touched: &[String], log_from: usize| {
        store
            .save_rollout(&RolloutSave {
                rollout,
                version,
                members: touched,
                log_from,
                changes: &[],
                now: 110,
            })
            .unwrap()
    };
    let Saved::Saved { version, .. } = save(&rollout, 1, &touched, log_from) else {
        panic!("the first save conflicted");
    };
    assert_eq!(version, 2);
    let stored = store.rollout(1).unwrap().unwrap();
    assert_eq!(stored.version, 2);
    assert_eq!(
        stored.rollout, rollout,
        "members and history read back whole"
    );
    // A save from the version before is refused and writes nothing.
    let mut stale = rollout.clone();
    stale
        .command(
            crate::rollout::machine::Command::Pause,
            "bob",
            "freeze",
            120,
        )
        .unwrap();
    assert_eq!(save(&stale, 1, &[], log_from + 1), Saved::Conflict);
    assert_eq!(store.rollout(1).unwrap().unwrap().rollout, rollout);
    // The list shows counts without reading members.
    let heads = store.rollouts().unwrap();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].rollout.members.is_empty());
    assert_eq!(heads[0].created_by, "alice");
    assert_eq!(heads[0].progress, rollout.progress());
    assert_eq!(heads[0].progress.members, 3);
    assert_eq!(heads[0].progress.on_release, 1);
}

fn snapshot_of(generation: u64, body: &[u8]) -> StoredSnapshot {
    StoredSnapshot {
        bundle: "pos".to_owned(),
        generation,
        digest: Digest::of(body),
        git_commit: format!("c{generation}"),
        git_ref: "refs/heads/main".to_owned(),
        header: vec![generation as u8],
        signature: vec![0; 64],
        body: body.to_vec(),
        object_count: 1,
        created_at: 100,
    }
}

pub(crate) fn retention_never_deletes_what_is_referenced(store: &dyn HubStore) {
    use crate::rollout::machine::{Assigned, Command, Input, OnFailure, Plan, Rollout, Size};
    // Twelve generations of one bundle; generation 8 is generation 3's body signed again.
    let bodies: Vec<Vec<u8>> = (1..=12u8)
        .map(|n| match n {
            8 => b"body-3".to_vec(),
            n => format!("body-{n}").into_bytes(),
        })
        .collect();
    for (index, body) in bodies.iter().enumerate() {
        let generation = store.next_generation("pos").unwrap();
        assert_eq!(generation, index as u64 + 1);
        store
            .insert_snapshot(
                &snapshot_of(generation, body),
                &format!("tree-{generation}"),
                "",
            )
            .unwrap();
    }
    let digest = |generation: usize| Digest::of(&bodies[generation - 1]);
    let a = enrolled(store, 1, &[]);
    let b = enrolled(store, 2, &[]);
    let c = enrolled(store, 3, &[]);
    let assign = |agent: &Agent, generation: usize, at: i64| {
        store
            .change_assignments(
                &[AssignmentChange {
                    agent: agent.id.clone(),
                    bundle: "pos".to_owned(),
                    to: Some((generation as u64, digest(generation))),
                    origin: "track:repo".to_owned(),
                }],
                at,
            )
            .unwrap();
    };
    assign(&a, 1, 100); // 1: assigned
    assign(&b, 3, 100); // 3: a base b holds (its body lives on in 8, the newest with it)
    assign(&b, 12, 110);
    for (offset, generation) in [1usize, 2, 4, 5, 11, 12].into_iter().enumerate() {
        assign(&c, generation, 200 + offset as i64); // c's bases: only the newest count
    }
    store
        .upsert_release(&Release {
            source: "repo".to_owned(),
            git_ref: "refs/tags/v2".to_owned(),
            bundle: "pos".to_owned(),
            variant: String::new(),
            git_commit: "c2".to_owned(),
            generation: Some(2), // 2: released
            error: None,
            updated_at: 100,
        })
        .unwrap();
    let plan = Plan {
        bundle: "pos".to_owned(),
        source: "repo".to_owned(),
        git_ref: "refs/tags/v2".to_owned(),
        git_commit: "c2".to_owned(),
        selector: String::new(),
        waves: vec![Size::Percent(100)],
        health_timeout: 600,
        max_failures: Size::Count(0),
        on_failure: OnFailure::Pause,
    };
    let member = |target: usize, previous: Option<usize>| Input::Agent {
        id: "agent-x".to_owned(),
        matches: true,
        canary: false,
        target: Some(Assigned {
            generation: target as u64,
            digest: digest(target),
            origin: String::new(),
        }),
        current: previous.map(|previous| Assigned {
            generation: previous as u64,
            digest: digest(previous),
            origin: "track:repo".to_owned(),
        }),
    };
    let save = |rollout: &mut Rollout, version: u64, log_from: usize| {
        let touched = rollout.take_touched();
        store
            .save_rollout(&RolloutSave {
                rollout,
                version,
                members: &touched,
                log_from,
                changes: &[],
                now: 120,
            })
            .unwrap()
    };
    // 6: the target of a rollout since rolled back (it cannot act again): not protected.
    let mut old = Rollout::new(0, plan.clone(), "ops", "", 100).unwrap();
    store.create_rollout(&mut old).unwrap();
    old.step(&[member(6, None)], 110);
    old.command(Command::Rollback, "ops", "bad", 111).unwrap();
    assert!(matches!(save(&mut old, 1, 1), Saved::Saved { .. }));
    // 4 and 5: what a running rollout gives back and releases.
    let mut live = Rollout::new(0, plan, "ops", "", 100).unwrap();
    store.create_rollout(&mut live).unwrap();
    live.step(&[member(5, Some(4))], 110);
    assert!(matches!(save(&mut live, 1, 1), Saved::Saved { .. }));
    // Old events and history, and fresh ones.
    for at in [10, 20, 1_000_000] {
        store.add_event(at, "test", "x", "y").unwrap();
    }
    for (sequence, at) in [(1, 10), (2, 1_000_000)] {
        let report = status("pos", digest(1), outpost_proto::wire::Phase::Healthy, false);
        store.record_status(&a.id, sequence, &[report], at).unwrap();
    }
    assert_eq!(store.status_history_len(&a.id).unwrap(), 2);
    let policy = Retention {
        events_age: 1_000,
        events_max: 1_000,
        history_age: 1_000,
        history_max: 1_000,
        snapshots_kept: 2, // 11 and 12 by recency
    };
    let now = 1_000_100;
    let before = store.events(100).unwrap().len();
    let pruned = store.prune(&policy, now).unwrap();
    assert_eq!(
        pruned.events as usize,
        before - store.events(100).unwrap().len()
    );
    assert!(
        store
            .events(100)
            .unwrap()
            .iter()
            .all(|event| event.at >= now - 1_000)
    );
    assert_eq!(
        pruned.delta_bases, 2,
        "c had six bases of which the newest four stay"
    );
    let kept = |generation: u64| store.snapshot("pos", generation).unwrap().is_some();
    for generation in [1, 2, 4, 5, 8, 11, 12] {
        assert!(kept(generation), "generation {generation} is referenced");
    }
    for generation in [3, 6, 7, 9, 10] {
        assert!(
            !kept(generation),
            "generation {generation} is referenced by nothing"
        );
    }
    assert_eq!(pruned.snapshots, 5);
    assert_eq!(
        store.snapshot_body("pos", &digest(3)).unwrap(),
        Some(bodies[2].clone()),
        "the base b holds is still there to compress against"
    );
    assert_eq!(store.snapshot_body("pos", &digest(7)).unwrap(), None);
    assert_eq!(pruned.bodies, 4, "6, 7, 9 and 10");
    assert_eq!(store.rendered("pos", "tree-7", "").unwrap(), None);
    assert_eq!(store.rendered("pos", "tree-1", "").unwrap(), Some(1));
    assert_eq!(pruned.renders, 5);
    assert!(
        store.prune(&policy, now).unwrap().is_empty(),
        "a second pass finds nothing"
    );
    // Collected generations are never handed out again.
    assert_eq!(store.next_generation("pos").unwrap(), 13);
}

pub(crate) fn snapshots_renders_and_releases_round_trip(store: &dyn HubStore) {
    let first = snapshot_of(1, b"body one");
    store.insert_snapshot(&first, "tree-a", "").unwrap();
    assert_eq!(store.rendered("pos", "tree-a", "").unwrap(), Some(1));
    assert_eq!(store.rendered("pos", "tree-a", "region=eu").unwrap(), None);
    assert_eq!(store.snapshot("pos", 1).unwrap(), Some(first.clone()));
    assert_eq!(store.snapshot("pos", 2).unwrap(), None);
    // The same body signed again under a newer generation: found by digest as the newest,
    // its body served, kept once.
    let mut again = snapshot_of(2, b"body one");
    again.header = vec![42];
    store.insert_resigned(&again).unwrap();
    assert_eq!(
        store.snapshot_by_digest("pos", &first.digest).unwrap(),
        Some(again.clone())
    );
    assert_eq!(
        store.snapshot_body("pos", &first.digest).unwrap(),
        Some(b"body one".to_vec())
    );
    assert_eq!(store.snapshot_body("kiosk", &first.digest).unwrap(), None);
    assert_eq!(
        store.signed_header("pos", 2).unwrap(),
        Some((vec![42], vec![0; 64]))
    );
    assert_eq!(store.snapshot_digest("pos", 2).unwrap(), Some(first.digest));
    assert_eq!(store.snapshot_digest("pos", 9).unwrap(), None);
    // A render remembered for another tree, then moved to another generation.
    store.insert_render("pos", "tree-b", "", 1).unwrap();
    assert_eq!(store.rendered("pos", "tree-b", "").unwrap(), Some(1));
    store.insert_render("pos", "tree-b", "", 2).unwrap();
    assert_eq!(store.rendered("pos", "tree-b", "").unwrap(), Some(2));

    let release = |variant: &str, generation: Option<u64>, error: Option<&str>| Release {
        source: "fleet".to_owned(),
        git_ref: "refs/tags/v1".to_owned(),
        bundle: "pos".to_owned(),
        variant: variant.to_owned(),
        git_commit: "c1".to_owned(),
        generation,
        error: error.map(str::to_owned),
        updated_at: 100,
    };
    assert!(store.upsert_release(&release("", Some(1), None)).unwrap());
    assert!(!store.upsert_release(&release("", Some(1), None)).unwrap());
    assert!(
        store
            .upsert_release(&release("", None, Some("bad yaml")))
            .unwrap()
    );
    assert!(
        !store
            .upsert_release(&release("", None, Some("bad yaml")))
            .unwrap()
    );
    assert!(store.upsert_release(&release("", Some(1), None)).unwrap());
    assert!(store.upsert_release(&release("eu", Some(2), None)).unwrap());
    assert!(store.upsert_release(&release("us", Some(2), None)).unwrap());
    let variants = |store: &dyn HubStore| -> Vec<String> {
        store
            .releases()
            .unwrap()
            .into_iter()
            .map(|release| release.variant)
            .collect()
    };
    assert_eq!(variants(store), ["", "eu", "us"]);
    // Only generations a release or an assignment names are in use.
    let in_use: Vec<u64> = store
        .headers_in_use()
        .unwrap()
        .into_iter()
        .map(|(_, generation, _)| generation)
        .collect();
    assert_eq!(in_use, [1, 2]);
    store
        .retain_variants(
            "fleet",
            "refs/tags/v1",
            "pos",
            &["".to_owned(), "us".to_owned()],
        )
        .unwrap();
    assert_eq!(variants(store), ["", "us"]);
    // A generation replaced (signed again) moves releases, renders and assignments with it.
    let agent = enrolled(store, 1, &[]);
    store
        .change_assignments(
            &[AssignmentChange {
                agent: agent.id.clone(),
                bundle: "pos".to_owned(),
                to: Some((1, first.digest)),
                origin: "track:fleet".to_owned(),
            }],
            110,
        )
        .unwrap();
    let sequence = store.assignments(&agent.id).unwrap().sequence;
    let third = snapshot_of(3, b"body one");
    store.insert_resigned(&third).unwrap();
    assert_eq!(
        store.replace_generation("pos", 1, 3, 120).unwrap(),
        vec![agent.id.clone()]
    );
    let assignments = store.assignments(&agent.id).unwrap();
    assert_eq!(assignments.entries[0].generation, 3);
    assert_eq!(assignments.sequence, sequence + 1);
    assert_eq!(store.rendered("pos", "tree-a", "").unwrap(), Some(3));
    assert_eq!(store.releases().unwrap()[0].generation, Some(3));
    store.delete_releases("fleet", "refs/tags/v1").unwrap();
    assert!(store.releases().unwrap().is_empty());
}

pub(crate) fn assignments_sessions_and_reports(store: &dyn HubStore) {
    use outpost_proto::wire::Phase;
    let a = enrolled(store, 1, &[("region", "eu")]);
    let b = enrolled(store, 2, &[("region", "eu")]);
    let c = enrolled(store, 3, &[("region", "us")]);
    let row = |agent: &Agent, bundle: &str, generation: u64| AssignmentRow {
        agent: agent.id.clone(),
        bundle: bundle.to_owned(),
        generation,
        digest: Digest::of(&[generation as u8]),
    };
    // One origin sets what it wants; another origin's rows are never its to change.
    let mut changed = store
        .set_assignments("track:fleet", &[row(&a, "pos", 1), row(&b, "pos", 1)], 100)
        .unwrap();
    changed.sort();
    let mut ab = vec![a.id.clone(), b.id.clone()];
    ab.sort();
    assert_eq!(changed, ab);
    assert!(
        store
            .set_assignments("track:fleet", &[row(&a, "pos", 1), row(&b, "pos", 1)], 101)
            .unwrap()
            .is_empty()
    );
    store
        .change_assignments(
            &[AssignmentChange {
                agent: b.id.clone(),
                bundle: "pos".to_owned(),
                to: Some((2, Digest::of(&[2]))),
                origin: "rollout:1".to_owned(),
            }],
            102,
        )
        .unwrap();
    assert_eq!(
        store
            .set_assignments("track:fleet", &[row(&a, "pos", 3), row(&b, "pos", 3)], 103)
            .unwrap(),
        vec![a.id.clone()]
    );
    assert_eq!(
        store.assigned_by("rollout:1", "pos").unwrap(),
        vec![b.id.clone()]
    );
    assert_eq!(store.bundles_assigned_by("track:fleet").unwrap(), ["pos"]);
    let all = store.bundle_assignments(None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].0.generation, 3);
    assert_eq!(all[1].1, "rollout:1");
    assert!(store.bundle_assignments(Some("kiosk")).unwrap().is_empty());
    // Withdrawn when no longer wanted.
    assert_eq!(
        store.set_assignments("track:fleet", &[], 104).unwrap(),
        vec![a.id.clone()]
    );
    assert!(store.assignments(&a.id).unwrap().entries.is_empty());
    assert_eq!(store.assignments(&a.id).unwrap().sequence, 3);
    assert_eq!(store.assignments("no-such-agent").unwrap().sequence, 0);
    // Tracking writes only its own rows and unassigns only its own.
    let mut tracked = store
        .set_tracked(
            "track:fleet",
            "pos",
            &[row(&a, "pos", 4), row(&b, "pos", 4), row(&c, "pos", 4)],
            &[],
            105,
        )
        .unwrap();
    tracked.sort();
    let mut ac = vec![a.id.clone(), c.id.clone()];
    ac.sort();
    assert_eq!(tracked, ac);
    assert_eq!(store.assignments(&b.id).unwrap().entries[0].generation, 2);
    assert_eq!(
        store
            .set_tracked(
                "track:fleet",
                "pos",
                &[],
                &[b.id.clone(), c.id.clone()],
                106
            )
            .unwrap(),
        vec![c.id.clone()]
    );
    // Sessions: read in the order asked, an unknown id gives nothing; delta bases are the
    // newest few snapshots assigned.
    for generation in 5..=10 {
        store
            .set_tracked(
                "track:fleet",
                "pos",
                &[row(&a, "pos", generation)],
                &[],
                100 + generation as i64,
            )
            .unwrap();
    }
    let reads = store
        .session_reads(&[c.id.clone(), "nobody".to_owned(), a.id.clone()], true)
        .unwrap();
    assert_eq!(reads.len(), 3);
    assert_eq!(
        reads[0].agent.as_ref().map(|agent| agent.id.clone()),
        Some(c.id.clone())
    );
    assert!(reads[0].assignments.entries.is_empty());
    assert_eq!(reads[1], SessionRead::default());
    assert_eq!(reads[2].assignments.entries, [row(&a, "pos", 10)]);
    assert_eq!(
        reads[2].agent.as_ref().unwrap().labels,
        labels(&[("region", "eu")])
    );
    let mut bases: Vec<Digest> = reads[2].bases.iter().map(|(_, digest)| *digest).collect();
    bases.sort();
    let mut newest: Vec<Digest> = (7..=10u8).map(|g| Digest::of(&[g])).collect();
    newest.sort();
    assert_eq!(bases, newest);
    let mut direct: Vec<Digest> = store
        .delta_bases(&a.id)
        .unwrap()
        .into_iter()
        .map(|(_, digest)| digest)
        .collect();
    direct.sort();
    assert_eq!(direct, newest);
    assert!(
        store
            .session_reads(std::slice::from_ref(&a.id), false)
            .unwrap()[0]
            .bases
            .is_empty()
    );
    // Connections: the last of a batch wins.
    store
        .agents_connected(&[
            (a.id.clone(), "0.1".to_owned(), 200),
            (b.id.clone(), "0.1".to_owned(), 201),
            (a.id.clone(), "0.2".to_owned(), 202),
        ])
        .unwrap();
    store.agent_connected(&c.id, "0.3", 203).unwrap();
    let seen: Vec<Option<i64>> = store
        .agents()
        .unwrap()
        .iter()
        .map(|agent| agent.last_seen)
        .collect();
    let mut expected = vec![
        (a.id.clone(), Some(202)),
        (b.id.clone(), Some(201)),
        (c.id.clone(), Some(203)),
    ];
    expected.sort();
    assert_eq!(
        seen,
        expected.into_iter().map(|(_, at)| at).collect::<Vec<_>>()
    );
    // Reports: in sequence order only, only for bundles assigned, a bad one fails alone.
    let healthy = status("pos", Digest::of(&[10]), Phase::Healthy, false);
    let outcomes = store
        .record_statuses(&[
            StatusWrite {
                agent: a.id.clone(),
                sequence: 2,
                bundles: vec![
                    healthy.clone(),
                    status("kiosk", Digest::of(&[1]), Phase::Failed, false),
                ],
                drift: Vec::new(),
                now: 300,
            },
            StatusWrite {
                agent: a.id.clone(),
                sequence: 1,
                bundles: vec![status("pos", Digest::of(&[10]), Phase::Failed, false)],
                drift: Vec::new(),
                now: 301,
            },
            StatusWrite {
                agent: "nobody".to_owned(),
                sequence: 1,
                bundles: vec![healthy.clone()],
                drift: Vec::new(),
                now: 302,
            },
            StatusWrite {
                agent: b.id.clone(),
                sequence: 1,
                bundles: vec![status("pos", Digest::of(&[2]), Phase::Degraded, true)],
                drift: Vec::new(),
                now: 303,
            },
        ])
        .unwrap();
    assert_eq!(outcomes, [Ok(true), Ok(false), Ok(false), Ok(true)]);
    let statuses = store.statuses(Some(&a.id)).unwrap();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].status, healthy);
    assert_eq!(statuses[0].received_at, 300);
    assert_eq!(store.statuses(None).unwrap().len(), 2);
    assert_eq!(store.status_history_len(&a.id).unwrap(), 1);
    // The reported phase is what the fleet counts by.
    let by_phase = |phase: &str| {
        store
            .fleet_ids(&FleetFilter {
                bundle: Some("pos".to_owned()),
                phase: Some(phase.to_owned()),
                ..FleetFilter::default()
            })
            .unwrap()
    };
    assert_eq!(by_phase("Healthy"), vec![a.id.clone()]);
    assert_eq!(by_phase("Degraded"), vec![b.id.clone()]);
    assert!(
        store
            .events(10)
            .unwrap()
            .iter()
            .any(|event| event.kind == "agent-stale")
    );
    // Label sets and labels: revoked agents are not counted.
    store.revoke_agent(&c.id, "ops", "stolen", 400).unwrap();
    assert_eq!(store.label_sets().unwrap(), [labels(&[("region", "eu")])]);
    let mut listed: Vec<String> = store
        .agent_labels(None)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    listed.sort();
    assert_eq!(listed, ab);
    assert_eq!(
        store
            .agent_labels(Some(&[c.id.clone(), b.id.clone()]))
            .unwrap(),
        [(b.id.clone(), labels(&[("region", "eu")]))]
    );
    // Pages: in id order after a cursor, with the count and whether more follow.
    let first = store.fleet_page(&FleetFilter::default(), None, 2).unwrap();
    let mut ids = [a.id.clone(), b.id.clone(), c.id.clone()];
    ids.sort();
    assert_eq!(first.ids, ids[..2]);
    assert_eq!((first.matched, first.more), (3, true));
    let rest = store
        .fleet_page(
            &FleetFilter::default(),
            first.ids.last().map(String::as_str),
            2,
        )
        .unwrap();
    assert_eq!(rest.ids, ids[2..]);
    assert_eq!((rest.matched, rest.more), (3, false));
}

pub(crate) fn many_tokens_are_created_at_once(store: &dyn HubStore) {
    let digests: Vec<Digest> = (0..50u8).map(|n| Digest::of(&[n, 1])).collect();
    store
        .create_tokens(&digests, &labels(&[("site", "depot")]), "ops", 100, 200)
        .unwrap();
    let tokens = store.tokens().unwrap();
    assert_eq!(tokens.len(), 50);
    assert!(
        tokens
            .iter()
            .all(|token| token.labels == labels(&[("site", "depot")]))
    );
    let agent = store.enrol(&digests[7], &[9; 32], 150).unwrap().unwrap();
    assert_eq!(agent.labels, labels(&[("site", "depot")]));
    // All or nothing: a batch with one already stored keeps none of it.
    let again = vec![Digest::of(b"new one"), digests[0]];
    assert!(
        store
            .create_tokens(&again, &BTreeMap::new(), "ops", 100, 200)
            .is_err()
    );
    assert_eq!(store.tokens().unwrap().len(), 50);
}

/// Generates one `#[test]` per suite function, each on a store made by `$make` (an
/// expression evaluated per test that yields something holding a store as `.store`).
pub(crate) fn an_agents_history_is_found_by_its_id(store: &dyn HubStore) {
    use crate::rollout::machine::{Input, Rollout};
    let a = enrolled(store, 31, &[("region", "eu")]);
    let b = enrolled(store, 32, &[("region", "us")]);
    store
        .label_agent(
            &a.id,
            &[("ring".to_owned(), Some("canary".to_owned()))].into(),
            "ops",
            130,
        )
        .unwrap();
    for agent in [&a.id, &b.id] {
        store
            .add_event(
                131,
                "api-write",
                "ops",
                &format!("POST /api/v1/agents/{agent}/labels → 200 (role operator)"),
            )
            .unwrap();
    }
    let events = store.agent_events(&a.id, 100).unwrap();
    let kinds: Vec<&str> = events.iter().map(|event| event.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["api-write", "agent-labelled", "agent-enrolled"],
        "newest first"
    );
    assert!(
        events
            .iter()
            .all(|event| event.subject == a.id || event.message.contains(&a.id))
    );
    assert_eq!(store.agent_events(&a.id, 1).unwrap().len(), 1);
    // Reports count only for assigned bundles.
    assign_pos_v1(store, &[&a, &b], 135);
    for (sequence, phase, at) in [
        (1, outpost_proto::wire::Phase::Applying, 140),
        (2, outpost_proto::wire::Phase::Healthy, 150),
    ] {
        let report = status("pos", Digest::of(b"v1"), phase, false);
        store.record_status(&a.id, sequence, &[report], at).unwrap();
    }
    let report = status(
        "pos",
        Digest::of(b"v1"),
        outpost_proto::wire::Phase::Failed,
        false,
    );
    store.record_status(&b.id, 1, &[report], 150).unwrap();
    let history = store.status_history(&a.id, 10).unwrap();
    assert_eq!(
        history
            .iter()
            .map(|row| (row.phase.as_str(), row.received_at))
            .collect::<Vec<_>>(),
        [("Healthy", 150), ("Applying", 140)]
    );
    assert_eq!(history[0].bundle, "pos");
    assert_eq!(history[0].observed_at, 120);
    // Order is the agent's outbox sequence, never its clock: a device that booted in 1970
    // is heard, and an old report with a clock far ahead is not.
    let mut from_1970 = status(
        "pos",
        Digest::of(b"v1"),
        outpost_proto::wire::Phase::Degraded,
        false,
    );
    from_1970.observed_at = 0;
    assert!(store.record_status(&a.id, 3, &[from_1970], 170).unwrap());
    let mut replayed = status(
        "pos",
        Digest::of(b"v1"),
        outpost_proto::wire::Phase::Healthy,
        false,
    );
    replayed.observed_at = 4_000_000_000;
    assert!(!store.record_status(&a.id, 2, &[replayed], 171).unwrap());
    let last = store.statuses(Some(&a.id)).unwrap();
    assert_eq!(last[0].status.phase, outpost_proto::wire::Phase::Degraded);
    assert_eq!(
        last[0].received_at, 170,
        "the hub's clock says when it arrived"
    );
    // Rollouts: a is a member of one, b of none.
    let mut rollout = Rollout::new(0, two_wave_plan(), "alice", "ship it", 100).unwrap();
    store.create_rollout(&mut rollout).unwrap();
    let target = crate::rollout::machine::Assigned {
        generation: 2,
        digest: Digest::of(b"v2"),
        origin: String::new(),
    };
    let log_from = rollout.log.len();
    rollout.step(
        &[Input::Agent {
            id: a.id.clone(),
            matches: true,
            canary: true,
            target: Some(target),
            current: None,
        }],
        160,
    );
    let touched = rollout.take_touched();
    store
        .save_rollout(&RolloutSave {
            rollout: &rollout,
            version: 1,
            members: &touched,
            log_from,
            changes: &[],
            now: 160,
        })
        .unwrap();
    assert_eq!(store.rollouts_of(&a.id).unwrap(), vec![rollout.id]);
    assert!(store.rollouts_of(&b.id).unwrap().is_empty());
}

pub(crate) fn a_hub_behind_its_agent_moves_past_it(store: &dyn HubStore) {
    let a = enrolled(store, 41, &[]);
    assert_eq!(store.assignments(&a.id).unwrap().sequence, 0);
    assert_eq!(store.next_generation("pos").unwrap(), 1);
    // The agent saw sequence 5 and holds generation 7 of pos, and 2 of a bundle new here.
    let moved = store
        .advance_past(
            &a.id,
            5,
            &[("pos".to_owned(), 7), ("kiosk".to_owned(), 2)],
            300,
        )
        .unwrap();
    assert!(moved);
    assert_eq!(store.assignments(&a.id).unwrap().sequence, 6);
    assert_eq!(
        store.next_generation("pos").unwrap(),
        8,
        "never 2..=7 again"
    );
    assert_eq!(store.next_generation("kiosk").unwrap(), 3);
    assert!(
        store
            .agent_events(&a.id, 10)
            .unwrap()
            .iter()
            .any(|event| event.kind == "hub-behind-agent")
    );
    // Already past: nothing moves, nothing is recorded.
    assert!(
        !store
            .advance_past(&a.id, 3, &[("pos".to_owned(), 4)], 301)
            .unwrap()
    );
    assert_eq!(store.assignments(&a.id).unwrap().sequence, 6);
    assert_eq!(store.next_generation("pos").unwrap(), 9);
    // Counters that do not fit a signed 64-bit integer plus one step are refused and nothing
    // is stored: the bundle and the agent go on as before.
    use outpost_proto::wire::MAX_COUNTER;
    for value in [MAX_COUNTER, MAX_COUNTER + 1, u64::MAX - 1, u64::MAX] {
        assert!(
            matches!(
                store.advance_past(&a.id, value, &[], 302),
                Err(StoreError::CounterOutOfRange { .. })
            ),
            "sequence {value}"
        );
        assert!(
            matches!(
                store.advance_past(&a.id, 7, &[("pos".to_owned(), value)], 302),
                Err(StoreError::CounterOutOfRange { .. })
            ),
            "generation {value}"
        );
    }
    assert_eq!(store.assignments(&a.id).unwrap().sequence, 6);
    assert_eq!(
        store.next_generation("pos").unwrap(),
        10,
        "the bundle goes on"
    );
    // The largest that fits is taken (0 and 2^63 − 2 at the edges).
    assert!(!store.advance_past(&a.id, 0, &[], 303).unwrap());
    assert!(
        store
            .advance_past(&a.id, MAX_COUNTER - 1, &[], 303)
            .unwrap()
    );
    assert_eq!(store.assignments(&a.id).unwrap().sequence, MAX_COUNTER);
}

pub(crate) fn drift_is_stored_once_per_report_and_stands_per_bundle(store: &dyn HubStore) {
    use outpost_proto::wire::{BundleDrift, DriftAction, FieldDrift, ObjectDrift};
    let a = enrolled(store, 51, &[]);
    let b = enrolled(store, 52, &[]);
    assign_pos_v1(store, &[&a, &b], 100);
    let object = |name: &str, deleted: bool| ObjectDrift {
        api_version: "v1".to_owned(),
        kind: "ConfigMap".to_owned(),
        namespace: "shop".to_owned(),
        name: name.to_owned(),
        deleted,
        fields: match deleted {
            true => Vec::new(),
            false => vec![FieldDrift {
                path: "data.a".to_owned(),
                desired: Some("\"1\"".to_owned()),
                live: Some("\"2\"".to_owned()),
                manager: Some("kubectl-edit".to_owned()),
                changed_at: Some("2026-12-01T10:00:00Z".to_owned()),
            }],
        },
        more_fields: 0,
    };
    let drift = |bundle: &str, action, objects: Vec<ObjectDrift>, more_objects| BundleDrift {
        bundle: bundle.to_owned(),
        digest: Digest::of(b"v1"),
        generation: 1,
        action,
        objects,
        more_objects,
        observed_at: 90,
    };
    let write = |agent: &str, sequence, drift: Vec<BundleDrift>, now| StatusWrite {
        agent: agent.to_owned(),
        sequence,
        bundles: Vec::new(),
        drift,
        now,
    };
    let outcomes = store
        .record_statuses(&[
            write(
                &a.id,
                1,
                vec![
                    drift("pos", DriftAction::Left, vec![object("menu", false)], 0),
                    // Not assigned: dropped.
                    drift("kiosk", DriftAction::Left, vec![object("x", false)], 0),
                ],
                200,
            ),
            // A replay of the same sequence stores nothing.
            write(
                &a.id,
                1,
                vec![drift(
                    "pos",
                    DriftAction::Left,
                    vec![object("menu", false)],
                    0,
                )],
                201,
            ),
            write(
                &b.id,
                1,
                vec![drift(
                    "pos",
                    DriftAction::Corrected,
                    vec![object("menu", true)],
                    4,
                )],
                202,
            ),
        ])
        .unwrap();
    assert_eq!(outcomes, [Ok(true), Ok(false), Ok(true)]);
    let all = store
        .drift_reports(&DriftQuery {
            limit: 100,
            ..DriftQuery::default()
        })
        .unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(
        (all[0].agent.as_str(), all[0].action.as_str()),
        (b.id.as_str(), "corrected")
    );
    assert_eq!(all[0].total, 5, "one listed, four more");
    assert!(all[0].objects[0].deleted);
    assert_eq!(all[1].objects, vec![object("menu", false)]);
    assert_eq!((all[1].observed_at, all[1].received_at), (90, 200));
    let only_a = store
        .drift_reports(&DriftQuery {
            agent: Some(a.id.clone()),
            bundle: Some("pos".to_owned()),
            limit: 100,
            ..DriftQuery::default()
        })
        .unwrap();
    assert_eq!(only_a.len(), 1);
    let recent = store
        .drift_reports(&DriftQuery {
            since: Some(201),
            limit: 100,
            ..DriftQuery::default()
        })
        .unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].agent, b.id);
    // Where drift stands: left in place on a, corrected on b.
    let details = store.fleet_details(&[a.id.clone(), b.id.clone()]).unwrap();
    let mut states = details.drift.clone();
    states.sort_by(|x, y| x.agent.cmp(&y.agent));
    let of = |id: &str| states.iter().find(|s| s.agent == id).unwrap().clone();
    assert_eq!(
        (of(&a.id).left_objects, of(&a.id).left_since),
        (1, Some(200))
    );
    assert_eq!(
        (of(&b.id).corrected_objects, of(&b.id).corrected_at),
        (5, Some(202))
    );
    assert_eq!(of(&b.id).left_objects, 0);
    assert_eq!(store.fleet_summary().unwrap().drifted, 1);
    // Gone: an empty `left` report clears it, and the events tell the story.
    store
        .record_statuses(&[write(
            &a.id,
            2,
            vec![drift("pos", DriftAction::Left, Vec::new(), 0)],
            300,
        )])
        .unwrap();
    let details = store.fleet_details(std::slice::from_ref(&a.id)).unwrap();
    assert_eq!(
        (details.drift[0].left_objects, details.drift[0].left_since),
        (0, None)
    );
    assert_eq!(store.fleet_summary().unwrap().drifted, 0);
    let kinds: Vec<String> = store
        .agent_events(&a.id, 10)
        .unwrap()
        .into_iter()
        .map(|event| event.kind)
        .filter(|kind| kind.starts_with("drift"))
        .collect();
    assert_eq!(kinds, ["drift-gone", "drift-found"]);
    let corrected = store.agent_events(&b.id, 10).unwrap();
    assert!(
        corrected[0]
            .message
            .contains("5 objects drifted and applied back: ConfigMap shop/menu deleted; 4 more"),
        "{}",
        corrected[0].message
    );
    // Retention keeps drift reports like the status history.
    let pruned = store
        .prune(
            &Retention {
                history_age: 50,
                ..Retention::default()
            },
            300,
        )
        .unwrap();
    assert_eq!(pruned.drift_reports, 2, "the two received before 250");
}

macro_rules! store_suite {
    ($make:expr) => {
        crate::store::suite::store_suite!(@tests $make;
            a_token_enrols_one_agent_once,
            expired_tokens_and_enrolled_keys_are_refused,
            labels_change_and_revocation_is_recorded_with_who_and_why,
            tokens_are_found_by_digest_expire_and_revoke,
            ref_changes_are_new_moved_and_deleted,
            generations_only_grow,
            fleet_views_filter_count_and_read_pages,
            the_change_feed_names_what_changed_and_nothing_else,
            rollouts_keep_members_in_rows_and_refuse_lost_updates,
            retention_never_deletes_what_is_referenced,
            snapshots_renders_and_releases_round_trip,
            assignments_sessions_and_reports,
            many_tokens_are_created_at_once,
            an_agents_history_is_found_by_its_id,
            a_hub_behind_its_agent_moves_past_it,
            drift_is_stored_once_per_report_and_stands_per_bundle
        );
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                let made = $make;
                crate::store::suite::$name(&made.store);
            }
        )*
    };
}
pub(crate) use store_suite;
