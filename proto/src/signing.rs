//! Keys and trust: ed25519 signing keys, key ids, and a root key that certifies the online
//! snapshot-signing keys, so the signing key can be rotated without touching devices (the TUF
//! root/targets split, reduced to what Outpost needs).
//!
//! Every signature covers a domain-separation context followed by the canonical bytes, so a
//! signature made for one kind of structure can never be replayed as another.
//!
//! A signing key that leaks is revoked by a [`Revocations`] list the root signs. Its version only
//! grows: an agent keeps the highest it has seen, so an old list replayed by a relay (or by a hub
//! restored from a backup) cannot take a revocation back.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ed25519_dalek::Signer as _;

use crate::codec::{DecodeError, Reader, Writer};
use crate::digest::Digest;

/// Context prefixed to snapshot-header bytes before signing.
pub(crate) const SNAPSHOT_HEADER_CONTEXT: &[u8] = b"outpost/snapshot-header/v1\0";
/// Context prefixed to key-certificate bytes before signing.
const KEY_CERTIFICATE_CONTEXT: &[u8] = b"outpost/signing-key-certificate/v1\0";
const KEY_CERTIFICATE_MAGIC: &[u8; 4] = b"OPKC";
const KEY_CERTIFICATE_VERSION: u16 = 1;
/// Context prefixed to revocation-list bytes before signing.
const REVOCATIONS_CONTEXT: &[u8] = b"outpost/key-revocations/v1\0";
const REVOCATIONS_MAGIC: &[u8; 4] = b"OPKR";
const REVOCATIONS_FORMAT: u16 = 1;
/// The most keys one revocation list may name (a bound for decoding).
pub const MAX_REVOKED_KEYS: usize = 4096;

/// The id of a public key: SHA-256 of its 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 32]);

/// An ed25519 private key. Generate the 32 seed bytes with a CSPRNG (the binaries use getrandom).
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey {
    inner: ed25519_dalek::VerifyingKey,
}

/// A 64-byte ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

/// What a root key says about a signing key: trust it for snapshots made in this time window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCertificate {
    /// The certified snapshot-signing key.
    pub signing_key: PublicKey,
    /// First second (Unix time) of validity, inclusive.
    pub not_before: i64,
    /// Last second (Unix time) of validity, inclusive.
    pub not_after: i64,
}

/// A key certificate with the root's signature, as shipped to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKeyCertificate {
    /// Canonical certificate bytes (the signed message, without the context).
    pub bytes: Vec<u8>,
    /// The root key's signature.
    pub signature: Signature,
}

impl SignedKeyCertificate {
    /// Certificate bytes followed by the 64-byte signature: the form sent to agents.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = self.bytes.clone();
        out.extend_from_slice(&self.signature.0);
        out
    }

    /// Reads [`SignedKeyCertificate::to_wire`]'s form (checked later by
    /// [`TrustStore::add_certificate`]).
    pub fn from_wire(bytes: &[u8]) -> Result<SignedKeyCertificate, TrustError> {
        let split = bytes
            .len()
            .checked_sub(64)
            .ok_or(TrustError::SignatureLength(bytes.len()))?;
        Ok(SignedKeyCertificate {
            bytes: bytes[..split].to_vec(),
            signature: Signature::from_slice(&bytes[split..])?,
        })
    }
}

/// What the root says about leaked or retired signing keys: never trust them for new snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Revocations {
    /// Grows with every new list; a list is accepted only above the version held.
    pub version: u64,
    /// When it was issued (Unix seconds; informational).
    pub issued_at: i64,
    /// The revoked signing keys.
    pub revoked: BTreeSet<KeyId>,
}

/// A revocation list with the root's signature, as shipped to agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRevocations {
    /// Canonical list bytes (the signed message, without the context).
    pub bytes: Vec<u8>,
    /// The root key's signature.
    pub signature: Signature,
}

impl SignedRevocations {
    /// List bytes followed by the 64-byte signature: the form sent to agents and kept on disk.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = self.bytes.clone();
        out.extend_from_slice(&self.signature.0);
        out
    }

    /// Reads [`SignedRevocations::to_wire`]'s form (checked later by
    /// [`TrustStore::apply_revocations`] or [`SignedRevocations::verify`]).
    pub fn from_wire(bytes: &[u8]) -> Result<SignedRevocations, TrustError> {
        let split = bytes
            .len()
            .checked_sub(64)
            .ok_or(TrustError::SignatureLength(bytes.len()))?;
        Ok(SignedRevocations {
            bytes: bytes[..split].to_vec(),
            signature: Signature::from_slice(&bytes[split..])?,
        })
    }

    /// Checks the root's signature and decodes the list.
    pub fn verify(&self, root: &PublicKey) -> Result<Revocations, TrustError> {
        let list = Revocations::decode(&self.bytes)?;
        if !root.verify_with_context(REVOCATIONS_CONTEXT, &self.bytes, &self.signature) {
            return Err(TrustError::RevocationsNotSignedByRoot {
                root: root.key_id(),
            });
        }
        Ok(list)
    }
}

impl Revocations {
    /// Canonical bytes: magic, format, version, issued-at, count, sorted key ids.
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::default();
        writer.raw(REVOCATIONS_MAGIC);
        writer.u16(REVOCATIONS_FORMAT);
        writer.u64(self.version);
        writer.i64(self.issued_at);
        writer.u16(self.revoked.len().min(MAX_REVOKED_KEYS) as u16);
        for key in self.revoked.iter().take(MAX_REVOKED_KEYS) {
            writer.raw(&key.0);
        }
        writer.bytes
    }

    /// Parses canonical bytes (keys must be sorted and unique: one list, one encoding).
    pub fn decode(bytes: &[u8]) -> Result<Revocations, TrustError> {
        let mut reader = Reader::new(bytes);
        if &reader.array::<4>("magic")? != REVOCATIONS_MAGIC {
            return Err(DecodeError::Invalid {
                field: "magic",
                message: "not an Outpost key revocation list".to_owned(),
            }
            .into());
        }
        let format = reader.u16("format")?;
        if format != REVOCATIONS_FORMAT {
            return Err(DecodeError::Invalid {
                field: "format",
                message: format!(
                    "format {format} is not supported (this build reads {REVOCATIONS_FORMAT})"
                ),
            }
            .into());
        }
        let version = reader.u64("version")?;
        let issued_at = reader.i64("issued_at")?;
        let count = reader.u16("count")? as usize;
        if count > MAX_REVOKED_KEYS {
            return Err(DecodeError::Invalid {
                field: "count",
                message: format!("{count} keys, more than {MAX_REVOKED_KEYS}"),
            }
            .into());
        }
        let mut revoked = BTreeSet::new();
        let mut last: Option<KeyId> = None;
        for _ in 0..count {
            let key = KeyId(reader.array("revoked key")?);
            if last.is_some_and(|last| last >= key) {
                return Err(DecodeError::Invalid {
                    field: "revoked key",
                    message: "keys are not sorted and unique".to_owned(),
                }
                .into());
            }
            last = Some(key);
            revoked.insert(key);
        }
        reader.finish()?;
        Ok(Revocations {
            version,
            issued_at,
            revoked,
        })
    }
}

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (32 bytes) }. The key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl PublicKey {
    /// The key as a DER SubjectPublicKeyInfo: the TLS raw public key (RFC 7250) of hubs and agents.
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut out = ED25519_SPKI_PREFIX.to_vec();
        out.extend_from_slice(self.inner.as_bytes());
        out
    }

    /// Reads an ed25519 SubjectPublicKeyInfo; anything else (another algorithm, extra bytes) is
    /// refused.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, TrustError> {
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .and_then(|rest| <&[u8; 32]>::try_from(rest).ok())
            .ok_or(TrustError::InvalidPublicKey)?;
        PublicKey::from_bytes(key)
    }
}

/// The keys an agent trusts: one root, the signing keys it has certified, and the keys it has
/// revoked since. A revoked key stays known (snapshots verified before its revocation can still
/// be checked for integrity with [`TrustStore::ignoring_revocations`]) but signs nothing new.
#[derive(Debug, Clone)]
pub struct TrustStore {
    root: PublicKey,
    signing_keys: BTreeMap<KeyId, KeyCertificate>,
    revoked: BTreeSet<KeyId>,
    revocations_version: u64,
}

/// Why a key, signature or certificate is not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    /// 32 bytes that are not an ed25519 public key.
    #[error("not a valid ed25519 public key")]
    InvalidPublicKey,
    /// A signature is not 64 bytes.
    #[error("a signature is 64 bytes, got {0}")]
    SignatureLength(usize),
    /// The certificate bytes do not decode.
    #[error("key certificate does not decode: {0}")]
    Decode(#[from] DecodeError),
    /// The root's signature over the certificate does not verify.
    #[error("key certificate for {key} is not signed by the trusted root {root}")]
    NotSignedByRoot {
        /// The certified key.
        key: KeyId,
        /// The root that was expected to sign it.
        root: KeyId,
    },
    /// `not_before > not_after`.
    #[error("key certificate for {0} has an empty validity window")]
    EmptyValidity(KeyId),
    /// The root's signature over a revocation list does not verify.
    #[error("key revocation list is not signed by the trusted root {root}")]
    RevocationsNotSignedByRoot {
        /// The root that was expected to sign it.
        root: KeyId,
    },
}

impl KeyId {
    /// The first 16 hex digits.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.short())
    }
}

impl SigningKey {
    /// Builds a key from its 32 secret seed bytes.
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        SigningKey {
            inner: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The 32 secret seed bytes, for storing the key (keep the file mode 0600).
    pub fn seed(&self) -> [u8; 32] {
        self.inner.to_bytes()
    }

    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            inner: self.inner.verifying_key(),
        }
    }

    /// The id of the public half.
    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }

    /// Signs `context || message`.
    pub(crate) fn sign_with_context(&self, context: &[u8], message: &[u8]) -> Signature {
        let mut signed = Vec::with_capacity(context.len() + message.len());
        signed.extend_from_slice(context);
        signed.extend_from_slice(message);
        Signature(self.inner.sign(&signed).to_bytes())
    }

    /// Certifies `certificate.signing_key` for snapshots (this key acting as the root).
    pub fn certify(&self, certificate: &KeyCertificate) -> SignedKeyCertificate {
        let bytes = certificate.encode();
        let signature = self.sign_with_context(KEY_CERTIFICATE_CONTEXT, &bytes);
        SignedKeyCertificate { bytes, signature }
    }

    /// Signs a revocation list (this key acting as the root).
    pub fn sign_revocations(&self, revocations: &Revocations) -> SignedRevocations {
        let bytes = revocations.encode();
        let signature = self.sign_with_context(REVOCATIONS_CONTEXT, &bytes);
        SignedRevocations { bytes, signature }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, secret elided)", self.key_id())
    }
}

impl PublicKey {
    /// Parses a 32-byte public key.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, TrustError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(|inner| PublicKey { inner })
            .map_err(|_| TrustError::InvalidPublicKey)
    }

    /// The 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.inner.to_bytes()
    }

    /// SHA-256 of the 32 bytes.
    pub fn key_id(&self) -> KeyId {
        KeyId(Digest::of(self.inner.as_bytes()).0)
    }

    /// Strictly verifies `signature` over `context || message` (no malleable or small-order forms).
    pub(crate) fn verify_with_context(
        &self,
        context: &[u8],
        message: &[u8],
        signature: &Signature,
    ) -> bool {
        let mut signed = Vec::with_capacity(context.len() + message.len());
        signed.extend_from_slice(context);
        signed.extend_from_slice(message);
        let signature = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.inner.verify_strict(&signed, &signature).is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl Signature {
    /// Reads a signature from a byte slice that must be exactly 64 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Signature, TrustError> {
        <[u8; 64]>::try_from(bytes)
            .map(Signature)
            .map_err(|_| TrustError::SignatureLength(bytes.len()))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl KeyCertificate {
    /// Canonical bytes: magic, version, key, validity window.
    pub fn encode(&self) -> Vec<u8> {
        let mut writer = Writer::default();
        writer.raw(KEY_CERTIFICATE_MAGIC);
        writer.u16(KEY_CERTIFICATE_VERSION);
        writer.raw(&self.signing_key.to_bytes());
        writer.i64(self.not_before);
        writer.i64(self.not_after);
        writer.bytes
    }

    /// Parses canonical bytes.
    pub fn decode(bytes: &[u8]) -> Result<KeyCertificate, TrustError> {
        let mut reader = Reader::new(bytes);
        if &reader.array::<4>("magic")? != KEY_CERTIFICATE_MAGIC {
            return Err(DecodeError::Invalid {
                field: "magic",
                message: "not an Outpost key certificate".to_owned(),
            }
            .into());
        }
        let version = reader.u16("version")?;
        if version != KEY_CERTIFICATE_VERSION {
            return Err(DecodeError::Invalid {
                field: "version",
                message: format!("version {version} is not supported (this build reads {KEY_CERTIFICATE_VERSION})"),
            }
            .into());
        }
        let signing_key = PublicKey::from_bytes(&reader.array("signing key")?)?;
        let not_before = reader.i64("not_before")?;
        let not_after = reader.i64("not_after")?;
        reader.finish()?;
        Ok(KeyCertificate {
            signing_key,
            not_before,
            not_after,
        })
    }
}

impl TrustStore {
    /// A store that trusts `root` to certify signing keys, and no signing key yet.
    pub fn new(root: PublicKey) -> TrustStore {
        TrustStore {
            root,
            signing_keys: BTreeMap::new(),
            revoked: BTreeSet::new(),
            revocations_version: 0,
        }
    }

    /// The root key.
    pub fn root(&self) -> &PublicKey {
        &self.root
    }

    /// Checks the root's signature on `certificate` and trusts its key. Returns the key's id.
    ///
    /// A key already known keeps the certificate that reaches further into the future (a
    /// renewal extends `not_after`); an older certificate offered again changes nothing, so a
    /// replayed one cannot shrink a key's window under snapshots it already signed.
    pub fn add_certificate(
        &mut self,
        certificate: &SignedKeyCertificate,
    ) -> Result<KeyId, TrustError> {
        let decoded = KeyCertificate::decode(&certificate.bytes)?;
        let key_id = decoded.signing_key.key_id();
        if !self.root.verify_with_context(
            KEY_CERTIFICATE_CONTEXT,
            &certificate.bytes,
            &certificate.signature,
        ) {
            return Err(TrustError::NotSignedByRoot {
                key: key_id,
                root: self.root.key_id(),
            });
        }
        if decoded.not_before > decoded.not_after {
            return Err(TrustError::EmptyValidity(key_id));
        }
        let keep_old = self
            .signing_keys
            .get(&key_id)
            .is_some_and(|old| old.not_after >= decoded.not_after);
        if !keep_old {
            self.signing_keys.insert(key_id, decoded);
        }
        Ok(key_id)
    }

    /// Stops trusting a signing key for new snapshots (after a compromise). Returns whether it
    /// was trusted and not revoked before.
    pub fn revoke(&mut self, key_id: &KeyId) -> bool {
        self.signing_keys.contains_key(key_id) && self.revoked.insert(*key_id)
    }

    /// Checks the root's signature on a revocation list and adopts it if its version is above
    /// the one held (keys revoked before stay revoked either way). Returns whether it was adopted.
    pub fn apply_revocations(&mut self, signed: &SignedRevocations) -> Result<bool, TrustError> {
        let list = signed.verify(&self.root)?;
        if list.version <= self.revocations_version {
            return Ok(false);
        }
        self.revocations_version = list.version;
        self.revoked.extend(list.revoked);
        Ok(true)
    }

    /// Whether a key was revoked.
    pub fn is_revoked(&self, key_id: &KeyId) -> bool {
        self.revoked.contains(key_id)
    }

    /// The version of the revocation list adopted last (0: none).
    pub fn revocations_version(&self) -> u64 {
        self.revocations_version
    }

    /// The revoked keys.
    pub fn revoked(&self) -> impl Iterator<Item = &KeyId> {
        self.revoked.iter()
    }

    /// The same keys with no revocation in force: for checking the integrity of snapshots that
    /// were verified before a revocation (offline autonomy keeps them enforced), never for
    /// accepting new ones.
    pub fn ignoring_revocations(&self) -> TrustStore {
        TrustStore {
            revoked: BTreeSet::new(),
            ..self.clone()
        }
    }

    /// The certificate of a trusted signing key (revoked or not: see [`TrustStore::is_revoked`]).
    pub fn signing_key(&self, key_id: &KeyId) -> Option<&KeyCertificate> {
        self.signing_keys.get(key_id)
    }

    /// Ids of all trusted signing keys.
    pub fn signing_key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.signing_keys.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::from_seed([byte; 32])
    }

    fn certificate(signing: &SigningKey) -> KeyCertificate {
        KeyCertificate {
            signing_key: signing.public_key(),
            not_before: 0,
            not_after: i64::MAX,
        }
    }

    #[test]
    fn root_certifies_signing_keys() {
        let root = key(1);
        let online = key(2);
        let mut trust = TrustStore::new(root.public_key());
        let id = trust
            .add_certificate(&root.certify(&certificate(&online)))
            .unwrap();
        assert_eq!(id, online.key_id());
        assert!(trust.signing_key(&id).is_some());
        assert!(trust.revoke(&id));
        assert!(trust.is_revoked(&id));
        assert!(!trust.ignoring_revocations().is_revoked(&id));
    }

    #[test]
    fn a_renewed_certificate_extends_the_window_and_an_old_one_cannot_shrink_it() {
        let root = key(1);
        let online = key(2);
        let mut trust = TrustStore::new(root.public_key());
        let window = |not_before, not_after| KeyCertificate {
            signing_key: online.public_key(),
            not_before,
            not_after,
        };
        let id = trust
            .add_certificate(&root.certify(&window(100, 200)))
            .unwrap();
        trust
            .add_certificate(&root.certify(&window(100, 900)))
            .unwrap();
        assert_eq!(trust.signing_key(&id).unwrap().not_after, 900);
        trust
            .add_certificate(&root.certify(&window(150, 300)))
            .unwrap();
        assert_eq!(
            (
                trust.signing_key(&id).unwrap().not_before,
                trust.signing_key(&id).unwrap().not_after
            ),
            (100, 900),
            "a replayed older certificate changes nothing"
        );
    }

    #[test]
    fn revocation_lists_only_grow_and_must_come_from_the_root() {
        let root = key(1);
        let (first, second) = (key(2), key(3));
        let mut trust = TrustStore::new(root.public_key());
        for signer in [&first, &second] {
            trust
                .add_certificate(&root.certify(&certificate(signer)))
                .unwrap();
        }
        let list = |version, keys: &[&SigningKey]| Revocations {
            version,
            issued_at: 5,
            revoked: keys.iter().map(|key| key.key_id()).collect(),
        };
        let v2 = root.sign_revocations(&list(2, &[&first]));
        assert!(trust.apply_revocations(&v2).unwrap());
        assert!(trust.is_revoked(&first.key_id()) && !trust.is_revoked(&second.key_id()));
        // An older or equal version is ignored, and never un-revokes.
        assert!(
            !trust
                .apply_revocations(&root.sign_revocations(&list(1, &[])))
                .unwrap()
        );
        assert!(!trust.apply_revocations(&v2).unwrap());
        assert!(trust.is_revoked(&first.key_id()));
        assert_eq!(trust.revocations_version(), 2);
        // Another root's list is refused.
        assert!(matches!(
            trust.apply_revocations(&key(9).sign_revocations(&list(3, &[&second]))),
            Err(TrustError::RevocationsNotSignedByRoot { .. })
        ));
        // Round trip through the wire form; tampering is caught.
        let wire = v2.to_wire();
        assert_eq!(SignedRevocations::from_wire(&wire).unwrap(), v2);
        let mut tampered = SignedRevocations::from_wire(&wire).unwrap();
        tampered.bytes[8] ^= 1;
        assert!(tampered.verify(&root.public_key()).is_err());
    }

    #[test]
    fn revocation_lists_decode_strictly() {
        let root = key(1);
        let list = Revocations {
            version: 1,
            issued_at: 0,
            revoked: [key(2).key_id(), key(3).key_id()].into_iter().collect(),
        };
        let bytes = list.encode();
        assert_eq!(Revocations::decode(&bytes).unwrap(), list);
        // Unsorted keys (two encodings of one list) are refused.
        let mut swapped = bytes[..24].to_vec();
        swapped.extend_from_slice(&bytes[56..88]);
        swapped.extend_from_slice(&bytes[24..56]);
        assert!(Revocations::decode(&swapped).is_err());
        for cut in 0..bytes.len() {
            assert!(Revocations::decode(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Revocations::decode(&longer).is_err());
        // A certificate signature is not a revocation signature.
        let certificate = root.certify(&certificate(&key(2)));
        let forged = SignedRevocations {
            bytes,
            signature: certificate.signature,
        };
        assert!(forged.verify(&root.public_key()).is_err());
    }

    #[test]
    fn certificate_from_another_root_is_refused() {
        let mut trust = TrustStore::new(key(1).public_key());
        let forged = key(9).certify(&certificate(&key(2)));
        assert!(matches!(
            trust.add_certificate(&forged),
            Err(TrustError::NotSignedByRoot { .. })
        ));
    }

    #[test]
    fn tampered_certificate_is_refused() {
        let root = key(1);
        let mut trust = TrustStore::new(root.public_key());
        let mut signed = root.certify(&certificate(&key(2)));
        let last = signed.bytes.len() - 1;
        signed.bytes[last] ^= 1;
        assert!(trust.add_certificate(&signed).is_err());
        let mut signed = root.certify(&certificate(&key(2)));
        signed.bytes.push(0);
        assert!(matches!(
            trust.add_certificate(&signed),
            Err(TrustError::Decode(DecodeError::TrailingBytes(1)))
        ));
    }

    #[test]
    fn a_certificate_signature_is_not_a_header_signature() {
        let root = key(1);
        let signed = root.certify(&certificate(&key(2)));
        assert!(!root.public_key().verify_with_context(
            SNAPSHOT_HEADER_CONTEXT,
            &signed.bytes,
            &signed.signature
        ));
    }
}
