//! The CLI's admin-API client: each subcommand is one or two HTTP(S) calls to a running hub,
//! with the API token from `OUTPOST_TOKEN` or from the credentials file `outpost-hub login`
//! writes (mode 0600): `$OUTPOST_CREDENTIALS`, else `$XDG_CONFIG_HOME/outpost/credentials.json`,
//! else `~/.config/outpost/credentials.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Output;

/// The hub the CLI talks to when neither `--hub`, `OUTPOST_HUB_URL` nor a login says otherwise.
const DEFAULT_HUB: &str = "http://127.0.0.1:7070";

/// Where the admin API is, how to trust it, and how to print its answers.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ApiArgs {
    /// The hub's admin API [default: the hub of the last `login`, else http://127.0.0.1:7070].
    #[arg(long, env = "OUTPOST_HUB_URL")]
    pub(crate) hub: Option<String>,
    /// A PEM file with the CA (or self-signed certificate) that signed the hub's HTTPS
    /// certificate, when it is not a public one.
    #[arg(long, env = "OUTPOST_HUB_CA")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Output format: table (times as ages), wide (more columns, dates), json or yaml (times
    /// as RFC 3339 dates).
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub(crate) output: Output,
}

/// What `login` keeps per hub.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Credentials {
    /// The hub used when none is named.
    #[serde(default)]
    pub(crate) current: Option<String>,
    /// Per hub URL: its token and CA file.
    #[serde(default)]
    pub(crate) hubs: BTreeMap<String, HubLogin>,
}

/// One hub's login.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HubLogin {
    /// The API token.
    pub(crate) token: String,
    /// The CA file given at login, if any.
    #[serde(default)]
    pub(crate) ca_file: Option<PathBuf>,
}

impl Credentials {
    /// The credentials file's path.
    pub(crate) fn path() -> Result<PathBuf> {
        if let Some(path) = std::env::var_os("OUTPOST_CREDENTIALS") {
            return Ok(PathBuf::from(path));
        }
        let config = match std::env::var_os("XDG_CONFIG_HOME") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").context(
                "neither OUTPOST_CREDENTIALS, XDG_CONFIG_HOME nor HOME is set: cannot find the credentials file",
            )?)
            .join(".config"),
        };
        Ok(config.join("outpost").join("credentials.json"))
    }

    /// Reads the file (empty if it does not exist).
    pub(crate) fn load() -> Result<Credentials> {
        let path = Credentials::path()?;
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("reading the credentials file {}", path.display())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(Credentials::default())
            }
            Err(error) => Err(error)
                .with_context(|| format!("reading the credentials file {}", path.display())),
        }
    }

    /// Writes the file, mode 0600 in a 0700 folder.
    pub(crate) fn save(&self) -> Result<PathBuf> {
        let path = Credentials::path()?;
        if let Some(parent) = path.parent() {
            outpost_hub::files::private_dir(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let text = serde_json::to_string_pretty(self)?;
        outpost_hub::keys::write_private(&path, text.as_bytes())
            .with_context(|| format!("writing the credentials file {}", path.display()))?;
        Ok(path)
    }
}

impl ApiArgs {
    /// The hub URL these arguments name, and its login if there is one.
    pub(crate) fn resolve(&self) -> Result<(String, Option<HubLogin>)> {
        let credentials = Credentials::load()?;
        let hub = self
            .hub
            .clone()
            .or_else(|| credentials.current.clone())
            .unwrap_or_else(|| DEFAULT_HUB.to_owned());
        let hub = hub.trim_end_matches('/').to_owned();
        let login = credentials.hubs.get(&hub).cloned();
        Ok((hub, login))
    }

    /// A client for the hub, with the token from `OUTPOST_TOKEN` or the login.
    pub(crate) fn client(&self) -> Result<Client> {
        let (hub, login) = self.resolve()?;
        let token = std::env::var("OUTPOST_TOKEN")
            .ok()
            .filter(|token| !token.trim().is_empty())
            .or_else(|| login.as_ref().map(|login| login.token.clone()));
        let ca_file = self
            .ca_file
            .clone()
            .or_else(|| login.and_then(|login| login.ca_file));
        Client::new(&hub, token, ca_file.as_deref())
    }
}

/// A running hub's admin API.
pub(crate) struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    pub(crate) fn new(base: &str, token: Option<String>, ca_file: Option<&Path>) -> Result<Client> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)));
        if let Some(ca_file) = ca_file {
            let pem = std::fs::read(ca_file)
                .with_context(|| format!("reading the CA file {}", ca_file.display()))?;
            let certificates: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(Ok(certificate)),
                    Ok(_) => None,
                    Err(error) => Some(Err(error)),
                })
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading the CA file {}", ca_file.display()))?;
            if certificates.is_empty() {
                bail!("{} holds no PEM certificate", ca_file.display());
            }
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certificates))
                    .build(),
            );
        }
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            agent: ureq::Agent::new_with_config(config.build()),
            token,
        })
    }

    pub(crate) fn get(&self, path: &str) -> Result<Value> {
        let mut request = self.agent.get(&format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        let response = request.call().with_context(|| self.unreachable())?;
        self.json(response)
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> Result<Value> {
        let mut request = self.agent.post(&format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("authorization", &format!("Bearer {token}"));
        }
        let response = request
            .send_json(body)
            .with_context(|| self.unreachable())?;
        self.json(response)
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot reach the hub's admin API at {}; is `outpost-hub run` up, is --hub (OUTPOST_HUB_URL) right, and for https, does --ca-file (OUTPOST_HUB_CA) name the CA of its certificate?",
            self.base
        )
    }

    fn json(&self, mut response: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = response.status();
        let value: Value = response
            .body_mut()
            .read_json()
            .context("reading the hub's answer")?;
        if !status.is_success() {
            let message = value["error"].as_str().unwrap_or("no message").to_owned();
            if status == ureq::http::StatusCode::UNAUTHORIZED && self.token.is_none() {
                bail!(
                    "the hub answered {status}: {message}\nno API token: set OUTPOST_TOKEN, or run `outpost-hub login --hub {}`",
                    self.base
                );
            }
            bail!("the hub answered {status}: {message}");
        }
        Ok(value)
    }
}

/// Whether a JSON field holds a time (Unix seconds): `at`, `*_at`, `last_seen`, `not_before`,
/// `not_after`.
fn is_time_field(field: &str) -> bool {
    field == "at"
        || field.ends_with("_at")
        || matches!(field, "last_seen" | "not_before" | "not_after")
}

/// `value` with every time field (see [`is_time_field`]) an RFC 3339 date instead of Unix
/// seconds (0 stays 0: "never").
pub(crate) fn dated(value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(dated).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, value)| {
                    let value = match value.as_i64() {
                        Some(seconds) if is_time_field(key) && seconds != 0 => {
                            json!(outpost_proto::time::rfc3339(seconds))
                        }
                        _ => dated(value),
                    };
                    (key.clone(), value)
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Prints `value` for scripts: JSON or YAML, times as RFC 3339 dates. `false` for the formats
/// for people (the caller prints those).
pub(crate) fn print_document(value: &Value, output: Output) -> bool {
    match output {
        Output::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&dated(value)).unwrap_or_default()
            );
            true
        }
        Output::Yaml => {
            match serde_saphyr::to_string(&dated(value)) {
                Ok(text) => print!("{text}"),
                // A JSON value always serializes; say so rather than print nothing.
                Err(error) => eprintln!("cannot write YAML: {error}"),
            }
            true
        }
        Output::Table | Output::Wide => false,
    }
}

/// One cell for people: times as ages (dates in `wide`), labels as `k=v,k=v`, lists joined.
fn cell(value: &Value, field: &str, wide: bool, now: i64) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) if text.is_empty() => "-".to_owned(),
        Value::String(text) => text.clone(),
        Value::Number(number) if is_time_field(field) => match number.as_i64() {
            Some(0) => "never".to_owned(),
            Some(seconds) if wide => outpost_proto::time::rfc3339(seconds),
            Some(seconds) => outpost_proto::time::age(seconds, now),
            None => number.to_string(),
        },
        Value::Object(map) if map.values().all(|v| v.is_string()) => {
            if map.is_empty() {
                return "-".to_owned();
            }
            map.iter()
                .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        }
        Value::Array(items) if items.iter().all(|v| !v.is_object() && !v.is_array()) => {
            if items.is_empty() {
                return "-".to_owned();
            }
            items
                .iter()
                .map(|item| cell(item, "", wide, now))
                .collect::<Vec<_>>()
                .join(",")
        }
        other => other.to_string(),
    }
}

/// Prints `rows` as JSON or YAML (times as RFC 3339 dates), or as a table with `columns`
/// (JSON field, `a.b` for a field of an object, and heading): times as ages, labels as `k=v`
/// lists. A heading starting with `+` is a column shown only with `-o wide` (which also shows
/// dates instead of ages).
pub(crate) fn print_rows(rows: &Value, output: Output, columns: &[(&str, &str)]) {
    if print_document(rows, output) {
        return;
    }
    let wide = matches!(output, Output::Wide);
    let columns: Vec<(&str, &str)> = columns
        .iter()
        .filter_map(|(field, heading)| match heading.strip_prefix('+') {
            Some(heading) => wide.then_some((*field, heading)),
            None => Some((*field, *heading)),
        })
        .collect();
    let now = crate::unix_now();
    let rows = rows.as_array().cloned().unwrap_or_default();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            columns
                .iter()
                .map(|(field, _)| {
                    // A dotted field reaches into objects: `revoked.at`.
                    let value = field.split('.').fold(row, |value, key| &value[key]);
                    let last = field.rsplit('.').next().unwrap_or(field);
                    cell(value, last, wide, now)
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(index, (_, heading))| {
            cells
                .iter()
                .map(|row| row[index].chars().count())
                .max()
                .unwrap_or(0)
                .max(heading.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(
        columns
            .iter()
            .map(|(_, heading)| heading.to_string())
            .collect(),
    );
    for row in cells {
        line(row);
    }
}

/// Keeps the rows (a JSON array) whose `labels` match `selector` (Kubernetes syntax, e.g.
/// `region=eu,ring!=canary,!beta`); all rows without one.
pub(crate) fn select_rows(rows: Value, selector: Option<&str>) -> Result<Value> {
    let Some(text) = selector else {
        return Ok(rows);
    };
    let selector = outpost_proto::LabelSelector::parse(text)
        .map_err(|error| anyhow::anyhow!("--selector {text:?}: {error}"))?;
    let kept = rows
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|row| {
            let labels: BTreeMap<String, String> = row["labels"]
                .as_object()
                .map(|map| {
                    map.iter()
                        .filter_map(|(key, value)| Some((key.clone(), value.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default();
            selector.matches(&labels)
        })
        .collect();
    Ok(Value::Array(kept))
}

/// The rows `outpost-hub drift` shows of `GET /api/v1/drift`'s reports: one per field that
/// differs, one per deleted object, one for a report without objects (drift gone).
pub(crate) fn drift_rows(reports: &Value) -> Value {
    let mut rows = Vec::new();
    for report in reports.as_array().into_iter().flatten() {
        let row = |object: String, field: &Value, deleted: bool| {
            let text = |key: &str| field[key].as_str().unwrap_or("").to_owned();
            json!({
                "received_at": report["received_at"], "agent": report["agent"],
                "bundle": report["bundle"], "generation": report["generation"],
                "action": report["action"], "object": object,
                "field": if deleted { "(deleted)".to_owned() } else { text("path") },
                "desired": if deleted { String::new() } else { field["desired"].as_str().unwrap_or("(absent)").to_owned() },
                "live": if deleted { String::new() } else { field["live"].as_str().unwrap_or("(absent)").to_owned() },
                "manager": text("manager"), "changed": text("changed_at"),
            })
        };
        let findings = report["findings"].as_array().cloned().unwrap_or_default();
        if findings.is_empty() {
            let mut gone = row("(drift gone)".to_owned(), &Value::Null, true);
            gone["field"] = json!("");
            rows.push(gone);
        }
        for object in &findings {
            let name = match object["namespace"].as_str().unwrap_or("") {
                "" => format!(
                    "{} {}",
                    object["kind"].as_str().unwrap_or(""),
                    object["name"].as_str().unwrap_or("")
                ),
                namespace => format!(
                    "{} {namespace}/{}",
                    object["kind"].as_str().unwrap_or(""),
                    object["name"].as_str().unwrap_or("")
                ),
            };
            if object["deleted"] == true {
                rows.push(row(name.clone(), &Value::Null, true));
            }
            for field in object["fields"].as_array().into_iter().flatten() {
                rows.push(row(name.clone(), field, false));
            }
            if let Some(more) = object["more_fields"].as_u64().filter(|more| *more > 0) {
                rows.push(row(
                    name.clone(),
                    &json!({"path": format!("({more} more fields)")}),
                    false,
                ));
            }
        }
    }
    Value::Array(rows)
}

/// A query string (`?a=1&b=x%3Dy`) of `pairs`, values percent-encoded; empty values left out.
pub(crate) fn query(pairs: &[(&str, &str)]) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (byte as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect()
    };
    let parts: Vec<String> = pairs
        .iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(key, value)| format!("{key}={}", encode(value)))
        .collect();
    match parts.is_empty() {
        true => String::new(),
        false => format!("?{}", parts.join("&")),
    }
}

/// `k=v` sets a label, `k-` removes it.
pub(crate) fn label_changes(changes: &[String]) -> Result<Value> {
    let mut labels = serde_json::Map::new();
    for change in changes {
        if let Some((key, value)) = change.split_once('=') {
            labels.insert(key.to_owned(), json!(value));
        } else if let Some(key) = change.strip_suffix('-') {
            labels.insert(key.to_owned(), Value::Null);
        } else {
            bail!("{change:?}: write key=value to set a label or key- to remove it");
        }
    }
    Ok(Value::Object(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_rows_show_one_row_per_field_deleted_object_or_gone_drift() {
        let reports = json!([
            {"received_at": 10, "agent": "a", "bundle": "pos", "generation": 3, "action": "left",
             "findings": []},
            {"received_at": 9, "agent": "a", "bundle": "pos", "generation": 3, "action": "corrected",
             "findings": [
                {"kind": "ConfigMap", "namespace": "shop", "name": "menu", "deleted": false,
                 "fields": [{"path": "data.a", "desired": "\"1\"", "live": null, "manager": "kubectl-edit",
                             "changed_at": "2026-12-01T10:00:00Z"}], "more_fields": 2},
                {"kind": "Namespace", "namespace": "", "name": "shop", "deleted": true, "fields": []}
             ]}
        ]);
        let rows = drift_rows(&reports);
        let rows = rows.as_array().unwrap();
        let cells: Vec<(&str, &str, &str, &str)> = rows
            .iter()
            .map(|row| {
                (
                    row["object"].as_str().unwrap(),
                    row["field"].as_str().unwrap(),
                    row["live"].as_str().unwrap(),
                    row["manager"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            cells,
            [
                ("(drift gone)", "", "", ""),
                ("ConfigMap shop/menu", "data.a", "(absent)", "kubectl-edit"),
                ("ConfigMap shop/menu", "(2 more fields)", "(absent)", ""),
                ("Namespace shop", "(deleted)", "", ""),
            ]
        );
    }
}
