//! Guards and buffers request bodies: every streamed body is held to `max_request_body` and
//! `body_idle_timeout`; request bodies of known length up to `max_replay_body` are buffered so
//! the retry layer can replay them; the rest stream and are not replayed.

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::Request;
use http_body::Body;
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::body::{ClientBody, Guarded, PeerBody, ProxyBody, Side};
use crate::error::ProxyError;
use crate::http1::RequestBody;

/// The limits on request bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Bodies of known length up to this many bytes are buffered for replay.
    pub max_replay_body: u64,
    /// No request body may be larger: 413 `body_too_large`.
    pub max_request_body: u64,
    /// The longest wait for the next piece of a body: 408 `client_timeout`.
    pub idle_timeout: Duration,
}

/// Guards request bodies and buffers the replayable ones; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ReplayBodyLayer {
    limits: BodyLimits,
}

impl ReplayBodyLayer {
    /// Applies `limits` to every request body.
    pub fn new(limits: BodyLimits) -> Self {
        Self { limits }
    }
}

impl<S> Layer<S> for ReplayBodyLayer {
    type Service = ReplayBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReplayBody {
            inner,
            limits: self.limits,
        }
    }
}

/// See [`ReplayBodyLayer`].
#[derive(Debug, Clone)]
pub struct ReplayBody<S> {
    inner: S,
    limits: BodyLimits,
}

impl<S> Service<Request<ClientBody>> for ReplayBody<S>
where
    S: Service<Request<ProxyBody>, Error = ProxyError> + Clone + Send + 'static,
    S::Response: Send,
    S::Future: Send,
{
    type Response = S::Response;
    type Error = ProxyError;
    /// The inner future at once, unless the body is buffered first (or refused).
    type Future = Either<S::Future, BoxFuture<'static, Result<S::Response, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let limits = self.limits;
        let (parts, body) = req.into_parts();
        // A declared length over the limit is refused before any exchange or upstream dial.
        if body.size_hint().lower() > limits.max_request_body {
            let too_large = ProxyError::BodyTooLarge {
                limit: limits.max_request_body,
            };
            return Either::Right(Box::pin(std::future::ready(Err(too_large))));
        }
        let body = match body {
            // Read whole with its head: nothing to wait for, and replayable as it is if it is
            // within max_replay_body.
            ClientBody::Http1(RequestBody::Whole(bytes))
                if bytes
                    .as_ref()
                    .is_none_or(|b| b.len() as u64 <= limits.max_replay_body) =>
            {
                let request = Request::from_parts(parts, ProxyBody::Full(bytes));
                return Either::Left(self.inner.call(request));
            }
            ClientBody::Http1(RequestBody::Whole(bytes)) => {
                let body = Guarded::new(
                    PeerBody::Whole(bytes),
                    Side::Client,
                    limits.max_request_body,
                    limits.idle_timeout,
                );
                let request = Request::from_parts(parts, ProxyBody::Streaming(Box::new(body)));
                return Either::Left(self.inner.call(request));
            }
            body if body.is_end_stream() => {
                let request = Request::from_parts(parts, ProxyBody::Full(None));
                return Either::Left(self.inner.call(request));
            }
            body => body,
        };
        let replayable = body
            .size_hint()
            .exact()
            .is_some_and(|len| len <= limits.max_replay_body);
        let body = Guarded::new(
            PeerBody::Client(body),
            Side::Client,
            limits.max_request_body,
            limits.idle_timeout,
        );
        if !replayable {
            let request = Request::from_parts(parts, ProxyBody::Streaming(Box::new(body)));
            return Either::Left(self.inner.call(request));
        }
        // The inner service was made ready by poll_ready; the clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let bytes = body
                .collect()
                .await
                .map_err(ProxyError::from_body)?
                .to_bytes();
            inner
                .call(Request::from_parts(parts, ProxyBody::Full(Some(bytes))))
                .await
        }))
    }
}
