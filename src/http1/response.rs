//! Writing a response head to an HTTP/1 client, and the response heads that arrive in wire form
//! from the upstream client ([`WireHead`]) to be sent on as they are.
//!
//! Responses are framed as hyper frames them: the `Content-Length` they carry, or the body's
//! exact length, or chunked (until the close, for an HTTP/1.0 client); no body for `HEAD`,
//! 1xx, 204 and 304. A response gets a `Date` if it has none, and `Connection: close` when the
//! connection ends after it.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::TRANSFER_ENCODING;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::fields::content_length;

/// A response head as the upstream sent it, less what this hop removes (hop-by-hop headers,
/// those `Connection` names, a `Content-Length` a coding overrides): its header lines in wire
/// form. The server side sends them on to HTTP/1 clients as they are; for HTTP/2 clients they
/// become a [`HeaderMap`] ([`WireHead::append_to`]).
#[derive(Clone, Default)]
pub struct WireHead {
    /// The header lines, each ending in CRLF.
    pub lines: Vec<u8>,
    /// They hold the `Content-Length` that frames the body.
    pub has_length: bool,
    /// They hold a `Date`.
    pub has_date: bool,
}

impl std::fmt::Debug for WireHead {
    /// The upstream's header values stay out of logs: only their size shows.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireHead")
            .field("bytes", &self.lines.len())
            .field("has_length", &self.has_length)
            .field("has_date", &self.has_date)
            .finish()
    }
}

impl WireHead {
    /// The lines as headers, appended to `headers`; the values share one buffer.
    pub fn append_to(self, headers: &mut HeaderMap) {
        let lines = Bytes::from(self.lines);
        for line in lines.split(|&b| b == b'\n') {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let value = line[colon + 1..].trim_ascii();
            let at = value.as_ptr() as usize - lines.as_ptr() as usize;
            // httparse admitted both; a line that will not convert is left out.
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_maybe_shared(lines.slice(at..at + value.len())),
            ) {
                headers.append(name, value);
            }
        }
    }
}

/// A response body that may carry its head in wire form ([`WireHead`]): tokengate's own
/// upstream client leaves the upstream's header lines there, for the server side to send on as
/// they are. Whatever else serves a response makes them headers first ([`with_headers`]).
pub trait CarriesHead {
    /// Takes the head, if the body carries one.
    fn take_wire_head(&mut self) -> Option<WireHead> {
        None
    }
}

impl<D, E> CarriesHead for http_body_util::combinators::BoxBody<D, E> {}

/// `response` with the head its body carries (if any) among its headers.
pub fn with_headers<B: CarriesHead>(mut response: Response<B>) -> Response<B> {
    if let Some(wire) = response.body_mut().take_wire_head() {
        wire.append_to(response.headers_mut());
    }
    response
}

/// How a response body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length`.
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    UntilClose,
}

/// What the connection does after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Waits for the next request (HTTP/1.1).
    KeepAlive,
    /// Waits for the next request, and says so (an HTTP/1.0 client that asked for it).
    KeepAlive10,
    /// Closes.
    Close,
}

/// The response head in wire form, appended to `head`: `headers`, then the lines of `wire`,
/// with the framing headers this hop decides (a `Content-Length` unless the head `declared`
/// one). An HTTP/1.0 client (`http10`) gets the version it spoke, as hyper answers it.
#[allow(clippy::too_many_arguments)] // the head's parts, each its own decision
pub fn encode_head(
    head: &mut Vec<u8>,
    http10: bool,
    status: StatusCode,
    headers: &HeaderMap,
    wire: Option<&WireHead>,
    framing: Framing,
    declared: bool,
    after: After,
) {
    let wire_lines = wire.map_or(&[][..], |w| &w.lines[..]);
    let size = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + wire_lines.len()
        + 128;
    head.reserve(size);
    head.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // The coding and the connection are this hop's own; a length that does not parse is
        // replaced.
        if name == TRANSFER_ENCODING
            || name == CONNECTION
            || (name == CONTENT_LENGTH && content_length(value.as_bytes()).is_none())
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(wire_lines);
    match framing {
        Framing::Length(n) if !declared => {
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !headers.contains_key(DATE) && !wire.is_some_and(|w| w.has_date) {
        head.extend_from_slice(b"date: ");
        with_date(|date| head.extend_from_slice(date));
        head.extend_from_slice(b"\r\n");
    }
    match after {
        After::KeepAlive => {}
        After::KeepAlive10 => head.extend_from_slice(b"connection: keep-alive\r\n"),
        After::Close => head.extend_from_slice(b"connection: close\r\n"),
    }
    head.extend_from_slice(b"\r\n");
}

/// Calls `f` with the current `Date` value, formatted once a second per thread.
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    DATE.with_borrow_mut(|(second, date)| {
        let now = SystemTime::now();
        let this = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if *second != this {
            *second = this;
            *date = httpdate::fmt_http_date(now);
        }
        f(date.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_responses_as_hyper_does() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        let encoded = |http10, status, headers: &HeaderMap, wire, framing, declared, after| {
            let mut head = Vec::new();
            encode_head(
                &mut head, http10, status, headers, wire, framing, declared, after,
            );
            String::from_utf8(head).unwrap()
        };
        let head = |framing, declared, after, headers: &HeaderMap| {
            encoded(
                false,
                StatusCode::OK,
                headers,
                None,
                framing,
                declared,
                after,
            )
        };
        let h = head(Framing::Length(12), false, After::KeepAlive, &headers);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 12\r\ndate: "));
        assert!(h.ends_with(" GMT\r\n\r\n"), "{h}");
        let h = head(Framing::Chunked, false, After::Close, &headers);
        assert!(h.contains("transfer-encoding: chunked\r\n"), "{h}");
        assert!(h.ends_with("connection: close\r\n\r\n"), "{h}");
        let h = head(Framing::UntilClose, false, After::Close, &headers);
        assert!(
            !h.contains("transfer-encoding") && !h.contains("content-length"),
            "{h}"
        );
        let h = head(Framing::Length(1), false, After::KeepAlive10, &headers);
        assert!(h.ends_with("connection: keep-alive\r\n\r\n"), "{h}");
        let h = encoded(
            true,
            StatusCode::OK,
            &headers,
            None,
            Framing::None,
            false,
            After::Close,
        );
        assert!(h.starts_with("HTTP/1.0 200 OK\r\n"), "{h}");

        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("7"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        headers.insert(DATE, HeaderValue::from_static("then"));
        let h = head(Framing::Length(7), true, After::KeepAlive, &headers);
        assert_eq!(
            h, "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 7\r\ndate: then\r\n\r\n",
            "the declared length and date stay; the coding and connection are this hop's"
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("x"));
        let h = head(Framing::Chunked, false, After::KeepAlive, &headers);
        assert!(
            !h.contains("content-length"),
            "a length that did not parse goes: {h}"
        );

        // An upstream's head goes on as it came, after the headers of the map.
        let wire = WireHead {
            lines: b"Content-Type: a/b\r\nContent-Length: 3\r\n".to_vec(),
            has_length: true,
            has_date: false,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-b", HeaderValue::from_static("2"));
        let h = encoded(
            false,
            StatusCode::NOT_FOUND,
            &headers,
            Some(&wire),
            Framing::Length(3),
            true,
            After::KeepAlive,
        );
        assert!(
            h.starts_with(
                "HTTP/1.1 404 Not Found\r\nx-b: 2\r\nContent-Type: a/b\r\nContent-Length: 3\r\ndate: "
            ),
            "{h}"
        );
        assert_eq!(h.matches("ength").count(), 1, "{h}");
    }
}
