//! The operator's key ceremony, run on whatever machine holds the root key (see
//! docs/security.md): make the keys once, certify a new signing key, renew certificates, revoke
//! a signing key. Each works on a key dir (the hub's, or a copy carried back to it) and never
//! needs a running hub.

use std::path::Path;

use outpost_proto::{KeyCertificate, KeyId, Revocations, SigningKey};

use super::{KeyError, files};

/// What `keys init` made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The root key's id.
    pub root: KeyId,
    /// The first signing key's id.
    pub signer: KeyId,
    /// Where the root key was written: move it offline.
    pub root_key_path: std::path::PathBuf,
}

/// A certificate for `key` from `now - 1h` (clock skew) for `lifetime` seconds.
fn fresh_certificate(key: &SigningKey, now: i64, lifetime: i64) -> KeyCertificate {
    KeyCertificate {
        signing_key: key.public_key(),
        not_before: now - 3600,
        not_after: now + lifetime,
    }
}

/// Makes the keys of a new hub in `dir`: a root key pair, a first signing key with its
/// certificate, and the hub's QUIC identity. Refuses if any of them exists: a second root would
/// split the fleet.
pub fn init(dir: &Path, now: i64, lifetime: i64) -> Result<InitReport, KeyError> {
    for name in [
        files::ROOT_KEY,
        files::ROOT_PUB,
        files::SIGNING_KEY,
        files::SIGNING_CERT,
        files::TRANSPORT_KEY,
    ] {
        if dir.join(name).exists() {
            return Err(KeyError::Refused(format!(
                "{} exists: {} already holds keys. Agents trust its root.pub; to start a new fleet, use another key dir",
                dir.join(name).display(),
                dir.display()
            )));
        }
    }
    files::private_dir(dir)?;
    let root = files::random_key()?;
    let signer = files::random_key()?;
    let transport = files::random_key()?;
    files::write_seed(&dir.join(files::TRANSPORT_KEY), &transport)?;
    files::write_seed(&dir.join(files::SIGNING_KEY), &signer)?;
    files::write_certificate(
        &dir.join(files::SIGNING_CERT),
        &root.certify(&fresh_certificate(&signer, now, lifetime)),
    )?;
    files::write_seed(&dir.join(files::ROOT_KEY), &root)?;
    // root.pub last: a key dir without it is unfinished and `HubKeys::load` says so.
    files::write_public(&dir.join(files::ROOT_PUB), &root.public_key())?;
    Ok(InitReport {
        root: root.key_id(),
        signer: signer.key_id(),
        root_key_path: dir.join(files::ROOT_KEY),
    })
}

/// Reads the root key from `path` and checks it is the root `dir/root.pub` names.
pub fn read_root_key(path: &Path, dir: &Path) -> Result<SigningKey, KeyError> {
    let key = files::read_seed(path)?.ok_or_else(|| KeyError::Missing {
        path: path.to_owned(),
        hint: "give the root key file (`root.key` from `keys init`, kept offline)".to_owned(),
    })?;
    let root =
        files::read_public(&dir.join(files::ROOT_PUB))?.ok_or_else(|| KeyError::Missing {
            path: dir.join(files::ROOT_PUB),
            hint: "point --key-dir at the hub's key dir (or a copy of it)".to_owned(),
        })?;
    if key.public_key() != root {
        return Err(KeyError::Refused(format!(
            "{} is root key {}, but {} trusts root {}",
            path.display(),
            key.key_id(),
            dir.join(files::ROOT_PUB).display(),
            root.key_id()
        )));
    }
    Ok(key)
}

/// Makes and certifies the next signing key (`signing.next.key`, `signing.next.cert`). The hub
/// offers it to agents when it next reads the key dir and signs with it after the grace period.
pub fn rotate(dir: &Path, root: &SigningKey, now: i64, lifetime: i64) -> Result<KeyId, KeyError> {
    if dir.join(files::NEXT_KEY).exists() {
        return Err(KeyError::Refused(format!(
            "a rotation is pending: {} exists. Wait for the hub to switch to it (it renames the files), or delete signing.next.key and signing.next.cert to abandon it",
            dir.join(files::NEXT_KEY).display()
        )));
    }
    files::private_dir(dir)?;
    let next = files::random_key()?;
    files::write_seed(&dir.join(files::NEXT_KEY), &next)?;
    files::write_certificate(
        &dir.join(files::NEXT_CERT),
        &root.certify(&fresh_certificate(&next, now, lifetime)),
    )?;
    Ok(next.key_id())
}

/// Renews the certificates of the signing key in use and of the waiting one until
/// `now + lifetime`, keeping their start (snapshots signed since then stay valid). Returns the
/// keys renewed and their new end.
pub fn renew(
    dir: &Path,
    root: &SigningKey,
    now: i64,
    lifetime: i64,
) -> Result<Vec<(KeyId, i64)>, KeyError> {
    let mut renewed = Vec::new();
    for (key_name, cert_name) in [
        (files::SIGNING_KEY, files::SIGNING_CERT),
        (files::NEXT_KEY, files::NEXT_CERT),
    ] {
        let (Some(key), Some(certificate)) = (
            files::read_seed(&dir.join(key_name))?,
            files::read_certificate(&dir.join(cert_name))?,
        ) else {
            continue;
        };
        let window =
            KeyCertificate::decode(&certificate.bytes).map_err(|error| KeyError::Corrupt {
                path: dir.join(cert_name),
                message: error.to_string(),
            })?;
        if window.signing_key != key.public_key() {
            continue;
        }
        let window = KeyCertificate {
            not_after: now + lifetime,
            ..window
        };
        files::write_certificate(&dir.join(cert_name), &root.certify(&window))?;
        renewed.push((key.key_id(), window.not_after));
    }
    if renewed.is_empty() {
        return Err(KeyError::Missing {
            path: dir.join(files::SIGNING_KEY),
            hint: "no signing key with a certificate to renew here; point --key-dir at the hub's key dir".to_owned(),
        });
    }
    Ok(renewed)
}

/// Adds a signing key (named by its id or a unique prefix of its hex) to the root-signed
/// revocation list, raising its version. Refuses to revoke the key in use while no certified
/// key waits to replace it: run `rotate` first; the hub then switches at once.
pub fn revoke(dir: &Path, root: &SigningKey, key: &str, now: i64) -> Result<Revocations, KeyError> {
    let mut known: Vec<(KeyId, &'static str)> = Vec::new();
    for (name, role) in [
        (files::SIGNING_CERT, "in use"),
        (files::NEXT_CERT, "waiting"),
    ] {
        if let Some(certificate) = files::read_certificate(&dir.join(name))?
            && let Ok(window) = KeyCertificate::decode(&certificate.bytes)
        {
            known.push((window.signing_key.key_id(), role));
        }
    }
    for (_, certificate) in files::retired_certificates(dir)? {
        if let Ok(window) = KeyCertificate::decode(&certificate.bytes) {
            known.push((window.signing_key.key_id(), "retired"));
        }
    }
    let wanted = key.trim().to_ascii_lowercase();
    let matches: Vec<&(KeyId, &str)> = known
        .iter()
        .filter(|(id, _)| !wanted.is_empty() && hex::encode(id.0).starts_with(&wanted))
        .collect();
    let (id, role) = match matches.as_slice() {
        [one] => **one,
        [] => {
            return Err(KeyError::Refused(format!(
                "no signing key {key:?} in {}; known: {}",
                dir.display(),
                known
                    .iter()
                    .map(|(id, role)| format!("{id} ({role})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        _ => {
            return Err(KeyError::Refused(format!(
                "{key:?} names several keys; give more of the key id"
            )));
        }
    };
    let waiting = known
        .iter()
        .any(|(other, role)| *role == "waiting" && *other != id);
    if role == "in use" && !waiting {
        return Err(KeyError::Refused(format!(
            "key {id} is the one in use and no new key is certified to replace it: run `outpost-hub keys rotate` first, then revoke; the hub switches to the new key at once"
        )));
    }
    let path = dir.join(files::REVOCATIONS);
    let mut list = match files::read_revocations(&path)? {
        Some(signed) => signed
            .verify(&root.public_key())
            .map_err(|error| KeyError::Corrupt {
                path: path.clone(),
                message: error.to_string(),
            })?,
        None => Revocations::default(),
    };
    list.version += 1;
    list.issued_at = now;
    list.revoked.insert(id);
    files::write_revocations(&path, &root.sign_revocations(&list))?;
    Ok(list)
}
