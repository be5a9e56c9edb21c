//! Copying a hub's SQLite store into an empty PostgreSQL database (moving one hub to
//! replicas), then checking the copy: every table's row count and a SHA-256 of its rows in key
//! order must be the same on both sides, and every stored body must hash to its digest.
//!
//! The SQLite side is read in one read transaction (one consistent moment, even if a hub were
//! still writing; stop it first so nothing is written after that moment). The PostgreSQL side
//! is written in one transaction: a copy that fails leaves the database as it was.

use std::path::Path;

use deadpool_postgres::GenericClient;
use rusqlite::types::ValueRef;
use sha2::{Digest as _, Sha256};
use tokio_postgres::types::ToSql;

use super::{PostgresStore, SqliteStore, StoreError};

/// How a column is typed on the PostgreSQL side (SQLite holds booleans as 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Text,
    Blob,
    Bool,
}

use Kind::{Blob, Bool, Int, Text};

/// A table to copy: its name, its columns (the SQLite expression read for each when it is not
/// the column itself), the order both sides are hashed in.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// SQLite expressions for columns named differently there (`assignment_bases.id` is its
    /// rowid).
    sqlite: &'static [(&'static str, &'static str)],
    order: &'static str,
}

/// Every table, parents before the tables that reference them.
const TABLES: &[Table] = &[
    Table {
        name: "snapshots",
        columns: &[
            ("bundle", Text),
            ("generation", Int),
            ("digest", Blob),
            ("git_commit", Text),
            ("git_ref", Text),
            ("header", Blob),
            ("signature", Blob),
            ("object_count", Int),
            ("created_at", Int),
        ],
        sqlite: &[],
        order: "bundle, generation",
    },
    Table {
        name: "bodies",
        columns: &[("digest", Blob), ("body", Blob)],
        sqlite: &[],
        order: "digest",
    },
    Table {
        name: "generations",
        columns: &[("bundle", Text), ("last", Int)],
        sqlite: &[],
        order: "bundle",
    },
    Table {
        name: "renders",
        columns: &[
            ("bundle", Text),
            ("tree_id", Text),
            ("selector", Text),
            ("generation", Int),
        ],
        sqlite: &[],
        order: "bundle, tree_id, selector",
    },
    Table {
        name: "refs",
        columns: &[
            ("source", Text),
            ("name", Text),
            ("git_commit", Text),
            ("deleted", Bool),
            ("updated_at", Int),
        ],
        sqlite: &[],
        order: "source, name",
    },
    Table {
        name: "releases",
        columns: &[
            ("source", Text),
            ("git_ref", Text),
            ("bundle", Text),
            ("variant", Text),
            ("git_commit", Text),
            ("generation", Int),
            ("error", Text),
            ("updated_at", Int),
        ],
        sqlite: &[],
        order: "source, git_ref, bundle, variant",
    },
    Table {
        name: "events",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("kind", Text),
            ("subject", Text),
            ("message", Text),
        ],
        sqlite: &[],
        order: "id",
    },
    Table {
        name: "agents",
        columns: &[
            ("id", Text),
            ("public_key", Blob),
            ("enrolled_at", Int),
            ("last_seen", Int),
            ("revoked_at", Int),
            ("revoked_by", Text),
            ("revoked_why", Text),
            ("agent_version", Text),
            ("assignment_sequence", Int),
            ("status_sequence", Int),
            ("label_set", Text),
            ("change_seq", Int),
        ],
        sqlite: &[],
        order: "id",
    },
    Table {
        name: "agent_labels",
        columns: &[("agent", Text), ("key", Text), ("value", Text)],
        sqlite: &[],
        order: "agent, key",
    },
    Table {
        name: "enrolment_tokens",
        columns: &[
            ("digest", Blob),
            ("labels", Text),
            ("created_at", Int),
            ("created_by", Text),
            ("expires_at", Int),
            ("used_at", Int),
            ("used_by", Text),
        ],
        sqlite: &[],
        order: "digest",
    },
    Table {
        name: "assignments",
        columns: &[
            ("agent", Text),
            ("bundle", Text),
            ("generation", Int),
            ("digest", Blob),
            ("origin", Text),
            ("updated_at", Int),
            ("phase", Text),
        ],
        sqlite: &[],
        order: "agent, bundle",
    },
    Table {
        name: "assignment_bases",
        columns: &[
            ("id", Int),
            ("agent", Text),
            ("bundle", Text),
            ("digest", Blob),
            ("assigned_at", Int),
        ],
        sqlite: &[("id", "rowid")],
        order: "agent, bundle, digest",
    },
    Table {
        name: "bundle_status",
        columns: &[
            ("agent", Text),
            ("bundle", Text),
            ("digest", Blob),
            ("generation", Int),
            ("phase", Text),
            ("objects_total", Int),
            ("objects_ready", Int),
            ("message", Text),
            ("observed_at", Int),
            ("stale", Bool),
            ("received_at", Int),
            ("change_seq", Int),
        ],
        sqlite: &[],
        order: "agent, bundle",
    },
    Table {
        name: "status_history",
        columns: &[
            ("id", Int),
            ("agent", Text),
            ("bundle", Text),
            ("generation", Int),
            ("phase", Text),
            ("message", Text),
            ("observed_at", Int),
            ("received_at", Int),
        ],
        sqlite: &[],
        order: "id",
    },
    Table {
        name: "rollouts",
        columns: &[
            ("id", Int),
            ("bundle", Text),
            ("phase", Text),
            ("state", Text),
            ("created_at", Int),
            ("updated_at", Int),
            ("created_by", Text),
            ("progress", Text),
            ("version", Int),
        ],
        sqlite: &[],
        order: "id",
    },
    Table {
        name: "rollout_members",
        columns: &[
            ("rollout", Int),
            ("agent", Text),
            ("state", Text),
            ("member", Text),
        ],
        sqlite: &[],
        order: "rollout, agent",
    },
    Table {
        name: "rollout_log",
        columns: &[
            ("rollout", Int),
            ("seq", Int),
            ("at", Int),
            ("who", Text),
            ("action", Text),
            ("why", Text),
        ],
        sqlite: &[],
        order: "rollout, seq",
    },
    Table {
        name: "notify_cursors",
        columns: &[("receiver", Text), ("last_event", Int)],
        sqlite: &[],
        order: "receiver",
    },
    Table {
        name: "admin_tokens",
        columns: &[
            ("name", Text),
            ("digest", Blob),
            ("role", Text),
            ("created_at", Int),
            ("created_by", Text),
            ("expires_at", Int),
            ("revoked_at", Int),
            ("revoked_by", Text),
            ("last_used_at", Int),
        ],
        sqlite: &[],
        order: "name",
    },
    Table {
        name: "change_counter",
        columns: &[("id", Int), ("value", Int)],
        sqlite: &[],
        order: "id",
    },
];

/// Tables whose ids PostgreSQL hands out: their sequences continue after the copied ids.
const IDENTITIES: &[&str] = &["events", "status_history", "assignment_bases"];

/// Rows sent to PostgreSQL per statement.
const BATCH: usize = 2_000;

/// One column's values of a batch, typed for PostgreSQL.
#[derive(Debug)]
enum Values {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Blob(Vec<Option<Vec<u8>>>),
    Bool(Vec<Option<bool>>),
}

impl Values {
    fn new(kind: Kind) -> Values {
        match kind {
            Int => Values::Int(Vec::new()),
            Text => Values::Text(Vec::new()),
            Blob => Values::Blob(Vec::new()),
            Bool => Values::Bool(Vec::new()),
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Values::Int(values) => values,
            Values::Text(values) => values,
            Values::Blob(values) => values,
            Values::Bool(values) => values,
        }
    }

    fn clear(&mut self) {
        match self {
            Values::Int(values) => values.clear(),
            Values::Text(values) => values.clear(),
            Values::Blob(values) => values.clear(),
            Values::Bool(values) => values.clear(),
        }
    }
}

/// One table as copied and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopied {
    /// The table.
    pub table: &'static str,
    /// Rows on each side.
    pub rows: u64,
    /// SHA-256 of its rows in key order (the same on both sides).
    pub digest: String,
}

/// A copy that did not happen, or does not match.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SQLite failed.
    #[error("reading the SQLite store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// No file to copy.
    #[error("{0}: no such SQLite store (the hub's is DATA_DIR/hub.db)")]
    Missing(String),
    /// The target already holds a hub.
    #[error(
        "the PostgreSQL database already holds a hub's data ({0}); migrate into an empty database (CREATE DATABASE …) so nothing is mixed or overwritten"
    )]
    NotEmpty(String),
    /// A value does not fit its column.
    #[error("{table}.{column}: a value of the wrong type ({found}); the SQLite file is damaged")]
    Type {
        /// Table.
        table: &'static str,
        /// Column.
        column: &'static str,
        /// What was found.
        found: &'static str,
    },
    /// The copy does not match.
    #[error("the copy does not match the original: {0}; nothing of it should be used")]
    Mismatch(String),
}

/// One row's values in a canonical, typed form, for hashing (booleans as integers).
fn hash_value(hasher: &mut Sha256, value: Option<Canonical<'_>>) {
    match value {
        None => hasher.update(b"n"),
        Some(Canonical::Int(n)) => {
            hasher.update(b"i");
            hasher.update(n.to_be_bytes());
        }
        Some(Canonical::Bytes(bytes)) => {
            hasher.update(b"b");
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
    }
}

enum Canonical<'a> {
    Int(i64),
    Bytes(&'a [u8]),
}

/// Copies the SQLite store at `from` into `to` (which must hold no hub yet) and checks the
/// copy; `progress` hears of each table as it is copied.
pub fn sqlite_to_postgres(
    from: &Path,
    to: &PostgresStore,
    mut progress: impl FnMut(&TableCopied),
) -> Result<Vec<TableCopied>, MigrateError> {
    if !from.is_file() {
        return Err(MigrateError::Missing(from.display().to_string()));
    }
    // Brings the file to the current schema (a hub stopped before an upgrade).
    drop(SqliteStore::open(from)?);
    let mut connection = rusqlite::Connection::open_with_flags(
        from,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    let reading = connection.transaction()?;
    let held: Vec<String> = to.read(async |client| {
        let row = super::postgres::one(
            client,
            "SELECT (SELECT COUNT(*) FROM agents), (SELECT COUNT(*) FROM snapshots), (SELECT COUNT(*) FROM admin_tokens)",
            &[],
        )
        .await?;
        let (agents, snapshots, tokens): (i64, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        Ok([
            (agents, "agents"),
            (snapshots, "snapshots"),
            (tokens, "API tokens"),
        ]
        .into_iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, what)| format!("{count} {what}"))
        .collect())
    })?;
    if !held.is_empty() {
        return Err(MigrateError::NotEmpty(held.join(", ")));
    }
    let mut copied = Vec::with_capacity(TABLES.len());
    to.write(async |transaction| {
        transaction
            .batch_execute("DELETE FROM change_counter")
            .await?;
        for table in TABLES {
            let rows = copy_table(&reading, transaction, table).await?;
            let digest = hash_sqlite(&reading, table)?;
            let done = TableCopied {
                table: table.name,
                rows,
                digest,
            };
            progress(&done);
            copied.push(done);
        }
        for table in IDENTITIES {
            transaction
                .batch_execute(&format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                ))
                .await?;
        }
        Ok(())
    })
    .map_err(|error| match error {
        StoreError::Corrupt(message) => MigrateError::Mismatch(message),
        other => MigrateError::Store(other),
    })?;
    reading.finish()?;
    verify(to, &copied)?;
    Ok(copied)
}

fn sqlite_column(table: &Table, column: &str) -> String {
    table
        .sqlite
        .iter()
        .find(|(name, _)| *name == column)
        .map_or_else(
            || column.to_owned(),
            |(_, expression)| (*expression).to_owned(),
        )
}

fn select_sqlite(table: &Table) -> String {
    let columns: Vec<String> = table
        .columns
        .iter()
        .map(|(column, _)| sqlite_column(table, column))
        .collect();
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        columns.join(", "),
        table.name,
        table.order
    )
}

fn type_error(table: &Table, index: usize, found: &'static str) -> StoreError {
    StoreError::Corrupt(
        MigrateError::Type {
            table: table.name,
            column: table.columns[index].0,
            found,
        }
        .to_string(),
    )
}

async fn copy_table(
    reading: &rusqlite::Connection,
    transaction: &deadpool_postgres::Transaction<'_>,
    table: &Table,
) -> Result<u64, StoreError> {
    let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let casts: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .map(|(index, (_, kind))| {
            let kind = match kind {
                Int => "bigint",
                Text => "text",
                Blob => "bytea",
                Bool => "boolean",
            };
            format!("${}::{kind}[]", index + 1)
        })
        .collect();
    let insert = format!(
        "INSERT INTO {} ({}) SELECT * FROM unnest({})",
        table.name,
        names.join(", "),
        casts.join(", ")
    );
    let mut batch: Vec<Values> = table
        .columns
        .iter()
        .map(|(_, kind)| Values::new(*kind))
        .collect();
    let mut pending = 0;
    let mut total = 0u64;
    let mut statement = reading.prepare(&select_sqlite(table))?;
    let mut rows = statement.query([])?;
    loop {
        let row = rows.next()?;
        if let Some(row) = row {
            for (index, values) in batch.iter_mut().enumerate() {
                let value = row.get_ref(index)?;
                match (values, value) {
                    (Values::Int(values), ValueRef::Integer(n)) => values.push(Some(n)),
                    (Values::Int(values), ValueRef::Null) => values.push(None),
                    (Values::Bool(values), ValueRef::Integer(n)) => values.push(Some(n != 0)),
                    (Values::Bool(values), ValueRef::Null) => values.push(None),
                    (Values::Text(values), ValueRef::Text(text)) => values
                        .push(Some(String::from_utf8(text.to_vec()).map_err(|_| {
                            type_error(table, index, "text that is not UTF-8")
                        })?)),
                    (Values::Text(values), ValueRef::Null) => values.push(None),
                    (Values::Blob(values), ValueRef::Blob(bytes)) => {
                        values.push(Some(bytes.to_vec()))
                    }
                    (Values::Blob(values), ValueRef::Null) => values.push(None),
                    (_, ValueRef::Real(_)) => return Err(type_error(table, index, "a real")),
                    (_, ValueRef::Integer(_)) => {
                        return Err(type_error(table, index, "an integer"));
                    }
                    (_, ValueRef::Text(_)) => return Err(type_error(table, index, "text")),
                    (_, ValueRef::Blob(_)) => return Err(type_error(table, index, "a blob")),
                }
            }
            pending += 1;
            total += 1;
        }
        if pending > 0 && (pending == BATCH || row.is_none()) {
            let parameters: Vec<&(dyn ToSql + Sync)> = batch.iter().map(Values::as_sql).collect();
            super::postgres::execute(transaction, &insert, &parameters).await?;
            batch.iter_mut().for_each(Values::clear);
            pending = 0;
        }
        if row.is_none() {
            return Ok(total);
        }
    }
}

fn hash_sqlite(reading: &rusqlite::Connection, table: &Table) -> Result<String, StoreError> {
    let mut hasher = Sha256::new();
    let mut statement = reading.prepare(&select_sqlite(table))?;
    let mut rows = statement.query([])?;
    while let Some(row) = rows.next()? {
        for (index, _) in table.columns.iter().enumerate() {
            let value = match row.get_ref(index)? {
                ValueRef::Null => None,
                ValueRef::Integer(n) => Some(Canonical::Int(n)),
                ValueRef::Text(bytes) | ValueRef::Blob(bytes) => Some(Canonical::Bytes(bytes)),
                ValueRef::Real(_) => return Err(type_error(table, index, "a real")),
            };
            hash_value(&mut hasher, value);
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

async fn hash_postgres<C: GenericClient>(
    client: &C,
    table: &Table,
) -> Result<(u64, String), StoreError> {
    // Read every integer as a BIGINT (a few are INTEGER columns).
    let names: Vec<String> = table
        .columns
        .iter()
        .map(|(name, kind)| match kind {
            Int => format!("{name}::bigint"),
            _ => (*name).to_owned(),
        })
        .collect();
    let rows = super::postgres::query(
        client,
        &format!(
            "SELECT {} FROM {} ORDER BY {}",
            names.join(", "),
            table.name,
            table.order
        ),
        &[],
    )
    .await?;
    let mut hasher = Sha256::new();
    for row in &rows {
        for (index, (_, kind)) in table.columns.iter().enumerate() {
            match kind {
                Int => hash_value(
                    &mut hasher,
                    row.try_get::<_, Option<i64>>(index)?.map(Canonical::Int),
                ),
                Bool => hash_value(
                    &mut hasher,
                    row.try_get::<_, Option<bool>>(index)?
                        .map(|flag| Canonical::Int(i64::from(flag))),
                ),
                Text => {
                    let text: Option<&str> = row.try_get(index)?;
                    hash_value(
                        &mut hasher,
                        text.map(|text| Canonical::Bytes(text.as_bytes())),
                    );
                }
                Blob => {
                    let bytes: Option<&[u8]> = row.try_get(index)?;
                    hash_value(&mut hasher, bytes.map(Canonical::Bytes));
                }
            }
        }
    }
    Ok((rows.len() as u64, hex::encode(hasher.finalize())))
}

/// Reads the copy back: the same counts and digests, and every body hashes to its digest.
fn verify(to: &PostgresStore, copied: &[TableCopied]) -> Result<(), MigrateError> {
    let problems: Vec<String> = to.read_consistent(async |transaction| {
        let mut problems = Vec::new();
        for (table, expected) in TABLES.iter().zip(copied) {
            let (rows, digest) = hash_postgres(transaction, table).await?;
            if rows != expected.rows {
                problems.push(format!(
                    "{}: {rows} rows, not {}",
                    table.name, expected.rows
                ));
            } else if digest != expected.digest {
                problems.push(format!("{}: the rows differ", table.name));
            }
        }
        for row in
            super::postgres::query(transaction, "SELECT digest, body FROM bodies", &[]).await?
        {
            let (digest, body): (&[u8], &[u8]) = (row.try_get(0)?, row.try_get(1)?);
            if Sha256::digest(body).as_slice() != digest {
                problems.push(format!(
                    "body {} does not hash to its digest",
                    hex::encode(digest)
                ));
            }
        }
        Ok(problems)
    })?;
    match problems.is_empty() {
        true => Ok(()),
        false => Err(MigrateError::Mismatch(problems.join("; "))),
    }
}
