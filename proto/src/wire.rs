//! Wire messages between agents and the hub, and their length-delimited framing.
//!
//! A frame is a u32 big-endian length, then a u16 big-endian protocol version, then the message
//! encoded with postcard (a stable, compact serde format: varint integers, length-prefixed bytes).
//! The length counts the version and the message. Frames longer than [`MAX_FRAME_SIZE`] are refused
//! from their length prefix, before any buffering. Snapshot bodies travel in [`TransferChunk`]s.
//!
//! Conversation (see DESIGN.md "Data flow"):
//! agent `Hello` → hub `Assign`; agent `Fetch` → hub `TransferStart` + `TransferChunk`s;
//! agent `StatusReport` or `Drift` → hub `Ack`; either side may send `Error`.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

/// The protocol version this build speaks. Part of every frame and of the ALPN string.
/// Version 2 added the root-signed key revocation list to [`Trust`] and [`ErrorCode::Busy`];
/// version 3 added [`Message::Drift`].
pub const PROTOCOL_VERSION: u16 = 4;
/// The QUIC/TLS ALPN protocol id; it names the protocol version, so mismatched builds fail the
/// handshake with a clear ALPN error instead of misreading frames.
pub const ALPN: &[u8] = b"outpost/4";
/// The largest frame (length prefix excluded) either side sends or accepts.
pub const MAX_FRAME_SIZE: usize = 1 << 20;
/// The largest payload slice in one [`TransferChunk`], leaving room for the envelope.
pub const MAX_CHUNK_SIZE: usize = 256 << 10;

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Agent → hub, first on every connection.
    Hello(Hello),
    /// Hub → agent: what to run. Sent after `Hello` and whenever it changes.
    Assign(Assign),
    /// Agent → hub: send me this snapshot.
    Fetch(Fetch),
    /// Hub → agent: the signed header and what the payload will be.
    TransferStart(TransferStart),
    /// Hub → agent: a slice of the payload.
    TransferChunk(TransferChunk),
    /// Agent → hub: status of bundles, from the agent's outbox.
    StatusReport(StatusReport),
    /// Hub → agent: status reports up to `sequence` are stored; delete them from the outbox.
    Ack(Ack),
    /// Either way: a request failed.
    Error(ErrorMessage),
    /// Agent → hub, first on the first connection of a new key: a single-use enrolment token.
    Enrol(Enrol),
    /// Hub → agent: the key is enrolled as this agent.
    Enrolled(Enrolled),
    /// Hub → agent, after `Hello`: the root-certified snapshot signing keys in use.
    Trust(Trust),
    /// Agent → hub: drift found on the cluster (or gone), from the agent's outbox; acknowledged
    /// by [`Ack`] like a `StatusReport` (one sequence for both).
    Drift(DriftReport),
}

/// The largest sequence or generation anywhere: 2^63 − 1. Every counter is a `u64` on the wire
/// and in the agent and a signed 64-bit integer in both hub stores, so one value range holds
/// end to end; a frame naming a larger one is refused when it is decoded
/// ([`WireError::CounterOutOfRange`]), before anything reads it.
pub const MAX_COUNTER: u64 = i64::MAX as u64;

/// The most one agent's assignment sequence may move past what the hub last issued it on the
/// strength of the agent's word alone (a hub restored from a backup catching up): a claim
/// beyond is refused, so no claim can jam an agent's sequence near [`MAX_COUNTER`].
pub const MAX_SEQUENCE_STEP: u64 = 1 << 20;

/// The most objects one [`BundleDrift`] lists; more are counted in `more_objects`.
pub const MAX_DRIFT_OBJECTS: usize = 40;
/// The most fields one [`ObjectDrift`] lists; more are counted in `more_fields`.
pub const MAX_DRIFT_FIELDS: usize = 16;
/// The longest value text in a [`FieldDrift`] (longer ones are cut, ending in `…`).
pub const MAX_DRIFT_VALUE: usize = 200;

/// Drift reports from the agent's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    /// The report's outbox sequence (shared with status reports); acknowledged by [`Ack`].
    pub sequence: u64,
    /// One entry per bundle.
    pub bundles: Vec<BundleDrift>,
}

/// What the agent found different between the desired and the live objects of one bundle, at
/// one drift pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleDrift {
    /// Bundle name.
    pub bundle: String,
    /// Snapshot being enforced.
    pub digest: Digest,
    /// Its generation.
    pub generation: u64,
    /// What the agent did about it.
    pub action: DriftAction,
    /// The objects that differ. Empty with [`DriftAction::Left`]: the drift reported before
    /// is gone (the cluster or Git changed).
    pub objects: Vec<ObjectDrift>,
    /// Objects that differ beyond [`MAX_DRIFT_OBJECTS`].
    pub more_objects: u32,
    /// When this was observed (agent clock, Unix seconds).
    pub observed_at: i64,
}

/// What the agent did about drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DriftAction {
    /// Applied the desired state again (`drift: correct`, the default).
    Corrected,
    /// Left the live change in place and reports it until Git or the cluster changes
    /// (`drift: report`).
    Left,
}

/// One object that differs from its desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectDrift {
    /// `apps/v1`.
    pub api_version: String,
    /// `Deployment`.
    pub kind: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The object was deleted from the cluster.
    pub deleted: bool,
    /// The fields that differ (none when deleted).
    pub fields: Vec<FieldDrift>,
    /// Fields that differ beyond [`MAX_DRIFT_FIELDS`].
    pub more_fields: u32,
}

/// One field that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDrift {
    /// The field, as `spec.replicas`, `data.color`, `spec.template.spec.containers[name=web].image`.
    pub path: String,
    /// The desired value as JSON text (`None`: the desired state does not have it); Secret
    /// values are `"<redacted>"`.
    pub desired: Option<String>,
    /// The live value as JSON text (`None`: the live object lacks it).
    pub live: Option<String>,
    /// The field manager that owns the live value (from `managedFields`), if any does.
    pub manager: Option<String>,
    /// When that manager last changed the object (its `managedFields` time, RFC 3339).
    pub changed_at: Option<String>,
}

/// Enrol the connection's key (from the TLS client identity) with a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrol {
    /// The token the operator created (`outpost-hub tokens create`).
    pub token: String,
    /// The agent's build version.
    pub agent_version: String,
}

/// The outcome of a successful [`Enrol`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The agent's id on the hub.
    pub agent_id: String,
}

/// Signing-key certificates, each signed by the root key the agent pins, and the root's list of
/// revoked signing keys. Sent after `Hello`, and again whenever the hub's keys change, always
/// before any `Assign` naming a snapshot signed by a new key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// Encoded `SignedKeyCertificate`s.
    pub certificates: Vec<Vec<u8>>,
    /// The encoded `SignedRevocations`, if the root has revoked any key.
    pub revocations: Option<Vec<u8>>,
}

/// The agent introduces itself (its identity comes from the TLS client certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's build version, for the fleet page.
    pub agent_version: String,
    /// The highest assignment sequence the agent has accepted (replay protection).
    pub assignment_sequence: u64,
    /// Snapshots the agent holds, verified, usable as delta bases.
    pub have: Vec<HeldSnapshot>,
    /// Evidence for the newest held snapshot of each bundle: its signed header, as the hub
    /// sent it. A hub restored from a backup moves its generation counters past what an agent
    /// holds only on this evidence, never on the agent's word.
    pub proofs: Vec<HeldProof>,
}

/// A signed snapshot header an agent holds, sent back as evidence of what a hub issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldProof {
    /// Signed header bytes.
    pub header: Vec<u8>,
    /// Signature over them (64 bytes).
    pub signature: Vec<u8>,
}

/// A snapshot the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSnapshot {
    /// Bundle name.
    pub bundle: String,
    /// Generation.
    pub generation: u64,
    /// Body digest.
    pub digest: Digest,
}

/// The hub's wishes for one agent, complete (bundles not listed are unassigned).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Assign {
    /// Grows with every change of this agent's assignments; an agent ignores an `Assign` whose
    /// sequence is not above the last one it accepted, so a replayed old message changes nothing.
    pub sequence: u64,
    /// One entry per bundle.
    pub assignments: Vec<Assignment>,
    /// The agent it is for (its id on the hub).
    pub agent: String,
    /// Unix seconds after which it is refused (see [`crate::assignment`]).
    pub expires_at: i64,
    /// The id of the signing key that signed it.
    pub key_id: [u8; 32],
    /// Its signature ([`crate::assignment::sign`]); empty: unsigned, refused.
    pub signature: Vec<u8>,
}

/// Run `digest` (of `generation`) for `bundle`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Bundle name.
    pub bundle: String,
    /// Generation of the assigned snapshot.
    pub generation: u64,
    /// Body digest of the assigned snapshot.
    pub digest: Digest,
}

/// Ask for a snapshot's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fetch {
    /// Body digest wanted.
    pub snapshot: Digest,
    /// Bodies the agent holds that the hub may use as delta reference, best first.
    pub have: Vec<Digest>,
    /// Continue a broken transfer instead of starting again.
    pub resume: Option<Resume>,
}

/// Where a broken transfer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// Digest of the payload bytes being received (names exactly one encoding).
    pub payload_digest: Digest,
    /// Bytes of it already held.
    pub offset: u64,
}

/// How a payload encodes the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadEncoding {
    /// zstd of the whole body.
    Whole,
    /// zstd patch-from against the body with digest `base`.
    Delta {
        /// The reference body's digest.
        base: Digest,
    },
}

/// The start (or resumption) of a payload transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStart {
    /// Body digest of the snapshot.
    pub snapshot: Digest,
    /// Signed header bytes.
    pub header: Vec<u8>,
    /// Signature over them (64 bytes).
    pub signature: Vec<u8>,
    /// How the payload encodes the body.
    pub encoding: PayloadEncoding,
    /// Total payload length.
    pub payload_size: u64,
    /// SHA-256 of the whole payload.
    pub payload_digest: Digest,
    /// Offset of the first chunk that follows (non-zero when resuming).
    pub offset: u64,
}

/// A slice of a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferChunk {
    /// Which payload.
    pub payload_digest: Digest,
    /// Where this slice starts.
    pub offset: u64,
    /// The bytes (at most [`MAX_CHUNK_SIZE`]).
    #[serde(with = "serde_bytes_compat")]
    pub bytes: Vec<u8>,
}

/// Status reports from the agent's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The report batch's outbox sequence; acknowledged by [`Ack`].
    pub sequence: u64,
    /// One entry per bundle and moment.
    pub bundles: Vec<BundleStatus>,
}

/// The state of one bundle on one agent at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleStatus {
    /// Bundle name.
    pub bundle: String,
    /// Snapshot being enforced.
    pub digest: Digest,
    /// Its generation.
    pub generation: u64,
    /// Where reconciliation stands.
    pub phase: Phase,
    /// Objects in the snapshot.
    pub objects_total: u64,
    /// Objects applied and healthy.
    pub objects_ready: u64,
    /// Human-readable detail (first failing object, error text).
    pub message: String,
    /// When this was observed (agent clock, Unix seconds).
    pub observed_at: i64,
    /// The snapshot has expired: still enforced, but stale.
    pub stale: bool,
}

/// Reconciliation phase of a bundle on an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Applying objects.
    Applying,
    /// All objects applied and healthy.
    Healthy,
    /// Applied, but some objects are not healthy.
    Degraded,
    /// Could not apply.
    Failed,
}

/// Status reports up to and including `sequence` are stored by the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Highest stored sequence.
    pub sequence: u64,
}

/// A refused request, with a code to act on and text for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What went wrong.
    pub code: ErrorCode,
    /// Details for logs.
    pub message: String,
    /// With [`ErrorCode::Busy`]: seconds to wait before trying again.
    pub retry_after: Option<u32>,
}

/// Machine-readable error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer's key is not enrolled.
    UnknownAgent,
    /// The agent was revoked.
    Revoked,
    /// The snapshot is not assigned to this agent.
    NotAssigned,
    /// The resume point does not match a payload the hub can produce.
    BadResume,
    /// A frame or message was malformed.
    Malformed,
    /// The hub failed internally; retry later.
    Internal,
    /// An enrolment token was refused (unknown, used, expired).
    BadToken,
    /// The hub does not hold the requested snapshot (any more).
    UnknownSnapshot,
    /// The hub is overloaded: reconnect after the number of seconds the message's
    /// `retry_after` gives, never sooner.
    Busy,
}

/// A frame that cannot be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_SIZE}")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
    },
    /// A frame is too short to hold a version.
    #[error("frame of {0} bytes is too short for a protocol version")]
    FrameTooShort(usize),
    /// The peer speaks another protocol version.
    #[error(
        "peer speaks protocol version {got}, this build speaks {PROTOCOL_VERSION}; upgrade the older side"
    )]
    UnsupportedVersion {
        /// The peer's version.
        got: u16,
    },
    /// The message bytes do not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes were left after the message.
    #[error("{0} unexpected bytes after the message in a frame")]
    TrailingBytes(usize),
    /// A sequence or generation above [`MAX_COUNTER`].
    #[error("{field} {value} is above the largest counter, {MAX_COUNTER}")]
    CounterOutOfRange {
        /// Which counter.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

impl Message {
    /// Refuses a message naming a sequence or generation above [`MAX_COUNTER`].
    pub fn check_counters(&self) -> Result<(), WireError> {
        let check = |field: &'static str, value: u64| match value > MAX_COUNTER {
            true => Err(WireError::CounterOutOfRange { field, value }),
            false => Ok(()),
        };
        match self {
            Message::Hello(hello) => {
                check("assignment sequence", hello.assignment_sequence)?;
                for held in &hello.have {
                    check("held generation", held.generation)?;
                }
            }
            Message::Assign(assign) => {
                check("assignment sequence", assign.sequence)?;
                for assignment in &assign.assignments {
                    check("assigned generation", assignment.generation)?;
                }
            }
            Message::StatusReport(report) => {
                check("report sequence", report.sequence)?;
                for status in &report.bundles {
                    check("reported generation", status.generation)?;
                }
            }
            Message::Drift(report) => {
                check("report sequence", report.sequence)?;
                for bundle in &report.bundles {
                    check("drift generation", bundle.generation)?;
                }
            }
            Message::Ack(ack) => check("acknowledged sequence", ack.sequence)?,
            Message::Fetch(_)
            | Message::TransferStart(_)
            | Message::TransferChunk(_)
            | Message::Error(_)
            | Message::Enrol(_)
            | Message::Enrolled(_)
            | Message::Trust(_) => {}
        }
        Ok(())
    }
}

/// Encodes `message` as one frame, length prefix included.
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, WireError> {
    let mut frame = vec![0u8; 4];
    frame.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    let mut frame = postcard::to_extend(message, frame)
        .map_err(|error| WireError::Malformed(error.to_string()))?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_SIZE {
        return Err(WireError::FrameTooLarge { len });
    }
    frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(frame)
}

/// Decodes one frame's content (version + message, without the length prefix).
pub fn decode_frame(content: &[u8]) -> Result<Message, WireError> {
    if content.len() > MAX_FRAME_SIZE {
        return Err(WireError::FrameTooLarge { len: content.len() });
    }
    let Some((version, message)) = content.split_first_chunk::<2>() else {
        return Err(WireError::FrameTooShort(content.len()));
    };
    let version = u16::from_be_bytes(*version);
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { got: version });
    }
    let (message, rest) = postcard::take_from_bytes::<Message>(message)
        .map_err(|error| WireError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    message.check_counters()?;
    Ok(message)
}

/// Splits a byte stream into frames. Feed it what arrives; take frames out as they complete.
/// Holds at most one frame's bytes beyond what was fed and not yet taken.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The length the next frame announces, once its prefix has arrived. Lets a reader refuse an
    /// oversized frame before reading it.
    pub fn announced_len(&self) -> Option<usize> {
        let prefix = self.buffer.first_chunk::<4>()?;
        Some(u32::from_be_bytes(*prefix) as usize)
    }

    /// The next complete message, if one has arrived. After an error the stream is unusable:
    /// close the connection.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        let Some(len) = self.announced_len() else {
            return Ok(None);
        };
        if len > MAX_FRAME_SIZE {
            return Err(WireError::FrameTooLarge { len });
        }
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let message = decode_frame(&self.buffer[4..4 + len]);
        self.buffer.drain(..4 + len);
        // An idle stream keeps no large buffer from its biggest frame.
        if self.buffer.is_empty() && self.buffer.capacity() > 4096 {
            self.buffer = Vec::new();
        }
        message.map(Some)
    }

    /// Bytes received but not yet part of a complete frame.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }
}

/// Serialises `Vec<u8>` as one byte string (postcard: varint length + bytes) rather than a
/// sequence of separately tagged integers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }
            fn visit_borrowed_bytes<E: de::Error>(self, bytes: &'de [u8]) -> Result<Vec<u8>, E> {
                Ok(bytes.to_vec())
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            agent_version: "0.1.0".to_owned(),
            assignment_sequence: 300,
            have: vec![HeldSnapshot {
                bundle: "pos".to_owned(),
                generation: 7,
                digest: Digest([0x11; 32]),
            }],
            proofs: vec![HeldProof {
                header: vec![0xaa, 0xbb],
                signature: vec![0xcc],
            }],
        })
    }

    /// Golden: pins the frame bytes of a Hello. A change here is a protocol change: bump
    /// PROTOCOL_VERSION and ALPN.
    #[test]
    fn golden_hello_frame() {
        let frame = encode_frame(&hello()).unwrap();
        assert_eq!(
            hex::encode(&frame),
            concat!(
                "00000037",
                "0004", // length, protocol version
                "00",   // Message::Hello
                "05",
                "302e312e30", // agent_version
                "ac02",       // assignment_sequence 300 (varint)
                "01",
                "03",
                "706f73",
                "07", // one held snapshot: bundle, generation
                "1111111111111111111111111111111111111111111111111111111111111111",
                "01", // one proof: header and signature bytes
                "02aabb",
                "01cc",
            )
        );
        assert_eq!(decode_frame(&frame[4..]).unwrap(), hello());
    }

    proptest::proptest! {
        /// Any sequence decodes exactly when it is at most 2^63 − 1.
        #[test]
        fn a_counter_decodes_exactly_when_it_fits_both_stores(value in proptest::prelude::any::<u64>()) {
            let message = Message::Assign(Assign { sequence: value, ..Assign::default() });
            let frame = encode_frame(&message).unwrap();
            proptest::prop_assert_eq!(decode_frame(&frame[4..]).is_ok(), value <= MAX_COUNTER);
        }
    }

    /// Counters at the edges: up to 2^63 − 1 a frame decodes; 2^63 and 2^64 − 1 are refused
    /// in every message that carries a sequence or a generation.
    #[test]
    fn counters_above_two_to_the_63_are_refused_when_decoded() {
        let frames = |value: u64| -> Vec<(&'static str, Message)> {
            let digest = Digest([1; 32]);
            vec![
                (
                    "hello sequence",
                    Message::Hello(Hello {
                        agent_version: String::new(),
                        assignment_sequence: value,
                        have: vec![],
                        proofs: vec![],
                    }),
                ),
                (
                    "held generation",
                    Message::Hello(Hello {
                        agent_version: String::new(),
                        assignment_sequence: 0,
                        have: vec![HeldSnapshot {
                            bundle: "b".into(),
                            generation: value,
                            digest,
                        }],
                        proofs: vec![],
                    }),
                ),
                (
                    "assign sequence",
                    Message::Assign(Assign {
                        sequence: value,
                        ..Assign::default()
                    }),
                ),
                (
                    "assigned generation",
                    Message::Assign(Assign {
                        sequence: 1,
                        assignments: vec![Assignment {
                            bundle: "b".into(),
                            generation: value,
                            digest,
                        }],
                        ..Assign::default()
                    }),
                ),
                (
                    "status sequence",
                    Message::StatusReport(StatusReport {
                        sequence: value,
                        bundles: vec![],
                    }),
                ),
                (
                    "drift sequence",
                    Message::Drift(DriftReport {
                        sequence: value,
                        bundles: vec![],
                    }),
                ),
                ("ack", Message::Ack(Ack { sequence: value })),
            ]
        };
        for value in [0, 1, MAX_COUNTER - 1, MAX_COUNTER] {
            for (what, message) in frames(value) {
                let frame = encode_frame(&message).unwrap();
                assert_eq!(decode_frame(&frame[4..]), Ok(message), "{what} at {value}");
            }
        }
        for value in [MAX_COUNTER + 1, u64::MAX - 1, u64::MAX] {
            for (what, message) in frames(value) {
                let frame = encode_frame(&message).unwrap();
                assert!(
                    matches!(
                        decode_frame(&frame[4..]),
                        Err(WireError::CounterOutOfRange { value: got, .. }) if got == value
                    ),
                    "{what} at {value}"
                );
            }
        }
    }

    #[test]
    fn golden_chunk_frame_carries_bytes_as_one_string() {
        let chunk = Message::TransferChunk(TransferChunk {
            payload_digest: Digest([0x22; 32]),
            offset: 1,
            bytes: b"abc".to_vec(),
        });
        let frame = encode_frame(&chunk).unwrap();
        assert_eq!(hex::encode(&frame[4..7]), "000404");
        assert_eq!(hex::encode(&frame[frame.len() - 5..]), "0103616263");
        assert_eq!(decode_frame(&frame[4..]).unwrap(), chunk);
    }

    /// Golden: pins a Trust frame with a revocation list (added in protocol version 2).
    #[test]
    fn golden_trust_frame() {
        let trust = Message::Trust(Trust {
            certificates: vec![vec![0xaa, 0xbb]],
            revocations: Some(vec![0xcc]),
        });
        let frame = encode_frame(&trust).unwrap();
        assert_eq!(
            hex::encode(&frame),
            concat!(
                "0000000a", "0004", // length, protocol version
                "0a",   // Message::Trust
                "01", "02", "aabb", // one certificate of two bytes
                "01", "01", "cc", // Some(revocations) of one byte
            )
        );
        assert_eq!(decode_frame(&frame[4..]).unwrap(), trust);
    }

    /// Golden: pins a Drift frame (added in protocol version 3).
    #[test]
    fn golden_drift_frame() {
        let drift = Message::Drift(DriftReport {
            sequence: 5,
            bundles: vec![BundleDrift {
                bundle: "pos".to_owned(),
                digest: Digest([0x33; 32]),
                generation: 2,
                action: DriftAction::Left,
                objects: vec![ObjectDrift {
                    api_version: "v1".to_owned(),
                    kind: "ConfigMap".to_owned(),
                    namespace: String::new(),
                    name: "c".to_owned(),
                    deleted: false,
                    fields: vec![FieldDrift {
                        path: "data.a".to_owned(),
                        desired: Some("\"1\"".to_owned()),
                        live: None,
                        manager: Some("kubectl".to_owned()),
                        changed_at: None,
                    }],
                    more_fields: 0,
                }],
                more_objects: 0,
                observed_at: -1,
            }],
        });
        let frame = encode_frame(&drift).unwrap();
        assert_eq!(
            hex::encode(&frame),
            concat!(
                "00000058",
                "0004", // length, protocol version
                "0b",
                "05", // Message::Drift, sequence
                "01",
                "03",
                "706f73", // one bundle: "pos"
                "3333333333333333333333333333333333333333333333333333333333333333",
                "02",
                "01", // generation, DriftAction::Left
                "01",
                "02",
                "7631",
                "09",
                "436f6e6669674d6170",
                "00",
                "01",
                "63",
                "00", // object
                "01",
                "06",
                "646174612e61",
                "01",
                "03",
                "223122",
                "00", // field: path, desired, live
                "01",
                "07",
                "6b75626563746c",
                "00", // manager, changed_at
                "00",
                "00",
                "01", // more_fields, more_objects, observed_at -1 (zigzag)
            )
        );
        assert_eq!(decode_frame(&frame[4..]).unwrap(), drift);
    }

    #[test]
    fn decoder_reassembles_frames_split_anywhere() {
        let messages = vec![
            hello(),
            Message::Ack(Ack { sequence: 9 }),
            Message::Error(ErrorMessage {
                code: ErrorCode::Revoked,
                message: "agent revoked by ops".to_owned(),
                retry_after: None,
            }),
        ];
        let stream: Vec<u8> = messages
            .iter()
            .flat_map(|message| encode_frame(message).unwrap())
            .collect();
        for step in [1, 2, 3, 7, stream.len()] {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for piece in stream.chunks(step) {
                decoder.push(piece);
                while let Some(message) = decoder.next_message().unwrap() {
                    out.push(message);
                }
            }
            assert_eq!(out, messages, "step {step}");
            assert_eq!(decoder.pending(), 0);
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&((MAX_FRAME_SIZE + 1) as u32).to_be_bytes());
        assert_eq!(
            decoder.next_message(),
            Err(WireError::FrameTooLarge {
                len: MAX_FRAME_SIZE + 1
            })
        );
        let huge = Message::TransferChunk(TransferChunk {
            payload_digest: Digest([0; 32]),
            offset: 0,
            bytes: vec![0; MAX_FRAME_SIZE],
        });
        assert!(matches!(
            encode_frame(&huge),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn other_versions_trailing_bytes_and_garbage_are_refused() {
        let mut frame = encode_frame(&hello()).unwrap();
        frame[5] = 1;
        assert_eq!(
            decode_frame(&frame[4..]),
            Err(WireError::UnsupportedVersion { got: 1 })
        );
        let mut frame = encode_frame(&hello()).unwrap();
        frame.push(0);
        assert_eq!(decode_frame(&frame[4..]), Err(WireError::TrailingBytes(1)));
        assert_eq!(decode_frame(&[0]), Err(WireError::FrameTooShort(1)));
        assert!(matches!(
            decode_frame(&[0, 4, 0xff, 0xff]),
            Err(WireError::Malformed(_))
        ));
    }
}
