//! The hub's signing keys on disk: a root key that certifies, and an online signing key that
//! signs snapshot headers. Generated on first start when absent (files mode 0600); `root.pub` is
//! what operators give agents to trust.
//!
//! Files in the key dir: `root.key`, `signing.key` (32-byte seeds, hex), `signing.cert` (the
//! root's certificate for the signing key: certificate bytes and signature, hex, one per line),
//! `root.pub` (the root public key, hex), `transport.key` (the hub's QUIC/TLS identity; agents pin
//! its public key).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use outpost_proto::{KeyCertificate, Signature, SignedKeyCertificate, SigningKey, TrustStore};

/// How long a freshly generated signing key is certified for: five years.
const CERTIFICATE_VALIDITY_SECONDS: i64 = 5 * 365 * 24 * 3600;

/// The hub's keys.
#[derive(Debug)]
pub struct HubKeys {
    /// Certifies signing keys. Keep a copy offline.
    pub root: SigningKey,
    /// Signs snapshot headers.
    pub signer: SigningKey,
    /// The root's certificate for `signer`.
    pub certificate: SignedKeyCertificate,
    /// The hub's TLS identity towards agents (a raw ed25519 key; agents pin it).
    pub transport: SigningKey,
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
    #[error(
        "{path}: {message}; restore it from backup, or move the key dir away to generate new keys (agents must then trust the new root.pub)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The OS random number generator failed.
    #[error("cannot get random bytes for a new key: {0}")]
    Random(String),
}

impl HubKeys {
    /// Loads the keys from `dir`, generating any that are missing. Returns whether keys were
    /// generated, so the caller can log it.
    pub fn load_or_generate(dir: &Path, now: i64) -> Result<(HubKeys, bool), KeyError> {
        std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let (root, new_root) = load_or_generate_key(&dir.join("root.key"))?;
        let (signer, new_signer) = load_or_generate_key(&dir.join("signing.key"))?;
        let (transport, _) = load_or_generate_key(&dir.join("transport.key"))?;
        let certificate_path = dir.join("signing.cert");
        let certificate = if new_root || new_signer || !certificate_path.exists() {
            let certificate = root.certify(&KeyCertificate {
                signing_key: signer.public_key(),
                not_before: now - 3600,
                not_after: now + CERTIFICATE_VALIDITY_SECONDS,
            });
            let text = format!(
                "{}\n{}\n",
                hex::encode(&certificate.bytes),
                hex::encode(certificate.signature.0)
            );
            write_private(&certificate_path, text.as_bytes())?;
            certificate
        } else {
            read_certificate(&certificate_path)?
        };
        write_private(
            &dir.join("root.pub"),
            format!("{}\n", hex::encode(root.public_key().to_bytes())).as_bytes(),
        )?;
        let keys = HubKeys {
            root,
            signer,
            certificate,
            transport,
        };
        // Refuse a certificate that does not certify our signer under our root.
        let mut trust = TrustStore::new(keys.root.public_key());
        let certified =
            trust
                .add_certificate(&keys.certificate)
                .map_err(|error| KeyError::Corrupt {
                    path: certificate_path.clone(),
                    message: error.to_string(),
                })?;
        if certified != keys.signer.key_id() {
            return Err(KeyError::Corrupt {
                path: certificate_path,
                message: "certifies another signing key than signing.key".to_owned(),
            });
        }
        Ok((keys, new_root || new_signer))
    }

    /// A trust store as an agent holding `root.pub` and this certificate would have.
    pub fn trust_store(&self) -> TrustStore {
        let mut trust = TrustStore::new(self.root.public_key());
        // Checked in `load_or_generate`.
        let _ = trust.add_certificate(&self.certificate);
        trust
    }
}

fn load_or_generate_key(path: &Path) -> Result<(SigningKey, bool), KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut seed = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| KeyError::Corrupt {
                path: path.to_owned(),
                message: "expected a 32-byte key as 64 hex digits".to_owned(),
            })?;
            Ok((SigningKey::from_seed(seed), false))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|error| KeyError::Random(error.to_string()))?;
            write_private(path, format!("{}\n", hex::encode(seed)).as_bytes())?;
            Ok((SigningKey::from_seed(seed), true))
        }
        Err(source) => Err(KeyError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_certificate(path: &Path) -> Result<SignedKeyCertificate, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let corrupt = || KeyError::Corrupt {
        path: path.to_owned(),
        message: "expected two lines of hex: certificate bytes, then signature".to_owned(),
    };
    let mut lines = text.lines();
    let bytes = hex::decode(lines.next().ok_or_else(corrupt)?.trim()).map_err(|_| corrupt())?;
    let signature = hex::decode(lines.next().ok_or_else(corrupt)?.trim()).map_err(|_| corrupt())?;
    let signature = Signature::from_slice(&signature).map_err(|_| corrupt())?;
    Ok(SignedKeyCertificate { bytes, signature })
}

/// Writes a file readable by its owner only, atomically (temp file, fsync, rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (first, generated) = HubKeys::load_or_generate(dir.path(), 1_000_000).unwrap();
        assert!(generated);
        let (second, generated) = HubKeys::load_or_generate(dir.path(), 2_000_000).unwrap();
        assert!(!generated);
        assert_eq!(first.signer.key_id(), second.signer.key_id());
        assert_eq!(first.certificate, second.certificate);
        assert!(
            second
                .trust_store()
                .signing_key(&second.signer.key_id())
                .is_some()
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join("signing.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        HubKeys::load_or_generate(dir.path(), 0).unwrap();
        std::fs::write(dir.path().join("signing.key"), "not hex").unwrap();
        let error = HubKeys::load_or_generate(dir.path(), 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("64 hex digits"), "{error}");
        // A certificate for another key is refused too.
        let other = tempfile::tempdir().unwrap();
        HubKeys::load_or_generate(other.path(), 0).unwrap();
        std::fs::copy(
            other.path().join("signing.key"),
            dir.path().join("signing.key"),
        )
        .unwrap();
        let error = HubKeys::load_or_generate(dir.path(), 0)
            .unwrap_err()
            .to_string();
        assert!(error.contains("signing.cert"), "{error}");
    }
}
