//! The bodies of the request path: what a client connection hands over ([`ClientBody`]), what
//! the layers pass on ([`ProxyBody`]: held whole, or a peer's stream held to a size limit and an
//! idle timeout, [`Guarded`]).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::http1::{CarriesHead, RequestBody, WireHead};

/// Which peer a streamed body comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request body.
    Client,
    /// The upstream's response body.
    Upstream,
}

/// Why a streamed body stopped.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More bytes than allowed.
    #[error("body exceeds {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// No data for longer than the idle timeout.
    #[error("{side:?} body idle for {after:?}")]
    Idle {
        /// Whose body stalled.
        side: Side,
        /// The idle timeout.
        after: Duration,
    },
    /// The connection failed (through hyper).
    #[error("body transport failed")]
    Transport(#[source] hyper::Error),
    /// An HTTP/1 client's body broke off or was malformed.
    #[error("client body failed")]
    Client(#[source] crate::http1::request_body::BodyReadError),
    /// The upstream's response body broke off or was malformed.
    #[error("upstream body failed")]
    Upstream(#[source] crate::http1::client::Error),
}

/// A request body as a client connection hands it over: from tokengate's own HTTP/1 server
/// side ([`crate::http1`]), or from hyper (HTTP/2 clients, and the sandbox's servers).
#[derive(Debug)]
pub enum ClientBody {
    /// From an HTTP/1 client.
    Http1(RequestBody),
    /// Streaming through hyper.
    Hyper(Incoming),
}

impl From<RequestBody> for ClientBody {
    fn from(body: RequestBody) -> Self {
        Self::Http1(body)
    }
}

impl ClientBody {
    /// A body held whole (`None`: no body), as an HTTP/1 client's that arrived with its head.
    pub fn whole(bytes: Option<Bytes>) -> Self {
        Self::Http1(RequestBody::Whole(bytes))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Client),
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Transport),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Hyper(body) => body.size_hint(),
        }
    }
}

/// The one frame of a body held whole in `bytes` (none once taken), for every body kind here
/// that holds one.
fn whole_frame<E>(bytes: &mut Option<Bytes>) -> Option<Result<Frame<Bytes>, E>> {
    bytes.take().map(|b| Ok(Frame::data(b)))
}

/// The exact size of a body held whole in `bytes`.
fn whole_hint(bytes: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
}

/// A body in either direction: bytes the proxy holds whole, or a guarded stream from a peer.
#[derive(Debug)]
pub enum ProxyBody {
    /// Held whole (possibly empty): a buffered request body, or a response the proxy wrote.
    /// It can be replayed.
    Full(Option<Bytes>),
    /// Streaming from the client or the upstream; it cannot be replayed. Boxed, so that the
    /// requests and responses moved through every layer stay small.
    Streaming(Box<Guarded>),
}

impl ProxyBody {
    /// A body of `bytes`, held whole.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }

    /// A copy for a replay, if this body is held whole.
    pub fn try_clone(&self) -> Option<Self> {
        match self {
            Self::Full(bytes) => Some(Self::Full(bytes.clone())),
            Self::Streaming(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(whole_frame(bytes)),
            Self::Streaming(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Streaming(body) => body.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => whole_hint(bytes),
            Self::Streaming(body) => body.inner.size_hint(),
        }
    }
}

impl CarriesHead for ProxyBody {
    fn take_wire_head(&mut self) -> Option<WireHead> {
        match self {
            Self::Streaming(guarded) => match &mut guarded.inner {
                PeerBody::H1(body) => body.take_wire_head(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A body streaming from a peer: a client's request body, or a response through hyper's client
/// or tokengate's own upstream client ([`crate::http1::client`]).
#[derive(Debug)]
pub enum PeerBody {
    /// Through hyper.
    Hyper(Incoming),
    /// A client's request body.
    Client(ClientBody),
    /// Through [`crate::http1::client`].
    H1(crate::http1::client::Body),
    /// Read whole with its head by [`crate::http1`], but past `max_replay_body`: sent on as it would have
    /// streamed, and not replayed.
    Whole(Option<Bytes>),
}

impl Body for PeerBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Transport),
            Self::Client(body) => Pin::new(body).poll_frame(cx),
            Self::H1(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::Upstream),
            Self::Whole(bytes) => Poll::Ready(whole_frame(bytes)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Client(body) => body.is_end_stream(),
            Self::H1(body) => body.is_end_stream(),
            Self::Whole(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(body) => body.size_hint(),
            Self::Client(body) => body.size_hint(),
            Self::H1(body) => body.size_hint(),
            Self::Whole(bytes) => whole_hint(bytes),
        }
    }
}

/// A peer's body held to a byte limit and an idle timeout: waiting longer than `idle` for the
/// next frame fails it with [`BodyError::Idle`].
#[derive(Debug)]
pub struct Guarded {
    inner: PeerBody,
    side: Side,
    limit: u64,
    read: u64,
    idle: Duration,
    /// Made at the first wait: a body whose frames are always ready (most small ones) needs none.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl Guarded {
    /// Guards `inner` from `side` with a byte `limit` and an `idle` timeout.
    pub fn new(inner: PeerBody, side: Side, limit: u64, idle: Duration) -> Self {
        Self {
            inner,
            side,
            limit,
            read: 0,
            idle,
            timer: None,
            waiting: false,
        }
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                // The idle clock measures one wait for the peer (from the first poll that found
                // nothing), not time the reader spent elsewhere.
                let timer = match &mut this.timer {
                    Some(timer) if this.waiting => timer,
                    Some(timer) => {
                        timer.as_mut().reset(Instant::now() + this.idle);
                        timer
                    }
                    slot @ None => slot.insert(Box::pin(tokio::time::sleep(this.idle))),
                };
                this.waiting = true;
                ready!(timer.as_mut().poll(cx));
                return Poll::Ready(Some(Err(BodyError::Idle {
                    side: this.side,
                    after: this.idle,
                })));
            }
            Poll::Ready(frame) => frame,
        };
        this.waiting = false;
        let frame = match frame {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            this.read += data.len() as u64;
            if this.read > this.limit {
                return Poll::Ready(Some(Err(BodyError::TooLarge { limit: this.limit })));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response of the proxy: streamed from the upstream, or written by the proxy itself.
pub type ProxyResponse = Response<ProxyBody>;
