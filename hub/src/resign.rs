//! Signing a stored body again under a new generation: for a rollout that gives an agent an
//! older body than it runs (agents refuse lower generations), and for snapshots in use whose
//! signature went bad — their key was revoked, or they are about to expire — so agents that
//! hold them get a fresh header (a delta of a body against itself: a few bytes).

use outpost_proto::SnapshotHeader;

use crate::keys::{HubKeys, KeyNotice};
use crate::store::{HubStore, StoreError, StoredSnapshot};

/// A snapshot could not be signed again.
#[derive(Debug, thiserror::Error)]
pub enum ResignError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The header does not decode, or the key cannot sign.
    #[error("signing {bundle} {digest} again under a new generation: {reason}")]
    Sign {
        /// Bundle.
        bundle: String,
        /// Body digest (short).
        digest: String,
        /// What failed.
        reason: String,
    },
}

/// Signs `snapshot`'s header again with the key in use under the bundle's next generation and
/// stores it (the body is not re-rendered). Returns the new generation.
pub fn sign_again(
    store: &dyn HubStore,
    keys: &HubKeys,
    snapshot: StoredSnapshot,
    now: i64,
) -> Result<u64, ResignError> {
    let failed = |reason: String| ResignError::Sign {
        bundle: snapshot.bundle.clone(),
        digest: snapshot.digest.short(),
        reason,
    };
    let mut header =
        SnapshotHeader::decode(&snapshot.header).map_err(|error| failed(error.to_string()))?;
    let generation = store.next_generation(&snapshot.bundle)?;
    header.generation = generation;
    let (header, signature) = keys
        .sign(header, now)
        .map_err(|error| failed(error.to_string()))?;
    tracing::info!(bundle = %snapshot.bundle, snapshot = %snapshot.digest.short(), from = snapshot.generation, generation, "snapshot signed again under a new generation");
    store.insert_resigned(&StoredSnapshot {
        generation,
        header,
        signature: signature.0.to_vec(),
        created_at: now,
        ..snapshot
    })?;
    Ok(generation)
}

/// What [`refresh_in_use`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// (bundle, old generation, new generation, why).
    pub resigned: Vec<(String, u64, u64, &'static str)>,
    /// Agents whose assignments changed.
    pub agents: Vec<String>,
}

/// Signs again every snapshot in use (assigned or released) whose key was revoked or which
/// expires within a third of the snapshot lifetime, and points releases, renders and
/// assignments at the new generation.
pub fn refresh_in_use(
    store: &dyn HubStore,
    keys: &HubKeys,
    now: i64,
) -> Result<Refreshed, ResignError> {
    let mut refreshed = Refreshed::default();
    for (bundle, generation, header) in store.headers_in_use()? {
        let Ok(decoded) = SnapshotHeader::decode(&header) else {
            tracing::error!(%bundle, generation, "a stored header does not decode; not signing it again");
            continue;
        };
        let Some(why) = keys.needs_resigning(&decoded, now) else {
            continue;
        };
        let Some(snapshot) = store.snapshot(&bundle, generation)? else {
            continue;
        };
        let new = sign_again(store, keys, snapshot, now)?;
        refreshed
            .agents
            .extend(store.replace_generation(&bundle, generation, new, now)?);
        refreshed.resigned.push((bundle, generation, new, why));
    }
    refreshed.agents.sort();
    refreshed.agents.dedup();
    Ok(refreshed)
}

/// What [`refresh_keys`] did.
#[derive(Debug, Default)]
pub struct KeysRefreshed {
    /// What changed in the keys.
    pub notices: Vec<KeyNotice>,
    /// Snapshots signed again.
    pub resigned: Refreshed,
}

/// Keys could not be refreshed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The key dir is unreadable or inconsistent (the keys in memory stay in use).
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// Signing again failed.
    #[error(transparent)]
    Resign(#[from] ResignError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Re-reads the key dir ([`HubKeys::refresh`]), records what changed in the event log, then
/// signs again what a revoked key signed or what is about to expire ([`refresh_in_use`]).
pub fn refresh_keys(
    store: &dyn HubStore,
    keys: &HubKeys,
    now: i64,
) -> Result<KeysRefreshed, RefreshError> {
    let notices = keys.refresh(now)?;
    for notice in &notices {
        match notice {
            KeyNotice::Expiring { .. } => tracing::warn!("{}", notice.message()),
            _ => tracing::info!("{}", notice.message()),
        }
        store.add_event(now, notice.kind(), "keys", &notice.message())?;
    }
    let resigned = refresh_in_use(store, keys, now)?;
    for (bundle, old, new, why) in &resigned.resigned {
        store.add_event(
            now,
            "snapshot-resigned",
            bundle,
            &format!("generation {old} signed again as {new}: {why}"),
        )?;
    }
    Ok(KeysRefreshed { notices, resigned })
}
