//! Test harness: a real sandbox auth server, a real sandbox upstream and the gateway, all on
//! `127.0.0.1:0`, plus a small HTTP client.
#![allow(dead_code)]

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
    pub resolver: Option<Arc<dyn tokengate::ssrf::Resolve>>,
    /// The signature the sandbox agent expects.
    pub agent_signature: SignatureAlg,
    /// The cipherText layout the sandbox agent expects.
    pub agent_layout: CipherTextLayout,
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
            sandbox,
        }
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
