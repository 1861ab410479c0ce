//! The sandbox upstream: accepts a request only with exactly one valid, unexpired, unrevoked
//! sandbox Bearer token (a token of a one-active-token auth server is revoked once a later one
//! of the same agent has been seen), records what it saw, and echoes the request (or streams `/bytes/N`,
//! chunked with `?unsized`, answers `/redirect` with a 302, or answers `/slow/MS` after MS
//! milliseconds).

use std::collections::HashSet;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use crate::body::ClientBody;
use bytes::{Bytes, BytesMut};
use http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use super::{Handle, JwtError, JwtKey, SandboxBody, json_response};

/// The most request-body bytes recorded per request (the whole body is still hashed).
pub const MAX_RECORDED_BODY: usize = 1024 * 1024;
/// The most requests whose bodies are kept.
pub const MAX_RECORDED_REQUESTS: usize = 64;
/// The most distinct token values remembered (for the secret-leak test).
pub const MAX_RECORDED_TOKENS: usize = 1024;
/// The largest `/bytes/N` download.
pub const MAX_DOWNLOAD: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method and path.
    pub target: String,
    /// The status answered.
    pub status: u16,
    /// How many `Authorization` headers arrived.
    pub authorization_headers: usize,
    /// The body (up to [`MAX_RECORDED_BODY`]).
    pub body: Bytes,
}

/// The sandbox upstream's state, shared with the test or demo that runs it.
pub struct UpstreamState {
    jwt: JwtKey,
    revoked: Mutex<HashSet<String>>,
    /// Per agent, the latest issue number seen of a one-active-token auth server.
    latest_issue: Mutex<std::collections::HashMap<String, u64>>,
    seen_tokens: Mutex<HashSet<String>>,
    always_401: AtomicBool,
    requests: AtomicU64,
    unauthorized: AtomicU64,
    expired: AtomicU64,
    body_bytes: AtomicU64,
    body_progress: Notify,
    log: Mutex<Vec<Seen>>,
    tokens: Mutex<Vec<String>>,
}

impl UpstreamState {
    /// An upstream trusting tokens signed with `jwt`.
    pub fn new(jwt: JwtKey) -> Arc<Self> {
        Arc::new(Self {
            jwt,
            revoked: Mutex::new(HashSet::new()),
            latest_issue: Mutex::new(std::collections::HashMap::new()),
            seen_tokens: Mutex::new(HashSet::new()),
            always_401: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            body_progress: Notify::new(),
            log: Mutex::new(Vec::new()),
            tokens: Mutex::new(Vec::new()),
        })
    }

    /// Serves on `listener` until the handle is dropped.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<Handle> {
        let state = self.clone();
        super::spawn(listener, move |req| {
            let state = state.clone();
            async move { state.handle(req).await }
        })
    }

    /// Serves over TLS with `tls` on `listener` until the handle is dropped.
    pub fn serve_tls(
        self: &Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Handle> {
        let state = self.clone();
        super::spawn_tls(listener, tls, move |req| {
            let state = state.clone();
            async move { state.handle(req).await }
        })
    }

    /// Revokes every token seen so far.
    pub fn revoke_seen(&self) {
        let seen = self.seen_tokens.lock().unwrap().clone();
        self.revoked.lock().unwrap().extend(seen);
    }

    /// Answers 401 to everything (or stops doing so).
    pub fn set_always_401(&self, on: bool) {
        self.always_401.store(on, Ordering::SeqCst);
    }

    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests answered 401.
    pub fn unauthorized(&self) -> u64 {
        self.unauthorized.load(Ordering::SeqCst)
    }

    /// Requests that carried an expired token.
    pub fn expired_seen(&self) -> u64 {
        self.expired.load(Ordering::SeqCst)
    }

    /// The last requests seen (at most [`MAX_RECORDED_REQUESTS`]).
    pub fn log(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// The distinct token values that reached the upstream (the first [`MAX_RECORDED_TOKENS`]).
    pub fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().clone()
    }

    /// Request-body bytes received so far, across all requests.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` request-body bytes have arrived in total.
    pub async fn wait_body_bytes(&self, n: u64) {
        loop {
            let notified = self.body_progress.notified();
            if self.body_bytes() >= n {
                return;
            }
            notified.await;
        }
    }

    fn check(&self, req: &Request<ClientBody>) -> Result<(), &'static str> {
        let values: Vec<_> = req.headers().get_all(AUTHORIZATION).iter().collect();
        let [value] = values.as_slice() else {
            return Err("exactly one Authorization header is required");
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("not a Bearer token")?;
        {
            let mut tokens = self.tokens.lock().unwrap();
            if tokens.len() < MAX_RECORDED_TOKENS && !tokens.iter().any(|t| t == token) {
                tokens.push(token.to_owned());
            }
        }
        let claims = match self.jwt.verify(token) {
            Ok(c) => c,
            Err(JwtError::Expired) => {
                self.expired.fetch_add(1, Ordering::SeqCst);
                return Err("token expired");
            }
            Err(_) => return Err("token invalid"),
        };
        if self.revoked.lock().unwrap().contains(&claims.jti) {
            return Err("token revoked");
        }
        if let Some(number) = claims.single {
            let mut latest = self.latest_issue.lock().unwrap();
            let latest = latest.entry(claims.sub.clone()).or_insert(0);
            if number < *latest {
                return Err("token revoked: a later one was issued to this agent");
            }
            *latest = number;
        }
        self.seen_tokens.lock().unwrap().insert(claims.jti);
        if self.always_401.load(Ordering::SeqCst) {
            return Err("this upstream refuses everything");
        }
        Ok(())
    }

    async fn handle(&self, req: Request<ClientBody>) -> Response<SandboxBody> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let verdict = self.check(&req);
        let authorization_headers = req.headers().get_all(AUTHORIZATION).iter().count();
        let target = format!("{} {}", req.method(), req.uri().path());
        let (parts, mut body) = req.into_parts();

        // Read the body as it streams, hashing it and recording a bounded copy.
        let mut hasher = Sha256::new();
        let mut recorded = BytesMut::new();
        let mut total = 0u64;
        let mut broken = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                broken = true; // the sender aborted: a real server fails such a request
                break;
            };
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                total += data.len() as u64;
                let room = MAX_RECORDED_BODY.saturating_sub(recorded.len());
                recorded.extend_from_slice(&data[..data.len().min(room)]);
                self.body_bytes
                    .fetch_add(data.len() as u64, Ordering::SeqCst);
                self.body_progress.notify_waiters();
            }
        }

        let response = match verdict {
            _ if broken => json_response(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "error": "request body broke off" }),
            ),
            Err(reason) => {
                self.unauthorized.fetch_add(1, Ordering::SeqCst);
                let mut r = json_response(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({ "error": reason }),
                );
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                r
            }
            Ok(()) if slow_ms(parts.uri.path()).is_some() => {
                let wait = slow_ms(parts.uri.path()).unwrap_or_default();
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                json_response(StatusCode::OK, &serde_json::json!({ "slept_ms": wait }))
            }
            Ok(()) if parts.uri.path() == "/redirect" => Response::builder()
                .status(StatusCode::FOUND)
                .header(http::header::LOCATION, "/elsewhere")
                .body(super::full(Bytes::new()))
                .expect("static parts"),
            Ok(()) => match download_size(parts.uri.path()) {
                Some(n) => Response::new(SandboxBody::new(Pattern {
                    offset: 0,
                    len: n,
                    // `?unsized`: no length declared, so the body goes out chunked.
                    sized: parts.uri.query() != Some("unsized"),
                })),
                None => {
                    let headers: serde_json::Map<String, serde_json::Value> = parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                        .collect();
                    json_response(
                        StatusCode::OK,
                        &serde_json::json!({
                            "method": parts.method.as_str(),
                            "path": parts.uri.path(),
                            "query": parts.uri.query(),
                            "headers": headers,
                            "body_bytes": total,
                            "body_sha256": hex::encode(hasher.finalize()),
                        }),
                    )
                }
            },
        };
        let mut log = self.log.lock().unwrap();
        if log.len() >= MAX_RECORDED_REQUESTS {
            log.remove(0);
        }
        log.push(Seen {
            target,
            status: response.status().as_u16(),
            authorization_headers,
            body: recorded.freeze(),
        });
        response
    }
}

/// The most `/slow/MS` may wait.
pub const MAX_SLOW_MS: u64 = 60_000;

fn slow_ms(path: &str) -> Option<u64> {
    path.strip_prefix("/slow/")?
        .parse()
        .ok()
        .filter(|ms| *ms <= MAX_SLOW_MS)
}

fn download_size(path: &str) -> Option<u64> {
    path.strip_prefix("/bytes/")?
        .parse()
        .ok()
        .filter(|n| *n <= MAX_DOWNLOAD)
}

/// The bytes `/bytes/N` serves: byte `i` is `i % 251`.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// A streamed `/bytes/N` body, produced chunk by chunk.
struct Pattern {
    offset: u64,
    len: u64,
    /// Whether it declares its length.
    sized: bool,
}

impl Body for Pattern {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(CHUNK as u64);
        let chunk: Bytes = (self.offset..self.offset + n)
            .map(|i| (i % 251) as u8)
            .collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.sized {
            http_body::SizeHint::with_exact(self.len - self.offset)
        } else {
            http_body::SizeHint::default()
        }
    }
}
