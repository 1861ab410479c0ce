//! The sandbox auth server: `POST /v2/auth` as docs/PROTOCOL.md describes it. It checks the timestamp
//! window, refuses reused nonces, verifies the signature, decrypts the cipherText and checks the
//! secret, then issues an HS256 JWT.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::body::ClientBody;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;

use super::{Claims, Handle, JwtKey, SandboxBody, json_response, unix_ms};
use crate::auth::crypto::{self, CipherTextLayout, EncryptionKey, SignatureAlg};

/// How far `x-timestamp` may be from the sandbox's clock.
pub const TIMESTAMP_WINDOW: Duration = Duration::from_secs(60);
/// The most nonces remembered; older ones fall out with the timestamp window.
pub const MAX_NONCES: usize = 100_000;
/// The largest request body read.
const MAX_BODY: usize = 64 * 1024;

/// One agent the sandbox knows.
pub struct Agent {
    /// The agent id.
    pub id: String,
    /// Its secret.
    pub secret: SecretString,
    /// Its key (default SHA-256 of the secret).
    pub key: EncryptionKey,
    /// The signature it expects.
    pub signature: SignatureAlg,
    /// The cipherText layout it expects.
    pub layout: CipherTextLayout,
}

impl Agent {
    /// An agent with the protocol's defaults.
    pub fn new(id: &str, secret: &str) -> Self {
        let secret = SecretString::from(secret.to_owned());
        Self {
            id: id.into(),
            key: EncryptionKey::derive(&secret),
            secret,
            signature: SignatureAlg::Sha256,
            layout: CipherTextLayout::IvTagCt,
        }
    }
}

/// A fault the sandbox can be told to answer with instead of doing its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// Answer this code with HTTP 200.
    Code(i64),
    /// Answer HTTP 502 with an HTML body.
    Garbage,
    /// Wait this long, then answer normally.
    Delay(Duration),
}

/// The sandbox auth server's state, shared with the test or demo that runs it.
pub struct AuthState {
    agents: HashMap<String, Agent>,
    jwt: JwtKey,
    nonces: Mutex<HashMap<String, u64>>,
    expires_in: AtomicU64,
    fault: Mutex<Fault>,
    requests: AtomicU64,
    issued: AtomicU64,
    codes: Mutex<Vec<i64>>,
    /// Keep one active token per agent: each token carries its issue number.
    single_active: std::sync::atomic::AtomicBool,
    /// The last issue number given.
    issue_number: AtomicU64,
}

impl AuthState {
    /// A sandbox for `agents`, signing tokens with `jwt`, granting `expires_in` seconds.
    pub fn new(agents: Vec<Agent>, jwt: JwtKey, expires_in: u64) -> Arc<Self> {
        Arc::new(Self {
            agents: agents.into_iter().map(|a| (a.id.clone(), a)).collect(),
            jwt,
            nonces: Mutex::new(HashMap::new()),
            expires_in: AtomicU64::new(expires_in),
            fault: Mutex::new(Fault::None),
            requests: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            codes: Mutex::new(Vec::new()),
            single_active: std::sync::atomic::AtomicBool::new(false),
            issue_number: AtomicU64::new(0),
        })
    }

    /// Serves `POST /v2/auth` on `listener` until the handle is dropped.
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<Handle> {
        let state = self.clone();
        super::spawn(listener, move |req| {
            let state = state.clone();
            async move { state.handle(req).await }
        })
    }

    /// Exchange requests received, answered or not.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Tokens issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }

    /// Every code answered, in order.
    pub fn codes(&self) -> Vec<i64> {
        self.codes.lock().unwrap().clone()
    }

    /// Sets the lifetime of tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.expires_in.store(secs, Ordering::SeqCst);
    }

    /// Keeps one active token per agent from now on, as many providers do: issuing a token
    /// revokes the agent's previous ones (the sandbox upstream refuses a token once it has seen
    /// a later one of the same agent).
    pub fn set_single_active_token(&self, on: bool) {
        self.single_active.store(on, Ordering::SeqCst);
    }

    /// Makes every answer from now on `fault`.
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    async fn handle(&self, req: Request<ClientBody>) -> Response<SandboxBody> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let log_uuid = new_log_uuid();
        let fault = self.fault.lock().unwrap().clone();
        let outcome = match fault {
            Fault::Garbage => {
                return Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(super::full("<html>bad gateway</html>"))
                    .expect("static parts");
            }
            Fault::Code(code) => Err(code),
            Fault::Delay(wait) => {
                tokio::time::sleep(wait).await;
                self.verify_and_issue(req).await
            }
            Fault::None => self.verify_and_issue(req).await,
        };
        let code = outcome.as_ref().err().copied().unwrap_or(0);
        self.codes.lock().unwrap().push(code);
        let body = match outcome {
            Ok((token, expires_in)) => {
                self.issued.fetch_add(1, Ordering::SeqCst);
                serde_json::json!({
                    "code": 0,
                    "message": "No error.",
                    "data": { "accessToken": token, "expiresIn": expires_in, "tokenType": "Bearer" },
                    "logUUID": log_uuid,
                })
            }
            Err(code) => serde_json::json!({
                "code": code,
                "message": message(code),
                "logUUID": log_uuid,
            }),
        };
        json_response(StatusCode::OK, &body)
    }

    /// The checks of docs/PROTOCOL.md, in order; `Err(code)` on the first that fails.
    async fn verify_and_issue(&self, req: Request<ClientBody>) -> Result<(String, u64), i64> {
        if req.method() != Method::POST || !req.uri().path().ends_with("/v2/auth") {
            return Err(11);
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (Some(agent_id), Some(timestamp), Some(nonce), Some(signature)) = (
            header("x-agentid"),
            header("x-timestamp"),
            header("x-nonce"),
            header("x-signature"),
        ) else {
            return Err(11);
        };
        let agent = self.agents.get(&agent_id).ok_or(10)?;

        let now = unix_ms();
        let ts: u64 = timestamp.parse().map_err(|_| 83)?;
        if now.abs_diff(ts) > TIMESTAMP_WINDOW.as_millis() as u64 {
            return Err(83);
        }
        if nonce.len() != 32
            || !nonce
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(83);
        }
        {
            let mut nonces = self.nonces.lock().unwrap();
            let window = TIMESTAMP_WINDOW.as_millis() as u64;
            nonces.retain(|_, seen| now.saturating_sub(*seen) <= 2 * window);
            if nonces.len() >= MAX_NONCES || nonces.insert(nonce.clone(), now).is_some() {
                return Err(83);
            }
        }

        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|_| 11)?
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).map_err(|_| 11)?;
        let cipher_text = body.get("cipherText").and_then(|c| c.as_str()).ok_or(11)?;

        let expected = crypto::sign(
            agent.signature,
            &agent.secret,
            &agent_id,
            &timestamp,
            &nonce,
            cipher_text,
        );
        if !crypto::signatures_equal(&expected, &signature) {
            return Err(83);
        }
        let plaintext = crypto::decrypt(&agent.key, agent.layout, cipher_text).map_err(|_| 84)?;
        let plain: serde_json::Value = serde_json::from_slice(&plaintext).map_err(|_| 84)?;
        let secret_ok = plain
            .get("secret")
            .and_then(|s| s.as_str())
            .is_some_and(|s| crypto::signatures_equal(s, agent.secret.expose_secret()));
        if plain.get("agentId").and_then(|a| a.as_str()).is_none() || !secret_ok {
            return Err(10);
        }

        let expires_in = self.expires_in.load(Ordering::SeqCst);
        let exp_ms = now + expires_in * 1000;
        let claims = Claims {
            sub: agent_id,
            jti: hex::encode(rand::random::<[u8; 8]>()),
            iat: now / 1000,
            exp: exp_ms / 1000,
            exp_ms,
            single: self
                .single_active
                .load(Ordering::SeqCst)
                .then(|| self.issue_number.fetch_add(1, Ordering::SeqCst) + 1),
        };
        Ok((self.jwt.sign(&claims), expires_in))
    }
}

fn message(code: i64) -> &'static str {
    match code {
        10 => "Agent code was not found or block",
        11 => "Parameters error",
        83 => "Signature verification failed",
        84 => "Encryption failed",
        _ => "Unknown error",
    }
}

fn new_log_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
