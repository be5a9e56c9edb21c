//! Payloads near the format's limit: a delta whose base and body together span about 270 MiB
//! (zstd's decoder refuses windows above 128 MiB by default — `WindowLogMax` 27 — in streaming
//! mode; ours decodes one-shot into a buffer of the announced size), and a whole body of 200
//! MiB. Both round-trip. Level 1 keeps the test to seconds; the window and the long-distance
//! matching are the same at every level.

use outpost_proto::compress::{compress_delta, compress_whole, decompress_delta, decompress_whole};

const MIB: usize = 1 << 20;

/// `mib` MiB of incompressible bytes: any match in them is one the compressor found by
/// reaching back to where they appeared before.
fn bytes(mib: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..mib * MIB / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect()
}

#[test]
fn a_delta_spanning_270_mib_and_a_200_mib_body_round_trip() {
    let base = bytes(135, 7);
    // The new body: the base with edits at its start, middle and end, and 1 MiB more. Every
    // match is 135 MiB back, in the base: beyond zstd's default 128 MiB window.
    let mut body = base.clone();
    body[10] ^= 0xff;
    body[70 * MIB] ^= 0xff;
    let end = body.len() - 1;
    body[end] ^= 0xff;
    body.extend_from_slice(&bytes(1, 99));
    let delta = compress_delta(&base, &body, 1).expect("compress the delta");
    assert!(
        delta.len() < 4 * MIB,
        "a delta of a few edits stays small (the window reached the base): {} bytes",
        delta.len()
    );
    let restored =
        decompress_delta(&base, &delta, body.len() as u64).expect("decode a 270 MiB-window delta");
    assert!(
        restored == body,
        "the delta restores the body byte for byte"
    );
    drop((base, restored));

    let whole_body = bytes(200, 3);
    let whole = compress_whole(&whole_body, 1).expect("compress 200 MiB");
    let restored = decompress_whole(&whole, whole_body.len() as u64).expect("decode 200 MiB");
    assert!(restored == whole_body, "the whole body round-trips");
}
