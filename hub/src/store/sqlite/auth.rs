//! [`AuthStore`] on SQLite: API tokens by the digest of their secret.

use outpost_proto::Digest;
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, add_event};
use crate::store::{AdminToken, AuthStore, NewToken, Role, StoreError, TokenCheck};

const COLUMNS: &str =
    "name, role, created_at, created_by, expires_at, revoked_at, revoked_by, last_used_at";

fn token_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AdminToken> {
    let role: String = row.get(1)?;
    let revoked_at: Option<i64> = row.get(5)?;
    Ok(AdminToken {
        name: row.get(0)?,
        role: Role::parse(&role).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                1,
                rusqlite::types::Type::Text,
                format!("unknown role {role:?}").into(),
            )
        })?,
        created_at: row.get(2)?,
        created_by: row.get(3)?,
        expires_at: row.get(4)?,
        revoked: match revoked_at {
            Some(at) => Some((at, row.get::<_, Option<String>>(6)?.unwrap_or_default())),
            None => None,
        },
        last_used_at: row.get(7)?,
    })
}

fn admin_token(connection: &Connection, name: &str) -> Result<Option<AdminToken>, StoreError> {
    Ok(connection
        .query_row(
            &format!("SELECT {COLUMNS} FROM admin_tokens WHERE name = ?1"),
            [name],
            token_from_row,
        )
        .optional()?)
}

impl AuthStore for SqliteStore {
    fn create_admin_token(
        &self,
        token: &NewToken,
        digest: &Digest,
        created_by: &str,
        now: i64,
    ) -> Result<Result<AdminToken, String>, StoreError> {
        let (token, digest, created_by) = (token.clone(), *digest, created_by.to_owned());
        self.write(move |connection| {
            let taken: Option<Option<i64>> = connection
                .query_row(
                    "SELECT revoked_at FROM admin_tokens WHERE name = ?1",
                    [&token.name],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(revoked_at) = taken {
                let state = match revoked_at {
                    Some(at) => format!("by a token revoked at {at}"),
                    None => "by a live token".to_owned(),
                };
                return Ok(Err(format!(
                    "the name {:?} is taken {state}; names stay unique so the audit trail is unambiguous: pick another (e.g. {}-2)",
                    token.name, token.name
                )));
            }
            connection.execute(
                "INSERT INTO admin_tokens (name, digest, role, created_at, created_by, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![token.name, digest.0.as_slice(), token.role.name(), now, created_by, token.expires_at],
            )?;
            add_event(
                connection,
                now,
                "api-token-created",
                &token.name,
                &format!(
                    "role {} by {created_by}, {}",
                    token.role,
                    token
                        .expires_at
                        .map_or("no expiry".to_owned(), |at| format!("expires at {at}"))
                ),
            )?;
            Ok(Ok(AdminToken {
                name: token.name.clone(),
                role: token.role,
                created_at: now,
                created_by,
                expires_at: token.expires_at,
                revoked: None,
                last_used_at: None,
            }))
        })
    }

    fn admin_tokens(&self) -> Result<Vec<AdminToken>, StoreError> {
        self.read(|connection| {
            let mut statement =
                connection.prepare(&format!("SELECT {COLUMNS} FROM admin_tokens ORDER BY name"))?;
            let rows = statement.query_map([], token_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn check_admin_token(&self, digest: &Digest, now: i64) -> Result<TokenCheck, StoreError> {
        let token = self.read(|connection| {
            Ok(connection
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM admin_tokens WHERE digest = ?1"
                ))?
                .query_row([digest.0.as_slice()], token_from_row)
                .optional()?)
        })?;
        Ok(TokenCheck::of(token, now))
    }

    fn revoke_admin_token(
        &self,
        name: &str,
        who: &str,
        now: i64,
    ) -> Result<Option<AdminToken>, StoreError> {
        let (name, who) = (name.to_owned(), who.to_owned());
        self.write(move |connection| {
            let changed = connection.execute(
                "UPDATE admin_tokens SET revoked_at = ?2, revoked_by = ?3 WHERE name = ?1 AND revoked_at IS NULL",
                params![name, now, who],
            )?;
            if changed > 0 {
                add_event(connection, now, "api-token-revoked", &name, &format!("by {who}"))?;
            }
            admin_token(connection, &name)
        })
    }

    fn touch_admin_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        let used = used.to_vec();
        self.write(move |connection| {
            for (name, at) in &used {
                connection.execute(
                    "UPDATE admin_tokens SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) WHERE name = ?1",
                    params![name, at],
                )?;
            }
            Ok(())
        })
    }
}
