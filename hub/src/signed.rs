//! Signed Git: a source with a `verify` policy releases only commits (or tags) whose signature
//! verifies against a key the operator allowed; anything else is refused with the reason (who
//! signed, which keys were expected).
//!
//! Signatures are SSH signatures (`git config gpg.format ssh`: `ssh-keygen -Y sign`, the SSHSIG
//! format, namespace `git`) by ed25519 keys, checked against OpenSSH allowed-signers files
//! (`principals [options] ssh-ed25519 KEY [comment]`, as `gpg.ssh.allowedSignersFile` names).
//! Everything is checked here, in Rust: no `git`, no `ssh-keygen`. OpenPGP signatures and other
//! SSH key types are refused with a message saying so (not verified by this hub yet).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::Digest as _;

/// What a `verify` policy checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// The commit each ref names must be signed (branches and tags).
    Commits,
    /// Only annotated tags whose tag object is signed are released; branches are refused.
    Tags,
}

/// A source's `verify = { keys = [...], mode = "commits" | "tags" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyPolicy {
    /// Commits or tags.
    pub mode: VerifyMode,
    /// The allowed signers, read from the files at start.
    pub signers: AllowedSigners,
    /// The files they came from.
    pub files: Vec<PathBuf>,
    /// Commits a branch may move to although they do not descend from its last released
    /// commit (a history rewrite the operator allowed; `verify.allow_rewrite_to`).
    pub allow_rewrite_to: Vec<String>,
}

/// One allowed signer: its principals (as the file says, e.g. `alice@example.com`) and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The principals of its line.
    pub principals: String,
    /// The ed25519 public key.
    pub key: [u8; 32],
    /// `SHA256:…`, as `ssh-keygen -l` shows it.
    pub fingerprint: String,
}

/// The keys of one or more allowed-signers files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedSigners {
    signers: Vec<Signer>,
}

/// Who signed a commit or tag that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The allowed signer's principals.
    pub principals: String,
    /// Its key's fingerprint.
    pub fingerprint: String,
}

impl AllowedSigners {
    /// Parses an allowed-signers file's text; `origin` names it in errors. Lines with keys of
    /// other types than `ssh-ed25519` are refused (this hub verifies ed25519 only).
    pub fn parse(text: &str, origin: &str) -> Result<AllowedSigners, String> {
        let mut signers = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{origin}:{}", number + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            // principals [options] keytype key [comment]
            let key_at = fields
                .iter()
                .position(|field| {
                    field.starts_with("ssh-")
                        || field.starts_with("ecdsa-")
                        || field.starts_with("sk-")
                })
                .ok_or_else(|| {
                    format!("{at}: no key type (expected `principals [options] ssh-ed25519 KEY`)")
                })?;
            if key_at == 0 {
                return Err(format!("{at}: the line names no principals before its key"));
            }
            let kind = fields[key_at];
            if kind != "ssh-ed25519" {
                return Err(format!(
                    "{at}: a {kind} key: this hub verifies ssh-ed25519 signatures only; sign with an ed25519 key (ssh-keygen -t ed25519)"
                ));
            }
            let blob = fields
                .get(key_at + 1)
                .and_then(|text| base64::engine::general_purpose::STANDARD.decode(text).ok())
                .ok_or_else(|| format!("{at}: the key is not base64"))?;
            let key = ed25519_from_blob(&blob).map_err(|error| format!("{at}: {error}"))?;
            signers.push(Signer {
                principals: fields[0].to_owned(),
                key,
                fingerprint: fingerprint(&blob),
            });
        }
        Ok(AllowedSigners { signers })
    }

    /// Reads and parses `files`, together.
    pub fn load(files: &[PathBuf]) -> Result<AllowedSigners, String> {
        let mut all = AllowedSigners::default();
        for file in files {
            let text = std::fs::read_to_string(file)
                .map_err(|error| format!("{}: {error}", file.display()))?;
            let parsed = AllowedSigners::parse(&text, &file.display().to_string())?;
            all.signers.extend(parsed.signers);
        }
        if all.signers.is_empty() {
            return Err(
                "the allowed-signers files name no key: every commit would be refused".to_owned(),
            );
        }
        Ok(all)
    }

    /// The allowed signers.
    pub fn signers(&self) -> &[Signer] {
        &self.signers
    }

    /// The principals of every allowed signer, for messages.
    pub fn expected(&self) -> String {
        let mut principals: Vec<&str> = self
            .signers
            .iter()
            .map(|signer| signer.principals.as_str())
            .collect();
        principals.dedup();
        principals.join(", ")
    }
}

/// Verifies an armored SSH signature (`-----BEGIN SSH SIGNATURE-----`) over `data` in the `git`
/// namespace against `allowed`: the signer, or why not.
pub fn verify_ssh(
    armored: &str,
    data: &[u8],
    allowed: &AllowedSigners,
) -> Result<Verified, String> {
    let body: String = armored
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("-----"))
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|_| "the SSH signature is not base64".to_owned())?;
    let mut reader = Reader(&blob);
    if reader.take(6)? != b"SSHSIG" {
        return Err("not an SSH signature (no SSHSIG magic)".to_owned());
    }
    let version = u32::from_be_bytes(reader.take(4)?.try_into().map_err(|_| "truncated")?);
    if version != 1 {
        return Err(format!("SSH signature version {version}; only 1 is known"));
    }
    let public = reader.string()?;
    let namespace = reader.string()?;
    let reserved = reader.string()?;
    let hash = reader.string()?;
    let signature = reader.string()?;
    if namespace != b"git" {
        return Err(format!(
            "the SSH signature is for namespace {:?}, not \"git\"",
            String::from_utf8_lossy(namespace)
        ));
    }
    let key = ed25519_from_blob(public)?;
    let signer_fingerprint = fingerprint(public);
    let Some(signer) = allowed.signers.iter().find(|signer| signer.key == key) else {
        return Err(format!(
            "signed by {signer_fingerprint}, which is not an allowed signer (expected one of: {})",
            allowed.expected()
        ));
    };
    let digest: Vec<u8> = match hash {
        b"sha512" => sha2::Sha512::digest(data).to_vec(),
        b"sha256" => sha2::Sha256::digest(data).to_vec(),
        other => {
            return Err(format!(
                "the SSH signature hashes with {:?}; only sha256 and sha512 are known",
                String::from_utf8_lossy(other)
            ));
        }
    };
    let mut signed = b"SSHSIG".to_vec();
    for part in [namespace, reserved, hash, digest.as_slice()] {
        signed.extend_from_slice(&(part.len() as u32).to_be_bytes());
        signed.extend_from_slice(part);
    }
    let mut inner = Reader(signature);
    let kind = inner.string()?;
    if kind != b"ssh-ed25519" {
        return Err(format!(
            "an SSH signature of type {:?}; this hub verifies ssh-ed25519 only",
            String::from_utf8_lossy(kind)
        ));
    }
    let bytes: [u8; 64] = inner
        .string()?
        .try_into()
        .map_err(|_| "an ed25519 signature is 64 bytes".to_owned())?;
    let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| format!("{signer_fingerprint} is not a valid ed25519 key"))?;
    verifying
        .verify_strict(&signed, &ed25519_dalek::Signature::from_bytes(&bytes))
        .map_err(|_| {
            format!(
                "the signature by {} ({signer_fingerprint}) does not verify: the content was changed after it was signed",
                signer.principals
            )
        })?;
    Ok(Verified {
        principals: signer.principals.clone(),
        fingerprint: signer.fingerprint.clone(),
    })
}

/// Verifies a detached signature block as Git stores it (a commit's `gpgsig` header, or the
/// block at the end of a tag): SSH signatures are checked, OpenPGP ones refused with a reason.
pub fn verify_signature(
    signature: &str,
    data: &[u8],
    allowed: &AllowedSigners,
) -> Result<Verified, String> {
    if signature.contains("-----BEGIN SSH SIGNATURE-----") {
        verify_ssh(signature, data, allowed)
    } else if signature.contains("-----BEGIN PGP SIGNATURE-----") {
        Err(format!(
            "signed with OpenPGP, which this hub does not verify yet: sign with an SSH key (git config gpg.format ssh) allowed in the source's verify.keys (expected one of: {})",
            allowed.expected()
        ))
    } else {
        Err("a signature of a kind this hub does not know (neither SSH nor OpenPGP)".to_owned())
    }
}

/// Splits a tag object's bytes into what was signed and the signature block at its end.
pub fn split_tag(data: &[u8]) -> Option<(&[u8], &str)> {
    for marker in [
        "-----BEGIN SSH SIGNATURE-----",
        "-----BEGIN PGP SIGNATURE-----",
    ] {
        if let Some(at) = find(data, marker.as_bytes()) {
            let signature = std::str::from_utf8(&data[at..]).ok()?;
            return Some((&data[..at], signature));
        }
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// An OpenSSH public key blob (`string "ssh-ed25519"`, `string key`) → the key.
fn ed25519_from_blob(blob: &[u8]) -> Result<[u8; 32], String> {
    let mut reader = Reader(blob);
    let kind = reader.string()?;
    if kind != b"ssh-ed25519" {
        return Err(format!(
            "a {} key; this hub verifies ssh-ed25519 only",
            String::from_utf8_lossy(kind)
        ));
    }
    reader
        .string()?
        .try_into()
        .map_err(|_| "an ed25519 key is 32 bytes".to_owned())
}

/// `SHA256:` and the unpadded base64 of the SHA-256 of the key blob (`ssh-keygen -l`).
fn fingerprint(blob: &[u8]) -> String {
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(sha2::Sha256::digest(blob))
    )
}

/// Reads the SSH wire encoding: raw bytes and `u32`-length-prefixed strings, bounds checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if self.0.len() < count {
            return Err("the SSH signature is truncated".to_owned());
        }
        let (head, rest) = self.0.split_at(count);
        self.0 = rest;
        Ok(head)
    }

    fn string(&mut self) -> Result<&'a [u8], String> {
        let length = u32::from_be_bytes(
            self.take(4)?
                .try_into()
                .map_err(|_| "the SSH signature is truncated".to_owned())?,
        );
        self.take(length as usize)
    }
}

/// The files a policy names, relative ones against `base` (the config file's folder).
pub fn resolve(base: &Path, files: &[PathBuf]) -> Vec<PathBuf> {
    files
        .iter()
        .map(|file| match file.is_absolute() {
            true => file.clone(),
            false => base.join(file),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A key made by the real ssh-keygen, and `data` signed by it in the git namespace.
    fn signed_by_ssh_keygen(dir: &Path, name: &str, data: &[u8]) -> (String, String) {
        let key = dir.join(name);
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen is installed (Debian: openssh-client; scripts/setup.sh)");
        assert!(made.success());
        let message = dir.join(format!("{name}.msg"));
        std::fs::write(&message, data).unwrap();
        let signed = Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", "git", "-f"])
            .arg(&key)
            .arg(&message)
            .output()
            .unwrap();
        assert!(
            signed.status.success(),
            "{}",
            String::from_utf8_lossy(&signed.stderr)
        );
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let signature = std::fs::read_to_string(message.with_extension("msg.sig")).unwrap();
        (public, signature)
    }

    #[test]
    fn an_ssh_keygen_signature_verifies_against_its_allowed_signer_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let data =
            b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor A <a@x> 1 +0000\n\nfirst\n";
        let (alice, signature) = signed_by_ssh_keygen(dir.path(), "alice", data);
        let (mallory, forged) = signed_by_ssh_keygen(dir.path(), "mallory", data);
        let allowed =
            AllowedSigners::parse(&format!("alice@example.com {alice}"), "allowed").unwrap();
        let verified = verify_signature(&signature, data, &allowed).unwrap();
        assert_eq!(verified.principals, "alice@example.com");
        assert!(verified.fingerprint.starts_with("SHA256:"));
        // The same signature over other content.
        let changed = verify_signature(&signature, b"tree 0000\n\nsecond\n", &allowed).unwrap_err();
        assert!(changed.contains("does not verify"), "{changed}");
        // Another key: refused, naming the signer's fingerprint and who was expected.
        let other = verify_signature(&forged, data, &allowed).unwrap_err();
        assert!(
            other.contains("not an allowed signer") && other.contains("alice@example.com"),
            "{other}"
        );
        let mallory_fingerprint = AllowedSigners::parse(&format!("m {mallory}"), "x")
            .unwrap()
            .signers[0]
            .fingerprint
            .clone();
        assert!(other.contains(&mallory_fingerprint), "{other}");
        // OpenPGP and garbage.
        let pgp = verify_signature(
            "-----BEGIN PGP SIGNATURE-----\nxx\n-----END PGP SIGNATURE-----",
            data,
            &allowed,
        )
        .unwrap_err();
        assert!(pgp.contains("OpenPGP"), "{pgp}");
        assert!(
            verify_ssh(
                "-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----",
                data,
                &allowed
            )
            .is_err()
        );
    }

    #[test]
    fn allowed_signers_lines_with_options_comments_and_other_key_types() {
        let text = "# team\nalice@example.com namespaces=\"git\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE+mv7XznPa67vBNqO3jaurzTHgtby+dgxkeRlo90lg/ alice\n\n";
        let parsed = AllowedSigners::parse(text, "f").unwrap();
        assert_eq!(parsed.signers.len(), 1);
        assert_eq!(parsed.expected(), "alice@example.com");
        let rsa = AllowedSigners::parse("bob ssh-rsa AAAAB3NzaC1yc2E=", "f").unwrap_err();
        assert!(rsa.contains("ssh-ed25519 signatures only"), "{rsa}");
        assert!(
            AllowedSigners::parse("ssh-ed25519 AAAA", "f").is_err(),
            "no principals"
        );
    }

    #[test]
    fn a_signed_tag_splits_into_content_and_signature() {
        let tag = b"object abc\ntype commit\ntag v1\ntagger T <t@x> 1 +0000\n\nrelease\n-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n";
        let (content, signature) = split_tag(tag).unwrap();
        assert!(content.ends_with(b"release\n"));
        assert!(signature.starts_with("-----BEGIN SSH SIGNATURE-----"));
        assert!(split_tag(b"object abc\n\nunsigned\n").is_none());
    }
}
