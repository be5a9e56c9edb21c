//! An https Git remote that demands credentials: `git http-backend` behind a small Python CGI
//! server with TLS (a self-signed certificate made with `openssl`) and Basic authentication, on
//! loopback. The hub trusts the certificate through `GIT_SSL_CAINFO`, fetches with credentials
//! from its config (here from an environment variable), and is refused with wrong ones.

mod support;

use std::process::{Child, Command, Stdio};

use support::{Upstream, config_map};

const SERVER: &str = r#"
import base64, os, ssl, sys
from http.server import CGIHTTPRequestHandler, ThreadingHTTPServer

EXPECTED = "Basic " + base64.b64encode(os.environ["AUTH"].encode()).decode()

class Handler(CGIHTTPRequestHandler):
    cgi_directories = ["/cgi-bin"]
    # Run CGI with subprocess as the current user: the fork path switches root to `nobody`,
    # who may not read the test's private temporary folders.
    have_fork = False
    def allowed(self):
        if self.headers.get("Authorization") == EXPECTED:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="git"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False
    def do_GET(self):
        if self.allowed():
            super().do_GET()
    def do_POST(self):
        if self.allowed():
            super().do_POST()
    def log_message(self, *args):
        pass

os.chdir(sys.argv[1])
server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[3], sys.argv[4])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hub(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outpost-hub"))
        .args(args)
        .envs(envs.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[test]
fn fetches_over_https_with_credentials_from_the_environment() {
    let upstream = Upstream::new();
    upstream.write("pos/app.yaml", &config_map("pos", "1"));
    upstream.commit("first");
    upstream.git(&["tag", "pos-v1"]);

    // The web root: cgi-bin/git runs git http-backend for the upstream's parent folder.
    let web = tempfile::tempdir().unwrap();
    let cgi = web.path().join("cgi-bin");
    std::fs::create_dir_all(&cgi).unwrap();
    let backend = std::path::Path::new(&upstream.git(&["--exec-path"])).join("git-http-backend");
    let script = cgi.join("git");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexport GIT_PROJECT_ROOT='{}' GIT_HTTP_EXPORT_ALL=1\nexec '{}'\n",
            upstream.path().parent().unwrap().display(),
            backend.display()
        ),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (cert, key) = (web.path().join("cert.pem"), web.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(made.success());
    let server_py = web.path().join("server.py");
    std::fs::write(&server_py, SERVER).unwrap();
    let port = support::free_port();
    let _server = Server(
        Command::new("python3")
            .arg(&server_py)
            .arg(web.path())
            .arg(port.to_string())
            .arg(&cert)
            .arg(&key)
            .env("AUTH", "outpost:s3cret-token")
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 is installed"),
    );
    support::wait_for_port(port);
    let name = upstream.path().file_name().unwrap().to_str().unwrap();
    let url = format!("https://127.0.0.1:{port}/cgi-bin/git/{name}");
    let ca = cert.to_str().unwrap();

    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[[sources]]\nname = \"fleet\"\nurl = \"{url}\"\nusername = \"outpost\"\npassword_env = \"FLEET_TOKEN\"\n",
            data.path().join("state").display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    assert!(
        hub(
            &["keys", "init", "--config", config],
            &[("FLEET_TOKEN", "unused")]
        )
        .status
        .success()
    );

    let wrong = hub(
        &["run", "--config", config, "--once"],
        &[("FLEET_TOKEN", "wrong"), ("GIT_SSL_CAINFO", ca)],
    );
    assert!(!wrong.status.success(), "a wrong token must not fetch");
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !stderr.contains("wrong"),
        "the password never appears in output: {stderr}"
    );
    assert!(
        stderr.contains("not accepted by the remote"),
        "refused for the right reason: {stderr}"
    );

    let right = hub(
        &["run", "--config", config, "--once"],
        &[("FLEET_TOKEN", "s3cret-token"), ("GIT_SSL_CAINFO", ca)],
    );
    let stdout = String::from_utf8_lossy(&right.stdout);
    assert!(
        right.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&right.stderr)
    );
    assert!(stdout.contains("rendered  pos generation 1"), "{stdout}");
    assert!(!String::from_utf8_lossy(&right.stderr).contains("s3cret"));
}
