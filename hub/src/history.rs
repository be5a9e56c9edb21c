//! One time line per device: everything the store knows about one agent, oldest first — its
//! enrolment, label changes, revocation and staleness (events), the API writes naming it (who),
//! the rollouts that released to it or gave it back its release and what their operators did
//! and why, the status reports it sent (what it installed and applied, and how it went), and
//! what it is assigned now.
//!
//! Assignments that follow a tracked branch are not stored per agent as they happen (a commit
//! would write a row per agent of the fleet); they show as what the agent then reported, and as
//! its assignment now.

use serde::Serialize;

use crate::store::{HubStore, StoreError};

/// One thing that happened to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// When (Unix seconds, the hub's clock; reports: when the hub received them).
    pub at: i64,
    /// What kind: an event kind (`agent-enrolled`, `agent-labelled`, `api-write`, …),
    /// `report`, `rollout-released`, `rollout-restored`, `rollout`, `assigned`, and
    /// `drift-corrected`, `drift-found`, `drift-gone` (who: the field managers that changed it).
    pub kind: String,
    /// The bundle it concerns, if one.
    pub bundle: Option<String>,
    /// Who did it (a token's name, `hub`, `agent`), when known.
    pub who: Option<String>,
    /// What, and why.
    pub what: String,
}

/// How much history to read of each kind.
const PER_KIND: usize = 1_000;

/// `agent`'s time line, oldest first, from `since` (Unix seconds) on; `None` if there is no
/// such agent.
pub fn agent_history(
    store: &dyn HubStore,
    agent: &str,
    since: i64,
    now: i64,
) -> Result<Option<Vec<Entry>>, StoreError> {
    if store.agent(agent)?.is_none() {
        return Ok(None);
    }
    let mut entries = Vec::new();
    for event in store.agent_events(agent, PER_KIND)? {
        if event.kind.starts_with("drift-") {
            // Told below from the reports themselves, with the bundle and the editors.
            continue;
        }
        let who = match event.kind.as_str() {
            "api-write" => Some(event.subject.clone()),
            "agent-stale" => Some("hub".to_owned()),
            _ => event
                .message
                .rsplit_once(" by ")
                .map(|(_, who)| who.split(':').next().unwrap_or(who).to_owned()),
        };
        entries.push(Entry {
            at: event.at,
            kind: event.kind,
            bundle: None,
            who,
            what: event.message,
        });
    }
    let drift = store.drift_reports(&crate::store::DriftQuery {
        agent: Some(agent.to_owned()),
        limit: PER_KIND,
        ..Default::default()
    })?;
    for record in drift {
        let mut managers: Vec<String> = record
            .objects
            .iter()
            .flat_map(|object| object.fields.iter().filter_map(|f| f.manager.clone()))
            .collect();
        managers.sort();
        managers.dedup();
        let action = match record.action.as_str() {
            "corrected" => outpost_proto::wire::DriftAction::Corrected,
            _ => outpost_proto::wire::DriftAction::Left,
        };
        let (kind, what) = crate::store::drift_message(
            &record.bundle,
            record.generation,
            action,
            &record.objects,
            record.total,
        );
        entries.push(Entry {
            at: record.received_at,
            kind: kind.to_owned(),
            bundle: Some(record.bundle),
            who: Some(match managers.is_empty() {
                true => "agent".to_owned(),
                false => managers.join(", "),
            }),
            what,
        });
    }
    for report in store.status_history(agent, PER_KIND)? {
        entries.push(Entry {
            at: report.received_at,
            kind: "report".to_owned(),
            bundle: Some(report.bundle),
            who: Some("agent".to_owned()),
            what: format!(
                "generation {}: {}{} (observed at {} by the device's clock)",
                report.generation,
                report.phase,
                match report.message.is_empty() {
                    true => String::new(),
                    false => format!(": {}", report.message),
                },
                outpost_proto::time::rfc3339(report.observed_at)
            ),
        });
    }
    for id in store.rollouts_of(agent)? {
        let Some(stored) = store.rollout(id)? else {
            continue;
        };
        let rollout = stored.rollout;
        let plan = &rollout.plan;
        let bundle = Some(plan.bundle.clone());
        let creator = rollout.log.first().map(|record| record.who.clone());
        if let Some(member) = rollout.members.get(agent) {
            if let Some(released_at) = member.released_at {
                entries.push(Entry {
                    at: released_at,
                    kind: "rollout-released".to_owned(),
                    bundle: bundle.clone(),
                    who: creator.clone(),
                    what: format!(
                        "rollout {id} released generation {} ({}){}; why: {}",
                        member.target.generation,
                        plan.git_ref,
                        member
                            .wave
                            .map_or(String::new(), |wave| format!(" in wave {}", wave + 1)),
                        rollout.log.first().map_or("", |record| record.why.as_str())
                    ),
                });
            }
            if let crate::rollout::machine::MemberState::Restored { was, .. } = &member.state {
                let at = rollout
                    .log
                    .iter()
                    .rev()
                    .find(|record| record.action.contains("roll"))
                    .map_or(rollout.updated_at, |record| record.at);
                entries.push(Entry {
                    at,
                    kind: "rollout-restored".to_owned(),
                    bundle: bundle.clone(),
                    who: Some("hub".to_owned()),
                    what: format!(
                        "rollout {id} gave back {} (it was {was})",
                        member
                            .previous
                            .as_ref()
                            .map_or("nothing".to_owned(), |previous| {
                                format!("generation {}", previous.generation)
                            })
                    ),
                });
            }
        }
        for record in &rollout.log {
            entries.push(Entry {
                at: record.at,
                kind: "rollout".to_owned(),
                bundle: bundle.clone(),
                who: Some(record.who.clone()),
                what: format!(
                    "rollout {id} ({} to {}): {}{}",
                    plan.git_ref,
                    match plan.selector.as_str() {
                        "" => "every agent",
                        selector => selector,
                    },
                    record.action,
                    match record.why.is_empty() {
                        true => String::new(),
                        false => format!("; why: {}", record.why),
                    }
                ),
            });
        }
    }
    for row in store.assignments(agent)?.entries {
        entries.push(Entry {
            at: now,
            kind: "assigned".to_owned(),
            bundle: Some(row.bundle.clone()),
            who: None,
            what: format!(
                "now assigned generation {} (snapshot {})",
                row.generation,
                row.digest.short()
            ),
        });
    }
    entries.retain(|entry| entry.at >= since);
    // Oldest first; at one instant, in the order things happen (the rollout's decision, then
    // what the agent did about it).
    let rank = |kind: &str| match kind {
        "rollout" => 0,
        "rollout-released" | "rollout-restored" => 1,
        "report" => 3,
        "assigned" => 4,
        _ => 2,
    };
    entries.sort_by_key(|entry| (entry.at, rank(&entry.kind)));
    Ok(Some(entries))
}
