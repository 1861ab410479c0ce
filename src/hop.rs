//! Hop-by-hop headers (RFC 9110 §7.6.1): removed in both directions, with every header the
//! `Connection` header names; and the framing check that refuses ambiguous request bodies.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request};

use crate::ctx::Ctx;
use crate::error::ProxyError;
use crate::framing::Refusal;
use crate::server::MAX_HEADER_BYTES;

/// The hop-by-hop headers every proxy removes, whatever `Connection` says, and
/// `Transfer-Encoding` (framing is the proxy's own on each side). [`hop_index`] finds a name here.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// Whether `name` is a hop-by-hop header every proxy removes (or `Transfer-Encoding`).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_index(name).is_some()
}

/// Whether `name`, as a peer spelt it (any case), is a hop-by-hop header (or
/// `Transfer-Encoding`), as [`is_hop_by_hop`] says of a parsed name: by its length first.
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 => is("te"),
        7 => is("trailer") || is("upgrade"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// Where `name` is in [`HOP_BY_HOP`]: one string match, not nine comparisons.
fn hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "upgrade" => 7,
        "transfer-encoding" => 8,
        _ => return None,
    })
}

/// Refuses ambiguous request framing, as nginx and Envoy do, and heads the [`crate::framing`]
/// watch found over [`MAX_HEADER_BYTES`].
///
/// hyper's parser already answers 400 to differing `Content-Length` values and to a request
/// whose last transfer coding is not `chunked`. Given `Content-Length` together with
/// `Transfer-Encoding`, it reads the body as chunked, drops `Content-Length` and closes the
/// connection after the response (RFC 9112 §6.3); the [`crate::framing`] watch marks such a
/// request and it is refused here. This check also refuses codings stacked before `chunked`
/// (`gzip, chunked`), which an upstream might decode differently, and a `Host` that breaks
/// RFC 9112 §3.2. Returns the request's one `Host`, if it has one.
pub fn check_framing<B>(req: &Request<B>) -> Result<Option<&HeaderValue>, ProxyError> {
    match Ctx::of(req).and_then(Ctx::refusal) {
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
    let host = check_host(req)?;
    let mut te = req.headers().get_all(header::TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => Ok(host),
        (Some(value), None) if value.as_bytes().eq_ignore_ascii_case(b"chunked") => Ok(host),
        _ => Err(ProxyError::AmbiguousFraming(
            "Transfer-Encoding other than a single chunked",
        )),
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`, no HTTP/1 request carries
/// two, and its value is `host[:port]` or empty. (HTTP/2 names the authority in
/// `:authority`.) Returns the `Host`, so that routing need not look it up again.
fn check_host<B>(req: &Request<B>) -> Result<Option<&HeaderValue>, ProxyError> {
    if req.version() > http::Version::HTTP_11 {
        return Ok(req.headers().get(header::HOST));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(ProxyError::BadHost("more than one Host")),
        (None, _) if req.version() == http::Version::HTTP_11 => {
            Err(ProxyError::BadHost("an HTTP/1.1 request needs a Host"))
        }
        (None, _) => Ok(None),
        (Some(host), None) if is_host_value(host.as_bytes()) => Ok(Some(host)),
        (Some(_), None) => Err(ProxyError::BadHost("Host is not host[:port]")),
    }
}

/// Whether `value` is `uri-host [ ":" port ]` (RFC 3986 §3.2.2-3), or empty: a bracketed IP
/// literal or a name of unreserved, percent-encoded and sub-delimiter bytes, then digits. Read
/// byte by byte, without parsing it into a URI (that allocated, on every request).
fn is_host_value(value: &[u8]) -> bool {
    let name_byte = |b: u8| {
        matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'%'
            | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
    };
    let (host, rest) = match value.first() {
        None => return true,
        Some(b'[') => match value.iter().position(|&b| b == b']') {
            Some(end) => (&value[1..end], &value[end + 1..]),
            None => return false,
        },
        Some(_) => match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon..]),
            None => (value, &value[value.len()..]),
        },
    };
    let host_ok = !host.is_empty()
        && if value[0] == b'[' {
            host.iter().all(|&b| b == b':' || name_byte(b))
        } else {
            host.iter().copied().all(name_byte)
        };
    let port_ok = match rest.split_first() {
        None => true,
        Some((b':', port)) => port.len() <= 5 && port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

/// Removes hop-by-hop headers, those named in `Connection` (any case) and `Transfer-Encoding`
/// (framing is the proxy's own on each side).
///
/// One pass over the names finds what is there, so a message without any (most requests) costs
/// no removal; headers named in `Connection` can only be present with `Connection` itself.
pub fn strip(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for i in headers.keys().filter_map(hop_index) {
        present[i] = true;
        any = true;
    }
    if !any {
        return;
    }
    // The values are cheap handles; holding them lets the map change while they are read.
    let named: Vec<HeaderValue> = headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
    remove_named(headers, &named);
}

/// Removes the headers that the `Connection` header values `connection` name (any case), but
/// for the `close` and `keep-alive` options, which name no header a message would carry.
pub fn remove_named(headers: &mut HeaderMap, connection: &[HeaderValue]) {
    let tokens = connection
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"));
    for token in tokens {
        headers.remove(token); // any case; a token that is no header name removes nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_are_known_in_any_case() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop_name(name.as_str().as_bytes()), "{name}");
            let upper = name.as_str().to_ascii_uppercase();
            assert!(is_hop_by_hop_name(upper.as_bytes()), "{upper}");
        }
        for other in ["host", "content-length", "keep-alives", "t", "x-upgrade"] {
            assert!(!is_hop_by_hop_name(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn an_http1_request_has_exactly_one_valid_host() {
        let request = |version, hosts: &[&str]| {
            let mut req = Request::builder().version(version).body(()).unwrap();
            for host in hosts {
                req.headers_mut()
                    .append(header::HOST, host.parse().unwrap());
            }
            check_framing(&req)
                .map(|host| host.cloned())
                .map_err(|e| (e.status().as_u16(), e.to_string()))
        };
        use http::Version;
        for ok in [
            &["api.example.com"][..],
            &["a:8080"],
            &["[::1]:80"],
            &["[fe80::1%25eth0]"],
            &["127.0.0.1"],
            &["a:"],
            &[""],
        ] {
            assert!(request(Version::HTTP_11, ok).is_ok(), "{ok:?}");
        }
        assert!(
            request(Version::HTTP_10, &[]).is_ok(),
            "HTTP/1.0 may leave it out"
        );
        assert!(request(Version::HTTP_2, &[]).is_ok(), ":authority instead");
        for (version, hosts) in [
            (Version::HTTP_11, &[][..]),
            (Version::HTTP_11, &["a", "a"]),
            (Version::HTTP_10, &["a", "b"]),
            (Version::HTTP_11, &["user@a"]),
            (Version::HTTP_11, &["a b"]),
            (Version::HTTP_11, &[":80"]),
            (Version::HTTP_11, &["a:80:80"]),
            (Version::HTTP_11, &["a:x"]),
            (Version::HTTP_11, &["[::1"]),
            (Version::HTTP_11, &["[::1]x"]),
            (Version::HTTP_11, &["a/b"]),
        ] {
            let (status, message) = request(version, hosts).unwrap_err();
            assert_eq!(status, 400, "{version:?} {hosts:?}");
            assert!(message.contains("Host"), "{message}");
        }
    }

    #[test]
    fn framing_check_refuses_ambiguous_bodies() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut req = Request::new(());
            req.headers_mut().insert(header::HOST, "a".parse().unwrap());
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
            marked
                .extensions_mut()
                .insert(Ctx::new(None, Some(refusal)));
            let refused = check_framing(&marked).expect_err("marked requests are refused");
            assert_eq!(refused.status(), status);
        }
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            "Keep-Alive, X-Secret-Hop , AUTHORIZATION, , not a name"
                .parse()
                .unwrap(),
        );
        h.append("connection", "x-second-hop".parse().unwrap());
        h.insert("x-second-hop", "2".parse().unwrap());
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
