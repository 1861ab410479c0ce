//! Request and response bodies, and the middleware that makes small request bodies replayable:
//! bodies of known length up to `max_replay_body` are buffered; the rest stream and are not
//! replayed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tower::{Layer, Service};

use crate::error::ProxyError;

/// A body in either direction: bytes the proxy holds whole, or a stream from a peer.
#[derive(Debug)]
pub enum ProxyBody {
    /// Held whole (possibly empty): a buffered request body, or a response the proxy wrote.
    /// It can be replayed.
    Full(Option<Bytes>),
    /// Streaming from the client or the upstream; it cannot be replayed.
    Streaming(Incoming),
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streaming(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(bytes) => bytes.is_none(),
            Self::Streaming(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Streaming(body) => body.size_hint(),
        }
    }
}

/// Buffers request bodies of known length up to `max_replay_body` so they can be replayed.
#[derive(Debug, Clone, Copy)]
pub struct ReplayBodyLayer {
    max_replay_body: usize,
}

impl ReplayBodyLayer {
    /// Buffers bodies whose declared length is at most `max_replay_body` bytes.
    pub fn new(max_replay_body: usize) -> Self {
        Self { max_replay_body }
    }
}

impl<S> Layer<S> for ReplayBodyLayer {
    type Service = ReplayBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplayBody {
            inner,
            max_replay_body: self.max_replay_body,
        }
    }
}

/// See [`ReplayBodyLayer`].
#[derive(Debug, Clone)]
pub struct ReplayBody<S> {
    inner: S,
    max_replay_body: usize,
}

impl<S> Service<Request<Incoming>> for ReplayBody<S>
where
    S: Service<Request<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = S::Response;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<S::Response, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let replayable = body.is_end_stream()
            || body
                .size_hint()
                .exact()
                .is_some_and(|len| len <= self.max_replay_body as u64);
        if !replayable {
            let request = Request::from_parts(parts, ProxyBody::Streaming(body));
            return Box::pin(self.inner.call(request));
        }
        // The inner service was made ready by poll_ready; the clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.max_replay_body;
        Box::pin(async move {
            let bytes = if body.is_end_stream() {
                None
            } else {
                let collected = Limited::new(body, limit).collect().await.map_err(|e| {
                    match e.downcast::<hyper::Error>() {
                        Ok(e) => ProxyError::ClientBody(*e),
                        Err(_) => ProxyError::BodyTooLarge { limit },
                    }
                })?;
                Some(collected.to_bytes())
            };
            inner
                .call(Request::from_parts(parts, ProxyBody::Full(bytes)))
                .await
        })
    }
}

/// A response of the proxy: streamed from the upstream, or written by the proxy itself.
pub type ProxyResponse = Response<ProxyBody>;
