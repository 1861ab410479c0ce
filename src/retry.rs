//! Retry once on 401: invalidate the token that was used (if still current), then replay the
//! buffered request with a fresh token. Streaming bodies are not replayed; a second 401 goes to
//! the client.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::auth::inject::UsedToken;
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::metrics::{Metrics, Replayed};
use crate::route::RouteCtx;

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
    type Future = BoxFuture<'static, Result<Response<RB>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let ctx = req.extensions().get::<RouteCtx>().cloned();
        let replay = replayable_copy(&req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = inner.call(req).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let (Some(ctx), Some(&UsedToken(generation))) = (ctx, response.extensions().get())
            else {
                return Ok(response); // no token of ours was used: the 401 is the client's
            };
            ctx.route.credential.invalidate_if_current(generation).await;
            let Some(replay) = replay else {
                tracing::debug!(route = %ctx.route.name, "401 on a streamed body; not replayed");
                return Ok(response);
            };
            tracing::debug!(route = %ctx.route.name, generation, "401; replaying with a fresh token");
            drop(response);
            metrics.retry(&ctx.route.name);
            let mut response = inner.ready().await?.call(replay).await?;
            response.extensions_mut().insert(Replayed);
            Ok(response)
        })
    }
}

/// A copy of `req` for a replay, if its body is buffered.
fn replayable_copy(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let body = req.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    if let Some(ctx) = req.extensions().get::<RouteCtx>() {
        copy.extensions_mut().insert(ctx.clone());
    }
    Some(copy)
}
