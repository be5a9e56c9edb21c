//! A real PostgreSQL server for tests: `initdb` on a temporary directory, the server on a free
//! loopback port, trust authentication for the user `outpost`, one database per test.
//!
//! The server runs under a small shell that holds a pipe from the test process: when the test
//! process ends, however it ends, the pipe closes and the shell stops the server, so no server
//! outlives its tests. As root (the server refuses root) it runs as the `postgres` user that
//! Debian's `postgresql` package creates. The binaries are found in `OUTPOST_PG_BIN`, else the
//! newest `/usr/lib/postgresql/*/bin`, else on `PATH`; the cluster goes under `OUTPOST_PG_TMP`,
//! else `/var/tmp` as root, else the temporary directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A PostgreSQL server started for tests; stopped when dropped.
#[derive(Debug)]
pub struct TestServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    guard: Option<Child>,
    databases: AtomicU32,
}

fn find_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("OUTPOST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        if dir.join("initdb").exists() && dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    Err(
        "no PostgreSQL server binaries (initdb, postgres) found: install Debian's postgresql \
         package (bash scripts/setup.sh tests does), or set OUTPOST_PG_BIN to their directory"
            .to_owned(),
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| format!("finding a free port: {error}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| format!("finding a free port: {error}"))
}

/// Quotes `text` for `sh`.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl TestServer {
    /// Creates a cluster in a new temporary directory and starts a server on it.
    pub fn start() -> Result<TestServer, String> {
        let mut server = TestServer::create()?;
        server.resume()?;
        Ok(server)
    }

    /// [`TestServer::start`] with TLS on (plain connections are still accepted): a CA made
    /// for it, whose PEM file is returned, signs the server's certificate for the host name
    /// `localhost` only.
    pub fn start_tls() -> Result<(TestServer, PathBuf), String> {
        let mut server = TestServer::create()?;
        let ca = test_ca(&server.dir, "ca")?;
        let key = server.dir.join("server.key");
        let request = server.dir.join("server.csr");
        let certificate = server.dir.join("server.pem");
        let extensions = server.dir.join("server.ext");
        std::fs::write(
            &extensions,
            "subjectAltName = DNS:localhost\nbasicConstraints = CA:FALSE\nkeyUsage = digitalSignature\nextendedKeyUsage = serverAuth\n",
        )
        .map_err(|error| format!("{}: {error}", extensions.display()))?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key.to_string_lossy(),
            "-out",
            &request.to_string_lossy(),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &request.to_string_lossy(),
            "-CA",
            &ca.to_string_lossy(),
            "-CAkey",
            &ca.with_extension("key").to_string_lossy(),
            "-CAcreateserial",
            "-extfile",
            &extensions.to_string_lossy(),
            "-out",
            &certificate.to_string_lossy(),
        ])?;
        // The server refuses a key that others can read, and must own it.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|error| format!("{}: {error}", key.display()))?;
        server.give_to_postgres()?;
        let conf = server.data_dir().join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(|error| format!("{}: {error}", conf.display()))?;
        writeln!(
            file,
            "ssl = on\nssl_cert_file = {}\nssl_key_file = {}",
            quote(&certificate.to_string_lossy()),
            quote(&key.to_string_lossy())
        )
        .map_err(|error| format!("{}: {error}", conf.display()))?;
        server.resume()?;
        Ok((server, ca))
    }

    fn create() -> Result<TestServer, String> {
        static SERVERS: AtomicU32 = AtomicU32::new(0);
        let bin = find_bin()?;
        let as_postgres = is_root();
        // The server's user must reach the directory: /tmp may be root's alone, /var/tmp is
        // everyone's.
        let base = match std::env::var_os("OUTPOST_PG_TMP") {
            Some(base) => PathBuf::from(base),
            None if as_postgres && Path::new("/var/tmp").is_dir() => PathBuf::from("/var/tmp"),
            None => std::env::temp_dir(),
        };
        let dir = base.join(format!(
            "outpost-pg-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let server = TestServer {
            bin,
            dir,
            port: free_port()?,
            as_postgres,
            guard: None,
            databases: AtomicU32::new(0),
        };
        server.give_to_postgres()?;
        let data = server.data_dir();
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "outpost",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        server.run(&mut initdb)?;
        Ok(server)
    }

    /// As root: hands the cluster's directory to the server's user (it refuses what it does
    /// not own).
    fn give_to_postgres(&self) -> Result<(), String> {
        match self.as_postgres {
            true => self.run(
                Command::new("chown")
                    .arg("-R")
                    .arg("postgres")
                    .arg(&self.dir),
            ),
            false => Ok(()),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("db")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `program` from the server's binaries, run as the server's user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.as_postgres {
            true => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--"]).arg(path);
                command
            }
            false => Command::new(path),
        }
    }

    fn run(&self, command: &mut Command) -> Result<(), String> {
        let output = command
            .output()
            .map_err(|error| format!("running {command:?}: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "{command:?} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    }

    /// Starts the server again on the same data and port (after [`TestServer::stop`]).
    pub fn resume(&mut self) -> Result<(), String> {
        if self.guard.is_some() {
            return Ok(());
        }
        // The shell stops the server (fast shutdown) when told to, or when its stdin closes
        // because the test process ended (then it removes the cluster too).
        let script = format!(
            "{postgres} -D {data} -p {port} -k {dir} -c listen_addresses=127.0.0.1 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
             >>{log} 2>&1 </dev/null & pid=$!; read cmd; kill -INT $pid; wait $pid; \
             [ \"$cmd\" = stop ] || rm -rf {dir}",
            postgres = quote(&self.bin.join("postgres").to_string_lossy()),
            data = quote(&self.data_dir().to_string_lossy()),
            port = self.port,
            dir = quote(&self.dir.to_string_lossy()),
            log = quote(&self.log_path().to_string_lossy()),
        );
        let mut command = match self.as_postgres {
            true => {
                let mut command = Command::new("runuser");
                command.args(["-u", "postgres", "--", "sh", "-c", &script]);
                command
            }
            false => {
                let mut command = Command::new("sh");
                command.args(["-c", &script]);
                command
            }
        };
        let guard = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("starting postgres: {error}"))?;
        self.guard = Some(guard);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "postgres did not become ready in 60 s; its log ({}):\n{}",
                    self.log_path().display(),
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown: open sessions are ended) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            if let Some(mut stdin) = guard.stdin.take() {
                let _ = stdin.write_all(b"stop\n");
            }
            let _ = guard.wait();
        }
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://outpost@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database; returns its URL.
    pub fn create_database(&self) -> Result<String, String> {
        let name = format!("test_{}", self.databases.fetch_add(1, Ordering::Relaxed));
        let mut psql = Command::new(self.bin.join("psql"));
        psql.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "outpost",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ]);
        self.run(&mut psql)?;
        Ok(self.url(&name))
    }

    /// Where the cluster lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .map_err(|error| format!("running openssl (install Debian's openssl): {error}"))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// A self-signed CA for tests in `dir`: `NAME.pem` (returned) and `NAME.key`.
pub fn test_ca(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let certificate = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=outpost test {name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &key.to_string_lossy(),
        "-out",
        &certificate.to_string_lossy(),
    ])?;
    Ok(certificate)
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
