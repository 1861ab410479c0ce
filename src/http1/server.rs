//! The server side: every request of an HTTP/1 client connection, from its first byte to its
//! close, generic over the connection's IO (plain TCP or TLS).
//!
//! A connection's bytes are read here and nowhere else. Heads are read by [`super::request`];
//! a body that arrived whole with its head goes to the stack as bytes; any other body streams
//! from the connection as the stack reads it ([`super::request_body`]), `100 Continue` sent
//! when it is first read if the client asked for one. The response is written once the stack
//! answers ([`super::response`]), head and first bytes in one vectored write. A CONNECT
//! answered 2xx hands the connection to the tunnel for good ([`super::upgrade`]). A head that
//! is refused is answered (400 or 431) and the connection closed; so is a body that broke off
//! or was not read to its end.
//!
//! Between requests a connection holds no buffer (it "hibernates"; [`Http1::hibernating`]
//! counts them) and waits for its next bytes, at most `header_read_timeout` for a complete head.
//! One timer per connection enforces that: it is moved only when it fires early (the connection
//! was answered since), so a busy connection does not touch it per request and an idle one is
//! not woken until its time is up. Each write may wait at most the write timeout for a client
//! that does not read.

use std::convert::Infallible;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::CONNECTION;
use http::{Extensions, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::READ_SIZE;
use super::fields::{content_length, has_token};
use super::request::{self, BodyFraming, Head, Names, Refusal};
use super::request_body::{RequestBody, Returned, Source, Streaming};
use super::response::{After, CarriesHead, Framing, encode_head};
use super::upgrade::{OnUpgrade, Rewound};

/// The most buffers gathered for one vectored write.
pub const MAX_SLICES: usize = 16;
/// The most response bytes gathered before they are written.
pub const MAX_GATHERED: usize = 256 * 1024;
/// After the last answer on a connection whose client may still be sending, how long its
/// bytes are read and dropped before the close, so that the close does not reset the answer
/// away before the client has read it.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// The most bytes read and dropped that way.
pub const LINGER_BYTES: usize = 256 * 1024;
/// The most bytes one read takes while lingering.
const LINGER_READ: usize = 4096;
/// The most room a connection keeps for the response heads it writes; a larger head's room is
/// given back once it is sent.
pub const HEAD_ROOM_KEPT: usize = 4 * 1024;

/// The interim answer to a client that waits before it sends its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How a listener serves HTTP/1.
#[derive(Debug)]
pub struct Http1 {
    /// How long a client may take to send a complete head, counted from its connection or its
    /// last answer (`server.header_read_timeout`).
    pub header_read_timeout: Duration,
    /// How long one write may wait for the client to take bytes (`server.body_idle_timeout`).
    pub write_timeout: Duration,
    /// The listener's connections waiting between requests, holding no buffer.
    pub hibernating: Gauge,
}

/// Serves the HTTP/1 client `io`, whose first bytes (already read) are `read`, until it closes,
/// fails, idles past `header_read_timeout`, or `stop` flips (a request in flight finishes
/// first). Each request gets from `tag` what it carries from its connection, and its body as
/// the service's body type `RB`. `refuse` answers the heads that are refused.
pub async fn serve<IO, S, RB, B>(
    http: &Http1,
    io: IO,
    read: BytesMut,
    mut service: S,
    tag: impl Fn(&mut Extensions),
    refuse: impl Fn(Refusal) -> Response<B>,
    stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
    S: Service<Request<RB>, Response = Response<B>, Error = Infallible>,
    RB: From<RequestBody>,
    B: Body<Data = Bytes> + CarriesHead,
    B::Error: std::fmt::Display,
{
    let mut stopping = stop.clone();
    let mut conn = Conn {
        io,
        buf: read,
        names: Names::default(),
        writer: Writer {
            head: Vec::new(),
            gathered: Vec::new(),
            timeout: http.write_timeout,
        },
        deadline: Box::pin(tokio::time::sleep(http.header_read_timeout)),
        waiting_since: Instant::now(),
        stopping: Box::pin(async move {
            let _ = stopping.wait_for(|stopped| *stopped).await;
        }),
        stop,
        waits_seen: None,
    };
    loop {
        // The head is read here, where it is used: it is not moved through a wait's result.
        let head = loop {
            if !conn.buf.is_empty() {
                match request::parse(&mut conn.buf, &mut conn.names) {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(refusal) => {
                        tracing::debug!(%refusal, "request head refused");
                        let response = refuse(refusal);
                        conn.writer
                            .respond(&mut conn.io, response, Exchange::plain(After::Close))
                            .await?;
                        return linger(conn.io).await;
                    }
                }
            }
            if !conn.read_more(http).await? {
                return Ok(());
            }
        };
        let Head {
            mut request,
            framing,
            keep_alive,
            expects_continue,
        } = head;
        // Read only once it has changed: a read takes the channel's lock.
        let stopping = conn.stop.has_changed().unwrap_or(true) && *conn.stop.borrow();
        let after = if !keep_alive || stopping {
            After::Close
        } else if request.version() == Version::HTTP_10 {
            After::KeepAlive10
        } else {
            After::KeepAlive
        };
        let exchange = Exchange {
            head_only: request.method() == Method::HEAD,
            connect: request.method() == Method::CONNECT,
            http10: request.version() == Version::HTTP_10,
            after,
        };
        tag(request.extensions_mut());
        let upgrade = exchange.connect.then(|| {
            let (sender, receiver) = oneshot::channel();
            request.extensions_mut().insert(OnUpgrade::new(receiver));
            sender
        });
        let length = match framing {
            BodyFraming::Empty => Some(0),
            BodyFraming::Length(n) if n <= conn.buf.len() as u64 => Some(n),
            BodyFraming::Length(_) | BodyFraming::Chunked => None,
        };
        if let Some(length) = length {
            // Whole: the connection stays as it is.
            let body = (length > 0).then(|| conn.buf.split_to(length as usize).freeze());
            let request = request.map(|()| RequestBody::Whole(body).into());
            // The connection's own copy of the service: its requests come one at a time.
            let Ok(()) = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
            // Pinned where it was made and polled there: `.await` on the call would copy the
            // whole future again on its way in.
            let mut answer = pin!(service.call(request));
            let Ok(response) = std::future::poll_fn(|cx| answer.as_mut().poll(cx)).await;
            let upgrading = exchange.connect && response.status().is_success();
            let kept = conn
                .writer
                .respond(&mut conn.io, response, exchange)
                .await?;
            if upgrading && let Some(upgrade) = upgrade {
                let _ = upgrade.send(Rewound::new(Box::new(conn.io), conn.buf));
                return Ok(());
            }
            if !kept {
                return linger(conn.io).await;
            }
        } else {
            // Streaming: the body reads the connection's read half while the stack holds it.
            let (read, mut write) = tokio::io::split(conn.io);
            let (back, mut returned) = oneshot::channel();
            let (wanted, continue_wanted) = if expects_continue && conn.buf.is_empty() {
                let (wanted, continue_wanted) = oneshot::channel();
                (Some(wanted), Some(continue_wanted))
            } else {
                (None, None)
            };
            let source = Source {
                read: Box::new(read),
                buf: std::mem::take(&mut conn.buf),
            };
            let length = match framing {
                BodyFraming::Length(n) => Some(n),
                _ => None,
            };
            let body = Streaming::new(source, length, back, wanted);
            let request = request.map(|()| RequestBody::Streaming(Box::new(body)).into());
            let Ok(()) = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
            let answer = service.call(request);
            let Ok(response) = match continue_wanted {
                None => answer.await,
                Some(continue_wanted) => {
                    let mut answer = pin!(answer);
                    tokio::select! {
                        answered = &mut answer => answered,
                        Ok(()) = continue_wanted => {
                            conn.writer.gathered.push(Bytes::from_static(CONTINUE));
                            conn.writer.flush(&mut write).await?;
                            answer.await
                        }
                    }
                }
            };
            // The read half comes back once the body was read to its end (or dropped). Unless
            // it came back whole, the connection ends after this answer, and says so: a body
            // still out is still being read, and one that broke off leaves no next request.
            let returned = returned.try_recv();
            let mut exchange = exchange;
            if !matches!(returned, Ok(Returned { finished: true, .. })) {
                exchange.after = After::Close;
            }
            let kept = conn.writer.respond(&mut write, response, exchange).await?;
            let Ok(Returned { source, .. }) = returned else {
                return Ok(());
            };
            let Ok(read) = source.read.into_any().downcast::<tokio::io::ReadHalf<IO>>() else {
                return Ok(());
            };
            if !read.is_pair_of(&write) {
                return Ok(());
            }
            conn.io = read.unsplit(write);
            conn.buf = source.buf;
            if !kept {
                return linger(conn.io).await;
            }
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

/// A client connection between requests.
struct Conn<IO> {
    io: IO,
    /// Bytes read and not yet used; no allocation while there are none.
    buf: BytesMut,
    /// The client's last header names.
    names: Names,
    writer: Writer,
    /// Fires no later than `header_read_timeout` after `waiting_since`; moved to that instant
    /// when it fires early (one timer per connection, untouched per request).
    deadline: Pin<Box<Sleep>>,
    /// When the wait for the next head began: the last answer, or the connection's start.
    waiting_since: Instant,
    /// Ready once the listener stops; made once, polled by a wait only when `stop` has changed
    /// or the waker it saw may not wake this task.
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The listener's stop signal, as `stopping` watches it.
    stop: watch::Receiver<bool>,
    /// The waker `deadline` and `stopping` were last polled with, if they have been since the
    /// deadline last moved.
    waits_seen: Option<Waker>,
}

impl<IO: AsyncRead + Unpin> Conn<IO> {
    /// Reads more of the next request head: `false` once the client closes, idles past
    /// `header_read_timeout` since the last answer, or the listener stops.
    async fn read_more(&mut self, http: &Http1) -> io::Result<bool> {
        loop {
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
                stop,
                waits_seen,
                ..
            } = self;
            let mut read = pin!(fill(io, buf));
            let woke = std::future::poll_fn(|cx| {
                if let Poll::Ready(read) = read.as_mut().poll(cx) {
                    return Poll::Ready(Woke::Read(read));
                }
                // The deadline and the stop signal wake the waker they were last polled with
                // (the `Future` contract). While that one wakes this task too, each is polled
                // again only once it may be ready: every poll registers the waker anew, in
                // atomic operations on the timer and the channel (docs/BENCHMARKS.md).
                let seen = waits_seen.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
                if (!seen || deadline.is_elapsed()) && deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::Deadline);
                }
                if (!seen || stop.has_changed().unwrap_or(true))
                    && stopping.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Woke::Stop);
                }
                if !seen {
                    *waits_seen = Some(cx.waker().clone());
                }
                Poll::Pending
            })
            .await;
            if hibernating {
                http.hibernating.dec();
            }
            match woke {
                Woke::Read(Ok(0)) | Woke::Stop => return Ok(false),
                Woke::Read(Ok(_)) => return Ok(true),
                Woke::Read(Err(error)) => return Err(error),
                Woke::Deadline => {
                    let due = self.waiting_since + http.header_read_timeout;
                    if Instant::now() >= due {
                        tracing::debug!("no request head within header_read_timeout; closing");
                        return Ok(false);
                    }
                    self.deadline.as_mut().reset(due); // answered since it was set
                    self.waits_seen = None; // polled again: reset does not promise to keep the waker
                }
            }
        }
    }
}

/// What shapes one response on the wire, besides its own head.
#[derive(Debug, Clone, Copy)]
struct Exchange {
    /// The request was `HEAD`: no body.
    head_only: bool,
    /// The request was CONNECT: a 2xx answer has no body and no framing.
    connect: bool,
    /// The client speaks HTTP/1.0: no chunked coding.
    http10: bool,
    /// What the connection does next, unless the response closes it.
    after: After,
}

impl Exchange {
    /// A response to a request that was not read (a refused head).
    fn plain(after: After) -> Self {
        Self {
            head_only: false,
            connect: false,
            http10: false,
            after,
        }
    }
}

/// Writes responses to a client: gathered, then written vectored.
struct Writer {
    /// The response head the next vectored write sends first, in room kept from the last one
    /// (up to [`HEAD_ROOM_KEPT`]).
    head: Vec<u8>,
    /// What the next vectored write sends after the head.
    gathered: Vec<Bytes>,
    /// How long one write may wait for the client to take bytes.
    timeout: Duration,
}

impl Writer {
    /// Writes `response` to `io` as `exchange` shapes it; whether the connection stays open.
    async fn respond<W, B>(
        &mut self,
        io: &mut W,
        response: Response<B>,
        exchange: Exchange,
    ) -> io::Result<bool>
    where
        W: AsyncWrite + Unpin,
        B: Body<Data = Bytes> + CarriesHead,
        B::Error: std::fmt::Display,
    {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let wire = body.take_wire_head();
        let mut after = exchange.after;
        if parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"))
        {
            after = After::Close;
        }
        // The length the head declares: the upstream's (its wire head's, which frames the body
        // as read), or one in the headers.
        let declared = match &wire {
            Some(wire) if wire.has_length => body.size_hint().exact(),
            _ => parts
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| content_length(v.as_bytes())),
        };
        let framing = if exchange.head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || (exchange.connect && status.is_success())
        {
            Framing::None
        } else if let Some(n) = declared.or(body.size_hint().exact()) {
            Framing::Length(n)
        } else if exchange.http10 {
            after = After::Close;
            Framing::UntilClose
        } else {
            Framing::Chunked
        };
        let declared = declared.is_some() && !(exchange.connect && status.is_success());
        encode_head(
            &mut self.head,
            exchange.http10,
            status,
            &parts.headers,
            wire.as_ref(),
            framing,
            declared,
            after,
        );
        let kept = after != After::Close;
        if framing == Framing::None {
            self.flush(io).await?;
            return Ok(kept);
        }
        let mut body = pin!(body);
        let mut sent = 0u64;
        let mut gathered = 0;
        loop {
            // What the body has ready joins the head; the socket is written once it has no more.
            let frame =
                match std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        self.flush(io).await?;
                        gathered = 0;
                        std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
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
                    self.flush(io).await?;
                    return Ok(false);
                }
            };
            sent += data.len() as u64;
            gathered += data.len();
            match framing {
                Framing::Length(n) if sent > n => {
                    tracing::debug!(declared = n, "response body longer than declared; closing");
                    self.flush(io).await?;
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
                self.flush(io).await?;
                gathered = 0;
            }
        }
        match framing {
            Framing::Length(n) if sent < n => {
                tracing::debug!(declared = n, sent, "response body ended short; closing");
                self.flush(io).await?;
                return Ok(false);
            }
            Framing::Chunked => self.gathered.push(Bytes::from_static(b"0\r\n\r\n")),
            _ => {}
        }
        self.flush(io).await?;
        Ok(kept)
    }

    /// Writes the head and everything gathered to `io`, vectored, and empties both. Each write
    /// may wait at most the write timeout for the client to take bytes (a timer is armed only
    /// when the socket is full); a client that stops reading is cut off.
    async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> io::Result<()> {
        let Self { head, gathered, .. } = self;
        let mut head_sent = 0;
        let mut first = 0;
        while head_sent < head.len() || first < gathered.len() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let head_left = (head_sent < head.len()) as usize;
            slices[0] = IoSlice::new(&head[head_sent..]);
            let count = (head_left + gathered.len() - first).min(MAX_SLICES);
            for (slice, bytes) in slices[head_left..count].iter_mut().zip(&gathered[first..]) {
                *slice = IoSlice::new(bytes);
            }
            let mut write = pin!(io.write_vectored(&slices[..count]));
            let mut n = match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
            {
                Poll::Ready(written) => written?,
                Poll::Pending => {
                    tokio::time::timeout(self.timeout, write)
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")
                        })??
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let from_head = n.min(head.len() - head_sent);
            head_sent += from_head;
            n -= from_head;
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
        if head.capacity() > HEAD_ROOM_KEPT {
            *head = Vec::new();
        }
        head.clear();
        gathered.clear();
        Ok(())
    }
}

/// Closes a connection whose client may still be sending: FIN first, then its bytes read and
/// dropped for at most [`LINGER_TIME`] and [`LINGER_BYTES`], so that the close does not reset
/// the answer away before the client has read it.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) -> io::Result<()> {
    io.shutdown().await?;
    let drain = async {
        // On the heap: an array here would sit in every connection's future, idle or not.
        let mut sink = vec![0u8; LINGER_READ];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    Ok(())
}

/// Reads the client's next bytes into `buf`, making room (and a buffer) only once they are
/// there; `Ok(0)` when it closed.
async fn fill<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> io::Result<usize> {
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
    std::future::poll_fn(|cx: &mut Context<'_>| {
        tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)
    })
    .await
}

/// The server side on scripted IO: each case gives the bytes a client sends, in the reads it
/// sends them in, and the bytes it must get back, in order; the script fails on any other
/// write, and on a read or write it did not expect.
#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use http_body_util::combinators::BoxBody;
    use tokio_test::io::{Builder, Mock};

    use super::*;

    type TestBody = BoxBody<Bytes, Infallible>;

    /// A response with a fixed `Date`, so that the bytes written are known.
    fn answer(status: u16, body: &str) -> Response<TestBody> {
        let mut response =
            Response::new(http_body_util::Full::new(Bytes::from(body.to_owned())).boxed());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
            .headers_mut()
            .insert(http::header::DATE, http::HeaderValue::from_static("x"));
        response
    }

    /// The bytes of [`answer`] as written, `close` adding `Connection: close`.
    fn wire(status: &str, body: &str, close: bool) -> String {
        let close = if close { "connection: close\r\n" } else { "" };
        format!(
            "HTTP/1.1 {status}\r\ndate: x\r\ncontent-length: {}\r\n{close}\r\n{body}",
            body.len()
        )
    }

    /// Serves `io` with a service that reads each body whole and answers 200 `ok` (400 `bad`
    /// if the body broke off); returns what it saw: method, target and body of each request.
    async fn serve_script(io: Mock) -> Vec<String> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: Request<RequestBody>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let Ok(body) = body.collect().await else {
                    return Ok::<_, Infallible>(answer(400, "bad"));
                };
                let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                log.lock()
                    .unwrap()
                    .push(format!("{} {} {body}", parts.method, parts.uri));
                Ok(answer(200, "ok"))
            }
        });
        let refuse = |refusal: Refusal| {
            let status = match refusal {
                Refusal::HeadTooLarge | Refusal::TooManyHeaders => 431,
                _ => 400,
            };
            answer(status, "refused")
        };
        let http = Http1 {
            header_read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
            hibernating: Gauge::default(),
        };
        let (_stop, stopped) = watch::channel(false);
        serve(&http, io, BytesMut::new(), service, |_| {}, refuse, stopped)
            .await
            .unwrap();
        seen.lock().unwrap().clone()
    }

    /// Every way of splitting `bytes` in two reads.
    fn splits(bytes: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
        (1..bytes.len()).map(move |at| bytes.split_at(at))
    }

    const GET: &[u8] = b"GET /a?b=c HTTP/1.1\r\nHost: h\r\n\r\n";

    #[tokio::test]
    async fn a_head_split_anywhere_is_read_as_one() {
        for (first, second) in splits(GET) {
            let io = Builder::new()
                .read(first)
                .read(second)
                .write(wire("200 OK", "ok", false).as_bytes())
                .build();
            assert_eq!(serve_script(io).await, ["GET /a?b=c "]);
        }
    }

    #[tokio::test]
    async fn an_answer_the_client_takes_in_pieces_goes_out_whole_and_in_order() {
        let answer = wire("200 OK", "ok", false);
        for (first, second) in splits(answer.as_bytes()) {
            let io = Builder::new()
                .read(GET)
                .write(first)
                .write(second)
                .read(GET)
                .write(answer.as_bytes())
                .build();
            assert_eq!(serve_script(io).await, ["GET /a?b=c ", "GET /a?b=c "]);
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let two = [
            GET,
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
        ]
        .concat();
        let ok = wire("200 OK", "ok", false);
        let io = Builder::new()
            .read(&two)
            .write(ok.as_bytes())
            .write(ok.as_bytes())
            .build();
        assert_eq!(serve_script(io).await, ["GET /a?b=c ", "POST /p hi"]);
    }

    #[tokio::test]
    async fn a_body_split_anywhere_streams_whole_and_the_next_request_follows() {
        let ok = wire("200 OK", "ok", false);
        for request in [
            &b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"[..],
            b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n",
        ] {
            for (first, second) in splits(request) {
                let io = Builder::new()
                    .read(first)
                    .read(&[second, GET].concat())
                    .write(ok.as_bytes())
                    .write(ok.as_bytes())
                    .build();
                assert_eq!(
                    serve_script(io).await,
                    ["POST /p hello world", "GET /a?b=c "],
                    "{:?} | {:?}",
                    String::from_utf8_lossy(first),
                    String::from_utf8_lossy(second)
                );
            }
        }
    }

    #[tokio::test]
    async fn a_client_that_expects_100_continue_gets_it_when_its_body_is_read() {
        let io = Builder::new()
            .read(
                b"PUT /u HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            )
            .write(CONTINUE)
            .read(b"hi")
            .write(wire("200 OK", "ok", false).as_bytes())
            .build();
        assert_eq!(serve_script(io).await, ["PUT /u hi"]);
    }

    #[tokio::test]
    async fn broken_framing_is_refused_and_the_connection_closed() {
        let refused = |status| wire(status, "refused", true);
        for (request, status) in [
            (&b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "400 Bad Request"),
            (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "400 Bad Request"),
            (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "400 Bad Request"),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "400 Bad Request"),
            (b"GET / HTTP/1.1\r\n\r\n", "400 Bad Request"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400 Bad Request"),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "400 Bad Request"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n folded\r\n\r\n", "400 Bad Request"),
        ] {
            // What follows the refused head is never read as a request.
            let io = Builder::new()
                .read(&[request, GET].concat())
                .write(refused(status).as_bytes())
                .build();
            assert_eq!(
                serve_script(io).await,
                Vec::<String>::new(),
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: h\r\nX: {}\r\n\r\n",
            "a".repeat(super::super::MAX_HEADER_BYTES)
        );
        let io = Builder::new()
            .read(big.as_bytes())
            .write(refused("431 Request Header Fields Too Large").as_bytes())
            .build();
        assert!(serve_script(io).await.is_empty());
    }

    #[tokio::test]
    async fn a_malformed_chunk_size_ends_the_body_and_the_connection() {
        let io = Builder::new()
            .read(b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n")
            .read(GET)
            .write(wire("400 Bad Request", "bad", true).as_bytes())
            .build();
        assert!(serve_script(io).await.is_empty(), "no request got through");
    }

    #[tokio::test]
    async fn http_1_0_clients_close_unless_they_ask_to_keep_alive() {
        let io = Builder::new()
            .read(b"GET /old HTTP/1.0\r\n\r\n")
            .write(
                "HTTP/1.0 200 OK\r\ndate: x\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    .as_bytes(),
            )
            .build();
        assert_eq!(serve_script(io).await, ["GET /old "]);
        let io = Builder::new()
            .read(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .write(
                "HTTP/1.0 200 OK\r\ndate: x\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok"
                    .as_bytes(),
            )
            .read(GET)
            .write(wire("200 OK", "ok", false).as_bytes())
            .build();
        assert_eq!(serve_script(io).await, ["GET /old ", "GET /a?b=c "]);
    }
}
