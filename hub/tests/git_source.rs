//! The hub's Git source against real repositories: tags (annotated and lightweight), branches,
//! force-moved tags, deleted tags, and reading trees and blobs without a work tree.

mod support;

use outpost_hub::git::GitSource;
use support::{Upstream, config_map};

#[test]
fn mirrors_branches_and_tags_and_reads_trees() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.write("kiosk/app.yaml", &config_map("kiosk", "1"));
    let first = upstream.commit("first");
    upstream.git(&["tag", "-a", "pos-v1", "-m", "annotated"]);
    upstream.git(&["tag", "light-v1"]);
    upstream.write("pos/app.yaml", &config_map("pos", "2"));
    let second = upstream.commit("second");

    let data = tempfile::tempdir().unwrap();
    let source = GitSource::open_or_init(&upstream.url(), &data.path().join("mirror")).unwrap();
    source.fetch().unwrap();
    let refs: Vec<(String, String)> = source
        .refs()
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.commit))
        .collect();
    assert_eq!(
        refs,
        [
            ("refs/heads/main".to_owned(), second.clone()),
            ("refs/tags/light-v1".to_owned(), first.clone()),
            ("refs/tags/pos-v1".to_owned(), first.clone()),
        ]
    );
    // No work tree: the mirror is bare.
    assert!(!data.path().join("mirror/pos").exists());
    let files = source.files(&first, "pos").unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].path, "app.yaml");
    assert_eq!(
        String::from_utf8(files[0].bytes.clone()).unwrap(),
        config_map("pos", "1")
    );
    // kiosk did not change between the commits: same tree id. pos did.
    assert_eq!(
        source.tree_id(&first, "kiosk").unwrap(),
        source.tree_id(&second, "kiosk").unwrap()
    );
    assert_ne!(
        source.tree_id(&first, "pos").unwrap(),
        source.tree_id(&second, "pos").unwrap()
    );
    assert_eq!(source.tree_id(&first, "missing").unwrap(), None);
    assert!(source.read_file(&second, "pos/app.yaml").unwrap().is_some());
    assert!(source.read_file(&second, "outpost.yaml").unwrap().is_none());
}

#[test]
fn force_moved_and_deleted_tags_follow_the_remote() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    let first = upstream.commit("first");
    upstream.git(&["tag", "pos-v1"]);
    upstream.git(&["tag", "doomed"]);
    let data = tempfile::tempdir().unwrap();
    let mirror = data.path().join("mirror");
    let source = GitSource::open_or_init(&upstream.url(), &mirror).unwrap();
    source.fetch().unwrap();

    upstream.write("pos/app.yaml", &config_map("pos", "2"));
    let second = upstream.commit("second");
    upstream.git(&["tag", "-f", "pos-v1"]);
    upstream.git(&["tag", "-d", "doomed"]);
    // Reopen, as a restarted hub would.
    let source = GitSource::open_or_init(&upstream.url(), &mirror).unwrap();
    let summary = source.fetch().unwrap();
    assert_eq!(summary.pruned, ["refs/tags/doomed"]);
    let refs = source.refs().unwrap();
    let pos = refs.iter().find(|r| r.name == "refs/tags/pos-v1").unwrap();
    assert_eq!(pos.commit, second);
    assert_ne!(pos.commit, first);
    assert!(refs.iter().all(|r| r.name != "refs/tags/doomed"));
}

#[test]
fn unreachable_remote_is_a_fetch_error_and_keeps_what_was_fetched() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.commit("first");
    let data = tempfile::tempdir().unwrap();
    let mirror = data.path().join("mirror");
    let source = GitSource::open_or_init(&upstream.url(), &mirror).unwrap();
    source.fetch().unwrap();
    let gone = format!("file://{}/does-not-exist", data.path().display());
    let offline = GitSource::open_or_init(&gone, &mirror).unwrap();
    let error = offline.fetch().unwrap_err();
    assert!(error.to_string().contains("fetching"), "{error}");
    assert_eq!(
        offline.refs().unwrap().len(),
        1,
        "what was fetched before stays"
    );
}

#[test]
fn the_remote_default_branch_is_learned_and_followed_when_it_moves() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.commit("first");
    let data = tempfile::tempdir().unwrap();
    let source = GitSource::open_or_init(&upstream.url(), &data.path().join("mirror")).unwrap();
    assert_eq!(source.default_branch(), None, "nothing fetched yet");
    source.fetch().unwrap();
    assert_eq!(source.default_branch().as_deref(), Some("refs/heads/main"));
    // The remote's default becomes another branch: the next fetch says so.
    upstream.git(&["branch", "master"]);
    upstream.git(&["symbolic-ref", "HEAD", "refs/heads/master"]);
    source.fetch().unwrap();
    assert_eq!(
        source.default_branch().as_deref(),
        Some("refs/heads/master")
    );
    // A source that names its branch keeps it; one that does not follows the remote.
    let named = outpost_hub::config::SourceConfig {
        name: "fleet".to_owned(),
        url: upstream.url(),
        credentials: None,
        track: Some("refs/heads/main".to_owned()),
        webhook_secret: None,
        kustomize: None,
        kustomize_unisolated: false,
        verify: None,
    };
    assert_eq!(named.track_in(&source), "refs/heads/main");
    let following = outpost_hub::config::SourceConfig {
        track: None,
        ..named
    };
    assert_eq!(following.track_in(&source), "refs/heads/master");
}

/// Signed Git with `verify.mode = "tags"`: a tag signed (SSH) by an allowed key is released; an
/// unsigned annotated tag, a lightweight tag, a tag signed by another key and any branch are
/// refused, saying why. With `"commits"`, a signed commit passes and the tag's name does not
/// matter.
#[test]
fn signed_tags_pass_and_everything_else_is_refused_in_tags_mode() {
    use outpost_hub::signed::{AllowedSigners, VerifyMode, VerifyPolicy};
    use std::sync::Arc;
    let upstream = Upstream::new();
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = keys.path().join(name);
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen is installed (Debian: openssh-client)");
        assert!(made.success());
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        (path, public.trim().to_owned())
    };
    let ((alice, alice_public), (mallory, _)) = (key("alice"), key("mallory"));
    let signing = |key: &std::path::Path| {
        vec![
            "-c".to_owned(),
            "gpg.format=ssh".to_owned(),
            "-c".to_owned(),
            format!("user.signingkey={}", key.display()),
        ]
    };
    let git = |prefix: Vec<String>, args: &[&str]| {
        let mut all: Vec<&str> = prefix.iter().map(String::as_str).collect();
        all.extend(args);
        upstream.git(&all);
    };
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.git(&["add", "-A"]);
    git(signing(&alice), &["commit", "-S", "-qm", "signed commit"]);
    git(
        signing(&alice),
        &["tag", "-s", "v1", "-m", "signed by alice"],
    );
    git(
        signing(&mallory),
        &["tag", "-s", "v1-forged", "-m", "signed by mallory"],
    );
    upstream.git(&["tag", "-a", "v1-unsigned", "-m", "annotated, unsigned"]);
    upstream.git(&["tag", "v1-light"]);

    let data = tempfile::tempdir().unwrap();
    let allowed =
        AllowedSigners::parse(&format!("alice@example.com {alice_public}"), "test").unwrap();
    let policy = |mode| {
        Some(Arc::new(VerifyPolicy {
            mode,
            signers: allowed.clone(),
            files: Vec::new(),
            allow_rewrite_to: Vec::new(),
        }))
    };
    let source = GitSource::open_or_init(&upstream.url(), &data.path().join("mirror"))
        .unwrap()
        .with_verify(policy(VerifyMode::Tags));
    source.fetch().unwrap();
    let refs = source.refs().unwrap();
    let check = |name: &str| {
        let target = refs.iter().find(|target| target.name == name).unwrap();
        source.check_signed(target).expect("a policy")
    };
    let signed = check("refs/tags/v1").unwrap();
    assert_eq!(signed.principals, "alice@example.com");
    for (name, why) in [
        ("refs/tags/v1-forged", "not an allowed signer"),
        ("refs/tags/v1-unsigned", "is not signed"),
        ("refs/tags/v1-light", "lightweight"),
        ("refs/heads/main", "branch"),
    ] {
        let refused = check(name).unwrap_err();
        assert!(refused.contains(why), "{name}: {refused}");
    }
    let commits = GitSource::open_or_init(&upstream.url(), &data.path().join("mirror"))
        .unwrap()
        .with_verify(policy(VerifyMode::Commits));
    let target = refs
        .iter()
        .find(|target| target.name == "refs/heads/main")
        .unwrap();
    assert_eq!(
        commits.check_signed(target).unwrap().unwrap().principals,
        "alice@example.com"
    );
}
