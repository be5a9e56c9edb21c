//! Outpost's shared language: everything the hub and the agents must agree on, and nothing else.
//!
//! - [`manifest`]: Kubernetes YAML in, objects out.
//! - [`body`]: the canonical snapshot body (objects in apply order, canonical JSON lines).
//! - [`header`]: the signed snapshot header and its canonical encoding.
//! - [`signing`]: ed25519 keys, key ids, root-certified signing keys, the trust store.
//! - [`selector`]: Kubernetes label selectors over agent labels, with a canonical text form.
//! - [`verify`]: the only way to obtain a [`VerifiedSnapshot`].
//! - [`compress`]: zstd whole and delta (patch-from) payloads with bounded decompression.
//! - [`wire`]: protocol messages and framing.
//! - [`time`]: Unix seconds as RFC 3339 dates and ages, for people.
//! - `transport` (feature `transport`): TLS with raw ed25519 keys and QUIC tuning, shared by hub
//!   and agents.
//!
//! Architecture invariant: this crate does no I/O. No files, sockets, clocks or randomness: time
//! and key seeds come in as arguments. That keeps it deterministic, testable and usable from the
//! hub, the agent and the simulations alike.

pub mod assignment;
mod codec;

pub mod body;
pub mod compress;
pub mod digest;
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
#[cfg(feature = "logging")]
pub mod logging;
pub mod manifest;
pub mod selector;
pub mod signing;
pub mod time;
#[cfg(feature = "transport")]
pub mod transport;
pub mod verify;
pub mod wire;

pub use body::Body;
pub use codec::DecodeError;
pub use digest::Digest;
pub use header::SnapshotHeader;
pub use manifest::{Object, ObjectKey, SourceFile};
pub use selector::LabelSelector;
pub use signing::{
    KeyCertificate, KeyId, PublicKey, Revocations, Signature, SignedKeyCertificate,
    SignedRevocations, SigningKey, TrustStore,
};
pub use verify::{
    Expectation, Installed, ReceiveError, VerifiedHeader, VerifiedSnapshot, VerifyError,
};
