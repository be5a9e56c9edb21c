//! The agent's state: one SQLite file (WAL, `synchronous=FULL`) in the state dir. Every change is
//! one transaction, so a kill at any instant leaves the old state or the new one.
//!
//! Holds: enrolment (hub address, pin, root key, token until used, agent id), signing-key
//! certificates, verified snapshots (the current and the previous generation per bundle),
//! assignments with their sequence, partial downloads (so a transfer resumes after a restart),
//! and the status outbox. Snapshots are stored only as a [`VerifiedSnapshot`] and re-verified
//! when loaded, so a damaged file can never be applied silently.

use std::path::Path;

use outpost_proto::wire::{
    Assign, Assignment, HeldProof, HeldSnapshot, Message, PayloadEncoding, StatusReport,
};
use outpost_proto::{
    Digest, Expectation, Installed, KeyCertificate, PublicKey, SignedKeyCertificate,
    SignedRevocations, TrustStore, VerifiedSnapshot,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::target::ObjectRef;

/// Schema migrations; index + 1 is the version.
const MIGRATIONS: &[&str] = &["CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE certificates (key_id BLOB PRIMARY KEY, wire BLOB NOT NULL);
    CREATE TABLE snapshots (
        bundle TEXT NOT NULL,
        generation INTEGER NOT NULL,
        digest BLOB NOT NULL,
        header BLOB NOT NULL,
        signature BLOB NOT NULL,
        body BLOB NOT NULL,
        installed_at INTEGER NOT NULL,
        PRIMARY KEY (bundle, generation)
    );
    CREATE TABLE assignments (bundle TEXT PRIMARY KEY, generation INTEGER NOT NULL, digest BLOB NOT NULL);
    CREATE TABLE downloads (
        snapshot BLOB PRIMARY KEY,
        bundle TEXT NOT NULL,
        header BLOB NOT NULL,
        signature BLOB NOT NULL,
        base BLOB,
        payload_size INTEGER NOT NULL,
        payload_digest BLOB NOT NULL
    );
    CREATE TABLE download_chunks (
        snapshot BLOB NOT NULL,
        offset INTEGER NOT NULL,
        bytes BLOB NOT NULL,
        PRIMARY KEY (snapshot, offset)
    );
    CREATE TABLE outbox (sequence INTEGER PRIMARY KEY, frame BLOB NOT NULL, created_at INTEGER NOT NULL);",
    // 2: the reconcile loop's applied inventory and the last status of each bundle.
    "CREATE TABLE inventory (
        bundle TEXT NOT NULL,
        grp TEXT NOT NULL,
        kind TEXT NOT NULL,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        api_version TEXT NOT NULL,
        PRIMARY KEY (bundle, grp, kind, namespace, name)
    );
    CREATE TABLE last_status (bundle TEXT PRIMARY KEY, status TEXT NOT NULL);",
    // 3: protocol 3 (drift reports). Queued frames keep their message bytes (a StatusReport
    // encodes the same in protocol 3) and take the new version; the drift left in place and
    // reported last, per bundle, so it is reported again only when it changes.
    "UPDATE outbox SET frame = CAST(substr(frame, 1, 4) || X'0003' || substr(frame, 7) AS BLOB)
        WHERE substr(frame, 5, 2) = X'0002';
    CREATE TABLE drift_left (bundle TEXT PRIMARY KEY, fingerprint BLOB NOT NULL);",
    // 4: protocol 4 (Hello carries signed evidence; counters at most 2^63 - 1). Queued status
    // and drift frames encode the same and take the new version.
    "UPDATE outbox SET frame = CAST(substr(frame, 1, 4) || X'0004' || substr(frame, 7) AS BLOB)
        WHERE substr(frame, 5, 2) = X'0003';"];

/// Where the agent is enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// Hub address (`host:port`).
    pub hub: String,
    /// SHA-256 of the hub's TLS key.
    pub hub_pin: Digest,
    /// Root of snapshot trust.
    pub root_key: PublicKey,
    /// The token, until the hub confirmed enrolment.
    pub token: Option<String>,
    /// The agent's id, once enrolled.
    pub agent_id: Option<String>,
}

/// A transfer in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Snapshot (body digest).
    pub snapshot: Digest,
    /// Bundle.
    pub bundle: String,
    /// Signed header and signature from `TransferStart`.
    pub header: Vec<u8>,
    /// Signature.
    pub signature: Vec<u8>,
    /// Whole or delta.
    pub encoding: PayloadEncoding,
    /// Payload length.
    pub payload_size: u64,
    /// Payload digest.
    pub payload_digest: Digest,
    /// Bytes held so far.
    pub received: u64,
}

/// The state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite failed (disk full, corrupt file).
    #[error("agent state database: {0}; if the file is damaged, move it aside and re-enrol")]
    Sqlite(#[from] rusqlite::Error),
    /// A newer agent wrote the file.
    #[error(
        "agent state schema {found} is newer than this agent understands ({known}); run a newer agent"
    )]
    TooNew {
        /// In the file.
        found: usize,
        /// Known here.
        known: usize,
    },
    /// The agent has not been enrolled.
    #[error("this agent is not enrolled; run `outpost-agent enrol --bundle FILE` first")]
    NotEnrolled,
    /// A stored value is damaged.
    #[error("agent state: {0}")]
    Corrupt(String),
    /// SQLite's integrity check failed.
    #[error("agent state database is damaged: {0}")]
    Damaged(String),
}

/// The open state database.
#[derive(Debug)]
pub struct State {
    connection: Connection,
}

fn digest_from(bytes: &[u8]) -> Result<Digest, StateError> {
    Digest::from_slice(bytes)
        .ok_or_else(|| StateError::Corrupt(format!("a digest of {} bytes", bytes.len())))
}

/// A `meta` value (also inside a transaction, which derefs to a connection).
fn read_meta(connection: &Connection, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
    connection
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()
}

fn write_meta(connection: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
        params![key, value],
    )?;
    Ok(())
}

/// A `meta` counter (8 bytes big-endian), 0 when absent.
fn read_counter(connection: &Connection, key: &str) -> rusqlite::Result<u64> {
    Ok(read_meta(connection, key)?
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Writes `report` (a status or drift report numbered `sequence`) to the outbox as a frame and
/// moves the outbox counter, inside the caller's transaction.
fn append_to_outbox(
    connection: &Connection,
    sequence: u64,
    report: &Message,
    now: i64,
) -> Result<(), StateError> {
    let frame = outpost_proto::wire::encode_frame(report)
        .map_err(|error| StateError::Corrupt(format!("outbox report: {error}")))?;
    connection.execute(
        "INSERT INTO outbox (sequence, frame, created_at) VALUES (?1, ?2, ?3)",
        params![sequence as i64, frame, now],
    )?;
    write_meta(connection, "outbox_last", &sequence.to_be_bytes())?;
    Ok(())
}

impl State {
    /// Opens (creating) `path` and migrates it. A file that is not a database is an error that
    /// says so; nothing is overwritten.
    pub fn open(path: &Path) -> Result<State, StateError> {
        let in_memory = path.as_os_str() == ":memory:";
        if !in_memory {
            crate::files::private_database(path)
                .map_err(|error| StateError::Corrupt(format!("{}: {error}", path.display())))?;
        }
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        // A small page cache: the agent reads little and often (default is 2 MB).
        connection.pragma_update(None, "cache_size", -512)?;
        let found: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let found = found as usize;
        if found > MIGRATIONS.len() {
            return Err(StateError::TooNew {
                found,
                known: MIGRATIONS.len(),
            });
        }
        let mut state = State { connection };
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(found) {
            let transaction = state.connection.transaction()?;
            transaction.execute_batch(sql)?;
            transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
            transaction.commit()?;
        }
        if !in_memory {
            // The WAL and shared-memory files exist now.
            crate::files::private_database(path)
                .map_err(|error| StateError::Corrupt(format!("{}: {error}", path.display())))?;
        }
        Ok(state)
    }

    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(read_meta(&self.connection, key)?)
    }

    fn meta_text(&self, key: &str) -> Result<Option<String>, StateError> {
        self.meta(key)?
            .map(|bytes| {
                String::from_utf8(bytes)
                    .map_err(|_| StateError::Corrupt(format!("{key} is not text")))
            })
            .transpose()
    }

    /// Records where to enrol (from an enrolment bundle), replacing an unfinished enrolment.
    pub fn set_enrolment(
        &mut self,
        hub: &str,
        hub_pin: &Digest,
        root_key: &PublicKey,
        token: &str,
    ) -> Result<(), StateError> {
        let transaction = self.connection.transaction()?;
        write_meta(&transaction, "hub", hub.as_bytes())?;
        write_meta(&transaction, "hub_pin", &hub_pin.0)?;
        write_meta(&transaction, "root_key", &root_key.to_bytes())?;
        write_meta(&transaction, "token", token.as_bytes())?;
        transaction.commit()?;
        Ok(())
    }

    /// The enrolment, if any.
    pub fn enrolment(&self) -> Result<Option<Enrolment>, StateError> {
        let (Some(hub), Some(pin), Some(root)) = (
            self.meta_text("hub")?,
            self.meta("hub_pin")?,
            self.meta("root_key")?,
        ) else {
            return Ok(None);
        };
        let root = <[u8; 32]>::try_from(root.as_slice())
            .ok()
            .and_then(|bytes| PublicKey::from_bytes(&bytes).ok())
            .ok_or_else(|| StateError::Corrupt("root_key is not an ed25519 key".to_owned()))?;
        Ok(Some(Enrolment {
            hub,
            hub_pin: digest_from(&pin)?,
            root_key: root,
            token: self.meta_text("token")?,
            agent_id: self.meta_text("agent_id")?,
        }))
    }

    /// Dials the hub at `hub` from now on (it moved).
    pub fn set_hub(&mut self, hub: &str) -> Result<(), StateError> {
        write_meta(&self.connection, "hub", hub.as_bytes())?;
        Ok(())
    }

    /// Records why the hub refused this agent (revoked, unknown), or clears it (`None`) once a
    /// session works again: `status` shows it.
    pub fn set_link_refusal(&mut self, refusal: Option<&str>) -> Result<(), StateError> {
        match refusal {
            Some(text) => write_meta(&self.connection, "link_refusal", text.as_bytes())?,
            None => {
                self.connection
                    .execute("DELETE FROM meta WHERE key = 'link_refusal'", [])?;
            }
        }
        Ok(())
    }

    /// Why the hub last refused this agent, if it does.
    pub fn link_refusal(&self) -> Result<Option<String>, StateError> {
        Ok(read_meta(&self.connection, "link_refusal")?
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Whether an error means the file is damaged (as opposed to busy, full or too new).
    pub fn is_damage(error: &StateError) -> bool {
        match error {
            StateError::Damaged(_) => true,
            StateError::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => matches!(
                failure.code,
                rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
            ),
            _ => false,
        }
    }

    /// The hub confirmed enrolment: keep the id, forget the token.
    pub fn enrolled(&mut self, agent_id: &str) -> Result<(), StateError> {
        let transaction = self.connection.transaction()?;
        write_meta(&transaction, "agent_id", agent_id.as_bytes())?;
        transaction.execute("DELETE FROM meta WHERE key = 'token'", [])?;
        transaction.commit()?;
        Ok(())
    }

    /// The trust store: the pinned root, the certificates the hub sent that it certifies, and
    /// the newest root-signed revocation list received.
    pub fn trust_store(&self) -> Result<TrustStore, StateError> {
        let enrolment = self.enrolment()?.ok_or(StateError::NotEnrolled)?;
        let mut trust = TrustStore::new(enrolment.root_key);
        let mut statement = self.connection.prepare("SELECT wire FROM certificates")?;
        let rows: Vec<Vec<u8>> = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        for wire in rows {
            if let Ok(certificate) = SignedKeyCertificate::from_wire(&wire) {
                let _ = trust.add_certificate(&certificate);
            }
        }
        if let Some(wire) = self.meta("revocations")?
            && let Ok(list) = SignedRevocations::from_wire(&wire)
        {
            let _ = trust.apply_revocations(&list);
        }
        Ok(trust)
    }

    /// Keeps a signing-key certificate if the root certifies it and it reaches further than the
    /// one held for its key (an older one replayed changes nothing); returns whether it was
    /// kept.
    pub fn add_certificate(&mut self, wire: &[u8]) -> Result<bool, StateError> {
        let mut trust = self.trust_store()?;
        let Ok(certificate) = SignedKeyCertificate::from_wire(wire) else {
            return Ok(false);
        };
        let Ok(key_id) = trust.add_certificate(&certificate) else {
            return Ok(false);
        };
        let kept = KeyCertificate::decode(&certificate.bytes)
            .is_ok_and(|offered| trust.signing_key(&key_id) == Some(&offered));
        if !kept {
            return Ok(false);
        }
        self.connection.execute(
            "INSERT INTO certificates (key_id, wire) VALUES (?1, ?2) ON CONFLICT (key_id) DO UPDATE SET wire = ?2",
            params![key_id.0.as_slice(), wire],
        )?;
        Ok(true)
    }

    /// Keeps a root-signed revocation list if it is newer than the one held; returns whether it
    /// was kept. A list that does not verify is refused with an error.
    pub fn apply_revocations(&mut self, wire: &[u8]) -> Result<bool, StateError> {
        let mut trust = self.trust_store()?;
        let adopted = SignedRevocations::from_wire(wire)
            .and_then(|list| trust.apply_revocations(&list))
            .map_err(|error| StateError::Corrupt(format!("revocation list refused: {error}")))?;
        if adopted {
            write_meta(&self.connection, "revocations", wire)?;
        }
        Ok(adopted)
    }

    /// The sequence of the last accepted assignment set.
    pub fn assignment_sequence(&self) -> Result<u64, StateError> {
        Ok(read_counter(&self.connection, "assignment_sequence")?)
    }

    /// Accepts an `Assign` if its sequence is above the last one (a replayed old one changes
    /// nothing); returns whether it was accepted.
    pub fn accept_assign(&mut self, assign: &Assign) -> Result<bool, StateError> {
        let transaction = self.connection.transaction()?;
        let current = read_counter(&transaction, "assignment_sequence")?;
        if assign.sequence <= current && current != 0 {
            return Ok(false);
        }
        transaction.execute("DELETE FROM assignments", [])?;
        for assignment in &assign.assignments {
            transaction.execute(
                "INSERT INTO assignments (bundle, generation, digest) VALUES (?1, ?2, ?3)",
                params![
                    assignment.bundle,
                    assignment.generation as i64,
                    assignment.digest.0.as_slice()
                ],
            )?;
        }
        write_meta(
            &transaction,
            "assignment_sequence",
            &assign.sequence.to_be_bytes(),
        )?;
        transaction.commit()?;
        Ok(true)
    }

    /// Rows of (bundle, generation, digest) that `sql` selects.
    fn bundle_rows(&self, sql: &str) -> Result<Vec<(String, u64, Digest)>, StateError> {
        let mut statement = self.connection.prepare(sql)?;
        let rows: Vec<(String, i64, Vec<u8>)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<Result<_, _>>()?;
        rows.into_iter()
            .map(|(bundle, generation, digest)| {
                Ok((bundle, generation as u64, digest_from(&digest)?))
            })
            .collect()
    }

    /// Current assignments, by bundle.
    pub fn assignments(&self) -> Result<Vec<Assignment>, StateError> {
        let rows =
            self.bundle_rows("SELECT bundle, generation, digest FROM assignments ORDER BY bundle")?;
        Ok(rows
            .into_iter()
            .map(|(bundle, generation, digest)| Assignment {
                bundle,
                generation,
                digest,
            })
            .collect())
    }

    /// Snapshots held, newest generation first within each bundle.
    pub fn held(&self) -> Result<Vec<HeldSnapshot>, StateError> {
        let rows = self.bundle_rows(
            "SELECT bundle, generation, digest FROM snapshots ORDER BY bundle, generation DESC",
        )?;
        Ok(rows
            .into_iter()
            .map(|(bundle, generation, digest)| HeldSnapshot {
                bundle,
                generation,
                digest,
            })
            .collect())
    }

    /// The signed header of the newest held snapshot of each bundle: what the agent shows a hub
    /// as evidence of the generations it was issued (`Hello::proofs`).
    pub fn held_proofs(&self) -> Result<Vec<HeldProof>, StateError> {
        let mut statement = self.connection.prepare(
            "SELECT header, signature FROM snapshots AS s
             WHERE generation = (SELECT MAX(generation) FROM snapshots WHERE bundle = s.bundle)
             ORDER BY bundle",
        )?;
        let rows = statement
            .query_map([], |row| {
                Ok(HeldProof {
                    header: row.get(0)?,
                    signature: row.get(1)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The newest installed snapshot of `bundle` (generation and digest).
    pub fn installed(&self, bundle: &str) -> Result<Option<Installed>, StateError> {
        Ok(self
            .held()?
            .into_iter()
            .find(|held| held.bundle == bundle)
            .map(|held| Installed {
                generation: held.generation,
                digest: held.digest,
            }))
    }

    /// Loads a held snapshot and verifies it again (signature, digest, size): a damaged file
    /// is an error, never a wrong apply.
    pub fn load_snapshot(
        &self,
        bundle: &str,
        digest: &Digest,
    ) -> Result<Option<VerifiedSnapshot>, StateError> {
        let row: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = self
            .connection
            .query_row(
                "SELECT header, signature, body FROM snapshots WHERE bundle = ?1 AND digest = ?2
                 ORDER BY generation DESC LIMIT 1",
                params![bundle, digest.0.as_slice()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()?;
        let Some((header, signature, body)) = row else {
            return Ok(None);
        };
        // An integrity check of what was verified when it arrived: a key revoked since does
        // not make the agent drop what it enforces (offline autonomy); it only refuses what
        // that key signs from now on.
        let trust = self.trust_store()?.ignoring_revocations();
        let expect = Expectation {
            bundle,
            assigned_digest: Some(*digest),
            installed: None,
        };
        outpost_proto::verify::verify_snapshot(&trust, &header, &signature, body, &expect)
            .map(Some)
            .map_err(|error| {
                StateError::Corrupt(format!(
                    "held snapshot {} of {bundle} no longer verifies: {error}",
                    digest.short()
                ))
            })
    }

    /// Installs a verified snapshot in one transaction: stores it, keeps the previous generation
    /// of its bundle for rollback, drops older ones and the finished download.
    pub fn install(&mut self, snapshot: &VerifiedSnapshot, now: i64) -> Result<(), StateError> {
        let header = snapshot.header();
        let transaction = self.connection.transaction()?;
        transaction.execute(
            "INSERT OR IGNORE INTO snapshots (bundle, generation, digest, header, signature, body, installed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                header.bundle,
                header.generation as i64,
                header.body_digest.0.as_slice(),
                snapshot.header_bytes(),
                snapshot.signature().0.as_slice(),
                snapshot.body().as_bytes(),
                now
            ],
        )?;
        // The same body under an older generation: only its header was renewed; keep one.
        transaction.execute(
            "DELETE FROM snapshots WHERE bundle = ?1 AND digest = ?2 AND generation < ?3",
            params![
                header.bundle,
                header.body_digest.0.as_slice(),
                header.generation as i64
            ],
        )?;
        // Keep the two newest generations of the bundle.
        transaction.execute(
            "DELETE FROM snapshots WHERE bundle = ?1 AND generation NOT IN
             (SELECT generation FROM snapshots WHERE bundle = ?1 ORDER BY generation DESC LIMIT 2)",
            [&header.bundle],
        )?;
        transaction.execute(
            "DELETE FROM download_chunks WHERE snapshot = ?1",
            [header.body_digest.0.as_slice()],
        )?;
        transaction.execute(
            "DELETE FROM downloads WHERE snapshot = ?1",
            [header.body_digest.0.as_slice()],
        )?;
        transaction.commit()?;
        Ok(())
    }

    /// The download in progress for `snapshot`, if any.
    pub fn download(&self, snapshot: &Digest) -> Result<Option<Download>, StateError> {
        type Row = (String, Vec<u8>, Vec<u8>, Option<Vec<u8>>, i64, Vec<u8>);
        let row: Option<Row> = self
            .connection
            .query_row(
                "SELECT bundle, header, signature, base, payload_size, payload_digest FROM downloads WHERE snapshot = ?1",
                [snapshot.0.as_slice()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?)),
            )
            .optional()?;
        let Some((bundle, header, signature, base, payload_size, payload_digest)) = row else {
            return Ok(None);
        };
        let received: i64 = self.connection.query_row(
            "SELECT COALESCE(SUM(LENGTH(bytes)), 0) FROM download_chunks WHERE snapshot = ?1",
            [snapshot.0.as_slice()],
            |row| row.get(0),
        )?;
        Ok(Some(Download {
            snapshot: *snapshot,
            bundle,
            header,
            signature,
            encoding: match base {
                Some(base) => PayloadEncoding::Delta {
                    base: digest_from(&base)?,
                },
                None => PayloadEncoding::Whole,
            },
            payload_size: payload_size as u64,
            payload_digest: digest_from(&payload_digest)?,
            received: received as u64,
        }))
    }

    /// Starts (or restarts) a download, dropping bytes of any earlier one for the snapshot.
    pub fn begin_download(&mut self, download: &Download) -> Result<(), StateError> {
        let transaction = self.connection.transaction()?;
        let key = download.snapshot.0.as_slice();
        transaction.execute("DELETE FROM download_chunks WHERE snapshot = ?1", [key])?;
        transaction.execute("DELETE FROM downloads WHERE snapshot = ?1", [key])?;
        let base = match download.encoding {
            PayloadEncoding::Delta { base } => Some(base.0.to_vec()),
            PayloadEncoding::Whole => None,
        };
        transaction.execute(
            "INSERT INTO downloads (snapshot, bundle, header, signature, base, payload_size, payload_digest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                key,
                download.bundle,
                download.header,
                download.signature,
                base,
                download.payload_size as i64,
                download.payload_digest.0.as_slice()
            ],
        )?;
        transaction.commit()?;
        Ok(())
    }

    /// Appends received payload slices `(offset, bytes)` in one transaction. Chunks are written
    /// with `synchronous=NORMAL`: in WAL mode they survive a process crash, and a power loss can
    /// only drop the newest ones, which leaves a shorter but consistent download to resume.
    pub fn append_chunks(
        &mut self,
        snapshot: &Digest,
        chunks: &[(u64, Vec<u8>)],
    ) -> Result<(), StateError> {
        self.connection
            .pragma_update(None, "synchronous", "NORMAL")?;
        let result = (|| {
            let transaction = self.connection.transaction()?;
            for (offset, bytes) in chunks {
                transaction.execute(
                    "INSERT OR REPLACE INTO download_chunks (snapshot, offset, bytes) VALUES (?1, ?2, ?3)",
                    params![snapshot.0.as_slice(), *offset as i64, bytes],
                )?;
            }
            transaction.commit()
        })();
        self.connection.pragma_update(None, "synchronous", "FULL")?;
        Ok(result?)
    }

    /// The payload bytes received, in order.
    pub fn payload(&self, snapshot: &Digest) -> Result<Vec<u8>, StateError> {
        let mut statement = self
            .connection
            .prepare("SELECT bytes FROM download_chunks WHERE snapshot = ?1 ORDER BY offset")?;
        let mut payload = Vec::new();
        let mut rows = statement.query([snapshot.0.as_slice()])?;
        while let Some(row) = rows.next()? {
            let bytes: Vec<u8> = row.get(0)?;
            payload.extend_from_slice(&bytes);
        }
        Ok(payload)
    }

    /// Forgets a download (its bytes did not verify).
    pub fn drop_download(&mut self, snapshot: &Digest) -> Result<(), StateError> {
        let transaction = self.connection.transaction()?;
        transaction.execute(
            "DELETE FROM download_chunks WHERE snapshot = ?1",
            [snapshot.0.as_slice()],
        )?;
        transaction.execute(
            "DELETE FROM downloads WHERE snapshot = ?1",
            [snapshot.0.as_slice()],
        )?;
        transaction.commit()?;
        Ok(())
    }

    /// Queues a status report; its sequence is assigned here and never reused.
    pub fn queue_status(
        &mut self,
        bundles: Vec<outpost_proto::wire::BundleStatus>,
        now: i64,
    ) -> Result<u64, StateError> {
        let transaction = self.connection.transaction()?;
        let sequence = read_counter(&transaction, "outbox_last")? + 1;
        for status in &bundles {
            let text = serde_json::to_string(status)
                .map_err(|error| StateError::Corrupt(format!("status: {error}")))?;
            transaction.execute(
                "INSERT INTO last_status (bundle, status) VALUES (?1, ?2) ON CONFLICT (bundle) DO UPDATE SET status = ?2",
                params![status.bundle, text],
            )?;
        }
        let report = Message::StatusReport(StatusReport { sequence, bundles });
        append_to_outbox(&transaction, sequence, &report, now)?;
        transaction.commit()?;
        Ok(sequence)
    }

    /// Queues drift reports; `left` gives, per bundle whose drift is left in place, the
    /// fingerprint of what the reports say is left now (`None`: nothing), stored in the same
    /// transaction so that a report is queued exactly once per change.
    pub fn queue_drift(
        &mut self,
        bundles: Vec<outpost_proto::wire::BundleDrift>,
        left: &[(String, Option<Digest>)],
        now: i64,
    ) -> Result<u64, StateError> {
        let transaction = self.connection.transaction()?;
        let sequence = read_counter(&transaction, "outbox_last")? + 1;
        for (bundle, fingerprint) in left {
            match fingerprint {
                Some(fingerprint) => transaction.execute(
                    "INSERT INTO drift_left (bundle, fingerprint) VALUES (?1, ?2) ON CONFLICT (bundle) DO UPDATE SET fingerprint = ?2",
                    params![bundle, fingerprint.0.as_slice()],
                )?,
                None => transaction.execute("DELETE FROM drift_left WHERE bundle = ?1", [bundle])?,
            };
        }
        let report = Message::Drift(outpost_proto::wire::DriftReport { sequence, bundles });
        append_to_outbox(&transaction, sequence, &report, now)?;
        transaction.commit()?;
        Ok(sequence)
    }

    /// The fingerprint of the drift reported last as left in place for `bundle`, if any is.
    pub fn drift_left(&self, bundle: &str) -> Result<Option<Digest>, StateError> {
        let bytes: Option<Vec<u8>> = self
            .connection
            .query_row(
                "SELECT fingerprint FROM drift_left WHERE bundle = ?1",
                [bundle],
                |row| row.get(0),
            )
            .optional()?;
        bytes.map(|bytes| digest_from(&bytes)).transpose()
    }

    /// Queued reports (status and drift) after `after`, oldest first, at most `limit`: each a
    /// [`Message::StatusReport`] or a [`Message::Drift`], with its sequence.
    pub fn outbox(&self, after: u64, limit: usize) -> Result<Vec<(u64, Message)>, StateError> {
        let mut statement = self
            .connection
            .prepare("SELECT frame FROM outbox WHERE sequence > ?1 ORDER BY sequence LIMIT ?2")?;
        let frames: Vec<Vec<u8>> = statement
            .query_map(params![after as i64, limit as i64], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        let mut reports = Vec::new();
        for frame in frames {
            let mut decoder = outpost_proto::wire::FrameDecoder::new();
            decoder.push(&frame);
            match decoder.next_message() {
                Ok(Some(Message::StatusReport(report))) => {
                    reports.push((report.sequence, Message::StatusReport(report)));
                }
                Ok(Some(Message::Drift(report))) => {
                    reports.push((report.sequence, Message::Drift(report)));
                }
                other => {
                    return Err(StateError::Corrupt(format!(
                        "outbox entry does not decode: {other:?}"
                    )));
                }
            }
        }
        Ok(reports)
    }

    /// The sequence of the newest report ever queued.
    pub fn outbox_sequence(&self) -> Result<u64, StateError> {
        Ok(read_counter(&self.connection, "outbox_last")?)
    }

    /// Numbers the next status report after `sequence` (a rebuilt database must not reuse
    /// sequences the hub has already stored, or the hub would drop its reports as replays).
    pub fn continue_outbox_after(&mut self, sequence: u64) -> Result<(), StateError> {
        write_meta(&self.connection, "outbox_last", &sequence.to_be_bytes())?;
        Ok(())
    }

    /// Runs raw SQL on the state, so tests can damage it the way a failing disk would.
    #[doc(hidden)]
    pub fn tamper_for_tests(&mut self, sql: &str) -> Result<(), StateError> {
        self.connection.execute_batch(sql)?;
        Ok(())
    }

    /// Number of queued reports.
    pub fn outbox_len(&self) -> Result<u64, StateError> {
        let count: i64 = self
            .connection
            .query_row("SELECT COUNT(*) FROM outbox", [], |row| row.get(0))?;
        Ok(count as u64)
    }

    /// The hub stored reports up to `sequence`: delete them.
    pub fn acknowledge(&mut self, sequence: u64) -> Result<(), StateError> {
        self.connection
            .execute("DELETE FROM outbox WHERE sequence <= ?1", [sequence as i64])?;
        Ok(())
    }

    /// The last status queued for each bundle (what `outpost-agent status` shows).
    pub fn last_statuses(&self) -> Result<Vec<outpost_proto::wire::BundleStatus>, StateError> {
        let mut statement = self
            .connection
            .prepare("SELECT status FROM last_status ORDER BY bundle")?;
        let texts: Vec<String> = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        texts
            .iter()
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|error| StateError::Corrupt(format!("last status: {error}")))
            })
            .collect()
    }

    /// Forgets a bundle's last status (it is no longer assigned).
    pub fn forget_status(&mut self, bundle: &str) -> Result<(), StateError> {
        self.connection
            .execute("DELETE FROM last_status WHERE bundle = ?1", [bundle])?;
        self.connection
            .execute("DELETE FROM drift_left WHERE bundle = ?1", [bundle])?;
        Ok(())
    }

    /// Objects the agent applied (or is about to apply) for `bundle`.
    pub fn inventory(&self, bundle: &str) -> Result<Vec<ObjectRef>, StateError> {
        let mut statement = self.connection.prepare(
            "SELECT api_version, kind, namespace, name FROM inventory WHERE bundle = ?1 ORDER BY grp, kind, namespace, name",
        )?;
        let rows = statement
            .query_map([bundle], |row| {
                Ok(ObjectRef {
                    api_version: row.get(0)?,
                    kind: row.get(1)?,
                    namespace: row.get(2)?,
                    name: row.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Bundles with objects in the inventory.
    pub fn inventory_bundles(&self) -> Result<Vec<String>, StateError> {
        let mut statement = self
            .connection
            .prepare("SELECT DISTINCT bundle FROM inventory ORDER BY bundle")?;
        let rows = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Number of objects in the inventory.
    pub fn inventory_len(&self) -> Result<u64, StateError> {
        let count: i64 =
            self.connection
                .query_row("SELECT COUNT(*) FROM inventory", [], |row| row.get(0))?;
        Ok(count as u64)
    }

    /// Records objects of `bundle` in one transaction, before they are applied: a crash after
    /// the apply can then never leave an object the agent does not know it created.
    pub fn inventory_add(&mut self, bundle: &str, objects: &[ObjectRef]) -> Result<(), StateError> {
        let transaction = self.connection.transaction()?;
        for object in objects {
            transaction.execute(
                "INSERT INTO inventory (bundle, grp, kind, namespace, name, api_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (bundle, grp, kind, namespace, name) DO UPDATE SET api_version = ?6",
                params![bundle, object.group(), object.kind, object.namespace, object.name, object.api_version],
            )?;
        }
        transaction.commit()?;
        Ok(())
    }

    /// Removes pruned (or disowned) objects of `bundle` from the inventory.
    pub fn inventory_remove(
        &mut self,
        bundle: &str,
        objects: &[ObjectRef],
    ) -> Result<(), StateError> {
        let transaction = self.connection.transaction()?;
        for object in objects {
            transaction.execute(
                "DELETE FROM inventory WHERE bundle = ?1 AND grp = ?2 AND kind = ?3 AND namespace = ?4 AND name = ?5",
                params![bundle, object.group(), object.kind, object.namespace, object.name],
            )?;
        }
        transaction.commit()?;
        Ok(())
    }

    /// Drops a held snapshot that no longer verifies, so the client fetches it again.
    pub fn drop_snapshot(&mut self, bundle: &str, digest: &Digest) -> Result<(), StateError> {
        self.connection.execute(
            "DELETE FROM snapshots WHERE bundle = ?1 AND digest = ?2",
            params![bundle, digest.0.as_slice()],
        )?;
        Ok(())
    }

    /// SQLite's `quick_check`: `Err` names the damage.
    pub fn quick_check(&self) -> Result<(), StateError> {
        let mut statement = self.connection.prepare("PRAGMA quick_check")?;
        let lines: Vec<String> = statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if lines.len() == 1 && lines[0] == "ok" {
            Ok(())
        } else {
            Err(StateError::Damaged(lines.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state database from a build speaking protocol 2, with a status report queued: after
    /// the upgrades the report is still in the outbox, as a frame of this protocol, and drift
    /// queues behind it in the same sequence.
    #[test]
    fn outbox_frames_of_protocol_2_survive_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let report = StatusReport {
            sequence: 1,
            bundles: Vec::new(),
        };
        let mut frame =
            outpost_proto::wire::encode_frame(&Message::StatusReport(report.clone())).unwrap();
        frame[4..6].copy_from_slice(&2u16.to_be_bytes());
        {
            let connection = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                connection.execute_batch(sql).unwrap();
            }
            connection.pragma_update(None, "user_version", 2).unwrap();
            connection
                .execute(
                    "INSERT INTO outbox (sequence, frame, created_at) VALUES (1, ?1, 0)",
                    [&frame],
                )
                .unwrap();
            write_meta(&connection, "outbox_last", &1u64.to_be_bytes()).unwrap();
        }
        let mut state = State::open(&path).unwrap();
        let queued = state.outbox(0, 10).unwrap();
        assert_eq!(queued, vec![(1, Message::StatusReport(report))]);
        let fingerprint = Digest([7; 32]);
        let sequence = state
            .queue_drift(Vec::new(), &[("pos".to_owned(), Some(fingerprint))], 5)
            .unwrap();
        assert_eq!(sequence, 2);
        assert_eq!(state.drift_left("pos").unwrap(), Some(fingerprint));
        assert!(matches!(
            state.outbox(1, 10).unwrap()[0],
            (2, Message::Drift(_))
        ));
        state.forget_status("pos").unwrap();
        assert_eq!(state.drift_left("pos").unwrap(), None);
    }
}
