//! Bytes on the wire for snapshot updates, ours against the baselines, side by side in one run.
//!
//! Run: `cargo bench -p outpost-proto --bench snapshot_sizes` (reads `../shared/corpus`, or the
//! folder named by `OUTPOST_CORPUS`; needs `tar` and, for the zstd CLI column, `zstd` on PATH).
//!
//! For each step from one release folder to the next it prints: a tar.gz of the new folder (what a
//! full-artifact system ships), `zstd -19 --long --patch-from` of the concatenated YAML (the best
//! general-purpose delta), our whole-body zstd, our delta, and our header + signature; then
//! compression and decompression speeds. The same for a generated fleet repo of 2,000 objects.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use outpost_proto::compress::{
    DEFAULT_LEVEL, compress_delta, compress_whole, decompress_delta, decompress_whole,
};
use outpost_proto::{Body, SigningKey, SnapshotHeader, SourceFile};

/// One release: its files (relative path, text), in path order.
struct Release {
    name: String,
    files: Vec<(String, String)>,
}

#[derive(Default)]
struct Speeds {
    body_bytes: u64,
    compress_whole_s: f64,
    decompress_whole_s: f64,
    compress_delta_s: f64,
    decompress_delta_s: f64,
}

fn main() {
    let corpus = std::env::var_os("OUTPOST_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/kube-prometheus")
        });
    let scratch = std::env::temp_dir().join(format!("outpost-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("create scratch dir");
    let zstd_cli = Command::new("zstd").arg("--version").output().is_ok();
    if !zstd_cli {
        eprintln!(
            "note: zstd CLI not found; the zstd --patch-from column shows '-' (apt-get install zstd)"
        );
    }

    let mut out = String::new();
    match read_corpus(&corpus) {
        Ok(releases) => {
            writeln!(out, "## kube-prometheus corpus ({})\n", corpus.display()).unwrap();
            table(&mut out, &releases, None, &scratch, zstd_cli);
        }
        Err(error) => eprintln!("skipping the corpus at {}: {error}", corpus.display()),
    }
    let generated = generated_fleet();
    writeln!(out, "\n## generated fleet repo (2,000 objects, 400 apps)\n").unwrap();
    table(&mut out, &generated, Some(&scratch), &scratch, zstd_cli);
    println!("{out}");
    let _ = std::fs::remove_dir_all(&scratch);
}

fn read_corpus(root: &Path) -> std::io::Result<Vec<Release>> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir())
        .collect();
    // main-1 … main-6 then release-v0.15.0, release-v0.16.0: name order is history order.
    folders.sort();
    let mut releases = Vec::new();
    for folder in folders {
        let mut files = Vec::new();
        collect_yaml(&folder, &folder, &mut files)?;
        files.sort();
        releases.push(Release {
            name: folder.file_name().unwrap().to_string_lossy().into_owned(),
            files,
        });
    }
    Ok(releases)
}

fn collect_yaml(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(root, &path, out)?;
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            let relative = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((relative, std::fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

fn render(release: &Release) -> Body {
    let files: Vec<SourceFile<'_>> = release
        .files
        .iter()
        .map(|(path, text)| SourceFile { path, text })
        .collect();
    Body::render(&files).unwrap_or_else(|error| panic!("{}: {error}", release.name))
}

fn header_and_signature_len(body: &Body, release: &Release) -> usize {
    let key = SigningKey::from_seed([42; 32]);
    let header = SnapshotHeader {
        bundle: "kube-prometheus".to_owned(),
        generation: 1,
        git_commit: "13bda4fc653a9b8e2b4c1c0d5e2f3a4b5c6d7e8f".to_owned(),
        git_ref: format!("refs/tags/{}", release.name),
        body_digest: body.digest(),
        body_size: body.as_bytes().len() as u64,
        object_count: body.object_count(),
        created_at: 1_795_000_000,
        expires_at: Some(1_797_592_000),
        selector: "region=eu,role=store".to_owned(),
        key_id: key.key_id(),
    };
    let (bytes, signature) = header.sign(&key).unwrap();
    bytes.len() + signature.0.len()
}

/// Writes the release's files under `dir/name` and returns that folder.
fn materialise(release: &Release, dir: &Path) -> PathBuf {
    let folder = dir.join(&release.name);
    for (path, text) in &release.files {
        let path = folder.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    folder
}

fn tar_gz_len(folder: &Path) -> Option<usize> {
    let output = Command::new("tar")
        .arg("-czf")
        .arg("-")
        .arg("-C")
        .arg(folder)
        .arg(".")
        .output()
        .ok()?;
    output.status.success().then_some(output.stdout.len())
}

fn concatenated(release: &Release) -> Vec<u8> {
    release
        .files
        .iter()
        .flat_map(|(_, text)| text.bytes())
        .collect()
}

fn zstd_patch_from_len(old: &[u8], new: &[u8], scratch: &Path) -> Option<usize> {
    let old_path = scratch.join("old.yaml");
    let new_path = scratch.join("new.yaml");
    std::fs::write(&old_path, old).ok()?;
    std::fs::write(&new_path, new).ok()?;
    let output = Command::new("zstd")
        .args(["-19", "--long", "-q", "-c"])
        .arg(format!("--patch-from={}", old_path.display()))
        .arg(&new_path)
        .output()
        .ok()?;
    output.status.success().then_some(output.stdout.len())
}

fn timed<T>(work: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let value = work();
    (value, start.elapsed().as_secs_f64())
}

/// Prints one row per step. `materialise_in` is set when the releases exist only in memory.
fn table(
    out: &mut String,
    releases: &[Release],
    materialise_in: Option<&Path>,
    scratch: &Path,
    zstd_cli: bool,
) {
    writeln!(out, "| step | objects | body bytes | tar.gz | zstd -19 --long --patch-from (YAML) | ours whole (zstd -19) | ours delta | header+sig | tar.gz ÷ ours delta | ours delta ÷ zstd CLI |").unwrap();
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    let mut speeds = Speeds::default();
    let bodies: Vec<Body> = releases.iter().map(render).collect();
    for (index, pair) in releases.windows(2).enumerate() {
        let (old, new) = (&pair[0], &pair[1]);
        let (old_body, new_body) = (&bodies[index], &bodies[index + 1]);
        let folder = match materialise_in {
            Some(dir) => materialise(new, dir),
            None => std::env::var_os("OUTPOST_CORPUS")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../../shared/corpus/kube-prometheus")
                })
                .join(&new.name),
        };
        let tar_gz = tar_gz_len(&folder);
        let cli = zstd_cli
            .then(|| zstd_patch_from_len(&concatenated(old), &concatenated(new), scratch))
            .flatten();
        let (whole, compress_whole_s) =
            timed(|| compress_whole(new_body.as_bytes(), DEFAULT_LEVEL).unwrap());
        let (delta, compress_delta_s) = timed(|| {
            compress_delta(old_body.as_bytes(), new_body.as_bytes(), DEFAULT_LEVEL).unwrap()
        });
        let size = new_body.as_bytes().len() as u64;
        let (rebuilt, decompress_whole_s) = timed(|| decompress_whole(&whole, size).unwrap());
        assert_eq!(rebuilt, new_body.as_bytes());
        let (rebuilt, decompress_delta_s) =
            timed(|| decompress_delta(old_body.as_bytes(), &delta, size).unwrap());
        assert_eq!(rebuilt, new_body.as_bytes());
        speeds.body_bytes += size;
        speeds.compress_whole_s += compress_whole_s;
        speeds.decompress_whole_s += decompress_whole_s;
        speeds.compress_delta_s += compress_delta_s;
        speeds.decompress_delta_s += decompress_delta_s;
        let show = |value: Option<usize>| value.map_or("-".to_owned(), |v| v.to_string());
        let ratio = |a: Option<usize>, b: usize| {
            a.map_or("-".to_owned(), |a| format!("{:.0}×", a as f64 / b as f64))
        };
        let against_cli = cli.map_or("-".to_owned(), |cli| {
            format!("{:.2}", delta.len() as f64 / cli as f64)
        });
        writeln!(
            out,
            "| {} → {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            old.name,
            new.name,
            new_body.object_count(),
            size,
            show(tar_gz),
            show(cli),
            whole.len(),
            delta.len(),
            header_and_signature_len(new_body, new),
            ratio(tar_gz, delta.len()),
            against_cli,
        )
        .unwrap();
    }
    let mb = speeds.body_bytes as f64 / 1e6;
    writeln!(
        out,
        "\nSpeed over these steps ({mb:.1} MB of bodies, level {DEFAULT_LEVEL}): compress whole {:.1} MB/s, decompress whole {:.0} MB/s, compress delta {:.1} MB/s, decompress delta {:.0} MB/s.",
        mb / speeds.compress_whole_s,
        mb / speeds.decompress_whole_s,
        mb / speeds.compress_delta_s,
        mb / speeds.decompress_delta_s,
    )
    .unwrap();
}

/// A deterministic fleet repo: 400 apps × (Deployment, Service, ConfigMap, ServiceAccount,
/// PodDisruptionBudget) = 2,000 objects, one file per app, and four steps after it.
fn generated_fleet() -> Vec<Release> {
    let base = Fleet::new(400);
    let mut image = base.clone();
    image.apps[137].image_tag = "1.27.4".to_owned();
    let mut replicas = image.clone();
    replicas.apps[250].replicas = 5;
    let mut added = replicas.clone();
    added.extra_config_map = true;
    let mut tenth = added.clone();
    for app in tenth.apps.iter_mut().step_by(10) {
        app.log_level = "debug".to_owned();
        app.image_tag = format!("{}-r2", app.image_tag);
    }
    [
        ("base", base),
        ("image-tag", image),
        ("replicas", replicas),
        ("one-object-added", added),
        ("10%-changed", tenth),
    ]
    .into_iter()
    .map(|(name, fleet)| fleet.release(name))
    .collect()
}

#[derive(Clone)]
struct App {
    name: String,
    image_tag: String,
    replicas: u32,
    log_level: String,
    port: u32,
}

#[derive(Clone)]
struct Fleet {
    apps: Vec<App>,
    extra_config_map: bool,
}

impl Fleet {
    fn new(n_apps: usize) -> Fleet {
        let mut state: u64 = 0x5eed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words = [
            "pos", "kiosk", "camera", "scale", "printer", "sensor", "gateway", "ledger", "menu",
            "door",
        ];
        let apps = (0..n_apps)
            .map(|index| App {
                name: format!(
                    "{}-{}-{index}",
                    words[next() as usize % 10],
                    words[next() as usize % 10]
                ),
                image_tag: format!("1.{}.{}", next() % 30, next() % 10),
                replicas: 1 + (next() % 3) as u32,
                log_level: "info".to_owned(),
                port: 8000 + (next() % 1000) as u32,
            })
            .collect();
        Fleet {
            apps,
            extra_config_map: false,
        }
    }

    fn release(&self, name: &str) -> Release {
        let mut files: Vec<(String, String)> = self
            .apps
            .iter()
            .map(|app| (format!("apps/{}.yaml", app.name), app_yaml(app)))
            .collect();
        if self.extra_config_map {
            files.push(("apps/zz-feature-flags.yaml".to_owned(), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: feature-flags\n  namespace: store\ndata:\n  new-checkout: \"true\"\n".to_owned()));
        }
        files.sort();
        Release {
            name: name.to_owned(),
            files,
        }
    }
}

fn app_yaml(app: &App) -> String {
    let App {
        name,
        image_tag,
        replicas,
        log_level,
        port,
    } = app;
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: store
  labels: {{app.kubernetes.io/name: {name}, app.kubernetes.io/part-of: store}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app.kubernetes.io/name: {name}}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: {name}, app.kubernetes.io/part-of: store}}
    spec:
      serviceAccountName: {name}
      containers:
      - name: {name}
        image: registry.example.com/store/{name}:{image_tag}
        ports: [{{containerPort: {port}, name: http}}]
        envFrom: [{{configMapRef: {{name: {name}}}}}]
        resources:
          requests: {{cpu: 50m, memory: 64Mi}}
          limits: {{memory: 128Mi}}
        readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 10}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: store}}
spec:
  selector: {{app.kubernetes.io/name: {name}}}
  ports: [{{port: 80, targetPort: http}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}, namespace: store}}
data:
  LOG_LEVEL: {log_level}
  LISTEN: \":{port}\"
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: store}}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {{name: {name}, namespace: store}}
spec:
  maxUnavailable: 1
  selector:
    matchLabels: {{app.kubernetes.io/name: {name}}}
"
    )
}
