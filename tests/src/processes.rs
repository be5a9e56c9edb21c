//! Helpers for tests that run the real binaries as processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The path of a workspace binary built beside the running test (target/<profile>/).
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` (or `cargo test --workspace`) first",
        path.display()
    );
    path
}

/// A child process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program` to completion and returns its stdout; panics with its output if it failed.
pub fn run(program: &Path, args: &[&str], env: &[(&str, String)]) -> String {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Polls `check` every 200 ms for up to `seconds`; panics naming `what` on timeout.
pub fn wait_for(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out after {seconds}s waiting for {what}");
}

/// Enrols an agent process with the in-process `hub`: writes an enrolment bundle (fresh token)
/// to `work/enrol.toml`, runs `outpost-agent enrol` on `state_dir`, returns the agent id.
pub fn enrol_agent(
    agent: &Path,
    hub: &crate::harness::TestHub,
    work: &Path,
    state_dir: &str,
) -> String {
    let bundle = work.join("enrol.toml");
    std::fs::write(
        &bundle,
        format!(
            "hub = \"{}\"\nhub_pin = \"{}\"\nroot_key = \"{}\"\ntoken = \"{}\"\n",
            hub.address,
            hub.pin().to_hex(),
            hex::encode(hub.keys.root().to_bytes()),
            hub.token(&[])
        ),
    )
    .expect("write the enrolment bundle");
    let out = run(
        agent,
        &["enrol", "--bundle", &bundle.display().to_string()],
        &[("OUTPOST_AGENT_STATE_DIR", state_dir.to_owned())],
    );
    agent_id(&out)
}

/// Starts `outpost-agent run` on `state_dir`, reconciling the cluster `kubeconfig` names.
pub fn run_agent(agent: &Path, state_dir: &Path, kubeconfig: &Path) -> Process {
    run_agent_with(agent, state_dir, kubeconfig, &[])
}

/// [`run_agent`] with more environment (`OUTPOST_AGENT_METRICS_ADDRESS`, say).
pub fn run_agent_with(
    agent: &Path,
    state_dir: &Path,
    kubeconfig: &Path,
    env: &[(&str, String)],
) -> Process {
    Process(
        Command::new(agent)
            .args(["run", "--kubeconfig", &kubeconfig.display().to_string()])
            .env("OUTPOST_AGENT_STATE_DIR", state_dir)
            .env("OUTPOST_LOG", "warn")
            .envs(env.iter().map(|(name, value)| (*name, value)))
            .spawn()
            .expect("start outpost-agent"),
    )
}

/// One scrape of a Prometheus text exposition: every sample, parsed.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// (metric name, labels, value).
    pub samples: Vec<(String, std::collections::BTreeMap<String, String>, f64)>,
    /// The text as served.
    pub text: String,
}

impl Scrape {
    /// GETs `url` and parses it; panics when it does not answer 200 or a line does not parse
    /// (so a malformed exposition fails the test that scrapes it).
    pub fn get(url: &str) -> Scrape {
        let text = ureq::get(url)
            .call()
            .unwrap_or_else(|error| panic!("GET {url}: {error}"))
            .body_mut()
            .read_to_string()
            .expect("a text body");
        Scrape::parse(&text)
    }

    /// Parses the text format (`# HELP`/`# TYPE`/`# EOF` lines, then `name{k="v",...} value`).
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), Default::default()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                    let mut labels = std::collections::BTreeMap::new();
                    // Values here never hold `",` (bundle, source and phase names).
                    for pair in inner.split("\",").filter(|pair| !pair.is_empty()) {
                        let (key, value) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                        labels.insert(key.to_owned(), value.trim_end_matches('"').to_owned());
                    }
                    (name.to_owned(), labels)
                }
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            samples.push((name, labels, value));
        }
        Scrape {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of the sample `name` whose labels include `labels` (the first match).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(sample, have, _)| {
                sample == name
                    && labels
                        .iter()
                        .all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|(_, _, value)| *value)
    }

    /// [`Scrape::value`], or a panic showing the scrape.
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }
}

/// A Git repository `work/repo` with one plain bundle, `shop` (ConfigMap `default/shop`,
/// value "1"), committed on main.
pub fn shop_repository(work: &Path) -> PathBuf {
    let repo = work.join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).expect("create the bundle folder");
    std::fs::write(
        repo.join("shop/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shop, namespace: default}\ndata: {value: \"1\"}\n",
    )
    .expect("write the manifest");
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    repo
}

/// Runs `git` in `dir`; panics if it fails.
pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .expect("git runs");
    assert!(status.success(), "git {args:?}");
}

/// A new Git repository at `dir` with an author configured and branch `main`.
pub fn git_init(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create the repository folder");
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["config", "user.email", "t@outpost.invalid"]);
    git(dir, &["config", "user.name", "T"]);
}

/// A loopback port free right now (TCP or UDP).
pub fn free_port(udp: bool) -> u16 {
    match udp {
        true => std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|socket| socket.local_addr())
            .expect("a free UDP port")
            .port(),
        false => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|socket| socket.local_addr())
            .expect("a free TCP port")
            .port(),
    }
}

/// The name of the admin API token `HubProcess::cli` runs with (what the audit records).
pub const OPERATOR: &str = "ops-test";

/// `outpost-hub run` as a process, on free loopback ports, syncing one Git repository.
#[derive(Debug)]
pub struct HubProcess {
    /// The running process (`None` while stopped).
    pub process: Option<Process>,
    /// The admin API's URL.
    pub url: String,
    /// The QUIC port agents dial.
    pub agents_port: u16,
    /// The config file.
    pub config: PathBuf,
    /// The hub binary.
    pub binary: PathBuf,
    /// An admin API token (named [`OPERATOR`]).
    pub token: String,
    /// When set, the hub logs JSON lines at info into this file instead of the test's stderr.
    pub json_log: Option<PathBuf>,
}

impl HubProcess {
    /// Writes a config under `work` for `repo` (tracking `track`; `""`: the repository's default
    /// branch, as a config without `track` does), makes the keys and an
    /// admin token as an operator would (`keys init`, `admin-token create`), and starts the hub.
    pub fn start(work: &Path, repo: &Path, track: &str) -> HubProcess {
        HubProcess::start_with(work, repo, track, "")
    }

    /// [`HubProcess::start`] with more top-level config lines (`extra`, TOML).
    pub fn start_with(work: &Path, repo: &Path, track: &str, extra: &str) -> HubProcess {
        let (admin, agents_port) = (free_port(false), free_port(true));
        // No track: the source follows the remote's default branch.
        let track_line = match track {
            "" => String::new(),
            track => format!("track = \"{track}\"\n"),
        };
        let config = work.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\npoll_interval_seconds = 3600\n{extra}\n[listen]\nadmin = \"127.0.0.1:{admin}\"\nagents = \"127.0.0.1:{agents_port}\"\n[[sources]]\nname = \"fleet\"\nurl = \"file://{}\"\n{track_line}",
                work.join("hub").display(),
                repo.display()
            ),
        )
        .expect("write the hub config");
        let binary = binary("outpost-hub");
        let config_arg = config.display().to_string();
        run(&binary, &["keys", "init", "--config", &config_arg], &[]);
        let token = run(
            &binary,
            &[
                "admin-token",
                "create",
                "--config",
                &config_arg,
                "--name",
                OPERATOR,
                "--role",
                "admin",
            ],
            &[],
        )
        .trim()
        .to_owned();
        let mut hub = HubProcess {
            process: None,
            url: format!("http://127.0.0.1:{admin}"),
            agents_port,
            config,
            binary,
            token,
            json_log: None,
        };
        hub.restart();
        hub
    }

    /// The hub's key dir.
    pub fn key_dir(&self) -> PathBuf {
        match std::fs::read_to_string(&self.config).ok().and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("key_dir = \"")?
                    .strip_suffix('"')
                    .map(PathBuf::from)
            })
        }) {
            Some(dir) => dir,
            None => self.config.with_file_name("hub").join("keys"),
        }
    }

    /// Another replica of this hub under `work`: the same store (`store_line`, e.g.
    /// `store = "postgres://…"`), the same keys and sources, ports and a data dir (Git mirror)
    /// of its own. Started.
    pub fn replica(&self, work: &Path, store_line: &str) -> HubProcess {
        std::fs::create_dir_all(work).expect("create the replica's folder");
        let (admin, agents_port) = (free_port(false), free_port(true));
        let text = std::fs::read_to_string(&self.config).expect("read the first hub's config");
        let sources = &text[text.find("[[sources]]").expect("a source")..];
        let config = work.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nkey_dir = \"{}\"\npoll_interval_seconds = 3600\n{store_line}\n[listen]\nadmin = \"127.0.0.1:{admin}\"\nagents = \"127.0.0.1:{agents_port}\"\n{sources}",
                work.join("hub").display(),
                self.key_dir().display(),
            ),
        )
        .expect("write the replica's config");
        let mut hub = HubProcess {
            process: None,
            url: format!("http://127.0.0.1:{admin}"),
            agents_port,
            config,
            binary: self.binary.clone(),
            token: self.token.clone(),
            json_log: None,
        };
        hub.restart();
        hub
    }

    /// Kills the hub at once (SIGKILL: no shutdown, the lease is not given up).
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.0.kill();
            let _ = process.0.wait();
        }
    }

    /// Stops the hub as systemd does (SIGTERM), waiting up to 10 s for it to exit.
    pub fn stop(&mut self) {
        let Some(mut process) = self.process.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &process.0.id().to_string()])
            .status();
        wait_for("the hub to stop", 10, || {
            process.0.try_wait().ok().flatten().is_some()
        });
    }

    /// Starts the hub again (stopping it first if it runs) and waits for its admin API.
    pub fn restart(&mut self) {
        self.stop();
        let mut command = Command::new(&self.binary);
        command
            .args(["run", "--config", &self.config.display().to_string()])
            .env("RUST_LOG", "warn")
            // OUTPOST_TEST_HUB_LOG=info shows what the hubs do (their stderr is the test's).
            .env(
                "OUTPOST_LOG",
                std::env::var("OUTPOST_TEST_HUB_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdout(Stdio::null());
        if let Some(path) = &self.json_log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the hub's log file");
            command
                .env("OUTPOST_LOG", "info")
                .env("OUTPOST_LOG_FORMAT", "json")
                .stderr(file);
        }
        self.process = Some(Process(command.spawn().expect("start outpost-hub")));
        let admin = self
            .url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse::<u16>().ok());
        wait_for("the hub's admin API", 20, || {
            admin.is_some_and(|port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        });
    }

    /// Runs an `outpost-hub` client command against this hub with the [`OPERATOR`] token
    /// (what rollouts record as who); returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut args = args.to_vec();
        args.extend(["--hub", &self.url]);
        run(&self.binary, &args, &self.cli_env())
    }

    /// The environment a CLI command against this hub runs with: its token, no credentials
    /// file of the machine's user.
    pub fn cli_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OUTPOST_TOKEN", self.token.clone()),
            (
                "OUTPOST_CREDENTIALS",
                self.config
                    .with_file_name("credentials.json")
                    .display()
                    .to_string(),
            ),
        ]
    }

    /// GETs an admin API path as JSON, with the [`OPERATOR`] token.
    pub fn get(&self, path: &str) -> serde_json::Value {
        ureq::get(&format!("{}{path}", self.url))
            .header("authorization", &format!("Bearer {}", self.token))
            .call()
            .expect("the admin API answers")
            .body_mut()
            .read_json()
            .expect("JSON")
    }

    /// Makes an enrolment bundle with `labels` (`k=v`) and enrols an agent process on
    /// `state_dir`; returns its id.
    pub fn enrol(&self, agent: &Path, state_dir: &Path, labels: &[&str]) -> String {
        let bundle = state_dir.with_extension("enrol.toml");
        let mut args = vec!["tokens", "create", "--bundle-file"];
        let bundle_path = bundle.display().to_string();
        args.push(&bundle_path);
        for label in labels {
            args.extend(["--label", label]);
        }
        self.cli(&args);
        let out = run(
            agent,
            &["enrol", "--bundle", &bundle_path, "--timeout-seconds", "30"],
            &[("OUTPOST_AGENT_STATE_DIR", state_dir.display().to_string())],
        );
        agent_id(&out)
    }
}

/// The id in `outpost-agent enrol`'s "enrolled as agent ID; now run ...".
fn agent_id(out: &str) -> String {
    out.split_whitespace()
        .nth(3)
        .expect("the agent id")
        .trim_end_matches(';')
        .to_owned()
}

/// The `value` of ConfigMap `default/shop`, the object the process tests' bundles write, as
/// `cluster` holds it now.
pub fn shop_value(cluster: &crate::kubeapi::KubeApiServer) -> Option<String> {
    cluster
        .object("v1", "ConfigMap", "default", "shop")
        .and_then(|object| object["data"]["value"].as_str().map(str::to_owned))
}
