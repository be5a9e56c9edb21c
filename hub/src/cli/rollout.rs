//! `outpost-hub rollout …`: create, list, show, pause, resume, abort, roll back and watch
//! rollouts through the admin API.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::{ApiArgs, Client, print_document, print_rows};
use crate::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutCommand {
    /// Roll a bundle's release at a Git tag out to the agents a selector picks, in waves: agents
    /// labelled ring=canary first, each wave opening when the one before is healthy, failed or
    /// pending (offline past the health timeout). One rollout per bundle at a time.
    Create {
        #[command(flatten)]
        api: ApiArgs,
        /// The bundle.
        #[arg(long)]
        bundle: String,
        /// The Git tag (v1.2) or full ref (refs/heads/release) whose release to roll out.
        #[arg(long)]
        tag: String,
        /// Which agents, as a label selector (region=eu,role=store; role in (a,b); !legacy).
        /// Default: every agent the bundle selects.
        #[arg(long, default_value = "")]
        selector: String,
        /// Cumulative wave sizes: counts or percents of the selected agents; the last is 100%.
        #[arg(long, default_value = "1,10%,50%,100%")]
        waves: String,
        /// How long a released agent has to report healthy (30s, 10m, 2h).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        health_timeout: i64,
        /// Failures tolerated before the rollout stops: a count (2) or a percent (2%).
        #[arg(long, default_value = "0")]
        max_failures: String,
        /// What to do when failures exceed --max-failures.
        #[arg(long, value_enum, default_value = "pause")]
        on_failure: OnFailureArg,
        /// Why (recorded with your API token's name).
        #[arg(long, default_value = "")]
        why: String,
        /// Watch it until it finishes.
        #[arg(long)]
        watch: bool,
        /// Create nothing: print the waves with the agents each would release, now (every
        /// agent assumed to turn healthy). `outpost-hub diff` shows what would change in them.
        #[arg(long, conflicts_with = "watch")]
        dry_run: bool,
    },
    /// List rollouts, newest first.
    List(ApiArgs),
    /// Show one rollout: waves, agents, history.
    Show {
        #[command(flatten)]
        api: ApiArgs,
        /// Rollout id.
        id: u64,
    },
    /// Stop releasing to further agents (those released keep the release).
    Pause(CommandArgs),
    /// Release again after a pause; failures so far are accepted, the budget counts new ones.
    Resume(CommandArgs),
    /// Stop for good; agents keep what they have.
    Abort(CommandArgs),
    /// Give every agent the rollout released what it had before (a new generation of it).
    Rollback(CommandArgs),
    /// Show progress, a bar per wave, until the rollout succeeds, is aborted or rolled back.
    /// Exits 0 on success, 1 otherwise.
    Watch {
        #[command(flatten)]
        api: ApiArgs,
        /// Rollout id.
        id: u64,
        /// Seconds between looks.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct CommandArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Rollout id.
    id: u64,
    /// Why (recorded with your API token's name).
    #[arg(long)]
    why: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum OnFailureArg {
    /// Pause; an operator resumes, aborts or rolls back.
    Pause,
    /// Roll back every agent released.
    Rollback,
}

/// What a rollout would do (`GET /api/v1/preview`).
pub(crate) fn preview(
    client: &Client,
    bundle: &str,
    tag: &str,
    selector: &str,
    waves: &str,
    max_failures: &str,
) -> Result<Value> {
    client.get(&format!(
        "/api/v1/preview{}",
        super::client::query(&[
            ("bundle", bundle),
            ("tag", tag),
            ("selector", selector),
            ("waves", waves),
            ("max_failures", max_failures),
        ])
    ))
}

fn headline_of(preview: &Value) -> String {
    let commit = preview["git_commit"].as_str().unwrap_or_default();
    format!(
        "{} at {} (commit {}), {}: {} agent(s)",
        preview["bundle"].as_str().unwrap_or("?"),
        preview["git_ref"].as_str().unwrap_or("?"),
        &commit[..commit.len().min(12)],
        match preview["selector"].as_str().unwrap_or_default() {
            "" => "every agent the bundle selects".to_owned(),
            selector => format!("selector {selector}"),
        },
        preview["agents"]
    )
}

/// The waves of a preview, for people.
pub(crate) fn print_waves(preview: &Value) {
    println!("dry run, nothing created: {}", headline_of(preview));
    for (index, wave) in preview["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let agents: Vec<&str> = wave["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        println!(
            "wave {} (up to {}): {} agent(s){}{}",
            index + 1,
            wave["size"].as_str().unwrap_or("?"),
            agents.len(),
            if agents.is_empty() { "" } else { ": " },
            agents.join(", ")
        );
    }
    print_left_out(preview);
}

fn print_left_out(preview: &Value) {
    for row in preview["left_out"].as_array().into_iter().flatten() {
        println!(
            "left out  {}: {}",
            row[0].as_str().unwrap_or("?"),
            row[1].as_str().unwrap_or("?")
        );
    }
}

/// What a preview changes, for people: per variant and current release, the objects added
/// (+), changed (~, with each field's old and new value) and removed (-).
pub(crate) fn print_diff(preview: &Value) {
    let variants = preview["variants"].as_array().cloned().unwrap_or_default();
    println!("{} in {} variant(s)", headline_of(preview), variants.len());
    let short = |value: &Value| -> String {
        let text = match value {
            Value::Null => "(absent)".to_owned(),
            other => other.to_string(),
        };
        match text.chars().count() > 80 {
            true => format!("{}…", text.chars().take(79).collect::<String>()),
            false => text,
        }
    };
    for variant in &variants {
        let name = match variant["variant"].as_str().unwrap_or_default() {
            "" => "the bundle as is".to_owned(),
            key => format!("variant {key}"),
        };
        println!("\n{name} → generation {}", variant["generation"]);
        for group in variant["groups"].as_array().into_iter().flatten() {
            let agents: Vec<&str> = group["agents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let from = match &group["current"] {
                Value::Array(pair) => format!(
                    "on generation {} ({})",
                    pair[0],
                    &pair[1].as_str().unwrap_or_default()
                        [..12.min(pair[1].as_str().unwrap_or_default().len())]
                ),
                _ => "running nothing of the bundle".to_owned(),
            };
            let shown: Vec<&str> = agents.iter().take(5).copied().collect();
            println!(
                "  {} agent(s) {from}: {}{}",
                agents.len(),
                shown.join(", "),
                if agents.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            );
            let diff = &group["diff"];
            let id = |object: &Value| -> String {
                let namespace = object["namespace"].as_str().unwrap_or_default();
                let name = object["name"].as_str().unwrap_or_default();
                match namespace {
                    "" => format!("{} {name}", object["kind"].as_str().unwrap_or("?")),
                    namespace => format!(
                        "{} {namespace}/{name}",
                        object["kind"].as_str().unwrap_or("?")
                    ),
                }
            };
            for object in diff["added"].as_array().into_iter().flatten() {
                println!("    + {}", id(object));
            }
            for changed in diff["changed"].as_array().into_iter().flatten() {
                println!("    ~ {}", id(&changed[0]));
                for field in changed[1].as_array().into_iter().flatten() {
                    println!(
                        "        {}: {} → {}",
                        field["path"].as_str().unwrap_or("?"),
                        short(&field["from"]),
                        short(&field["to"])
                    );
                }
            }
            for object in diff["removed"].as_array().into_iter().flatten() {
                println!("    - {}", id(object));
            }
            let untouched = diff["unchanged"].as_u64().unwrap_or(0);
            let nothing = diff["added"].as_array().is_none_or(Vec::is_empty)
                && diff["changed"].as_array().is_none_or(Vec::is_empty)
                && diff["removed"].as_array().is_none_or(Vec::is_empty);
            if nothing {
                println!("    no change ({untouched} object(s) as they are)");
            } else if untouched > 0 {
                println!("    ({untouched} object(s) unchanged)");
            }
        }
    }
    print_left_out(preview);
}

/// `30`, `30s`, `10m`, `2h`, `1d` → seconds.
pub(crate) fn parse_duration(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: i64 = number
        .parse()
        .map_err(|_| format!("{text:?}: write a duration such as 30s, 10m or 2h"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    match value.checked_mul(scale) {
        Some(seconds) if seconds > 0 => Ok(seconds),
        _ => Err(format!("{text:?}: must be positive")),
    }
}

pub(crate) fn rollout(command: RolloutCommand) -> Result<()> {
    match command {
        RolloutCommand::Create {
            api,
            bundle,
            tag,
            selector,
            waves,
            health_timeout,
            max_failures,
            on_failure,
            why,
            watch: then_watch,
            dry_run,
        } => {
            let client = api.client()?;
            if dry_run {
                let preview = preview(&client, &bundle, &tag, &selector, &waves, &max_failures)?;
                if !print_document(&preview, api.output) {
                    print_waves(&preview);
                }
                return Ok(());
            }
            let on_failure = match on_failure {
                OnFailureArg::Pause => "pause",
                OnFailureArg::Rollback => "rollback",
            };
            let created = client.post(
                "/api/v1/rollouts",
                json!({"bundle": bundle, "tag": tag, "selector": selector, "waves": waves,
                       "health_timeout_seconds": health_timeout, "max_failures": max_failures,
                       "on_failure": on_failure, "why": why}),
            )?;
            let id = created["id"]
                .as_u64()
                .context("the hub's answer has no id")?;
            if !print_document(&created, api.output) {
                println!(
                    "rollout {id} created: {bundle} at {} to {}; follow it with `outpost-hub rollout watch {id}`",
                    created["ref"].as_str().unwrap_or(&tag),
                    if selector.is_empty() {
                        "every agent"
                    } else {
                        &selector
                    }
                );
            }
            if then_watch {
                return watch(&client, id, Duration::from_secs(1));
            }
            Ok(())
        }
        RolloutCommand::List(api) => {
            let mut rows = api.client()?.get("/api/v1/rollouts")?;
            if let Some(rows) = rows.as_array_mut() {
                for row in rows {
                    row["progress"] = json!(format!(
                        "{}/{} released, {} failed",
                        row["on_release"], row["members"], row["failures"]
                    ));
                }
            }
            print_rows(
                &rows,
                api.output,
                &[
                    ("id", "ID"),
                    ("bundle", "BUNDLE"),
                    ("ref", "REF"),
                    ("selector", "SELECTOR"),
                    ("phase", "PHASE"),
                    ("wave", "WAVE"),
                    ("progress", "PROGRESS"),
                    ("created_by", "BY"),
                    ("created_at", "+CREATED"),
                    ("updated_at", "+UPDATED"),
                ],
            );
            Ok(())
        }
        RolloutCommand::Show { api, id } => {
            let rollout = api.client()?.get(&format!("/api/v1/rollouts/{id}"))?;
            if !print_document(&rollout, api.output) {
                print_rollout(&rollout);
            }
            Ok(())
        }
        RolloutCommand::Pause(args) => send(args, "pause"),
        RolloutCommand::Resume(args) => send(args, "resume"),
        RolloutCommand::Abort(args) => send(args, "abort"),
        RolloutCommand::Rollback(args) => send(args, "rollback"),
        RolloutCommand::Watch { api, id, interval } => {
            let interval = Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
            watch(&api.client()?, id, interval)
        }
    }
}

fn send(args: CommandArgs, command: &str) -> Result<()> {
    let rollout = args.api.client()?.post(
        &format!("/api/v1/rollouts/{}/{command}", args.id),
        json!({"why": args.why}),
    )?;
    if !print_document(&rollout, args.api.output) {
        println!(
            "rollout {} is now {}",
            args.id,
            rollout["phase"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// One line per wave: `wave 2  10%   [######!!....]  3/4 released  2 healthy  1 failed  0 pending`.
fn wave_lines(rollout: &Value) -> Vec<String> {
    const WIDTH: usize = 30;
    let waves = rollout["waves"].as_array().cloned().unwrap_or_default();
    waves
        .iter()
        .enumerate()
        .map(|(index, wave)| {
            let number = |field: &str| wave[field].as_u64().unwrap_or(0);
            let planned = number("planned").max(number("released")).max(1);
            let cells = |count: u64| (count as usize * WIDTH).div_ceil(planned as usize);
            let mut bar = String::new();
            for (count, mark) in [
                (number("healthy"), '#'),
                (number("failed"), '!'),
                (number("pending"), '?'),
                (number("restored"), '<'),
            ] {
                bar.extend(std::iter::repeat_n(mark, cells(count)));
            }
            let resolved = number("healthy") + number("failed") + number("pending") + number("restored");
            bar.extend(std::iter::repeat_n(
                '~',
                cells(number("released").saturating_sub(resolved)),
            ));
            let mut bar: String = bar.chars().take(WIDTH).collect();
            let filled = bar.chars().count();
            bar.extend(std::iter::repeat_n('.', WIDTH - filled));
            format!(
                "wave {:<2} {:>5}  [{bar}]  {:>4}/{:<4} released  {} healthy  {} failed  {} pending  ({})",
                index + 1,
                text(&wave["size"]),
                number("released"),
                number("planned"),
                number("healthy"),
                number("failed"),
                number("pending"),
                text(&wave["state"]),
            )
        })
        .collect()
}

fn headline(rollout: &Value) -> String {
    let reason = rollout["reason"]
        .as_str()
        .map(|reason| format!(" — {reason}"))
        .unwrap_or_default();
    format!(
        "rollout {} · {} → {} · {}{reason} · {}/{} agents on the release · {} failed (budget {})",
        text(&rollout["id"]),
        text(&rollout["bundle"]),
        text(&rollout["ref"]),
        text(&rollout["phase"]),
        text(&rollout["on_release"]),
        text(&rollout["members"]),
        text(&rollout["failures"]),
        text(&rollout["budget"]),
    )
}

fn print_rollout(rollout: &Value) {
    println!("{}", headline(rollout));
    println!(
        "selector: {}   waves: {}   health timeout: {}s   max failures: {}   on failure: {}",
        match rollout["selector"].as_str() {
            Some("") | None => "(every agent)".to_owned(),
            Some(selector) => selector.to_owned(),
        },
        rollout["waves_planned"]
            .as_array()
            .map(|waves| waves.iter().map(text).collect::<Vec<_>>().join(","))
            .unwrap_or_default(),
        text(&rollout["health_timeout_seconds"]),
        text(&rollout["max_failures"]),
        text(&rollout["on_failure"]),
    );
    println!("legend: # healthy  ! failed  ? pending  < restored  ~ waiting for health");
    for line in wave_lines(rollout) {
        println!("{line}");
    }
    println!();
    print_rows(
        &rollout["agents"],
        Output::Table,
        &[
            ("agent", "AGENT"),
            ("wave", "WAVE"),
            ("state", "STATE"),
            ("canary", "CANARY"),
            ("detail", "DETAIL"),
        ],
    );
    println!();
    println!("history:");
    for record in rollout["log"].as_array().cloned().unwrap_or_default() {
        println!(
            "  {}  {:<10} {}{}",
            text(&record["at"]),
            text(&record["who"]),
            text(&record["action"]),
            match record["why"].as_str() {
                Some("") | None => String::new(),
                Some(why) => format!(" — {why}"),
            }
        );
    }
}

/// Redraws the waves in place on a terminal; elsewhere prints them whenever they change.
fn watch(client: &Client, id: u64, interval: Duration) -> Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut last = String::new();
    loop {
        let rollout = client.get(&format!("/api/v1/rollouts/{id}"))?;
        let mut lines = vec![headline(&rollout)];
        lines.extend(wave_lines(&rollout));
        let frame = lines.join("\n");
        let mut out = std::io::stdout().lock();
        if terminal {
            if drawn > 0 {
                write!(out, "\x1b[{drawn}A")?;
            }
            for line in &lines {
                writeln!(out, "\x1b[2K{line}")?;
            }
            drawn = lines.len();
        } else if frame != last {
            writeln!(out, "{frame}\n")?;
        }
        out.flush()?;
        last = frame;
        match rollout["phase"].as_str() {
            Some("succeeded") => return Ok(()),
            Some(phase @ ("aborted" | "rolled-back")) => bail!("rollout {id} {phase}"),
            _ => std::thread::sleep(interval),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("45"), Ok(45));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn wave_bars_show_each_state() {
        let rollout = json!({"waves": [
            {"size": "10%", "planned": 4, "released": 4, "healthy": 2, "failed": 1, "pending": 1, "restored": 0, "state": "done"},
            {"size": "100%", "planned": 36, "released": 0, "healthy": 0, "failed": 0, "pending": 0, "restored": 0, "state": "closed"},
        ]});
        let lines = wave_lines(&rollout);
        assert!(
            lines[0].contains(&format!(
                "[{}{}{}]",
                "#".repeat(15),
                "!".repeat(8),
                "?".repeat(7)
            )),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains(&format!("[{}]", ".".repeat(30))),
            "{}",
            lines[1]
        );
    }
}
