//! The signed snapshot header and its canonical binary encoding.
//!
//! Layout (format version 1), all integers big-endian, strings as u16 length + UTF-8:
//! `"OPSH"` · u16 format version · bundle · u64 generation · git commit · git ref · 32-byte body
//! digest · u64 body size · u64 object count · i64 created-at · u8 has-expiry · i64 expires-at ·
//! label selector · 32-byte signing key id. One header has exactly one encoding; decoding refuses
//! trailing bytes, unknown versions and out-of-range values.

use crate::codec::{DecodeError, Reader, Writer};
use crate::digest::Digest;
use crate::signing::{KeyId, SNAPSHOT_HEADER_CONTEXT, Signature, SigningKey};

/// The snapshot format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The largest body a header may announce (256 MiB). Decompression never produces more.
pub const MAX_BODY_SIZE: u64 = 256 << 20;
/// The longest string field in a header.
pub const MAX_HEADER_STRING: usize = 4096;
const MAGIC: &[u8; 4] = b"OPSH";

/// What the hub signs about a snapshot. The body is bound by `body_digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Bundle name.
    pub bundle: String,
    /// Per-bundle number that only grows; agents never accept a lower one.
    pub generation: u64,
    /// Git commit the bundle was rendered from (hex).
    pub git_commit: String,
    /// The tag or branch that named the commit, e.g. `refs/tags/pos-v1.4.0`.
    pub git_ref: String,
    /// SHA-256 of the canonical body.
    pub body_digest: Digest,
    /// Body length in bytes.
    pub body_size: u64,
    /// Number of objects in the body.
    pub object_count: u64,
    /// When the hub rendered it (Unix seconds).
    pub created_at: i64,
    /// After this (Unix seconds) the agent still enforces the snapshot but reports itself stale.
    pub expires_at: Option<i64>,
    /// The label selector the snapshot was rendered for, in its canonical text form.
    pub selector: String,
    /// Id of the key that signs this header.
    pub key_id: KeyId,
}

/// A header that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The bytes do not decode.
    #[error("snapshot header does not decode: {0}")]
    Decode(#[from] DecodeError),
    /// The header is in a format version this build does not read.
    #[error(
        "snapshot header format version {got} is not supported (this build reads {FORMAT_VERSION}); upgrade the agent"
    )]
    UnsupportedVersion {
        /// The version in the header.
        got: u16,
    },
    /// A string field is longer than the format allows.
    #[error("snapshot header field {field} is {len} bytes, more than {MAX_HEADER_STRING}")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The bundle name is empty.
    #[error("snapshot header has an empty bundle name")]
    EmptyBundle,
    /// The body is larger than any snapshot may be.
    #[error("snapshot body of {0} bytes exceeds the limit of {MAX_BODY_SIZE}")]
    BodyTooLarge(u64),
}

impl SnapshotHeader {
    /// The canonical bytes that are signed.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        self.check()?;
        let mut writer = Writer::default();
        writer.raw(MAGIC);
        writer.u16(FORMAT_VERSION);
        writer.str(&self.bundle);
        writer.u64(self.generation);
        writer.str(&self.git_commit);
        writer.str(&self.git_ref);
        writer.raw(&self.body_digest.0);
        writer.u64(self.body_size);
        writer.u64(self.object_count);
        writer.i64(self.created_at);
        writer.u8(u8::from(self.expires_at.is_some()));
        writer.i64(self.expires_at.unwrap_or(0));
        writer.str(&self.selector);
        writer.raw(&self.key_id.0);
        Ok(writer.bytes)
    }

    /// Parses canonical bytes. Does not check any signature: see [`crate::verify`].
    pub fn decode(bytes: &[u8]) -> Result<SnapshotHeader, HeaderError> {
        let mut reader = Reader::new(bytes);
        if &reader.array::<4>("magic")? != MAGIC {
            return Err(DecodeError::Invalid {
                field: "magic",
                message: "not an Outpost snapshot header".to_owned(),
            }
            .into());
        }
        let version = reader.u16("format version")?;
        if version != FORMAT_VERSION {
            return Err(HeaderError::UnsupportedVersion { got: version });
        }
        let bundle = reader.str("bundle")?;
        let generation = reader.u64("generation")?;
        if generation > crate::wire::MAX_COUNTER {
            return Err(crate::DecodeError::Invalid {
                field: "generation",
                message: format!(
                    "{generation} is above the largest counter, {}",
                    crate::wire::MAX_COUNTER
                ),
            }
            .into());
        }
        let git_commit = reader.str("git commit")?;
        let git_ref = reader.str("git ref")?;
        let body_digest = Digest(reader.array("body digest")?);
        let body_size = reader.u64("body size")?;
        let object_count = reader.u64("object count")?;
        let created_at = reader.i64("created at")?;
        let expires_at = match (reader.u8("has expiry")?, reader.i64("expires at")?) {
            (0, 0) => None,
            (1, at) => Some(at),
            _ => {
                return Err(DecodeError::Invalid {
                    field: "expires at",
                    message: "flag must be 0 (with time 0) or 1".to_owned(),
                }
                .into());
            }
        };
        let selector = reader.str("selector")?;
        let key_id = KeyId(reader.array("key id")?);
        reader.finish()?;
        let header = SnapshotHeader {
            bundle,
            generation,
            git_commit,
            git_ref,
            body_digest,
            body_size,
            object_count,
            created_at,
            expires_at,
            selector,
            key_id,
        };
        header.check()?;
        Ok(header)
    }

    /// Sets `key_id` to `key`'s id, encodes and signs. Returns the signed bytes and the signature.
    pub fn sign(mut self, key: &SigningKey) -> Result<(Vec<u8>, Signature), HeaderError> {
        self.key_id = key.key_id();
        let bytes = self.encode()?;
        let signature = key.sign_with_context(SNAPSHOT_HEADER_CONTEXT, &bytes);
        Ok((bytes, signature))
    }

    fn check(&self) -> Result<(), HeaderError> {
        for (field, value) in [
            ("bundle", &self.bundle),
            ("git commit", &self.git_commit),
            ("git ref", &self.git_ref),
            ("selector", &self.selector),
        ] {
            if value.len() > MAX_HEADER_STRING {
                return Err(HeaderError::FieldTooLong {
                    field,
                    len: value.len(),
                });
            }
        }
        if self.bundle.is_empty() {
            return Err(HeaderError::EmptyBundle);
        }
        if self.body_size > MAX_BODY_SIZE {
            return Err(HeaderError::BodyTooLarge(self.body_size));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fixture() -> SnapshotHeader {
        SnapshotHeader {
            bundle: "pos".to_owned(),
            generation: 7,
            git_commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            git_ref: "refs/tags/pos-v1.4.0".to_owned(),
            body_digest: Digest::of(b"body"),
            body_size: 4,
            object_count: 1,
            created_at: 1_795_000_000,
            expires_at: Some(1_797_592_000),
            selector: "region=eu,role=store".to_owned(),
            key_id: KeyId([0xab; 32]),
        }
    }

    /// Golden: pins the header encoding. Changing it breaks every agent in the field.
    #[test]
    fn golden_header_bytes() {
        let bytes = fixture().encode().unwrap();
        let expected = concat!(
            "4f505348",
            "0001", // magic, version
            "0003",
            "706f73",           // bundle "pos"
            "0000000000000007", // generation
            "0028",
            "30313233343536373839616263646566303132333435363738396162636465663031323334353637",
            "0014",
            "726566732f746167732f706f732d76312e342e30", // git ref
            "230d8358dc8e8890b4c58deeb62912ee2f20357ae92a5cc861b98e68fe31acb5", // body digest
            "0000000000000004",
            "0000000000000001", // body size, object count
            "000000006afd86c0", // created at
            "01",
            "000000006b2513c0", // expires at
            "0014",
            "726567696f6e3d65752c726f6c653d73746f7265", // selector
            "abababababababababababababababababababababababababababababababab", // key id
        );
        assert_eq!(hex::encode(&bytes), expected);
        assert_eq!(SnapshotHeader::decode(&bytes).unwrap(), fixture());
    }

    #[test]
    fn no_expiry_round_trips() {
        let header = SnapshotHeader {
            expires_at: None,
            ..fixture()
        };
        assert_eq!(
            SnapshotHeader::decode(&header.encode().unwrap()).unwrap(),
            header
        );
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        let bytes = fixture().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(SnapshotHeader::decode(&bytes[..len]).is_err(), "len {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            SnapshotHeader::decode(&longer),
            Err(HeaderError::Decode(DecodeError::TrailingBytes(1)))
        ));
    }

    #[test]
    fn unknown_version_and_limits_are_refused() {
        let mut bytes = fixture().encode().unwrap();
        bytes[5] = 2;
        assert_eq!(
            SnapshotHeader::decode(&bytes),
            Err(HeaderError::UnsupportedVersion { got: 2 })
        );
        let too_big = SnapshotHeader {
            body_size: MAX_BODY_SIZE + 1,
            ..fixture()
        };
        assert!(matches!(
            too_big.encode(),
            Err(HeaderError::BodyTooLarge(_))
        ));
        let long = SnapshotHeader {
            git_ref: "x".repeat(MAX_HEADER_STRING + 1),
            ..fixture()
        };
        assert!(matches!(
            long.encode(),
            Err(HeaderError::FieldTooLong { .. })
        ));
    }
}
