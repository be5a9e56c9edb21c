//! Time and peak memory for the hub to render a repository of 50 bundles × 200 objects: at a new
//! commit (everything renders), and at a commit that changes one file (one bundle renders).
//!
//! Run: `cargo bench -p outpost-hub --bench render`. Each sync runs in a child process (this
//! binary with `--phase-sync`) so its peak RSS (VmHWM) is its own.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use outpost_hub::git::GitSource;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::store::SqliteStore;
use outpost_hub::sync::sync_source;

const BUNDLES: usize = 50;
const OBJECTS_PER_BUNDLE: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--phase-sync") {
        phase_sync(Path::new(&args[at + 1]), &args[at + 2]);
        return;
    }
    let repo = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(
        repo.path(),
        &["config", "user.email", "bench@outpost.invalid"],
    );
    git(repo.path(), &["config", "user.name", "bench"]);
    for bundle in 0..BUNDLES {
        for file in 0..OBJECTS_PER_BUNDLE / 4 {
            write(repo.path(), bundle, file, "1");
        }
    }
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "fleet"]);
    let url = format!("file://{}", repo.path().display());
    let data_dir = data.path().to_str().unwrap();

    println!("| sync | bundles rendered | wall time | peak RSS |\n|---|---:|---:|---:|");
    run(data_dir, &url, "new commit: 50 bundles × 200 objects");
    write(repo.path(), 17, 3, "2");
    git(repo.path(), &["commit", "-qam", "one file"]);
    run(data_dir, &url, "commit changing one file");
    run(data_dir, &url, "no change");
}

/// Four objects per file: Deployment, Service, ConfigMap, ServiceAccount.
fn write(repo: &Path, bundle: usize, file: usize, version: &str) {
    let name = format!("svc-{file}");
    let text = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: b{bundle}, labels: {{app: {name}}}}}\n\
         spec:\n  replicas: 2\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    \
         spec:\n      containers:\n      - {{name: app, image: 'registry.example.com/{name}:{version}.{bundle}', ports: [{{containerPort: 8080}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: b{bundle}}}\nspec: {{selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
         ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: b{bundle}}}\ndata: {{LEVEL: info, VERSION: '{version}'}}\n\
         ---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: b{bundle}}}\n"
    );
    let path = repo.join(format!("bundle-{bundle:02}/{name}.yaml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn git(repo: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(repo)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

fn run(data_dir: &str, url: &str, label: &str) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--phase-sync", data_dir, url])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut fields = text.split_whitespace();
    let rendered: usize = fields.next().unwrap().parse().unwrap();
    let millis: f64 = fields.next().unwrap().parse().unwrap();
    let peak_kb: u64 = fields.next().unwrap().parse().unwrap();
    println!(
        "| {label} | {rendered} | {:.2} s | {:.1} MB |",
        millis / 1000.0,
        peak_kb as f64 / 1024.0
    );
}

fn phase_sync(data_dir: &Path, url: &str) {
    let start = Instant::now();
    let keys =
        HubKeys::create(&data_dir.join("keys"), KeyPolicy::default(), 1_800_000_000).unwrap();
    let store = SqliteStore::open(&data_dir.join("hub.db")).unwrap();
    let source = GitSource::open_or_init(url, &data_dir.join("mirror")).unwrap();
    let report = sync_source(&store, &keys, &source, 1_800_000_000).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    println!("{} {elapsed} {peak_kb}", report.rendered.len());
}
