//! hyper's turns with plain-TCP HTTP/1 connections: those [`crate::front`] hands over come back
//! to it once they idle, and hyper's connection (with its 8 KiB read and 8 KiB write buffers)
//! is taken apart. Only the socket goes back; between requests, [`crate::front`] holds no
//! buffer either (the connection "hibernates"). hyper keeps both buffers for as long as a
//! connection lives, which for many idle keep-alive clients is memory held for nothing. nginx
//! frees its buffers the same way between requests.
//!
//! A connection is taken apart only when nothing can be lost: every request the framing watch
//! saw has been handed to the service and its response body finished, the watch stands between
//! messages (no partial head, no body left), no write is waiting on the socket, and no new
//! request has come for a whole [`HIBERNATE_AFTER`] tick (so a busy connection never pays for
//! the teardown). Connections hyper would close, upgrade (CONNECT) or that the watch stopped
//! following (HTTP/2, malformed framing) never qualify.
//!
//! The same tick enforces `header_read_timeout` while hyper has the connection (hyper's own
//! arms and drops a timer for every request): a connection that has waited that long for a
//! complete request head, with every earlier response finished, is closed, as hyper would
//! close it. The tick makes it up to [`HIBERNATE_AFTER`] late.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::adapter::Hyper;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tower::{Service, ServiceExt};

use crate::body::{CarriesHead, ClientBody};
use crate::error::BoxError;
use crate::framing::{Verdicts, Watch};
use crate::front::Rewound;
use crate::observe::{Observed, Observer};

/// How long a keep-alive connection stays idle, with no new request, before it hibernates
/// (between one and two of these). Shorter saves memory sooner; each hibernation costs a
/// teardown and a rebuild of hyper's connection when the next request comes.
pub const HIBERNATE_AFTER: Duration = Duration::from_millis(250);

/// What a connection's parts report, for deciding whether it may hibernate.
#[derive(Debug, Default)]
struct Idleness {
    /// Request heads the watch has read.
    heads: AtomicU64,
    /// The watch stands between messages.
    between: AtomicBool,
    /// The last write or flush waited on the socket: hyper still holds bytes to send.
    write_pending: AtomicBool,
    /// Response bodies hyper has finished with (sent, or dropped on error).
    finished: AtomicU64,
}

impl Idleness {
    /// Whether the connection waits for a request head (perhaps partly read), with every
    /// request hyper has `served` answered and sent.
    fn awaiting_head(&self, served: u64) -> bool {
        !self.write_pending.load(Ordering::Relaxed)
            && self.heads.load(Ordering::Relaxed) == served
            && self.finished.load(Ordering::Relaxed) == served
    }

    /// Whether hyper holds nothing for this connection but its empty buffers, given the
    /// requests it has `served`.
    fn settled(&self, served: u64) -> bool {
        self.between.load(Ordering::Relaxed)
            && !self.write_pending.load(Ordering::Relaxed)
            && self.heads.load(Ordering::Relaxed) == served
            && self.finished.load(Ordering::Relaxed) == served
    }
}

/// The framing watch, reporting what [`Idleness`] needs as well.
struct Tracker {
    watch: Watch,
    idle: Arc<Idleness>,
}

impl Observer for Tracker {
    fn read(&mut self, bytes: &[u8]) {
        self.watch.read(bytes);
        self.idle.heads.store(self.watch.heads(), Ordering::Relaxed);
        self.idle
            .between
            .store(self.watch.between_requests(), Ordering::Relaxed);
    }

    fn writing(&mut self, pending: bool) {
        self.idle.write_pending.store(pending, Ordering::Relaxed);
    }
}

pin_project! {
    /// A response body that counts itself finished when hyper drops it.
    struct Counted<B> {
        #[pin]
        body: B,
        idle: Arc<Idleness>,
    }

    impl<B> PinnedDrop for Counted<B> {
        fn drop(this: Pin<&mut Self>) {
            this.idle.finished.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<B: Body> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How an active phase of a connection ended.
enum Phase {
    /// hyper finished the connection (closed, upgraded or failed).
    Ended(hyper::Result<()>),
    /// Idle and settled, waiting for a head since this instant (as of a tick): take it apart.
    Idle(Instant),
}

/// How a listener serves plain-TCP HTTP/1 clients: tokengate's own server side
/// ([`crate::front`]), and hyper for what that hands over.
pub struct Http1 {
    /// hyper's HTTP/1 settings (without a header read timeout: see the module docs).
    pub builder: http1::Builder,
    /// How long a connection may wait for a complete request head, idling between requests
    /// (hibernation included) or sending one slowly.
    pub idle_timeout: Duration,
    /// Counts the connections hibernating now.
    pub hibernating: Gauge,
    /// How long a write to the client may wait for it to take bytes, on tokengate's own server
    /// side.
    pub write_timeout: Duration,
}

impl Http1 {
    /// Serves HTTP/1 through hyper on `io` (upgrades allowed), from the bytes it was handed
    /// with, until the connection ends (`None`) or idles, settled: then the connection comes
    /// back, with any bytes hyper has not read and the instant since which it has waited for
    /// a request head. Once `stop` flips, in-flight requests finish and it closes.
    ///
    /// Everything is set up before the returned future, which only keeps what it needs: no
    /// argument is held twice.
    pub fn serve<S, B>(
        self: Arc<Self>,
        io: Rewound,
        peer: SocketAddr,
        service: S,
        stop: watch::Receiver<bool>,
    ) -> impl Future<Output = Result<Option<(Rewound, Instant)>, BoxError>> + Send + 'static
    where
        S: Service<Request<ClientBody>, Response = Response<B>> + Clone + Send + Unpin + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body<Data = Bytes> + CarriesHead + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let verdicts = Arc::new(Verdicts::default());
        let idle = Arc::new(Idleness::default());
        let counting = idle.clone();
        let service = crate::server::with_ctx(service, peer, verdicts.clone()).map_response(
            move |response: Response<B>| {
                let idle = counting.clone();
                response.map(|body| Counted { body, idle })
            },
        );
        let tracker = Tracker {
            watch: Watch::new(verdicts.clone()),
            idle: idle.clone(),
        };
        let io = Observed::new(io, tracker);
        // Boxed: a connection's task keeps no room for hyper's connection while it is not
        // hyper's.
        Box::pin(serve(self, io, Hyper(service), verdicts, idle, stop))
    }
}

/// hyper's turn with a connection, until it ends or settles idle.
async fn serve<S, B>(
    http: Arc<Http1>,
    io: Observed<Rewound, Tracker>,
    service: S,
    verdicts: Arc<Verdicts>,
    idle: Arc<Idleness>,
    mut stop: watch::Receiver<bool>,
) -> Result<Option<(Rewound, Instant)>, BoxError>
where
    S: hyper::service::HttpService<Incoming, ResBody = B> + Unpin + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut conn = http
        .builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(started + HIBERNATE_AFTER, HIBERNATE_AFTER);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seen = verdicts.served();
    // Since when (as of a tick) the connection has waited for a head, and the responses
    // finished then: a new one restarts the wait.
    let mut awaiting = Some(started);
    let mut finished = idle.finished.load(Ordering::Relaxed);
    let mut draining = false;
    let stopping = stop.wait_for(|stopped| *stopped);
    tokio::pin!(stopping);
    let phase = poll_fn(|cx| {
        if !draining && stopping.as_mut().poll(cx).is_ready() {
            Pin::new(&mut conn).graceful_shutdown();
            draining = true;
        }
        if let Poll::Ready(ended) = Pin::new(&mut conn).poll(cx) {
            return Poll::Ready(Phase::Ended(ended));
        }
        while !draining && let Poll::Ready(now) = tick.poll_tick(cx) {
            let served = verdicts.served();
            let done = idle.finished.load(Ordering::Relaxed);
            awaiting = match awaiting {
                Some(since) if idle.awaiting_head(served) && done == finished => Some(since),
                _ if idle.awaiting_head(served) => Some(now),
                _ => None,
            };
            finished = done;
            if served == seen && idle.settled(served) {
                return Poll::Ready(Phase::Idle(awaiting.unwrap_or(now)));
            }
            seen = served;
            if awaiting.is_some_and(|since| now - since >= http.idle_timeout) {
                tracing::debug!("no request head within header_read_timeout; closing");
                return Poll::Ready(Phase::Ended(Ok(())));
            }
        }
        Poll::Pending
    })
    .await;
    let since = match phase {
        Phase::Ended(ended) => return ended.map(|()| None).map_err(Into::into),
        Phase::Idle(since) => since,
    };
    let Some(http1::Parts { io, read_buf, .. }) = conn.into_parts() else {
        return Ok(None);
    };
    // Settled means hyper has parsed every byte it read; stray empty lines between requests,
    // which hyper skips, are all it may hold. Anything else: close, to be safe.
    if !read_buf.iter().all(|b| matches!(b, b'\r' | b'\n')) {
        tracing::debug!(
            bytes = read_buf.len(),
            "unparsed bytes at hibernation; closing"
        );
        return Ok(None);
    }
    Ok(Some((io.into_inner().into_parts().0, since)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_only_between_requests_with_every_response_finished_and_sent() {
        let idle = Arc::new(Idleness::default());
        let mut tracker = Tracker {
            watch: Watch::new(Arc::new(Verdicts::default())),
            idle: idle.clone(),
        };
        assert!(!idle.settled(0), "nothing read yet");
        tracker.read(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(!idle.settled(0), "a request hyper has not handed over");
        assert!(!idle.settled(1), "its response is not finished");
        idle.finished.fetch_add(1, Ordering::Relaxed);
        assert!(idle.settled(1));
        tracker.writing(true);
        assert!(!idle.settled(1), "bytes wait for the socket");
        tracker.writing(false);
        assert!(idle.settled(1));
        tracker.read(b"POST /b HTTP/1.1\r\nContent-Length: 4\r\n\r\nab");
        idle.finished.fetch_add(1, Ordering::Relaxed);
        assert!(!idle.settled(2), "in the middle of a body");
        tracker.read(b"cd");
        assert!(idle.settled(2));
        tracker.read(b"GET /c HT");
        assert!(!idle.settled(2), "in the middle of a head");
    }
}
