//! [`AuthStore`] on PostgreSQL: API tokens by the digest of their secret.

use deadpool_postgres::GenericClient;
use outpost_proto::Digest;
use tokio_postgres::Row;

use super::{PostgresStore, add_event, execute, optional};
use crate::store::{AdminToken, AuthStore, NewToken, Role, StoreError, TokenCheck};

const COLUMNS: &str =
    "name, role, created_at, created_by, expires_at, revoked_at, revoked_by, last_used_at";

fn token_from_row(row: &Row) -> Result<AdminToken, StoreError> {
    let role: String = row.try_get(1)?;
    let revoked_at: Option<i64> = row.try_get(5)?;
    Ok(AdminToken {
        name: row.try_get(0)?,
        role: Role::parse(&role)
            .ok_or_else(|| StoreError::Corrupt(format!("API token with unknown role {role:?}")))?,
        created_at: row.try_get(2)?,
        created_by: row.try_get(3)?,
        expires_at: row.try_get(4)?,
        revoked: match revoked_at {
            Some(at) => Some((at, row.try_get::<_, Option<String>>(6)?.unwrap_or_default())),
            None => None,
        },
        last_used_at: row.try_get(7)?,
    })
}

async fn admin_token<C: GenericClient>(
    client: &C,
    name: &str,
) -> Result<Option<AdminToken>, StoreError> {
    optional(
        client,
        &format!("SELECT {COLUMNS} FROM admin_tokens WHERE name = $1"),
        &[&name],
    )
    .await?
    .map(|row| token_from_row(&row))
    .transpose()
}

impl AuthStore for PostgresStore {
    fn create_admin_token(
        &self,
        token: &NewToken,
        digest: &Digest,
        created_by: &str,
        now: i64,
    ) -> Result<Result<AdminToken, String>, StoreError> {
        self.write(async |transaction| {
            let taken = optional(
                transaction,
                "SELECT revoked_at FROM admin_tokens WHERE name = $1",
                &[&token.name],
            )
            .await?;
            if let Some(taken) = taken {
                let state = match taken.try_get::<_, Option<i64>>(0)? {
                    Some(at) => format!("by a token revoked at {at}"),
                    None => "by a live token".to_owned(),
                };
                return Ok(Err(format!(
                    "the name {:?} is taken {state}; names stay unique so the audit trail is unambiguous: pick another (e.g. {}-2)",
                    token.name, token.name
                )));
            }
            execute(
                transaction,
                "INSERT INTO admin_tokens (name, digest, role, created_at, created_by, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &token.name,
                    &digest.0.as_slice(),
                    &token.role.name(),
                    &now,
                    &created_by,
                    &token.expires_at,
                ],
            )
            .await?;
            add_event(
                transaction,
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
            )
            .await?;
            Ok(Ok(AdminToken {
                name: token.name.clone(),
                role: token.role,
                created_at: now,
                created_by: created_by.to_owned(),
                expires_at: token.expires_at,
                revoked: None,
                last_used_at: None,
            }))
        })
    }

    fn admin_tokens(&self) -> Result<Vec<AdminToken>, StoreError> {
        self.read(async |client| {
            super::query(
                client,
                &format!("SELECT {COLUMNS} FROM admin_tokens ORDER BY name"),
                &[],
            )
            .await?
            .iter()
            .map(token_from_row)
            .collect()
        })
    }

    fn check_admin_token(&self, digest: &Digest, now: i64) -> Result<TokenCheck, StoreError> {
        let token = self.read(async |client| {
            optional(
                client,
                &format!("SELECT {COLUMNS} FROM admin_tokens WHERE digest = $1"),
                &[&digest.0.as_slice()],
            )
            .await?
            .map(|row| token_from_row(&row))
            .transpose()
        })?;
        Ok(TokenCheck::of(token, now))
    }

    fn revoke_admin_token(
        &self,
        name: &str,
        who: &str,
        now: i64,
    ) -> Result<Option<AdminToken>, StoreError> {
        self.write(async |transaction| {
            let changed = execute(
                transaction,
                "UPDATE admin_tokens SET revoked_at = $2, revoked_by = $3 WHERE name = $1 AND revoked_at IS NULL",
                &[&name, &now, &who],
            )
            .await?;
            if changed > 0 {
                add_event(transaction, now, "api-token-revoked", name, &format!("by {who}"))
                    .await?;
            }
            admin_token(transaction, name).await
        })
    }

    fn touch_admin_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let names: Vec<&String> = used.iter().map(|(name, _)| name).collect();
        let times: Vec<i64> = used.iter().map(|(_, at)| *at).collect();
        self.write(async |transaction| {
            execute(
                transaction,
                "UPDATE admin_tokens t SET last_used_at = GREATEST(COALESCE(t.last_used_at, 0), u.at)
                 FROM (SELECT name, MAX(at) AS at FROM unnest($1::text[], $2::bigint[]) AS u (name, at) GROUP BY name) u
                 WHERE t.name = u.name",
                &[&names, &times],
            )
            .await?;
            Ok(())
        })
    }
}
