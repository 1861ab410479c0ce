//! Retry once on 401: invalidate the token that was used (if still current), then replay the
//! buffered request with a fresh token. Streaming bodies are not replayed; a second 401 goes to
//! the client.
//!
//! Nothing is copied up front: the upstream layer, which consumes the request, hands it back
//! through the request's [`Ctx`] when the answer is 401 and the body was held whole. A request
//! that is not answered 401 costs this layer one service clone and no allocation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use crate::body::ProxyBody;
use crate::ctx::Ctx;
use crate::error::ProxyError;
use crate::metrics::Metrics;

/// Replays a request once when the upstream answers 401 to an injected token.
#[derive(Debug, Clone)]
pub struct RetryOn401Layer {
    metrics: Arc<Metrics>,
}

impl RetryOn401Layer {
    /// Counts replays in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RetryOn401Layer {
    type Service = RetryOn401<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryOn401 {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`RetryOn401Layer`].
#[derive(Debug, Clone)]
pub struct RetryOn401<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, RB> Service<Request<ProxyBody>> for RetryOn401<S>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    type Future = ResponseFuture<S, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let ctx = Ctx::of(&req).cloned();
        // The inner service was made ready by poll_ready; the clone takes its place, and the
        // ready one is kept for a replay.
        let clone = self.inner.clone();
        let first = self.inner.call(req);
        ResponseFuture::First {
            first,
            again: Some(Again {
                inner: clone,
                ctx,
                metrics: self.metrics.clone(),
            }),
        }
    }
}

/// What a replay needs besides the request, which the upstream layer leaves in the request's
/// [`Ctx`] when its answer is 401 ([`Ctx::take_unanswered`]).
struct Again<S> {
    inner: S,
    ctx: Option<Ctx>,
    metrics: Arc<Metrics>,
}

pin_project! {
    /// The future of [`RetryOn401`]: the first attempt, and only after a 401 a boxed replay.
    #[project = Proj]
    pub enum ResponseFuture<S: Service<Request<ProxyBody>>, RB> {
        /// The first attempt.
        First { #[pin] first: S::Future, again: Option<Again<S>> },
        /// Invalidating the token and replaying.
        Replay { replay: BoxFuture<'static, Result<Response<RB>, ProxyError>> },
    }
}

impl<S, RB> Future for ResponseFuture<S, RB>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError> + Send + 'static,
    S::Future: Send,
    RB: Send + 'static,
{
    type Output = Result<Response<RB>, ProxyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let replay = match self.as_mut().project() {
                Proj::Replay { replay } => return replay.as_mut().poll(cx),
                Proj::First { first, again } => {
                    let response = ready!(first.poll(cx))?;
                    if response.status() != StatusCode::UNAUTHORIZED {
                        return Poll::Ready(Ok(response));
                    }
                    let Some(again) = again.take() else {
                        return Poll::Ready(Err(ProxyError::Internal("polled after a 401")));
                    };
                    match again.replay(response) {
                        Ok(replay) => replay,
                        Err(response) => return Poll::Ready(Ok(response)),
                    }
                }
            };
            self.set(ResponseFuture::Replay { replay });
        }
    }
}

impl<S> Again<S> {
    /// The replay for a 401 `response`, or the response itself when it goes to the client.
    fn replay<RB>(
        self,
        response: Response<RB>,
    ) -> Result<BoxFuture<'static, Result<Response<RB>, ProxyError>>, Response<RB>>
    where
        S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError>
            + Send
            + 'static,
        S::Future: Send,
        RB: Send + 'static,
    {
        let Self {
            mut inner,
            ctx,
            metrics,
        } = self;
        let Some(ctx) = ctx else {
            return Err(response); // not routed: the 401 is not about a token of ours
        };
        let (Some(route), Some(generation)) = (ctx.route(), ctx.token_generation()) else {
            return Err(response); // no token of ours was used: the 401 is the client's
        };
        let route = route.route.clone();
        let unanswered = ctx.take_unanswered();
        Ok(Box::pin(async move {
            route.credential.invalidate_if_current(generation).await;
            let Some(req) = unanswered else {
                tracing::debug!(route = %route.name, "401 on a streamed body; not replayed");
                return Ok(response);
            };
            tracing::debug!(route = %route.name, generation, "401; replaying with a fresh token");
            drop(response);
            metrics.retry(&route.name);
            ctx.mark_replayed();
            inner.ready().await?.call(req).await
        }))
    }
}
