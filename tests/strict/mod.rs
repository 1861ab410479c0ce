//! A strict RFC 9112 reading of a request head, written from the RFC's rules on top of
//! `httparse`'s framing of the lines (the parser hyper uses), to hold tokengate's server side
//! against: shared by the differential test (`tests/differential.rs`) and the `request_head`
//! fuzz target.

use tokengate::http1::fields::is_host_value;

/// The most header fields, and head bytes, a head may have (tokengate's limits).
pub const MAX_HEADERS: usize = tokengate::http1::MAX_HEADERS;
pub const MAX_HEADER_BYTES: usize = tokengate::http1::MAX_HEADER_BYTES;

/// How a strict reading frames a request's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// What a strict reading makes of the start of some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes are needed.
    Incomplete,
    /// Refused: 400 or 431, and the connection closed.
    Refused(&'static str),
    /// A request: its method, target, the length of its head, and its body's framing.
    Request {
        method: String,
        target: String,
        head_len: usize,
        body: Body,
    },
}

/// Reads the request head at the start of `bytes` strictly.
pub fn strict_reading(bytes: &[u8]) -> Verdict {
    let mut headers = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(bytes) {
        Err(_) => return Verdict::Refused("httparse refuses the head"),
        Ok(httparse::Status::Partial) if bytes.len() > MAX_HEADER_BYTES => {
            return Verdict::Refused("head too large");
        }
        Ok(httparse::Status::Partial) => return Verdict::Incomplete,
        Ok(httparse::Status::Complete(n)) if n > MAX_HEADER_BYTES => {
            return Verdict::Refused("head too large");
        }
        Ok(httparse::Status::Complete(n)) => n,
    };
    let method = req.method.unwrap_or_default().to_owned();
    let target = req.path.unwrap_or_default().to_owned();
    let http11 = req.version == Some(1);
    let named = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
            .collect::<Vec<_>>()
    };
    // RFC 9110 §8.6: one length, or equal ones (in one field or several).
    let mut lengths = Vec::new();
    for value in named("content-length") {
        for part in value.split(|&b| b == b',') {
            let part = std::str::from_utf8(part)
                .unwrap_or("x")
                .trim_matches([' ', '\t']);
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Verdict::Refused("Content-Length is not a length");
            }
            lengths.push(part.parse::<u64>().unwrap_or(u64::MAX));
        }
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Verdict::Refused("differing Content-Length");
    }
    let codings = named("transfer-encoding");
    let body = match (codings.as_slice(), lengths.first()) {
        ([], None | Some(0)) => Body::None,
        ([], Some(&n)) => Body::Length(n),
        // RFC 9112 §6.1-6.3: with both, the framing is ambiguous; HTTP/1.0 has no codings;
        // tokengate takes `chunked` alone (it would have to pass any other coding on).
        (_, Some(_)) => return Verdict::Refused("Content-Length with Transfer-Encoding"),
        _ if !http11 => return Verdict::Refused("Transfer-Encoding in HTTP/1.0"),
        ([only], None)
            if std::str::from_utf8(only)
                .is_ok_and(|v| v.trim_matches([' ', '\t']).eq_ignore_ascii_case("chunked")) =>
        {
            Body::Chunked
        }
        _ => return Verdict::Refused("Transfer-Encoding other than chunked"),
    };
    if method == "CONNECT" && body != Body::None {
        return Verdict::Refused("CONNECT with a body");
    }
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0, host[:port].
    let hosts = named("host");
    match hosts.as_slice() {
        [] if http11 => return Verdict::Refused("no Host"),
        [] => {}
        [host] if is_host_value(host) => {}
        [_] => return Verdict::Refused("bad Host"),
        _ => return Verdict::Refused("more than one Host"),
    }
    // RFC 9112 §3.2: the target's form suits the method.
    let Ok(uri) = target.parse::<http::Uri>() else {
        return Verdict::Refused("bad target");
    };
    let authority_form = uri.scheme().is_none() && uri.authority().is_some();
    let suits = match method.as_str() {
        "CONNECT" => authority_form,
        _ if target == "*" => method == "OPTIONS",
        _ => target.starts_with('/') || uri.scheme().is_some(),
    };
    if !suits {
        return Verdict::Refused("target does not suit the method");
    }
    Verdict::Request {
        method,
        target,
        head_len,
        body,
    }
}
