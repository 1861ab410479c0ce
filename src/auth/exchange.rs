//! One token exchange (`POST /v2/auth`, docs/PROTOCOL.md): encrypt, sign, send, read the coded
//! reply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::{self, CipherTextLayout, EncryptionKey, SignatureAlg};
use super::token::{Token, TokenError};
use crate::tls::Connector;

/// The largest auth-server response read, in bytes; anything longer is a malformed answer.
pub const MAX_AUTH_RESPONSE_BYTES: usize = 64 * 1024;
/// The longest auth-server `message` kept for logs and error bodies, in characters.
pub const MAX_AUTH_MESSAGE_CHARS: usize = 256;

/// A non-zero `code` from the auth server, typed by its documented meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCode {
    /// 10: agent code not found or blocked.
    AgentNotFound,
    /// 11: parameters error.
    ParametersError,
    /// 83: signature verification failed (also a bad timestamp or a replayed nonce).
    SignatureFailed,
    /// 84: encryption failed (wrong key or layout).
    EncryptionFailed,
    /// Any other code, reported as it came.
    Other(i64),
}

impl AuthCode {
    /// Types a numeric code.
    pub fn from_code(code: i64) -> Self {
        match code {
            10 => Self::AgentNotFound,
            11 => Self::ParametersError,
            83 => Self::SignatureFailed,
            84 => Self::EncryptionFailed,
            other => Self::Other(other),
        }
    }

    /// The numeric code.
    pub fn code(self) -> i64 {
        match self {
            Self::AgentNotFound => 10,
            Self::ParametersError => 11,
            Self::SignatureFailed => 83,
            Self::EncryptionFailed => 84,
            Self::Other(code) => code,
        }
    }
}

/// Why an exchange produced no token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The auth server answered a non-zero code.
    #[error("auth server refused the exchange with code {} ({message})", code.code())]
    Rejected {
        /// The code, typed.
        code: AuthCode,
        /// The server's message, trimmed to [`MAX_AUTH_MESSAGE_CHARS`].
        message: String,
        /// The server's `logUUID`, what its support asks for.
        log_uuid: Option<String>,
    },
    /// The auth server could not be reached or the connection failed.
    #[error("auth server unreachable")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    /// The exchange did not finish within the credential's `timeout`.
    #[error("auth exchange timed out after {0:?}")]
    Timeout(Duration),
    /// Another replica's exchange failed this way, and the fleet backs off (the shared cache).
    #[error("another replica's exchange failed: {0}")]
    Elsewhere(String),
    /// The auth server answered something that is not the documented JSON.
    #[error("auth server answered HTTP {status} with a malformed response: {reason}")]
    Malformed {
        /// The HTTP status of the answer.
        status: StatusCode,
        /// What was wrong with it.
        reason: Malformed,
    },
}

/// What was wrong with a malformed auth response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The body was not the documented JSON.
    #[error("body is not the auth JSON")]
    NotJson,
    /// The body was longer than [`MAX_AUTH_RESPONSE_BYTES`] or broke off.
    #[error("body too long or cut off")]
    Body,
    /// Code 0 without a `data` object.
    #[error("code 0 without data")]
    NoData,
    /// The token in `data` is unusable.
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl AuthError {
    /// The auth server's `logUUID`, when it sent one.
    pub fn log_uuid(&self) -> Option<&str> {
        match self {
            Self::Rejected { log_uuid, .. } => log_uuid.as_deref(),
            _ => None,
        }
    }
}

/// Everything one credential needs to run exchanges.
pub struct ExchangeParams {
    /// The auth endpoint, e.g. `https://auth.example.com/v2/auth`.
    pub auth_url: Uri,
    /// The `x-agentid` value and the body's `agentId`.
    pub agent_id: String,
    /// The shared secret.
    pub secret: SecretString,
    /// The AES-256 key for `cipherText`.
    pub key: EncryptionKey,
    /// How `x-signature` is computed.
    pub signature: SignatureAlg,
    /// How `cipherText` is laid out.
    pub layout: CipherTextLayout,
    /// The deadline for one exchange, retry on code 83 included.
    pub timeout: Duration,
}

/// Runs exchanges for one credential. `Debug` shows no secret.
pub struct Exchanger {
    params: ExchangeParams,
    agent_header: HeaderValue,
    client: Client<Connector, Full<Bytes>>,
    generation: AtomicU64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Plaintext<'a> {
    agent_id: &'a str,
    secret: &'a str,
}

#[derive(Deserialize)]
struct Reply {
    code: i64,
    #[serde(default)]
    message: String,
    data: Option<ReplyData>,
    #[serde(rename = "logUUID", default)]
    log_uuid: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReplyData {
    access_token: SecretString,
    expires_in: f64,
    token_type: String,
}

impl Exchanger {
    /// An exchanger sending through `connector`. Fails if the agent id is not a header value.
    pub fn new(params: ExchangeParams, connector: Connector) -> Result<Self, http::Error> {
        let agent_header = HeaderValue::try_from(params.agent_id.as_str())?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(2)
            .build(connector);
        Ok(Self {
            params,
            agent_header,
            client,
            generation: AtomicU64::new(0),
        })
    }

    /// Whether this exchanger uses exactly `secret` and `key` (compared in constant time).
    pub fn has_secrets(&self, secret: &SecretString, key: &EncryptionKey) -> bool {
        use subtle::ConstantTimeEq;
        let same_secret = self
            .params
            .secret
            .expose_secret()
            .as_bytes()
            .ct_eq(secret.expose_secret().as_bytes());
        bool::from(same_secret) && self.params.key.same_as(key)
    }

    /// Runs one exchange; on code 83 retries once at once with a fresh timestamp and nonce.
    pub async fn exchange(&self) -> Result<Token, AuthError> {
        let timeout = self.params.timeout;
        let run = async {
            match self.attempt().await {
                Err(AuthError::Rejected {
                    code: AuthCode::SignatureFailed,
                    log_uuid,
                    ..
                }) => {
                    tracing::debug!(log_uuid, "auth code 83; retrying once with a fresh nonce");
                    self.attempt().await
                }
                other => other,
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .unwrap_or(Err(AuthError::Timeout(timeout)))
    }

    async fn attempt(&self) -> Result<Token, AuthError> {
        let p = &self.params;
        let plaintext = Zeroizing::new(
            serde_json::to_vec(&Plaintext {
                agent_id: &p.agent_id,
                secret: p.secret.expose_secret(),
            })
            .expect("two strings serialize"),
        );
        let cipher_text = crypto::encrypt(&p.key, p.layout, &plaintext);
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            .to_string();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let signature = crypto::sign(
            p.signature,
            &p.secret,
            &p.agent_id,
            &timestamp,
            &nonce,
            &cipher_text,
        );
        let body = serde_json::json!({ "cipherText": cipher_text }).to_string();
        let request = Request::post(p.auth_url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-agentid", self.agent_header.clone())
            .header("x-timestamp", timestamp)
            .header("x-nonce", nonce)
            .header("x-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .expect("hex, digits and a checked agent id are valid headers");

        let response = self
            .client
            .request(request)
            .await
            .map_err(AuthError::Unreachable)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_AUTH_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|_| AuthError::Malformed {
                status,
                reason: Malformed::Body,
            })?
            .to_bytes();
        parse_reply(status, &body, self.next_generation(), Instant::now())
    }

    /// The deadline of one exchange (the credential's `timeout`).
    pub fn timeout(&self) -> Duration {
        self.params.timeout
    }

    /// A generation no token of this credential has had yet.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Reads an auth reply, whatever its HTTP status: the JSON `code` decides. Public for the fuzz
/// target; the exchange is its only caller in the proxy.
pub fn parse_reply(
    status: StatusCode,
    body: &[u8],
    generation: u64,
    arrived: Instant,
) -> Result<Token, AuthError> {
    let malformed = |reason| AuthError::Malformed { status, reason };
    let reply: Reply = serde_json::from_slice(body).map_err(|_| malformed(Malformed::NotJson))?;
    if reply.code != 0 {
        return Err(AuthError::Rejected {
            code: AuthCode::from_code(reply.code),
            message: clean_message(&reply.message),
            log_uuid: reply.log_uuid.map(|u| clean_message(&u)),
        });
    }
    let data = reply.data.ok_or(malformed(Malformed::NoData))?;
    Token::new(
        &data.access_token,
        &data.token_type,
        data.expires_in,
        reply.log_uuid.map(|u| clean_message(&u)),
        generation,
        arrived,
    )
    .map_err(|e| malformed(e.into()))
}

/// Bounds untrusted server text and drops control characters before it reaches logs or bodies.
fn clean_message(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_AUTH_MESSAGE_CHARS)
        .collect()
}

impl std::fmt::Debug for Exchanger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanger")
            .field("auth_url", &self.params.auth_url)
            .field("agent_id", &self.params.agent_id)
            .field("signature", &self.params.signature)
            .field("layout", &self.params.layout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &str) -> Result<Token, AuthError> {
        parse_reply(
            StatusCode::from_u16(status).unwrap(),
            body.as_bytes(),
            1,
            Instant::now(),
        )
    }

    #[test]
    fn coded_errors_are_typed_whatever_the_status() {
        for (status, code, typed) in [
            (200, 10, AuthCode::AgentNotFound),
            (400, 11, AuthCode::ParametersError),
            (401, 83, AuthCode::SignatureFailed),
            (500, 84, AuthCode::EncryptionFailed),
            (200, 99, AuthCode::Other(99)),
        ] {
            let body = format!(r#"{{"code":{code},"message":"no\u0007pe","logUUID":"u-1"}}"#);
            match parse(status, &body) {
                Err(AuthError::Rejected {
                    code,
                    message,
                    log_uuid,
                }) => {
                    assert_eq!(code, typed);
                    assert_eq!(message, "nope");
                    assert_eq!(log_uuid.as_deref(), Some("u-1"));
                }
                other => panic!("expected rejection, got {other:?}"),
            }
        }
    }

    #[test]
    fn success_and_malformed_replies() {
        let ok = r#"{"code":0,"message":"No error.","data":{"accessToken":"abc","expiresIn":3600,"tokenType":"Bearer"},"logUUID":"u"}"#;
        let token = parse(200, ok).unwrap();
        assert_eq!(token.log_uuid(), Some("u"));
        assert_eq!(token.lifetime(), Duration::from_secs(3600));
        for (body, want) in [
            ("<html>oops</html>", Malformed::NotJson),
            (r#"{"code":0}"#, Malformed::NoData),
            (
                r#"{"code":0,"data":{"accessToken":"abc","expiresIn":0,"tokenType":"Bearer"}}"#,
                Malformed::Token(TokenError::Expired),
            ),
            (
                r#"{"code":0,"data":{"accessToken":"abc","expiresIn":60,"tokenType":"MAC"}}"#,
                Malformed::Token(TokenError::NotBearer),
            ),
        ] {
            match parse(502, body) {
                Err(AuthError::Malformed { reason, .. }) => assert_eq!(reason, want, "{body}"),
                other => panic!("expected malformed for {body}, got {other:?}"),
            }
        }
    }
}
