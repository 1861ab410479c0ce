//! A bearer token and its lifetime: the earlier of `expiresIn` and the JWT's `exp`
//! (docs/PROTOCOL.md).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

/// The largest safety margin kept between a token's real expiry and the moment it stops being
/// handed out, so a request in flight never carries an expired token.
pub const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(1);

/// Why a successful-looking auth response did not yield a usable token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `tokenType` is not `Bearer`.
    #[error("tokenType is not Bearer")]
    NotBearer,
    /// The token is empty or not a valid header value.
    #[error("accessToken is empty or not a valid header value")]
    BadValue,
    /// `expiresIn` is not positive, or the JWT `exp` is already past.
    #[error("token is already expired (expiresIn <= 0 or JWT exp in the past)")]
    Expired,
}

/// A cached bearer token. `Debug` never shows the token.
#[derive(Clone)]
pub struct Token {
    header: HeaderValue,
    generation: u64,
    obtained_at: Instant,
    expires_at: Instant,
    usable_until: Instant,
    log_uuid: Option<String>,
}

impl Token {
    /// Builds a token from the fields of a successful response that arrived at `arrived`.
    ///
    /// `generation` identifies this token among its credential's tokens, so a 401 can invalidate
    /// exactly the token it was answered for.
    pub fn new(
        access_token: &SecretString,
        token_type: &str,
        expires_in: f64,
        log_uuid: Option<String>,
        generation: u64,
        arrived: Instant,
    ) -> Result<Self, TokenError> {
        if !token_type.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::NotBearer);
        }
        let raw = access_token.expose_secret();
        if raw.is_empty() {
            return Err(TokenError::BadValue);
        }
        let mut header =
            HeaderValue::try_from(format!("Bearer {raw}")).map_err(|_| TokenError::BadValue)?;
        header.set_sensitive(true);

        if !(expires_in.is_finite() && expires_in > 0.0) {
            return Err(TokenError::Expired);
        }
        let mut lifetime = Duration::from_secs_f64(expires_in.min(u32::MAX as f64));
        if let Some(exp) = jwt_exp(raw) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let until_exp = Duration::from_secs(exp)
                .checked_sub(now)
                .unwrap_or_default();
            lifetime = lifetime.min(until_exp);
        }
        if lifetime.is_zero() {
            return Err(TokenError::Expired);
        }
        let margin = MAX_EXPIRY_MARGIN.min(lifetime / 10);
        Ok(Self {
            header,
            generation,
            obtained_at: arrived,
            expires_at: arrived + lifetime,
            usable_until: arrived + lifetime - margin,
            log_uuid,
        })
    }

    /// The ready-made `Authorization` value (`Bearer …`), marked sensitive.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    /// This token's generation within its credential.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the auth response carrying this token arrived.
    pub fn obtained_at(&self) -> Instant {
        self.obtained_at
    }

    /// When the token really expires.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// When the token stops being handed out (`expires_at` less a small margin).
    pub fn usable_until(&self) -> Instant {
        self.usable_until
    }

    /// The auth server's `logUUID` for the exchange that issued this token.
    pub fn log_uuid(&self) -> Option<&str> {
        self.log_uuid.as_deref()
    }

    /// The lifetime granted, from arrival to real expiry.
    pub fn lifetime(&self) -> Duration {
        self.expires_at - self.obtained_at
    }

    /// The token itself, for `tokengate token --show` only.
    pub fn expose(&self) -> &str {
        self.header
            .to_str()
            .unwrap_or_default()
            .trim_start_matches("Bearer ")
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("token", &"[REDACTED]")
            .field("generation", &self.generation)
            .field("lifetime", &self.lifetime())
            .field("log_uuid", &self.log_uuid)
            .finish()
    }
}

/// The `exp` claim of a JWT, read without verifying it (the proxy is not the audience).
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let exp = claims.get("exp")?;
    exp.as_u64()
        .or_else(|| exp.as_f64().map(|f| f.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> SecretString {
        let payload = URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        SecretString::from(format!("eyJhbGciOiJIUzI1NiJ9.{payload}.sig"))
    }

    fn unix_now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn lifetime_is_the_earlier_of_expires_in_and_exp() {
        let now = Instant::now();
        let t = Token::new(&jwt(unix_now() + 100), "Bearer", 3600.0, None, 1, now).unwrap();
        assert!(t.lifetime() <= Duration::from_secs(100));
        assert!(t.lifetime() > Duration::from_secs(98));
        let t = Token::new(&jwt(unix_now() + 7200), "bearer", 60.0, None, 1, now).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(60));
        let opaque = SecretString::from("opaque-token");
        let t = Token::new(&opaque, "BEARER", 30.0, None, 1, now).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(30));
        assert_eq!(t.usable_until(), now + Duration::from_secs(29));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let now = Instant::now();
        let ok = SecretString::from("abc");
        assert_eq!(
            Token::new(&ok, "MAC", 60.0, None, 1, now).unwrap_err(),
            TokenError::NotBearer
        );
        assert_eq!(
            Token::new(&SecretString::from(""), "Bearer", 60.0, None, 1, now).unwrap_err(),
            TokenError::BadValue
        );
        assert_eq!(
            Token::new(&SecretString::from("a\nb"), "Bearer", 60.0, None, 1, now).unwrap_err(),
            TokenError::BadValue
        );
        assert_eq!(
            Token::new(&ok, "Bearer", 0.0, None, 1, now).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            Token::new(&ok, "Bearer", -5.0, None, 1, now).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            Token::new(&jwt(unix_now() - 10), "Bearer", 60.0, None, 1, now).unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn header_is_sensitive_and_debug_is_redacted() {
        let t = Token::new(
            &SecretString::from("tok-123"),
            "Bearer",
            60.0,
            None,
            7,
            Instant::now(),
        )
        .unwrap();
        assert!(t.header().is_sensitive());
        assert_eq!(t.header(), "Bearer tok-123");
        assert_eq!(t.expose(), "tok-123");
        assert!(!format!("{t:?}").contains("tok-123"));
    }
}
