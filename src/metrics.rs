//! Prometheus metrics (`/metrics` on the admin listener). Requests are recorded by the observing
//! middleware, [`crate::layers::record`].

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
struct SharedCacheLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    credential: String,
}

/// Where a route keeps its count of `200` answers once it has counted one: the commonest
/// series, counted without hashing its labels and taking its family's lock each time
/// (docs/BENCHMARKS.md). It is the family's own counter, so `/metrics` shows one series either
/// way.
#[derive(Debug, Default)]
pub struct OkCount(OnceLock<Counter>);

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
    shared_cache_operations: Family<SharedCacheLabels, Counter>,
    shared_cache_up: Gauge,
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
        let shared_cache_operations = Family::default();
        let shared_cache_up = Gauge::default();
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
            "Requests replayed after a 401, counted with their answer",
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
        registry.register(
            "shared_cache_operations",
            "Operations on the fleet's shared cache, by op and outcome (ok, error, timeout)",
            shared_cache_operations.clone(),
        );
        registry.register(
            "shared_cache_up",
            "1 while the fleet's shared cache answers (0 without one configured)",
            shared_cache_up.clone(),
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
            shared_cache_operations,
            shared_cache_up,
            no_route: Label(NO_ROUTE.into()),
        })
    }

    /// The gauge of HTTP/1 client connections waiting between requests without a buffer
    /// ([`crate::http1::server`]).
    pub fn hibernating(&self) -> Gauge {
        self.hibernating.clone()
    }

    /// Counts one operation on the fleet's shared cache.
    pub fn shared_cache_operation(&self, op: &'static str, outcome: &'static str) {
        self.shared_cache_operations
            .get_or_create(&SharedCacheLabels { op, outcome })
            .inc();
    }

    /// Sets whether the fleet's shared cache answers.
    pub fn shared_cache_up(&self, up: bool) {
        self.shared_cache_up.set(i64::from(up));
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

    /// Records a request answered with `status` after `latency`, on the route of that name
    /// and [`OkCount`] (none matched).
    pub fn request(&self, route: Option<(&Arc<str>, &OkCount)>, status: u16, latency: Duration) {
        let labels = |status| RequestLabels {
            route: route.map_or_else(|| self.no_route.clone(), |(name, _)| Label(name.clone())),
            status,
        };
        match route {
            Some((_, ok)) if status == 200 => {
                let count =
                    ok.0.get_or_init(|| self.requests.get_or_create(&labels(200)).clone());
                count.inc();
            }
            _ => {
                self.requests.get_or_create(&labels(status)).inc();
            }
        }
        self.request_duration.observe(latency.as_secs_f64());
    }

    /// Records a replay after a 401 on `route`.
    pub fn retry(&self, route: &Arc<str>) {
        let labels = RouteLabels {
            route: Label(route.clone()),
        };
        self.retries.get_or_create(&labels).inc();
    }

    /// The Prometheus text exposition, with the token gauges set from `tokens` first.
    pub fn render<'a>(&self, tokens: impl IntoIterator<Item = TokenReading<'a>>) -> String {
        for token in tokens {
            let labels = CredentialLabels {
                credential: token.credential.to_owned(),
            };
            self.token_expiry
                .get_or_create(&labels)
                .set(token.expires_in.as_secs_f64());
            self.backoff_active
                .get_or_create(&labels)
                .set(i64::from(token.backing_off));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One credential's token, as the token gauges show it.
#[derive(Debug, Clone, Copy)]
pub struct TokenReading<'a> {
    /// The credential's name.
    pub credential: &'a str,
    /// How long its current token has left (zero without one).
    pub expires_in: Duration,
    /// Whether it is backing off after a failed exchange.
    pub backing_off: bool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_routes_ok_count_is_its_familys_series_across_reloads() {
        let metrics = Metrics::new();
        let name: Arc<str> = "routes[0]".into();
        // A reload builds the route anew, with an empty OkCount of its own.
        let (before, after) = (OkCount::default(), OkCount::default());
        let took = Duration::from_millis(1);
        metrics.request(Some((&name, &before)), 200, took);
        metrics.request(Some((&name, &before)), 200, took);
        metrics.request(Some((&name, &after)), 200, took);
        metrics.request(Some((&name, &after)), 404, took);
        metrics.request(None, 200, took);
        let text = metrics.render([]);
        let series = |labels: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("tokengate_requests_total{{{labels}}} ")))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(series(r#"route="routes[0]",status="200""#), ["3"], "{text}");
        assert_eq!(series(r#"route="routes[0]",status="404""#), ["1"], "{text}");
        assert_eq!(series(r#"route="none",status="200""#), ["1"], "{text}");
    }
}
