//! `outpost-hub admin-token …` (API tokens: against the data dir for the first one, when no
//! API can be called yet, or through the admin API), and `login` / `logout`.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{ApiArgs, Client, Credentials, HubLogin, print_document, print_rows};
use super::rollout::parse_duration;
use crate::{load_config, open_configured_store, open_store, unix_now};
use outpost_hub::api::admin::{new_token, token_json};
use outpost_hub::api::auth::new_secret;

/// Work on the store directly (no running API needed) when one of these is given.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LocalArgs {
    /// The hub's data dir: write to its store directly (bootstrap the first admin token).
    #[arg(long, conflicts_with = "config")]
    data_dir: Option<PathBuf>,
    /// Like --data-dir, with the store this hub config file names (SQLite or PostgreSQL).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl LocalArgs {
    /// The store to work on directly, if asked to.
    fn store(&self) -> Result<Option<std::sync::Arc<dyn outpost_hub::store::HubStore>>> {
        Ok(match (&self.data_dir, &self.config) {
            (Some(dir), _) => Some(std::sync::Arc::new(open_store(dir)?)),
            (None, Some(config)) => Some(open_configured_store(&load_config(config)?)?),
            (None, None) => None,
        })
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum AdminTokenCommand {
    /// Make an API token and print it once (it is stored only as a hash). With --data-dir or
    /// --config this writes to the hub's store directly: how the first admin token is made.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        local: LocalArgs,
        /// Its name, recorded in the audit trail for everything it does (unique for all time).
        #[arg(long)]
        name: String,
        /// viewer (read everything but Secret values), operator (+ rollouts, labels,
        /// fetch-now) or admin (+ enrolment tokens, revocations, API tokens, keys).
        #[arg(long)]
        role: String,
        /// Expiry, e.g. 90d or 12h [default: none].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<i64>,
    },
    /// List API tokens: name, role, expiry, revocation, last use.
    List {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        local: LocalArgs,
    },
    /// Revoke an API token: refused from then on (at once on this hub, within 5 s on others).
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        local: LocalArgs,
        /// The token's name.
        name: String,
    },
}

fn local_user() -> String {
    format!(
        "local:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
    )
}

const TOKEN_COLUMNS: &[(&str, &str)] = &[
    ("name", "NAME"),
    ("role", "ROLE"),
    ("created_by", "CREATED BY"),
    ("expires_at", "EXPIRES"),
    ("last_used_at", "LAST USED"),
    ("revoked", "REVOKED"),
];

pub(crate) fn admin_token(command: AdminTokenCommand) -> Result<()> {
    match command {
        AdminTokenCommand::Create {
            api,
            local,
            name,
            role,
            ttl,
        } => {
            let created = match local.store()? {
                Some(store) => {
                    let now = unix_now();
                    let token = new_token(&name, &role, ttl, now).map_err(anyhow::Error::msg)?;
                    let (secret, digest) = new_secret().context("getting random bytes")?;
                    let created = store
                        .create_admin_token(&token, &digest, &local_user(), now)?
                        .map_err(anyhow::Error::msg)?;
                    let mut value = token_json(&created);
                    value["token"] = json!(secret);
                    value
                }
                None => api.client()?.post(
                    "/api/v1/admin-tokens",
                    json!({"name": name, "role": role, "ttl_seconds": ttl}),
                )?,
            };
            if !print_document(&created, api.output) {
                println!("{}", created["token"].as_str().unwrap_or_default());
                eprintln!(
                    "API token {:?} ({}) made; it is not shown again. Use it with `outpost-hub login` or OUTPOST_TOKEN.",
                    created["name"].as_str().unwrap_or_default(),
                    created["role"].as_str().unwrap_or_default()
                );
            }
        }
        AdminTokenCommand::List { api, local } => {
            let rows = match local.store()? {
                Some(store) => Value::Array(store.admin_tokens()?.iter().map(token_json).collect()),
                None => api.client()?.get("/api/v1/admin-tokens")?,
            };
            print_rows(&rows, api.output, TOKEN_COLUMNS);
        }
        AdminTokenCommand::Revoke { api, local, name } => {
            let revoked = match local.store()? {
                Some(store) => {
                    let token = store
                        .revoke_admin_token(&name, &local_user(), unix_now())?
                        .with_context(|| format!("no API token {name:?}"))?;
                    token_json(&token)
                }
                None => api
                    .client()?
                    .post(&format!("/api/v1/admin-tokens/{name}/revoke"), json!({}))?,
            };
            print_rows(&json!([revoked]), api.output, TOKEN_COLUMNS);
        }
    }
    Ok(())
}

/// Reads the token for `login`: `OUTPOST_TOKEN`, else standard input (one line).
fn read_token() -> Result<String> {
    if let Ok(token) = std::env::var("OUTPOST_TOKEN")
        && !token.trim().is_empty()
    {
        return Ok(token.trim().to_owned());
    }
    let mut input = std::io::stdin();
    if input.is_terminal() {
        eprintln!("Paste the API token and press Enter (or pipe it in):");
    }
    let mut text = String::new();
    input
        .by_ref()
        .take(4096)
        .read_to_string(&mut text)
        .context("reading the token from standard input")?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        bail!(
            "no token given: pipe it in (`outpost-hub login --hub URL < token-file`) or set OUTPOST_TOKEN"
        );
    }
    Ok(token)
}

/// `login`: checks the token against the hub and keeps it in the credentials file.
pub(crate) fn login(api: &ApiArgs) -> Result<()> {
    let (hub, _) = api.resolve()?;
    let token = read_token()?;
    let who = Client::new(&hub, Some(token.clone()), api.ca_file.as_deref())?
        .get("/api/v1/whoami")
        .context("checking the token with the hub")?;
    let mut credentials = Credentials::load()?;
    credentials.hubs.insert(
        hub.clone(),
        HubLogin {
            token,
            ca_file: api.ca_file.as_deref().map(absolute),
        },
    );
    credentials.current = Some(hub.clone());
    let path = credentials.save()?;
    println!(
        "logged in to {hub} as {} ({}); credentials in {}",
        who["name"].as_str().unwrap_or("?"),
        who["role"].as_str().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

/// `logout`: forgets the hub's token.
pub(crate) fn logout(api: &ApiArgs) -> Result<()> {
    let (hub, _) = api.resolve()?;
    let mut credentials = Credentials::load()?;
    let had = credentials.hubs.remove(&hub).is_some();
    if credentials.current.as_deref() == Some(hub.as_str()) {
        credentials.current = None;
    }
    credentials.save()?;
    match had {
        true => println!("logged out of {hub}"),
        false => println!("no login for {hub}"),
    }
    Ok(())
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}
