//! The edge agent's library: its identity, its state database, and its link to the hub. The
//! binary (`main.rs`) is a thin shell; tests and simulations drive the same code in-process.
//!
//! [`client`] keeps the link to the hub; [`reconcile`] keeps the cluster (a [`target`]) at the
//! snapshots held in [`state`], independently of the link.

pub mod client;
pub mod health;
pub mod identity;
pub mod reconcile;
pub mod state;
pub mod target;

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
        if !hub.contains(':') {
            problems.push(format!(
                "hub {hub:?} needs a port, like \"hub.example.com:7443\""
            ));
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
