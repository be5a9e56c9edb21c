//! [`FleetView`] on SQLite: filters become `EXISTS` conditions over the primary keys (one index
//! lookup per agent), counts are `GROUP BY`s, and a page's details are read with the page's
//! ids as one JSON array parameter.

use outpost_proto::Digest;
use rusqlite::types::Value;
use rusqlite::{Connection, params, params_from_iter};

use super::fleet::{STATUS_COLUMNS, assignment_from_row, status_from_row};
use super::store::{AGENT_COLUMNS, agent_from_row};
use super::{SqliteStore, digest_at};
use crate::store::labels_from_json;
use crate::store::view::{
    DRIFT_REPORT_COLUMNS, DRIFT_STATE_COLUMNS, FilterDialect, FilterValue, agent_path,
    drift_findings, filter_clause,
};
use crate::store::{
    Agent, DriftQuery, DriftRecord, DriftState, Event, FleetDetails, FleetFilter, FleetPage,
    FleetSummary, FleetView, HistoricStatus, StoreError,
};

/// The agents not revoked (the revoked are few, and indexed).
const NOT_REVOKED: &str = "NOT IN (SELECT id FROM agents WHERE revoked_at IS NOT NULL)";

/// SQLite's fleet filters: digests as one JSON array of hex texts.
const DIALECT: FilterDialect = FilterDialect {
    placeholder: |n| format!("?{n}"),
    digest_in: |list| format!("lower(hex(digest)) IN (SELECT value FROM json_each({list}))"),
    id_contains: |text| format!("instr(a.id, {text}) > 0"),
    stale: "stale = 1",
    truth: "1",
};

/// The WHERE clause and its parameters for `filter`, typed for SQLite.
fn conditions(filter: &FleetFilter) -> (String, Vec<Value>) {
    let (clause, values) = filter_clause(filter, &DIALECT);
    let values = values
        .into_iter()
        .map(|value| match value {
            FilterValue::Text(text) => Value::Text(text),
            FilterValue::Digests(digests) => Value::Text(
                serde_json::Value::Array(
                    digests
                        .iter()
                        .map(|digest| serde_json::Value::String(digest.to_hex()))
                        .collect(),
                )
                .to_string(),
            ),
        })
        .collect();
    (clause, values)
}

/// `ids` as one JSON array text (for `json_each`).
fn id_list(ids: &[String]) -> String {
    serde_json::Value::Array(
        ids.iter()
            .map(|id| serde_json::Value::String(id.clone()))
            .collect(),
    )
    .to_string()
}

fn agents_in(connection: &Connection, ids: &str) -> Result<Vec<Agent>, StoreError> {
    let mut statement = connection.prepare_cached(&format!(
        "SELECT {AGENT_COLUMNS}, label_set
         FROM agents WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
    ))?;
    let rows = statement.query_map([ids], |row| {
        agent_from_row(row, labels_from_json(&row.get::<_, String>(7)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

impl FleetView for SqliteStore {
    fn fleet_ids(&self, filter: &FleetFilter) -> Result<Vec<String>, StoreError> {
        let (clause, values) = conditions(filter);
        self.read(|connection| {
            let mut statement = connection
                .prepare_cached(&format!("SELECT a.id FROM agents a {clause} ORDER BY a.id"))?;
            let rows = statement.query_map(params_from_iter(values), |row| row.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn fleet_page(
        &self,
        filter: &FleetFilter,
        after: Option<&str>,
        limit: usize,
    ) -> Result<FleetPage, StoreError> {
        let (clause, mut values) = conditions(filter);
        let count_sql = format!("SELECT COUNT(*) FROM agents a {clause}");
        let count_values = values.clone();
        values.push(Value::Text(after.unwrap_or("").to_owned()));
        let after_at = values.len();
        values.push(Value::Integer(limit as i64 + 1));
        let limit_at = values.len();
        let join = if clause.is_empty() { "WHERE" } else { "AND" };
        let page_sql = format!(
            "SELECT a.id FROM agents a {clause} {join} a.id > ?{after_at} ORDER BY a.id LIMIT ?{limit_at}"
        );
        self.read(|connection| {
            let transaction = connection.unchecked_transaction()?;
            let matched: i64 = transaction
                .prepare_cached(&count_sql)?
                .query_row(params_from_iter(count_values), |row| row.get(0))?;
            let mut ids: Vec<String> = transaction
                .prepare_cached(&page_sql)?
                .query_map(params_from_iter(values), |row| row.get(0))?
                .collect::<Result<_, _>>()?;
            transaction.finish()?;
            let more = ids.len() > limit;
            ids.truncate(limit);
            Ok(FleetPage {
                ids,
                matched: matched as u64,
                more,
            })
        })
    }

    fn fleet_details(&self, ids: &[String]) -> Result<FleetDetails, StoreError> {
        let ids = id_list(ids);
        self.read(|connection| {
            let agents = agents_in(connection, &ids)?;
            let assignments = connection
                .prepare_cached(
                    "SELECT agent, bundle, generation, digest, origin FROM assignments
                     WHERE agent IN (SELECT value FROM json_each(?1)) ORDER BY agent, bundle",
                )?
                .query_map([&ids], |row| Ok((assignment_from_row(row)?, row.get(4)?)))?
                .collect::<Result<_, _>>()?;
            let statuses = connection
                .prepare_cached(&format!(
                    "SELECT {STATUS_COLUMNS} FROM bundle_status
                     WHERE agent IN (SELECT value FROM json_each(?1)) ORDER BY agent, bundle"
                ))?
                .query_map([&ids], status_from_row)?
                .collect::<Result<_, _>>()?;
            let drift = connection
                .prepare_cached(&format!(
                    "SELECT {DRIFT_STATE_COLUMNS} FROM drift_state
                     WHERE agent IN (SELECT value FROM json_each(?1)) ORDER BY agent, bundle"
                ))?
                .query_map([&ids], |row| {
                    Ok(DriftState {
                        agent: row.get(0)?,
                        bundle: row.get(1)?,
                        left_objects: row.get::<_, i64>(2)? as u64,
                        left_since: row.get(3)?,
                        corrected_objects: row.get::<_, i64>(4)? as u64,
                        corrected_at: row.get(5)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(FleetDetails {
                agents,
                assignments,
                statuses,
                drift,
            })
        })
    }

    fn agent_events(&self, agent: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT id, at, kind, subject, message FROM events WHERE subject = ?1 OR (kind = 'api-write' AND instr(message, ?2) > 0) ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = statement.query_map(
                params![agent, agent_path(agent), limit.min(i64::MAX as usize) as i64],
                super::store::event_from_row,
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn status_history(&self, agent: &str, limit: usize) -> Result<Vec<HistoricStatus>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT bundle, generation, phase, message, observed_at, received_at FROM status_history WHERE agent = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = statement.query_map(
                params![agent, limit.min(i64::MAX as usize) as i64],
                |row| {
                    Ok(HistoricStatus {
                        bundle: row.get(0)?,
                        generation: row.get::<_, i64>(1)? as u64,
                        phase: row.get(2)?,
                        message: row.get(3)?,
                        observed_at: row.get(4)?,
                        received_at: row.get(5)?,
                    })
                },
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn drift_reports(&self, query: &DriftQuery) -> Result<Vec<DriftRecord>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {DRIFT_REPORT_COLUMNS} FROM drift_reports
                 WHERE (?1 IS NULL OR agent = ?1) AND (?2 IS NULL OR bundle = ?2) AND received_at >= ?3
                 ORDER BY id DESC LIMIT ?4"
            ))?;
            let rows: Vec<(DriftRecord, String)> = statement
                .query_map(
                    params![
                        query.agent,
                        query.bundle,
                        query.since.unwrap_or(i64::MIN),
                        query.limit.min(i64::MAX as usize) as i64
                    ],
                    |row| {
                        Ok((
                            DriftRecord {
                                id: row.get::<_, i64>(0)? as u64,
                                agent: row.get(1)?,
                                bundle: row.get(2)?,
                                generation: row.get::<_, i64>(3)? as u64,
                                action: row.get(4)?,
                                objects: Vec::new(),
                                total: row.get::<_, i64>(5)? as u64,
                                observed_at: row.get(7)?,
                                received_at: row.get(8)?,
                            },
                            row.get(6)?,
                        ))
                    },
                )?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(mut record, findings)| {
                    record.objects = drift_findings(&findings)?;
                    Ok(record)
                })
                .collect()
        })
    }

    fn rollouts_of(&self, agent: &str) -> Result<Vec<u64>, StoreError> {
        self.read(|connection| {
            let mut statement = connection.prepare_cached(
                "SELECT rollout FROM rollout_members WHERE agent = ?1 ORDER BY rollout DESC",
            )?;
            let rows = statement.query_map([agent], |row| Ok(row.get::<_, i64>(0)? as u64))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn fleet_summary(&self) -> Result<FleetSummary, StoreError> {
        self.read(|connection| {
            let (agents, revoked): (i64, i64) = connection.query_row(
                "SELECT COUNT(*), COUNT(revoked_at) FROM agents",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            let stale: i64 = connection.query_row(
                &format!(
                    "SELECT COUNT(DISTINCT agent) FROM bundle_status WHERE stale = 1 AND agent {NOT_REVOKED}"
                ),
                [],
                |row| row.get(0),
            )?;
            // One scan of the assignments gives both: by phase, and by snapshot.
            let rows: Vec<(String, Digest, String, u64)> = connection
                .prepare_cached(&format!(
                    "SELECT bundle, digest, COALESCE(phase, 'Unknown'), COUNT(*) FROM assignments
                     WHERE agent {NOT_REVOKED} GROUP BY 1, 2, 3"
                ))?
                .query_map([], |row| {
                    Ok((
                        row.get(0)?,
                        digest_at(row, 1)?,
                        row.get(2)?,
                        row.get::<_, i64>(3)? as u64,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let labels = connection
                .prepare_cached(&format!(
                    "SELECT key, value, COUNT(*) FROM agent_labels WHERE agent {NOT_REVOKED}
                     GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
                ))?
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)? as u64))
                })?
                .collect::<Result<_, _>>()?;
            let drifted: i64 = connection.query_row(
                &format!(
                    "SELECT COUNT(DISTINCT agent) FROM drift_state WHERE left_objects > 0 AND agent {NOT_REVOKED}"
                ),
                [],
                |row| row.get(0),
            )?;
            let mut summary = FleetSummary::from_assignments(
                (agents as u64, revoked as u64, stale as u64),
                rows,
                labels,
            );
            summary.drifted = drifted as u64;
            Ok(summary)
        })
    }
}
