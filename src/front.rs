//! tokengate's own HTTP/1.1 server side, for plain-TCP clients: it reads a request head with
//! `httparse` (hyper's parser), hands the request to the stack, and writes the response head and
//! its first bytes in one vectored write. hyper serves everything it does not take on.
//!
//! It takes on the requests a keep-alive API client sends: HTTP/1.1, not CONNECT, no
//! `Transfer-Encoding`, `Expect` or `Upgrade`, at most one valid `Content-Length`, and a body that
//! arrived whole with its head. Anything else (and any head it cannot parse, or one longer than
//! [`MAX_HEADER_BYTES`]) goes to hyper, with the bytes read so far, through
//! [`crate::hibernate`]: the framing watch, 100-continue, streamed and chunked bodies, upgrades
//! and hyper's own error answers stay as they are. hyper gives the connection back once it
//! idles. nginx parses its requests the same way, in the task that serves the connection.
//!
//! Between requests a connection holds no buffer (it "hibernates"; [`crate::metrics`] counts
//! them) and waits for its next bytes, at most `header_read_timeout` for a complete head. One
//! timer per connection enforces that: it is moved only when it fires early (the connection was
//! answered since), so a busy connection does not touch it per request and an idle one is not
//! woken until its time is up.
//! Responses are framed as hyper frames them: the `Content-Length` they carry, or the body's
//! exact length, or chunked; no body for `HEAD`, 1xx, 204 and 304. A response gets a `Date` if
//! it has none, and `Connection: close` when the client asked for it or the listener stops.
//! A body that fails or ends short closes the connection.

use std::cell::RefCell;
use std::convert::Infallible;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{
    CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HeaderMap, HeaderName, HeaderValue,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::body::{CarriesHead, ClientBody};
use crate::ctx::Ctx;
use crate::error::BoxError;
use crate::h1::{WireHead, content_length, has_token};
use crate::hibernate::Http1;
use crate::server::{MAX_HEADER_BYTES, MAX_HEADERS};

/// The most one read takes, and the room made in a connection's buffer for its next bytes.
pub const READ_SIZE: usize = 8 * 1024;
/// The most buffers gathered for one vectored write.
pub const MAX_SLICES: usize = 16;
/// The most response bytes gathered before they are written.
pub const MAX_GATHERED: usize = 256 * 1024;

/// The most header names remembered per connection ([`Names`]).
const MAX_REMEMBERED_NAMES: usize = 32;

/// The header names of the last head a connection read, in order and as the client spelt them:
/// a client sends much the same head every time, so a name spelt the same in the same place
/// again is taken from here (one comparison of bytes; no parse, and no allocation for a name
/// that is not a standard one).
#[derive(Debug, Default)]
struct Names(Vec<(Box<[u8]>, HeaderName)>);

impl Names {
    /// The `i`th name of a head, spelt `bytes`.
    fn at(
        &mut self,
        i: usize,
        bytes: &[u8],
    ) -> Result<HeaderName, http::header::InvalidHeaderName> {
        if let Some((spelt, known)) = self.0.get(i)
            && **spelt == *bytes
        {
            return Ok(known.clone());
        }
        let name = HeaderName::from_bytes(bytes)?;
        if i < MAX_REMEMBERED_NAMES {
            self.0.truncate(i);
            self.0.push((bytes.into(), name.clone()));
        }
        Ok(name)
    }
}

/// Serves the plain-TCP HTTP/1 client `io` from `peer` until it closes, fails, idles past
/// `header_read_timeout`, or `stop` flips (in-flight requests finish first).
pub async fn serve<S, B>(
    http: Arc<Http1>,
    io: TcpStream,
    peer: SocketAddr,
    service: S,
    stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    S: Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + CarriesHead + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut stopping = stop.clone();
    let mut conn = Conn {
        io,
        write_timeout: http.write_timeout,
        buf: BytesMut::new(),
        names: Names::default(),
        gathered: Vec::new(),
        deadline: Box::pin(tokio::time::sleep(http.idle_timeout)),
        waiting_since: Instant::now(),
        stopping: Box::pin(async move {
            let _ = stopping.wait_for(|stopped| *stopped).await;
        }),
    };
    let mut service = service;
    loop {
        let (req, close) = match conn.next_request(&http, peer).await? {
            Next::Request(req, close) => (req, close),
            Next::Ended => return Ok(()),
            Next::Hyper => {
                let Conn { io, buf, .. } = conn;
                let rewound = Rewound { io, prefix: buf };
                let served = http
                    .clone()
                    .serve(rewound, peer, service.clone(), stop.clone());
                let Some((rewound, idle_since)) = served.await? else {
                    return Ok(());
                };
                (conn.io, conn.buf) = (rewound.io, rewound.prefix);
                conn.waiting_since = idle_since;
                continue;
            }
        };
        let head_only = req.method() == Method::HEAD;
        // The connection's own copy of the service: its requests come one at a time.
        let Ok(response) = crate::adapter::call_mut(&mut service, req).await;
        let close = close || *stop.borrow();
        if !conn.respond(response, head_only, close).await? {
            let _ = conn.io.shutdown().await; // FIN after the answer, before the close
            return Ok(());
        }
        conn.waiting_since = Instant::now(); // the deadline catches up when it fires
    }
}

/// What ended a connection's wait.
enum Woke {
    Read(io::Result<usize>),
    Deadline,
    Stop,
}

/// What a connection read next.
#[allow(clippy::large_enum_variant)] // returned once per request; a box would cost an allocation
enum Next {
    /// A request this module serves, and whether the client asked to close after it.
    Request(Request<ClientBody>, bool),
    /// hyper's to serve, from the start of the buffer.
    Hyper,
    /// The client closed, idled too long, or the listener stops.
    Ended,
}

/// A client connection between requests.
struct Conn {
    io: TcpStream,
    /// How long one write may wait for the client to take bytes before the connection is
    /// closed (`server.body_idle_timeout`).
    write_timeout: Duration,
    /// Bytes read and not yet parsed; no allocation while there are none.
    buf: BytesMut,
    /// The client's last header names.
    names: Names,
    /// What the next vectored write sends.
    gathered: Vec<Bytes>,
    /// Fires no later than `header_read_timeout` after `waiting_since`; moved to that instant
    /// when it fires early (one timer per connection, untouched per request).
    deadline: Pin<Box<Sleep>>,
    /// When the wait for the next head began: the last answer, or the connection's start.
    waiting_since: Instant,
    /// Ready once the listener stops; made once, polled by every wait.
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Conn {
    /// Reads until a complete request head, waiting at most `header_read_timeout` from the last
    /// answer, or until the listener stops.
    async fn next_request(&mut self, http: &Http1, peer: SocketAddr) -> io::Result<Next> {
        loop {
            if !self.buf.is_empty() {
                match parse(&mut self.buf, &mut self.names) {
                    Parsed::Request(mut req, close) => {
                        req.extensions_mut().insert(Ctx::new(Some(peer), None));
                        return Ok(Next::Request(req, close));
                    }
                    Parsed::Hyper => return Ok(Next::Hyper),
                    Parsed::Partial if self.buf.len() > MAX_HEADER_BYTES => {
                        return Ok(Next::Hyper); // hyper and the framing watch answer 431
                    }
                    Parsed::Partial => {}
                }
            }
            let hibernating = self.buf.is_empty();
            if hibernating {
                self.buf = BytesMut::new(); // give back what the last request left
                http.hibernating.inc();
            }
            let Self {
                io,
                buf,
                deadline,
                stopping,
                ..
            } = self;
            let woke = tokio::select! {
                biased;
                read = fill(io, buf) => Woke::Read(read),
                () = deadline.as_mut() => Woke::Deadline,
                () = stopping.as_mut() => Woke::Stop,
            };
            if hibernating {
                http.hibernating.dec();
            }
            match woke {
                Woke::Read(Ok(0)) | Woke::Stop => return Ok(Next::Ended),
                Woke::Read(Ok(_)) => {}
                Woke::Read(Err(error)) => return Err(error),
                Woke::Deadline => {
                    let due = self.waiting_since + http.idle_timeout;
                    if Instant::now() >= due {
                        tracing::debug!("no request head within header_read_timeout; closing");
                        return Ok(Next::Ended);
                    }
                    self.deadline.as_mut().reset(due); // answered since it was set
                }
            }
        }
    }

    /// Writes `response` (no body for a `HEAD` request); whether the connection stays open.
    async fn respond<B>(
        &mut self,
        response: Response<B>,
        head_only: bool,
        mut close: bool,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes> + CarriesHead,
        B::Error: Into<BoxError>,
    {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let wire = body.take_wire_head();
        close |= parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
        // The length the head declares: the upstream's (its wire head's, which frames the body
        // as read), or one in the headers.
        let declared = match &wire {
            Some(wire) if wire.has_length => body.size_hint().exact(),
            _ => parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| content_length(v.as_bytes())),
        };
        let framing = if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::None
        } else if let Some(n) = declared {
            Framing::Length(n)
        } else if let Some(n) = body.size_hint().exact() {
            Framing::Length(n)
        } else {
            Framing::Chunked
        };
        let head = encode_head(
            status,
            &parts.headers,
            wire.as_ref(),
            framing,
            declared.is_some(),
            close,
        );
        self.gathered.push(head.into());
        if framing == Framing::None {
            self.flush().await?;
            return Ok(!close);
        }
        let mut body = pin!(body);
        let mut sent = 0u64;
        let mut gathered = 0;
        loop {
            // What the body has ready joins the head; the socket is written once it has no more.
            let frame =
                match std::future::poll_fn(|cx| Poll::Ready(next_frame(&mut body, cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        self.flush().await?;
                        gathered = 0;
                        std::future::poll_fn(|cx| next_frame(&mut body, cx)).await
                    }
                };
            let data = match frame {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue, // trailers are not sent on
                },
                Some(Err(error)) => {
                    tracing::debug!(%error, "response body failed; closing");
                    self.flush().await?;
                    return Ok(false);
                }
            };
            sent += data.len() as u64;
            gathered += data.len();
            match framing {
                Framing::Length(n) if sent > n => {
                    tracing::debug!(declared = n, "response body longer than declared; closing");
                    self.flush().await?;
                    return Ok(false);
                }
                Framing::Chunked => {
                    self.gathered
                        .push(format!("{:x}\r\n", data.len()).into_bytes().into());
                    self.gathered.push(data);
                    self.gathered.push(Bytes::from_static(b"\r\n"));
                }
                _ => self.gathered.push(data),
            }
            if self.gathered.len() + 3 > MAX_SLICES || gathered >= MAX_GATHERED {
                self.flush().await?;
                gathered = 0;
            }
        }
        match framing {
            Framing::Length(n) if sent < n => {
                tracing::debug!(declared = n, sent, "response body ended short; closing");
                self.flush().await?;
                return Ok(false);
            }
            Framing::Chunked => self.gathered.push(Bytes::from_static(b"0\r\n\r\n")),
            _ => {}
        }
        self.flush().await?;
        Ok(!close)
    }
}

/// The body's next frame, its error boxed.
fn next_frame<B>(
    body: &mut Pin<&mut B>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    body.as_mut()
        .poll_frame(cx)
        .map(|frame| frame.map(|f| f.map_err(Into::into)))
}

/// Reads the client's next bytes into `buf`, making room (and a buffer) only once they are
/// there; `Ok(0)` when it closed.
async fn fill(io: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    if buf.is_empty() {
        // A new head: read onto the stack, then keep what came in a buffer of its own size.
        // A small allocation, where READ_SIZE is a large one (mimalloc's slow path: 8 KiB
        // allocated and freed again for every request).
        return std::future::poll_fn(|cx| {
            let mut room = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut read = ReadBuf::uninit(&mut room);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
            *buf = BytesMut::from(read.filled());
            Poll::Ready(Ok(buf.len()))
        })
        .await;
    }
    if buf.capacity() - buf.len() < READ_SIZE / 2 {
        buf.reserve(READ_SIZE);
    }
    // AsyncRead, not try_read: a read that leaves room clears the socket's readiness, so the
    // next wait needs no read that finds nothing.
    std::future::poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)).await
}

impl Conn {
    /// Writes everything gathered, vectored, and empties it. Each write may wait at most
    /// `write_timeout` for the client to take bytes (a timer is armed only when the socket is
    /// full); a client that stops reading is cut off.
    async fn flush(&mut self) -> io::Result<()> {
        let gathered = &mut self.gathered;
        let mut first = 0;
        while first < gathered.len() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = (gathered.len() - first).min(MAX_SLICES);
            for (slice, bytes) in slices.iter_mut().zip(&gathered[first..]) {
                *slice = IoSlice::new(bytes);
            }
            let mut write = pin!(self.io.write_vectored(&slices[..count]));
            let mut n = match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
            {
                Poll::Ready(written) => written?,
                Poll::Pending => tokio::time::timeout(self.write_timeout, write)
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")
                    })??,
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let bytes = &mut gathered[first];
                if n >= bytes.len() {
                    n -= bytes.len();
                    first += 1;
                } else {
                    bytes.advance(n);
                    n = 0;
                }
            }
        }
        gathered.clear();
        Ok(())
    }
}

/// How a response body is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// The response head in HTTP/1.1 wire form: `headers`, then the lines of `wire`, with the
/// framing headers this hop decides (a `Content-Length` unless the head `declared` one).
fn encode_head(
    status: StatusCode,
    headers: &HeaderMap,
    wire: Option<&WireHead>,
    framing: Framing,
    declared: bool,
    close: bool,
) -> Vec<u8> {
    let wire_lines = wire.map_or(&[][..], |w| &w.lines[..]);
    let size = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + wire_lines.len()
        + 128;
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // The coding is this hop's own; a length that does not parse is replaced.
        if name == TRANSFER_ENCODING
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
    if close && !headers.contains_key(CONNECTION) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
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

/// What the start of a connection's buffer holds.
#[allow(clippy::large_enum_variant)] // returned once per request; a box would cost an allocation
enum Parsed {
    /// A request this module serves, taken out of the buffer, and whether to close after it.
    Request(Request<ClientBody>, bool),
    /// More bytes are needed.
    Partial,
    /// A request for hyper (see the module docs); the buffer is untouched.
    Hyper,
}

/// What tokengate's own server side makes of the bytes at the start of `head` (for the fuzz
/// target): `Some((method, target, taken))` for a request it serves, `taken` being its head
/// and body; `None` for one it needs more bytes for or leaves to hyper.
#[doc(hidden)]
pub fn read_request_head(head: &[u8]) -> Option<(Method, Uri, usize)> {
    let mut buf = BytesMut::from(head);
    match parse(&mut buf, &mut Names::default()) {
        Parsed::Request(req, _) => {
            let taken = head.len() - buf.len();
            Some((req.method().clone(), req.uri().clone(), taken))
        }
        Parsed::Partial | Parsed::Hyper => None,
    }
}

/// Parses the request at the start of `buf`, with its body if that is all there; see
/// [`Parsed`].
fn parse(buf: &mut BytesMut, names: &mut Names) -> Parsed {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        // The framing watch refuses a head over the limit, with 431.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEADER_BYTES => return Parsed::Hyper,
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    if method == Method::CONNECT {
        return Parsed::Hyper;
    }
    // Names now; the target and values as offsets, to share the head's bytes once the parser
    // lets go.
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let from = s.as_ptr() as usize - base;
        from..from + s.len()
    };
    let target = at(path.as_bytes());
    let mut fields = Vec::with_capacity(req.headers.len());
    let (mut length, mut close) = (None, false);
    for (i, h) in req.headers.iter().enumerate() {
        let Ok(name) = names.at(i, h.name.as_bytes()) else {
            return Parsed::Hyper;
        };
        if name == TRANSFER_ENCODING || name == EXPECT || name == UPGRADE {
            return Parsed::Hyper;
        } else if name == CONTENT_LENGTH {
            match (length, content_length(h.value)) {
                (None, Some(n)) => length = Some(n),
                _ => return Parsed::Hyper, // a second one, or not a length
            }
        } else if name == CONNECTION {
            close |= has_token(h.value, b"close");
        }
        fields.push((name, at(h.value)));
    }
    let body_len = match length {
        Some(n) if n <= (buf.len() - len) as u64 => n as usize,
        Some(_) => return Parsed::Hyper, // a body still on its way streams through hyper
        None => 0,
    };
    let head = buf.split_to(len).freeze();
    let Ok(uri) = Uri::from_maybe_shared(head.slice(target)) else {
        // A target httparse admits and `Uri` does not: hyper answers it, from the same bytes.
        let mut again = BytesMut::with_capacity(head.len() + buf.len());
        again.extend_from_slice(&head);
        again.extend_from_slice(buf);
        *buf = again;
        return Parsed::Hyper;
    };
    let body = (body_len > 0).then(|| buf.split_to(body_len).freeze());
    // Room for the bearer token too, which would otherwise grow the map.
    let mut headers = HeaderMap::with_capacity(fields.len() + 1);
    for (name, range) in fields {
        // httparse admits only the bytes a HeaderValue holds.
        if let Ok(value) = HeaderValue::from_maybe_shared(head.slice(range)) {
            headers.append(name, value);
        }
    }
    let mut request = Request::new(ClientBody::Whole(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Request(request, close)
}

/// A client connection handed to hyper, with the bytes read from it that hyper has not seen.
#[derive(Debug)]
pub struct Rewound {
    io: TcpStream,
    prefix: BytesMut,
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (Parsed, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let parsed = parse(&mut buf, &mut Names::default());
        (parsed, buf)
    }

    #[test]
    fn takes_keep_alive_requests_whose_body_came_whole_and_leaves_what_follows() {
        let (p, rest) = parsed(
            b"POST /a?q=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nX-A: 1\r\nX-A: 2\r\n\r\nhelloGET /next",
        );
        let Parsed::Request(req, close) = p else {
            panic!("not taken");
        };
        assert!(!close);
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/a?q=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "h");
        assert_eq!(req.headers().get_all("x-a").iter().count(), 2);
        assert!(matches!(req.body(), ClientBody::Whole(Some(b)) if b == "hello"));
        assert_eq!(
            &rest[..],
            b"GET /next",
            "the next request stays in the buffer"
        );

        let (p, rest) = parsed(b"GET http://api.example/x HTTP/1.1\r\nConnection: Close\r\n\r\n");
        let Parsed::Request(req, close) = p else {
            panic!("not taken");
        };
        assert!(close, "the client asked to close");
        assert_eq!(req.uri().host(), Some("api.example"), "absolute form");
        assert!(matches!(req.body(), ClientBody::Whole(None)));
        assert!(rest.is_empty());
    }

    #[test]
    fn waits_for_the_rest_of_a_head() {
        let (p, rest) = parsed(b"GET /a HTTP/1.1\r\nHost: h\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(
            &rest[..],
            b"GET /a HTTP/1.1\r\nHost: h\r\n",
            "nothing taken"
        );
    }

    #[test]
    fn hands_everything_else_to_hyper_untouched() {
        let big = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let cases: [&[u8]; 12] = [
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nonly part",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
            b"GET /a<b> HTTP/1.1\r\n\r\n",
            big.as_bytes(),
            many.as_bytes(),
        ];
        for case in cases {
            let (p, rest) = parsed(case);
            assert!(
                matches!(p, Parsed::Hyper),
                "{}",
                String::from_utf8_lossy(&case[..case.len().min(60)])
            );
            assert_eq!(&rest[..], case, "hyper gets every byte");
        }
    }

    #[test]
    fn frames_responses_as_hyper_does() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        let head = |framing, declared, close, headers: &HeaderMap| {
            String::from_utf8(encode_head(
                StatusCode::OK,
                headers,
                None,
                framing,
                declared,
                close,
            ))
            .unwrap()
        };
        let h = head(Framing::Length(12), false, false, &headers);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 12\r\ndate: "));
        assert!(h.ends_with(" GMT\r\n\r\n"), "{h}");
        let h = head(Framing::Chunked, false, true, &headers);
        assert!(h.contains("transfer-encoding: chunked\r\n"), "{h}");
        assert!(h.ends_with("connection: close\r\n\r\n"), "{h}");

        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("7"));
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        headers.insert(DATE, HeaderValue::from_static("then"));
        let h = head(Framing::Length(7), true, false, &headers);
        assert_eq!(
            h, "HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 7\r\ndate: then\r\n\r\n",
            "the declared length and date stay; the coding is this hop's"
        );
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("x"));
        let h = head(Framing::Chunked, false, false, &headers);
        assert!(
            !h.contains("content-length"),
            "a length that did not parse goes: {h}"
        );

        // An upstream's head goes on as it came, after the headers of the map.
        let wire = WireHead {
            lines: Bytes::from_static(b"Content-Type: a/b\r\nContent-Length: 3\r\n"),
            has_length: true,
            has_date: false,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-b", HeaderValue::from_static("2"));
        let h = String::from_utf8(encode_head(
            StatusCode::NOT_FOUND,
            &headers,
            Some(&wire),
            Framing::Length(3),
            true,
            false,
        ))
        .unwrap();
        assert!(
            h.starts_with(
                "HTTP/1.1 404 Not Found\r\nx-b: 2\r\nContent-Type: a/b\r\nContent-Length: 3\r\ndate: "
            ),
            "{h}"
        );
        assert_eq!(h.matches("ength").count(), 1, "{h}");
    }
}
