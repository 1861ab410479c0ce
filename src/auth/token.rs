//! A bearer token and its lifetime: the earlier of `expiresIn` and the JWT's `exp`
//! (docs/PROTOCOL.md).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::fleet::unix_ms;

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
    /// Its generation in the fleet's shared cache, once it is there.
    fleet_generation: Option<u64>,
    /// Whether this replica exchanged it or read it from the fleet.
    origin: Origin,
}

/// Where a token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This replica ran the exchange.
    Exchanged,
    /// Another replica ran it; this one read it from the fleet's shared cache.
    Fleet,
}

impl Origin {
    /// As the admin API names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exchanged => "exchanged",
            Self::Fleet => "fleet",
        }
    }
}

/// A token as the fleet's shared cache holds it (sealed): the token and its times in Unix ms,
/// so any replica can rebuild it on its own clock.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    token: String,
    obtained_ms: u64,
    expires_ms: u64,
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
        Ok(Self::timed(
            header,
            generation,
            arrived,
            arrived + lifetime,
            log_uuid,
        ))
    }

    /// A token valid from `obtained_at` to `expires_at`, handed out until a small margin before.
    fn timed(
        header: HeaderValue,
        generation: u64,
        obtained_at: Instant,
        expires_at: Instant,
        log_uuid: Option<String>,
    ) -> Self {
        let margin = MAX_EXPIRY_MARGIN.min((expires_at - obtained_at) / 10);
        Self {
            header,
            generation,
            obtained_at,
            expires_at,
            usable_until: expires_at - margin,
            log_uuid,
            fleet_generation: None,
            origin: Origin::Exchanged,
        }
    }

    /// The sealed form's content for the fleet's shared cache, and the expiry in Unix ms.
    pub fn to_record(&self) -> (Zeroizing<Vec<u8>>, u64) {
        let (now, unix_now) = (Instant::now(), unix_ms());
        let at = |instant: Instant| {
            if instant >= now {
                unix_now + (instant - now).as_millis() as u64
            } else {
                unix_now.saturating_sub((now - instant).as_millis() as u64)
            }
        };
        let record = Record {
            token: self.expose().to_owned(),
            obtained_ms: at(self.obtained_at),
            expires_ms: at(self.expires_at),
            log_uuid: self.log_uuid.clone(),
        };
        let bytes = Zeroizing::new(serde_json::to_vec(&record).unwrap_or_default());
        let Record { token, .. } = record;
        drop(Zeroizing::new(token));
        (bytes, at(self.expires_at))
    }

    /// The token another replica published as fleet generation `fleet_generation`, from its
    /// record, as local generation `generation`; `None` if the record is not one or the token
    /// is already past use.
    pub fn from_record(record: &[u8], generation: u64, fleet_generation: u64) -> Option<Self> {
        let Record {
            token,
            obtained_ms,
            expires_ms,
            log_uuid,
        } = serde_json::from_slice(record).ok()?;
        let token = Zeroizing::new(token);
        let mut header = HeaderValue::try_from(format!("Bearer {}", token.as_str())).ok()?;
        header.set_sensitive(true);
        let (now, unix_now) = (Instant::now(), unix_ms());
        let expires_at =
            now.checked_add(Duration::from_millis(expires_ms.checked_sub(unix_now)?))?;
        let age = Duration::from_millis(unix_now.saturating_sub(obtained_ms));
        let obtained_at = now.checked_sub(age).unwrap_or(now);
        let mut shared = Self::timed(header, generation, obtained_at, expires_at, log_uuid);
        shared.fleet_generation = Some(fleet_generation);
        shared.origin = Origin::Fleet;
        (now < shared.usable_until).then_some(shared)
    }

    /// This token, published to the fleet as `fleet_generation`.
    pub fn published_as(mut self, fleet_generation: u64) -> Self {
        self.fleet_generation = Some(fleet_generation);
        self
    }

    /// Its generation in the fleet's shared cache, if it is there.
    pub fn fleet_generation(&self) -> Option<u64> {
        self.fleet_generation
    }

    /// Whether this replica exchanged it or read it from the fleet.
    pub fn origin(&self) -> Origin {
        self.origin
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
            .field("fleet_generation", &self.fleet_generation)
            .field("origin", &self.origin)
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
