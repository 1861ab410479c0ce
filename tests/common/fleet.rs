//! A fleet for the tests: a real `redis-server` (Debian's package) started on a free port in a
//! temporary directory, and replicas of tokengate sharing it, in front of one sandbox.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use tokengate::sandbox::Sandbox;
use tokengate::sandbox::auth::Agent;
use tokengate::{Config, Gateway, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{AGENT, SECRET};

/// The shared cache's sealing key in the tests (base64 of 32 bytes).
pub fn cache_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([7u8; 32])
}

/// A `redis-server` of its own, stopped (and its directory removed) on drop.
pub struct Redis {
    pub port: u16,
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts `redis-server` on a free port. Panics, saying what to install, if there is none:
    /// these tests are not skipped in silence.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, free_port()).await
    }

    async fn start_in(dir: tempfile::TempDir, port: u16) -> Self {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the fleet tests need Debian's \
                     redis-server package (`apt-get install redis-server`; .ci/run installs it)"
                )
            });
        let redis = Self { port, child, dir };
        tokio::time::timeout(Duration::from_secs(10), async {
            while redis.command(&["PING"]).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("redis-server answers PING");
        redis
    }

    /// Kills the server (as a crash would), keeping its port and directory for [`Self::restart`].
    pub async fn kill(mut self) -> (tempfile::TempDir, u16) {
        self.child.kill().await.unwrap();
        let _ = self.child.wait().await;
        (self.dir, self.port)
    }

    /// Starts a server again where a killed one was: same port, empty.
    pub async fn restart((dir, port): (tempfile::TempDir, u16)) -> Self {
        Self::start_in(dir, port).await
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// One command over RESP2, its reply as text (for inspecting what tokengate stored).
    pub async fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).await?;
        stream.write_all(b"*1\r\n$4\r\nQUIT\r\n").await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// The commands the server has served, all kinds together, but INFO and QUIT (which
    /// [`Self::command`] itself sends).
    pub async fn commands_served(&self) -> u64 {
        let info = self.command(&["INFO", "commandstats"]).await.unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_"))
            .filter(|l| !l.starts_with("cmdstat_info:") && !l.starts_with("cmdstat_quit:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Every key and its whole value (string or hash), raw.
    pub async fn dump(&self) -> Vec<(String, Vec<u8>)> {
        let keys = self.command(&["KEYS", "*"]).await.unwrap();
        let mut out = Vec::new();
        for key in keys.lines().filter(|l| !l.starts_with(['*', '$', '+'])) {
            let kind = self.command(&["TYPE", key]).await.unwrap();
            let value = if kind.contains("hash") {
                self.command(&["HGETALL", key]).await.unwrap()
            } else if kind.contains("string") {
                self.command(&["GET", key]).await.unwrap()
            } else {
                String::new()
            };
            out.push((key.to_owned(), value.into_bytes()));
        }
        out
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One sandbox and the replicas in front of it.
pub struct Fleet {
    pub sandbox: Sandbox,
    pub replicas: Vec<Replica>,
}

/// One tokengate of the fleet.
pub struct Replica {
    pub gateway: Gateway,
    pub running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Fleet {
    /// A sandbox granting `expires_in`-second tokens, and `n` replicas sharing `redis_url`.
    pub async fn start(n: usize, redis_url: &str, expires_in: u64) -> Self {
        let sandbox = Sandbox::start(vec![Agent::new(AGENT, SECRET)], expires_in)
            .await
            .unwrap();
        let mut fleet = Self {
            sandbox,
            replicas: Vec::new(),
        };
        for _ in 0..n {
            fleet.add(redis_url, "").await;
        }
        fleet
    }

    /// Adds a replica; `credential_extra` goes into its `[credentials.partner]`.
    pub async fn add(&mut self, redis_url: &str, credential_extra: &str) -> &Replica {
        self.add_with_key(redis_url, credential_extra, &cache_key())
            .await
    }

    /// Adds a replica sealing with `key`.
    pub async fn add_with_key(
        &mut self,
        redis_url: &str,
        credential_extra: &str,
        key: &str,
    ) -> &Replica {
        let shared = format!(
            "[shared_cache]\nurl = \"{redis_url}\"\nencryption_key = {{ env = \"CACHE_KEY\" }}\n"
        );
        self.add_replica(&shared, credential_extra, key).await
    }

    /// Adds a replica without a shared cache: it keeps its own token.
    pub async fn add_alone(&mut self) -> &Replica {
        self.add_replica("", "", &cache_key()).await
    }

    /// The text of a replica's config: `[shared_cache]` lines, then the credential's extra
    /// lines.
    pub fn config_text(&self, shared: &str, credential_extra: &str) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

{shared}

[credentials.partner]
auth_url = "{auth_url}"
agent_id = "{AGENT}"
secret = {{ env = "PARTNER_SECRET" }}
refresh_before = "1s"
{credential_extra}

[[routes]]
upstream = "http://{upstream}"
credential = "partner"
"#,
            auth_url = self.sandbox.auth_url(),
            upstream = self.sandbox.upstream_addr(),
        )
    }

    async fn add_replica(&mut self, shared: &str, credential_extra: &str, key: &str) -> &Replica {
        let text = self.config_text(shared, credential_extra);
        let env = BTreeMap::from([
            ("PARTNER_SECRET".to_owned(), SECRET.to_owned()),
            ("CACHE_KEY".to_owned(), key.to_owned()),
        ]);
        let config = Config::parse(&text, "fleet.toml").unwrap();
        let gateway = Gateway::new(config, "fleet.toml", &env).unwrap();
        let running = gateway.start().await.unwrap();
        self.replicas.push(Replica {
            proxy: running.proxy_addr(),
            admin: running.admin_addr(),
            gateway,
            running: Some(running),
        });
        self.replicas.last().unwrap()
    }

    /// Exchanges the sandbox auth server has received.
    pub fn exchanges(&self) -> u64 {
        self.sandbox.auth.requests()
    }
}
