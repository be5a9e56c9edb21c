//! The edge agent's library: its identity, its state database, and its link to the hub. The
//! binary (`main.rs`) is a thin shell; tests and simulations drive the same code in-process.
//!
//! Still to come (the edge-agent issue): the reconcile loop against the local cluster. Today the
//! agent enrols, keeps its assignments, fetches, verifies and caches snapshots, and reports.

pub mod client;
pub mod identity;
pub mod state;

pub use client::{Client, ClientOptions, Counters};
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
