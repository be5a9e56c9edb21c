//! Runs the real `outpost-hub render` binary on bundle folders made by the test.

use std::path::Path;
use std::process::{Command, Output};

fn render(folder: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .arg("render")
        .arg(folder)
        .output()
        .expect("run outpost-hub")
}

fn bundle(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-render-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

#[test]
fn renders_objects_in_apply_order_with_a_stable_digest() {
    let files = [
        (
            "app/deploy.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n",
        ),
        (
            "ns.yaml",
            "# the namespace\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        ),
    ];
    let first = render(&bundle("a", &files));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8(first.stdout).unwrap();
    let namespace_at = stdout.find("Namespace").unwrap();
    let deployment_at = stdout.find("Deployment").unwrap();
    assert!(namespace_at < deployment_at, "{stdout}");
    assert!(stdout.contains("2 objects from 2 files"), "{stdout}");
    // The same objects split and formatted differently give the same digest.
    let other = render(&bundle(
        "b",
        &[(
            "all.yml",
            "kind: Namespace\napiVersion: v1\nmetadata:\n  name: shop\n---\nmetadata:\n  namespace: shop\n  name: web\nkind: Deployment\napiVersion: apps/v1\n",
        )],
    ));
    let other = String::from_utf8(other.stdout).unwrap();
    let digest = |text: &str| text.rsplit("digest ").next().unwrap().trim().to_owned();
    assert_eq!(digest(&stdout), digest(&other));
}

#[test]
fn invalid_yaml_fails_naming_file_and_line() {
    let output = render(&bundle(
        "bad",
        &[
            (
                "good.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
            ),
            (
                "broken.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n",
            ),
        ],
    ));
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("broken.yaml:"), "{stderr}");
    assert!(stderr.contains("invalid YAML"), "{stderr}");
}

#[test]
fn missing_name_and_empty_folder_say_what_to_do() {
    let output = render(&bundle(
        "noname",
        &[(
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {labels: {a: b}}\n",
        )],
    ));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("cm.yaml: document 1 (line 1): missing metadata.name"),
        "{stderr}"
    );
    let output = render(&bundle("empty", &[("README.md", "no manifests")]));
    assert!(!output.status.success());
    assert!(
        String::from_utf8(output.stderr)
            .unwrap()
            .contains("holds no *.yaml")
    );
}
