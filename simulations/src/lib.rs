//! Outpost fleet simulations: the real hub and agent code for a whole fleet in one process, on
//! virtual time, over a simulated lossy network (docs/simulations.md); and a load generator
//! against a real hub process ([`load`]).

pub mod failover;
pub mod fleet;
pub mod load;
pub mod net;
pub mod plot;
pub mod scenario;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use fleet::Report;
use plot::{Series, line_chart};

/// Writes `report.json` and the plots into `dir`; returns their paths.
pub fn write_outputs(report: &Report, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let (json, convergence, bytes, memory) = fleet::output_paths(dir);
    let text = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(&json, text)?;
    let minutes = |t: u64| t as f64 / 60.0;
    let mut lines = vec![
        Series {
            name: "converged (healthy on assignment)".to_owned(),
            points: report
                .samples
                .iter()
                .map(|s| (minutes(s.t), s.converged as f64))
                .collect(),
        },
        Series {
            name: "enrolled".to_owned(),
            points: report
                .samples
                .iter()
                .map(|s| (minutes(s.t), s.enrolled as f64))
                .collect(),
        },
    ];
    for (rollout, labels) in report.wave_labels.iter().enumerate() {
        for (wave, size) in labels.iter().enumerate() {
            lines.push(Series {
                name: format!("rollout {} wave {} ({size}) healthy", rollout + 1, wave + 1),
                points: report
                    .samples
                    .iter()
                    .filter_map(|s| {
                        let healthy = s.waves.get(rollout)?.get(wave)?;
                        Some((minutes(s.t), *healthy as f64))
                    })
                    .collect(),
            });
        }
    }
    std::fs::write(
        &convergence,
        line_chart(
            &format!("{}: {} agents converging", report.scenario, report.agents),
            "virtual minutes",
            "agents",
            &lines,
        ),
    )?;
    std::fs::write(
        &bytes,
        line_chart(
            "UDP bytes per agent over the whole run (sorted)",
            "agents, fewest bytes first",
            "kB",
            &[Series {
                name: "kB per agent".to_owned(),
                points: report
                    .per_agent_bytes
                    .iter()
                    .enumerate()
                    .map(|(rank, bytes)| (rank as f64 + 1.0, *bytes as f64 / 1e3))
                    .collect(),
            }],
        ),
    )?;
    std::fs::write(
        &memory,
        line_chart(
            "Resident memory of the simulation process (hub and all agents)",
            "virtual minutes",
            "MB",
            &[Series {
                name: "RSS".to_owned(),
                points: report
                    .samples
                    .iter()
                    .map(|s| (minutes(s.t), s.rss as f64 / 1e6))
                    .collect(),
            }],
        ),
    )?;
    Ok(vec![json, convergence, bytes, memory])
}

/// The readable summary printed at the end of a run.
pub fn summary(report: &Report, outputs: &[PathBuf]) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "\n{}: {} agents, {} virtual minutes in {:.1} s wall ({:.0}× real time), {:.1} CPU s",
        report.scenario,
        report.agents,
        report.virtual_seconds / 60,
        report.wall_seconds,
        report.virtual_seconds as f64 / report.wall_seconds.max(0.001),
        report.cpu_seconds
    );
    for rollout in &report.rollouts {
        let waves: Vec<String> = rollout["waves"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|wave| {
                format!(
                    "{} {}/{} healthy{}",
                    wave["size"].as_str().unwrap_or("?"),
                    wave["healthy"],
                    wave["released"],
                    match (wave["failed"].as_u64(), wave["restored"].as_u64()) {
                        (Some(0), Some(0)) | (None, _) => String::new(),
                        (failed, restored) => format!(
                            " ({} failed, {} rolled back)",
                            failed.unwrap_or(0),
                            restored.unwrap_or(0)
                        ),
                    }
                )
            })
            .collect();
        let _ = writeln!(
            text,
            "rollout {} of {} to {:?}: {} — {} failed (budget {}); waves: {}",
            rollout["id"],
            rollout["ref"].as_str().unwrap_or("?"),
            rollout["selector"].as_str().unwrap_or(""),
            rollout["phase"].as_str().unwrap_or("?"),
            rollout["failures"],
            rollout["budget"],
            waves.join(" · ")
        );
    }
    let _ = writeln!(
        text,
        "{} of {} agents healthy on what they are assigned{}",
        report.converged,
        report.agents,
        if report.settled {
            ""
        } else {
            " (stopped at max_minutes before the fleet settled)"
        }
    );
    let _ = writeln!(
        text,
        "on the wire (UDP, QUIC+TLS included): {:.1} MB in all; per agent mean {:.1} kB, median {:.1} kB, p95 {:.1} kB, max {:.1} kB; snapshot payloads {:.1} kB in all",
        report.bytes.total as f64 / 1e6,
        report.bytes.mean as f64 / 1e3,
        report.bytes.median as f64 / 1e3,
        report.bytes.p95 as f64 / 1e3,
        report.bytes.max as f64 / 1e3,
        report.payload_bytes as f64 / 1e3
    );
    let _ = writeln!(
        text,
        "peak memory of the process (hub and all agents): {:.0} MB",
        report.peak_rss as f64 / 1e6
    );
    let _ = writeln!(text, "report and plots:");
    for path in outputs {
        let _ = writeln!(text, "  {}", path.display());
    }
    text
}
