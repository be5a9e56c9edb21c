//! Signed assignments: what a device must run is chosen by the hub and signed with its
//! root-certified signing key, like the snapshots themselves — not merely sent over a channel
//! the transport key authenticates. The signature covers the agent it is for, a per-agent
//! sequence that only grows, an expiry, and every (bundle, generation, digest). An agent refuses
//! an assignment that is unsigned, signed by a key its trust store does not hold (or holds
//! revoked), for another agent, or expired; one not newer than the last it accepted changes
//! nothing. So a party holding only the hub's QUIC key cannot roll a device back to an older
//! snapshot it still caches, empty it, or pin its sequence (docs/security.md).

use crate::codec::Writer;
use crate::signing::{KeyId, Signature, SigningKey, TrustStore};
use crate::wire::Assign;

/// Domain separation for assignment signatures.
const ASSIGNMENT_CONTEXT: &[u8] = b"outpost/assignment/v1\0";

/// How long a signed assignment may be taken after it is signed: a captured one cannot be
/// replayed later than this. The hub signs every `Assign` as it sends it.
pub const ASSIGNMENT_LIFETIME: i64 = 7 * 24 * 3600;

/// Why an assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    /// No signature at all.
    #[error(
        "the assignment is not signed; only the hub's certified signing key may choose what this device runs"
    )]
    Unsigned,
    /// Signed by a key the trust store does not know.
    #[error(
        "the assignment is signed by {0}, a key no certificate of this device's root vouches for"
    )]
    UnknownKey(KeyId),
    /// Signed by a revoked key.
    #[error("the assignment is signed by {0}, which the root revoked")]
    RevokedKey(KeyId),
    /// The signature does not verify.
    #[error("the assignment's signature by {0} does not verify")]
    BadSignature(KeyId),
    /// For another agent.
    #[error("the assignment is for agent {got:?}, and this device is {expected:?}")]
    OtherAgent {
        /// This agent.
        expected: String,
        /// The one named.
        got: String,
    },
    /// Past its expiry.
    #[error(
        "the assignment expired at {expires_at} (unix time; it is {now} here): a replayed old assignment is not taken"
    )]
    Expired {
        /// Its expiry.
        expires_at: i64,
        /// The time here.
        now: i64,
    },
    /// A string too long to encode.
    #[error("the assignment names a string longer than 65535 bytes")]
    TooLong,
}

/// The bytes an assignment's signature covers: the agent, sequence, expiry, key and every
/// entry, in order.
pub fn signed_bytes(assign: &Assign) -> Result<Vec<u8>, AssignError> {
    let mut writer = Writer::default();
    let string = |writer: &mut Writer, text: &str| -> Result<(), AssignError> {
        if text.len() > usize::from(u16::MAX) {
            return Err(AssignError::TooLong);
        }
        writer.str(text);
        Ok(())
    };
    writer.u8(1);
    string(&mut writer, &assign.agent)?;
    writer.u64(assign.sequence);
    writer.i64(assign.expires_at);
    writer.raw(&assign.key_id);
    writer.u64(assign.assignments.len() as u64);
    for entry in &assign.assignments {
        string(&mut writer, &entry.bundle)?;
        writer.u64(entry.generation);
        writer.raw(&entry.digest.0);
    }
    Ok(writer.bytes)
}

/// Signs `assign` with `key` (setting its key id and signature).
pub fn sign(assign: &mut Assign, key: &SigningKey) -> Result<(), AssignError> {
    assign.key_id = key.key_id().0;
    let bytes = signed_bytes(assign)?;
    assign.signature = key.sign_with_context(ASSIGNMENT_CONTEXT, &bytes).0.to_vec();
    Ok(())
}

/// Checks that `assign` is for `agent`, in date at `now`, and signed by a signing key `trust`
/// holds certified and not revoked.
pub fn verify(
    trust: &TrustStore,
    assign: &Assign,
    agent: &str,
    now: i64,
) -> Result<(), AssignError> {
    let signature: [u8; 64] = match assign.signature.as_slice().try_into() {
        Ok(signature) => signature,
        Err(_) => return Err(AssignError::Unsigned),
    };
    let key_id = KeyId(assign.key_id);
    let certificate = trust
        .signing_key(&key_id)
        .ok_or(AssignError::UnknownKey(key_id))?;
    let bytes = signed_bytes(assign)?;
    if !certificate.signing_key.verify_with_context(
        ASSIGNMENT_CONTEXT,
        &bytes,
        &Signature(signature),
    ) {
        return Err(AssignError::BadSignature(key_id));
    }
    if trust.is_revoked(&key_id) {
        return Err(AssignError::RevokedKey(key_id));
    }
    if assign.agent != agent {
        return Err(AssignError::OtherAgent {
            expected: agent.to_owned(),
            got: assign.agent.clone(),
        });
    }
    if assign.expires_at < now {
        return Err(AssignError::Expired {
            expires_at: assign.expires_at,
            now,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Digest;
    use crate::signing::KeyCertificate;
    use crate::wire::Assignment;

    fn setup() -> (TrustStore, SigningKey, Assign) {
        let root = SigningKey::from_seed([1; 32]);
        let signer = SigningKey::from_seed([2; 32]);
        let mut trust = TrustStore::new(root.public_key());
        trust
            .add_certificate(&root.certify(&KeyCertificate {
                signing_key: signer.public_key(),
                not_before: 0,
                not_after: i64::MAX,
            }))
            .unwrap();
        let mut assign = Assign {
            sequence: 7,
            assignments: vec![Assignment {
                bundle: "shop".to_owned(),
                generation: 2,
                digest: Digest([3; 32]),
            }],
            agent: "a-1".to_owned(),
            expires_at: 1_000,
            key_id: [0; 32],
            signature: Vec::new(),
        };
        sign(&mut assign, &signer).unwrap();
        (trust, signer, assign)
    }

    #[test]
    fn a_signed_assignment_verifies_for_its_agent_in_date() {
        let (trust, _, assign) = setup();
        assert_eq!(verify(&trust, &assign, "a-1", 1_000), Ok(()));
    }

    #[test]
    fn unsigned_forged_changed_foreign_and_expired_assignments_are_refused() {
        let (trust, _, assign) = setup();
        let mut unsigned = assign.clone();
        unsigned.signature.clear();
        assert_eq!(
            verify(&trust, &unsigned, "a-1", 0),
            Err(AssignError::Unsigned)
        );
        // Any field changed after signing: the generation (a rollback), the list (emptied),
        // the sequence (jammed), the agent.
        let mut rollback = assign.clone();
        rollback.assignments[0].generation = 1;
        let mut emptied = assign.clone();
        emptied.assignments.clear();
        let mut jammed = assign.clone();
        jammed.sequence = crate::wire::MAX_COUNTER;
        let mut moved = assign.clone();
        moved.agent = "a-2".to_owned();
        for changed in [rollback, emptied, jammed, moved] {
            assert!(matches!(
                verify(&trust, &changed, "a-1", 0),
                Err(AssignError::BadSignature(_))
            ));
        }
        // Signed by a key the root never certified (say, one made with the QUIC key's seed).
        let mut foreign = assign.clone();
        sign(&mut foreign, &SigningKey::from_seed([9; 32])).unwrap();
        assert!(matches!(
            verify(&trust, &foreign, "a-1", 0),
            Err(AssignError::UnknownKey(_))
        ));
        // Genuine, but for another agent, or too late.
        assert!(matches!(
            verify(&trust, &assign, "a-2", 0),
            Err(AssignError::OtherAgent { .. })
        ));
        assert_eq!(
            verify(&trust, &assign, "a-1", 1_001),
            Err(AssignError::Expired {
                expires_at: 1_000,
                now: 1_001
            })
        );
        let mut revoked = trust.clone();
        revoked.revoke(&KeyId(assign.key_id));
        assert!(matches!(
            verify(&revoked, &assign, "a-1", 0),
            Err(AssignError::RevokedKey(_))
        ));
    }
}
