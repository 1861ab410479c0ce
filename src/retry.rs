//! Retry once on 401: invalidate the token that was used (if still current), then replay the
//! buffered request with a fresh token. Streaming bodies are not replayed; a second 401 goes to
//! the client.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
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
    type Future = BoxFuture<'static, Result<Response<RB>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let replay = Replay::of(&req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = inner.call(req).await?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            let Some(replay) = replay else {
                return Ok(response); // not routed: the 401 is not about a token of ours
            };
            let (Some(route), Some(generation)) =
                (replay.ctx.route(), replay.ctx.token_generation())
            else {
                return Ok(response); // no token of ours was used: the 401 is the client's
            };
            route
                .route
                .credential
                .invalidate_if_current(generation)
                .await;
            let Some(body) = replay.body else {
                tracing::debug!(route = %route.route.name, "401 on a streamed body; not replayed");
                return Ok(response);
            };
            tracing::debug!(route = %route.route.name, generation, "401; replaying with a fresh token");
            drop(response);
            metrics.retry(&route.route.name);
            replay.ctx.mark_replayed();
            let mut again = Request::new(body);
            *again.method_mut() = replay.method;
            *again.uri_mut() = replay.uri;
            *again.headers_mut() = replay.headers;
            again.extensions_mut().insert(replay.ctx.clone());
            inner.ready().await?.call(again).await
        })
    }
}

/// What a replay needs of a request whose body is held whole; the request itself is built only
/// if the upstream answers 401.
struct Replay {
    ctx: Ctx,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// The body, if it can be sent again.
    body: Option<ProxyBody>,
}

impl Replay {
    /// The parts of routed `req` a replay needs (no copy of a body that streams).
    fn of(req: &Request<ProxyBody>) -> Option<Self> {
        let ctx = Ctx::of(req)?.clone();
        let body = req.body().try_clone();
        let replayable = body.is_some();
        Some(Self {
            ctx,
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: if replayable {
                req.headers().clone()
            } else {
                HeaderMap::new()
            },
            body,
        })
    }
}
