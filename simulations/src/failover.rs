//! `outpost-sim failover --runs N`: how long replicas on PostgreSQL take to replace a leader
//! killed with SIGKILL. Two real `outpost-hub run` processes on a PostgreSQL server started for
//! the run; each run commits to the tracked branch, kills the leader at once (no goodbye: its
//! lease must run out), then times, from the kill, (1) until the survivor says it leads and
//! (2) until the commit is rendered and released: the first decision of the new leader. The
//! killed replica is started again (as a follower) before the next run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::load::{Admin, current_digest, free_port, git, hub_binary, write_commit};

/// What a failover run measured.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    /// From the kill until the other replica leads.
    pub lease: Duration,
    /// From the kill until the commit made just before it is released by the new leader.
    pub decision: Duration,
}

struct Replica {
    config: String,
    admin: Admin,
    admin_port: u16,
    child: Option<Child>,
}

impl Replica {
    fn start(&mut self, binary: &PathBuf) -> Result<()> {
        let child = Command::new(binary)
            .args(["run", "--config", &self.config])
            .env("OUTPOST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting outpost-hub run")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).is_err() {
            if Instant::now() > deadline {
                bail!("a replica did not open its admin API within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn leads(&self) -> bool {
        self.child.is_some()
            && self
                .admin
                .get("/api/v1/replica")
                .is_ok_and(|answer| answer["leading"] == true)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Runs `runs` failovers and prints each; returns them.
pub fn run(runs: usize, hub_binary_path: Option<&std::path::Path>) -> Result<Vec<Failover>> {
    let binary = hub_binary(hub_binary_path)?;
    let server = outpost_hub::store::postgres::testing::TestServer::start()
        .map_err(anyhow::Error::msg)
        .context("starting a PostgreSQL server for the run")?;
    let url = server.create_database().map_err(anyhow::Error::msg)?;
    let work = tempfile::Builder::new()
        .prefix("outpost-failover-")
        .tempdir()?;
    let repo = work.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["config", "user.email", "load@outpost.invalid"])?;
    git(&repo, &["config", "user.name", "Load"])?;
    write_commit(&repo, 5, 0)?;
    let keys = work.path().join("keys");
    let mut configs = Vec::new();
    for name in ["a", "b"] {
        let (admin_port, agents_port) = (free_port(false)?, free_port(true)?);
        let config = work.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nkey_dir = \"{}\"\nstore = \"{url}\"\npoll_interval_seconds = 3600\n[listen]\nadmin = \"127.0.0.1:{admin_port}\"\nagents = \"127.0.0.1:{agents_port}\"\n[[sources]]\nname = \"fleet\"\nurl = \"file://{}\"\n",
                work.path().join(name).display(),
                keys.display(),
                repo.display()
            ),
        )?;
        configs.push((config.display().to_string(), admin_port));
    }
    let cli = |args: &[&str]| -> Result<String> {
        let output = Command::new(&binary).args(args).output()?;
        if !output.status.success() {
            bail!(
                "outpost-hub {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    };
    cli(&["keys", "init", "--config", &configs[0].0])?;
    let token = cli(&[
        "admin-token",
        "create",
        "--config",
        &configs[0].0,
        "--name",
        "failover",
        "--role",
        "admin",
    ])?;
    let mut replicas: Vec<Replica> = configs
        .into_iter()
        .map(|(config, admin_port)| Replica {
            config,
            admin: Admin::new(&format!("http://127.0.0.1:{admin_port}"), &token),
            admin_port,
            child: None,
        })
        .collect();
    for replica in &mut replicas {
        replica.start(&binary)?;
    }
    wait("a leader", Duration::from_secs(60), || {
        Ok(replicas.iter().any(Replica::leads))
    })?;
    wait("the first release", Duration::from_secs(60), || {
        Ok(current_digest(&replicas[0].admin)?.is_some())
    })?;
    let mut measured = Vec::with_capacity(runs);
    for run in 1..=runs {
        let leader = replicas
            .iter()
            .position(Replica::leads)
            .context("no replica leads")?;
        let survivor = 1 - leader;
        let before = current_digest(&replicas[survivor].admin)?;
        write_commit(&repo, 5, run as u64)?;
        let killed = Instant::now();
        replicas[leader].kill();
        // Asked of the survivor; it acts once it leads.
        replicas[survivor].admin.post("/api/v1/fetch", json!({}))?;
        wait("the survivor to lead", Duration::from_secs(60), || {
            Ok(replicas[survivor].leads())
        })?;
        let lease = killed.elapsed();
        wait("the new leader's release", Duration::from_secs(60), || {
            Ok(current_digest(&replicas[survivor].admin)? != before)
        })?;
        let decision = killed.elapsed();
        eprintln!(
            "failover {run}/{runs}: lease taken {:.2} s, commit released {:.2} s after the leader was killed",
            lease.as_secs_f64(),
            decision.as_secs_f64()
        );
        measured.push(Failover { lease, decision });
        replicas[leader].start(&binary)?;
        // The restarted replica follows; give the lease loop a renewal to settle.
        std::thread::sleep(Duration::from_secs(3));
    }
    drop(replicas);
    drop(server);
    Ok(measured)
}

/// Minimum, median and maximum of `values` (seconds).
pub fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    };
    (
        values.first().copied().unwrap_or(0.0),
        median,
        values.last().copied().unwrap_or(0.0),
    )
}
