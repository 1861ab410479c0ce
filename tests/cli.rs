//! The `tokengate` binary: `check`, `token` and `demo` as a user runs them.

use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokengate::sandbox::Sandbox;
use tokengate::sandbox::auth::Agent;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tokengate");
const SECRET: &str = "cli-secret-0x5eed";

fn config(auth_url: &str, credential: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[credentials.partner]
auth_url = "{auth_url}"
agent_id = "integratorCli01"
secret = {{ env = "PARTNER_SECRET" }}
[[routes]]
upstream = "https://api.example.com"
credential = "{credential}"
"#
    )
}

async fn tokengate(args: &[&str], config_text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config_text).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--config")
        .arg(&path)
        .env("PARTNER_SECRET", SECRET)
        .env("RUST_LOG", "trace");
    let out = cmd.output().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.code().unwrap_or(-1),
        stdout,
        stderr.replace(&path.display().to_string(), "FILE"),
    )
}

#[tokio::test]
async fn check_names_the_file_key_and_unknown_credential() {
    let (code, _, stderr) = tokengate(
        &["check"],
        &config("https://auth.example.com/v2/auth", "nope"),
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("FILE: routes[0].credential: unknown credential `nope`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_refuses_inline_secrets_and_bad_values_by_key() {
    let inline = config("https://auth.example.com/v2/auth", "partner")
        .replace("{ env = \"PARTNER_SECRET\" }", "\"hunter2\"");
    let (code, _, stderr) = tokengate(&["check"], &inline).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("credentials.partner.secret"), "{stderr}");
    assert!(!stderr.contains("hunter2"));

    let (code, _, stderr) = tokengate(&["check"], &config("not a url", "partner")).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("credentials.partner.auth_url"), "{stderr}");

    let bad_duration = config("https://auth.example.com/v2/auth", "partner")
        .replace("[server]", "[server]\nrequest_timeout = \"ten seconds\"");
    let (code, _, stderr) = tokengate(&["check"], &bad_duration).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("server.request_timeout"), "{stderr}");
}

#[tokio::test]
async fn check_prints_a_summary_without_secrets() {
    let (code, stdout, stderr) = tokengate(
        &["check"],
        &config("https://auth.example.com/v2/auth", "partner"),
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("credential partner"), "{stdout}");
    assert!(
        stdout.contains("secret from env PARTNER_SECRET"),
        "{stdout}"
    );
    assert!(stdout.contains("routes[0]"), "{stdout}");
    // The config's own spellings, not the program's type names.
    for spelling in [
        "signature sha256 ",
        "layout iv-tag-ct ",
        "client_authorization replace",
    ] {
        assert!(stdout.contains(spelling), "{spelling}: {stdout}");
    }
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
    assert!(!stderr.contains("warning"), "{stderr}");

    // A credential no route uses is accepted with a warning.
    let spare = format!(
        "{}\n[credentials.spare]\nauth_url = \"https://a.example/v2/auth\"\nagent_id = \"s\"\n\
         secret = {{ env = \"PARTNER_SECRET\" }}\n",
        config("https://auth.example.com/v2/auth", "partner")
    );
    let (code, _, stderr) = tokengate(&["check"], &spare).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: FILE: credentials.spare: no route uses this credential"),
        "{stderr}"
    );
}

#[tokio::test]
async fn check_validates_the_shared_cache_and_says_whether_redis_answers() {
    let with = |section: &str| {
        format!(
            "{}\n[shared_cache]\n{section}\n",
            config("https://auth.example.com/v2/auth", "partner")
        )
    };
    let key = "encryption_key = { env = \"PARTNER_SECRET\" }";
    // A password in the URL, a key that is not 32 bytes: refused, by key, without echoing them.
    let (code, _, stderr) = tokengate(
        &["check"],
        &with(&format!("url = \"redis://u:pw0rd@h:6379\"\n{key}")),
    )
    .await;
    assert_eq!(code, 1);
    assert!(stderr.contains("shared_cache.url"), "{stderr}");
    assert!(!stderr.contains("pw0rd"), "{stderr}");
    let (code, _, stderr) = tokengate(
        &["check"],
        &with(&format!("url = \"redis://127.0.0.1:1/0\"\n{key}")),
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("shared_cache.encryption_key: must be base64 of exactly 32 bytes"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET));

    // A valid section with nothing listening: accepted, and said.
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cache.key");
    std::fs::write(&key_file, "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").unwrap();
    let section = format!(
        "url = \"redis://127.0.0.1:1/0\"\nencryption_key = {{ file = \"{}\" }}",
        key_file.display()
    );
    let (code, stdout, stderr) = tokengate(&["check"], &with(&section)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("shared_cache  redis://127.0.0.1:1/0"),
        "{stdout}"
    );
    assert!(stdout.contains("redis does NOT answer"), "{stdout}");
    assert!(stdout.contains("shared true"), "{stdout}");
    assert!(!stdout.contains("BwcHBw"), "{stdout}");
}

/// No cause is said twice in a row in an error chain (`a: b: b: c`).
fn assert_no_repeated_cause(line: &str) {
    let causes: Vec<&str> = line.split(": ").collect();
    for pair in causes.windows(2) {
        assert_ne!(pair[0], pair[1], "a cause repeated in: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_names_the_address_and_the_key_it_cannot_listen_on() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let text = config("https://auth.example.com/v2/auth", "partner")
        .replace("127.0.0.1:0", &addr.to_string())
        .replace(
            "[credentials.partner]",
            "[admin]\nlisten = \"127.0.0.1:0\"\n[credentials.partner]",
        );
    let (code, _, stderr) = tokengate(&["run"], &text).await;
    assert_eq!(code, 1, "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "tokengate: FILE: server.listen: cannot listen on {addr}: "
        )),
        "{stderr}"
    );
    assert_no_repeated_cause(last);

    let text = config("https://auth.example.com/v2/auth", "partner").replace(
        "[credentials.partner]",
        &format!("[admin]\nlisten = \"{addr}\"\n[credentials.partner]"),
    );
    let (code, _, stderr) = tokengate(&["run"], &text).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("FILE: admin.listen: cannot listen on {addr}: ")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_failures_name_the_credential_and_its_auth_url_once_each_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let auth_url = format!("http://{}/v2/auth", closed.local_addr().unwrap());
    drop(closed);
    let (code, stdout, stderr) =
        tokengate(&["token", "partner"], &config(&auth_url, "partner")).await;
    assert_eq!(code, 1, "{stdout}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "tokengate: FILE: credentials.partner: the exchange with auth_url {auth_url} failed: auth server unreachable: "
        )),
        "{stderr}"
    );
    assert_no_repeated_cause(last);

    let (code, _, stderr) = tokengate(&["token", "nope"], &config(&auth_url, "partner")).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("FILE: credentials.nope: no such credential (defined: partner)"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_runs_one_exchange_and_shows_the_token_only_when_asked() {
    let sandbox = Sandbox::start(vec![Agent::new("integratorCli01", SECRET)], 600)
        .await
        .unwrap();
    let text = config(&sandbox.auth_url(), "partner");

    let (code, stdout, stderr) = tokengate(&["token", "partner"], &text).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("expires_in"), "{stdout}");
    assert!(stdout.contains("age"), "{stdout}");
    assert!(stdout.contains("log_uuid"), "{stdout}");
    assert!(
        !stdout.contains("token  "),
        "no token without --show: {stdout}"
    );
    assert!(!stdout.contains("eyJ") && !stderr.contains("eyJ"));

    let (code, stdout, _) = tokengate(&["token", "partner", "--show"], &text).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("token       eyJ"), "{stdout}");
    assert_eq!(sandbox.auth.issued(), 2);
}

/// `tokengate run` on a config file, with its JSON log lines forwarded to a channel.
struct Run {
    child: tokio::process::Child,
    proxy: String,
    admin: String,
    logs: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    path: std::path::PathBuf,
    sandbox: Sandbox,
    _dir: tempfile::TempDir,
}

impl Run {
    async fn start() -> Self {
        let sandbox = Sandbox::start(vec![Agent::new("integratorCli01", SECRET)], 600)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, Self::config(&sandbox, "")).unwrap();
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "run"])
            .env("TOKENGATE_CONFIG", &path)
            .env("PARTNER_SECRET", SECRET)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, mut logs) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(serde_json::from_str(&line).unwrap());
            }
        });
        let (proxy, admin) = Self::wait_for(&mut logs, |e| {
            let fields = &e["fields"];
            Some((
                fields["proxy_addr"].as_str()?.to_owned(),
                fields["admin_addr"].as_str()?.to_owned(),
            ))
        })
        .await;
        Self {
            child,
            proxy,
            admin,
            logs,
            path,
            sandbox,
            _dir: dir,
        }
    }

    fn config(sandbox: &Sandbox, server_extra: &str) -> String {
        config(&sandbox.auth_url(), "partner")
            .replace(
                "https://api.example.com",
                &format!("http://{}", sandbox.upstream_addr()),
            )
            .replace("[server]", &format!("[server]\n{server_extra}"))
            .replace(
                "[credentials.partner]",
                "[admin]\nlisten = \"127.0.0.1:0\"\n[credentials.partner]",
            )
    }

    async fn wait_for<T>(
        logs: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
        mut pick: impl FnMut(&serde_json::Value) -> Option<T>,
    ) -> T {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(event) = logs.recv().await {
                if let Some(found) = pick(&event) {
                    return found;
                }
            }
            panic!("the log ended first");
        })
        .await
        .expect("the expected log line")
    }

    async fn get(&self, path: &str) -> u16 {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let url = format!("http://{}{path}", self.proxy).parse().unwrap();
        client.get(url).await.unwrap().status().as_u16()
    }

    /// An admin request: its status and JSON body.
    async fn admin(&self, method: &str, path: &str) -> (u16, serde_json::Value) {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin))
            .body(Empty::new())
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    /// Polls `/readyz` until it answers 200; returns its body.
    async fn ready(&self) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let (status, body) = self.admin("GET", "/readyz").await;
                if status == 200 {
                    return body;
                }
                assert_eq!(status, 503, "{body}");
                assert_eq!(body["status"], "warming_up", "{body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("/readyz turns 200")
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        let sent = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_and_sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let mut run = Run::start().await;
    assert_eq!(run.get("/via-run?api_key=not-for-logs").await, 200);
    assert_eq!(run.sandbox.upstream.requests(), 1);
    // One access-log line per request, with the fields operators filter on.
    let access = Run::wait_for(&mut run.logs, |e| {
        (e["target"] == "tokengate::access").then(|| e["fields"].clone())
    })
    .await;
    assert_eq!(access["method"], "GET", "{access}");
    assert_eq!(
        access["path"], "/via-run",
        "the path, never the query: {access}"
    );
    assert!(!access.to_string().contains("not-for-logs"), "{access}");
    let client = access["client"].as_str().unwrap();
    assert!(
        client.starts_with("127.0.0.1:"),
        "the client's address: {access}"
    );
    let micros = access["latency_ms"].as_f64().unwrap() * 1000.0;
    assert!(
        (micros - micros.round()).abs() < 1e-6,
        "whole microseconds: {access}"
    );
    assert_eq!(access["route"], "routes[0]");
    assert_eq!(access["status"], 200);
    assert_eq!(access["credential"], "partner");
    assert_eq!(access["retried"], false);
    assert_eq!(
        access["host"], run.proxy,
        "the authority as the client sent it"
    );
    assert!(access["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(access.get("bytes").is_some(), "{access}");

    let in_flight = tokio::spawn({
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let url = format!("http://{}/slow/1000", run.proxy).parse().unwrap();
        async move { client.get(url).await.unwrap().status().as_u16() }
    });
    while run.sandbox.upstream.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.signal("-TERM");
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the request in flight finished"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), run.child.wait())
        .await
        .expect("run exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_becomes_ready_without_traffic_and_again_after_an_invalidate() {
    let run = Run::start().await;
    let body = run.ready().await;
    assert_eq!(body["status"], "ready", "{body}");
    assert_eq!(run.sandbox.auth.issued(), 1, "the start-up exchange");

    let (status, _) = run
        .admin("POST", "/admin/credentials/partner/invalidate")
        .await;
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(30), async {
        while run.sandbox.auth.issued() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a new exchange right after the invalidation");
    let body = run.ready().await;
    assert_eq!(body["status"], "ready", "{body}");
    let (_, credentials) = run.admin("GET", "/admin/credentials").await;
    assert_eq!(credentials["partner"]["state"], "valid", "{credentials}");
    assert_eq!(run.sandbox.auth.issued(), 2);
    assert_eq!(
        run.sandbox.upstream.requests(),
        0,
        "no client traffic at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_refuses_a_bad_one_naming_the_problem() {
    let mut run = Run::start().await;
    assert_eq!(run.get("/a").await, 200);

    // Only 10.0.0.0/8 may use the proxy now: this (loopback) client is refused.
    std::fs::write(
        &run.path,
        Run::config(&run.sandbox, "allowed_clients = [\"10.0.0.0/8\"]"),
    )
    .unwrap();
    run.signal("-HUP");
    Run::wait_for(&mut run.logs, |e| {
        (e["fields"]["message"] == "configuration reloaded").then_some(())
    })
    .await;
    assert_eq!(run.get("/b").await, 403);

    // A broken file is refused with the key named; the running configuration keeps serving.
    std::fs::write(&run.path, Run::config(&run.sandbox, "max_connections = 0")).unwrap();
    run.signal("-HUP");
    let error = Run::wait_for(&mut run.logs, |e| {
        (e["fields"]["message"] == "reload refused; the running configuration keeps serving")
            .then(|| e["fields"]["error"].as_str().unwrap_or_default().to_owned())
    })
    .await;
    assert!(error.contains("server.max_connections"), "{error}");
    assert_eq!(
        run.get("/c").await,
        403,
        "the previous configuration still serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_subcommands_serve_a_gateway_as_in_docker_compose() {
    let key = "6f0a4c1e9b2d7f3a5c8e1b4d7a0c3f6e9b2d5a8c1f4e7b0d3a6c9f2e5b8d1a4c";
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (auth, upstream) = (free_port(), free_port());
    let spawn = |args: Vec<String>| {
        Command::new(BIN)
            .args(args)
            .env("SANDBOX_JWT_KEY", key)
            .env("SANDBOX_AGENT_SECRET", SECRET)
            .env("PARTNER_SECRET", SECRET)
            .env(
                "TOKENGATE_CACHE_KEY",
                "c2FuZGJveC1jYWNoZS1rZXktbm90LWZvci1wcm9kISE=",
            )
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let _auth = spawn(vec![
        "sandbox".into(),
        "auth".into(),
        "--listen".into(),
        auth.to_string(),
        "--agent".into(),
        "integratorCli01".into(),
    ]);
    let _upstream = spawn(vec![
        "sandbox".into(),
        "upstream".into(),
        "--listen".into(),
        upstream.to_string(),
    ]);
    // The compose config, and the one for running without Docker, pointed at these ports
    // (compose's Redis at a port nothing listens on: the replica acts alone).
    let compose = include_str!("../deploy/compose/proxy.toml")
        .replace("redis://redis:6379", "redis://127.0.0.1:1")
        .replace("0.0.0.0:9901", "127.0.0.1:0")
        .replace("http://auth:9000", &format!("http://{auth}"))
        .replace("http://upstream:9100", &format!("http://{upstream}"));
    let local = include_str!("../deploy/local/proxy.toml")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("127.0.0.1:9000", &auth.to_string())
        .replace("127.0.0.1:9100", &upstream.to_string());
    let dir = tempfile::tempdir().unwrap();
    let mut proxies = Vec::new();
    for (name, text, listen) in [
        ("compose", compose, "0.0.0.0:8080"),
        ("local", local, "127.0.0.1:8080"),
    ] {
        let proxy = free_port();
        let path = dir.path().join(format!("{name}.toml"));
        let text = text
            .replace(listen, &proxy.to_string())
            .replace("integratorDemo01", "integratorCli01");
        std::fs::write(&path, text).unwrap();
        let child = spawn(vec![
            "run".into(),
            "--config".into(),
            path.display().to_string(),
        ]);
        proxies.push((name, proxy, child));
    }

    for (name, proxy, _child) in &proxies {
        // An HTTP_PROXY client's absolute-form request for the routed host.
        let request = "GET http://api.example.com/v1/x HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n";
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Ok(mut s) = tokio::net::TcpStream::connect(proxy).await {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut out = String::new();
                    // Until the sandbox auth server is up, the proxy answers 503.
                    if s.write_all(request.as_bytes()).await.is_ok()
                        && s.read_to_string(&mut out).await.is_ok()
                        && !out.starts_with("HTTP/1.1 503")
                        && !out.is_empty()
                    {
                        return out;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the gateway answers, once the sandbox is up");
        assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
        assert!(
            answer.contains("\"authorization\":\"Bearer ey"),
            "{name}: {answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_a_curl_line_that_returns_the_injected_bearer() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.trim().strip_prefix("curl -s ") {
                return rest.to_owned();
            }
        }
        panic!("the demo printed no curl line");
    })
    .await
    .expect("the demo starts");

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        echo["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer ey"),
        "{echo}"
    );
    child.kill().await.unwrap();
}
