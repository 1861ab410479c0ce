//! The framing watch: a request carrying both `Content-Length` and `Transfer-Encoding` is
//! refused with 400, as nginx and Envoy refuse it, and a head over [`MAX_HEADER_BYTES`] with
//! 431 (hyper's own limit is its read buffer, which a head that arrives in one read can pass).
//!
//! hyper follows RFC 9112 §6.3 for such a request: it reads the body as chunked, drops
//! `Content-Length` and closes the connection after answering. Nothing is smuggled, but the
//! service never learns the request was ambiguous. So [`Watched`] reads the bytes hyper reads,
//! finds each request head with the parser hyper uses (`httparse`), follows the body's framing
//! to the next head, and notes which head conflicted (or was too long) in the connection's
//! [`Verdicts`]. [`Verdicts::next`] counts the requests hyper hands over and gives that one its
//! [`Refusal`] (the accept loop puts it in the request's [`crate::ctx::Ctx`]), which
//! [`crate::hop::check_framing`] refuses.
//!
//! Where the watch cannot follow (HTTP/2, CONNECT, too many headers, malformed framing, which
//! hyper refuses and closes on), it stops watching and hyper's own handling stands.
//! It keeps no buffer unless a head arrives split across reads.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use crate::chunked::{Advance, Chunk};
use crate::observe::{Observed, Observer};
use crate::server::{MAX_HEADER_BYTES, MAX_HEADERS};

/// Marks a request the watch refuses. After one, the watch stops and the connection closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The head carried both `Content-Length` and `Transfer-Encoding`.
    ConflictingFraming = 1,
    /// The head was longer than [`MAX_HEADER_BYTES`].
    OversizedHead = 2,
}

/// What the watch over one connection found, shared with that connection's service.
#[derive(Debug)]
pub struct Verdicts {
    /// The index of the refused request head, or `u64::MAX`.
    refused_at: AtomicU64,
    /// Why it was refused, as a [`Refusal`]; written before `refused_at`.
    refusal: AtomicU8,
    /// Requests handed over by hyper so far.
    served: AtomicU64,
}

impl Default for Verdicts {
    fn default() -> Self {
        Self {
            refused_at: AtomicU64::new(u64::MAX),
            refusal: AtomicU8::new(0),
            served: AtomicU64::new(0),
        }
    }
}

impl Verdicts {
    /// Counts one request handed over by hyper, and says why its head was refused, if it was.
    /// Call it exactly once per request, in arrival order (hyper serves HTTP/1 requests in
    /// order).
    pub fn next(&self) -> Option<Refusal> {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        (index == self.refused_at.load(Ordering::Acquire)).then(|| {
            match self.refusal.load(Ordering::Relaxed) {
                1 => Refusal::ConflictingFraming,
                _ => Refusal::OversizedHead,
            }
        })
    }

    fn refuse(&self, index: u64, refusal: Refusal) {
        self.refusal.store(refusal as u8, Ordering::Relaxed);
        self.refused_at.store(index, Ordering::Release);
    }

    /// Requests handed over by hyper so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// A client connection's byte stream, with its request framing watched.
pub type Watched<IO> = Observed<IO, Watch>;

/// Watches `io`, reporting to `verdicts`.
pub fn watched<IO>(io: IO, verdicts: Arc<Verdicts>) -> Watched<IO> {
    Observed::new(io, Watch::new(verdicts))
}

impl Observer for Watch {
    fn read(&mut self, bytes: &[u8]) {
        self.feed(bytes);
    }
}

/// Follows the HTTP/1 request stream of one connection.
pub struct Watch {
    state: State,
    /// Request heads parsed so far.
    heads: u64,
    verdicts: Arc<Verdicts>,
}

enum State {
    /// Reading a request head: the part that arrived in earlier reads.
    Head(Vec<u8>),
    /// Inside a body of known length: the bytes left.
    Fixed(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not following (see the module docs).
    Off,
}

/// What a request head says about the bytes after it.
#[derive(Debug, PartialEq)]
enum Framing {
    NoBody,
    Fixed(u64),
    Chunked,
    Conflict,
    TooLarge,
    Stop,
}

impl Watch {
    /// A watch over a new connection, reporting to `verdicts`.
    pub fn new(verdicts: Arc<Verdicts>) -> Self {
        Self {
            state: State::Head(Vec::new()),
            heads: 0,
            verdicts,
        }
    }

    /// Request heads read so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// Whether the stream stands between messages: every request read so far is complete,
    /// body included, and no byte of the next one has arrived.
    pub fn between_requests(&self) -> bool {
        matches!(&self.state, State::Head(buf) if buf.is_empty())
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let used = match &mut self.state {
                State::Off => return,
                State::Fixed(left) => {
                    let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Head(Vec::new());
                    }
                    n
                }
                State::Chunked(chunk) => match chunk.advance(data) {
                    Advance::Framing(n) | Advance::Data(n) => n,
                    Advance::Done(n) => {
                        self.state = State::Head(Vec::new());
                        n
                    }
                    Advance::Malformed => {
                        self.state = State::Off;
                        return;
                    }
                },
                State::Head(buf) => {
                    let (used, framing) = read_head(buf, data);
                    if let Some(framing) = framing {
                        self.head_done(framing);
                    }
                    used
                }
            };
            data = &data[used..];
        }
    }

    fn head_done(&mut self, framing: Framing) {
        let index = self.heads;
        self.heads += 1;
        self.state = match framing {
            Framing::NoBody => State::Head(Vec::new()),
            Framing::Fixed(n) => State::Fixed(n),
            Framing::Chunked => State::Chunked(Chunk::default()),
            Framing::Conflict => {
                // hyper closes the connection after this request, so nothing follows it.
                self.verdicts.refuse(index, Refusal::ConflictingFraming);
                State::Off
            }
            Framing::TooLarge => {
                // Refused, and the connection closed after the answer.
                self.verdicts.refuse(index, Refusal::OversizedHead);
                State::Off
            }
            Framing::Stop => State::Off,
        };
    }
}

/// Reads head bytes from `data`, after the `buf`fered part; returns the bytes used and, once
/// the head is complete, its framing.
fn read_head(buf: &mut Vec<u8>, data: &[u8]) -> (usize, Option<Framing>) {
    if buf.is_empty() {
        // Empty lines before a request line are skipped, as httparse skips them.
        let blank = data
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            return (blank, None);
        }
        // The usual case: the whole head in one read, parsed once, where it lies.
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        if let Ok(httparse::Status::Complete(end)) =
            req.parse_with_uninit_headers(data, &mut headers)
        {
            let framing = match end {
                ..=MAX_HEADER_BYTES => framing_from(&req),
                _ => Framing::TooLarge,
            };
            return (end, Some(framing));
        }
    }
    let old = buf.len();
    let take = data.len().min((MAX_HEADER_BYTES + 1).saturating_sub(old));
    buf.extend_from_slice(&data[..take]);
    match head_end(buf, old.saturating_sub(2)) {
        Some(end) => (end - old, Some(framing_of(&buf[..end]))),
        None if buf.len() > MAX_HEADER_BYTES => (take, Some(Framing::TooLarge)),
        None => (take, None),
    }
}

/// Where the head in `bytes` ends (just past its empty line), searching from `from`. The head
/// starts with a request line, so the first empty line ends it.
fn head_end(bytes: &[u8], from: usize) -> Option<usize> {
    (from.max(1)..bytes.len())
        .find(|&i| {
            bytes[i] == b'\n' && (bytes[i - 1] == b'\n' || (i >= 2 && bytes[i - 2..i] == *b"\n\r"))
        })
        .map(|i| i + 1)
}

/// Reads a complete head's framing as hyper does.
fn framing_of(head: &[u8]) -> Framing {
    if head.len() > MAX_HEADER_BYTES {
        return Framing::TooLarge;
    }
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    if !matches!(
        req.parse_with_uninit_headers(head, &mut headers),
        Ok(httparse::Status::Complete(_))
    ) {
        return Framing::Stop;
    }
    framing_from(&req)
}

/// Reads a parsed head's framing as hyper does.
fn framing_from(req: &httparse::Request<'_, '_>) -> Framing {
    if req.method == Some("CONNECT") {
        // A tunnel may follow, which is no longer HTTP.
        return Framing::Stop;
    }
    let (mut te, mut cl, mut has_cl) = (None, None, false);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("content-length") {
            has_cl = true;
            let len = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (len, cl) {
                (Some(len), None) => cl = Some(len),
                (Some(len), Some(prev)) if len == prev => {}
                _ => cl = Some(u64::MAX), // invalid or differing: hyper refuses, unless TE
            }
        }
    }
    match (te, has_cl) {
        (Some(_), true) => Framing::Conflict,
        (Some(te), false) if last_coding_is_chunked(te) => Framing::Chunked,
        (Some(_), false) => Framing::Stop,
        (None, _) => match cl {
            None | Some(0) => Framing::NoBody,
            Some(u64::MAX) => Framing::Stop,
            Some(n) => Framing::Fixed(n),
        },
    }
}

fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a watch in pieces of `step` bytes; returns the refused head's index and
    /// the heads parsed.
    fn watch(wire: &[u8], step: usize) -> (u64, u64) {
        let verdicts = Arc::new(Verdicts::default());
        let mut watch = Watch::new(verdicts.clone());
        for piece in wire.chunks(step) {
            watch.feed(piece);
        }
        (verdicts.refused_at.load(Ordering::Relaxed), watch.heads)
    }

    const CONFLICT: &str = "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";

    #[test]
    fn finds_the_conflicting_head_after_bodies_of_every_framing_however_the_bytes_are_split() {
        let wire = format!(
            "\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\nhello world!\
             POST /c HTTP/1.1\r\nHost: a\r\ntransfer-encoding: Chunked\r\n\r\n\
             5;ext=1\r\nhello\r\n1A\r\nGET /no HTTP/1.1\r\n\r\nabcdef\r\n0\r\nX-Trailer: 1\r\n\r\n\
             {CONFLICT}GET /after HTTP/1.1\r\n\r\n"
        );
        for step in 1..=wire.len() {
            assert_eq!(watch(wire.as_bytes(), step), (3, 4), "step {step}");
        }
    }

    #[test]
    fn either_order_conflicts_and_plain_traffic_does_not() {
        let te_cl = CONFLICT;
        let cl_te = "POST /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bad_cl_after_te =
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n";
        for wire in [te_cl, cl_te, bad_cl_after_te] {
            assert_eq!(watch(wire.as_bytes(), 7), (0, 1), "{wire:?}");
        }
        let plain = "GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\n\n";
        assert_eq!(watch(plain.as_bytes(), 5), (u64::MAX, 2));
    }

    #[test]
    fn stops_where_hyper_would_refuse_or_the_stream_stops_being_http1() {
        for wire in [
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            let (conflict, heads) = watch(wire.as_bytes(), 3);
            assert_eq!(conflict, u64::MAX, "{wire:?}");
            assert!(heads <= 1, "{wire:?}: {heads}");
        }
        let oversized = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES)
        );
        for step in [1000, oversized.len()] {
            assert_eq!(watch(oversized.as_bytes(), step), (0, 1), "{step}");
        }
    }

    #[test]
    fn mangled_streams_never_panic_and_give_the_same_verdict_however_split() {
        use rand::{Rng, SeedableRng};
        let sample = format!(
            "GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc\
             POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nT: 1\r\n\r\n{CONFLICT}"
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            let mut wire = sample.clone().into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..wire.len());
                match rng.random_range(0..3) {
                    0 => wire[at] = rng.random(),
                    1 => wire.insert(at, b"\r\n0;:aT"[rng.random_range(0..7)]),
                    _ => drop(wire.remove(at)),
                }
            }
            let whole = watch(&wire, wire.len());
            let step = rng.random_range(1..=wire.len());
            assert_eq!(
                watch(&wire, step),
                whole,
                "{:?} in {step}s",
                String::from_utf8_lossy(&wire)
            );
        }
    }

    #[test]
    fn marks_only_the_refused_request_and_says_why() {
        for refusal in [Refusal::ConflictingFraming, Refusal::OversizedHead] {
            let verdicts = Verdicts::default();
            verdicts.refuse(1, refusal);
            let marked: Vec<Option<Refusal>> = (0..3).map(|_| verdicts.next()).collect();
            assert_eq!(marked, [None, Some(refusal), None]);
        }
    }
}
