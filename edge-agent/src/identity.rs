//! The agent's own ed25519 key: made on first run, kept in `state_dir/agent.key` (hex seed, mode
//! 0600, written atomically). It is the agent's TLS identity towards the hub; the hub knows the
//! agent by it after enrolment.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use outpost_proto::SigningKey;

/// The key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// File system.
    #[error("agent key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a key.
    #[error(
        "agent key {0} is damaged (expected 64 hex digits); restore it from backup, or move it aside and enrol again with a new token"
    )]
    Corrupt(String),
    /// No randomness.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// Loads the key at `path`, creating it when absent. Returns whether it was created.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let seed = hex::decode(text.trim())
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| IdentityError::Corrupt(path.display().to_string()))?;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "agent key is readable by others; chmod 600 it");
            }
            Ok((SigningKey::from_seed(seed), false))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|error| IdentityError::Random(error.to_string()))?;
            if let Some(dir) = path.parent() {
                crate::files::private_dir(dir).map_err(io)?;
            }
            let temporary = path.with_extension("key.tmp");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)
                .map_err(io)?;
            file.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
                .map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&temporary, path).map_err(io)?;
            Ok((SigningKey::from_seed(seed), true))
        }
        Err(error) => Err(io(error)),
    }
}
