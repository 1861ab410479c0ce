//! A sandbox of the provider: an auth server that really verifies and decrypts, and an upstream
//! that really checks the tokens it issued. The demo runs on it, and so do the tests.

pub mod auth;
pub mod upstream;

use std::convert::Infallible;
use std::sync::Arc;

use crate::body::ClientBody;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Milliseconds since the Unix epoch (the fleet's clock, shared).
pub use crate::fleet::unix_ms;

/// The most connections a sandbox server serves at once.
pub const SANDBOX_MAX_CONNECTIONS: usize = 4096;

/// The body type of sandbox responses.
pub type SandboxBody = BoxBody<Bytes, Infallible>;

/// The claims of a sandbox token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// The agent the token was issued to.
    pub sub: String,
    /// A unique id, so tokens can be revoked one by one.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds (JWT `exp`).
    pub exp: u64,
    /// Expires at, Unix milliseconds (exact, for the upstream's check).
    pub exp_ms: u64,
    /// Issued by an auth server that keeps one active token per agent: its issue number. The
    /// upstream refuses a token once it has seen a later one of the same agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub single: Option<u64>,
}

/// Why a sandbox token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts with valid JSON.
    #[error("malformed token")]
    Malformed,
    /// The HS256 signature does not verify.
    #[error("bad signature")]
    Signature,
    /// Past `exp_ms`.
    #[error("expired")]
    Expired,
}

/// The HS256 key shared by the sandbox auth server (signs) and upstream (verifies).
#[derive(Clone)]
pub struct JwtKey(Arc<[u8; 32]>);

impl JwtKey {
    /// A fresh random key.
    pub fn random() -> Self {
        Self(Arc::new(rand::random()))
    }

    /// A key given as 64 hex characters (so separate sandbox processes can share one).
    pub fn from_hex(hex_key: &str) -> Option<Self> {
        let bytes: [u8; 32] = hex::decode(hex_key.trim()).ok()?.try_into().ok()?;
        Some(Self(Arc::new(bytes)))
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(self.0.as_slice()).expect("any key length")
    }

    /// Signs `claims` as an HS256 JWT.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// Verifies signature and expiry (millisecond precision) of `token`.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let (signing_input, sig) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| JwtError::Malformed)?;
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&sig).map_err(|_| JwtError::Signature)?;
        let payload = signing_input.split('.').nth(1).ok_or(JwtError::Malformed)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| JwtError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)?;
        if unix_ms() >= claims.exp_ms {
            return Err(JwtError::Expired);
        }
        Ok(claims)
    }
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKey([REDACTED])")
    }
}

/// The sandbox auth server and upstream, sharing a token key, on ephemeral loopback ports.
pub struct Sandbox {
    /// The auth server's state and controls.
    pub auth: Arc<auth::AuthState>,
    /// The upstream's state and controls.
    pub upstream: Arc<upstream::UpstreamState>,
    auth_server: Option<Handle>,
    upstream_server: Handle,
    auth_addr: std::net::SocketAddr,
}

impl Sandbox {
    /// Starts both servers on `127.0.0.1:0`; the auth server knows `agents` and grants
    /// `expires_in` seconds.
    pub async fn start(agents: Vec<auth::Agent>, expires_in: u64) -> std::io::Result<Self> {
        let jwt = JwtKey::random();
        let auth = auth::AuthState::new(agents, jwt.clone(), expires_in);
        let auth_server = auth.serve(TcpListener::bind("127.0.0.1:0").await?)?;
        let upstream = upstream::UpstreamState::new(jwt);
        let upstream_server = upstream.serve(TcpListener::bind("127.0.0.1:0").await?)?;
        Ok(Self {
            auth,
            upstream,
            auth_addr: auth_server.addr(),
            auth_server: Some(auth_server),
            upstream_server,
        })
    }

    /// The auth endpoint, `http://127.0.0.1:PORT/v2/auth`.
    pub fn auth_url(&self) -> String {
        format!("http://{}/v2/auth", self.auth_addr)
    }

    /// The auth server's address (it stays reserved after [`Sandbox::stop_auth`]).
    pub fn auth_addr(&self) -> std::net::SocketAddr {
        self.auth_addr
    }

    /// The upstream's address.
    pub fn upstream_addr(&self) -> std::net::SocketAddr {
        self.upstream_server.addr()
    }

    /// Starts the auth server again on the same address, with the same state.
    pub async fn restart_auth(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(self.auth_addr).await?;
        self.auth_server = Some(self.auth.serve(listener)?);
        Ok(())
    }

    /// Stops the auth server (dropping its handle ends the accept loop); returns once its port
    /// refuses connections, or after a second at most.
    pub async fn stop_auth(&mut self) {
        self.auth_server = None;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.auth_addr)
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("auth", &self.auth_addr)
            .field("upstream", &self.upstream_addr())
            .finish_non_exhaustive()
    }
}

/// A sandbox server running until dropped.
#[derive(Debug)]
pub struct Handle {
    addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
}

impl Handle {
    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

/// Serves `handler` on `listener` until the returned handle is dropped.
fn spawn<F, Fut>(listener: TcpListener, handler: F) -> std::io::Result<Handle>
where
    F: Fn(Request<ClientBody>) -> Fut + Clone + Send + Sync + Unpin + 'static,
    Fut: Future<Output = Response<SandboxBody>> + Send + 'static,
{
    let addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let service = tower::service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let http = Arc::new(crate::server::Http::new(
        &crate::config::ServerConfig::default(),
        Default::default(),
    ));
    let limits = crate::server::ServeLimits {
        max_connections: SANDBOX_MAX_CONNECTIONS,
        shutdown_grace: std::time::Duration::from_secs(1),
        tls: None,
    };
    // A head the server side refuses gets the proxy's own JSON answer.
    let refuse = |refusal: crate::http1::Refusal| {
        let error = crate::error::ProxyError::from(refusal);
        let body = serde_json::json!({ "kind": error.kind(), "message": error.message() });
        json_response(error.status(), &body)
    };
    tokio::spawn(crate::server::serve(
        listener, service, refuse, http, stopped, limits,
    ));
    Ok(Handle { addr, _stop: stop })
}

/// Serves `handler` over TLS (HTTP/1.1 or h2 by ALPN) on `listener` until the handle is dropped.
fn spawn_tls<F, Fut>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: F,
) -> std::io::Result<Handle>
where
    F: Fn(Request<ClientBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<SandboxBody>> + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
                _ = stopped.changed() => return,
            };
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return; // a client that refused our certificate
                };
                let service = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req.map(ClientBody::Hyper)).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    Ok(Handle { addr, _stop: stop })
}

fn full(bytes: impl Into<Bytes>) -> SandboxBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into()).boxed()
}

fn json_response(status: http::StatusCode, body: &serde_json::Value) -> Response<SandboxBody> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("static parts are valid")
}
