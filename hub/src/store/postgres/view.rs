//! [`FleetView`] on PostgreSQL: filters become `IN` conditions over indexes (labels by key and
//! value, assignments by bundle and phase), counts are `GROUP BY`s, and a page's details are
//! read with the page's ids as one array parameter.

use outpost_proto::Digest;
use tokio_postgres::types::ToSql;

use super::fleet::{STATUS_COLUMNS, assignment_from_row, status_from_row};
use super::store::agents_where;
use super::{PostgresStore, digest_at, one, query};
use crate::store::view::{
    DRIFT_REPORT_COLUMNS, DRIFT_STATE_COLUMNS, FilterDialect, FilterValue, agent_path,
    drift_findings, filter_clause,
};
use crate::store::{
    DriftQuery, DriftRecord, DriftState, Event, FleetDetails, FleetFilter, FleetPage, FleetSummary,
    FleetView, HistoricStatus, StoreError,
};

/// The agents not revoked (the revoked are few, and indexed).
const NOT_REVOKED: &str = "NOT IN (SELECT id FROM agents WHERE revoked_at IS NOT NULL)";

type Value = Box<dyn ToSql + Sync + Send>;

/// PostgreSQL's fleet filters: digests as one bytea array.
const DIALECT: FilterDialect = FilterDialect {
    placeholder: |n| format!("${n}"),
    digest_in: |list| format!("digest = ANY({list}::bytea[])"),
    id_contains: |text| format!("strpos(a.id, {text}) > 0"),
    stale: "stale",
    truth: "TRUE",
};

/// The WHERE clause and its parameters for `filter`, typed for PostgreSQL.
fn conditions(filter: &FleetFilter) -> (String, Vec<Value>) {
    let (clause, values) = filter_clause(filter, &DIALECT);
    let values = values
        .into_iter()
        .map(|value| -> Value {
            match value {
                FilterValue::Text(text) => Box::new(text),
                FilterValue::Digests(digests) => Box::new(
                    digests
                        .iter()
                        .map(|digest| digest.0.to_vec())
                        .collect::<Vec<Vec<u8>>>(),
                ),
            }
        })
        .collect();
    (clause, values)
}

fn refs(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl FleetView for PostgresStore {
    fn fleet_ids(&self, filter: &FleetFilter) -> Result<Vec<String>, StoreError> {
        let (clause, values) = conditions(filter);
        self.read(async |client| {
            query(
                client,
                &format!("SELECT a.id FROM agents a {clause} ORDER BY a.id"),
                &refs(&values),
            )
            .await?
            .iter()
            .map(|row| Ok(row.try_get(0)?))
            .collect()
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
        let counted = values.len();
        values.push(Box::new(after.unwrap_or("").to_owned()));
        let after_at = values.len();
        values.push(Box::new(limit.min(i64::MAX as usize - 1) as i64 + 1));
        let limit_at = values.len();
        let join = if clause.is_empty() { "WHERE" } else { "AND" };
        let page_sql = format!(
            "SELECT a.id FROM agents a {clause} {join} a.id > ${after_at} ORDER BY a.id LIMIT ${limit_at}"
        );
        self.read_consistent(async |transaction| {
            let parameters = refs(&values);
            let matched: i64 = one(transaction, &count_sql, &parameters[..counted])
                .await?
                .try_get(0)?;
            let mut ids: Vec<String> = query(transaction, &page_sql, &parameters)
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
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
        self.read_consistent(async |transaction| {
            let agents = agents_where(transaction, Some(ids)).await?;
            let assignments = query(
                transaction,
                "SELECT agent, bundle, generation, digest, origin FROM assignments
                 WHERE agent = ANY($1) ORDER BY agent, bundle",
                &[&ids],
            )
            .await?
            .iter()
            .map(|row| Ok((assignment_from_row(row)?, row.try_get(4)?)))
            .collect::<Result<_, StoreError>>()?;
            let statuses = query(
                transaction,
                &format!(
                    "SELECT {STATUS_COLUMNS} FROM bundle_status WHERE agent = ANY($1) ORDER BY agent, bundle"
                ),
                &[&ids],
            )
            .await?
            .iter()
            .map(status_from_row)
            .collect::<Result<_, _>>()?;
            let drift = query(
                transaction,
                &format!(
                    "SELECT {DRIFT_STATE_COLUMNS} FROM drift_state WHERE agent = ANY($1) ORDER BY agent, bundle"
                ),
                &[&ids],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(DriftState {
                    agent: row.try_get(0)?,
                    bundle: row.try_get(1)?,
                    left_objects: row.try_get::<_, i64>(2)? as u64,
                    left_since: row.try_get(3)?,
                    corrected_objects: row.try_get::<_, i64>(4)? as u64,
                    corrected_at: row.try_get(5)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
            Ok(FleetDetails {
                agents,
                assignments,
                statuses,
                drift,
            })
        })
    }

    fn agent_events(&self, agent: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let path = agent_path(agent);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(async |client| {
            query(
                client,
                "SELECT id, at, kind, subject, message FROM events WHERE subject = $1 OR (kind = 'api-write' AND strpos(message, $2) > 0) ORDER BY id DESC LIMIT $3",
                &[&agent, &path, &limit],
            )
            .await?
            .iter()
            .map(super::store::event_from)
            .collect()
        })
    }

    fn status_history(&self, agent: &str, limit: usize) -> Result<Vec<HistoricStatus>, StoreError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(async |client| {
            query(
                client,
                "SELECT bundle, generation, phase, message, observed_at, received_at FROM status_history WHERE agent = $1 ORDER BY id DESC LIMIT $2",
                &[&agent, &limit],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(HistoricStatus {
                    bundle: row.try_get(0)?,
                    generation: row.try_get::<_, i64>(1)? as u64,
                    phase: row.try_get(2)?,
                    message: row.try_get(3)?,
                    observed_at: row.try_get(4)?,
                    received_at: row.try_get(5)?,
                })
            })
            .collect()
        })
    }

    fn drift_reports(&self, query_: &DriftQuery) -> Result<Vec<DriftRecord>, StoreError> {
        let limit = query_.limit.min(i64::MAX as usize) as i64;
        let since = query_.since.unwrap_or(i64::MIN);
        self.read(async |client| {
            query(
                client,
                &format!(
                    "SELECT {DRIFT_REPORT_COLUMNS} FROM drift_reports
                     WHERE ($1::TEXT IS NULL OR agent = $1) AND ($2::TEXT IS NULL OR bundle = $2) AND received_at >= $3
                     ORDER BY id DESC LIMIT $4"
                ),
                &[&query_.agent, &query_.bundle, &since, &limit],
            )
            .await?
            .iter()
            .map(|row| {
                Ok(DriftRecord {
                    id: row.try_get::<_, i64>(0)? as u64,
                    agent: row.try_get(1)?,
                    bundle: row.try_get(2)?,
                    generation: row.try_get::<_, i64>(3)? as u64,
                    action: row.try_get(4)?,
                    total: row.try_get::<_, i64>(5)? as u64,
                    objects: drift_findings(&row.try_get::<_, String>(6)?)?,
                    observed_at: row.try_get(7)?,
                    received_at: row.try_get(8)?,
                })
            })
            .collect()
        })
    }

    fn rollouts_of(&self, agent: &str) -> Result<Vec<u64>, StoreError> {
        self.read(async |client| {
            query(
                client,
                "SELECT rollout FROM rollout_members WHERE agent = $1 ORDER BY rollout DESC",
                &[&agent],
            )
            .await?
            .iter()
            .map(|row| Ok(row.try_get::<_, i64>(0)? as u64))
            .collect()
        })
    }

    fn fleet_summary(&self) -> Result<FleetSummary, StoreError> {
        self.read_consistent(async |transaction| {
            let row = one(
                transaction,
                "SELECT COUNT(*), COUNT(revoked_at) FROM agents",
                &[],
            )
            .await?;
            let (agents, revoked): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let stale: i64 = one(
                transaction,
                &format!(
                    "SELECT COUNT(DISTINCT agent) FROM bundle_status WHERE stale AND agent {NOT_REVOKED}"
                ),
                &[],
            )
            .await?
            .try_get(0)?;
            // One scan of the assignments gives both: by phase, and by snapshot.
            let rows: Vec<(String, Digest, String, u64)> = query(
                transaction,
                &format!(
                    "SELECT bundle, digest, COALESCE(phase, 'Unknown'), COUNT(*) FROM assignments
                     WHERE agent {NOT_REVOKED} GROUP BY 1, 2, 3"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get(0)?,
                    digest_at(row, 1)?,
                    row.try_get(2)?,
                    row.try_get::<_, i64>(3)? as u64,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
            let labels = query(
                transaction,
                &format!(
                    "SELECT key, value, COUNT(*) FROM agent_labels WHERE agent {NOT_REVOKED}
                     GROUP BY 1, 2 ORDER BY 1, 3 DESC, 2"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get(0)?,
                    row.try_get(1)?,
                    row.try_get::<_, i64>(2)? as u64,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
            let drifted: i64 = one(
                transaction,
                &format!(
                    "SELECT COUNT(DISTINCT agent) FROM drift_state WHERE left_objects > 0 AND agent {NOT_REVOKED}"
                ),
                &[],
            )
            .await?
            .try_get(0)?;
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
