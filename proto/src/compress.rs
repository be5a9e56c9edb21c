//! zstd for snapshot bodies on the wire: whole, or as a delta against a body the receiver holds.
//!
//! A delta is a single zstd frame compressed with the reference body as a *prefix* (zstd's
//! "patch-from"): long-distance matching on, and a window large enough to reach back over the
//! whole reference. The frame does not name its reference; the wire message carries the reference
//! digest beside it. Frames carry no checksum and no content size: the signed header already binds
//! the body by SHA-256 and size.
//!
//! Decompression never produces more than the size the (verified) header announces: decoding is
//! one-shot into an output buffer allocated at exactly that size, zstd allocates no window of its
//! own in that mode, and it stops with an error if the frame wants to write more.

use zstd::zstd_safe::{self, CParameter};

use crate::header::MAX_BODY_SIZE;

/// zstd's smallest window log (ZSTD_WINDOWLOG_ABSOLUTEMIN).
const WINDOW_LOG_MIN: u32 = 10;

/// The compression level hub and benchmarks use by default (zstd's strongest regular level).
pub const DEFAULT_LEVEL: i32 = 19;

/// Why compression failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompressError {
    /// The level is outside zstd's range.
    #[error("zstd level {0} is out of range (1..=22)")]
    Level(i32),
    /// The input is larger than a body may be.
    #[error("{what} of {len} bytes exceeds the body limit of {MAX_BODY_SIZE}")]
    TooLarge {
        /// Body or reference.
        what: &'static str,
        /// Its length.
        len: u64,
    },
    /// zstd reported an error.
    #[error("zstd compression failed: {0}")]
    Zstd(&'static str),
}

/// Why decompression failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecompressError {
    /// The expected size is larger than a body may be.
    #[error("announced body size {0} exceeds the limit of {MAX_BODY_SIZE}")]
    TooLarge(u64),
    /// The payload is corrupt, truncated, needs too large a window or inflates past the size.
    #[error("zstd payload does not decompress to the announced {expected} bytes: {reason}")]
    Corrupt {
        /// The announced size.
        expected: u64,
        /// What zstd said.
        reason: &'static str,
    },
    /// The payload decompressed to fewer bytes than announced.
    #[error("zstd payload decompressed to {got} bytes, {expected} were announced")]
    WrongSize {
        /// The announced size.
        expected: u64,
        /// What came out.
        got: u64,
    },
}

/// Compresses a whole body.
pub fn compress_whole(body: &[u8], level: i32) -> Result<Vec<u8>, CompressError> {
    compress(None, body, level)
}

/// Compresses `body` as a delta against `reference`, which the receiver must hold.
pub fn compress_delta(reference: &[u8], body: &[u8], level: i32) -> Result<Vec<u8>, CompressError> {
    compress(Some(reference), body, level)
}

/// Decompresses a whole body that must be exactly `size` bytes.
pub fn decompress_whole(payload: &[u8], size: u64) -> Result<Vec<u8>, DecompressError> {
    decompress(None, payload, size)
}

/// Rebuilds a body of exactly `size` bytes from a delta against `reference`.
pub fn decompress_delta(
    reference: &[u8],
    payload: &[u8],
    size: u64,
) -> Result<Vec<u8>, DecompressError> {
    decompress(Some(reference), payload, size)
}

/// The window log that lets a frame reach from the end of `total` bytes back to their start.
fn window_log(total: u64) -> u32 {
    let needed = u64::BITS - total.saturating_sub(1).leading_zeros();
    needed.clamp(WINDOW_LOG_MIN, 30)
}

fn compress(reference: Option<&[u8]>, body: &[u8], level: i32) -> Result<Vec<u8>, CompressError> {
    if !(1..=zstd_safe::max_c_level()).contains(&level) {
        return Err(CompressError::Level(level));
    }
    let reference = reference.unwrap_or_default();
    for (what, len) in [("body", body.len()), ("reference", reference.len())] {
        if len as u64 > MAX_BODY_SIZE {
            return Err(CompressError::TooLarge {
                what,
                len: len as u64,
            });
        }
    }
    let mut context = zstd_safe::CCtx::create();
    let total = (reference.len() + body.len()) as u64;
    for parameter in [
        CParameter::CompressionLevel(level),
        CParameter::WindowLog(window_log(total)),
        CParameter::EnableLongDistanceMatching(true),
        CParameter::ChecksumFlag(false),
        CParameter::ContentSizeFlag(false),
        CParameter::DictIdFlag(false),
    ] {
        context.set_parameter(parameter).map_err(zstd_error)?;
    }
    if !reference.is_empty() {
        context.ref_prefix(reference).map_err(zstd_error)?;
    }
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(body.len()));
    context.compress2(&mut out, body).map_err(zstd_error)?;
    Ok(out)
}

fn decompress(
    reference: Option<&[u8]>,
    payload: &[u8],
    size: u64,
) -> Result<Vec<u8>, DecompressError> {
    if size > MAX_BODY_SIZE {
        return Err(DecompressError::TooLarge(size));
    }
    let corrupt = |code| DecompressError::Corrupt {
        expected: size,
        reason: zstd_safe::get_error_name(code),
    };
    let reference = reference.unwrap_or_default();
    let mut context = zstd_safe::DCtx::create();
    if !reference.is_empty() {
        context.ref_prefix(reference).map_err(corrupt)?;
    }
    // Exactly the announced size: a frame that wants more fails with "destination too small".
    let mut out = Vec::with_capacity(size as usize);
    context.decompress(&mut out, payload).map_err(corrupt)?;
    if out.len() as u64 != size {
        return Err(DecompressError::WrongSize {
            expected: size,
            got: out.len() as u64,
        });
    }
    Ok(out)
}

fn zstd_error(code: zstd_safe::ErrorCode) -> CompressError {
    CompressError::Zstd(zstd_safe::get_error_name(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seed: u64, len: usize) -> Vec<u8> {
        // Text-like, mildly compressible bytes.
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b"abcdefgh ijklm\n{}\":,"[(state >> 59) as usize % 20]
            })
            .collect()
    }

    #[test]
    fn whole_round_trip_including_empty() {
        for len in [0, 1, 1000, 100_000] {
            let original = body(len as u64, len);
            let payload = compress_whole(&original, 3).unwrap();
            assert_eq!(decompress_whole(&payload, len as u64).unwrap(), original);
        }
    }

    #[test]
    fn a_small_edit_makes_a_small_delta() {
        let old = body(1, 2_000_000);
        let mut new = old.clone();
        new[1_000_000..1_000_010].copy_from_slice(b"CHANGED!!!");
        let delta = compress_delta(&old, &new, 19).unwrap();
        let whole = compress_whole(&new, 19).unwrap();
        assert!(delta.len() < 400, "delta {} bytes", delta.len());
        assert!(
            whole.len() > 100 * delta.len(),
            "whole {} delta {}",
            whole.len(),
            delta.len()
        );
        assert_eq!(
            decompress_delta(&old, &delta, new.len() as u64).unwrap(),
            new
        );
    }

    #[test]
    fn delta_against_the_wrong_reference_fails_or_differs() {
        let old = body(1, 50_000);
        let mut new = old.clone();
        new.extend_from_slice(b"tail");
        let delta = compress_delta(&old, &new, 19).unwrap();
        let other = body(2, 50_000);
        // zstd cannot know the reference was wrong; the output is garbage or an error, and the
        // digest check in `verify` refuses garbage.
        let rebuilt = decompress_delta(&other, &delta, new.len() as u64);
        assert!(rebuilt.map_or(true, |bytes| bytes != new));
    }

    #[test]
    fn payload_that_inflates_past_the_announced_size_is_refused() {
        let bomb = compress_whole(&vec![0u8; 10_000_000], 3).unwrap();
        assert!(bomb.len() < 1_000);
        assert!(matches!(
            decompress_whole(&bomb, 1_000),
            Err(DecompressError::Corrupt { .. })
        ));
        assert!(matches!(
            decompress_whole(&bomb, MAX_BODY_SIZE + 1),
            Err(DecompressError::TooLarge(_))
        ));
    }

    #[test]
    fn short_output_and_truncation_are_refused() {
        let original = body(3, 10_000);
        let payload = compress_whole(&original, 3).unwrap();
        assert!(matches!(
            decompress_whole(&payload, 10_001),
            Err(DecompressError::WrongSize { .. })
        ));
        for cut in [0, 1, payload.len() / 2, payload.len() - 1] {
            assert!(
                decompress_whole(&payload[..cut], 10_000).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_frame_announcing_a_huge_window_reserves_nothing() {
        // A hand-made frame: magic, descriptor (no content size), window descriptor, one raw
        // last block holding "x". Exponent 20 announces a 1 GiB window; one-shot decoding writes
        // straight into the 1-byte output buffer, so the announcement cannot make us reserve
        // memory, and one byte more than announced is refused.
        let frame = |window_descriptor: u8| {
            vec![
                0x28,
                0xb5,
                0x2f,
                0xfd,
                0x00,
                window_descriptor,
                0x09,
                0x00,
                0x00,
                b'x',
            ]
        };
        assert_eq!(decompress_whole(&frame(0x00), 1).unwrap(), b"x");
        assert_eq!(decompress_whole(&frame(20 << 3), 1).unwrap(), b"x");
        assert!(decompress_whole(&frame(20 << 3), 0).is_err());
    }

    #[test]
    fn window_log_covers_the_input() {
        assert_eq!(window_log(0), WINDOW_LOG_MIN);
        assert_eq!(window_log(1 << 20), 20);
        assert_eq!(window_log((1 << 20) + 1), 21);
        assert_eq!(window_log(u64::MAX), 30);
    }

    #[test]
    fn bad_level_is_refused() {
        assert_eq!(compress_whole(b"x", 0), Err(CompressError::Level(0)));
        assert_eq!(compress_whole(b"x", 23), Err(CompressError::Level(23)));
    }
}
