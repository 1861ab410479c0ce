//! Soak run (not part of `cargo test`): the release `tokengate` binary under mixed load for a
//! fixed time, with every token revoked every 30 s and the auth server down for 20 s.
//! Run it with `scripts/soak.sh [SECONDS]`; it prints a JSON report.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokengate::sandbox::Sandbox;
use tokengate::sandbox::auth::Agent;
use tokio::io::{AsyncBufReadExt, BufReader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

const SECRET: &str = "soak-secret-0b9e";
const WORKERS: usize = 16;
/// Defaults of the chaos schedule; `SOAK_REVOKE_EVERY` and `SOAK_OUTAGE_AT` (seconds) override
/// the first two for a quick check.
const REVOKE_EVERY: Duration = Duration::from_secs(30);
const OUTAGE_AT: Duration = Duration::from_secs(135);
const OUTAGE_FOR: Duration = Duration::from_secs(20);

fn env_secs(name: &str, default: Duration) -> Duration {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(default, Duration::from_secs)
}
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const TOKEN_LIFETIME_S: u64 = 60;
/// The second baseline for RSS growth, after pools and allocator arenas have filled.
const WARMUP: Duration = Duration::from_secs(60);
/// Per-worker pause between requests: about 16 × 50 = 800 requests/s offered at most.
const PAUSE: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    ok: AtomicU64,
    failed_in_outage: AtomicU64,
    failed_outside: AtomicU64,
    streamed_401: AtomicU64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The proxy's CPU time so far (utime + stime), in microseconds. /proc counts in USER_HZ
/// ticks, which Linux fixes at 100 per second for userland.
fn cpu_us(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let fields: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks: u64 =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            Some(ticks * 10_000)
        })
        .unwrap_or(0)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let duration = Duration::from_secs(seconds);
    let bin = std::env::var("TOKENGATE_BIN").unwrap_or_else(|_| "target/release/tokengate".into());

    let mut sandbox = Sandbox::start(
        vec![Agent::new("integratorSoak01", SECRET)],
        TOKEN_LIFETIME_S,
    )
    .await
    .expect("sandbox starts");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[credentials.partner]
auth_url = "{auth}"
agent_id = "integratorSoak01"
secret = {{ env = "SOAK_SECRET" }}
max_backoff = "{backoff}s"
timeout = "2s"
[[routes]]
upstream = "http://{upstream}"
credential = "partner"
"#,
            auth = sandbox.auth_url(),
            backoff = MAX_BACKOFF.as_secs(),
            upstream = sandbox.upstream_addr(),
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(&bin)
        .args(["--log-format", "json", "run", "--config"])
        .arg(&path)
        .env("SOAK_SECRET", SECRET)
        .env("RUST_LOG", "warn,tokengate::server=info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let proxy = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("tokengate logs its address");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if let Some(addr) = event["fields"]["proxy_addr"].as_str() {
            break addr.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let revoke_every = env_secs("SOAK_REVOKE_EVERY", REVOKE_EVERY);
    let outage_at = env_secs("SOAK_OUTAGE_AT", OUTAGE_AT);
    let started = Instant::now();
    let outage = (
        outage_at,
        outage_at + OUTAGE_FOR + MAX_BACKOFF + Duration::from_secs(1),
    );
    let counts = Arc::new(Counts::default());
    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (client, counts, proxy) = (client.clone(), counts.clone(), proxy.clone());
        workers.spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < duration {
                n += 1;
                // The mix: small GETs, 10 KiB POSTs (replayable), 100 KB downloads, and
                // 200 KB chunked uploads (streamed, so not replayable by design).
                let (req, streamed) = match (n + worker as u64) % 10 {
                    0..=5 => (
                        Request::get(format!("http://{proxy}/small/{n}")).body(full(Bytes::new())),
                        false,
                    ),
                    6 | 7 => (
                        Request::post(format!("http://{proxy}/orders"))
                            .body(full(vec![7u8; 10 * 1024])),
                        false,
                    ),
                    8 => (
                        Request::get(format!("http://{proxy}/bytes/100000"))
                            .body(full(Bytes::new())),
                        false,
                    ),
                    _ => {
                        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..20)
                            .map(|_| Ok(Frame::data(Bytes::from(vec![1u8; 10_000]))))
                            .collect();
                        let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
                        (
                            Request::put(format!("http://{proxy}/upload")).body(body),
                            true,
                        )
                    }
                };
                counts.sent.fetch_add(1, Ordering::Relaxed);
                let at = started.elapsed();
                let status = match client.request(req.unwrap()).await {
                    Ok(r) => {
                        let status = r.status();
                        let _ = r.into_body().collect().await;
                        status
                    }
                    Err(_) => StatusCode::BAD_GATEWAY,
                };
                let in_outage = at >= outage.0 && at < outage.1;
                if status.is_success() {
                    counts.ok.fetch_add(1, Ordering::Relaxed);
                } else if in_outage {
                    counts.failed_in_outage.fetch_add(1, Ordering::Relaxed);
                } else if streamed && status == StatusCode::UNAUTHORIZED {
                    counts.streamed_401.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.failed_outside.fetch_add(1, Ordering::Relaxed);
                    eprintln!("non-2xx outside the outage: {status} at {at:?}");
                }
                tokio::time::sleep(PAUSE).await;
            }
        });
    }

    // The chaos schedule: revoke every 30 s; take the auth server down once for 20 s.
    let mut rss = BTreeMap::new();
    // CPU per request over each 10 s window: a proxy that slows as it runs shows a rising series.
    let mut cpu = BTreeMap::new();
    let mut last_cpu = (cpu_us(pid), counts.sent.load(Ordering::Relaxed));
    let mut next_revoke = revoke_every;
    let mut revocations = 0;
    let mut outage_started = false;
    let mut outage_over = false;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = started.elapsed();
        if now >= next_revoke {
            sandbox.upstream.revoke_seen();
            revocations += 1;
            next_revoke += revoke_every;
        }
        // The outage runs alongside revocations, so a token revoked during it cannot be renewed.
        if !outage_started && now >= outage_at {
            outage_started = true;
            sandbox.stop_auth().await;
        }
        if outage_started && !outage_over && now >= outage_at + OUTAGE_FOR {
            outage_over = true;
            sandbox.restart_auth().await.expect("auth server restarts");
        }
        let second = now.as_secs();
        if second.is_multiple_of(10) && !rss.contains_key(&second) {
            rss.insert(second, rss_kib(pid));
            let now_cpu = (cpu_us(pid), counts.sent.load(Ordering::Relaxed));
            let requests = now_cpu.1 - last_cpu.1;
            if second > 0 && requests > 0 {
                cpu.insert(second, (now_cpu.0 - last_cpu.0) / requests);
            }
            last_cpu = now_cpu;
        }
    }
    while workers.join_next().await.is_some() {}
    let rss_end = rss_kib(pid);
    let rss_start = rss.get(&10).copied().unwrap_or(rss_end);
    // Pools, buffers and allocator arenas fill during the first minute; a leak shows as growth
    // after it, so both baselines are reported.
    let rss_warm = rss.get(&WARMUP.as_secs()).copied().unwrap_or(rss_start);
    let rss_max = rss.values().copied().max().unwrap_or(rss_end);
    // SIGTERM, as an operator stops it: the proxy drains and exits (and a profiling build
    // writes its profile, which scripts/pgo-build.sh relies on); killed if it does not.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }

    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let report = serde_json::json!({
        "duration_s": seconds,
        "workers": WORKERS,
        "requests_sent": c(&counts.sent),
        "ok_2xx": c(&counts.ok),
        "non_2xx_outside_outage": c(&counts.failed_outside),
        "non_2xx_during_outage_window": c(&counts.failed_in_outage),
        "streamed_uploads_401_on_revocation (not replayable, by design)": c(&counts.streamed_401),
        "revocations": revocations,
        "outage_window_s": [outage.0.as_secs(), outage.1.as_secs()],
        "exchanges_requested": sandbox.auth.requests(),
        "tokens_issued": sandbox.auth.issued(),
        "rss_kib_at_10s": rss_start,
        "rss_kib_at_end": rss_end,
        "rss_growth_pct": (rss_end as f64 - rss_start as f64) * 100.0 / rss_start.max(1) as f64,
        "rss_kib_after_warmup": rss_warm,
        "rss_growth_after_warmup_pct": (rss_end as f64 - rss_warm as f64) * 100.0 / rss_warm.max(1) as f64,
        "rss_kib_max": rss_max,
        "rss_kib_every_10s": rss,
        "cpu_us_per_request_every_10s": cpu,
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}
