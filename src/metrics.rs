//! Prometheus metrics (`/metrics` on the admin listener), and the middleware that observes every
//! request: it counts it by route and status, times it, and writes its access-log line. The
//! matched route reaches it through the request's [`Ctx`], which the route filter fills in.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{Request, Response};
use pin_project_lite::pin_project;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use crate::auth::cache::TokenSource;
use crate::ctx::Ctx;

/// The label of requests no route matched.
pub const NO_ROUTE: &str = "none";

/// A label value shared with the route it names: no copy per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Label(Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Label,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExchangeLabels {
    credential: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    credential: String,
}

/// Every metric tokengate exports. One per process; it outlives reloads.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histogram,
    retries: Family<RouteLabels, Counter>,
    exchanges: Family<ExchangeLabels, Counter>,
    exchange_duration: Histogram,
    token_expiry: Family<CredentialLabels, Gauge<f64, AtomicU64>>,
    backoff_active: Family<CredentialLabels, Gauge>,
    hibernating: Gauge,
    /// The route label of requests no route matched.
    no_route: Label,
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("tokengate");
        let requests = Family::default();
        let request_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let retries = Family::default();
        let exchanges = Family::default();
        let exchange_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let token_expiry = Family::default();
        let backoff_active = Family::default();
        let hibernating = Gauge::default();
        registry.register(
            "requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response head",
            request_duration.clone(),
        );
        registry.register(
            "upstream_retries",
            "Requests replayed after a 401",
            retries.clone(),
        );
        registry.register(
            "token_exchanges",
            "Token exchanges, by credential and outcome (ok, rejected, unavailable)",
            exchanges.clone(),
        );
        registry.register(
            "token_exchange_duration_seconds",
            "Time one exchange took, retries on code 83 included",
            exchange_duration.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the current token expires (0 without one)",
            token_expiry.clone(),
        );
        registry.register(
            "auth_backoff_active",
            "1 while the credential backs off after a failed exchange",
            backoff_active.clone(),
        );
        registry.register(
            "connections_hibernating",
            "Idle HTTP/1 keep-alive client connections holding no buffers",
            hibernating.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            request_duration,
            retries,
            exchanges,
            exchange_duration,
            token_expiry,
            backoff_active,
            hibernating,
            no_route: Label(NO_ROUTE.into()),
        })
    }

    /// The gauge of hibernating client connections ([`crate::hibernate`]).
    pub fn hibernating(&self) -> Gauge {
        self.hibernating.clone()
    }

    /// Records one exchange of `credential`.
    pub fn exchange(&self, credential: &str, outcome: &'static str, took: Duration) {
        let labels = ExchangeLabels {
            credential: credential.to_owned(),
            outcome,
        };
        self.exchanges.get_or_create(&labels).inc();
        self.exchange_duration.observe(took.as_secs_f64());
    }

    /// Records a replay after a 401 on `route`.
    pub fn retry(&self, route: &Arc<str>) {
        let labels = RouteLabels {
            route: Label(route.clone()),
        };
        self.retries.get_or_create(&labels).inc();
    }

    /// The Prometheus text exposition, with the token gauges read from `credentials` now.
    pub async fn render(&self, credentials: &BTreeMap<String, TokenSource>) -> String {
        let now = Instant::now();
        for (name, source) in credentials {
            let labels = CredentialLabels {
                credential: name.clone(),
            };
            let expiry = source.current().await.map_or(0.0, |t| {
                t.expires_at().saturating_duration_since(now).as_secs_f64()
            });
            self.token_expiry.get_or_create(&labels).set(expiry);
            self.backoff_active
                .get_or_create(&labels)
                .set(i64::from(source.backing_off()));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Records `tokengate_requests_total` and `tokengate_request_duration_seconds`.
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
                let ctx = Ctx::new(None, None);
                req.extensions_mut().insert(ctx.clone());
                ctx
            }
        };
        // The host is kept only for the access log, and only when that is on.
        let host = if tracing::enabled!(target: "tokengate::access", tracing::Level::INFO) {
            match req.uri().authority() {
                Some(a) => Some(a.as_str().to_owned()),
                None => req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned),
            }
        } else {
            None
        };
        RecordFuture {
            method: req.method().clone(),
            host,
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
            ctx,
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// The future of [`Record`].
    pub struct RecordFuture<F> {
        #[pin]
        inner: F,
        metrics: Arc<Metrics>,
        ctx: Ctx,
        started: Instant,
        method: http::Method,
        host: Option<String>,
    }
}

impl<F, RB, E> Future for RecordFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let latency = this.started.elapsed();
            let route = this.ctx.route().map(|r| &r.route);
            let route_name = route.map_or(NO_ROUTE, |r| r.name.as_ref());
            let status = response.status().as_u16();
            let labels = RequestLabels {
                route: route
                    .map_or_else(|| this.metrics.no_route.clone(), |r| Label(r.name.clone())),
                status,
            };
            this.metrics.requests.get_or_create(&labels).inc();
            this.metrics.request_duration.observe(latency.as_secs_f64());
            // One line per request. `bytes` is the response's declared length (streamed bodies
            // of unknown length log none); never a header value.
            tracing::info!(
                target: "tokengate::access",
                method = %this.method,
                route = route_name,
                host = this.host.as_deref(),
                status,
                latency_ms = latency.as_secs_f64() * 1000.0,
                retried = this.ctx.replayed(),
                credential = route.map(|r| r.credential.name().as_ref()),
                bytes = response
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
            );
        }
        Poll::Ready(result)
    }
}
