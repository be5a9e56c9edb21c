//! The edge agent's library: its identity, its state database, and its link to the hub. The
//! binary (`main.rs`) is a thin shell; tests and simulations drive the same code in-process.
//!
//! [`client`] keeps the link to the hub; [`reconcile`] keeps the cluster (a [`target`]) at the
//! snapshots held in [`state`], independently of the link.

pub mod client;
pub mod config;
pub mod drift;
pub mod files;
pub mod health;
pub mod identity;
pub mod metrics;
pub mod reconcile;
pub mod state;
pub mod target;

use std::path::{Path, PathBuf};

pub use client::{Client, ClientOptions, Counters};
pub use reconcile::{ReconcileOptions, Reconciler};
pub use state::State;

/// The files in an agent's state dir.
pub mod paths {
    use std::path::{Path, PathBuf};

    /// The agent's key.
    pub fn key(state_dir: &Path) -> PathBuf {
        state_dir.join("agent.key")
    }

    /// The state database.
    pub fn database(state_dir: &Path) -> PathBuf {
        state_dir.join("agent.db")
    }

    /// A copy of the enrolment outside the database (hub, pin, root key, agent id), so a
    /// damaged database can be rebuilt from the hub.
    pub fn enrolment(state_dir: &Path) -> PathBuf {
        state_dir.join("enrolment.toml")
    }
}

/// Opens the state database in `state_dir`. A damaged file (not a database, or failing SQLite's
/// quick check) is moved aside to `agent.db.damaged-<unix time>` — never deleted — and a fresh
/// database is started from the enrolment copy (`enrolment.toml`): the agent keeps its key, so
/// the hub knows it and sends its assignments and snapshots again. Returns where the damaged
/// file went, if it was moved.
pub fn open_state(state_dir: &Path) -> Result<(State, Option<PathBuf>), state::StateError> {
    let path = paths::database(state_dir);
    let opened = State::open(&path).and_then(|state| state.quick_check().map(|()| state));
    let damage = match opened {
        Ok(state) => return Ok((state, None)),
        Err(error) if State::is_damage(&error) => error,
        Err(error) => return Err(error),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    let aside = state_dir.join(format!("agent.db.damaged-{now}"));
    tracing::error!(error = %damage, moved_to = %aside.display(), "the agent state database is damaged; moving it aside and starting afresh from the hub");
    let rename = |from: &Path, to: &Path| match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(state::StateError::Corrupt(format!(
            "{damage}; moving {} aside failed: {error}",
            from.display()
        ))),
    };
    rename(&path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        let from = state_dir.join(format!("agent.db{suffix}"));
        rename(
            &from,
            &state_dir.join(format!("agent.db.damaged-{now}{suffix}")),
        )?;
    }
    let mut state = State::open(&path)?;
    // Reports from the old file may have reached the hub: number new ones after any of them
    // (microseconds since the epoch exceed every counter the old file could have reached).
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64);
    state.continue_outbox_after(micros)?;
    if let Some(record) = read_enrolment_record(state_dir) {
        state.set_enrolment(&record.0.hub, &record.0.hub_pin, &record.0.root_key, "")?;
        state.enrolled(&record.1)?;
    } else {
        tracing::error!(path = %paths::enrolment(state_dir).display(), "no enrolment copy to rebuild from: enrol again");
    }
    Ok((state, Some(aside)))
}

/// Writes the enrolment copy (atomically, mode 0600) once the agent is enrolled.
pub fn write_enrolment_record(
    state_dir: &Path,
    enrolment: &state::Enrolment,
) -> std::io::Result<()> {
    let Some(agent_id) = &enrolment.agent_id else {
        return Ok(());
    };
    let text = format!(
        "# Written by outpost-agent: what it needs to rebuild a damaged state database.\nhub = \"{}\"\nhub_pin = \"{}\"\nroot_key = \"{}\"\nagent_id = \"{agent_id}\"\ntoken = \"\"\n",
        enrolment.hub,
        enrolment.hub_pin.to_hex(),
        hex::encode(enrolment.root_key.to_bytes()),
    );
    let path = paths::enrolment(state_dir);
    let temporary = path.with_extension("toml.tmp");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, &path)
}

fn read_enrolment_record(state_dir: &Path) -> Option<(EnrolmentBundle, String)> {
    let text = std::fs::read_to_string(paths::enrolment(state_dir)).ok()?;
    let bundle = EnrolmentBundle::parse(&text).ok()?;
    let agent_id = text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "agent_id").then(|| value.trim().trim_matches('"').to_owned())
    })?;
    Some((bundle, agent_id))
}

/// An enrolment bundle as written by `outpost-hub tokens create --bundle-file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolmentBundle {
    /// `host:port` of the hub's agent service.
    pub hub: String,
    /// SHA-256 of the hub's TLS key.
    pub hub_pin: outpost_proto::Digest,
    /// Root key for snapshot signatures.
    pub root_key: outpost_proto::PublicKey,
    /// Single-use token.
    pub token: String,
}

impl EnrolmentBundle {
    /// Records this bundle in the state as the enrolment to complete on the next connection.
    pub fn store_in(&self, state: &mut State) -> Result<(), state::StateError> {
        state.set_enrolment(&self.hub, &self.hub_pin, &self.root_key, &self.token)
    }

    /// Parses the bundle's `key = "value"` lines; every problem is named.
    pub fn parse(text: &str) -> Result<EnrolmentBundle, String> {
        let mut fields = std::collections::BTreeMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {}: expected key = \"value\"", number + 1));
            };
            let value = value.trim().trim_matches('"').to_owned();
            fields.insert(key.trim().to_owned(), value);
        }
        let mut problems = Vec::new();
        let mut take = |key: &str| {
            fields.get(key).cloned().unwrap_or_else(|| {
                problems.push(format!("missing {key}"));
                String::new()
            })
        };
        let (hub, pin, root, token) = (
            take("hub"),
            take("hub_pin"),
            take("root_key"),
            take("token"),
        );
        let hub_pin = outpost_proto::Digest::from_hex(&pin)
            .map_err(|_| problems.push("hub_pin is not 64 hex digits".to_owned()))
            .ok();
        let root_key = hex::decode(&root)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .and_then(|bytes| outpost_proto::PublicKey::from_bytes(&bytes).ok());
        if root_key.is_none() {
            problems.push("root_key is not an ed25519 public key (64 hex digits)".to_owned());
        }
        if let Err(problem) = client::check_hub_addresses(&hub) {
            problems.push(format!("hub: {problem}"));
        }
        match (hub_pin, root_key, problems.is_empty()) {
            (Some(hub_pin), Some(root_key), true) => Ok(EnrolmentBundle {
                hub,
                hub_pin,
                root_key,
                token,
            }),
            _ => Err(format!("invalid enrolment bundle: {}", problems.join("; "))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_bundle_problems_are_named_at_once() {
        let error = EnrolmentBundle::parse("hub = \"nowhere\"\nhub_pin = \"zz\"\n").unwrap_err();
        for expected in [
            "missing root_key",
            "missing token",
            "hub_pin is not",
            "needs a port",
        ] {
            assert!(error.contains(expected), "{expected:?} missing in {error}");
        }
        let root = outpost_proto::SigningKey::from_seed([1; 32]).public_key();
        let text = format!(
            "# comment\nhub = \"hub:7443\"\nhub_pin = \"{}\"\nroot_key = \"{}\"\ntoken = \"t\"\n",
            "ab".repeat(32),
            hex::encode(root.to_bytes())
        );
        let bundle = EnrolmentBundle::parse(&text).unwrap();
        assert_eq!(
            (bundle.hub.as_str(), bundle.token.as_str()),
            ("hub:7443", "t")
        );
        let replicas = text.replace("hub:7443", "hub-a:7443, hub-b:7443");
        let bundle = EnrolmentBundle::parse(&replicas).unwrap();
        assert_eq!(
            client::hub_addresses(&bundle.hub).collect::<Vec<_>>(),
            ["hub-a:7443", "hub-b:7443"]
        );
        let error =
            EnrolmentBundle::parse(&text.replace("hub:7443", "hub-a:7443,hub-b")).unwrap_err();
        assert!(error.contains("\"hub-b\" needs a port"), "{error}");
    }

    #[test]
    fn a_damaged_database_is_moved_aside_and_rebuilt_from_the_enrolment_copy() {
        let dir = tempfile::tempdir().unwrap();
        let root = outpost_proto::SigningKey::from_seed([2; 32]).public_key();
        let pin = outpost_proto::Digest::of(b"hub key");
        {
            let mut state = State::open(&paths::database(dir.path())).unwrap();
            state
                .set_enrolment("hub:7443", &pin, &root, "token")
                .unwrap();
            state.enrolled("agent-1").unwrap();
            write_enrolment_record(dir.path(), &state.enrolment().unwrap().unwrap()).unwrap();
        }
        // Truncate the file in the middle of a page, as a failing disk might leave it.
        let database = paths::database(dir.path());
        let bytes = std::fs::read(&database).unwrap();
        std::fs::write(&database, &bytes[..bytes.len() / 2 + 100]).unwrap();
        std::fs::write(dir.path().join("agent.db-wal"), b"garbage").unwrap();

        let (state, moved) = open_state(dir.path()).unwrap();
        let moved = moved.expect("moved aside");
        assert!(moved.exists(), "the damaged file is kept for inspection");
        let enrolment = state.enrolment().unwrap().unwrap();
        assert_eq!(enrolment.agent_id.as_deref(), Some("agent-1"));
        assert_eq!(
            (
                enrolment.hub.as_str(),
                enrolment.hub_pin,
                enrolment.root_key
            ),
            ("hub:7443", pin, root)
        );
        assert_eq!(enrolment.token, None);
        // A healthy file is opened as it is.
        drop(state);
        assert!(open_state(dir.path()).unwrap().1.is_none());
    }

    #[test]
    fn a_damaged_state_file_is_a_clear_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = paths::database(dir.path());
        std::fs::write(
            &path,
            b"this is not a database, it was overwritten by accident",
        )
        .unwrap();
        let error = State::open(&path).unwrap_err().to_string();
        assert!(error.contains("move it aside"), "{error}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"this is not a database, it was overwritten by accident"
        );
    }
}
