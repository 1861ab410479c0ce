//! Who may use the credentials: the client's address must be in `allowed_clients`, and the
//! request must carry the shared `require_header` key (compared in constant time, then removed).

use std::net::IpAddr;
use std::sync::Arc;

use http::Request;
use http::header::HeaderName;
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tower::filter::Predicate;

use crate::ctx::Ctx;
use crate::error::{BoxError, ProxyError};
use crate::gateway::SharedLive;

/// The access policy of the proxy listener.
#[derive(Clone, Default)]
pub struct AccessPolicy {
    /// Networks clients may connect from; `None` allows any.
    pub allowed_clients: Option<Arc<[IpNet]>>,
    /// A header every request must carry with exactly this value.
    pub required_header: Option<Arc<(HeaderName, SecretString)>>,
}

impl AccessPolicy {
    /// Checks `req` against the policy and removes the shared key header.
    pub fn check<B>(&self, req: &mut Request<B>) -> Result<(), ProxyError> {
        if let Some(allowed) = &self.allowed_clients {
            let ip = Ctx::of(req)
                .and_then(Ctx::peer)
                .map(|a| canonical(a.ip()))
                .ok_or(ProxyError::Forbidden("client address unknown"))?;
            if !allowed.iter().any(|net| net.contains(&ip)) {
                return Err(ProxyError::Forbidden("client address not allowed"));
            }
        }
        if let Some(required) = &self.required_header {
            let (name, expected) = &**required;
            let presented = req.headers_mut().remove(name);
            let ok = presented.is_some_and(|v| {
                bool::from(v.as_bytes().ct_eq(expected.expose_secret().as_bytes()))
            });
            if !ok {
                return Err(ProxyError::Forbidden("client key missing or wrong"));
            }
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("allowed_clients", &self.allowed_clients)
            .field(
                "required_header",
                &self.required_header.as_ref().map(|r| &r.0),
            )
            .finish()
    }
}

/// The access check as a tower [`Predicate`] (for `tower::filter::FilterLayer`): refuses
/// requests the current [`AccessPolicy`] does not admit with 403 `forbidden`.
#[derive(Clone)]
pub struct AccessCheck {
    live: SharedLive,
}

impl AccessCheck {
    /// Checks against the access policy of the current snapshot.
    pub fn new(live: SharedLive) -> Self {
        Self { live }
    }
}

impl<B> Predicate<Request<B>> for AccessCheck {
    type Request = Request<B>;

    fn check(&mut self, mut req: Request<B>) -> Result<Request<B>, BoxError> {
        self.live.load().access.check(&mut req)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(peer: &str, key: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        req.extensions_mut()
            .insert(Ctx::new(Some(peer.parse().unwrap())));
        if let Some(k) = key {
            req.headers_mut()
                .insert("x-tokengate-key", k.parse().unwrap());
        }
        req
    }

    #[test]
    fn allowed_clients_match_cidrs_including_mapped_ipv6() {
        let policy = AccessPolicy {
            allowed_clients: Some(
                vec!["10.1.0.0/16".parse().unwrap(), "::1/128".parse().unwrap()].into(),
            ),
            required_header: None,
        };
        assert!(policy.check(&mut request("10.1.2.3:5000", None)).is_ok());
        assert!(
            policy
                .check(&mut request("[::ffff:10.1.2.3]:5000", None))
                .is_ok()
        );
        assert!(policy.check(&mut request("[::1]:5000", None)).is_ok());
        assert!(policy.check(&mut request("10.2.0.1:5000", None)).is_err());
        assert!(policy.check(&mut request("127.0.0.1:5000", None)).is_err());
    }

    #[test]
    fn required_header_must_match_and_is_removed() {
        let policy = AccessPolicy {
            allowed_clients: None,
            required_header: Some(Arc::new((
                HeaderName::from_static("x-tokengate-key"),
                SecretString::from("k3y"),
            ))),
        };
        let mut ok = request("127.0.0.1:1", Some("k3y"));
        assert!(policy.check(&mut ok).is_ok());
        assert!(
            !ok.headers().contains_key("x-tokengate-key"),
            "not forwarded upstream"
        );
        assert!(
            policy
                .check(&mut request("127.0.0.1:1", Some("k3")))
                .is_err()
        );
        assert!(
            policy
                .check(&mut request("127.0.0.1:1", Some("k3yy")))
                .is_err()
        );
        assert!(policy.check(&mut request("127.0.0.1:1", None)).is_err());
        assert!(!format!("{policy:?}").contains("k3y"));
    }
}
