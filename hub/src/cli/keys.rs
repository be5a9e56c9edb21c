//! `outpost-hub keys …`: the key ceremony (init, rotate, renew, revoke — on whatever machine
//! holds the root key, against the hub's key dir or a copy of it) and, through the admin API,
//! `status` and `reload`. docs/security.md walks through it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::Value;

use super::client::{ApiArgs, print_document};
use crate::{Output, load_config, unix_now};
use outpost_hub::keys::{self, DAY};

/// Which key dir: given, or the config's.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct KeyDirArgs {
    /// The key dir (the hub's `key_dir`, default DATA_DIR/keys).
    #[arg(long, env = "OUTPOST_HUB_KEY_DIR", conflicts_with = "config")]
    key_dir: Option<PathBuf>,
    /// Take the key dir (and the certificate lifetime) from this hub config file.
    #[arg(long, env = "OUTPOST_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// Certificate lifetime in days [default: the config's signing_certificate_days, else 90].
    #[arg(long)]
    days: Option<u32>,
}

impl KeyDirArgs {
    /// The key dir and the certificate lifetime in seconds.
    fn resolve(&self) -> Result<(PathBuf, i64)> {
        let (dir, lifetime) = match (&self.key_dir, &self.config) {
            (Some(dir), _) => (dir.clone(), 90 * DAY),
            (None, Some(config)) => {
                let config = load_config(config)?;
                (config.key_dir, config.key_policy.certificate_lifetime)
            }
            (None, None) => bail!("say which key dir: --key-dir DIR or --config hub.toml"),
        };
        let lifetime = self
            .days
            .map_or(lifetime, |days| i64::from(days.max(1)) * DAY);
        Ok((dir, lifetime))
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Make a new hub's keys: a root key pair, a first signing key certified by it, and the
    /// hub's QUIC identity. Then move root.key offline: the hub runs without it.
    Init(KeyDirArgs),
    /// Certify a new signing key with the root key (signing.next.*). The running hub offers it
    /// to agents at its next key reload and signs with it after key_rotation_grace_seconds,
    /// then retires the old key.
    Rotate {
        #[command(flatten)]
        dir: KeyDirArgs,
        /// The root key file (kept offline).
        #[arg(long)]
        root_key: PathBuf,
    },
    /// Renew the certificates of the signing key in use (and of a waiting one) with the root
    /// key, keeping their start.
    Renew {
        #[command(flatten)]
        dir: KeyDirArgs,
        /// The root key file (kept offline).
        #[arg(long)]
        root_key: PathBuf,
    },
    /// Revoke a signing key (after a leak): a root-signed list agents get with the hub's keys.
    /// They refuse what it signs from then on; the hub signs again, with the key in use, the
    /// snapshots in use it signed. Revoking the key in use needs a rotation first.
    Revoke {
        #[command(flatten)]
        dir: KeyDirArgs,
        /// The root key file (kept offline).
        #[arg(long)]
        root_key: PathBuf,
        /// The signing key's id (hex, or a unique prefix of it; see `keys status`).
        key: String,
    },
    /// The running hub's keys: root, signing key in use, waiting and retired ones,
    /// revocations, warnings (admin API).
    Status(ApiArgs),
    /// Make the running hub read its key dir now instead of within half a minute (admin API).
    Reload(ApiArgs),
}

pub(crate) fn keys(command: KeysCommand) -> Result<()> {
    let now = unix_now();
    match command {
        KeysCommand::Init(dir) => {
            let (dir, lifetime) = dir.resolve()?;
            let report = keys::init(&dir, now, lifetime)
                .with_context(|| format!("making keys in {}", dir.display()))?;
            println!("root key        {}", report.root);
            println!(
                "signing key     {} (certified for {} days)",
                report.signer,
                lifetime / DAY
            );
            println!("key dir         {}", dir.display());
            eprintln!(
                "\nNow move {} offline (an encrypted USB stick, a vault): the hub runs without it, and\nyou need it only to rotate, renew or revoke signing keys. Agents get root.pub in their\nenrolment bundles.",
                report.root_key_path.display()
            );
        }
        KeysCommand::Rotate { dir, root_key } => {
            let (dir, lifetime) = dir.resolve()?;
            let root = keys::read_root_key(&root_key, &dir)?;
            let next = keys::rotate(&dir, &root, now, lifetime)?;
            println!(
                "signing key {next} certified for {} days, written to {}",
                lifetime / DAY,
                dir.join("signing.next.key").display()
            );
            eprintln!(
                "the hub offers it to agents at its next key reload (within 30 s, or `outpost-hub keys reload`) and signs with it after key_rotation_grace_seconds; copy signing.next.key and signing.next.cert to the hub's key dir if this is a copy"
            );
        }
        KeysCommand::Renew { dir, root_key } => {
            let (dir, lifetime) = dir.resolve()?;
            let root = keys::read_root_key(&root_key, &dir)?;
            for (key, not_after) in keys::renew(&dir, &root, now, lifetime)? {
                println!("signing key {key} renewed until {not_after}");
            }
        }
        KeysCommand::Revoke { dir, root_key, key } => {
            let (dir, _) = dir.resolve()?;
            let root = keys::read_root_key(&root_key, &dir)?;
            let list = keys::revoke(&dir, &root, &key, now)?;
            println!(
                "revocation list version {} written to {}: {}",
                list.version,
                dir.join("revocations").display(),
                list.revoked
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            eprintln!(
                "the hub sends it to agents at its next key reload (within 30 s, or `outpost-hub keys reload`); copy `revocations` to the hub's key dir if this is a copy"
            );
        }
        KeysCommand::Status(api) => {
            let status = api.client()?.get("/api/v1/keys")?;
            print_status(&status, api.output)?;
        }
        KeysCommand::Reload(api) => {
            let status = api
                .client()?
                .post("/api/v1/keys/reload", serde_json::json!({}))?;
            for notice in status["notices"].as_array().into_iter().flatten() {
                eprintln!("{}", notice.as_str().unwrap_or_default());
            }
            print_status(&status, api.output)?;
        }
    }
    Ok(())
}

fn print_status(status: &Value, output: Output) -> Result<()> {
    if print_document(status, output) {
        return Ok(());
    }
    let short = |value: &Value| {
        value
            .as_str()
            .map(|key| key[..16.min(key.len())].to_owned())
    };
    let window = |value: &Value| {
        format!(
            "{}  valid {}..{}",
            short(&value["key"]).unwrap_or_default(),
            value["not_before"],
            value["not_after"]
        )
    };
    println!(
        "root            {}",
        short(&status["root"]).unwrap_or_default()
    );
    println!(
        "root.key        {}",
        match status["root_key_present"].as_bool() {
            Some(true) => "present in the key dir (move it offline)",
            _ => "offline",
        }
    );
    println!("signing key     {}", window(&status["active"]));
    if !status["next"].is_null() {
        println!(
            "waiting key     {}  signs from {}",
            window(&status["next"]),
            status["next"]["active_from"]
        );
    }
    for retired in status["retired"].as_array().into_iter().flatten() {
        println!("retired key     {}", window(retired));
    }
    if let Some(revocations) = status["revocations"].as_object() {
        println!(
            "revocations     version {}: {}",
            revocations["version"],
            revocations["keys"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(short)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for warning in status["warnings"].as_array().into_iter().flatten() {
        eprintln!("warning: {}", warning.as_str().unwrap_or_default());
    }
    Ok(())
}
