//! Keys and trust: ed25519 signing keys, key ids, and a root key that certifies the online
//! snapshot-signing keys, so the signing key can be rotated without touching devices (the TUF
//! root/targets split, reduced to what Outpost needs).
//!
//! Every signature covers a domain-separation context followed by the canonical bytes, so a
//! signature made for one kind of structure can never be replayed as another.

use std::collections::BTreeMap;
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

/// The keys an agent trusts: one root, and the signing keys it has certified.
#[derive(Debug, Clone)]
pub struct TrustStore {
    root: PublicKey,
    signing_keys: BTreeMap<KeyId, KeyCertificate>,
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
        }
    }

    /// The root key.
    pub fn root(&self) -> &PublicKey {
        &self.root
    }

    /// Checks the root's signature on `certificate` and trusts its key. Returns the key's id.
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
        self.signing_keys.insert(key_id, decoded);
        Ok(key_id)
    }

    /// Stops trusting a signing key (after a compromise). Returns whether it was trusted.
    pub fn revoke(&mut self, key_id: &KeyId) -> bool {
        self.signing_keys.remove(key_id).is_some()
    }

    /// The certificate of a trusted signing key.
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
        assert!(trust.signing_key(&id).is_none());
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
