//! The fuzz targets' corpora (`fuzz/corpus/<target>/`, grown by `cargo +nightly fuzz run`)
//! replayed through the same entry points on stable: every input the fuzzers kept, and every
//! crash they once found (`fuzz/regressions/<target>/`), must decode or be refused, never panic.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut count = 0;
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            // A fuzzer running in this tree replaces inputs as it goes: one gone is skipped.
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => panic!("{}: {error}", path.display()),
            };
            run(&bytes);
            count += 1;
        }
    }
    assert!(count > 0, "no corpus for {target} under {}", root.display());
}

#[test]
fn frames() {
    replay("frames", outpost_proto::fuzzing::frames);
}

#[test]
fn header() {
    replay("header", outpost_proto::fuzzing::header);
}

#[test]
fn key_certificate() {
    replay("key_certificate", outpost_proto::fuzzing::key_certificate);
}

#[test]
fn payload() {
    replay("payload", outpost_proto::fuzzing::payload);
}

#[test]
fn manifest() {
    replay("manifest", outpost_proto::fuzzing::manifest);
}

#[test]
fn stored_snapshot() {
    replay("stored_snapshot", outpost_proto::fuzzing::stored_snapshot);
}
