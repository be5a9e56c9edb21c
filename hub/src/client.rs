//! The CLI's admin-API client: each subcommand is one or two HTTP calls to a running hub.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::Output;

/// A running hub's admin API.
pub(crate) struct Client {
    base: String,
    agent: ureq::Agent,
    user: String,
}

impl Client {
    pub(crate) fn new(base: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            agent: ureq::Agent::new_with_config(config),
            user: std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned()),
        }
    }

    pub(crate) fn get(&self, path: &str) -> Result<Value> {
        let response = self
            .agent
            .get(&format!("{}{path}", self.base))
            .call()
            .with_context(|| self.unreachable())?;
        Self::json(response)
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> Result<Value> {
        let response = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("x-outpost-user", &self.user)
            .send_json(body)
            .with_context(|| self.unreachable())?;
        Self::json(response)
    }

    fn unreachable(&self) -> String {
        format!(
            "cannot reach the hub's admin API at {}; is `outpost-hub run` up, and is --hub (OUTPOST_HUB_URL) right?",
            self.base
        )
    }

    fn json(mut response: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = response.status();
        let value: Value = response
            .body_mut()
            .read_json()
            .context("reading the hub's answer")?;
        if !status.is_success() {
            let message = value["error"].as_str().unwrap_or("no message").to_owned();
            bail!("the hub answered {status}: {message}");
        }
        Ok(value)
    }
}

/// Prints `rows` as JSON, or as a table with `columns` (JSON field, heading).
pub(crate) fn print_rows(rows: &Value, output: Output, columns: &[(&str, &str)]) {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(rows).unwrap_or_default());
        return;
    }
    let rows = rows.as_array().cloned().unwrap_or_default();
    let cell = |row: &Value, field: &str| match &row[field] {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|(field, heading)| {
            rows.iter()
                .map(|row| cell(row, field).len())
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
    for row in &rows {
        line(columns.iter().map(|(field, _)| cell(row, field)).collect());
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
