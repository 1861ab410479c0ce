//! The observing middleware, outermost on the request path: a `request` span around everything
//! below (method, URI, version; at debug level), then, once the response head is out, the
//! request counted by route and status (and as a retry if it was replayed after a 401), its
//! duration, and its access-log line. The matched route and whether the request was replayed
//! come from the request's [`Ctx`].
//!
//! This is tower-http's `TraceLayer` and the metrics middleware in one: the two each wrapped
//! the request and read the clock, and the trace layer also wrapped every response body
//! (`docs/BENCHMARKS.md` has the cost).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::Span;

use crate::ctx::Ctx;
use crate::metrics::{Metrics, NO_ROUTE};

/// Observes every request: span, metrics, access log. See the module docs.
#[derive(Clone, Debug)]
pub struct RecordLayer {
    metrics: Arc<Metrics>,
}

impl RecordLayer {
    /// Records into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RecordLayer {
    type Service = Record<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Record {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`RecordLayer`].
#[derive(Clone, Debug)]
pub struct Record<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> Service<Request<B>> for Record<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: http_body::Body,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = RecordFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // Requests that did not come through the accept loop (tests) get their context here.
        let ctx = match Ctx::of(&req) {
            Some(ctx) => ctx.clone(),
            None => {
                let ctx = Ctx::new(None);
                req.extensions_mut().insert(ctx.clone());
                ctx
            }
        };
        // The path only, here and in the access log: a query string may carry secrets.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            path = req.uri().path(),
            version = ?req.version(),
        );
        // Host and path are kept only for the access log, and only when that is on.
        let seen =
            tracing::enabled!(target: "tokengate::access", tracing::Level::INFO).then(|| {
                let host = match req.uri().authority() {
                    Some(a) => Some(a.as_str().to_owned()),
                    None => req
                        .headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned),
                };
                Seen {
                    host,
                    path: req.uri().path().to_owned(),
                }
            });
        let method = req.method().clone();
        let inner = span.in_scope(|| self.inner.call(req));
        RecordFuture {
            inner,
            span,
            metrics: self.metrics.clone(),
            started: ctx.arrived(), // the duration counts from the head's arrival
            ctx,
            method,
            seen,
        }
    }
}

/// What the access log keeps of a request head.
struct Seen {
    /// The authority as the client sent it (absolute-form URI, else `Host`).
    host: Option<String>,
    /// The path, without the query.
    path: String,
}

pin_project! {
    /// The future of [`Record`].
    pub struct RecordFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        metrics: Arc<Metrics>,
        ctx: Ctx,
        started: Instant,
        method: http::Method,
        seen: Option<Seen>,
    }
}

impl<F, RB, E> Future for RecordFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: http_body::Body,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let latency = this.started.elapsed();
            let route = this.ctx.route().map(|r| &r.route);
            let status = response.status().as_u16();
            this.metrics
                .request(route.map(|r| (&r.name, &r.ok_count)), status, latency);
            let retried = this.ctx.replayed();
            if retried && let Some(route) = route {
                this.metrics.retry(&route.name);
            }
            // One line per request. `bytes` is the response's declared length, or its body's
            // known one (streamed bodies of unknown length log none); never a header value.
            let seen = this.seen.as_ref();
            tracing::info!(
                target: "tokengate::access",
                method = %this.method,
                path = seen.map(|s| s.path.as_str()),
                client = this.ctx.peer().map(tracing::field::display),
                route = route.map_or(NO_ROUTE, |r| r.name.as_ref()),
                host = seen.and_then(|s| s.host.as_deref()),
                status,
                // Rounded to whole microseconds.
                latency_ms = latency.as_micros() as f64 / 1000.0,
                retried,
                credential = route.map(|r| r.credential.name().as_ref()),
                bytes = response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .or_else(|| response.body().size_hint().exact()),
            );
        }
        Poll::Ready(result)
    }
}
