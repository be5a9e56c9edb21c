//! Reading and writing the key dir's files: 32-byte seeds and root-signed documents as hex,
//! written atomically (temp file, fsync, rename, fsync of the folder) with mode 0600 in a 0700
//! folder, whatever the umask.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use outpost_proto::{PublicKey, Signature, SignedKeyCertificate, SignedRevocations, SigningKey};

use super::KeyError;

/// The root's public key: what agents pin. Needed to run.
pub(crate) const ROOT_PUB: &str = "root.pub";
/// The root's private key. Belongs offline; the hub runs without it.
pub(crate) const ROOT_KEY: &str = "root.key";
/// The hub's QUIC/TLS identity (agents pin its public key).
pub(crate) const TRANSPORT_KEY: &str = "transport.key";
/// The signing key in use and its certificate.
pub(crate) const SIGNING_KEY: &str = "signing.key";
pub(crate) const SIGNING_CERT: &str = "signing.cert";
/// A certified signing key waiting to take over (`keys rotate` writes them).
pub(crate) const NEXT_KEY: &str = "signing.next.key";
pub(crate) const NEXT_CERT: &str = "signing.next.cert";
/// Certificates of retired keys: agents still need them to verify what those keys signed.
pub(crate) const RETIRED_DIR: &str = "certificates";
/// The root-signed revocation list.
pub(crate) const REVOCATIONS: &str = "revocations";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> KeyError {
    KeyError::Corrupt {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Creates `dir` (and missing parents) with mode 0700, and sets 0700 on it if it exists.
pub(super) fn private_dir(dir: &Path) -> Result<(), KeyError> {
    crate::files::private_dir(dir).map_err(io(dir))
}

/// Writes a file readable by its owner only, atomically (temp file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io(&temporary))?;
    // `mode` is filtered by the umask only on creation; a leftover temp file keeps its mode.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(&temporary))?;
    file.write_all(bytes).map_err(io(&temporary))?;
    file.sync_all().map_err(io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(io(path))?;
    if let Some(parent) = path.parent()
        && let Ok(folder) = std::fs::File::open(parent)
    {
        let _ = folder.sync_all();
    }
    Ok(())
}

/// Reads a file, `None` if it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A 32-byte key seed as 64 hex digits.
pub(super) fn read_seed(path: &Path) -> Result<Option<SigningKey>, KeyError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed)
        .map_err(|_| corrupt(path, "expected a 32-byte key as 64 hex digits"))?;
    Ok(Some(SigningKey::from_seed(seed)))
}

/// Writes a key seed.
pub(super) fn write_seed(path: &Path, key: &SigningKey) -> Result<(), KeyError> {
    write_private(path, format!("{}\n", hex::encode(key.seed())).as_bytes())
}

/// A fresh key from the OS random number generator.
pub(super) fn random_key() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|error| KeyError::Random(error.to_string()))?;
    Ok(SigningKey::from_seed(seed))
}

/// The root public key (`root.pub`): 32 bytes as hex.
pub(super) fn read_public(path: &Path) -> Result<Option<PublicKey>, KeyError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes)
        .map_err(|_| corrupt(path, "expected a 32-byte public key as 64 hex digits"))?;
    PublicKey::from_bytes(&bytes)
        .map(Some)
        .map_err(|error| corrupt(path, error.to_string()))
}

/// Writes a public key (mode 0600 like the rest; it is not secret, but nothing here needs more).
pub(super) fn write_public(path: &Path, key: &PublicKey) -> Result<(), KeyError> {
    write_private(
        path,
        format!("{}\n", hex::encode(key.to_bytes())).as_bytes(),
    )
}

/// Two lines of hex: the signed bytes, then the signature.
fn read_signed(path: &Path) -> Result<Option<(Vec<u8>, Signature)>, KeyError> {
    let Some(text) = read_optional(path)? else {
        return Ok(None);
    };
    let bad = || {
        corrupt(
            path,
            "expected two lines of hex: signed bytes, then signature",
        )
    };
    let mut lines = text.lines();
    let bytes = hex::decode(lines.next().ok_or_else(bad)?.trim()).map_err(|_| bad())?;
    let signature = hex::decode(lines.next().ok_or_else(bad)?.trim()).map_err(|_| bad())?;
    let signature = Signature::from_slice(&signature).map_err(|_| bad())?;
    Ok(Some((bytes, signature)))
}

fn write_signed(path: &Path, bytes: &[u8], signature: &Signature) -> Result<(), KeyError> {
    let text = format!("{}\n{}\n", hex::encode(bytes), hex::encode(signature.0));
    write_private(path, text.as_bytes())
}

/// A key certificate file.
pub(super) fn read_certificate(path: &Path) -> Result<Option<SignedKeyCertificate>, KeyError> {
    Ok(read_signed(path)?.map(|(bytes, signature)| SignedKeyCertificate { bytes, signature }))
}

/// Writes a key certificate file.
pub(super) fn write_certificate(
    path: &Path,
    certificate: &SignedKeyCertificate,
) -> Result<(), KeyError> {
    write_signed(path, &certificate.bytes, &certificate.signature)
}

/// The revocation list file.
pub(super) fn read_revocations(path: &Path) -> Result<Option<SignedRevocations>, KeyError> {
    Ok(read_signed(path)?.map(|(bytes, signature)| SignedRevocations { bytes, signature }))
}

/// Writes the revocation list file.
pub(super) fn write_revocations(path: &Path, list: &SignedRevocations) -> Result<(), KeyError> {
    write_signed(path, &list.bytes, &list.signature)
}

/// The certificate files of retired keys, by path.
pub(super) fn retired_certificates(
    dir: &Path,
) -> Result<Vec<(PathBuf, SignedKeyCertificate)>, KeyError> {
    let folder = dir.join(RETIRED_DIR);
    let entries = match std::fs::read_dir(&folder) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KeyError::Io {
                path: folder,
                source,
            });
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(&folder))?.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "cert")
            && let Some(certificate) = read_certificate(&path)?
        {
            found.push((path, certificate));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}
