//! Operators' API tokens in the store: a name, a role, the SHA-256 of the secret (the secret is
//! shown once and never stored), an optional expiry, revocation, and when it was last used.

use outpost_proto::Digest;
use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, StoreError};

/// What a token may do. Each role adds to the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything except Secret values.
    Viewer,
    /// Also: rollouts and their commands, agent labels, fetch-now.
    Operator,
    /// Also: enrolment tokens, agent revocation, API tokens, keys, Secret values.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Reads a role's name.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An API token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// Unique for all time, so the audit trail's names are unambiguous.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was made.
    pub created_at: i64,
    /// Who made it (a token's name, or `local:<user>` for the bootstrap command).
    pub created_by: String,
    /// Unusable after this, if set.
    pub expires_at: Option<i64>,
    /// When and by whom it was revoked.
    pub revoked: Option<(i64, String)>,
    /// When it was last used (recorded at most once a minute).
    pub last_used_at: Option<i64>,
}

/// A token to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its expiry, if any.
    pub expires_at: Option<i64>,
}

/// What a presented secret turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenCheck {
    /// A live token.
    Valid(AdminToken),
    /// No token has this secret.
    Unknown,
    /// The token expired.
    Expired(AdminToken),
    /// The token was revoked.
    Revoked(AdminToken),
}

/// What authentication needs of the store.
pub trait AuthStore {
    /// Stores a new token under its secret's digest; `Err` (inside) if the name was ever used.
    fn create_admin_token(
        &mut self,
        token: &NewToken,
        digest: &Digest,
        created_by: &str,
        now: i64,
    ) -> Result<Result<AdminToken, String>, StoreError>;
    /// Every token, by name.
    fn admin_tokens(&self) -> Result<Vec<AdminToken>, StoreError>;
    /// The token with this secret digest, and whether it may be used now.
    fn check_admin_token(&self, digest: &Digest, now: i64) -> Result<TokenCheck, StoreError>;
    /// Revokes a token; `None` if there is no such token.
    fn revoke_admin_token(
        &mut self,
        name: &str,
        who: &str,
        now: i64,
    ) -> Result<Option<AdminToken>, StoreError>;
    /// Records when tokens were last used (one transaction for many).
    fn touch_admin_tokens(&mut self, used: &[(String, i64)]) -> Result<(), StoreError>;
}

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

impl SqliteStore {
    fn admin_token(&self, name: &str) -> Result<Option<AdminToken>, StoreError> {
        Ok(self
            .connection
            .query_row(
                &format!("SELECT {COLUMNS} FROM admin_tokens WHERE name = ?1"),
                [name],
                token_from_row,
            )
            .optional()?)
    }
}

impl AuthStore for SqliteStore {
    fn create_admin_token(
        &mut self,
        token: &NewToken,
        digest: &Digest,
        created_by: &str,
        now: i64,
    ) -> Result<Result<AdminToken, String>, StoreError> {
        let transaction = self.connection.transaction()?;
        let taken: Option<Option<i64>> = transaction
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
        transaction.execute(
            "INSERT INTO admin_tokens (name, digest, role, created_at, created_by, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![token.name, digest.0.as_slice(), token.role.name(), now, created_by, token.expires_at],
        )?;
        transaction.execute(
            "INSERT INTO events (at, kind, subject, message) VALUES (?1, 'api-token-created', ?2, ?3)",
            params![
                now,
                token.name,
                format!(
                    "role {} by {created_by}, {}",
                    token.role,
                    token
                        .expires_at
                        .map_or("no expiry".to_owned(), |at| format!("expires at {at}"))
                )
            ],
        )?;
        transaction.commit()?;
        Ok(Ok(AdminToken {
            name: token.name.clone(),
            role: token.role,
            created_at: now,
            created_by: created_by.to_owned(),
            expires_at: token.expires_at,
            revoked: None,
            last_used_at: None,
        }))
    }

    fn admin_tokens(&self) -> Result<Vec<AdminToken>, StoreError> {
        let mut statement = self
            .connection
            .prepare(&format!("SELECT {COLUMNS} FROM admin_tokens ORDER BY name"))?;
        let rows = statement.query_map([], token_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn check_admin_token(&self, digest: &Digest, now: i64) -> Result<TokenCheck, StoreError> {
        let token = self
            .connection
            .query_row(
                &format!("SELECT {COLUMNS} FROM admin_tokens WHERE digest = ?1"),
                [digest.0.as_slice()],
                token_from_row,
            )
            .optional()?;
        Ok(match token {
            None => TokenCheck::Unknown,
            Some(token) if token.revoked.is_some() => TokenCheck::Revoked(token),
            Some(token) if token.expires_at.is_some_and(|at| now > at) => {
                TokenCheck::Expired(token)
            }
            Some(token) => TokenCheck::Valid(token),
        })
    }

    fn revoke_admin_token(
        &mut self,
        name: &str,
        who: &str,
        now: i64,
    ) -> Result<Option<AdminToken>, StoreError> {
        let transaction = self.connection.transaction()?;
        let changed = transaction.execute(
            "UPDATE admin_tokens SET revoked_at = ?2, revoked_by = ?3 WHERE name = ?1 AND revoked_at IS NULL",
            params![name, now, who],
        )?;
        if changed > 0 {
            transaction.execute(
                "INSERT INTO events (at, kind, subject, message) VALUES (?1, 'api-token-revoked', ?2, ?3)",
                params![now, name, format!("by {who}")],
            )?;
        }
        transaction.commit()?;
        self.admin_token(name)
    }

    fn touch_admin_tokens(&mut self, used: &[(String, i64)]) -> Result<(), StoreError> {
        let transaction = self.connection.transaction()?;
        for (name, at) in used {
            transaction.execute(
                "UPDATE admin_tokens SET last_used_at = MAX(COALESCE(last_used_at, 0), ?2) WHERE name = ?1",
                params![name, at],
            )?;
        }
        transaction.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store as _;

    fn token(name: &str, role: Role, expires_at: Option<i64>) -> NewToken {
        NewToken {
            name: name.to_owned(),
            role,
            expires_at,
        }
    }

    #[test]
    fn tokens_are_found_by_digest_expire_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
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
}
