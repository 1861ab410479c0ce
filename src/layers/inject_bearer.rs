//! Bearer injection: sets `Authorization` from the route's credential (cache hit, or the shared
//! exchange) and records in the request's [`Ctx`] which token was used, so a 401 can invalidate
//! exactly that one.

use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::{BoxFuture, Either};
use http::header::AUTHORIZATION;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::ctx::Ctx;
use crate::error::ProxyError;

/// Injects the credential's bearer token into every routed request that wants one.
#[derive(Debug, Clone, Copy, Default)]
pub struct InjectBearerLayer;

impl<S> Layer<S> for InjectBearerLayer {
    type Service = InjectBearer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectBearer { inner }
    }
}

/// See [`InjectBearerLayer`].
#[derive(Debug, Clone)]
pub struct InjectBearer<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for InjectBearer<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<RB>;
    type Error = ProxyError;
    /// The inner future at once when the token is warm; the cold path waits for the exchange.
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<RB>, ProxyError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let Some((ctx, route)) = Ctx::of(&req)
            .and_then(|ctx| Some((ctx, ctx.route().filter(|r| r.inject).map(|r| &r.route)?)))
        else {
            return Either::Left(self.inner.call(req));
        };
        // Fresh at the head's arrival (its clock reading, microseconds ago); a replay after a
        // 401 reads the clock again, for it may come long after.
        let now = if ctx.replayed() {
            Instant::now()
        } else {
            ctx.arrived()
        };
        if let Some((header, generation)) = route.credential.warm(now) {
            ctx.sent_with(generation);
            // Set after hop-by-hop stripping, so nothing the client sent can remove or double it.
            req.headers_mut().insert(AUTHORIZATION, header);
            return Either::Left(self.inner.call(req));
        }
        // Cold (or expired): wait for the cache, which runs at most one exchange for everyone.
        let (ctx, route) = (ctx.clone(), route.clone());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(Box::pin(async move {
            let source = &route.credential;
            let token = source.token().await.map_err(|no| ProxyError::Auth {
                credential: source.name().clone(),
                source: no.error,
                retry_after: no.retry_after,
            })?;
            req.headers_mut()
                .insert(AUTHORIZATION, token.header().clone());
            ctx.sent_with(token.generation());
            inner.call(req).await
        }))
    }
}
