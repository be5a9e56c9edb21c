//! `outpost-sim pipeline`: the snapshot pipeline end to end in one process: a bundle at three
//! releases is rendered, signed under a root-certified key, shipped as whole and delta
//! payloads, and verified by an agent-side trust store, with a tampered payload and a replayed
//! release refused.

use anyhow::{Context, Result, bail};
use outpost_proto::compress::{DEFAULT_LEVEL, compress_delta, compress_whole};
use outpost_proto::verify::{Expectation, Installed, verify_header};
use outpost_proto::{
    Body, Digest, KeyCertificate, SigningKey, SnapshotHeader, SourceFile, TrustStore,
    VerifiedSnapshot,
};

/// A release of the demo bundle: its tag and its manifests.
struct Release {
    tag: &'static str,
    replicas: u32,
    image: &'static str,
    extra: &'static str,
}

const RELEASES: [Release; 3] = [
    Release {
        tag: "pos-v1.0.0",
        replicas: 2,
        image: "registry.example.com/pos:1.0.0",
        extra: "",
    },
    Release {
        tag: "pos-v1.1.0",
        replicas: 2,
        image: "registry.example.com/pos:1.1.0",
        extra: "",
    },
    Release {
        tag: "pos-v1.2.0",
        replicas: 3,
        image: "registry.example.com/pos:1.1.0",
        extra: "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: receipt-printer, namespace: pos}\ndata: {model: tm-t88}\n",
    },
];

fn manifests(release: &Release) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: pos}}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: pos\n  namespace: pos\nspec:\n  replicas: {}\n  \
         selector: {{matchLabels: {{app: pos}}}}\n  template:\n    metadata: {{labels: {{app: pos}}}}\n    \
         spec:\n      containers:\n      - name: pos\n        image: {}\n{}",
        release.replicas, release.image, release.extra
    )
}

/// Runs the snapshot pipeline on built-in defaults and prints what crossed the wire.
pub(crate) fn pipeline() -> Result<()> {
    println!(
        "The snapshot pipeline (render → sign → whole/delta → verify) on built-in defaults.\n"
    );
    // Fixed seeds keep the demo repeatable; real keys come from the OS RNG.
    let root = SigningKey::from_seed([1; 32]);
    let signer = SigningKey::from_seed([2; 32]);
    let mut agent_trust = TrustStore::new(root.public_key());
    agent_trust
        .add_certificate(&root.certify(&KeyCertificate {
            signing_key: signer.public_key(),
            not_before: 0,
            not_after: i64::MAX,
        }))
        .context("agent trusting the hub's signing key")?;
    println!(
        "root key {} certifies signing key {}\n",
        root.key_id(),
        signer.key_id()
    );
    println!(
        "{:<12} {:>4} {:>7} {:>12} {:>7} {:>7}  agent",
        "release", "gen", "objects", "body bytes", "whole", "delta"
    );
    let mut installed: Option<VerifiedSnapshot> = None;
    let mut signed = Vec::new();
    for (index, release) in RELEASES.iter().enumerate() {
        let text = manifests(release);
        let body = Body::render(&[SourceFile {
            path: "pos/app.yaml",
            text: &text,
        }])?;
        let generation = index as u64 + 1;
        let (header, signature) = SnapshotHeader {
            bundle: "pos".to_owned(),
            generation,
            git_commit: Digest::of(text.as_bytes()).to_hex()[..40].to_owned(),
            git_ref: format!("refs/tags/{}", release.tag),
            body_digest: body.digest(),
            body_size: body.as_bytes().len() as u64,
            object_count: body.object_count(),
            created_at: 1_795_000_000 + index as i64 * 86_400,
            expires_at: None,
            selector: "role=store".to_owned(),
            key_id: signer.key_id(),
        }
        .sign(&signer)?;
        let whole = compress_whole(body.as_bytes(), DEFAULT_LEVEL)?;
        let (payload, reference) = match &installed {
            Some(old) => (
                compress_delta(old.body().as_bytes(), body.as_bytes(), DEFAULT_LEVEL)?,
                Some(old.body()),
            ),
            None => (whole.clone(), None),
        };
        let expectation = Expectation {
            bundle: "pos",
            assigned_digest: Some(body.digest()),
            installed: installed.as_ref().map(|snapshot| Installed {
                generation: snapshot.header().generation,
                digest: snapshot.digest(),
            }),
        };
        let verified = verify_header(&agent_trust, &header, &signature.0, &expectation)?
            .accept_payload(&payload, Digest::of(&payload), reference)?;
        println!(
            "{:<12} {:>4} {:>7} {:>12} {:>7} {:>7}  verified {}",
            release.tag,
            generation,
            body.object_count(),
            body.as_bytes().len(),
            whole.len(),
            if reference.is_some() {
                payload.len().to_string()
            } else {
                "-".to_owned()
            },
            verified.digest().short()
        );
        signed.push((header, signature));
        installed = Some(verified);
    }
    let Some(current) = installed else {
        bail!("the demo rendered no release");
    };
    let installed_now = Installed {
        generation: current.header().generation,
        digest: current.digest(),
    };
    println!("\nattacks the agent refuses:");
    let (old_header, old_signature) = &signed[0];
    let rollback = verify_header(
        &agent_trust,
        old_header,
        &old_signature.0,
        &Expectation {
            bundle: "pos",
            assigned_digest: None,
            installed: Some(installed_now),
        },
    );
    println!(
        "  replay of {}: {}",
        RELEASES[0].tag,
        rollback
            .err()
            .map_or("ACCEPTED (bug)".to_owned(), |e| e.to_string())
    );
    let (header, signature) = &signed[2];
    let mut forged = current.body().as_bytes().to_vec();
    let at = forged.len() / 2;
    forged[at] ^= 0x01;
    let forged_payload = compress_whole(&forged, 3)?;
    let tampered = verify_header(
        &agent_trust,
        header,
        &signature.0,
        &Expectation {
            bundle: "pos",
            assigned_digest: None,
            installed: None,
        },
    )?
    .accept_payload(&forged_payload, Digest::of(&forged_payload), None);
    println!(
        "  body altered by a relay: {}",
        tampered
            .err()
            .map_or("ACCEPTED (bug)".to_owned(), |e| e.to_string())
    );
    Ok(())
}
