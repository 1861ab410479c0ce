//! Hop-by-hop headers (RFC 9110 §7.6.1): removed in both directions, with every header the
//! `Connection` header names.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

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
