//! Hop-by-hop headers (RFC 9110 §7.6.1): removed in both directions, with every header the
//! `Connection` header names; and the framing check that refuses ambiguous request bodies.

use http::HeaderMap;
use http::header::{self, HeaderName};

/// The hop-by-hop headers every proxy removes, whatever `Connection` says.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Refuses a `Transfer-Encoding` other than a single `chunked`, as Envoy does.
///
/// hyper's parser already answers 400 to differing `Content-Length` values and to a request
/// whose last transfer coding is not `chunked`. Given `Content-Length` together with
/// `Transfer-Encoding`, it follows RFC 9112 §6.3: it reads the body as chunked, drops
/// `Content-Length`, and closes the connection after the response, so nothing after the body is
/// ever read as a second request. This check refuses what remains, codings stacked before
/// `chunked` (`gzip, chunked`), which an upstream might decode differently.
pub fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => Ok(()),
        (Some(value), None) if value.as_bytes().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err("Transfer-Encoding other than a single chunked"),
    }
}

/// Removes hop-by-hop headers, those named in `Connection` (any case) and `Transfer-Encoding`
/// (framing is the proxy's own on each side).
pub fn strip(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_check_refuses_ambiguous_bodies() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
            }
            h
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
