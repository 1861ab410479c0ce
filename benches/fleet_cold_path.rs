//! The cold path through the fleet's shared cache: what a miss costs when the replica shares
//! its token through Redis, against a replica alone. Either way the miss runs a real exchange
//! with the sandbox auth server; the fleet adds its Redis steps (the atomic decision, the
//! publication, and a compare-and-delete when the token is dropped).
//!
//! `cargo bench --bench fleet_cold_path` (starts Debian's `redis-server` on a free port in a
//! temporary directory). Compare the two lines of one run; figures from another machine or run
//! say little.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use tokengate::sandbox::Sandbox;
use tokengate::sandbox::auth::Agent;
use tokengate::{Config, Gateway};

const AGENT: &str = "benchAgent01";
const SECRET: &str = "bench-secret-4f9Kq2";
const CACHE_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// A `redis-server` on a free port, killed on drop.
struct Redis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's package) is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway (not serving: no keeper refetches behind the bench's back) with `shared` lines.
fn gateway(sandbox: &Sandbox, shared: &str) -> Gateway {
    let toml = format!(
        r#"
{shared}
[credentials.c]
auth_url = "{auth}"
agent_id = "{AGENT}"
secret = {{ env = "BENCH_SECRET" }}
[[routes]]
upstream = "http://{up}"
credential = "c"
"#,
        auth = sandbox.auth_url(),
        up = sandbox.upstream_addr(),
    );
    let env = BTreeMap::from([
        ("BENCH_SECRET".to_owned(), SECRET.to_owned()),
        ("CACHE_KEY".to_owned(), CACHE_KEY.to_owned()),
    ]);
    Gateway::new(Config::parse(&toml, "<bench>").unwrap(), "<bench>", &env).unwrap()
}

fn cold_path(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let redis = Redis::start();
    let sandbox = rt
        .block_on(Sandbox::start(vec![Agent::new(AGENT, SECRET)], 3600))
        .unwrap();
    let shared = format!(
        "[shared_cache]\nurl = \"redis://127.0.0.1:{}/0\"\nencryption_key = {{ env = \"CACHE_KEY\" }}",
        redis.port
    );
    let mut group = c.benchmark_group("cold_miss");
    for (name, shared) in [("alone", String::new()), ("fleet", shared)] {
        let gateway = rt.block_on(async { gateway(&sandbox, &shared) });
        let source = gateway.credential("c").unwrap();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let source = source.clone();
                async move {
                    let mut took = Duration::ZERO;
                    for _ in 0..iters {
                        // Dropped here and, in a fleet, in Redis too: the next ask is a miss
                        // for the whole fleet, so this replica takes the lease and exchanges.
                        source.invalidate().await;
                        let started = Instant::now();
                        source.token().await.unwrap();
                        took += started.elapsed();
                    }
                    took
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, cold_path);
criterion_main!(benches);
