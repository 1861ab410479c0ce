//! Reading a request head (RFC 9112 §2-3, §6): `httparse` frames the request line and the field
//! lines (no whitespace before a colon, no obs-fold, nothing `httparse` refuses), then the rules
//! of [`super::fields`] decide the body's framing and the `Host`. Every head either becomes a
//! [`Head`] or is refused with a [`Refusal`]; nothing is passed on that a strict reading would
//! frame differently.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

use super::fields::{BrokenLength, Field, Lengths, has_token, is_chunked_only, is_host_value};
use super::{MAX_HEADER_BYTES, MAX_HEADERS};

/// The most header names remembered per connection ([`Names`]).
const MAX_REMEMBERED_NAMES: usize = 32;

/// Why a request head is refused. Each is answered (400 or 431) and the connection closed, since
/// where a next request would begin is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The head did not end within [`MAX_HEADER_BYTES`].
    #[error("request head exceeds {MAX_HEADER_BYTES} bytes")]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] fields.
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// The request line or a field line breaks the grammar.
    #[error("{0}")]
    Malformed(&'static str),
    /// `Content-Length` and `Transfer-Encoding` do not frame exactly one body.
    #[error("{0}")]
    Framing(&'static str),
    /// `Host` breaks RFC 9112 §3.2.
    #[error("{0}")]
    Host(&'static str),
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    Empty,
    /// Exactly this many bytes (more than 0).
    Length(u64),
    /// The chunked coding.
    Chunked,
}

/// A request head read whole.
#[derive(Debug)]
pub struct Head {
    /// Method, target, version and fields; the body is the caller's.
    pub request: Request<()>,
    /// How its body is framed.
    pub framing: BodyFraming,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expects_continue: bool,
}

/// The header names of the last head a connection read, in order and as the client spelt them:
/// a client sends much the same head every time, so a name spelt the same in the same place
/// again is taken from here (one comparison of bytes; no parse, and no allocation for a name
/// that is not a standard one).
#[derive(Debug, Default)]
pub struct Names(Vec<(Box<[u8]>, HeaderName)>);

impl Names {
    /// The `i`th name of a head, spelt `bytes`.
    fn at(&mut self, i: usize, bytes: &[u8]) -> Result<HeaderName, Refusal> {
        if let Some((spelt, known)) = self.0.get(i)
            && **spelt == *bytes
        {
            return Ok(known.clone());
        }
        let name =
            HeaderName::from_bytes(bytes).map_err(|_| Refusal::Malformed("bad header name"))?;
        if i < MAX_REMEMBERED_NAMES {
            self.0.truncate(i);
            self.0.push((bytes.into(), name.clone()));
        }
        Ok(name)
    }
}

/// Reads the request head at the start of `buf` and takes it out: `Ok(None)` while it is
/// incomplete (and within [`MAX_HEADER_BYTES`]); the body's bytes stay in `buf`.
pub fn parse(buf: &mut BytesMut, names: &mut Names) -> Result<Option<Head>, Refusal> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEADER_BYTES => {
            return Err(Refusal::HeadTooLarge);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEADER_BYTES => {
            return Err(Refusal::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::TooManyHeaders),
        Err(_) => return Err(Refusal::Malformed("malformed request head")),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Refusal::Malformed("malformed request line"));
    };
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| Refusal::Malformed("bad method"))?;
    // Names now; the target and values as offsets, to share the head's bytes once the parser
    // lets go.
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let from = s.as_ptr() as usize - base;
        from..from + s.len()
    };
    let target = at(target.as_bytes());
    let mut fields = Vec::with_capacity(req.headers.len());
    let mut lengths = Lengths::default();
    let (mut codings, mut chunked) = (0, false);
    let (mut hosts, mut host_ok) = (0, true);
    let (mut close, mut keep_alive, mut expects_continue) = (false, false, false);
    for (i, h) in req.headers.iter().enumerate() {
        let name = names.at(i, h.name.as_bytes())?;
        match Field::of(h.name.as_bytes()) {
            Field::ContentLength => lengths.add(h.value),
            Field::TransferEncoding => {
                codings += 1;
                chunked = is_chunked_only(h.value);
            }
            Field::Host => {
                hosts += 1;
                host_ok &= is_host_value(h.value);
            }
            Field::Connection => {
                close |= has_token(h.value, b"close");
                keep_alive |= has_token(h.value, b"keep-alive");
            }
            Field::Expect => {
                expects_continue |= h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            }
            Field::Date | Field::HopByHop | Field::Other => {}
        }
        fields.push((name, at(h.value)));
    }
    let length = lengths
        .get()
        .map_err(|BrokenLength| Refusal::Framing("Content-Length is not one valid length"))?;
    let framing = match (codings, length) {
        (0, None | Some(0)) => BodyFraming::Empty,
        (0, Some(n)) => BodyFraming::Length(n),
        (_, Some(_)) => {
            return Err(Refusal::Framing(
                "Content-Length together with Transfer-Encoding",
            ));
        }
        _ if version == Version::HTTP_10 => {
            return Err(Refusal::Framing("Transfer-Encoding in HTTP/1.0"));
        }
        (1, None) if chunked => BodyFraming::Chunked,
        _ => {
            return Err(Refusal::Framing(
                "Transfer-Encoding other than a single chunked",
            ));
        }
    };
    if method == Method::CONNECT && framing != BodyFraming::Empty {
        return Err(Refusal::Framing("CONNECT with a body"));
    }
    match hosts {
        0 if version == Version::HTTP_11 => {
            return Err(Refusal::Host("an HTTP/1.1 request needs a Host"));
        }
        0 | 1 if host_ok => {}
        0 | 1 => return Err(Refusal::Host("Host is not host[:port]")),
        _ => return Err(Refusal::Host("more than one Host")),
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target))
        .map_err(|_| Refusal::Malformed("bad request target"))?;
    check_target(&method, &uri)?;
    // Room for the bearer token too, which would otherwise grow the map.
    let mut headers = HeaderMap::with_capacity(fields.len() + 1);
    for (name, range) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| Refusal::Malformed("bad header value"))?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive);
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        expects_continue: expects_continue && version == Version::HTTP_11,
    }))
}

/// RFC 9112 §3.2: CONNECT names an authority and nothing else; `*` is for OPTIONS; anything
/// else is a path (origin form) or an absolute URI.
fn check_target(method: &Method, uri: &Uri) -> Result<(), Refusal> {
    let authority_form = uri.scheme().is_none() && uri.authority().is_some();
    let ok = if *method == Method::CONNECT {
        authority_form
    } else if uri.path() == "*" && uri.authority().is_none() {
        *method == Method::OPTIONS
    } else {
        !authority_form
    };
    if ok {
        Ok(())
    } else {
        Err(Refusal::Malformed(
            "request target does not suit the method",
        ))
    }
}

/// What the server side makes of the bytes at the start of `head` (for the fuzz target and the
/// differential tests): `Ok(None)` while incomplete; else the method, the target, the head's
/// length and the body's framing.
#[doc(hidden)]
pub fn read_request_head(
    head: &[u8],
) -> Result<Option<(Method, Uri, usize, BodyFraming)>, Refusal> {
    let mut buf = BytesMut::from(head);
    Ok(parse(&mut buf, &mut Names::default())?.map(|h| {
        let (parts, ()) = h.request.into_parts();
        (parts.method, parts.uri, head.len() - buf.len(), h.framing)
    }))
}
