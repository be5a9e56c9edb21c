//! `outpost-hub`: the hub binary. Today it offers `render`, which turns a bundle folder into its
//! canonical snapshot body exactly as the hub will, so operators can check a bundle before they
//! push it. Serving agents, Git sources and rollouts come with the hub, transport and rollout
//! issues (see ARCHITECTURE.md).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use outpost_proto::{Body, SourceFile};

/// Outpost hub: reads Git, renders signed snapshots, serves edge agents.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Render { folder, body_out } => render(&folder, body_out.as_deref()),
    }
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
    for object in body.objects() {
        let object = object.context("reading back the rendered body")?;
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"].as_str().unwrap_or("");
        println!(
            "{:<12} {:<40} {}{}{}",
            object["apiVersion"].as_str().unwrap_or(""),
            object["kind"].as_str().unwrap_or(""),
            namespace,
            if namespace.is_empty() { "" } else { "/" },
            metadata["name"].as_str().unwrap_or(""),
        );
    }
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
