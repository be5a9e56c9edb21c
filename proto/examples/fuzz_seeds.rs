//! Writes seed inputs for the fuzz targets into `fuzz/corpus/<target>/seed-*`: valid frames of
//! each message the agent and hub exchange, a signed header, a key certificate and a revocation
//! list, whole and delta payloads, a stored snapshot row — so the fuzzers start from inputs that
//! reach deep into each decoder. `cargo run -p outpost-proto --example fuzz_seeds`.

use std::path::Path;

use outpost_proto::compress::{compress_delta, compress_whole};
use outpost_proto::wire::{
    Ack, BundleDrift, DriftAction, DriftReport, FieldDrift, HeldProof, HeldSnapshot, Hello,
    Message, ObjectDrift, StatusReport, encode_frame,
};
use outpost_proto::{Digest, SnapshotHeader};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus folder");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write a seed");
}

fn main() {
    let hello = Message::Hello(Hello {
        agent_version: "0.1.0".to_owned(),
        assignment_sequence: 3,
        have: vec![HeldSnapshot {
            bundle: "shop".to_owned(),
            generation: 2,
            digest: Digest([7; 32]),
        }],
        proofs: vec![HeldProof {
            header: vec![0x4f, 0x50, 0x53, 0x48],
            signature: vec![9; 64],
        }],
    });
    let report = Message::StatusReport(StatusReport {
        sequence: 9,
        bundles: Vec::new(),
    });
    let ack = Message::Ack(Ack { sequence: 9 });
    let drift = Message::Drift(DriftReport {
        sequence: 10,
        bundles: vec![BundleDrift {
            bundle: "shop".to_owned(),
            digest: Digest([7; 32]),
            generation: 2,
            action: DriftAction::Left,
            objects: vec![ObjectDrift {
                api_version: "v1".to_owned(),
                kind: "ConfigMap".to_owned(),
                namespace: "default".to_owned(),
                name: "menu".to_owned(),
                deleted: false,
                fields: vec![FieldDrift {
                    path: "data.price".to_owned(),
                    desired: Some("\"2.50\"".to_owned()),
                    live: Some("\"3.00\"".to_owned()),
                    manager: Some("kubectl-edit".to_owned()),
                    changed_at: Some("2026-12-01T10:00:00Z".to_owned()),
                }],
                more_fields: 0,
            }],
            more_objects: 0,
            observed_at: 1_796_148_300,
        }],
    });
    for (name, message) in [
        ("hello", hello),
        ("report", report),
        ("ack", ack),
        ("drift", drift),
    ] {
        let frame = encode_frame(&message).expect("encode");
        write("frames", name, &frame);
    }
    let header = SnapshotHeader {
        bundle: "shop".to_owned(),
        generation: 2,
        git_commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
        git_ref: "refs/tags/v2".to_owned(),
        body_digest: Digest([9; 32]),
        body_size: 120,
        object_count: 2,
        created_at: 1_796_148_300,
        expires_at: Some(1_798_740_300),
        selector: "region=eu".to_owned(),
        key_id: outpost_proto::signing::SigningKey::from_seed([5; 32]).key_id(),
    };
    let encoded = header.encode().expect("encode the header");
    write("header", "header", &encoded);
    let body = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#.to_vec();
    let mut stored = (encoded.len() as u16).to_be_bytes().to_vec();
    stored.extend_from_slice(&encoded);
    stored.extend_from_slice(&[0u8; 64]);
    stored.extend_from_slice(&body);
    write("stored_snapshot", "row", &stored);
    let reference = outpost_proto::fuzzing::reference();
    let mut changed = reference.clone();
    changed[100] ^= 1;
    for (name, payload, size) in [
        (
            "whole",
            compress_whole(&body, 3).expect("compress"),
            body.len(),
        ),
        (
            "delta",
            compress_delta(&reference, &changed, 3).expect("compress"),
            changed.len(),
        ),
    ] {
        let mut seed = (size as u16).to_be_bytes().to_vec();
        seed.extend_from_slice(&payload);
        write("payload", name, &seed);
    }
    println!("seeds written under fuzz/corpus/");
}
