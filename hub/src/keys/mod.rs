//! The hub's keys: a root key that certifies and lives offline, the online signing key that signs
//! snapshot headers (certified by the root for a window), signing keys waiting to take over or
//! retired, the root's revocation list, and the hub's QUIC identity.
//!
//! The hub runs with `root.pub`, `signing.key`, `signing.cert` and `transport.key`; it never makes
//! a root key (`outpost-hub keys init` does, once, and says where to move it). If `root.key` is
//! present the hub renews its signing certificate ahead of expiry itself; if not, it warns loudly
//! as the expiry nears. Everything here is re-read by [`HubKeys::refresh`] (every half minute and
//! on `POST /api/v1/keys/reload`), so a rotation or a revocation made on another machine and
//! copied into the key dir takes effect without a restart:
//!
//! - `keys rotate` writes `signing.next.key` and `signing.next.cert`. The hub offers the new
//!   certificate to agents at once (in `Trust`, pushed to every connection) and signs with the
//!   new key only after [`KeyPolicy::rotation_grace`], so every replica and agent has it first.
//!   Then it retires the old key: its certificate moves to `certificates/` (agents still need it
//!   to verify what it signed), its private key is deleted.
//! - `keys revoke` writes `revocations`, a root-signed list whose version only grows. The hub
//!   sends it with `Trust`, stops offering the revoked certificates, promotes a waiting key at
//!   once if the revoked one was in use, and (see `runtime`) signs again under new generations
//!   the snapshots in use that a revoked key signed.
//!
//! Files in the key dir: see [`files`]. All are written 0600 in a 0700 folder.

mod ceremony;
mod files;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use outpost_proto::wire::Trust;
use outpost_proto::{
    KeyCertificate, KeyId, PublicKey, Revocations, Signature, SignedKeyCertificate,
    SignedRevocations, SigningKey, SnapshotHeader, TrustStore,
};

pub use ceremony::{InitReport, init, read_root_key, renew, revoke, rotate};
pub use files::write_private;

/// One day in seconds.
pub const DAY: i64 = 24 * 3600;

/// How keys and snapshots age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPolicy {
    /// How long a signing key's certificate is valid from when it is made or renewed.
    pub certificate_lifetime: i64,
    /// How long a new signing key is offered to agents before the hub signs with it.
    pub rotation_grace: i64,
    /// How long a snapshot stays fresh (the signed `expires_at`); `None`: snapshots never
    /// expire. Agents holding an expired snapshot keep enforcing it and report themselves stale.
    pub snapshot_lifetime: Option<i64>,
}

impl Default for KeyPolicy {
    fn default() -> KeyPolicy {
        KeyPolicy {
            certificate_lifetime: 90 * DAY,
            rotation_grace: 300,
            snapshot_lifetime: Some(30 * DAY),
        }
    }
}

impl KeyPolicy {
    /// A certificate (or snapshot) with less than a third of its lifetime left is renewed.
    fn renew_margin(lifetime: i64) -> i64 {
        lifetime / 3
    }
}

/// A certified signing key.
#[derive(Debug)]
pub struct Signer {
    key: SigningKey,
    certificate: SignedKeyCertificate,
    window: KeyCertificate,
}

impl Signer {
    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        self.key.key_id()
    }

    /// The root's certificate for it.
    pub fn certificate(&self) -> &SignedKeyCertificate {
        &self.certificate
    }

    /// The certified window (Unix seconds, inclusive).
    pub fn window(&self) -> (i64, i64) {
        (self.window.not_before, self.window.not_after)
    }
}

/// A key file that cannot be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content is not what it should be.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file the hub needs is not there.
    #[error("{path} is missing: {hint}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What to do.
        hint: String,
    },
    /// The operation cannot be done in this state of the key dir.
    #[error("{0}")]
    Refused(String),
    /// The OS random number generator failed.
    #[error("cannot get random bytes for a new key: {0}")]
    Random(String),
}

/// Why a header could not be signed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    /// The signing certificate's window has passed.
    #[error(
        "the signing key {key}'s certificate expired at {not_after}: agents would refuse what it signs; renew it (`outpost-hub keys renew --root-key FILE`) or rotate (`outpost-hub keys rotate --root-key FILE`)"
    )]
    Expired {
        /// The key.
        key: KeyId,
        /// End of its window.
        not_after: i64,
    },
    /// The signing certificate's window has not begun (a clock far behind).
    #[error("the signing key {key}'s certificate is valid from {not_before} only; check the clock")]
    NotYetValid {
        /// The key.
        key: KeyId,
        /// Start of its window.
        not_before: i64,
    },
    /// The signing key was revoked and no certified key waits to replace it.
    #[error(
        "the signing key {0} was revoked and no new key is certified: run `outpost-hub keys rotate --root-key FILE`"
    )]
    Revoked(KeyId),
    /// The header does not encode.
    #[error("signing: {0}")]
    Header(String),
}

/// Something that changed in the keys, for the log and the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyNotice {
    /// A new signing key is offered to agents; the hub signs with it from `active_from`.
    Offered {
        /// The key.
        key: KeyId,
        /// When the hub will sign with it.
        active_from: i64,
    },
    /// The hub signs with this key now; `retired` signs no more.
    Activated {
        /// The key now in use.
        key: KeyId,
        /// The key it replaced.
        retired: KeyId,
        /// Whether the key dir's files were renamed to match (false: read-only key dir).
        files_updated: bool,
    },
    /// A certificate was renewed with the root key found in the key dir.
    Renewed {
        /// The key.
        key: KeyId,
        /// Its new end.
        not_after: i64,
    },
    /// The signing certificate ends soon and `root.key` is not here to renew it.
    Expiring {
        /// The key.
        key: KeyId,
        /// Its end.
        not_after: i64,
    },
    /// A new revocation list is in force.
    Revocations {
        /// Its version.
        version: u64,
        /// The keys it revokes.
        revoked: Vec<KeyId>,
    },
}

impl KeyNotice {
    /// The event log's kind for this notice.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyNotice::Offered { .. } => "signing-key-offered",
            KeyNotice::Activated { .. } => "signing-key-activated",
            KeyNotice::Renewed { .. } => "certificate-renewed",
            KeyNotice::Expiring { .. } => "certificate-expiring",
            KeyNotice::Revocations { .. } => "keys-revoked",
        }
    }

    /// What it means, for people.
    pub fn message(&self) -> String {
        match self {
            KeyNotice::Offered { key, active_from } => format!(
                "signing key {key} is offered to agents; the hub signs with it from {active_from}"
            ),
            KeyNotice::Activated {
                key,
                retired,
                files_updated,
            } => format!(
                "signing with key {key} now; key {retired} is retired (its certificate is kept for what it signed){}",
                if *files_updated {
                    ""
                } else {
                    "; the key dir is read-only, so its files were not renamed: install signing.next.* as signing.* there"
                }
            ),
            KeyNotice::Renewed { key, not_after } => {
                format!("certificate of signing key {key} renewed until {not_after}")
            }
            KeyNotice::Expiring { key, not_after } => format!(
                "the certificate of signing key {key} expires at {not_after} and root.key is offline: run `outpost-hub keys renew --root-key FILE` (or `keys rotate`) before then, or the hub stops signing"
            ),
            KeyNotice::Revocations { version, revoked } => format!(
                "revocation list version {version} in force: {}",
                revoked
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// What the key dir holds, as read and checked.
#[derive(Debug)]
struct OnDisk {
    root_key: Option<SigningKey>,
    active: Arc<Signer>,
    next: Option<Arc<Signer>>,
    retired: Vec<(SignedKeyCertificate, KeyCertificate)>,
    revocations: Option<(SignedRevocations, Revocations)>,
}

#[derive(Debug)]
struct State {
    disk: OnDisk,
    /// When the waiting key was first offered (in this process).
    next_offered_at: Option<i64>,
    /// Bumped whenever what agents are sent in `Trust` changes.
    trust_version: u64,
    /// Whether the key dir said `Expiring` last time (said once per start and then daily).
    expiring_said_at: Option<i64>,
}

/// The hub's keys, shared by every task; [`HubKeys::refresh`] picks up changes in the key dir.
#[derive(Debug)]
pub struct HubKeys {
    dir: PathBuf,
    root: PublicKey,
    transport: SigningKey,
    policy: KeyPolicy,
    state: RwLock<State>,
    trust_changed: tokio::sync::watch::Sender<u64>,
}

/// The key dir at a glance, for `GET /api/v1/keys` and `outpost-hub keys status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The root key's id.
    pub root: KeyId,
    /// Whether `root.key` is in the key dir (it belongs offline).
    pub root_key_present: bool,
    /// The key in use, its window.
    pub active: (KeyId, i64, i64),
    /// The key waiting to take over, its window, and when it takes over.
    pub next: Option<(KeyId, i64, i64, i64)>,
    /// Retired keys still offered for what they signed.
    pub retired: Vec<(KeyId, i64, i64)>,
    /// The revocation list's version and keys.
    pub revocations: Option<(u64, Vec<KeyId>)>,
    /// What agents would be told, counted.
    pub certificates_offered: usize,
    /// Problems an operator must act on.
    pub warnings: Vec<String>,
}

impl HubKeys {
    /// Loads the keys from `dir` (made by [`init`]). Refuses, saying what to do, when a file
    /// the hub needs is missing or does not match the others; never generates a key. Call
    /// [`HubKeys::refresh`] next (and then regularly) to act on what the key dir holds.
    pub fn load(dir: &Path, policy: KeyPolicy) -> Result<HubKeys, KeyError> {
        let root = files::read_public(&dir.join(files::ROOT_PUB))?.ok_or_else(|| {
            KeyError::Missing {
                path: dir.join(files::ROOT_PUB),
                hint: format!(
                    "run `outpost-hub keys init --key-dir {}` once to make the keys (or restore the key dir from a backup)",
                    dir.display()
                ),
            }
        })?;
        let transport = files::read_seed(&dir.join(files::TRANSPORT_KEY))?.ok_or_else(|| {
            KeyError::Missing {
                path: dir.join(files::TRANSPORT_KEY),
                hint: "restore it from a backup: agents pin this key, a new one would cut every enrolled agent off".to_owned(),
            }
        })?;
        let disk = read_dir(dir, &root)?;
        let keys = HubKeys {
            dir: dir.to_owned(),
            root,
            transport,
            policy,
            state: RwLock::new(State {
                disk,
                next_offered_at: None,
                trust_version: 0,
                expiring_said_at: None,
            }),
            trust_changed: tokio::sync::watch::Sender::new(0),
        };
        Ok(keys)
    }

    /// Makes fresh keys in `dir` with [`init`] and loads them: for tests, benchmarks and the
    /// simulator, which have no operator to keep a root key offline.
    pub fn create(dir: &Path, policy: KeyPolicy, now: i64) -> Result<HubKeys, KeyError> {
        init(dir, now, policy.certificate_lifetime)?;
        HubKeys::load(dir, policy)
    }

    /// The key dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The policy.
    pub fn policy(&self) -> &KeyPolicy {
        &self.policy
    }

    /// The root public key agents pin.
    pub fn root(&self) -> PublicKey {
        self.root
    }

    /// The hub's QUIC/TLS identity.
    pub fn transport(&self) -> &SigningKey {
        &self.transport
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key new headers are signed with.
    pub fn signer(&self) -> Arc<Signer> {
        self.read().disk.active.clone()
    }

    /// Whether a key is revoked by the list in force.
    pub fn is_revoked(&self, key: &KeyId) -> bool {
        self.read()
            .disk
            .revocations
            .as_ref()
            .is_some_and(|(_, list)| list.revoked.contains(key))
    }

    /// Signs `header` for release now: the key in use, `created_at = now`, and the snapshot
    /// lifetime's `expires_at`. Returns the header bytes and the signature.
    pub fn sign(
        &self,
        mut header: SnapshotHeader,
        now: i64,
    ) -> Result<(Vec<u8>, Signature), SignError> {
        let signer = self.usable_signer(now)?;
        header.key_id = signer.key_id();
        header.created_at = now;
        header.expires_at = self.policy.snapshot_lifetime.map(|lifetime| now + lifetime);
        header
            .sign(&signer.key)
            .map_err(|error| SignError::Header(error.to_string()))
    }

    /// The key in use, if it may sign now: not revoked, within its certificate's window.
    fn usable_signer(&self, now: i64) -> Result<Arc<Signer>, SignError> {
        let signer = self.signer();
        let key = signer.key_id();
        if self.is_revoked(&key) {
            return Err(SignError::Revoked(key));
        }
        if now > signer.window.not_after {
            return Err(SignError::Expired {
                key,
                not_after: signer.window.not_after,
            });
        }
        if now < signer.window.not_before {
            return Err(SignError::NotYetValid {
                key,
                not_before: signer.window.not_before,
            });
        }
        Ok(signer)
    }

    /// Signs an assignment for sending now: the key in use (checked as for headers), expiring
    /// [`outpost_proto::assignment::ASSIGNMENT_LIFETIME`] from `now`.
    pub fn sign_assignment(
        &self,
        assign: &mut outpost_proto::wire::Assign,
        now: i64,
    ) -> Result<(), SignError> {
        let signer = self.usable_signer(now)?;
        assign.expires_at = now.saturating_add(outpost_proto::assignment::ASSIGNMENT_LIFETIME);
        outpost_proto::assignment::sign(assign, &signer.key)
            .map_err(|error| SignError::Header(error.to_string()))
    }

    /// Why a stored header should be signed again before agents get it (or keep it): its key
    /// was revoked, or it expires within a third of the snapshot lifetime. `None`: it is fine.
    pub fn needs_resigning(&self, header: &SnapshotHeader, now: i64) -> Option<&'static str> {
        if self.is_revoked(&header.key_id) {
            return Some("its signing key was revoked");
        }
        let lifetime = self.policy.snapshot_lifetime?;
        match header.expires_at {
            None => Some("it has no expiry and snapshots now expire"),
            Some(expires_at) if expires_at - now < KeyPolicy::renew_margin(lifetime) => {
                Some("it expires soon")
            }
            Some(_) => None,
        }
    }

    /// What agents are told: the certificates of every key not revoked (in use, waiting,
    /// retired) and the revocation list.
    pub fn trust(&self) -> Trust {
        let state = self.read();
        Trust {
            certificates: offered(&state.disk)
                .into_iter()
                .map(SignedKeyCertificate::to_wire)
                .collect(),
            revocations: state
                .disk
                .revocations
                .as_ref()
                .map(|(list, _)| list.to_wire()),
        }
    }

    /// A trust store as an agent that was sent [`HubKeys::trust`] holds.
    pub fn trust_store(&self) -> TrustStore {
        let trust = self.trust();
        let mut store = TrustStore::new(self.root);
        for wire in &trust.certificates {
            if let Ok(certificate) = SignedKeyCertificate::from_wire(wire) {
                let _ = store.add_certificate(&certificate);
            }
        }
        if let Some(list) = trust
            .revocations
            .as_deref()
            .and_then(|wire| SignedRevocations::from_wire(wire).ok())
        {
            let _ = store.apply_revocations(&list);
        }
        store
    }

    /// Ticks whenever [`HubKeys::trust`] changes (connections push it to their agent).
    pub fn trust_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trust_changed.subscribe()
    }

    /// Re-reads the key dir and acts on it: offers a new signing key, switches to it after the
    /// grace period (at once if the key in use was revoked), renews certificates when
    /// `root.key` is at hand, warns when one expires soon without it. Returns what changed.
    pub fn refresh(&self, now: i64) -> Result<Vec<KeyNotice>, KeyError> {
        let disk = read_dir(&self.dir, &self.root)?;
        let mut state = self.write();
        let before = trust_fingerprint(&state.disk);
        let mut notices = Vec::new();
        let old_version = state
            .disk
            .revocations
            .as_ref()
            .map_or(0, |(_, list)| list.version);
        if let Some((_, list)) = &disk.revocations
            && (list.version > old_version || state.trust_version == 0)
        {
            notices.push(KeyNotice::Revocations {
                version: list.version,
                revoked: list.revoked.iter().copied().collect(),
            });
        }
        // A waiting key already offered by this process keeps its offer time.
        let same_next = match (&disk.next, &state.disk.next) {
            (Some(new), Some(old)) => {
                new.key_id() == old.key_id() && state.next_offered_at.is_some()
            }
            _ => false,
        };
        let offered_at = match (&disk.next, same_next) {
            (None, _) => None,
            (Some(_), true) => state.next_offered_at,
            (Some(_), false) => Some(now),
        };
        state.disk = disk;
        state.next_offered_at = offered_at;
        let revoked = |disk: &OnDisk, key: &KeyId| {
            disk.revocations
                .as_ref()
                .is_some_and(|(_, list)| list.revoked.contains(key))
        };
        if let Some(next) = state.disk.next.clone()
            && !revoked(&state.disk, &next.key_id())
        {
            let offered_at = state.next_offered_at.unwrap_or(now);
            let active_from = offered_at + self.policy.rotation_grace;
            let active_revoked = revoked(&state.disk, &state.disk.active.key_id());
            if !same_next {
                notices.push(KeyNotice::Offered {
                    key: next.key_id(),
                    active_from: if active_revoked { now } else { active_from },
                });
            }
            if active_revoked || now >= active_from {
                notices.push(self.promote(&mut state)?);
            }
        }
        notices.extend(self.renew_if_due(&mut state, now)?);
        if trust_fingerprint(&state.disk) != before || state.trust_version == 0 {
            state.trust_version += 1;
            let version = state.trust_version;
            self.trust_changed.send_replace(version);
        }
        Ok(notices)
    }

    /// Makes the waiting key the one in use: its files take the active names, the old
    /// certificate moves to `certificates/`, the old private key is deleted.
    fn promote(&self, state: &mut State) -> Result<KeyNotice, KeyError> {
        let Some(next) = state.disk.next.take() else {
            return Err(KeyError::Refused("no signing key is waiting".to_owned()));
        };
        let old = std::mem::replace(&mut state.disk.active, next.clone());
        state.next_offered_at = None;
        state
            .disk
            .retired
            .push((old.certificate.clone(), old.window.clone()));
        let dir = &self.dir;
        // Each step is atomic and leaves a key dir that `read_dir` reads as before or after the
        // switch, so a crash anywhere is safe.
        let renamed = (|| -> Result<(), KeyError> {
            files::private_dir(&dir.join(files::RETIRED_DIR))?;
            files::write_certificate(&retired_path(dir, &old.key_id()), &old.certificate)?;
            files::write_certificate(&dir.join(files::SIGNING_CERT), &next.certificate)?;
            files::write_seed(&dir.join(files::SIGNING_KEY), &next.key)?;
            remove(&dir.join(files::NEXT_CERT))?;
            remove(&dir.join(files::NEXT_KEY))
        })();
        if let Err(error) = &renamed {
            tracing::warn!(%error, "cannot rename the key files after switching signing keys; the switch holds in memory");
        }
        Ok(KeyNotice::Activated {
            key: next.key_id(),
            retired: old.key_id(),
            files_updated: renamed.is_ok(),
        })
    }

    fn renew_if_due(&self, state: &mut State, now: i64) -> Result<Vec<KeyNotice>, KeyError> {
        let lifetime = self.policy.certificate_lifetime;
        let margin = KeyPolicy::renew_margin(lifetime);
        let mut notices = Vec::new();
        let active = state.disk.active.clone();
        if active.window.not_after - now >= margin {
            return Ok(notices);
        }
        let Some(root_key) = &state.disk.root_key else {
            let said_recently = state.expiring_said_at.is_some_and(|at| now - at < DAY);
            if !said_recently {
                state.expiring_said_at = Some(now);
                notices.push(KeyNotice::Expiring {
                    key: active.key_id(),
                    not_after: active.window.not_after,
                });
            }
            return Ok(notices);
        };
        let window = KeyCertificate {
            not_after: now + lifetime,
            ..active.window.clone()
        };
        let certificate = root_key.certify(&window);
        files::write_certificate(&self.dir.join(files::SIGNING_CERT), &certificate)?;
        state.disk.active = Arc::new(Signer {
            key: SigningKey::from_seed(active.key.seed()),
            certificate,
            window,
        });
        notices.push(KeyNotice::Renewed {
            key: active.key_id(),
            not_after: now + lifetime,
        });
        Ok(notices)
    }

    /// The key dir at a glance.
    pub fn status(&self, now: i64) -> KeyStatus {
        let state = self.read();
        let disk = &state.disk;
        let window = |signer: &Signer| {
            (
                signer.key_id(),
                signer.window.not_before,
                signer.window.not_after,
            )
        };
        let mut warnings = Vec::new();
        if disk.root_key.is_some() {
            warnings.push(format!(
                "root.key is in {}: move it offline (the hub needs only root.pub; keep root.key for `keys rotate/renew/revoke`)",
                self.dir.display()
            ));
        }
        let active = window(&disk.active);
        if active.2 - now < KeyPolicy::renew_margin(self.policy.certificate_lifetime) {
            warnings.push(
                KeyNotice::Expiring {
                    key: active.0,
                    not_after: active.2,
                }
                .message(),
            );
        }
        let revoked: Vec<KeyId> = disk
            .revocations
            .as_ref()
            .map(|(_, list)| list.revoked.iter().copied().collect())
            .unwrap_or_default();
        if revoked.contains(&active.0) {
            warnings.push(SignError::Revoked(active.0).to_string());
        }
        KeyStatus {
            root: self.root.key_id(),
            root_key_present: disk.root_key.is_some(),
            active,
            next: disk.next.as_ref().map(|next| {
                let (key, not_before, not_after) = window(next);
                let from = state.next_offered_at.unwrap_or(now) + self.policy.rotation_grace;
                (key, not_before, not_after, from)
            }),
            retired: disk
                .retired
                .iter()
                .map(|(_, window)| {
                    (
                        window.signing_key.key_id(),
                        window.not_before,
                        window.not_after,
                    )
                })
                .collect(),
            revocations: disk
                .revocations
                .as_ref()
                .map(|(_, list)| (list.version, revoked.clone())),
            certificates_offered: offered(disk).len(),
            warnings,
        }
    }
}

/// The certificates agents are offered: every key's but the revoked ones, the key in use first.
fn offered(disk: &OnDisk) -> Vec<&SignedKeyCertificate> {
    let revoked = |key: &KeyId| {
        disk.revocations
            .as_ref()
            .is_some_and(|(_, list)| list.revoked.contains(key))
    };
    let mut certificates = vec![&disk.active.certificate];
    certificates.extend(
        disk.next
            .iter()
            .filter(|next| !revoked(&next.key_id()))
            .map(|next| &next.certificate),
    );
    certificates.extend(
        disk.retired
            .iter()
            .filter(|(_, window)| !revoked(&window.signing_key.key_id()))
            .map(|(certificate, _)| certificate),
    );
    certificates
}

/// What agents are sent, to compare before and after a refresh.
fn trust_fingerprint(disk: &OnDisk) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = offered(disk)
        .into_iter()
        .map(SignedKeyCertificate::to_wire)
        .collect();
    parts.extend(disk.revocations.iter().map(|(list, _)| list.to_wire()));
    parts
}

fn retired_path(dir: &Path, key: &KeyId) -> PathBuf {
    dir.join(files::RETIRED_DIR)
        .join(format!("{}.cert", hex::encode(key.0)))
}

fn remove(path: &Path) -> Result<(), KeyError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(KeyError::Io {
            path: path.to_owned(),
            source: error,
        }),
        _ => Ok(()),
    }
}

/// Reads and checks the signing side of the key dir. Certificates are matched to keys by key id,
/// so a key dir left half-way through a switch of signing keys reads as before or after it.
fn read_dir(dir: &Path, root: &PublicKey) -> Result<OnDisk, KeyError> {
    let root_key = files::read_seed(&dir.join(files::ROOT_KEY))?;
    if let Some(root_key) = &root_key
        && root_key.public_key() != *root
    {
        return Err(KeyError::Corrupt {
            path: dir.join(files::ROOT_KEY),
            message: format!(
                "this root key ({}) is not the one root.pub names ({}); agents trust root.pub",
                root_key.key_id(),
                root.key_id()
            ),
        });
    }
    let mut certified: BTreeMap<KeyId, (SignedKeyCertificate, KeyCertificate, PathBuf)> =
        BTreeMap::new();
    let mut certificate_files: Vec<(PathBuf, SignedKeyCertificate)> = Vec::new();
    for name in [files::SIGNING_CERT, files::NEXT_CERT] {
        let path = dir.join(name);
        if let Some(certificate) = files::read_certificate(&path)? {
            certificate_files.push((path, certificate));
        }
    }
    certificate_files.extend(files::retired_certificates(dir)?);
    for (path, certificate) in certificate_files {
        let mut trust = TrustStore::new(*root);
        trust
            .add_certificate(&certificate)
            .map_err(|error| KeyError::Corrupt {
                path: path.clone(),
                message: format!("{error}; it must be certified by the root in root.pub"),
            })?;
        let window =
            KeyCertificate::decode(&certificate.bytes).map_err(|error| KeyError::Corrupt {
                path: path.clone(),
                message: error.to_string(),
            })?;
        let key = window.signing_key.key_id();
        // Of two certificates for one key, the one reaching further wins (a renewal).
        let keep = certified
            .get(&key)
            .is_none_or(|(_, old, _)| window.not_after > old.not_after);
        if keep {
            certified.insert(key, (certificate, window, path));
        }
    }
    let signer = |key: Option<SigningKey>| -> Option<Arc<Signer>> {
        let key = key?;
        let (certificate, window, _) = certified.get(&key.key_id())?.clone();
        Some(Arc::new(Signer {
            key,
            certificate,
            window,
        }))
    };
    let signing = files::read_seed(&dir.join(files::SIGNING_KEY))?;
    let signing_present = signing.is_some();
    let next_key = files::read_seed(&dir.join(files::NEXT_KEY))?;
    let (active, next) = match (signer(signing), signer(next_key)) {
        (Some(active), next) => (
            active.clone(),
            next.filter(|next| next.key_id() != active.key_id()),
        ),
        // A switch of keys cut short after the next key took the active certificate's name.
        (None, Some(next)) => (next, None),
        (None, None) => {
            return Err(match signing_present {
                true => KeyError::Corrupt {
                    path: dir.join(files::SIGNING_CERT),
                    message: "no certificate here certifies signing.key; restore signing.cert from a backup, or certify a new key with `outpost-hub keys rotate --root-key FILE`".to_owned(),
                },
                false => KeyError::Missing {
                    path: dir.join(files::SIGNING_KEY),
                    hint: format!(
                        "restore it from a backup, or certify a new one with `outpost-hub keys rotate --key-dir {} --root-key FILE`",
                        dir.display()
                    ),
                },
            });
        }
    };
    let in_use = [
        Some(active.key_id()),
        next.as_ref().map(|next| next.key_id()),
    ];
    let retired = certified
        .into_iter()
        .filter(|(key, _)| !in_use.contains(&Some(*key)))
        .map(|(_, (certificate, window, _))| (certificate, window))
        .collect();
    let revocations = match files::read_revocations(&dir.join(files::REVOCATIONS))? {
        None => None,
        Some(signed) => {
            let list = signed.verify(root).map_err(|error| KeyError::Corrupt {
                path: dir.join(files::REVOCATIONS),
                message: error.to_string(),
            })?;
            Some((signed, list))
        }
    };
    Ok(OnDisk {
        root_key,
        active,
        next,
        retired,
        revocations,
    })
}

#[cfg(test)]
mod tests;
