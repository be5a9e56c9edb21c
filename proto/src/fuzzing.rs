//! Entry points for the fuzz targets (`fuzz/`, cargo-fuzz) and for the stable test that replays
//! their corpora (`proto/tests/fuzz_corpora.rs`): one per decoder that sees bytes from the
//! network or the disk. Each must return, whatever the bytes; where a decode succeeds, what it
//! decoded must encode and decode back to itself.

use crate::body::{Body, parse_lines};
use crate::compress::{decompress_delta, decompress_whole};
use crate::header::SnapshotHeader;
use crate::manifest::{SourceFile, parse_file};
use crate::signing::{KeyCertificate, Revocations, SigningKey, TrustStore};
use crate::verify::{Expectation, verify_snapshot};
use crate::wire::{FrameDecoder, decode_frame, encode_frame};

/// Frames as they arrive: the bytes pushed in small pieces into a decoder, and whole as one
/// frame's content. A decoded message encodes to a frame that decodes to it again.
pub fn frames(data: &[u8]) {
    let mut decoder = FrameDecoder::new();
    for piece in data.chunks(7) {
        decoder.push(piece);
        while let Ok(Some(message)) = decoder.next_message() {
            if let Ok(frame) = encode_frame(&message) {
                let mut again = FrameDecoder::new();
                again.push(&frame);
                assert_eq!(again.next_message().ok().flatten(), Some(message));
            }
        }
    }
    let _ = decode_frame(data);
}

/// A signed snapshot header's canonical encoding.
pub fn header(data: &[u8]) {
    if let Ok(header) = SnapshotHeader::decode(data)
        && let Ok(bytes) = header.encode()
    {
        assert_eq!(SnapshotHeader::decode(&bytes).ok(), Some(header));
    }
}

/// A signing key's certificate and a revocation list, as trust messages and key files carry
/// them.
pub fn key_certificate(data: &[u8]) {
    let _ = KeyCertificate::decode(data);
    let _ = Revocations::decode(data);
}

/// A payload: the first two bytes give the announced body size (at most 64 KiB: large sizes
/// only cost allocation), the rest is the compressed payload, decoded whole and as a delta
/// against [`reference`].
pub fn payload(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let size = u64::from(u16::from_be_bytes([data[0], data[1]]));
    let payload = &data[2..];
    if let Ok(body) = decompress_whole(payload, size) {
        assert_eq!(body.len() as u64, size);
    }
    if let Ok(body) = decompress_delta(&reference(), payload, size) {
        assert_eq!(body.len() as u64, size);
    }
}

/// The body deltas in [`payload`] are decoded against.
pub fn reference() -> Vec<u8> {
    (0..4096u32).map(|i| (i % 251) as u8).collect()
}

/// Manifest YAML (as UTF-8, lossily): parsed, built into a canonical body, whose lines parse.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(objects) = parse_file(SourceFile {
        path: "fuzz.yaml",
        text: &text,
    }) else {
        return;
    };
    if let Ok(body) = Body::from_objects(objects) {
        assert!(parse_lines(body.as_bytes()).all(|line| line.is_ok()));
        assert_eq!(
            crate::body::count_objects(body.as_bytes()),
            body.object_count()
        );
    }
}

/// A stored snapshot row as the agent's state keeps it: a header (its length in the first two
/// bytes), a 64-byte signature, the body. Verified against a fixed root (it never verifies:
/// what is exercised is every check before the signature's and the body's decoding).
pub fn stored_snapshot(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let length = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (header, rest) = rest.split_at(length.min(rest.len()));
    let (signature, body) = rest.split_at(64.min(rest.len()));
    let trust = TrustStore::new(SigningKey::from_seed([7; 32]).public_key());
    let expect = Expectation {
        bundle: "shop",
        assigned_digest: None,
        installed: None,
    };
    let _ = verify_snapshot(&trust, header, signature, body.to_vec(), &expect);
    for line in parse_lines(body) {
        let _ = line;
    }
}
