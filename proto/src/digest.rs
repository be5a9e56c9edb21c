//! SHA-256 digests: the names of snapshot bodies, payloads and keys.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest. Snapshots are named by the digest of their canonical body.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

/// A hex string that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("expected a SHA-256 digest as 64 hex digits, got {got:?}")]
pub struct ParseDigestError {
    got: String,
}

impl Digest {
    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The digest of several byte strings fed one after the other.
    pub fn of_parts(parts: &[&[u8]]) -> Digest {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        Digest(hasher.finalize().into())
    }

    /// Full lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// Reads 32 raw bytes (e.g. a stored column); anything else is `None`.
    pub fn from_slice(bytes: &[u8]) -> Option<Digest> {
        <[u8; 32]>::try_from(bytes).ok().map(Digest)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Digest, ParseDigestError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| ParseDigestError {
            got: text.chars().take(80).collect(),
        })?;
        Ok(Digest(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_hex_round_trip() {
        let digest = Digest::of(b"abc");
        assert_eq!(
            digest.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::from_hex(&digest.to_hex()).unwrap(), digest);
        assert_eq!(digest.short(), "ba7816bf8f01");
        assert_eq!(Digest::of_parts(&[b"a", b"bc"]), digest);
    }

    #[test]
    fn bad_hex_is_an_error() {
        assert!(Digest::from_hex("xyz").is_err());
        assert!(Digest::from_hex(&"a".repeat(63)).is_err());
    }
}
