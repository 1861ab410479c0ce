//! The proxy's own errors and the one place they become the JSON responses the README lists.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::auth::exchange::AuthError;
use crate::body::{BodyError, ProxyBody, ProxyResponse};
use crate::http1::Refusal;

/// A boxed error, for sources of any type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The header naming the error kind on every response the proxy itself produces.
pub const ERROR_HEADER: &str = "x-tokengate-error";

/// Everything that can go wrong on the request path.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No route matches the request.
    #[error("no route matches this request")]
    NoRoute {
        /// The request was absolute-form (`HTTP_PROXY` use): 403 instead of 404.
        absolute_form: bool,
    },
    /// A CONNECT names a target `forward.tunnel_allow` does not list (kind `no_route`, 403).
    #[error("CONNECT target `{0}` is not listed in forward.tunnel_allow")]
    TunnelNotListed(http::uri::Authority),
    /// The credential's token could not be obtained. (The client's message adds the top of
    /// `source`; logs show the whole chain.)
    #[error("credential {credential}")]
    Auth {
        /// The credential's name.
        credential: Arc<str>,
        /// Why the exchange failed.
        #[source]
        source: Arc<AuthError>,
        /// How long until the credential tries a new exchange.
        retry_after: Duration,
    },
    /// Connecting to the upstream, or talking to it, failed.
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] BoxError),
    /// The SSRF guard refused a tunnel target (its address class is named, not the address).
    #[error("tunnel target denied: {0}")]
    TunnelDenied(crate::upstream::ssrf::Denied),
    /// A tunnel target did not resolve, or refused the connection.
    #[error("tunnel target unreachable")]
    TunnelUnreachable(#[source] std::io::Error),
    /// The upstream did not answer within `request_timeout`.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// The request body is larger than allowed.
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client stopped sending its body for longer than the idle timeout.
    #[error("client body idle for {0:?}")]
    ClientTimeout(Duration),
    /// Reading the client's body failed.
    #[error("client body read failed")]
    ClientBody(#[source] BoxError),
    /// Too many requests in flight; this one was shed.
    #[error("too many requests in flight")]
    Overloaded,
    /// The client may not use this proxy (address or shared key).
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// A method tokengate does not forward: CONNECT while no tunnel target is listed, TRACE.
    #[error("{}", method_refusal(.0))]
    MethodNotAllowed(http::Method),
    /// The request head is longer than allowed; the connection is closed after the answer.
    #[error("{0}")]
    HeadersTooLarge(Refusal),
    /// The request's body framing is ambiguous; the connection is closed after the answer, since
    /// where a next request would begin is unknown.
    #[error("bad request: {0}")]
    AmbiguousFraming(&'static str),
    /// The request is not acceptable.
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The request's `Host` breaks RFC 9112 §3.2 (missing from HTTP/1.1, repeated, or invalid);
    /// the connection is closed after the answer, as after any request that breaks the syntax.
    #[error("bad request: {0}")]
    BadHost(&'static str),
    /// A broken internal invariant; never expected.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute {
                absolute_form: true,
            } => StatusCode::FORBIDDEN,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::TunnelNotListed(_) => StatusCode::FORBIDDEN,
            Self::Auth { source, .. } => match **source {
                AuthError::Rejected { .. } => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::UpstreamUnreachable(_) | Self::TunnelUnreachable(_) => StatusCode::BAD_GATEWAY,
            Self::TunnelDenied(_) => StatusCode::FORBIDDEN,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::ClientBody(_)
            | Self::BadRequest(_)
            | Self::BadHost(_)
            | Self::AmbiguousFraming(_) => StatusCode::BAD_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable `kind` (README, Errors).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } | Self::TunnelNotListed(_) => "no_route",
            Self::Auth { source, .. } => match **source {
                AuthError::Rejected { .. } => "auth_rejected",
                _ => "auth_unavailable",
            },
            Self::UpstreamUnreachable(_) | Self::TunnelUnreachable(_) => "upstream_unreachable",
            Self::TunnelDenied(_) => "forbidden",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::HeadersTooLarge(_) => "headers_too_large",
            Self::ClientTimeout(_) => "client_timeout",
            Self::Overloaded => "overloaded",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Forbidden(_) => "forbidden",
            Self::ClientBody(_)
            | Self::BadRequest(_)
            | Self::BadHost(_)
            | Self::AmbiguousFraming(_) => "bad_request",
            Self::Internal(_) => "internal",
        }
    }

    /// The client's `message`: this error's own words, and for an auth failure the top of its
    /// cause (never the lower causes, which may quote the auth server's transport).
    pub fn message(&self) -> String {
        match self {
            Self::Auth {
                credential, source, ..
            } => format!("credential {credential}: {source}"),
            other => other.to_string(),
        }
    }

    /// The error for a request body that stopped: too large, idle, or broken.
    pub fn from_body(error: BodyError) -> Self {
        match error {
            BodyError::TooLarge { limit } => Self::BodyTooLarge { limit },
            BodyError::Idle { after, .. } => Self::ClientTimeout(after),
            BodyError::Transport(e) => Self::ClientBody(e.into()),
            BodyError::Client(e) => Self::ClientBody(e.into()),
            BodyError::Upstream(e) => Self::UpstreamUnreachable(Box::new(e)),
        }
    }

    /// The JSON response for this error: `kind`, a message and, for auth rejections, the auth
    /// server's code, message and logUUID. Never a secret, a token or upstream text.
    pub fn into_response(self) -> ProxyResponse {
        let status = self.status();
        let kind = self.kind();
        let mut body = serde_json::json!({ "kind": kind, "message": self.message() });
        let retry_after = match &self {
            // Whole seconds, rounded up, at least 1: a client retrying then finds a new exchange.
            Self::Auth { retry_after, .. } => {
                Some((retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1))
            }
            Self::Overloaded => Some(1),
            _ => None,
        };
        if let Self::Auth {
            credential, source, ..
        } = &self
        {
            body["credential"] = credential.as_ref().into();
            if let AuthError::Rejected {
                code,
                message,
                log_uuid,
            } = &**source
            {
                body["auth_code"] = code.code().into();
                body["auth_message"] = message.as_str().into();
                body["auth_log_uuid"] = log_uuid.as_deref().into();
            }
        }
        let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(kind));
        if matches!(
            self,
            Self::AmbiguousFraming(_) | Self::BadHost(_) | Self::HeadersTooLarge(_)
        ) {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<Refusal> for ProxyError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::HeadTooLarge | Refusal::TooManyHeaders => Self::HeadersTooLarge(refusal),
            Refusal::Malformed(why) => Self::BadRequest(why),
            Refusal::Framing(why) => Self::AmbiguousFraming(why),
            Refusal::Host(why) => Self::BadHost(why),
        }
    }
}

/// Why a method is refused, and what would allow it.
fn method_refusal(method: &http::Method) -> String {
    match *method {
        http::Method::CONNECT => {
            "CONNECT tunnels are off: list the target (host:port) in forward.tunnel_allow to \
             allow one"
                .into()
        }
        http::Method::TRACE => "TRACE is never forwarded: it would echo the injected token".into(),
        ref other => format!("method {other} is not forwarded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorChain;

    /// Each cause appears once in a chain: a `Display` names its own step, never its source's.
    #[test]
    fn chains_name_each_cause_once() {
        let connect = crate::upstream::pool::PoolError::Connect {
            authority: http::uri::Authority::from_static("api.internal:8080"),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let error = ProxyError::UpstreamUnreachable(Box::new(connect));
        assert_eq!(
            ErrorChain(&error).to_string(),
            "upstream unreachable: connect to api.internal:8080: connection refused"
        );

        let error = ProxyError::Auth {
            credential: "partner".into(),
            source: Arc::new(AuthError::Timeout(Duration::from_secs(5))),
            retry_after: Duration::ZERO,
        };
        assert_eq!(
            ErrorChain(&error).to_string(),
            "credential partner: auth exchange timed out after 5s"
        );
        assert_eq!(
            error.message(),
            "credential partner: auth exchange timed out after 5s"
        );
    }
}
