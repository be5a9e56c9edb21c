//! [`FleetView`] on SQLite: filters become `EXISTS` conditions over the primary keys (one index
//! lookup per agent), counts are `GROUP BY`s, and a page's details are read with the page's
//! ids as one JSON array parameter.

use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

use super::fleet::{STATUS_COLUMNS, status_from_row};
use super::store::labels_from_json;
use super::{SqliteStore, digest_at};
use crate::store::{
    Agent, AssignmentRow, FleetDetails, FleetFilter, FleetSummary, FleetView, StoreError,
};

/// The WHERE clause (over `agents a`) and its parameters for `filter`.
fn conditions(filter: &FleetFilter) -> (String, Vec<Value>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    let bind = |value: Value, values: &mut Vec<Value>| {
        values.push(value);
        format!("?{}", values.len())
    };
    for (key, value) in &filter.labels {
        let (key, value) = (
            bind(Value::Text(key.clone()), &mut values),
            bind(Value::Text(value.clone()), &mut values),
        );
        clauses.push(format!(
            "EXISTS (SELECT 1 FROM agent_labels l WHERE l.agent = a.id AND l.key = {key} AND l.value = {value})"
        ));
    }
    for key in &filter.without {
        let key = bind(Value::Text(key.clone()), &mut values);
        clauses.push(format!(
            "NOT EXISTS (SELECT 1 FROM agent_labels l WHERE l.agent = a.id AND l.key = {key})"
        ));
    }
    let bundle = filter
        .bundle
        .as_ref()
        .map(|bundle| bind(Value::Text(bundle.clone()), &mut values));
    let on_bundle = |column: &str| match &bundle {
        Some(bundle) => format!(" AND {column} = {bundle}"),
        None => String::new(),
    };
    if bundle.is_some() {
        clauses.push(format!(
            "EXISTS (SELECT 1 FROM assignments x WHERE x.agent = a.id{})",
            on_bundle("x.bundle")
        ));
    }
    match filter.phase.as_deref() {
        Some("Unknown") => clauses.push(format!(
            "EXISTS (SELECT 1 FROM assignments x WHERE x.agent = a.id{} AND NOT EXISTS
               (SELECT 1 FROM bundle_status s WHERE s.agent = x.agent AND s.bundle = x.bundle))",
            on_bundle("x.bundle")
        )),
        Some(phase) => {
            let phase = bind(Value::Text(phase.to_owned()), &mut values);
            clauses.push(format!(
                "EXISTS (SELECT 1 FROM bundle_status s WHERE s.agent = a.id{} AND s.phase = {phase})",
                on_bundle("s.bundle")
            ));
        }
        None => {}
    }
    if let Some(digests) = &filter.digests {
        let list = serde_json::Value::Array(
            digests
                .iter()
                .map(|digest| serde_json::Value::String(digest.to_hex()))
                .collect(),
        )
        .to_string();
        let list = bind(Value::Text(list), &mut values);
        clauses.push(format!(
            "EXISTS (SELECT 1 FROM assignments x WHERE x.agent = a.id{} AND lower(hex(x.digest)) IN (SELECT value FROM json_each({list})))",
            on_bundle("x.bundle")
        ));
    }
    if let Some(search) = &filter.search {
        let search = bind(Value::Text(search.clone()), &mut values);
        clauses.push(format!("instr(a.id, {search}) > 0"));
    }
    if let Some(stale) = filter.stale {
        let exists = "EXISTS (SELECT 1 FROM bundle_status s WHERE s.agent = a.id AND s.stale = 1)";
        clauses.push(match stale {
            true => exists.to_owned(),
            false => format!("NOT {exists}"),
        });
    }
    match filter.revoked {
        Some(true) => clauses.push("a.revoked_at IS NOT NULL".to_owned()),
        Some(false) => clauses.push("a.revoked_at IS NULL".to_owned()),
        None => {}
    }
    let clause = match clauses.is_empty() {
        true => String::new(),
        false => format!("WHERE {}", clauses.join(" AND ")),
    };
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
    let mut statement = connection.prepare_cached(
        "SELECT id, public_key, enrolled_at, last_seen, revoked_at, revoked_by, revoked_why, label_set
         FROM agents WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id",
    )?;
    let rows = statement.query_map([ids], |row| {
        let revoked_at: Option<i64> = row.get(4)?;
        Ok(Agent {
            id: row.get(0)?,
            public_key: row.get(1)?,
            labels: labels_from_json(&row.get::<_, String>(7)?),
            enrolled_at: row.get(2)?,
            last_seen: row.get(3)?,
            revoked: match revoked_at {
                Some(at) => Some((
                    at,
                    row.get::<_, Option<String>>(5)?.unwrap_or_default(),
                    row.get::<_, Option<String>>(6)?.unwrap_or_default(),
                )),
                None => None,
            },
        })
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

    fn fleet_details(&self, ids: &[String]) -> Result<FleetDetails, StoreError> {
        let ids = id_list(ids);
        self.read(|connection| {
            let agents = agents_in(connection, &ids)?;
            let assignments = connection
                .prepare_cached(
                    "SELECT agent, bundle, generation, digest, origin FROM assignments
                     WHERE agent IN (SELECT value FROM json_each(?1)) ORDER BY agent, bundle",
                )?
                .query_map([&ids], |row| {
                    Ok((
                        AssignmentRow {
                            agent: row.get(0)?,
                            bundle: row.get(1)?,
                            generation: row.get::<_, i64>(2)? as u64,
                            digest: digest_at(row, 3)?,
                        },
                        row.get(4)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let statuses = connection
                .prepare_cached(&format!(
                    "SELECT {STATUS_COLUMNS} FROM bundle_status
                     WHERE agent IN (SELECT value FROM json_each(?1)) ORDER BY agent, bundle"
                ))?
                .query_map([&ids], status_from_row)?
                .collect::<Result<_, _>>()?;
            Ok(FleetDetails {
                agents,
                assignments,
                statuses,
            })
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
                "SELECT COUNT(DISTINCT s.agent) FROM bundle_status s
                 JOIN agents a ON a.id = s.agent AND a.revoked_at IS NULL WHERE s.stale = 1",
                [],
                |row| row.get(0),
            )?;
            let phases = connection
                .prepare_cached(
                    "SELECT x.bundle, COALESCE(s.phase, 'Unknown'), COUNT(*) FROM assignments x
                     JOIN agents a ON a.id = x.agent AND a.revoked_at IS NULL
                     LEFT JOIN bundle_status s ON s.agent = x.agent AND s.bundle = x.bundle
                     GROUP BY 1, 2 ORDER BY 1, 2",
                )?
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)? as u64))
                })?
                .collect::<Result<_, _>>()?;
            let assigned = connection
                .prepare_cached(
                    "SELECT x.bundle, x.digest, COUNT(*) FROM assignments x
                     JOIN agents a ON a.id = x.agent AND a.revoked_at IS NULL
                     GROUP BY 1, 2 ORDER BY 1, 3 DESC",
                )?
                .query_map([], |row| {
                    Ok((
                        row.get(0)?,
                        digest_at(row, 1)?,
                        row.get::<_, i64>(2)? as u64,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let labels = connection
                .prepare_cached(
                    "SELECT l.key, l.value, COUNT(*) FROM agent_labels l
                     JOIN agents a ON a.id = l.agent AND a.revoked_at IS NULL
                     GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2",
                )?
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get::<_, i64>(2)? as u64))
                })?
                .collect::<Result<_, _>>()?;
            Ok(FleetSummary {
                agents: agents as u64,
                revoked: revoked as u64,
                stale: stale as u64,
                phases,
                assigned,
                labels,
            })
        })
    }
}
