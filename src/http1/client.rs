//! tokengate's HTTP/1.1 client codec for plain-HTTP upstreams, for requests whose body the
//! proxy holds whole (no body, or one buffered for replay): the head and the body go out in one
//! vectored write, the response head is parsed with `httparse` (hyper's parser), and the
//! response body is read straight from the socket as the client's connection sends it on.
//!
//! Everything runs in the task serving the client, as in nginx: no connection task, no channels
//! between the request and its connection, one read for a small response. hyper's client
//! ([`crate::upstream::pool`] keeps it for request bodies that stream) pays for both on every request;
//! `docs/BENCHMARKS.md` has the measurements.
//!
//! Response framing follows RFC 9112 §6.3, as hyper's client does: no body for `HEAD`, 1xx, 204
//! and 304; `Transfer-Encoding` ending in `chunked` is decoded ([`super::chunked`]; trailers are
//! read and dropped), any other `Transfer-Encoding` and a missing length read until the upstream
//! closes; `Content-Length` values must agree. Informational responses (100, 103) are skipped;
//! 101 is refused, since tokengate never asks for an upgrade. A connection goes back to its
//! pool only after a complete HTTP/1.1 response without `Connection: close` and with nothing
//! read past its end.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, StatusCode, Version, request, response};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::chunked::{Advance, Chunk};
use super::fields::{
    BrokenLength, Field, Lengths, has_token, last_coding_is_chunked, names_headers,
};
use super::response::WireHead;
use super::{MAX_HEADER_BYTES, MAX_HEADERS};

/// The longest response head read, in bytes (as for requests).
pub const MAX_RESPONSE_HEAD: usize = MAX_HEADER_BYTES;
/// The most response headers read (as for requests).
pub const MAX_RESPONSE_HEADERS: usize = MAX_HEADERS;
/// The room made in a connection's buffer before its first read.
pub const READ_MIN: usize = 8 * 1024;
/// The most room made for one read: reads that fill the buffer double it up to this.
pub const READ_MAX: usize = 64 * 1024;
/// The most room a pooled connection keeps for the request heads it writes; a larger head's
/// room is given back once it is sent.
pub const HEAD_ROOM_KEPT: usize = 4 * 1024;

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the request or reading the response failed.
    #[error("upstream connection failed")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before its response ended.
    #[error("upstream closed the connection before the response ended")]
    Closed,
    /// The response is not HTTP/1.x as tokengate reads it.
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
    /// The response head did not arrive by the request's deadline.
    #[error("upstream did not answer in time")]
    Timeout,
}

/// A connection to an upstream, with the bytes read from it and not yet used.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// The room to make before the next read.
    read_size: usize,
    /// The request head being sent, in room kept from the last one (up to [`HEAD_ROOM_KEPT`]).
    head: Vec<u8>,
    /// When its owner last sent a request on it ([`Conn::mark_sent`]).
    sent_at: Option<Instant>,
    /// The deadline of the response head of the request in flight ([`exchange`]).
    due: Instant,
    /// Fires no later than `due`: made at the connection's first wait and moved only when it
    /// fires early, so a request costs no timer of its own (docs/BENCHMARKS.md).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    /// A fresh connection, boxed: it moves between its pool and the response bodies it feeds,
    /// which stay small that way.
    pub fn new(io: TcpStream) -> Box<Self> {
        Box::new(Self {
            io,
            buf: BytesMut::new(),
            read_size: READ_MIN,
            head: Vec::new(),
            sent_at: None,
            due: Instant::now(),
            timer: None,
        })
    }

    /// Notes that a request goes out on it `at` (its owner's clock reading, kept for the owner).
    pub fn mark_sent(&mut self, at: Instant) {
        self.sent_at = Some(at);
    }

    /// When a request last went out on it, as [`Conn::mark_sent`] noted.
    pub fn sent_at(&self) -> Option<Instant> {
        self.sent_at
    }

    /// Whether an idle connection can carry a request: the upstream has not closed it, and
    /// has sent nothing unasked. Costs no system call unless the socket turned readable.
    pub fn is_usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: EOF, stray bytes, or readiness left from the last response's read.
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at the upstream's EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == room {
            self.read_size = (self.read_size * 2).min(READ_MAX);
        }
        Poll::Ready(Ok(n))
    }

    /// Ready once the deadline of the request in flight has passed; until then the waker is
    /// woken by that time.
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let due = tokio::time::Instant::from_std(self.due);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() > due {
            timer.as_mut().reset(due);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if timer.deadline() >= due {
                return Poll::Ready(());
            }
            // Set for an earlier request: it moves to this one's deadline.
            timer.as_mut().reset(due);
        }
        Poll::Pending
    }

    /// `op` on this connection until it is ready, or [`Error::Timeout`] once the deadline of
    /// the request in flight has passed.
    async fn before_due<T>(
        &mut self,
        mut op: impl FnMut(&mut Self, &mut Context<'_>) -> Poll<T>,
    ) -> Result<T, Error> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = op(self, cx) {
                return Poll::Ready(Ok(out));
            }
            ready!(self.poll_due(cx));
            Poll::Ready(Err(Error::Timeout))
        })
        .await
    }
}

/// Where a connection goes when its response has been read to the end.
pub trait Home: Send + Sync {
    /// Takes back `conn`, fit for another request.
    fn put(&self, conn: Box<Conn>);
}

/// The request head in HTTP/1.1 wire form, origin-form target, with `Content-Length` for a
/// body of `body_len` bytes, written over `head`. `Content-Length` and `Transfer-Encoding` in
/// `parts` are replaced (the framing is this hop's own); hop-by-hop headers must already be
/// gone.
pub fn encode_head(parts: &request::Parts, body_len: usize, head: &mut Vec<u8>) {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let size = parts
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + target.len()
        + 64;
    head.clear();
    head.reserve(size);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let mut declared = false;
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            declared |= name == CONTENT_LENGTH;
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // An empty body keeps the `Content-Length: 0` the client declared; none is added to a GET.
    if body_len > 0 || declared {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// How far an exchange got before it failed: whether it may be sent again elsewhere.
#[derive(Debug)]
pub struct Failed {
    /// What went wrong.
    pub error: Error,
    /// No byte of the request reached the socket.
    pub unsent: bool,
    /// No byte of a response arrived.
    pub unanswered: bool,
}

/// Sends the request of `parts` with `body` on `conn` ([`encode_head`]) and reads the
/// response head, which has no body if the method is `HEAD`, by `due` ([`Error::Timeout`]).
pub async fn exchange(
    mut conn: Box<Conn>,
    parts: &request::Parts,
    body: &[u8],
    due: Instant,
    home: Arc<dyn Home>,
) -> Result<(response::Parts, Body), Failed> {
    let method = &parts.method;
    let failed = |error, unsent, unanswered| Failed {
        error,
        unsent,
        unanswered,
    };
    conn.due = due;
    let mut head = std::mem::take(&mut conn.head);
    encode_head(parts, body.len(), &mut head);
    let mut bufs = [IoSlice::new(&head), IoSlice::new(body)];
    let mut slices = &mut bufs[..if body.is_empty() { 1 } else { 2 }];
    let mut sent = 0;
    while !slices.is_empty() {
        let written = conn
            .before_due(|c, cx| Pin::new(&mut c.io).poll_write_vectored(cx, slices))
            .await;
        let error = match written {
            Ok(Ok(0)) => io::Error::from(io::ErrorKind::WriteZero).into(),
            Ok(Ok(n)) => {
                sent += n;
                IoSlice::advance_slices(&mut slices, n);
                continue;
            }
            Ok(Err(e)) => e.into(),
            // Not sent again elsewhere: that would double the wait.
            Err(timeout) => return Err(failed(timeout, false, false)),
        };
        return Err(failed(error, sent == 0, true));
    }
    if head.capacity() <= HEAD_ROOM_KEPT {
        conn.head = head;
    }
    let mut answered = false;
    loop {
        match parse_head(&mut conn.buf, method) {
            Ok(Some((parts, wire, framing, keep_alive))) => {
                return Ok((parts, Body::new(conn, wire, framing, keep_alive, home)));
            }
            Ok(None) if conn.buf.len() > MAX_RESPONSE_HEAD => {
                let error = Error::Malformed("response head too large");
                return Err(failed(error, false, false));
            }
            Ok(None) => {}
            Err(error) => return Err(failed(error, false, false)),
        }
        match conn.before_due(Conn::poll_fill).await {
            Ok(Ok(0)) => return Err(failed(Error::Closed, false, !answered)),
            Ok(Ok(_)) => answered = true,
            Ok(Err(e)) => return Err(failed(e.into(), false, !answered)),
            Err(timeout) => return Err(failed(timeout, false, false)),
        }
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// What the upstream client makes of a response head at the start of `head` (for the fuzz
/// target): `Ok(None)` while more bytes are needed; else the status, the bytes taken (1xx heads
/// included), and the header lines passed on.
#[doc(hidden)]
pub fn read_response_head(
    head: &[u8],
    method: &Method,
) -> Result<Option<(StatusCode, usize, Bytes)>, Error> {
    let mut buf = BytesMut::from(head);
    Ok(parse_head(&mut buf, method)?
        .map(|(parts, wire, _, _)| (parts.status, head.len() - buf.len(), wire.lines.into())))
}

/// Parses a complete response head at the start of `buf` (skipping informational responses),
/// taking it out of `buf`; `None` if more bytes are needed. Hop-by-hop headers and those
/// `Connection` names are left out.
fn parse_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<(response::Parts, WireHead, Framing, bool)>, Error> {
    loop {
        let mut slots =
            [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Malformed("too many headers"));
            }
            Err(_) => return Err(Error::Malformed("unparsable head")),
        };
        let status = res
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(Error::Malformed("status"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::Malformed("101 without an upgrade asked for"));
            }
            buf.advance(len); // 100 Continue, 103 Early Hints: the final response follows
            continue;
        }
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // What the head says about framing and connection, from the names that matter.
        let (mut chunked, mut other_coding) = (false, false);
        let (mut lengths, mut any_length) = (Lengths::default(), false);
        let (mut close, mut names_others, mut has_date) = (false, false, false);
        let mut fields = [Field::Other; MAX_RESPONSE_HEADERS];
        for (h, field) in res.headers.iter().zip(&mut fields) {
            *field = Field::of(h.name.as_bytes());
            match *field {
                Field::TransferEncoding => {
                    // Only the last coding decides; a later header's codings come after.
                    chunked = last_coding_is_chunked(h.value);
                    other_coding |= !chunked;
                }
                Field::ContentLength => {
                    lengths.add(h.value);
                    any_length = true;
                }
                Field::Connection => {
                    close |= has_token(h.value, b"close");
                    names_others |= names_headers(h.value);
                }
                Field::Date => has_date = true,
                Field::Host | Field::Expect | Field::HopByHop | Field::Other => {}
            }
        }
        let has_te = chunked || other_coding;
        // Differing lengths are refused whatever frames the body (a HEAD's or 304's length
        // still describes one); a coding overrides any length, which is then dropped.
        let length = match lengths.get() {
            Ok(length) => length,
            Err(BrokenLength) if has_te => None,
            Err(BrokenLength) => return Err(Error::Malformed("Content-Length")),
        };
        let framing = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Empty
        } else if has_te && version == Version::HTTP_10 {
            return Err(Error::Malformed("Transfer-Encoding in HTTP/1.0"));
        } else if chunked {
            Framing::Chunked
        } else if has_te {
            Framing::UntilClose
        } else {
            match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
        // The lines passed on: not hop-by-hop, not named by `Connection`, and no
        // `Content-Length` where a coding frames the body (RFC 9112 §6.3).
        let named: Vec<&[u8]> = if names_others {
            res.headers
                .iter()
                .zip(&fields)
                .filter(|(_, field)| **field == Field::Connection)
                .flat_map(|(h, _)| h.value.split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .collect()
        } else {
            Vec::new()
        };
        // Lines kept one after another in `buf`, each ending in CRLF, are copied as one run.
        let mut lines = Vec::with_capacity(len);
        let mut run = 0..0;
        let mut has_length = false;
        for (h, field) in res.headers.iter().zip(fields) {
            let name = h.name.as_bytes();
            let keep = match field {
                Field::TransferEncoding | Field::Connection | Field::HopByHop => false,
                Field::ContentLength if has_te => false,
                _ => !named.iter().any(|n| n.eq_ignore_ascii_case(name)),
            };
            if !keep {
                continue;
            }
            if field == Field::ContentLength {
                // One framing passed on: the first length line, and a list of equal values
                // (`5, 5`) or repeated lines collapsed to that one value (RFC 9110 §8.6).
                if has_length {
                    continue;
                }
                has_length = true;
                if let (Some(n), true) = (length, h.value.contains(&b',')) {
                    lines.extend_from_slice(&buf[run]);
                    run = 0..0;
                    lines.extend_from_slice(b"Content-Length: ");
                    lines.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                    lines.extend_from_slice(b"\r\n");
                    continue;
                }
            }
            // The line as it came, from its name to the end of its value.
            let start = name.as_ptr() as usize - buf.as_ptr() as usize;
            let end = h.value.as_ptr() as usize - buf.as_ptr() as usize + h.value.len();
            if start != run.end {
                lines.extend_from_slice(&buf[run]);
                run = start..start;
            }
            if buf.get(end..end + 2).is_some_and(|eol| eol == b"\r\n") {
                run.end = end + 2;
            } else {
                // A bare LF (httparse admits it) ends the run with a CRLF of our own.
                lines.extend_from_slice(&buf[run.start..end]);
                lines.extend_from_slice(b"\r\n");
                run = 0..0;
            }
        }
        lines.extend_from_slice(&buf[run]);
        let keep_alive = version == Version::HTTP_11
            && !close
            && framing != Framing::UntilClose
            && !(has_te && any_length);
        let wire = WireHead {
            lines,
            has_length: has_length && matches!(framing, Framing::Length(_) | Framing::Empty),
            has_date,
        };
        buf.advance(len);

        let mut parts = response::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        return Ok(Some((parts, wire, framing, keep_alive)));
    }
}

/// Where a response body stands.
#[derive(Debug)]
enum State {
    /// A body of known length: the bytes left.
    Length(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
    /// Ended (or failed): the connection has gone home or been closed.
    Done,
}

/// A response body read from the upstream connection as it is polled. Read to its end, it
/// gives the connection back to its [`Home`]; dropped before, it closes it.
pub struct Body {
    /// The response's head, until it is taken.
    wire: Option<WireHead>,
    conn: Option<Box<Conn>>,
    state: State,
    keep_alive: bool,
    home: Arc<dyn Home>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Body {
    fn new(
        conn: Box<Conn>,
        wire: WireHead,
        framing: Framing,
        keep_alive: bool,
        home: Arc<dyn Home>,
    ) -> Self {
        let state = match framing {
            Framing::Empty => State::Length(0),
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::default()),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = Self {
            wire: Some(wire),
            conn: Some(conn),
            state,
            keep_alive,
            home,
        };
        if matches!(body.state, State::Length(0)) {
            body.finish();
        }
        body
    }

    /// Takes the response's head ([`WireHead`]); `None` once taken.
    pub fn take_wire_head(&mut self) -> Option<WireHead> {
        self.wire.take()
    }

    /// The body has ended: the connection goes home if it is fit for another request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.home.put(conn);
        }
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if !conn.buf.is_empty() {
                let data = match &mut this.state {
                    State::Length(left) => {
                        let n = conn
                            .buf
                            .len()
                            .min(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= n as u64;
                        let data = conn.buf.split_to(n).freeze();
                        if *left == 0 {
                            this.finish();
                        }
                        data
                    }
                    State::UntilClose => conn.buf.split().freeze(),
                    State::Chunked(chunk) => match chunk.advance(&conn.buf) {
                        Advance::Framing(n) => {
                            conn.buf.advance(n);
                            continue;
                        }
                        Advance::Data(n) => conn.buf.split_to(n).freeze(),
                        Advance::Done(n) => {
                            conn.buf.advance(n);
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Advance::Malformed => return this.fail(Error::Malformed("chunked body")),
                    },
                    State::Done => return Poll::Ready(None),
                };
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Closed),
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) => SizeHint::with_exact(left),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;

    fn head(method: Method, headers: &[(&'static str, &'static str)], body_len: usize) -> String {
        let mut req = http::Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = "http://up:8080/a/b?c=d".parse().unwrap();
        for (name, value) in headers {
            req.headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        let mut out = b"left from the last head".to_vec();
        encode_head(&req.into_parts().0, body_len, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_head_frames_the_body_it_is_sent_with() {
        assert_eq!(
            head(
                Method::GET,
                &[("host", "up:8080"), ("authorization", "Bearer t")],
                0
            ),
            "GET /a/b?c=d HTTP/1.1\r\nhost: up:8080\r\nauthorization: Bearer t\r\n\r\n"
        );
        // The client's length is replaced by the body's own; an empty body keeps a declared 0.
        assert_eq!(
            head(Method::POST, &[("content-length", "999"), ("x", "1")], 5),
            "POST /a/b?c=d HTTP/1.1\r\nx: 1\r\ncontent-length: 5\r\n\r\n"
        );
        assert_eq!(
            head(Method::POST, &[("content-length", "0")], 0),
            "POST /a/b?c=d HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn the_response_head_passes_on_as_its_kept_lines() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nA: 1\r\nA:  2\r\nConnection: x-gone\r\nKeep-Alive: 5\r\nB: 3\nX-Gone: 4\r\nDate: d\r\nContent-Length: 2\r\n\r\nhi"[..],
        );
        let (parts, wire, framing, keep_alive) =
            parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!(
            (parts.status, framing, keep_alive),
            (StatusCode::OK, Framing::Length(2), true)
        );
        assert!(parts.headers.is_empty(), "no map is built");
        assert_eq!(
            &wire.lines[..],
            b"A: 1\r\nA:  2\r\nB: 3\r\nDate: d\r\nContent-Length: 2\r\n",
            "hop-by-hop and Connection-named lines go, the rest as they came (a bare LF mended)"
        );
        assert!(wire.has_length && wire.has_date);
        assert_eq!(&buf[..], b"hi", "the body stays");
        let mut headers = HeaderMap::new();
        wire.append_to(&mut headers);
        let a: Vec<_> = headers.get_all("a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(headers["date"], "d");
        assert_eq!(headers.len(), 5);

        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        );
        let (_, wire, framing, keep_alive) = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
        assert_eq!((framing, keep_alive), (Framing::Chunked, false));
        assert!(
            wire.lines.is_empty() && !wire.has_length,
            "the coding frames the body"
        );
    }

    #[test]
    fn a_response_passes_on_one_content_length() {
        for (head, want) in [
            (
                &b"Content-Length: 2\r\nX: 1\r\nContent-Length: 2\r\n"[..],
                &b"Content-Length: 2\r\nX: 1\r\n"[..],
            ),
            (
                b"content-length: 2, 2\r\nX: 1\r\n",
                b"Content-Length: 2\r\nX: 1\r\n",
            ),
            (
                b"X: 0\r\ncontent-length: 2,2\r\nContent-Length: 2\r\nY: 1\r\n",
                b"X: 0\r\nContent-Length: 2\r\nY: 1\r\n",
            ),
        ] {
            let mut buf =
                BytesMut::from(&[&b"HTTP/1.1 200 OK\r\n"[..], head, b"\r\nhi"].concat()[..]);
            let (_, wire, framing, _) = parse_head(&mut buf, &Method::GET).unwrap().unwrap();
            assert_eq!(framing, Framing::Length(2));
            assert_eq!(&wire.lines[..], want, "{:?}", String::from_utf8_lossy(head));
        }
        for method in [Method::GET, Method::HEAD] {
            let mut buf = BytesMut::from(
                &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            );
            assert!(
                parse_head(&mut buf, &method).is_err(),
                "{method}: differing lengths"
            );
        }
    }
}
