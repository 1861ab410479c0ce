//! Hop-by-hop headers (RFC 9110 §7.6.1): removed in both directions, with every header the
//! `Connection` header names; and the framing check that refuses ambiguous request bodies.

use http::header::{self, HeaderName};
use http::{HeaderMap, Request};

use crate::error::ProxyError;
use crate::framing::Refusal;
use crate::server::MAX_HEADER_BYTES;

/// The hop-by-hop headers every proxy removes, whatever `Connection` says.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Refuses ambiguous request framing, as nginx and Envoy do, and heads the [`crate::framing`]
/// watch found over [`MAX_HEADER_BYTES`].
///
/// hyper's parser already answers 400 to differing `Content-Length` values and to a request
/// whose last transfer coding is not `chunked`. Given `Content-Length` together with
/// `Transfer-Encoding`, it reads the body as chunked, drops `Content-Length` and closes the
/// connection after the response (RFC 9112 §6.3); the [`crate::framing`] watch marks such a
/// request and it is refused here. This check also refuses codings stacked before `chunked`
/// (`gzip, chunked`), which an upstream might decode differently.
pub fn check_framing<B>(req: &Request<B>) -> Result<(), ProxyError> {
    match req.extensions().get::<Refusal>() {
        None => {}
        Some(Refusal::ConflictingFraming) => {
            return Err(ProxyError::AmbiguousFraming(
                "Content-Length together with Transfer-Encoding",
            ));
        }
        Some(Refusal::OversizedHead) => {
            return Err(ProxyError::HeadersTooLarge {
                limit: MAX_HEADER_BYTES,
            });
        }
    }
    let mut te = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => Ok(()),
        (Some(value), None) if value.as_bytes().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::AmbiguousFraming(
            "Transfer-Encoding other than a single chunked",
        )),
    }
}

/// Removes hop-by-hop headers, those named in `Connection` (any case) and `Transfer-Encoding`
/// (framing is the proxy's own on each side).
///
/// One pass over the names finds what is there, so a message without any (most requests) costs
/// no removal; headers named in `Connection` can only be present with `Connection` itself.
pub fn strip(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|&name| HOP_BY_HOP.contains(name) || name == header::TRANSFER_ENCODING)
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok());
    doomed.extend(named);
    for name in &doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_check_refuses_ambiguous_bodies() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut req = Request::new(());
            for (k, v) in pairs {
                let name = HeaderName::try_from(*k).unwrap();
                req.headers_mut().append(name, v.parse().unwrap());
            }
            req
        };
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "Chunked")])).is_ok());
        for bad in [
            &[("transfer-encoding", "gzip, chunked")][..],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "xchunked")],
        ] {
            assert!(check_framing(&headers(bad)).is_err(), "{bad:?}");
        }
        for (refusal, status) in [
            (Refusal::ConflictingFraming, 400),
            (Refusal::OversizedHead, 431),
        ] {
            let mut marked = headers(&[("transfer-encoding", "chunked")]);
            marked.extensions_mut().insert(refusal);
            let refused = check_framing(&marked).expect_err("marked requests are refused");
            assert_eq!(refused.status(), status);
        }
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            "Keep-Alive, X-Secret-Hop , AUTHORIZATION".parse().unwrap(),
        );
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("authorization", "Basic abc".parse().unwrap());
        h.insert("proxy-authorization", "Basic abc".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        strip(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }
}
