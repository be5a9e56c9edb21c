//! The admin API's access control with a real `outpost-hub run` process and real HTTP: every
//! route against no token, each role, an expired and a revoked token; the audit trail names the
//! token, never a header the caller fills in; Secret values redacted; a foreign Host refused;
//! body and write-rate limits. Then signed webhooks (GitHub, GitLab, Gitea formats, HMAC
//! computed here) on a listener of their own, a burst that makes one fetch of one source, and
//! HTTPS with `outpost-hub login`.

use std::path::Path;
use std::time::Duration;

use outpost_e2e::processes::{
    HubProcess, OPERATOR, binary, free_port, git, git_init, run, wait_for,
};
use serde_json::{Value, json};

/// One HTTP call: status and JSON body (`Null` if none).
fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> (u16, Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    );
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .header("content-type", "application/json")
        .body(body.unwrap_or(b"{}").to_vec())
        .unwrap();
    let mut response = agent.run(request).expect("the hub answers");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn repository(work: &Path) -> std::path::PathBuf {
    let repo = work.join("repo");
    git_init(&repo);
    std::fs::create_dir_all(repo.join("shop")).unwrap();
    std::fs::write(
        repo.join("shop/app.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shop, namespace: default}\ndata: {value: \"1\"}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: shop-db, namespace: default}\nstringData: {password: hunter2}\ndata: {user: YWRtaW4=}\n",
    )
    .unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-qm", "first"]);
    repo
}

fn make_token(hub: &HubProcess, name: &str, role: &str, extra: &[&str]) -> String {
    let mut args = vec!["admin-token", "create", "--name", name, "--role", role];
    args.extend(extra);
    hub.cli(&args).trim().to_owned()
}

/// The minimum role of each route, as docs/security.md lists them (`None`: public).
fn routes(agent: &str) -> Vec<(&'static str, String, Option<&'static str>, Value)> {
    let no_body = json!({});
    let mut routes = vec![
        ("GET", "/live".to_owned(), None, no_body.clone()),
        ("GET", "/ready".to_owned(), None, no_body.clone()),
        ("GET", "/".to_owned(), None, no_body.clone()),
        ("GET", "/fleet".to_owned(), None, no_body.clone()),
        ("GET", "/fleet.js".to_owned(), None, no_body.clone()),
        ("GET", "/metrics".to_owned(), None, no_body.clone()),
    ];
    for path in [
        "/api/v1/whoami",
        "/api/v1/bundles",
        "/api/v1/releases",
        "/api/v1/sources",
        "/api/v1/replica",
        "/api/v1/snapshots/shop/1",
        "/api/v1/snapshots/shop/1/objects",
        "/api/v1/events",
        "/api/v1/agents",
        "/api/v1/tokens",
        "/api/v1/status",
        "/api/v1/fleet",
        "/api/v1/fleet/summary",
        "/api/v1/rollouts",
        "/api/v1/rollouts/99",
        "/api/v1/preview?bundle=shop&tag=v1",
        "/api/v1/drift",
    ] {
        routes.push(("GET", path.to_owned(), Some("viewer"), no_body.clone()));
    }
    routes.push((
        "GET",
        format!("/api/v1/agents/{agent}"),
        Some("viewer"),
        no_body.clone(),
    ));
    routes.push((
        "GET",
        format!("/api/v1/agents/{agent}/history"),
        Some("viewer"),
        no_body.clone(),
    ));
    routes.extend([
        (
            "POST",
            "/api/v1/fetch".to_owned(),
            Some("operator"),
            no_body.clone(),
        ),
        (
            "POST",
            format!("/api/v1/agents/{agent}/labels"),
            Some("operator"),
            json!({"labels": {"zone": "a"}}),
        ),
        (
            "POST",
            "/api/v1/rollouts".to_owned(),
            Some("operator"),
            json!({"bundle": "shop", "tag": "no-such-tag"}),
        ),
        (
            "POST",
            "/api/v1/rollouts/99/pause".to_owned(),
            Some("operator"),
            json!({"why": "test"}),
        ),
        (
            "POST",
            "/api/v1/tokens".to_owned(),
            Some("admin"),
            json!({"labels": {}}),
        ),
        (
            "POST",
            "/api/v1/agents/nobody/revoke".to_owned(),
            Some("admin"),
            json!({"why": "test"}),
        ),
        (
            "POST",
            "/api/v1/tokens/0123456789abcdef/revoke".to_owned(),
            Some("admin"),
            json!({"why": "test"}),
        ),
        (
            "GET",
            "/api/v1/admin-tokens".to_owned(),
            Some("admin"),
            no_body.clone(),
        ),
        (
            "POST",
            "/api/v1/admin-tokens".to_owned(),
            Some("admin"),
            json!({"name": "made-in-matrix", "role": "viewer"}),
        ),
        (
            "POST",
            "/api/v1/admin-tokens/nobody/revoke".to_owned(),
            Some("admin"),
            no_body.clone(),
        ),
        (
            "GET",
            "/api/v1/keys".to_owned(),
            Some("admin"),
            no_body.clone(),
        ),
        (
            "POST",
            "/api/v1/keys/reload".to_owned(),
            Some("admin"),
            no_body.clone(),
        ),
        (
            "GET",
            "/api/v1/snapshots/shop/1/objects?secrets=reveal".to_owned(),
            Some("admin"),
            no_body,
        ),
    ]);
    routes
}

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 1,
        "operator" => 2,
        "admin" => 3,
        _ => 0,
    }
}

#[test]
fn every_route_answers_each_token_as_its_role_allows() {
    let work = tempfile::tempdir().unwrap();
    let repo = repository(work.path());
    let hub = HubProcess::start(work.path(), &repo, "main");
    wait_for("the first sync", 30, || {
        hub.get("/api/v1/releases")
            .as_array()
            .is_some_and(|rows| rows.iter().any(|row| row["generation"] == 1))
    });
    // An agent record to label (enrolled through the store, as the transport would).
    let agent = {
        let secret = hub.cli(&["tokens", "create", "--output", "json"]);
        let token: Value = serde_json::from_str(&secret).unwrap();
        let store = outpost_hub::store::SqliteStore::open(&work.path().join("hub/hub.db")).unwrap();
        use outpost_hub::store::Store as _;
        let digest = outpost_proto::Digest::of(token["token"].as_str().unwrap().as_bytes());
        store
            .enrol(&digest, &[7; 32], outpost_e2e::harness::unix_now())
            .unwrap()
            .unwrap()
            .id
    };
    let viewer = make_token(&hub, "dash", "viewer", &[]);
    let operator = make_token(&hub, "ci-deploy", "operator", &[]);
    let admin = hub.token.clone();
    let expired = make_token(&hub, "short-lived", "admin", &["--ttl", "1s"]);
    let revoked = make_token(&hub, "leaked", "admin", &[]);
    hub.cli(&["admin-token", "revoke", "leaked"]);
    std::thread::sleep(Duration::from_secs(2));

    let tokens: [(&str, Option<&str>, Option<&str>); 6] = [
        ("no token", None, None),
        ("viewer", Some(&viewer), Some("viewer")),
        ("operator", Some(&operator), Some("operator")),
        ("admin", Some(&admin), Some("admin")),
        ("expired", Some(&expired), None),
        ("revoked", Some(&revoked), None),
    ];
    let mut table = Vec::new();
    for (method, path, needed, body) in routes(&agent) {
        for (label, token, role) in tokens {
            let body = body.to_string();
            let (status, answer) = call(
                method,
                &format!("{}{path}", hub.url),
                token,
                &[],
                Some(body.as_bytes()),
            );
            table.push(format!("{method} {path} as {label}: {status}"));
            let expected = match (needed, role) {
                (None, _) => "allowed",
                (Some(_), None) => "401",
                (Some(needed), Some(role)) if rank(role) < rank(needed) => "403",
                (Some(_), Some(_)) => "allowed",
            };
            match expected {
                "allowed" => assert!(
                    ![401, 403, 429].contains(&status) && status < 500,
                    "{method} {path} as {label}: {status} {answer}"
                ),
                "401" => {
                    assert_eq!(status, 401, "{method} {path} as {label}: {answer}");
                    assert_eq!(answer["needed"], "viewer", "{answer}");
                }
                _ => {
                    assert_eq!(status, 403, "{method} {path} as {label}: {answer}");
                    assert_eq!(answer["needed"], needed.unwrap(), "{answer}");
                    assert!(
                        answer["error"].as_str().unwrap().contains(needed.unwrap()),
                        "the error says what is needed: {answer}"
                    );
                }
            }
        }
    }
    eprintln!("{}", table.join("\n"));
    // The answers say what to do.
    let (_, answer) = call(
        "GET",
        &format!("{}/api/v1/agents", hub.url),
        Some(&expired),
        &[],
        None,
    );
    assert!(
        answer["error"].as_str().unwrap().contains("expired"),
        "{answer}"
    );
    let (_, answer) = call(
        "GET",
        &format!("{}/api/v1/agents", hub.url),
        Some(&revoked),
        &[],
        None,
    );
    assert!(
        answer["error"].as_str().unwrap().contains("revoked"),
        "{answer}"
    );

    // A forged identity header decides nothing: the audit names the token.
    let url = format!("{}/api/v1/agents/{agent}/labels", hub.url);
    let body = json!({"labels": {"site": "x"}}).to_string();
    let (status, _) = call(
        "POST",
        &url,
        Some(&operator),
        &[("x-outpost-user", "mallory")],
        Some(body.as_bytes()),
    );
    assert_eq!(status, 200);
    let events = hub.get("/api/v1/events?limit=500").to_string();
    assert!(!events.contains("mallory"), "{events}");
    let labelled = hub.get("/api/v1/events?limit=500");
    assert!(
        labelled
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["kind"] == "agent-labelled"
                && event["message"].as_str().unwrap().contains("by ci-deploy")),
        "{labelled}"
    );
    assert!(
        labelled
            .as_array()
            .unwrap()
            .iter()
            .any(|event| event["kind"] == "api-write" && event["subject"] == "ci-deploy"),
        "every write is audited under the token's name: {labelled}"
    );
    let listed = hub.get("/api/v1/admin-tokens");
    let dash = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "dash")
        .unwrap();
    assert!(dash["last_used_at"].is_i64(), "last use recorded: {dash}");
    assert!(
        !listed.to_string().contains(&viewer),
        "secrets are never listed"
    );

    // Secret values: redacted for everyone unless an admin asks.
    let objects = |token: &str, query: &str| {
        call(
            "GET",
            &format!("{}/api/v1/snapshots/shop/1/objects{query}", hub.url),
            Some(token),
            &[],
            None,
        )
    };
    let (_, redacted) = objects(&viewer, "");
    let secret = redacted
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "Secret")
        .unwrap();
    assert_eq!(secret["stringData"]["password"], "<redacted>");
    assert_eq!(secret["data"]["user"], "<redacted>");
    assert!(!redacted.to_string().contains("hunter2"));
    assert_eq!(objects(&operator, "?secrets=reveal").0, 403);
    let (_, revealed) = objects(&admin, "?secrets=reveal");
    assert!(revealed.to_string().contains("hunter2"));
    let cli = hub.cli(&["objects", "shop", "1", "--output", "json"]);
    assert!(
        !cli.contains("hunter2") && cli.contains("<redacted>"),
        "{cli}"
    );

    // A page on another site that rebinds its name to the hub's address is refused.
    let (status, answer) = call(
        "GET",
        &format!("{}/api/v1/whoami", hub.url),
        Some(&admin),
        &[("host", "evil.example:7070")],
        None,
    );
    assert_eq!(status, 421, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("admin_names"));

    // Limits: an oversized body, then a burst of writes beyond the token's rate.
    let huge = format!("{{\"labels\": {{\"a\": \"{}\"}}}}", "x".repeat(100 << 10));
    let (status, _) = call("POST", &url, Some(&operator), &[], Some(huge.as_bytes()));
    assert_eq!(status, 413, "bodies are read up to 64 KiB");
    let too_many: Vec<u16> = (0..80)
        .map(|_| {
            call(
                "POST",
                &format!("{}/api/v1/fetch", hub.url),
                Some(&operator),
                &[],
                None,
            )
            .0
        })
        .collect();
    assert!(too_many.contains(&429), "{too_many:?}");
    let labels: serde_json::Map<String, Value> =
        (0..70).map(|i| (format!("k{i}"), json!("v"))).collect();
    let body = json!({"labels": labels}).to_string();
    assert_eq!(
        call("POST", &url, Some(&admin), &[], Some(body.as_bytes())).0,
        400,
        "at most 64 labels"
    );
}

fn hmac_hex(secret: &[u8], body: &[u8]) -> String {
    // HMAC-SHA256 (RFC 2104) from SHA-256, computed here rather than with the hub's code.
    let mut key = [0u8; 64];
    key[..secret.len()].copy_from_slice(secret);
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let mut inner = pad(0x36);
    inner.extend_from_slice(body);
    let inner = outpost_proto::Digest::of(&inner);
    let mut outer = pad(0x5c);
    outer.extend_from_slice(&inner.0);
    outpost_proto::Digest::of(&outer).to_hex()
}

#[test]
fn webhooks_are_verified_and_a_burst_is_one_fetch_of_that_source() {
    let work = tempfile::tempdir().unwrap();
    let repo = repository(work.path());
    let other = work.path().join("other");
    git_init(&other);
    std::fs::create_dir_all(other.join("kiosk")).unwrap();
    std::fs::write(
        other.join("kiosk/a.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: k, namespace: default}\n",
    )
    .unwrap();
    git(&other, &["add", "-A"]);
    git(&other, &["commit", "-qm", "k"]);
    let secret = "0123456789abcdef0123456789abcdef";
    let secret_file = work.path().join("hook-secret");
    std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
    let hooks_port = free_port(false);
    let extra = format!(
        "[[sources]]\nname = \"other\"\nurl = \"file://{}\"\n",
        other.display()
    );
    let hub = HubProcess::start_with(work.path(), &repo, "main", "");
    // Reconfigure: a second source, the first with a webhook secret, hooks on their own port.
    let config = std::fs::read_to_string(&hub.config).unwrap();
    let config = config
        .replace(
            "[listen]\n",
            &format!("[listen]\nhooks = \"127.0.0.1:{hooks_port}\"\n"),
        )
        .replace(
            "track = \"main\"\n",
            &format!(
                "track = \"main\"\nwebhook_secret_file = \"{}\"\n{extra}",
                secret_file.display()
            ),
        );
    std::fs::write(&hub.config, config).unwrap();
    let mut hub = hub;
    hub.restart();
    let hooks = format!("http://127.0.0.1:{hooks_port}");
    wait_for("the hooks listener", 20, || {
        std::net::TcpStream::connect(("127.0.0.1", hooks_port)).is_ok()
    });
    let fetches = |source: &str| -> u64 {
        hub.get("/api/v1/sources")
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["name"] == source)
            .and_then(|row| row["fetches"].as_u64())
            .unwrap()
    };
    wait_for("the first fetches", 30, || {
        fetches("fleet") >= 1 && fetches("other") >= 1
    });

    // Each delivery has a body of its own (the hub refuses a body it accepted within the hour
    // as a replay: tests/trust.rs).
    let body_of = |n: usize| format!(r#"{{"ref":"refs/heads/main","after":"{n:040}"}}"#);
    let good_for = |body: &str| hmac_hex(secret.as_bytes(), body.as_bytes());
    let bad_for = |body: &str| hmac_hex(b"not the secret at all..........", body.as_bytes());
    let hook_with = |path: &str, headers: &[(&str, &str)], body: &str| {
        call(
            "POST",
            &format!("{hooks}{path}"),
            None,
            headers,
            Some(body.as_bytes()),
        )
    };
    let body = body_of(0);
    let good = format!("sha256={}", good_for(&body));
    let hook = |path: &str, headers: &[(&str, &str)]| hook_with(path, headers, &body);
    // (what, header, its value — `good`/`bad`: the body's HMAC, `sha256=` prefixed for GitHub —,
    // the event header, expected status)
    type Case<'a> = (&'a str, &'a str, &'a str, Option<(&'a str, &'a str)>, u16);
    let cases: Vec<Case<'_>> = vec![
        (
            "GitHub, good",
            "x-hub-signature-256",
            "sha256=good",
            Some(("x-github-event", "push")),
            202,
        ),
        (
            "GitHub, bad",
            "x-hub-signature-256",
            "sha256=bad",
            None,
            401,
        ),
        (
            "GitHub, unprefixed",
            "x-hub-signature-256",
            "good",
            None,
            401,
        ),
        ("missing", "", "", None, 401),
        (
            "GitLab, good",
            "x-gitlab-token",
            secret,
            Some(("x-gitlab-event", "Push Hook")),
            202,
        ),
        (
            "GitLab, bad",
            "x-gitlab-token",
            "0123456789abcdef0123456789abcdeX",
            None,
            401,
        ),
        ("Gitea, good", "x-gitea-signature", "good", None, 202),
        ("Gitea, bad", "x-gitea-signature", "bad", None, 401),
    ];
    for (index, (what, header, value, event, expected)) in cases.iter().enumerate() {
        let body = body_of(index + 1);
        let value = match *value {
            "sha256=good" => format!("sha256={}", good_for(&body)),
            "sha256=bad" => format!("sha256={}", bad_for(&body)),
            "good" => good_for(&body),
            "bad" => bad_for(&body),
            other => other.to_owned(),
        };
        let mut headers = Vec::new();
        if !header.is_empty() {
            headers.push((*header, value.as_str()));
        }
        headers.extend(event.iter().copied());
        let (status, answer) = hook_with("/hooks/git/fleet", &headers, &body);
        assert_eq!(status, *expected, "{what}: {answer}");
    }
    let (status, answer) = hook("/hooks/git/other", &[("x-hub-signature-256", &good)]);
    assert_eq!(status, 404, "no secret, no webhook: {answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("webhook_secret_env")
    );
    assert_eq!(hook("/hooks/git/nowhere", &[]).0, 404);
    // The admin API is not on the hooks listener, nor the hooks on the admin one.
    assert_eq!(
        call(
            "GET",
            &format!("{hooks}/api/v1/whoami"),
            Some(&hub.token),
            &[],
            None
        )
        .0,
        404
    );
    assert_eq!(
        call(
            "POST",
            &format!("{}/hooks/git/fleet", hub.url),
            Some(&hub.token),
            &[("x-hub-signature-256", &good)],
            Some(body.as_bytes())
        )
        .0,
        404
    );

    // Let the deliveries above settle into their fetch, then a burst of ten pushes: one fetch.
    wait_for("the deliveries' fetch", 30, || fetches("fleet") >= 2);
    std::thread::sleep(Duration::from_secs(3));
    let (fleet_before, other_before) = (fetches("fleet"), fetches("other"));
    for n in 100..110 {
        let body = body_of(n);
        let signature = format!("sha256={}", good_for(&body));
        assert_eq!(
            hook_with(
                "/hooks/git/fleet",
                &[("x-hub-signature-256", &signature)],
                &body
            )
            .0,
            202
        );
    }
    wait_for("the burst's fetch", 30, || fetches("fleet") > fleet_before);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fetches("fleet"), fleet_before + 1, "ten pushes, one fetch");
    assert_eq!(
        fetches("other"),
        other_before,
        "the other source is not fetched"
    );
    // A ping is answered without a fetch.
    let ping = body_of(200);
    let signature = format!("sha256={}", good_for(&ping));
    let (status, answer) = hook_with(
        "/hooks/git/fleet",
        &[
            ("x-hub-signature-256", &signature),
            ("x-github-event", "ping"),
        ],
        &ping,
    );
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn https_admin_with_login_and_no_plain_http_off_loopback() {
    let work = tempfile::tempdir().unwrap();
    let repo = repository(work.path());
    // A private CA and a server certificate it signs, as an operator's PKI would make them.
    let (ca, ca_key) = (work.path().join("ca.crt"), work.path().join("ca.key"));
    let (cert, key) = (work.path().join("tls.crt"), work.path().join("tls.key"));
    let csr = work.path().join("tls.csr");
    let ext = work.path().join("tls.ext");
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let made = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is needed for this test: apt-get install openssl");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    };
    let path = |p: &Path| p.display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=Outpost test CA",
        "-keyout",
        &path(&ca_key),
        "-out",
        &path(&ca),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        &path(&key),
        "-out",
        &path(&csr),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path(&csr),
        "-CA",
        &path(&ca),
        "-CAkey",
        &path(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path(&ext),
        "-out",
        &path(&cert),
    ]);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let mut hub = HubProcess::start_with(work.path(), &repo, "main", "");
    let config = std::fs::read_to_string(&hub.config).unwrap();
    std::fs::write(&hub.config, format!("{config}{tls}")).unwrap();
    hub.restart();
    let https = hub.url.replace("http://", "https://");
    let hub_bin = binary("outpost-hub");
    let credentials = work.path().join("creds/credentials.json");
    let env = |token: Option<&str>| {
        let mut env = vec![("OUTPOST_CREDENTIALS", credentials.display().to_string())];
        if let Some(token) = token {
            env.push(("OUTPOST_TOKEN", token.to_owned()));
        }
        env
    };
    // Plain HTTP to the TLS port gets nowhere; the CLI without the CA says what to check.
    let plain = std::process::Command::new(&hub_bin)
        .args(["releases", "--hub", &hub.url])
        .envs(env(Some(&hub.token)))
        .output()
        .unwrap();
    assert!(!plain.status.success());
    let untrusted = std::process::Command::new(&hub_bin)
        .args(["releases", "--hub", &https])
        .envs(env(Some(&hub.token)))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!untrusted.status.success());
    assert!(String::from_utf8_lossy(&untrusted.stderr).contains("--ca-file"));
    // Login: the token from standard input, checked, kept 0600, used from then on.
    let mut login = std::process::Command::new(&hub_bin)
        .args(["login", "--hub", &https, "--ca-file"])
        .arg(&ca)
        .envs(env(None))
        .env_remove("OUTPOST_TOKEN")
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    writeln!(login.stdin.take().unwrap(), "{}", hub.token).unwrap();
    let login = login.wait_with_output().unwrap();
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    let said = String::from_utf8_lossy(&login.stdout);
    assert!(said.contains(&format!("as {OPERATOR} (admin)")), "{said}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&credentials)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let releases = run(&hub_bin, &["releases", "--output", "json"], &env(None));
    assert!(releases.contains("refs/heads/main"), "{releases}");

    // A non-loopback admin address without TLS is refused unless insecure_admin says so.
    let open = work.path().join("open.toml");
    std::fs::write(
        &open,
        format!("data_dir = \"{}\"\n[listen]\nadmin = \"0.0.0.0:{}\"\n[[sources]]\nname = \"a\"\nurl = \"/srv/a\"\n", work.path().join("x").display(), free_port(false)),
    )
    .unwrap();
    let checked = std::process::Command::new(&hub_bin)
        .args(["check-config", "--config"])
        .arg(&open)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!checked.status.success());
    assert!(String::from_utf8_lossy(&checked.stderr).contains("insecure_admin = true"));
    let text = std::fs::read_to_string(&open).unwrap();
    std::fs::write(&open, format!("insecure_admin = true\n{text}")).unwrap();
    let checked = std::process::Command::new(&hub_bin)
        .args(["check-config", "--config"])
        .arg(&open)
        .output()
        .unwrap();
    assert!(checked.status.success());
    assert!(String::from_utf8_lossy(&checked.stderr).contains("warning: insecure_admin = true"));
}
