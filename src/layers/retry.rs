//! Retry once on 401: invalidate the token that was used (if still current), then replay the
//! buffered request with a fresh token. Streaming bodies are not replayed; a second 401 goes to
//! the client.
//!
//! Nothing is copied up front: the upstream layer, which consumes the request, hands back the
//! request's [`Ctx`] on a response answered 401, holding the request itself when its body was
//! held whole. A request that is not answered 401 costs this layer one service clone (no
//! allocation, no reference count). The replay is counted where every request is, by the
//! observing layer, from the context's mark.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use crate::body::ProxyBody;
use crate::ctx::Ctx;
use crate::error::ProxyError;

/// Replays a request answered 401 once, with a fresh token. See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct RetryOn401Layer;

impl<S> Layer<S> for RetryOn401Layer {
    type Service = RetryOn401<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryOn401 { inner }
    }
}

/// See [`RetryOn401Layer`].
#[derive(Debug, Clone)]
pub struct RetryOn401<S> {
    inner: S,
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
        // The inner service was made ready by poll_ready; the clone takes its place, and the
        // ready one is kept for a replay.
        let clone = self.inner.clone();
        let first = self.inner.call(req);
        ResponseFuture::First {
            first,
            again: Some(clone),
        }
    }
}

pin_project! {
    /// The future of [`RetryOn401`]: the first answer, then the replay if there is one.
    #[project = Proj]
    pub enum ResponseFuture<S: Service<Request<ProxyBody>>, RB> {
        First { #[pin] first: S::Future, again: Option<S> },
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
                    match replay(again, response) {
                        Ok(replay) => replay,
                        Err(response) => return Poll::Ready(Ok(response)),
                    }
                }
            };
            self.set(ResponseFuture::Replay { replay });
        }
    }
}

/// The replay of the request `response` (401) answered, through `inner`; or `response` itself
/// when the 401 is not about a token of ours.
fn replay<S, RB>(
    mut inner: S,
    mut response: Response<RB>,
) -> Result<BoxFuture<'static, Result<Response<RB>, ProxyError>>, Response<RB>>
where
    S: Service<Request<ProxyBody>, Response = Response<RB>, Error = ProxyError> + Send + 'static,
    S::Future: Send,
    RB: Send + 'static,
{
    let Some(ctx) = response.extensions_mut().remove::<Ctx>() else {
        return Err(response); // no token of ours was used: the 401 is the client's
    };
    // Taken back first, whatever happens next: a request left in its own context is freed
    // only once it is out.
    let unanswered = ctx.take_unanswered();
    let (Some(route), Some(generation)) = (ctx.route(), ctx.token_generation()) else {
        return Err(response);
    };
    let route = route.route.clone();
    Ok(Box::pin(async move {
        route.credential.invalidate_if_current(generation).await;
        let Some(req) = unanswered else {
            tracing::debug!(route = %route.name, "401 on a streamed body; not replayed");
            return Ok(response);
        };
        tracing::debug!(route = %route.name, generation, "401; replaying with a fresh token");
        drop(response);
        ctx.mark_replayed();
        inner.ready().await?.call(req).await
    }))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::layers::forward::leave_for_retry;

    #[tokio::test]
    async fn a_401_that_cannot_be_replayed_frees_the_request_it_kept() {
        // As the upstream layer answers a 401 to a token of ours: the request is kept in its
        // context, which rides on the response. Without a route there is nothing to replay.
        let upstream = tower::service_fn(|req: Request<ProxyBody>| async move {
            let ctx = Ctx::of(&req).cloned();
            let mut response = Response::builder().status(401).body(()).unwrap();
            leave_for_retry(&mut response, ctx, Some(req));
            Ok::<_, ProxyError>(response)
        });
        let ctx = Ctx::new(None);
        ctx.sent_with(3);
        let mut req = Request::new(ProxyBody::Full(Some(Bytes::from_static(b"body"))));
        req.extensions_mut().insert(ctx.clone());
        let response = RetryOn401Layer.layer(upstream).oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.extensions().get::<Ctx>().is_none());
        drop(response);
        assert!(!ctx.replayed());
        assert_eq!(ctx.holders(), 1, "the kept request still holds its context");
    }
}
