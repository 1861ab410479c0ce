//! Criterion benches of the request path's pieces and of a whole proxied round trip.
//!
//! `cargo bench --bench hot_path`. Each group puts the alternatives side by side, so compare
//! within one run (ratios), not against figures from another machine or run.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::SecretString;
use tokengate::auth::crypto::{self, CipherTextLayout, EncryptionKey, SignatureAlg};
use tokengate::ctx::Ctx;
use tokengate::layers::route::route_request;
use tokengate::sandbox::Sandbox;
use tokengate::sandbox::auth::Agent;
use tokengate::{Config, Gateway, Running};

const AGENT: &str = "benchAgent01";
const SECRET: &str = "bench-secret-4f9Kq2";

/// The sandbox, and a gateway in front of it with three routes (the last one catches all).
struct World {
    sandbox: Sandbox,
    gateway: Gateway,
    running: Running,
}

async fn world() -> World {
    let sandbox = Sandbox::start(vec![Agent::new(AGENT, SECRET)], 3600)
        .await
        .unwrap();
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[credentials.c]
auth_url = "{auth}"
agent_id = "{AGENT}"
secret = {{ env = "BENCH_SECRET" }}
[[routes]]
host = "billing.example.com"
upstream = "http://{up}"
credential = "c"
[[routes]]
path_prefix = "/v2/"
upstream = "http://{up}"
credential = "c"
[[routes]]
upstream = "http://{up}"
credential = "c"
"#,
        auth = sandbox.auth_url(),
        up = sandbox.upstream_addr(),
    );
    let env = BTreeMap::from([("BENCH_SECRET".to_owned(), SECRET.to_owned())]);
    let gateway = Gateway::new(Config::parse(&toml, "<bench>").unwrap(), "<bench>", &env).unwrap();
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = gateway.start_on(proxy, admin).unwrap();
    World {
        sandbox,
        gateway,
        running,
    }
}

fn hot_path(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = rt.block_on(world());
    let source = w.gateway.credential("c").unwrap();
    let token = rt.block_on(source.token()).unwrap();

    // Route match and rewrite: the catch-all (third) route, the worst case of three.
    let live = w.gateway.snapshot();
    c.bench_function("route_match/third_of_three", |b| {
        b.iter_batched(
            || {
                let mut req = Request::get("/v1/orders/42?x=1")
                    .header("host", "shop.example.com")
                    .body(())
                    .unwrap();
                req.extensions_mut().insert(Ctx::new(None));
                req
            },
            |mut req| route_request(black_box(&live.routes), &mut req).unwrap(),
            BatchSize::SmallInput,
        )
    });

    // Token lookup on a warm cache: moka's `get`, against the lock-free snapshot in front of it
    // that the request path reads (clock read and header clone included).
    let mut lookup = c.benchmark_group("token_lookup_warm");
    lookup.bench_function("moka_get", |b| {
        b.to_async(&rt)
            .iter(|| async { source.current().await.unwrap() })
    });
    lookup.bench_function("snapshot", |b| {
        b.iter(|| source.warm(Instant::now()).unwrap())
    });
    lookup.finish();

    // Header injection: the token's pre-built HeaderValue, against formatting one per request.
    let mut inject = c.benchmark_group("inject_header");
    let headers = Request::get("/")
        .header("host", "a")
        .header("accept", "*/*")
        .body(())
        .unwrap()
        .into_parts()
        .0
        .headers;
    inject.bench_function("prebuilt", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                h.insert(AUTHORIZATION, token.header().clone());
                h
            },
            BatchSize::SmallInput,
        )
    });
    inject.bench_function("formatted", |b| {
        b.iter_batched(
            || headers.clone(),
            |mut h| {
                let value = format!("Bearer {}", token.expose());
                let mut value = HeaderValue::try_from(value).unwrap();
                value.set_sensitive(true);
                h.insert(AUTHORIZATION, value);
                h
            },
            BatchSize::SmallInput,
        )
    });
    inject.finish();
}

fn exchange_crypto(c: &mut Criterion) {
    let secret = SecretString::from(SECRET.to_owned());
    let key = EncryptionKey::derive(&secret);
    let plaintext = format!(r#"{{"agentId":"{AGENT}","secret":"{SECRET}"}}"#);
    c.bench_function("exchange/encrypt_and_sign", |b| {
        b.iter(|| {
            let ct = crypto::encrypt(&key, CipherTextLayout::IvTagCt, plaintext.as_bytes());
            crypto::sign(
                SignatureAlg::Sha256,
                &secret,
                AGENT,
                "1769745532582",
                "4ff08bc2a45c6b38068dbcd24296a25b",
                &ct,
            )
        })
    });
}

/// One GET through the proxy against the sandbox upstream, beside the same GET sent direct:
/// the difference is what the proxy adds in-process (both share the runtime and the machine).
fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let w = rt.block_on(world());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let token = rt
        .block_on(w.gateway.credential("c").unwrap().token())
        .unwrap();
    let proxied = format!("http://{}/bytes/1024", w.running.proxy_addr());
    let direct = format!("http://{}/bytes/1024", w.sandbox.upstream_addr());
    let get = |url: &str, auth: Option<&HeaderValue>| {
        let mut req = Request::get(url);
        if let Some(auth) = auth {
            req = req.header(AUTHORIZATION, auth);
        }
        let req = req.body(Empty::new()).unwrap();
        let client = client.clone();
        async move {
            let response = client.request(req).await.unwrap();
            assert!(response.status().is_success(), "{}", response.status());
            response.into_body().collect().await.unwrap().to_bytes()
        }
    };
    let mut group = c.benchmark_group("round_trip_1k");
    group.bench_function("direct", |b| {
        b.to_async(&rt).iter(|| get(&direct, Some(token.header())))
    });
    group.bench_function("proxied", |b| b.to_async(&rt).iter(|| get(&proxied, None)));
    group.finish();
}

criterion_group!(benches, hot_path, exchange_crypto, round_trip);
criterion_main!(benches);
