//! Snapshot verification, in two typed stages: a header is checked (signature, key, bundle,
//! generation) before any body byte is trusted, then the body is checked against the header.
//! [`VerifiedSnapshot`] can only be built by passing both stages.
//!
//! Refused here, each with its own error: bad signature, unknown or revoked key, key used outside
//! its certified window, snapshot of another bundle (mix-and-match), lower generation (rollback),
//! a different snapshot under an installed generation (equivocation), a header other than the one
//! assigned, a body that does not match the digest, size or object count.

use crate::body::{Body, count_objects};
use crate::compress::{self, DecompressError};
use crate::digest::Digest;
use crate::header::{HeaderError, SnapshotHeader};
use crate::signing::{KeyId, SNAPSHOT_HEADER_CONTEXT, Signature, TrustError, TrustStore};

/// What the receiver expects of a snapshot before looking at it.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    /// The bundle it was asked for.
    pub bundle: &'a str,
    /// The digest the hub assigned, when known. A header naming another body is refused.
    pub assigned_digest: Option<Digest>,
    /// What is installed for the bundle now, if anything.
    pub installed: Option<Installed>,
}

/// The snapshot currently installed for a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Its generation.
    pub generation: u64,
    /// Its body digest.
    pub digest: Digest,
}

/// A header whose signature, key, bundle and generation have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedHeader {
    header: SnapshotHeader,
    header_bytes: Vec<u8>,
    signature: Signature,
}

/// A snapshot whose header and body have both been verified. Only [`VerifiedHeader::accept_body`]
/// builds one.
#[derive(Debug, Clone)]
pub struct VerifiedSnapshot {
    header: SnapshotHeader,
    header_bytes: Vec<u8>,
    signature: Signature,
    body: Body,
}

/// Why a snapshot is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    /// The header bytes are malformed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The signature is malformed.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The header names a key this agent does not trust.
    #[error(
        "snapshot is signed by key {0}, which is not certified by the trusted root (or was revoked)"
    )]
    UnknownKey(KeyId),
    /// The header is signed by a key the root revoked.
    #[error(
        "snapshot is signed by key {0}, which the root revoked; snapshots verified before stay enforced, nothing new signed by it is accepted"
    )]
    RevokedKey(KeyId),
    /// The signing key's certificate does not cover the header's creation time.
    #[error(
        "key {key} is certified for {not_before}..={not_after}, but the snapshot says it was made at {created_at}"
    )]
    KeyNotValid {
        /// The key.
        key: KeyId,
        /// Start of its window.
        not_before: i64,
        /// End of its window.
        not_after: i64,
        /// The header's creation time.
        created_at: i64,
    },
    /// The signature does not verify.
    #[error("snapshot header signature does not verify with key {0}")]
    BadSignature(KeyId),
    /// The header is for another bundle.
    #[error("snapshot is for bundle {got:?}, expected {expected:?}")]
    WrongBundle {
        /// The bundle asked for.
        expected: String,
        /// The bundle in the header.
        got: String,
    },
    /// The header is not the one the hub assigned.
    #[error("snapshot {got} is not the assigned snapshot {expected}")]
    NotAssigned {
        /// Assigned digest.
        expected: Digest,
        /// Digest in the header.
        got: Digest,
    },
    /// The generation is lower than the installed one.
    #[error(
        "rollback refused: generation {offered} is lower than the installed generation {installed}"
    )]
    Rollback {
        /// Installed generation.
        installed: u64,
        /// Offered generation.
        offered: u64,
    },
    /// Same generation as installed, different content.
    #[error(
        "generation {generation} is installed with body {installed}, but this snapshot claims it for body {offered}"
    )]
    Equivocation {
        /// The generation.
        generation: u64,
        /// Installed digest.
        installed: Digest,
        /// Offered digest.
        offered: Digest,
    },
    /// A snapshot that expired before it was installed: an agent keeps enforcing one that
    /// expires while installed, but never installs one that has expired already (a replayed
    /// old snapshot).
    #[error(
        "the snapshot expired at {expires_at} (unix time; it is {now} here): an expired snapshot is never installed anew; the hub signs snapshots in use again before they expire — if this device's clock is wrong, set it"
    )]
    ExpiredBeforeInstall {
        /// Its signed expiry.
        expires_at: i64,
        /// The time here.
        now: i64,
    },
    /// The body's length is not the header's.
    #[error("snapshot body is {got} bytes, the signed header says {expected}")]
    BodySize {
        /// From the header.
        expected: u64,
        /// Received.
        got: u64,
    },
    /// The body's digest is not the header's.
    #[error("snapshot body digest is {got}, the signed header says {expected}")]
    BodyDigest {
        /// From the header.
        expected: Digest,
        /// Computed.
        got: Digest,
    },
    /// The body's object count is not the header's.
    #[error("snapshot body holds {got} objects, the signed header says {expected}")]
    ObjectCount {
        /// From the header.
        expected: u64,
        /// Counted.
        got: u64,
    },
}

/// Stage one: decodes and checks a signed header against the trust store and the expectation.
pub fn verify_header(
    trust: &TrustStore,
    header_bytes: &[u8],
    signature: &[u8],
    expect: &Expectation<'_>,
) -> Result<VerifiedHeader, VerifyError> {
    let signature = Signature::from_slice(signature)?;
    let header = SnapshotHeader::decode(header_bytes)?;
    let certificate = trust
        .signing_key(&header.key_id)
        .ok_or(VerifyError::UnknownKey(header.key_id))?;
    if !certificate.signing_key.verify_with_context(
        SNAPSHOT_HEADER_CONTEXT,
        header_bytes,
        &signature,
    ) {
        return Err(VerifyError::BadSignature(header.key_id));
    }
    if trust.is_revoked(&header.key_id) {
        return Err(VerifyError::RevokedKey(header.key_id));
    }
    // Only now, with the signature checked, are the header's fields worth reading.
    if !(certificate.not_before..=certificate.not_after).contains(&header.created_at) {
        return Err(VerifyError::KeyNotValid {
            key: header.key_id,
            not_before: certificate.not_before,
            not_after: certificate.not_after,
            created_at: header.created_at,
        });
    }
    if header.bundle != expect.bundle {
        return Err(VerifyError::WrongBundle {
            expected: expect.bundle.to_owned(),
            got: header.bundle,
        });
    }
    if let Some(assigned) = expect.assigned_digest
        && assigned != header.body_digest
    {
        return Err(VerifyError::NotAssigned {
            expected: assigned,
            got: header.body_digest,
        });
    }
    if let Some(installed) = expect.installed {
        if header.generation < installed.generation {
            return Err(VerifyError::Rollback {
                installed: installed.generation,
                offered: header.generation,
            });
        }
        if header.generation == installed.generation && header.body_digest != installed.digest {
            return Err(VerifyError::Equivocation {
                generation: header.generation,
                installed: installed.digest,
                offered: header.body_digest,
            });
        }
    }
    Ok(VerifiedHeader {
        header,
        header_bytes: header_bytes.to_vec(),
        signature,
    })
}

impl VerifiedHeader {
    /// The checked header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Refuses a header that expired before `now`: for an install (what is installed already
    /// goes on being enforced when it expires; that is checked elsewhere, and reported stale).
    pub fn check_fresh(&self, now: i64) -> Result<(), VerifyError> {
        match self.header.expires_at {
            Some(expires_at) if expires_at < now => {
                Err(VerifyError::ExpiredBeforeInstall { expires_at, now })
            }
            _ => Ok(()),
        }
    }

    /// Stage two: checks `body` against the header's size, digest and object count.
    pub fn accept_body(self, body: Vec<u8>) -> Result<VerifiedSnapshot, VerifyError> {
        let expected = &self.header;
        if body.len() as u64 != expected.body_size {
            return Err(VerifyError::BodySize {
                expected: expected.body_size,
                got: body.len() as u64,
            });
        }
        let digest = Digest::of(&body);
        if digest != expected.body_digest {
            return Err(VerifyError::BodyDigest {
                expected: expected.body_digest,
                got: digest,
            });
        }
        let objects = count_objects(&body);
        if objects != expected.object_count {
            return Err(VerifyError::ObjectCount {
                expected: expected.object_count,
                got: objects,
            });
        }
        Ok(VerifiedSnapshot {
            body: Body::from_verified_bytes(body, objects),
            header: self.header,
            header_bytes: self.header_bytes,
            signature: self.signature,
        })
    }
}

/// Why a received payload did not become a verified snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiveError {
    /// The payload bytes are not the ones the transfer announced (corrupted or truncated in
    /// transit, or a broken resume): discard them and fetch again from the start.
    #[error(
        "payload digest is {got}, the transfer announced {expected}; discard it and fetch again"
    )]
    PayloadDigest {
        /// Announced in `TransferStart`.
        expected: Digest,
        /// Computed.
        got: Digest,
    },
    /// The payload does not decompress to the header's size.
    #[error(transparent)]
    Decompress(#[from] DecompressError),
    /// The rebuilt body does not match the header.
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

impl VerifiedHeader {
    /// Stage two from the wire: checks `payload` against the digest its transfer announced,
    /// decompresses it (whole, or a delta against `reference`, a body the receiver already
    /// verified) into at most the header's body size, then checks the body against the header.
    ///
    /// The payload digest is not signed: it catches transport damage early and cheaply. What an
    /// attacker who rewrites it too can achieve is stopped by the signed body digest.
    pub fn accept_payload(
        self,
        payload: &[u8],
        payload_digest: Digest,
        reference: Option<&Body>,
    ) -> Result<VerifiedSnapshot, ReceiveError> {
        let got = Digest::of(payload);
        if got != payload_digest {
            return Err(ReceiveError::PayloadDigest {
                expected: payload_digest,
                got,
            });
        }
        let size = self.header.body_size;
        let body = match reference {
            None => compress::decompress_whole(payload, size)?,
            Some(reference) => compress::decompress_delta(reference.as_bytes(), payload, size)?,
        };
        Ok(self.accept_body(body)?)
    }
}

/// Both stages at once, for a snapshot held whole (e.g. re-checked when loaded from the cache).
pub fn verify_snapshot(
    trust: &TrustStore,
    header_bytes: &[u8],
    signature: &[u8],
    body: Vec<u8>,
    expect: &Expectation<'_>,
) -> Result<VerifiedSnapshot, VerifyError> {
    verify_header(trust, header_bytes, signature, expect)?.accept_body(body)
}

impl VerifiedSnapshot {
    /// The verified header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The signed header bytes, for storing and forwarding.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// The header's signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// The verified body.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// The snapshot's name: its body digest.
    pub fn digest(&self) -> Digest {
        self.header.body_digest
    }

    /// Whether the snapshot has passed its expiry at `now` (Unix seconds). An expired snapshot is
    /// still enforced; the agent reports itself stale.
    pub fn is_expired(&self, now: i64) -> bool {
        self.header.expires_at.is_some_and(|at| now > at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::SourceFile;
    use crate::signing::{KeyCertificate, SigningKey};

    struct Fixture {
        trust: TrustStore,
        signer: SigningKey,
        body: Body,
        header: SnapshotHeader,
    }

    fn fixture() -> Fixture {
        let root = SigningKey::from_seed([1; 32]);
        let signer = SigningKey::from_seed([2; 32]);
        let mut trust = TrustStore::new(root.public_key());
        trust
            .add_certificate(&root.certify(&KeyCertificate {
                signing_key: signer.public_key(),
                not_before: 1_000,
                not_after: 2_000,
            }))
            .unwrap();
        let body = Body::render(&[SourceFile {
            path: "a.yaml",
            text: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata: {k: v}\n",
        }])
        .unwrap();
        let header = SnapshotHeader {
            bundle: "pos".to_owned(),
            generation: 5,
            git_commit: "c0ffee".to_owned(),
            git_ref: "refs/tags/v1".to_owned(),
            body_digest: body.digest(),
            body_size: body.as_bytes().len() as u64,
            object_count: body.object_count(),
            created_at: 1_500,
            expires_at: Some(1_600),
            selector: String::new(),
            key_id: signer.key_id(),
        };
        Fixture {
            trust,
            signer,
            body,
            header,
        }
    }

    fn expect(bundle: &str) -> Expectation<'_> {
        Expectation {
            bundle,
            assigned_digest: None,
            installed: None,
        }
    }

    fn check(
        fixture: &Fixture,
        header: SnapshotHeader,
        body: Vec<u8>,
        expectation: Expectation<'_>,
    ) -> Result<VerifiedSnapshot, VerifyError> {
        let (bytes, signature) = header.sign(&fixture.signer).unwrap();
        verify_snapshot(&fixture.trust, &bytes, &signature.0, body, &expectation)
    }

    #[test]
    fn a_good_snapshot_verifies() {
        let f = fixture();
        let verified = check(
            &f,
            f.header.clone(),
            f.body.as_bytes().to_vec(),
            expect("pos"),
        )
        .unwrap();
        assert_eq!(verified.digest(), f.body.digest());
        assert_eq!(verified.body(), &f.body);
        assert!(!verified.is_expired(1_600));
        assert!(verified.is_expired(1_601));
    }

    /// A snapshot replayed after its expiry is refused for an install; one in date, or without
    /// expiry, is not.
    #[test]
    fn an_expired_snapshot_is_not_fresh_enough_to_install() {
        let f = fixture();
        let (bytes, signature) = f.header.clone().sign(&f.signer).unwrap();
        let header = verify_header(&f.trust, &bytes, &signature.0, &expect("pos")).unwrap();
        assert!(header.check_fresh(1_600).is_ok());
        assert_eq!(
            header.check_fresh(1_601).unwrap_err(),
            VerifyError::ExpiredBeforeInstall {
                expires_at: 1_600,
                now: 1_601
            }
        );
        let mut forever = f.header.clone();
        forever.expires_at = None;
        let (bytes, signature) = forever.sign(&f.signer).unwrap();
        let header = verify_header(&f.trust, &bytes, &signature.0, &expect("pos")).unwrap();
        assert!(header.check_fresh(i64::MAX).is_ok());
    }

    #[test]
    fn flipped_signature_bit_is_refused() {
        let f = fixture();
        let (bytes, mut signature) = f.header.clone().sign(&f.signer).unwrap();
        for bit in [0, 100, 511] {
            signature.0[bit / 8] ^= 1 << (bit % 8);
            let result = verify_header(&f.trust, &bytes, &signature.0, &expect("pos"));
            assert!(
                matches!(result, Err(VerifyError::BadSignature(_))),
                "bit {bit}: {result:?}"
            );
            signature.0[bit / 8] ^= 1 << (bit % 8);
        }
        assert!(matches!(
            verify_header(&f.trust, &bytes, &signature.0[..63], &expect("pos")),
            Err(VerifyError::Trust(TrustError::SignatureLength(63)))
        ));
    }

    #[test]
    fn unknown_key_is_refused() {
        let f = fixture();
        let stranger = SigningKey::from_seed([3; 32]);
        let (bytes, signature) = f.header.clone().sign(&stranger).unwrap();
        assert_eq!(
            verify_header(&f.trust, &bytes, &signature.0, &expect("pos")).unwrap_err(),
            VerifyError::UnknownKey(stranger.key_id())
        );
    }

    #[test]
    fn revoked_key_is_refused() {
        let mut f = fixture();
        f.trust.revoke(&f.signer.key_id());
        assert!(matches!(
            check(
                &f,
                f.header.clone(),
                f.body.as_bytes().to_vec(),
                expect("pos")
            ),
            Err(VerifyError::RevokedKey(_))
        ));
        // A snapshot held from before the revocation still passes an integrity check.
        let (bytes, signature) = f.header.clone().sign(&f.signer).unwrap();
        assert!(
            verify_snapshot(
                &f.trust.ignoring_revocations(),
                &bytes,
                &signature.0,
                f.body.as_bytes().to_vec(),
                &expect("pos")
            )
            .is_ok()
        );
    }

    #[test]
    fn key_used_outside_its_window_is_refused() {
        let f = fixture();
        let header = SnapshotHeader {
            created_at: 2_001,
            ..f.header.clone()
        };
        assert!(matches!(
            check(&f, header, f.body.as_bytes().to_vec(), expect("pos")),
            Err(VerifyError::KeyNotValid { .. })
        ));
    }

    #[test]
    fn changed_body_is_refused() {
        let f = fixture();
        let mut body = f.body.as_bytes().to_vec();
        let at = body.len() - 3;
        body[at] ^= 0x20;
        assert!(matches!(
            check(&f, f.header.clone(), body, expect("pos")),
            Err(VerifyError::BodyDigest { .. })
        ));
        let mut longer = f.body.as_bytes().to_vec();
        longer.push(b'\n');
        assert!(matches!(
            check(&f, f.header.clone(), longer, expect("pos")),
            Err(VerifyError::BodySize { .. })
        ));
    }

    #[test]
    fn changed_header_byte_breaks_the_signature() {
        let f = fixture();
        let (mut bytes, signature) = f.header.clone().sign(&f.signer).unwrap();
        // The generation's last byte: still decodes, no longer verifies.
        let at = 4 + 2 + 2 + 3 + 7;
        bytes[at] ^= 1;
        assert!(matches!(
            verify_header(&f.trust, &bytes, &signature.0, &expect("pos")),
            Err(VerifyError::BadSignature(_))
        ));
    }

    #[test]
    fn header_of_another_bundle_is_refused() {
        let f = fixture();
        assert_eq!(
            check(
                &f,
                f.header.clone(),
                f.body.as_bytes().to_vec(),
                expect("kiosk")
            )
            .unwrap_err(),
            VerifyError::WrongBundle {
                expected: "kiosk".to_owned(),
                got: "pos".to_owned()
            }
        );
    }

    #[test]
    fn lower_generation_and_equivocation_are_refused() {
        let f = fixture();
        let installed = |generation, digest| Expectation {
            installed: Some(Installed { generation, digest }),
            ..expect("pos")
        };
        let body = || f.body.as_bytes().to_vec();
        assert_eq!(
            check(&f, f.header.clone(), body(), installed(6, Digest::of(b"x"))).unwrap_err(),
            VerifyError::Rollback {
                installed: 6,
                offered: 5
            }
        );
        assert!(matches!(
            check(&f, f.header.clone(), body(), installed(5, Digest::of(b"x"))),
            Err(VerifyError::Equivocation { .. })
        ));
        // The same snapshot again (a re-check from the cache) is fine.
        assert!(check(&f, f.header.clone(), body(), installed(5, f.body.digest())).is_ok());
        assert!(check(&f, f.header.clone(), body(), installed(4, Digest::of(b"x"))).is_ok());
    }

    #[test]
    fn replayed_header_that_is_not_the_assignment_is_refused() {
        let f = fixture();
        let expectation = Expectation {
            assigned_digest: Some(Digest::of(b"the new one")),
            ..expect("pos")
        };
        assert!(matches!(
            check(
                &f,
                f.header.clone(),
                f.body.as_bytes().to_vec(),
                expectation
            ),
            Err(VerifyError::NotAssigned { .. })
        ));
    }

    #[test]
    fn payloads_are_checked_before_and_after_decompression() {
        let f = fixture();
        let (bytes, signature) = f.header.clone().sign(&f.signer).unwrap();
        let verified = || verify_header(&f.trust, &bytes, &signature.0, &expect("pos")).unwrap();
        let payload = compress::compress_whole(f.body.as_bytes(), 3).unwrap();
        let snapshot = verified()
            .accept_payload(&payload, Digest::of(&payload), None)
            .unwrap();
        assert_eq!(snapshot.body(), &f.body);
        // Truncated in transit: the announced payload digest catches it.
        let cut = &payload[..payload.len() - 1];
        assert!(matches!(
            verified().accept_payload(cut, Digest::of(&payload), None),
            Err(ReceiveError::PayloadDigest { .. })
        ));
        // A payload that inflates past the signed size (a bomb), even with a matching digest.
        let bomb = compress::compress_whole(&vec![b'\n'; 50_000_000], 3).unwrap();
        assert!(matches!(
            verified().accept_payload(&bomb, Digest::of(&bomb), None),
            Err(ReceiveError::Decompress(_))
        ));
        // A delta against the wrong reference body rebuilds garbage: the body digest refuses it.
        let other = Body::render(&[SourceFile {
            path: "b.yaml",
            text: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\ndata: {other: value}\n",
        }])
        .unwrap();
        let delta = compress::compress_delta(other.as_bytes(), f.body.as_bytes(), 19).unwrap();
        assert!(
            verified()
                .accept_payload(&delta, Digest::of(&delta), Some(&other))
                .is_ok()
        );
        assert!(
            verified()
                .accept_payload(&delta, Digest::of(&delta), Some(&f.body))
                .is_err()
        );
    }

    #[test]
    fn object_count_must_match() {
        let f = fixture();
        let header = SnapshotHeader {
            object_count: 2,
            ..f.header.clone()
        };
        assert!(matches!(
            check(&f, header, f.body.as_bytes().to_vec(), expect("pos")),
            Err(VerifyError::ObjectCount { .. })
        ));
    }
}
