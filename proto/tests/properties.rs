//! Property tests: deltas round-trip for arbitrary bodies; canonical bodies ignore formatting and
//! file splits; any corruption of header, signature or payload is refused with an error; no input
//! from the network makes a decoder panic.

use outpost_proto::compress::{compress_delta, decompress_delta};
use outpost_proto::verify::{Expectation, verify_header};
use outpost_proto::wire::{self, FrameDecoder, Message};
use outpost_proto::{
    Body, Digest, KeyCertificate, SigningKey, SnapshotHeader, SourceFile, TrustStore,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    }
}

/// An old body and a new one made from it by a few splices (insert, delete, replace).
fn body_pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let old = prop::collection::vec(any::<u8>(), 0..20_000);
    let edits = prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            0..64usize,
            prop::collection::vec(any::<u8>(), 0..64),
        ),
        0..6,
    );
    (old, edits).prop_map(|(old, edits)| {
        let mut new = old.clone();
        for (at, remove, insert) in edits {
            let start = if new.is_empty() {
                0
            } else {
                at.index(new.len())
            };
            let end = (start + remove).min(new.len());
            new.splice(start..end, insert);
        }
        (old, new)
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn delta_applied_to_old_gives_new((old, new) in body_pair(), level in 1..=19i32) {
        let delta = compress_delta(&old, &new, level).unwrap();
        prop_assert_eq!(decompress_delta(&old, &delta, new.len() as u64).unwrap(), new);
    }

    #[test]
    fn decompressing_garbage_never_panics(payload in prop::collection::vec(any::<u8>(), 0..512), size in 0..100_000u64, reference in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = outpost_proto::compress::decompress_whole(&payload, size);
        let _ = decompress_delta(&reference, &payload, size);
    }

    #[test]
    fn header_and_frame_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = SnapshotHeader::decode(&bytes);
        let _ = wire::decode_frame(&bytes);
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        while let Ok(Some(_)) = decoder.next_message() {}
        let _ = outpost_proto::body::parse_lines(&bytes).count();
    }

    #[test]
    fn canonical_body_ignores_order_split_and_formatting(
        objects in prop::collection::btree_map("[a-z]{1,8}", (0..3usize, prop::collection::btree_map("[a-z]{1,6}", "[ -~]{0,12}", 0..4)), 1..12),
        rotation in any::<prop::sample::Index>(),
        split in any::<prop::sample::Index>(),
    ) {
        let kinds = ["ConfigMap", "Secret", "Namespace"];
        // Block style, one key order.
        let block: Vec<String> = objects.iter().map(|(name, (kind, data))| {
            let mut text = format!("# {name}\napiVersion: v1\nkind: {}\nmetadata:\n  name: obj-{name}\ndata:\n", kinds[*kind]);
            for (key, value) in data {
                text.push_str(&format!("  {key}: {}\n", serde_json::to_string(value).unwrap()));
            }
            if data.is_empty() { text.push_str("  {}\n"); }
            text
        }).collect();
        // Flow style, reversed key order, documents rotated.
        let mut flow: Vec<String> = objects.iter().map(|(name, (kind, data))| {
            let pairs: Vec<String> = data.iter().rev().map(|(key, value)| format!("{key}: {}", serde_json::to_string(value).unwrap())).collect();
            format!("data: {{{}}}\nmetadata: {{name: obj-{name}}}\nkind: {}\napiVersion: v1\n", pairs.join(", "), kinds[*kind])
        }).collect();
        let turn = rotation.index(flow.len());
        flow.rotate_left(turn);
        let one = block.join("---\n");
        let cut = split.index(flow.len());
        let first = flow[..cut].join("---\n");
        let second = flow[cut..].join("\n---\n");
        let a = Body::render(&[SourceFile { path: "one.yaml", text: &one }]).unwrap();
        let b = Body::render(&[
            SourceFile { path: "b.yaml", text: &second },
            SourceFile { path: "a.yaml", text: &first },
        ]).unwrap();
        prop_assert_eq!(a.as_bytes(), b.as_bytes());
        prop_assert_eq!(a.object_count(), objects.len() as u64);
    }
}

struct Snapshot {
    trust: TrustStore,
    header: Vec<u8>,
    signature: [u8; 64],
    old: Body,
    payload: Vec<u8>,
}

fn snapshot() -> Snapshot {
    let root = SigningKey::from_seed([7; 32]);
    let signer = SigningKey::from_seed([8; 32]);
    let mut trust = TrustStore::new(root.public_key());
    trust
        .add_certificate(&root.certify(&KeyCertificate {
            signing_key: signer.public_key(),
            not_before: 0,
            not_after: i64::MAX,
        }))
        .unwrap();
    let render = |replicas: u32| {
        let text = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: shop}}\nspec: {{replicas: {replicas}}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: settings}}\ndata: {{greeting: hello}}\n"
        );
        Body::render(&[SourceFile {
            path: "app.yaml",
            text: &text,
        }])
        .unwrap()
    };
    let old = render(2);
    let new = render(3);
    let header = SnapshotHeader {
        bundle: "shop".to_owned(),
        generation: 2,
        git_commit: "abc".to_owned(),
        git_ref: "refs/tags/v2".to_owned(),
        body_digest: new.digest(),
        body_size: new.as_bytes().len() as u64,
        object_count: new.object_count(),
        created_at: 10,
        expires_at: None,
        selector: String::new(),
        key_id: signer.key_id(),
    };
    let (header, signature) = header.sign(&signer).unwrap();
    let payload = compress_delta(old.as_bytes(), new.as_bytes(), 19).unwrap();
    Snapshot {
        trust,
        header,
        signature: signature.0,
        old,
        payload,
    }
}

/// The agent's receive path: verify the header, check the payload against the digest the transfer
/// announced, rebuild the body from the delta, check it against the header.
fn receive(s: &Snapshot, header: &[u8], signature: &[u8], payload: &[u8]) -> bool {
    receive_with_digest(s, header, signature, payload, Digest::of(&s.payload)).is_some()
}

/// The same, with the announced payload digest chosen by the caller (a relay may rewrite it).
fn receive_with_digest(
    s: &Snapshot,
    header: &[u8],
    signature: &[u8],
    payload: &[u8],
    payload_digest: Digest,
) -> Option<Vec<u8>> {
    let expectation = Expectation {
        bundle: "shop",
        assigned_digest: None,
        installed: None,
    };
    let verified = verify_header(&s.trust, header, signature, &expectation).ok()?;
    let snapshot = verified
        .accept_payload(payload, payload_digest, Some(&s.old))
        .ok()?;
    Some(snapshot.body().as_bytes().to_vec())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_bit_flip_in_header_signature_or_payload_is_refused(part in 0..3usize, at in any::<prop::sample::Index>(), bit in 0..8u8) {
        let s = snapshot();
        prop_assert!(receive(&s, &s.header, &s.signature, &s.payload));
        let (mut header, mut signature, mut payload) = (s.header.clone(), s.signature.to_vec(), s.payload.clone());
        let target = [&mut header, &mut signature, &mut payload][part].as_mut_slice();
        let index = at.index(target.len());
        target[index] ^= 1 << bit;
        prop_assert!(!receive(&s, &header, &signature, &payload));
    }

    #[test]
    fn a_relay_rewriting_payload_and_its_digest_cannot_change_the_body(at in any::<prop::sample::Index>(), bit in 0..8u8) {
        let s = snapshot();
        let signed_body = receive_with_digest(&s, &s.header, &s.signature, &s.payload, Digest::of(&s.payload)).unwrap();
        let mut payload = s.payload.clone();
        let index = at.index(payload.len());
        payload[index] ^= 1 << bit;
        // zstd ignores a few bits (e.g. reserved frame-header bits); what comes out is either
        // refused or exactly the signed body.
        if let Some(body) = receive_with_digest(&s, &s.header, &s.signature, &payload, Digest::of(&payload)) {
            prop_assert_eq!(body, signed_body);
        }
    }

    #[test]
    fn any_truncation_or_extension_is_refused(part in 0..3usize, cut in any::<prop::sample::Index>(), extra in prop::collection::vec(any::<u8>(), 1..16)) {
        let s = snapshot();
        let mut parts = [s.header.clone(), s.signature.to_vec(), s.payload.clone()];
        let len = parts[part].len();
        parts[part].truncate(cut.index(len));
        prop_assert!(!receive(&s, &parts[0], &parts[1], &parts[2]));
        let mut parts = [s.header.clone(), s.signature.to_vec(), s.payload.clone()];
        parts[part].extend_from_slice(&extra);
        prop_assert!(!receive(&s, &parts[0], &parts[1], &parts[2]));
    }

    #[test]
    fn corrupted_frames_are_refused_or_decode_to_something_else(at in any::<prop::sample::Index>(), bit in 0..8u8) {
        let s = snapshot();
        let message = Message::TransferStart(wire::TransferStart {
            snapshot: Digest::of(b"x"),
            header: s.header.clone(),
            signature: s.signature.to_vec(),
            encoding: wire::PayloadEncoding::Delta { base: s.old.digest() },
            payload_size: s.payload.len() as u64,
            payload_digest: Digest::of(&s.payload),
            offset: 0,
        });
        let mut frame = wire::encode_frame(&message).unwrap();
        let index = 4 + at.index(frame.len() - 4);
        frame[index] ^= 1 << bit;
        if let Ok(decoded) = wire::decode_frame(&frame[4..]) {
            prop_assert_ne!(decoded, message);
        }
    }
}
