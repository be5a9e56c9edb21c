//! Operators' API tokens in the store: a name, a role, the SHA-256 of the secret (the secret is
//! shown once and never stored), an optional expiry, revocation, and when it was last used.

use outpost_proto::Digest;

use super::StoreError;

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

impl TokenCheck {
    /// What the token found for a secret (if any) is at `now`.
    pub(crate) fn of(token: Option<AdminToken>, now: i64) -> TokenCheck {
        match token {
            None => TokenCheck::Unknown,
            Some(token) if token.revoked.is_some() => TokenCheck::Revoked(token),
            Some(token) if token.expires_at.is_some_and(|at| now > at) => {
                TokenCheck::Expired(token)
            }
            Some(token) => TokenCheck::Valid(token),
        }
    }
}

/// What authentication needs of the store.
pub trait AuthStore {
    /// Stores a new token under its secret's digest; `Err` (inside) if the name was ever used.
    fn create_admin_token(
        &self,
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
        &self,
        name: &str,
        who: &str,
        now: i64,
    ) -> Result<Option<AdminToken>, StoreError>;
    /// Records when tokens were last used (one transaction for many).
    fn touch_admin_tokens(&self, used: &[(String, i64)]) -> Result<(), StoreError>;
}
