//! Test harness: a real sandbox auth server, a real sandbox upstream and the gateway, all on
//! `127.0.0.1:0`, plus a small HTTP client; [`raw`] writes and reads raw sockets.
#![allow(dead_code)]

pub mod fleet;
pub mod raw;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokengate::auth::crypto::{CipherTextLayout, SignatureAlg};
use tokengate::sandbox::Sandbox;
use tokengate::sandbox::auth::{Agent, AuthState};
use tokengate::sandbox::upstream::UpstreamState;
use tokengate::{Config, Gateway, Running};

pub const AGENT: &str = "integratorNBTest01";
pub const SECRET: &str = "sandbox-secret-Zq81vN3d";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

/// What to vary in a test's setup.
pub struct Setup {
    /// Token lifetime the auth server grants.
    pub expires_in: u64,
    /// The agent id in the proxy's config (an unknown one gets code 10).
    pub agent_id: String,
    /// `server.max_replay_body`.
    pub max_replay_body: usize,
    /// Extra lines for `[server]`.
    pub server_extra: String,
    /// Extra lines for `[credentials.partner]`.
    pub credential_extra: String,
    /// Extra `[[routes]]` tables placed before the default catch-all route.
    pub routes_before: String,
    /// Extra lines for the default route.
    pub route_extra: String,
    /// Extra environment variables the config may name.
    pub env: Vec<(String, String)>,
    /// Lines for a `[forward]` table.
    pub forward: String,
    /// How tunnel targets resolve (the system resolver if `None`).
    pub resolver: Option<Arc<dyn tokengate::upstream::ssrf::Resolve>>,
    /// The signature the sandbox agent expects.
    pub agent_signature: SignatureAlg,
    /// The cipherText layout the sandbox agent expects.
    pub agent_layout: CipherTextLayout,
    /// Wait, before returning, until the start-up exchange has answered (as `/readyz` does).
    pub wait_warm: bool,
    /// What the sandbox auth server answers from the start.
    pub auth_fault: tokengate::sandbox::auth::Fault,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            expires_in: 3600,
            agent_id: AGENT.into(),
            max_replay_body: 64 * 1024,
            server_extra: String::new(),
            credential_extra: String::new(),
            routes_before: String::new(),
            route_extra: String::new(),
            env: Vec::new(),
            forward: String::new(),
            resolver: None,
            agent_signature: SignatureAlg::Sha256,
            agent_layout: CipherTextLayout::IvTagCt,
            wait_warm: true,
            auth_fault: tokengate::sandbox::auth::Fault::None,
        }
    }
}

pub struct Harness {
    pub auth: Arc<AuthState>,
    pub upstream: Arc<UpstreamState>,
    pub upstream_addr: SocketAddr,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub gateway: Gateway,
    pub running: Option<Running>,
    /// The config text the gateway was built from, and its environment, for reload tests.
    pub config_text: String,
    pub env: BTreeMap<String, String>,
    /// Exchanges the auth server had received when the harness was handed over.
    pub exchanges_at_start: u64,
    sandbox: Sandbox,
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Setup::default()).await
    }

    /// The default setup with extra `[server]` lines.
    pub async fn with_server(server_extra: &str) -> Self {
        Self::with(Setup {
            server_extra: server_extra.into(),
            ..Setup::default()
        })
        .await
    }

    pub async fn with(setup: Setup) -> Self {
        let mut agent = Agent::new(AGENT, SECRET);
        agent.signature = setup.agent_signature;
        agent.layout = setup.agent_layout;
        let sandbox = Sandbox::start(vec![agent], setup.expires_in).await.unwrap();
        sandbox.auth.set_fault(setup.auth_fault.clone());
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
max_replay_body = {max_replay_body}
{server_extra}

[admin]
listen = "127.0.0.1:0"

[forward]
{forward}

[credentials.partner]
auth_url = "{auth_url}"
agent_id = "{agent}"
secret = {{ env = "PARTNER_SECRET" }}
{credential_extra}

{routes_before}

[[routes]]
upstream = "http://{upstream}"
credential = "partner"
{route_extra}
"#,
            max_replay_body = setup.max_replay_body,
            server_extra = setup.server_extra,
            auth_url = sandbox.auth_url(),
            agent = setup.agent_id,
            credential_extra = setup.credential_extra,
            routes_before = setup
                .routes_before
                .replace("{upstream}", &sandbox.upstream_addr().to_string()),
            upstream = sandbox.upstream_addr(),
            route_extra = setup.route_extra,
            forward = setup.forward,
        );
        let config = Config::parse(&text, "test.toml").unwrap();
        let config_text = text.clone();
        let mut env = BTreeMap::from([("PARTNER_SECRET".to_owned(), SECRET.to_owned())]);
        env.extend(setup.env);
        let mut gateway = Gateway::new(config, "test.toml", &env).unwrap();
        if let Some(resolver) = setup.resolver {
            gateway = gateway.with_resolver(resolver);
        }
        let running = gateway.start().await.unwrap();
        if setup.wait_warm {
            wait_settled(&gateway).await;
        }
        Self {
            auth: sandbox.auth.clone(),
            upstream: sandbox.upstream.clone(),
            upstream_addr: sandbox.upstream_addr(),
            proxy: running.proxy_addr(),
            admin: running.admin_addr(),
            gateway,
            running: Some(running),
            config_text,
            env,
            exchanges_at_start: sandbox.auth.requests(),
            sandbox,
        }
    }

    /// Exchanges the auth server received since the harness was handed over.
    pub fn new_exchanges(&self) -> u64 {
        self.auth.requests() - self.exchanges_at_start
    }

    /// Makes the auth server answer with `fault`, drops the token and waits until the
    /// credential's keeper has run the exchange that meets it (so the credential is backing off
    /// with that error, or holds a token if the fault lets one through).
    pub async fn fail_auth(&self, fault: tokengate::sandbox::auth::Fault) {
        self.auth.set_fault(fault);
        self.refetch().await;
    }

    /// Drops the token and waits until the keeper's new exchange has answered, either way.
    pub async fn refetch(&self) {
        self.gateway
            .credential("partner")
            .unwrap()
            .invalidate()
            .await;
        wait_settled(&self.gateway).await;
    }

    /// Waits until `pick` finds what it wants in the `/readyz` answer; returns that answer.
    pub async fn readyz_until(
        &self,
        mut pick: impl FnMut(StatusCode, &serde_json::Value) -> bool,
    ) -> (StatusCode, serde_json::Value) {
        let client = client();
        let url = format!("http://{}/readyz", self.admin);
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let (status, _, body) = send(&client, get(&url)).await;
                let body = json(&body);
                if pick(status, &body) {
                    return (status, body);
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("/readyz reached the awaited state")
    }

    /// Stops the auth server: its port refuses connections from now on.
    pub async fn stop_auth(&mut self) {
        self.sandbox.stop_auth().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    /// One successful request, so the cache is warm.
    pub async fn warm(&self, client: &Client<HttpConnector, TestBody>) {
        let (status, _, _) = send(client, get(&self.url("/warm"))).await;
        assert_eq!(status, StatusCode::OK);
    }
}

/// Waits until credential `partner` is past warming up: an exchange has answered, either way.
pub async fn wait_settled(gateway: &Gateway) {
    use tokengate::auth::cache::Readiness;
    let source = gateway.credential("partner").unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while source.readiness() == Readiness::Warming {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the start-up exchange answers");
}

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

pub fn get(url: &str) -> Request<TestBody> {
    Request::get(url).body(full(Bytes::new())).unwrap()
}

pub async fn send(
    client: &Client<HttpConnector, TestBody>,
    req: Request<TestBody>,
) -> (StatusCode, HeaderMap, Bytes) {
    let response = client
        .request(req)
        .await
        .expect("request reaches the proxy");
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body arrives")
        .to_bytes();
    (status, headers, body)
}

pub fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}
