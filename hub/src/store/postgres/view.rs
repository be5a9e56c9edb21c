//! [`FleetView`] on PostgreSQL: filters become `IN` conditions over indexes (labels by key and
//! value, assignments by bundle and phase), counts are `GROUP BY`s, and a page's details are
//! read with the page's ids as one array parameter.

use outpost_proto::Digest;
use tokio_postgres::types::ToSql;

use super::fleet::{STATUS_COLUMNS, assignment_from_row, status_from_row};
use super::store::agents_where;
use super::{PostgresStore, digest_at, one, query};
use crate::store::{FleetDetails, FleetFilter, FleetPage, FleetSummary, FleetView, StoreError};

/// The agents not revoked (the revoked are few, and indexed).
const NOT_REVOKED: &str = "NOT IN (SELECT id FROM agents WHERE revoked_at IS NOT NULL)";

type Value = Box<dyn ToSql + Sync + Send>;

/// The WHERE clause (over `agents a`) and its parameters for `filter`.
fn conditions(filter: &FleetFilter) -> (String, Vec<Value>) {
    let mut clauses: Vec<String> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    let bind = |value: Value, values: &mut Vec<Value>| {
        values.push(value);
        format!("${}", values.len())
    };
    for (key, value) in &filter.labels {
        let (key, value) = (
            bind(Box::new(key.clone()), &mut values),
            bind(Box::new(value.clone()), &mut values),
        );
        clauses.push(format!(
            "a.id IN (SELECT agent FROM agent_labels WHERE key = {key} AND value = {value})"
        ));
    }
    for key in &filter.without {
        let key = bind(Box::new(key.clone()), &mut values);
        clauses.push(format!(
            "a.id NOT IN (SELECT agent FROM agent_labels WHERE key = {key})"
        ));
    }
    let bundle = filter
        .bundle
        .as_ref()
        .map(|bundle| bind(Box::new(bundle.clone()), &mut values));
    let of_bundle = match &bundle {
        Some(bundle) => format!("bundle = {bundle}"),
        None => "TRUE".to_owned(),
    };
    match filter.phase.as_deref() {
        Some("Unknown") => clauses.push(format!(
            "a.id IN (SELECT agent FROM assignments WHERE {of_bundle} AND phase IS NULL)"
        )),
        Some(phase) => {
            let phase = bind(Box::new(phase.to_owned()), &mut values);
            clauses.push(format!(
                "a.id IN (SELECT agent FROM assignments WHERE {of_bundle} AND phase = {phase})"
            ));
        }
        None if bundle.is_some() => clauses.push(format!(
            "a.id IN (SELECT agent FROM assignments WHERE {of_bundle})"
        )),
        None => {}
    }
    if let Some(digests) = &filter.digests {
        let list: Vec<Vec<u8>> = digests.iter().map(|digest| digest.0.to_vec()).collect();
        let list = bind(Box::new(list), &mut values);
        clauses.push(format!(
            "a.id IN (SELECT agent FROM assignments WHERE {of_bundle} AND digest = ANY({list}::bytea[]))"
        ));
    }
    if let Some(search) = &filter.search {
        let search = bind(Box::new(search.clone()), &mut values);
        clauses.push(format!("strpos(a.id, {search}) > 0"));
    }
    if let Some(stale) = filter.stale {
        let stale_ones = "a.id IN (SELECT agent FROM bundle_status WHERE stale)";
        clauses.push(match stale {
            true => stale_ones.to_owned(),
            false => format!("NOT {stale_ones}"),
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
            Ok(FleetDetails {
                agents,
                assignments,
                statuses,
            })
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
            Ok(FleetSummary::from_assignments(
                (agents as u64, revoked as u64, stale as u64),
                rows,
                labels,
            ))
        })
    }
}
