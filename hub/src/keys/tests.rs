use super::*;

const NOW: i64 = 1_800_000_000;

fn policy() -> KeyPolicy {
    KeyPolicy {
        certificate_lifetime: 90 * DAY,
        rotation_grace: 300,
        snapshot_lifetime: Some(30 * DAY),
    }
}

fn header(keys: &HubKeys, now: i64) -> SnapshotHeader {
    let (bytes, _) = keys.sign(blank_header(), now).unwrap();
    SnapshotHeader::decode(&bytes).unwrap()
}

fn blank_header() -> SnapshotHeader {
    SnapshotHeader {
        bundle: "pos".to_owned(),
        generation: 1,
        git_commit: "0".repeat(40),
        git_ref: "refs/heads/main".to_owned(),
        body_digest: outpost_proto::Digest([1; 32]),
        body_size: 1,
        object_count: 0,
        created_at: 0,
        expires_at: None,
        selector: String::new(),
        key_id: KeyId([0; 32]),
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_makes_every_key_once_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = dir.path().join("keys");
    let report = init(&keys_dir, NOW, 90 * DAY).unwrap();
    assert_eq!(report.root_key_path, keys_dir.join("root.key"));
    for name in [
        "root.key",
        "root.pub",
        "signing.key",
        "signing.cert",
        "transport.key",
    ] {
        assert_eq!(mode(&keys_dir.join(name)), 0o600, "{name}");
    }
    assert_eq!(mode(&keys_dir), 0o700);
    let error = init(&keys_dir, NOW, 90 * DAY).unwrap_err().to_string();
    assert!(error.contains("already holds keys"), "{error}");
    let keys = HubKeys::load(&keys_dir, policy()).unwrap();
    assert_eq!(keys.root().key_id(), report.root);
    assert_eq!(keys.signer().key_id(), report.signer);
    let status = keys.status(NOW);
    assert!(status.root_key_present);
    assert!(status.warnings[0].contains("move it offline"), "{status:?}");
    // Signed headers carry the key, now, and the snapshot lifetime.
    let signed = header(&keys, NOW);
    assert_eq!(signed.key_id, report.signer);
    assert_eq!(signed.expires_at, Some(NOW + 30 * DAY));
    let trust = keys.trust_store();
    assert!(trust.signing_key(&report.signer).is_some());
}

#[test]
fn the_hub_runs_without_the_root_key_and_never_makes_one() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), NOW, 90 * DAY).unwrap();
    let root_pub = std::fs::read(dir.path().join("root.pub")).unwrap();
    std::fs::rename(
        dir.path().join("root.key"),
        dir.path().join("../root.key.offline"),
    )
    .unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    keys.refresh(NOW + 60).unwrap();
    header(&keys, NOW + 60);
    assert!(!dir.path().join("root.key").exists(), "no root key made");
    assert_eq!(
        std::fs::read(dir.path().join("root.pub")).unwrap(),
        root_pub
    );
    assert!(!keys.status(NOW).root_key_present);
}

#[test]
fn missing_or_mismatched_files_are_refused_with_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let error = HubKeys::load(empty.path(), policy())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("root.pub is missing") && error.contains("keys init"),
        "{error}"
    );

    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), NOW, 90 * DAY).unwrap();
    std::fs::remove_file(dir.path().join("transport.key")).unwrap();
    let error = HubKeys::load(dir.path(), policy()).unwrap_err().to_string();
    assert!(error.contains("agents pin this key"), "{error}");

    let other = tempfile::tempdir().unwrap();
    init(other.path(), NOW, 90 * DAY).unwrap();
    std::fs::copy(
        other.path().join("transport.key"),
        dir.path().join("transport.key"),
    )
    .unwrap();
    std::fs::copy(other.path().join("root.key"), dir.path().join("root.key")).unwrap();
    let error = HubKeys::load(dir.path(), policy()).unwrap_err().to_string();
    assert!(error.contains("not the one root.pub names"), "{error}");
    std::fs::remove_file(dir.path().join("root.key")).unwrap();
    let good_key = std::fs::read(dir.path().join("signing.key")).unwrap();
    std::fs::write(dir.path().join("signing.key"), "not hex").unwrap();
    let error = HubKeys::load(dir.path(), policy()).unwrap_err().to_string();
    assert!(error.contains("64 hex digits"), "{error}");
    std::fs::write(dir.path().join("signing.key"), good_key).unwrap();
    // A signing certificate from another root is refused.
    std::fs::copy(
        other.path().join("signing.cert"),
        dir.path().join("signing.cert"),
    )
    .unwrap();
    let error = HubKeys::load(dir.path(), policy()).unwrap_err().to_string();
    assert!(
        error.contains("certified by the root in root.pub"),
        "{error}"
    );
}

#[test]
fn a_rotation_is_offered_first_and_signs_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), NOW, 90 * DAY).unwrap();
    let offline = dir.path().join("../offline-root.key");
    std::fs::rename(&report.root_key_path, &offline).unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    let mut changes = keys.trust_changes();
    changes.borrow_and_update();

    let root = read_root_key(&offline, dir.path()).unwrap();
    let next = rotate(dir.path(), &root, NOW, 90 * DAY).unwrap();
    let error = rotate(dir.path(), &root, NOW, 90 * DAY)
        .unwrap_err()
        .to_string();
    assert!(error.contains("a rotation is pending"), "{error}");

    let notices = keys.refresh(NOW + 10).unwrap();
    assert_eq!(
        notices,
        [KeyNotice::Offered {
            key: next,
            active_from: NOW + 10 + 300
        }]
    );
    assert!(
        changes.has_changed().unwrap(),
        "connections push the new Trust"
    );
    assert_eq!(keys.trust().certificates.len(), 2);
    assert!(keys.trust_store().signing_key(&next).is_some());
    assert_eq!(
        header(&keys, NOW + 20).key_id,
        report.signer,
        "not before the grace"
    );

    let notices = keys.refresh(NOW + 310).unwrap();
    assert_eq!(
        notices,
        [KeyNotice::Activated {
            key: next,
            retired: report.signer,
            files_updated: true
        }]
    );
    assert_eq!(header(&keys, NOW + 320).key_id, next);
    assert!(!dir.path().join("signing.next.key").exists());
    assert!(
        dir.path()
            .join("certificates")
            .join(format!("{}.cert", hex::encode(report.signer.0)))
            .exists()
    );
    // Agents keep the old certificate: it verifies what the old key signed.
    assert!(keys.trust_store().signing_key(&report.signer).is_some());
    let reloaded = HubKeys::load(dir.path(), policy()).unwrap();
    assert_eq!(reloaded.signer().key_id(), next);
    assert_eq!(reloaded.status(NOW + 400).retired.len(), 1);
}

#[test]
fn a_switch_cut_short_reads_as_before_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), NOW, 90 * DAY).unwrap();
    let root = read_root_key(&report.root_key_path, dir.path()).unwrap();
    let next = rotate(dir.path(), &root, NOW, 90 * DAY).unwrap();
    // As after the second step of a switch: the old certificate retired, the next key's
    // certificate under the active name, the keys not moved yet.
    let retired = dir.path().join("certificates");
    files::private_dir(&retired).unwrap();
    std::fs::copy(
        dir.path().join("signing.cert"),
        retired.join(format!("{}.cert", hex::encode(report.signer.0))),
    )
    .unwrap();
    std::fs::rename(
        dir.path().join("signing.next.cert"),
        dir.path().join("signing.cert"),
    )
    .unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    assert_eq!(keys.signer().key_id(), report.signer);
    assert_eq!(keys.status(NOW).next.map(|next| next.0), Some(next));
    keys.refresh(NOW).unwrap();
    keys.refresh(NOW + 1_000).unwrap();
    assert_eq!(keys.signer().key_id(), next);
    assert_eq!(
        HubKeys::load(dir.path(), policy())
            .unwrap()
            .signer()
            .key_id(),
        next
    );
}

#[test]
fn revoking_the_key_in_use_switches_at_once_and_marks_its_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), NOW, 90 * DAY).unwrap();
    let root = read_root_key(&report.root_key_path, dir.path()).unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    let old_header = header(&keys, NOW);
    let error = revoke(dir.path(), &root, &report.signer.short(), NOW)
        .unwrap_err()
        .to_string();
    assert!(error.contains("rotate` first"), "{error}");
    let error = revoke(dir.path(), &root, "ffff", NOW)
        .unwrap_err()
        .to_string();
    assert!(error.contains("no signing key"), "{error}");

    let next = rotate(dir.path(), &root, NOW, 90 * DAY).unwrap();
    let list = revoke(dir.path(), &root, &report.signer.short(), NOW).unwrap();
    assert_eq!(list.version, 1);
    let notices = keys.refresh(NOW + 1).unwrap();
    assert!(notices.contains(&KeyNotice::Revocations {
        version: 1,
        revoked: vec![report.signer]
    }));
    assert!(
        notices
            .iter()
            .any(|notice| matches!(notice, KeyNotice::Activated { key, .. } if *key == next)),
        "no grace for a revoked key: {notices:?}"
    );
    assert_eq!(
        keys.needs_resigning(&old_header, NOW + 1),
        Some("its signing key was revoked")
    );
    assert_eq!(keys.needs_resigning(&header(&keys, NOW + 1), NOW + 1), None);
    let trust = keys.trust();
    assert!(trust.revocations.is_some());
    assert_eq!(
        trust.certificates.len(),
        1,
        "the revoked certificate is no longer offered"
    );
    assert!(keys.trust_store().is_revoked(&report.signer));
    // The list only grows.
    let list = revoke(dir.path(), &root, &next.short()[..6], NOW + 2).unwrap_err();
    assert!(list.to_string().contains("rotate` first"), "{list}");
}

#[test]
fn certificates_are_renewed_with_the_root_key_or_warned_about_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), NOW, 90 * DAY).unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    assert!(keys.refresh(NOW + 30 * DAY).unwrap().is_empty());
    // With a third of the lifetime left, the hub renews it itself, keeping its start.
    let later = NOW + 61 * DAY;
    let notices = keys.refresh(later).unwrap();
    assert_eq!(
        notices,
        [KeyNotice::Renewed {
            key: report.signer,
            not_after: later + 90 * DAY
        }]
    );
    assert_eq!(keys.signer().window(), (NOW - 3600, later + 90 * DAY));

    // Without root.key: a loud notice, once a day, and no signing after the end.
    std::fs::remove_file(&report.root_key_path).unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    let end = later + 90 * DAY;
    let notices = keys.refresh(end - 10 * DAY).unwrap();
    assert!(
        matches!(notices.as_slice(), [KeyNotice::Expiring { not_after, .. }] if *not_after == end)
    );
    assert!(notices[0].message().contains("root.key is offline"));
    assert!(
        keys.refresh(end - 10 * DAY + 60).unwrap().is_empty(),
        "said once a day"
    );
    assert!(!keys.refresh(end - 8 * DAY).unwrap().is_empty());
    assert!(matches!(
        keys.sign(blank_header(), end + 1),
        Err(SignError::Expired { .. })
    ));
    // Renewing offline: the operator's command.
    let offline = tempfile::tempdir().unwrap();
    let root_copy = offline.path().join("root.key");
    let root = SigningKey::from_seed([0; 32]);
    files::write_seed(&root_copy, &root).unwrap();
    assert!(
        read_root_key(&root_copy, dir.path())
            .unwrap_err()
            .to_string()
            .contains("trusts root")
    );
}

#[test]
fn snapshots_are_signed_again_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), NOW, 90 * DAY).unwrap();
    let keys = HubKeys::load(dir.path(), policy()).unwrap();
    let fresh = header(&keys, NOW);
    assert_eq!(keys.needs_resigning(&fresh, NOW + 19 * DAY), None);
    assert_eq!(
        keys.needs_resigning(&fresh, NOW + 21 * DAY),
        Some("it expires soon")
    );
    let no_expiry = SnapshotHeader {
        expires_at: None,
        ..fresh.clone()
    };
    assert!(keys.needs_resigning(&no_expiry, NOW).is_some());
    let never = HubKeys::load(
        dir.path(),
        KeyPolicy {
            snapshot_lifetime: None,
            ..policy()
        },
    )
    .unwrap();
    assert_eq!(never.needs_resigning(&no_expiry, NOW + 1_000 * DAY), None);
    assert_eq!(header(&never, NOW).expires_at, None);
}
