//! `outpost-hub`: the hub binary, a thin shell over the `outpost_hub` library.
//!
//! Today: `render` (check a bundle folder), `sync` (fetch a Git source and render its bundles at
//! every branch and tag into signed snapshots, once or on an interval), and `releases`, `events`
//! and `objects` to look at the store. Serving agents and the admin API come with the transport
//! and hub issues (see ARCHITECTURE.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use outpost_hub::config::Config;
use outpost_hub::git::GitSource;
use outpost_hub::keys::HubKeys;
use outpost_hub::store::{SqliteStore, Store};
use outpost_hub::sync::{SyncReport, sync_source};
use outpost_proto::{Body, SourceFile};

/// Outpost hub: reads Git, renders signed snapshots, serves edge agents.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Render a bundle folder (its *.yaml, *.yml and *.json files, recursively) into the canonical
    /// snapshot body and print its objects in apply order and its digest. Exits non-zero, naming
    /// the file, document and line, if any manifest is invalid.
    Render {
        /// The bundle folder.
        folder: PathBuf,
        /// Write the canonical body to this file as well.
        #[arg(long)]
        body_out: Option<PathBuf>,
    },
    /// Fetch a Git source into the data dir and render every bundle at every branch and tag into
    /// signed snapshots. Bundles come from outpost.yaml at the repository root, or are the
    /// top-level folders holding manifests. Keys are generated in DATA_DIR/keys on first run;
    /// give agents DATA_DIR/keys/root.pub.
    Sync {
        /// The hub's data dir (store, Git mirror, keys).
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: PathBuf,
        /// Git URL: a path, file://, git:// or http(s)://.
        #[arg(long, env = "OUTPOST_SOURCE")]
        source: String,
        /// Keep syncing every this many seconds (with backoff while the remote is unreachable).
        #[arg(long)]
        every: Option<u64>,
    },
    /// Run the hub from a config file: sync every source every poll interval, backing off per
    /// source while its remote is unreachable. (Serving agents and the admin API are not built
    /// yet.) Every config problem is reported at once before anything starts.
    Run {
        /// The TOML config file (see docs/hub-config.md); OUTPOST_HUB_* variables override it.
        #[arg(long, env = "OUTPOST_HUB_CONFIG")]
        config: PathBuf,
        /// Sync every source once and exit (non-zero if any fetch failed).
        #[arg(long)]
        once: bool,
    },
    /// Validate a config file (and OUTPOST_HUB_* overrides) and print the result.
    CheckConfig {
        /// The TOML config file.
        #[arg(long, env = "OUTPOST_HUB_CONFIG")]
        config: PathBuf,
    },
    /// List releases: each bundle at each branch and tag, with its generation or its error.
    Releases {
        /// The hub's data dir.
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show the event log (fetch failures, moved and deleted tags), newest first.
    Events {
        /// The hub's data dir.
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: PathBuf,
        /// How many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List the objects of one snapshot, in apply order.
    Objects {
        /// The hub's data dir.
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: PathBuf,
        /// Bundle name.
        bundle: String,
        /// Generation.
        generation: u64,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Render { folder, body_out } => render(&folder, body_out.as_deref()),
        Command::Sync {
            data_dir,
            source,
            every,
        } => sync(&data_dir, &source, every),
        Command::Run { config, once } => run(&load_config(&config)?, once),
        Command::CheckConfig { config } => {
            let config = load_config(&config)?;
            println!("{config:#?}");
            Ok(())
        }
        Command::Releases { data_dir, output } => releases(&data_dir, output),
        Command::Events {
            data_dir,
            limit,
            output,
        } => events(&data_dir, limit, output),
        Command::Objects {
            data_dir,
            bundle,
            generation,
        } => objects(&data_dir, &bundle, generation),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

fn open_store(data_dir: &Path) -> Result<SqliteStore> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let path = data_dir.join("hub.db");
    SqliteStore::open(&path).with_context(|| format!("opening the store {}", path.display()))
}

fn load_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    Config::parse(&text, |name| std::env::var(name).ok())
        .with_context(|| format!("in {}", path.display()))
}

fn load_keys(key_dir: &Path) -> Result<HubKeys> {
    let (keys, generated) =
        HubKeys::load_or_generate(key_dir, unix_now()).context("loading the signing keys")?;
    if generated {
        tracing::info!(
            root = %keys.root.key_id(),
            signer = %keys.signer.key_id(),
            "generated new signing keys in {}; give agents {} and keep root.key offline",
            key_dir.display(),
            key_dir.join("root.pub").display()
        );
    }
    Ok(keys)
}

/// Syncs every configured source on its own schedule.
fn run(config: &Config, once: bool) -> Result<()> {
    let mut store = open_store(&config.data_dir)?;
    let keys = load_keys(&config.key_dir)?;
    struct Scheduled {
        source: GitSource,
        due: std::time::Instant,
        failures: u32,
    }
    let mut sources = Vec::new();
    for source in &config.sources {
        let mirror = config.data_dir.join("git").join(&source.name);
        let git = GitSource::open_or_init(&source.url, &mirror)
            .with_context(|| format!("opening the mirror of source {}", source.name))?;
        sources.push(Scheduled {
            source: git,
            due: std::time::Instant::now(),
            failures: 0,
        });
    }
    loop {
        let mut any_failed = false;
        for scheduled in sources
            .iter_mut()
            .filter(|s| s.due <= std::time::Instant::now())
        {
            let report = sync_source(&mut store, &keys, &mut scheduled.source, unix_now())
                .with_context(|| format!("syncing {}", scheduled.source.url()))?;
            print_report(&report);
            scheduled.failures = match report.fetch_error {
                Some(_) => (scheduled.failures + 1).min(6),
                None => 0,
            };
            any_failed |= scheduled.failures > 0;
            scheduled.due =
                std::time::Instant::now() + backoff(config.poll_interval, scheduled.failures);
        }
        if once {
            if any_failed {
                bail!("a source could not be fetched; what was fetched before is still served");
            }
            return Ok(());
        }
        let next = sources
            .iter()
            .map(|s| s.due)
            .min()
            .unwrap_or_else(std::time::Instant::now);
        std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
    }
}

/// The wait after `failures` consecutive failed fetches: the interval doubled per failure, at
/// most 64 × the interval and at most an hour (never less than the interval).
fn backoff(interval: Duration, failures: u32) -> Duration {
    (interval * 2u32.pow(failures.min(6))).min(Duration::from_secs(3600).max(interval))
}

fn sync(data_dir: &Path, url: &str, every: Option<u64>) -> Result<()> {
    let mut store = open_store(data_dir)?;
    let keys = load_keys(&data_dir.join("keys"))?;
    let mirror = data_dir.join("git").join(hex::encode(
        &outpost_proto::Digest::of(url.as_bytes()).0[..8],
    ));
    let mut source = GitSource::open_or_init(url, &mirror).context("opening the Git mirror")?;
    let mut failures = 0u32;
    loop {
        let report = sync_source(&mut store, &keys, &mut source, unix_now()).context("syncing")?;
        print_report(&report);
        let Some(every) = every else {
            if report.fetch_error.is_some() {
                bail!("the remote could not be fetched; what was fetched before is still served");
            }
            return Ok(());
        };
        failures = match report.fetch_error {
            Some(_) => (failures + 1).min(6),
            None => 0,
        };
        std::thread::sleep(backoff(Duration::from_secs(every), failures));
    }
}

fn print_report(report: &SyncReport) {
    if let Some(error) = &report.fetch_error {
        eprintln!("fetch failed: {error}");
    }
    for (bundle, generation, git_ref) in &report.rendered {
        println!("rendered  {bundle} generation {generation} from {git_ref}");
    }
    for (git_ref, bundle, error) in &report.failed {
        println!("refused   {bundle} at {git_ref}: {error}");
    }
    println!(
        "{} rendered, {} unchanged, {} refused, {} ref changes",
        report.rendered.len(),
        report.unchanged,
        report.failed.len(),
        report.ref_changes.len()
    );
}

fn releases(data_dir: &Path, output: Output) -> Result<()> {
    let releases = open_store(data_dir)?.releases()?;
    match output {
        Output::Json => {
            let rows: Vec<serde_json::Value> = releases
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "source": r.source, "ref": r.git_ref, "bundle": r.bundle, "commit": r.git_commit,
                        "generation": r.generation, "error": r.error, "updated_at": r.updated_at,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            println!(
                "{:<32} {:<20} {:<12} {:>10}  STATUS",
                "REF", "BUNDLE", "COMMIT", "GENERATION"
            );
            for r in &releases {
                println!(
                    "{:<32} {:<20} {:<12} {:>10}  {}",
                    r.git_ref,
                    r.bundle,
                    &r.git_commit[..r.git_commit.len().min(12)],
                    r.generation.map_or("-".to_owned(), |g| g.to_string()),
                    r.error
                        .as_deref()
                        .map_or("ok".to_owned(), |e| format!("refused: {e}"))
                );
            }
        }
    }
    Ok(())
}

fn events(data_dir: &Path, limit: usize, output: Output) -> Result<()> {
    let events = open_store(data_dir)?.events(limit)?;
    match output {
        Output::Json => {
            let rows: Vec<serde_json::Value> = events
                .iter()
                .map(|e| serde_json::json!({"id": e.id, "at": e.at, "kind": e.kind, "subject": e.subject, "message": e.message}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            for e in &events {
                println!(
                    "{:>6} {:>12} {:<20} {:<30} {}",
                    e.id, e.at, e.kind, e.subject, e.message
                );
            }
        }
    }
    Ok(())
}

fn objects(data_dir: &Path, bundle: &str, generation: u64) -> Result<()> {
    let store = open_store(data_dir)?;
    let Some(snapshot) = store.snapshot(bundle, generation)? else {
        bail!(
            "no snapshot of bundle {bundle:?} at generation {generation}; see `outpost-hub releases`"
        );
    };
    println!(
        "snapshot {} ({} objects, from {} at {})",
        snapshot.digest, snapshot.object_count, snapshot.git_ref, snapshot.git_commit
    );
    print_objects(outpost_proto::body::parse_lines(&snapshot.body))
}

fn print_objects(
    objects: impl Iterator<Item = Result<serde_json::Value, outpost_proto::body::BodyError>>,
) -> Result<()> {
    for object in objects {
        let object = object.context("reading the snapshot body")?;
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"].as_str().unwrap_or("");
        println!(
            "{:<40} {:<32} {}{}{}",
            object["apiVersion"].as_str().unwrap_or(""),
            object["kind"].as_str().unwrap_or(""),
            namespace,
            if namespace.is_empty() { "" } else { "/" },
            metadata["name"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

fn render(folder: &Path, body_out: Option<&Path>) -> Result<()> {
    let mut paths = Vec::new();
    collect_manifests(folder, &mut paths)
        .with_context(|| format!("reading bundle folder {}", folder.display()))?;
    if paths.is_empty() {
        bail!(
            "{} holds no *.yaml, *.yml or *.json files: point at a bundle folder",
            folder.display()
        );
    }
    paths.sort();
    let mut texts = Vec::with_capacity(paths.len());
    for path in &paths {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {} (manifests must be UTF-8)", path.display()))?;
        let relative = path
            .strip_prefix(folder)
            .unwrap_or(path)
            .display()
            .to_string();
        texts.push((relative, text));
    }
    let files: Vec<SourceFile<'_>> = texts
        .iter()
        .map(|(path, text)| SourceFile { path, text })
        .collect();
    let body = Body::render(&files).context("rendering the bundle")?;
    print_objects(body.objects())?;
    println!(
        "{} objects from {} files, {} bytes, digest {}",
        body.object_count(),
        files.len(),
        body.as_bytes().len(),
        body.digest()
    );
    if let Some(out) = body_out {
        std::fs::write(out, body.as_bytes())
            .with_context(|| format!("writing the body to {}", out.display()))?;
    }
    Ok(())
}

fn collect_manifests(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_manifests(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml" || ext == "json")
        {
            out.push(path);
        }
    }
    Ok(())
}
