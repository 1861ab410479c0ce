//! Who may use the credentials: the client's address must be in `allowed_clients`, and the
//! request must carry the shared `require_header` key (compared in constant time, then removed).
//! Applied first by [`super::admit`].

use http::Request;

use crate::ctx::Ctx;
use crate::error::ProxyError;
use crate::gateway::access::AccessPolicy;

/// Checks `req` against `policy` and removes the shared key header (it is not forwarded).
pub fn check<B>(policy: &AccessPolicy, req: &mut Request<B>) -> Result<(), ProxyError> {
    let peer = Ctx::of(req).and_then(Ctx::peer).map(|a| a.ip());
    let key = policy
        .key_header()
        .and_then(|name| req.headers_mut().remove(name));
    policy
        .admits(peer, key.as_ref())
        .map_err(ProxyError::Forbidden)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::header::HeaderName;
    use secrecy::SecretString;

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
        assert!(check(&policy, &mut request("10.1.2.3:5000", None)).is_ok());
        assert!(check(&policy, &mut request("[::ffff:10.1.2.3]:5000", None)).is_ok());
        assert!(check(&policy, &mut request("[::1]:5000", None)).is_ok());
        assert!(check(&policy, &mut request("10.2.0.1:5000", None)).is_err());
        assert!(check(&policy, &mut request("127.0.0.1:5000", None)).is_err());
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
        assert!(check(&policy, &mut ok).is_ok());
        assert!(
            !ok.headers().contains_key("x-tokengate-key"),
            "not forwarded upstream"
        );
        assert!(check(&policy, &mut request("127.0.0.1:1", Some("k3"))).is_err());
        assert!(check(&policy, &mut request("127.0.0.1:1", Some("k3yy"))).is_err());
        assert!(check(&policy, &mut request("127.0.0.1:1", None)).is_err());
        assert!(!format!("{policy:?}").contains("k3y"));
    }
}
