//! `outpost-hub`: the hub binary, a thin shell over the `outpost_hub` library.
//!
//! `run` serves the admin API and syncs the configured Git sources; the operator commands
//! (`releases`, `agents`, `tokens`, …) are clients of that API (`cli/`); `keys`, `sync`,
//! `render` and the first `admin-token create` work locally without a running hub.

mod cli;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use outpost_hub::config::{Config, StoreConfig};
use outpost_hub::git::GitSource;
use outpost_hub::keys::{HubKeys, KeyPolicy};
use outpost_hub::store::{HubStore, PostgresStore, ReplicaStore, SqliteStore};
use outpost_hub::sync::{SyncReport, sync_source};
use outpost_proto::{Body, SourceFile};

use crate::cli::client::{ApiArgs, label_changes, print_document, print_rows, select_rows};

/// The version and the Git commit built from (`--version`, `version`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("OUTPOST_GIT_COMMIT"),
    ")"
);

/// Outpost hub: reads Git, renders signed snapshots, serves edge agents.
#[derive(Debug, Parser)]
#[command(version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people; times as ages (`5m ago`), labels as `k=v`.
    Table,
    /// The table with more columns, and times as dates.
    Wide,
    /// JSON for scripts; times as RFC 3339 dates.
    Json,
    /// YAML; times as RFC 3339 dates.
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Render a bundle folder (its *.yaml, *.yml and *.json files, recursively; or, if it holds a
    /// kustomization.yaml, what `kustomize build` makes of it, under the hub's restrictions) into
    /// the canonical snapshot body and print its objects in apply order and its digest. Exits
    /// non-zero, naming the file, document and line, if any manifest is invalid.
    Render {
        /// The bundle folder.
        folder: PathBuf,
        /// Write the canonical body to this file as well.
        #[arg(long)]
        body_out: Option<PathBuf>,
        /// Build a kustomization even where no network namespace can be made for it (macOS, a
        /// container without user namespaces): the checks of each kustomization still run, but
        /// nothing else stops a fetch it asks for. Without it such a build is refused.
        #[arg(long)]
        unisolated: bool,
    },
    /// Fetch a Git source into the data dir once and render every bundle at every branch and tag
    /// into signed snapshots (for a hub that keeps syncing, use `run`). Bundles come from
    /// outpost.yaml at the repository root, or are the top-level folders holding manifests.
    /// Signs with the keys in DATA_DIR/keys (`outpost-hub keys init --key-dir DATA_DIR/keys`).
    Sync {
        /// The hub's data dir (store, Git mirror, keys).
        #[arg(long, env = "OUTPOST_DATA_DIR")]
        data_dir: PathBuf,
        /// Git URL: a path, file://, git:// or http(s)://.
        #[arg(long, env = "OUTPOST_SOURCE")]
        source: String,
    },
    /// Run the hub from a config file: sync every source every poll interval (backing off per
    /// source while its remote is unreachable) or when its webhook says so, serve agents over
    /// QUIC, drive rollouts, and serve the admin API and the fleet page (http(s)://ADMIN/).
    /// Every config problem is reported at once before anything starts. Needs the keys
    /// (`outpost-hub keys init`) and, to call the API, a token (`outpost-hub admin-token
    /// create --config FILE --name NAME --role admin`).
    Run {
        /// The TOML config file (see docs/hub-config.md); OUTPOST_HUB_* variables override it.
        #[arg(long, env = "OUTPOST_HUB_CONFIG")]
        config: PathBuf,
        /// Sync every source once and exit (non-zero if any fetch failed).
        #[arg(long)]
        once: bool,
    },
    /// Copy a stopped hub's SQLite store into an empty PostgreSQL database (to run replicas),
    /// then check the copy: each table's row count and a SHA-256 of its rows in key order must
    /// match, and every snapshot body must hash to its digest. The SQLite file is not changed;
    /// a copy that fails leaves the database empty. Afterwards set `store = "postgres://…"`
    /// (and `store_password_env` or `store_password_file`) in every replica's config.
    Migrate {
        /// The store to copy: sqlite:PATH (a hub's is DATA_DIR/hub.db).
        #[arg(long)]
        from: String,
        /// The empty database: postgres://USER@HOST:PORT/DATABASE.
        #[arg(long)]
        to: String,
        /// The environment variable holding the database password.
        #[arg(long)]
        password_env: Option<String>,
        /// A file holding the database password.
        #[arg(long, conflicts_with = "password_env")]
        password_file: Option<PathBuf>,
        /// The CA that signed the database server's certificate (PEM): connect over TLS and
        /// check the certificate against it (`?sslmode=require` in the URL does TLS with the
        /// Mozilla roots).
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Print the version and the Git commit this binary was built from.
    Version,
    /// Print a shell completion script: `outpost-hub completions bash >
    /// /etc/bash_completion.d/outpost-hub` (or zsh into a folder on $fpath as `_outpost-hub`, fish into
    /// ~/.config/fish/completions/outpost-hub.fish).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Validate a config file (and OUTPOST_HUB_* overrides) and print the result.
    CheckConfig {
        /// The TOML config file.
        #[arg(long, env = "OUTPOST_HUB_CONFIG")]
        config: PathBuf,
    },
    /// What a rollout of a bundle's release at a tag would change, before it is created: which
    /// agents, in how many render variants, and per variant and current release the objects
    /// added (+), changed (~, field by field; Secret values redacted) and removed (-).
    Diff {
        #[command(flatten)]
        api: ApiArgs,
        /// The bundle.
        #[arg(long)]
        bundle: String,
        /// The Git tag (v1.2) or full ref.
        #[arg(long)]
        tag: String,
        /// Which agents, as a label selector (default: every agent the bundle selects).
        #[arg(long, short = 'l', default_value = "")]
        selector: String,
    },
    /// One agent's time line, oldest first: enrolment, labels, revocation, API writes naming it
    /// (who), the rollouts that released to it or rolled it back (who and why), the status
    /// reports it sent (what it installed and applied, how it went), and what it runs now.
    History {
        #[command(flatten)]
        api: ApiArgs,
        /// The agent's id.
        #[arg(long)]
        agent: String,
        /// Only what happened since: a duration back from now (30m, 2h, 7d) or an RFC 3339
        /// date (2026-12-01T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
    },
    /// Drift the agents found, newest first: one row per field that differed from Git (or per
    /// object deleted), with the desired and live values (Secret values redacted) and the field
    /// manager that changed it. ACTION is `corrected` (applied back) or `left` (the bundle says
    /// `drift: report`: left in place and reported until Git or the cluster changes; a `left`
    /// row without an object says that drift is gone).
    Drift {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Only this bundle's.
        #[arg(long)]
        bundle: Option<String>,
        /// Only since: a duration back from now (30m, 2h, 7d) or an RFC 3339 date.
        #[arg(long)]
        since: Option<String>,
        /// At most this many reports.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List bundles with their newest generation (admin API).
    Bundles(ApiArgs),
    /// List releases: each bundle at each branch and tag, with its generation or its error.
    Releases(ApiArgs),
    /// Show one snapshot's signed header fields.
    Snapshot {
        #[command(flatten)]
        api: ApiArgs,
        /// Bundle name.
        bundle: String,
        /// Generation.
        generation: u64,
    },
    /// List the objects of one snapshot, in apply order (Secret values redacted).
    Objects {
        #[command(flatten)]
        api: ApiArgs,
        /// Bundle name.
        bundle: String,
        /// Generation.
        generation: u64,
        /// Show Secret values (admin tokens only; recorded in the hub's log).
        #[arg(long)]
        reveal_secrets: bool,
    },
    /// Show the event log (fetch failures, moved tags, enrolments, revocations, key changes,
    /// every API write and who made it), newest first.
    Events {
        #[command(flatten)]
        api: ApiArgs,
        /// How many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Ask the hub to fetch every source now (a source's webhook, POST /hooks/git/SOURCE,
    /// fetches that source only).
    FetchNow(ApiArgs),
    /// The configured Git sources: fetches so far, the last one's time and error, webhooks.
    Sources(ApiArgs),
    /// Enrolled agents: list, show, label, revoke.
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Single-use enrolment tokens: create, list.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Rollouts by tag: create, list, show, pause, resume, abort, rollback, watch.
    Rollout {
        #[command(subcommand)]
        command: cli::rollout::RolloutCommand,
    },
    /// The key ceremony: init, rotate, renew, revoke (with the root key, offline); status and
    /// reload of the running hub's keys.
    Keys {
        #[command(subcommand)]
        command: cli::keys::KeysCommand,
    },
    /// API tokens for operators and scripts: create, list, revoke.
    AdminToken {
        #[command(subcommand)]
        command: cli::tokens::AdminTokenCommand,
    },
    /// Check an API token against a hub and keep it (mode 0600) for later commands: the token
    /// from OUTPOST_TOKEN or standard input.
    Login(ApiArgs),
    /// Forget the token kept for a hub.
    Logout(ApiArgs),
    /// The last status each agent reported for each bundle.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Only this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only agents whose labels match this selector (e.g. `region=eu,!canary`).
        #[arg(long, short = 'l')]
        selector: Option<String>,
    },
}

/// A list command: the API, and which rows.
#[derive(Debug, Clone, clap::Args)]
struct ListArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Only rows whose labels match this Kubernetes-style selector: `k=v`, `k!=v`,
    /// `k in (a,b)`, `k notin (a)`, `k`, `!k`, joined by commas (all must hold).
    #[arg(long, short = 'l')]
    selector: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    /// List agents with labels and state.
    List(ListArgs),
    /// Show one agent.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        /// Agent id.
        id: String,
    },
    /// Set labels (key=value) or remove them (key-).
    Label {
        #[command(flatten)]
        api: ApiArgs,
        /// Agent id.
        id: String,
        /// Changes: key=value sets, key- removes.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Revoke an agent: it is refused from its next connection on.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// Agent id.
        id: String,
        /// Why (recorded with your API token's name).
        #[arg(long)]
        why: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create a single-use enrolment token; it is printed once and cannot be shown again.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// Labels the enrolling agent gets (repeat: --label region=eu --label role=store).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Seconds until the token expires (default 7 days).
        #[arg(long, default_value_t = 7 * 24 * 3600)]
        ttl_seconds: i64,
        /// Write the enrolment bundle (hub address, hub key pin, root key, token) to this file
        /// (mode 0600) for the device: `outpost-agent enrol --bundle FILE`.
        #[arg(long)]
        bundle_file: Option<PathBuf>,
    },
    /// List tokens (their digests) and whether they were used.
    List(ListArgs),
    /// Revoke an enrolment token that was not used yet (leaked, or handed to a device that will
    /// not come): it can enrol nothing from now on. A used token: revoke its agent instead.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// The token's digest, or its first 8 or more hex digits (`tokens list`).
        digest: String,
        /// Why (recorded with your API token's name).
        #[arg(long)]
        why: String,
    },
}

/// `--since`: a duration back from now (30m, 2h, 7d) or an RFC 3339 date.
fn parse_since(text: &str) -> Result<i64> {
    Ok(match outpost_proto::time::parse_rfc3339(text) {
        Some(at) => at,
        None => {
            unix_now()
                - cli::rollout::parse_duration(text).map_err(|error| {
                    anyhow::anyhow!(
                        "--since {error}; or give an RFC 3339 date such as 2026-12-01T00:00:00Z"
                    )
                })?
        }
    })
}

fn main() -> Result<()> {
    outpost_proto::logging::init("info");
    match Cli::parse().command {
        Command::Render {
            folder,
            body_out,
            unisolated,
        } => render(&folder, body_out.as_deref(), unisolated),
        Command::Sync { data_dir, source } => sync(&data_dir, &source),
        Command::Run { config, once } => {
            let config = load_config(&config)?;
            match once {
                true => run(&config),
                false => serve::serve(&config),
            }
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "outpost-hub",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Version => {
            println!("outpost-hub {VERSION}");
            Ok(())
        }
        Command::Migrate {
            from,
            to,
            password_env,
            password_file,
            ca_file,
        } => migrate(
            &from,
            &to,
            password_env.as_deref(),
            password_file.as_deref(),
            ca_file.as_deref(),
        ),
        Command::CheckConfig { config } => {
            let config = load_config(&config)?;
            println!("{config:#?}");
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        Command::Diff {
            api,
            bundle,
            tag,
            selector,
        } => {
            let preview = cli::rollout::preview(
                &api.client()?,
                &bundle,
                &tag,
                &selector,
                "1,10%,50%,100%",
                "0",
            )?;
            if !print_document(&preview, api.output) {
                cli::rollout::print_diff(&preview);
            }
            Ok(())
        }
        Command::Drift {
            api,
            agent,
            bundle,
            since,
            limit,
        } => {
            let since = since.as_deref().map(parse_since).transpose()?;
            let (limit, since) = (limit.to_string(), since.map(|at| at.to_string()));
            let path = format!(
                "/api/v1/drift{}",
                cli::client::query(&[
                    ("limit", &limit),
                    ("since", since.as_deref().unwrap_or_default()),
                    ("agent", agent.as_deref().unwrap_or_default()),
                    ("bundle", bundle.as_deref().unwrap_or_default()),
                ])
            );
            let reports = api.client()?.get(&path)?;
            if print_document(&reports, api.output) {
                return Ok(());
            }
            print_rows(
                &cli::client::drift_rows(&reports),
                api.output,
                &[
                    ("received_at", "AT"),
                    ("agent", "AGENT"),
                    ("bundle", "BUNDLE"),
                    ("generation", "+GENERATION"),
                    ("action", "ACTION"),
                    ("object", "OBJECT"),
                    ("field", "FIELD"),
                    ("desired", "DESIRED"),
                    ("live", "LIVE"),
                    ("manager", "MANAGER"),
                    ("changed", "+CHANGED"),
                ],
            );
            Ok(())
        }
        Command::History { api, agent, since } => {
            let since = match since.as_deref() {
                None => 0,
                Some(text) => parse_since(text)?,
            };
            let rows = api
                .client()?
                .get(&format!("/api/v1/agents/{agent}/history?since={since}"))?;
            print_rows(
                &rows,
                api.output,
                &[
                    ("at", "AT"),
                    ("kind", "KIND"),
                    ("bundle", "BUNDLE"),
                    ("who", "WHO"),
                    ("what", "WHAT"),
                ],
            );
            Ok(())
        }
        Command::Bundles(api) => {
            let rows = api.client()?.get("/api/v1/bundles")?;
            print_rows(
                &rows,
                api.output,
                &[
                    ("bundle", "BUNDLE"),
                    ("newest_generation", "NEWEST GENERATION"),
                    ("releases", "RELEASES"),
                ],
            );
            Ok(())
        }
        Command::Releases(api) => {
            let rows = api.client()?.get("/api/v1/releases")?;
            print_rows(
                &rows,
                api.output,
                &[
                    ("ref", "REF"),
                    ("bundle", "BUNDLE"),
                    ("variant", "VARIANT"),
                    ("commit", "COMMIT"),
                    ("generation", "GENERATION"),
                    ("error", "ERROR"),
                ],
            );
            Ok(())
        }
        Command::Snapshot {
            api,
            bundle,
            generation,
        } => {
            let snapshot = api
                .client()?
                .get(&format!("/api/v1/snapshots/{bundle}/{generation}"))?;
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
            Ok(())
        }
        Command::Objects {
            api,
            bundle,
            generation,
            reveal_secrets,
        } => {
            let query = if reveal_secrets {
                "?secrets=reveal"
            } else {
                ""
            };
            let objects = api.client()?.get(&format!(
                "/api/v1/snapshots/{bundle}/{generation}/objects{query}"
            ))?;
            if !print_document(&objects, api.output) {
                print_objects(
                    objects
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(Ok),
                )?;
            }
            Ok(())
        }
        Command::Events { api, limit } => {
            let rows = api
                .client()?
                .get(&format!("/api/v1/events?limit={limit}"))?;
            print_rows(
                &rows,
                api.output,
                &[
                    ("id", "ID"),
                    ("at", "AT"),
                    ("kind", "KIND"),
                    ("subject", "SUBJECT"),
                    ("message", "MESSAGE"),
                ],
            );
            Ok(())
        }
        Command::FetchNow(api) => {
            let answer = api.client()?.post("/api/v1/fetch", serde_json::json!({}))?;
            println!("{}", answer["status"].as_str().unwrap_or("requested"));
            Ok(())
        }
        Command::Sources(api) => {
            let rows = api.client()?.get("/api/v1/sources")?;
            print_rows(
                &rows,
                api.output,
                &[
                    ("name", "NAME"),
                    ("url", "URL"),
                    ("track", "TRACK"),
                    ("webhook", "WEBHOOK"),
                    ("fetches", "FETCHES"),
                    ("last_fetch_at", "LAST FETCH"),
                    ("last_error", "LAST ERROR"),
                ],
            );
            Ok(())
        }
        Command::Agents { command } => agents(command),
        Command::Tokens { command } => tokens(command),
        Command::Rollout { command } => cli::rollout::rollout(command),
        Command::Keys { command } => cli::keys::keys(command),
        Command::AdminToken { command } => cli::tokens::admin_token(command),
        Command::Login(api) => cli::tokens::login(&api),
        Command::Logout(api) => cli::tokens::logout(&api),
        Command::Status {
            api,
            agent,
            selector,
        } => {
            let path = match agent {
                Some(agent) => format!("/api/v1/status?agent={agent}"),
                None => "/api/v1/status".to_owned(),
            };
            let client = api.client()?;
            let mut rows = client.get(&path)?;
            if selector.is_some() {
                let chosen: std::collections::BTreeSet<String> =
                    select_rows(client.get("/api/v1/agents")?, selector.as_deref())?
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|agent| agent["id"].as_str().map(str::to_owned))
                        .collect();
                rows = serde_json::Value::Array(
                    rows.as_array()
                        .into_iter()
                        .flatten()
                        .filter(|row| row["agent"].as_str().is_some_and(|id| chosen.contains(id)))
                        .cloned()
                        .collect(),
                );
            }
            print_rows(
                &rows,
                api.output,
                &[
                    ("agent", "AGENT"),
                    ("bundle", "BUNDLE"),
                    ("generation", "GENERATION"),
                    ("phase", "PHASE"),
                    ("stale", "STALE"),
                    ("objects_ready", "READY"),
                    ("objects_total", "TOTAL"),
                    ("observed_at", "+OBSERVED"),
                    ("received_at", "+RECEIVED"),
                    ("message", "MESSAGE"),
                ],
            );
            Ok(())
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

/// The store the configuration names: SQLite in the data dir, or a PostgreSQL database.
pub(crate) fn open_configured_store(config: &Config) -> Result<Arc<dyn HubStore>> {
    Ok(open_shared_store(config)?.0)
}

/// A store, and the same store as replicas share it (PostgreSQL only).
pub(crate) type OpenedStore = (Arc<dyn HubStore>, Option<Arc<dyn ReplicaStore>>);

/// [`open_configured_store`], and the same store as replicas share it (PostgreSQL).
pub(crate) fn open_shared_store(config: &Config) -> Result<OpenedStore> {
    match &config.store {
        StoreConfig::Sqlite => Ok((Arc::new(open_store(&config.data_dir)?), None)),
        StoreConfig::Postgres {
            url,
            password,
            ca_file,
        } => {
            let store = PostgresStore::connect_with(
                url,
                password.as_ref().map(|p| p.0.as_str()),
                ca_file.as_deref(),
            )
            .with_context(|| {
                format!(
                    "connecting to the store {} (store in the config)",
                    outpost_hub::store::postgres::redact(url)
                )
            })?;
            tracing::info!(
                store = store.target(),
                tls = store.tls(),
                "store: PostgreSQL"
            );
            Ok((Arc::new(store.clone()), Some(Arc::new(store))))
        }
    }
}

pub(crate) fn open_store(data_dir: &Path) -> Result<SqliteStore> {
    outpost_hub::files::private_dir(data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let path = data_dir.join("hub.db");
    SqliteStore::open(&path).with_context(|| format!("opening the store {}", path.display()))
}

pub(crate) fn load_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    Config::parse(&text, |name| std::env::var(name).ok())
        .with_context(|| format!("in {}", path.display()))
}

/// Loads the hub's keys; says how to make them when there are none. Never makes a key.
pub(crate) fn load_keys(key_dir: &Path, policy: KeyPolicy) -> Result<HubKeys> {
    let keys = HubKeys::load(key_dir, policy).context("loading the hub's keys")?;
    for warning in keys.status(unix_now()).warnings {
        tracing::warn!("{warning}");
    }
    Ok(keys)
}

/// Syncs every configured source once.
fn run(config: &Config) -> Result<()> {
    let store = open_configured_store(config)?;
    let store = &*store;
    let keys = load_keys(&config.key_dir, config.key_policy.clone())?;
    outpost_hub::resign::refresh_keys(store, &keys, unix_now()).context("reading the key dir")?;
    let mut any_failed = false;
    for source in &config.sources {
        let git = config
            .open_source(source)
            .with_context(|| format!("opening the mirror of source {}", source.name))?;
        let now = unix_now();
        let report = sync_source(store, &keys, &git, now)
            .with_context(|| format!("syncing {}", source.name))?;
        print_report(&report);
        outpost_hub::assign::assign_tracked(store, &git, &source.track_in(&git), now, &mut |_| {})
            .with_context(|| format!("assigning {}", source.name))?;
        any_failed |= report.fetch_error.is_some();
    }
    if any_failed {
        bail!("a source could not be fetched; what was fetched before is still served");
    }
    Ok(())
}

/// `outpost-hub migrate`: SQLite to PostgreSQL, checked.
fn migrate(
    from: &str,
    to: &str,
    password_env: Option<&str>,
    password_file: Option<&Path>,
    ca_file: Option<&Path>,
) -> Result<()> {
    let path = from.strip_prefix("sqlite:").with_context(|| {
        format!("--from {from:?}: write sqlite:PATH, e.g. sqlite:/var/lib/outpost-hub/hub.db")
    })?;
    if !outpost_hub::store::postgres::is_postgres_url(to) {
        bail!("--to: write a PostgreSQL URL, postgres://USER@HOST:PORT/DATABASE");
    }
    let password = match (password_env, password_file) {
        (Some(variable), _) => Some(
            std::env::var(variable)
                .with_context(|| format!("--password-env names {variable}, which is not set"))?,
        ),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("reading --password-file {}", file.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    let target = outpost_hub::store::postgres::redact(to);
    let store = PostgresStore::connect_with(to, password.as_deref(), ca_file)
        .with_context(|| format!("connecting to {target}"))?;
    eprintln!("copying {path} into {target} (stop the hub first: later writes are not copied)");
    let copied =
        outpost_hub::store::migrate::sqlite_to_postgres(Path::new(path), &store, |table| {
            eprintln!("  {:<18} {:>10} rows", table.table, table.rows);
        })
        .with_context(|| format!("migrating {path} to {target}"))?;
    let rows: u64 = copied.iter().map(|table| table.rows).sum();
    println!(
        "copied and checked {} tables, {rows} rows: counts and row digests match, every body hashes to its digest",
        copied.len()
    );
    println!(
        "now set store = \"{target}\" in every replica's config (the password through store_password_env or store_password_file{})",
        match ca_file {
            Some(file) => format!(", store_ca_file = {:?}", file.display().to_string()),
            None => String::new(),
        }
    );
    Ok(())
}

/// Syncs one source once, without a config file.
fn sync(data_dir: &Path, url: &str) -> Result<()> {
    let store = open_store(data_dir)?;
    let keys = load_keys(&data_dir.join("keys"), KeyPolicy::default())?;
    let mirror = data_dir.join("git").join(hex::encode(
        &outpost_proto::Digest::of(url.as_bytes()).0[..8],
    ));
    let source = GitSource::open_or_init(url, &mirror).context("opening the Git mirror")?;
    let report = sync_source(&store, &keys, &source, unix_now()).context("syncing")?;
    print_report(&report);
    if report.fetch_error.is_some() {
        bail!("the remote could not be fetched; what was fetched before is still served");
    }
    Ok(())
}

pub(crate) fn print_report(report: &SyncReport) {
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

const AGENT_COLUMNS: &[(&str, &str)] = &[
    ("id", "ID"),
    ("labels", "LABELS"),
    ("enrolled_at", "ENROLLED"),
    ("last_seen", "LAST SEEN"),
    ("revoked.at", "REVOKED"),
    ("revoked.by", "+REVOKED BY"),
    ("revoked.why", "+WHY"),
    ("public_key", "+PUBLIC KEY"),
];

fn agents(command: AgentsCommand) -> Result<()> {
    match command {
        AgentsCommand::List(ListArgs { api, selector }) => {
            let rows = select_rows(api.client()?.get("/api/v1/agents")?, selector.as_deref())?;
            print_rows(&rows, api.output, AGENT_COLUMNS);
        }
        AgentsCommand::Show { api, id } => {
            let agent = api.client()?.get(&format!("/api/v1/agents/{id}"))?;
            print_rows(&serde_json::json!([agent]), api.output, AGENT_COLUMNS);
        }
        AgentsCommand::Label { api, id, changes } => {
            let body = serde_json::json!({"labels": label_changes(&changes)?});
            let agent = api
                .client()?
                .post(&format!("/api/v1/agents/{id}/labels"), body)?;
            print_rows(&serde_json::json!([agent]), api.output, AGENT_COLUMNS);
        }
        AgentsCommand::Revoke { api, id, why } => {
            let agent = api.client()?.post(
                &format!("/api/v1/agents/{id}/revoke"),
                serde_json::json!({"why": why}),
            )?;
            print_rows(&serde_json::json!([agent]), api.output, AGENT_COLUMNS);
        }
    }
    Ok(())
}

fn tokens(command: TokensCommand) -> Result<()> {
    match command {
        TokensCommand::Create {
            api,
            labels,
            ttl_seconds,
            bundle_file,
        } => {
            let mut map = serde_json::Map::new();
            for label in &labels {
                let Some((key, value)) = label.split_once('=') else {
                    bail!("--label {label:?}: write key=value");
                };
                map.insert(key.to_owned(), serde_json::json!(value));
            }
            let body = serde_json::json!({"labels": map, "ttl_seconds": ttl_seconds});
            let token = api.client()?.post("/api/v1/tokens", body)?;
            if let Some(path) = &bundle_file {
                write_secret(path, token["bundle"].as_str().unwrap_or_default())?;
                eprintln!(
                    "enrolment bundle written to {}; copy it to the device and run `outpost-agent enrol --bundle FILE`",
                    path.display()
                );
            }
            if !print_document(&token, api.output) {
                println!("{}", token["token"].as_str().unwrap_or_default());
                eprintln!(
                    "single-use enrolment token, expires {}; it is not shown again",
                    token["expires_at"]
                        .as_i64()
                        .map_or("never".to_owned(), outpost_proto::time::rfc3339)
                );
            }
        }
        TokensCommand::List(ListArgs { api, selector }) => {
            let rows = select_rows(api.client()?.get("/api/v1/tokens")?, selector.as_deref())?;
            print_rows(
                &rows,
                api.output,
                &[
                    ("digest", "DIGEST"),
                    ("labels", "LABELS"),
                    ("created_by", "CREATED BY"),
                    ("expires_at", "EXPIRES"),
                    ("used", "USED"),
                ],
            );
        }
        TokensCommand::Revoke { api, digest, why } => {
            let revoked = api.client()?.post(
                &format!("/api/v1/tokens/{digest}/revoke"),
                serde_json::json!({"why": why}),
            )?;
            print_rows(
                &serde_json::json!([revoked]),
                api.output,
                &[
                    ("digest", "DIGEST"),
                    ("revoked_at", "REVOKED"),
                    ("by", "BY"),
                    ("why", "WHY"),
                ],
            );
        }
    }
    Ok(())
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

fn render(folder: &Path, body_out: Option<&Path>, unisolated: bool) -> Result<()> {
    if outpost_hub::kustomize::KUSTOMIZATION_FILES
        .iter()
        .any(|name| folder.join(name).is_file())
    {
        // A kustomization: built as the hub builds it (same restrictions), then read alike.
        let kustomize = outpost_hub::kustomize::Kustomize::find(None)?.allow_unisolated(unisolated);
        let text = kustomize.build_local(folder)?;
        let path = format!("kustomize build {}", folder.display());
        let body = Body::render(&[SourceFile {
            path: &path,
            text: &text,
        }])
        .context("rendering the kustomize output")?;
        return print_body(&body, 1, body_out);
    }
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
    print_body(&body, files.len(), body_out)
}

fn print_body(body: &Body, files: usize, body_out: Option<&Path>) -> Result<()> {
    print_objects(body.objects())?;
    println!(
        "{} objects from {files} files, {} bytes, digest {}",
        body.object_count(),
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
        } else if outpost_hub::bundles::is_manifest(&path.to_string_lossy()) {
            // The same rule the hub applies to bundle folders in Git.
            out.push(path);
        }
    }
    Ok(())
}

/// Writes a secret file readable only by its owner.
fn write_secret(path: &Path, text: &str) -> Result<()> {
    outpost_hub::keys::write_private(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
