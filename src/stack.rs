//! The request path, assembled in one place. Read it top to bottom: a request flows outside-in.

use std::convert::Infallible;
use std::sync::Arc;

use http::Request;
use tower::{Service, ServiceBuilder};

use crate::body::{ClientBody, ProxyResponse};
use crate::config::Config;
use crate::gateway::SharedLive;
use crate::layers::admit::AdmitLayer;
use crate::layers::forward::Forward;
use crate::layers::inject_bearer::InjectBearerLayer;
use crate::layers::record::RecordLayer;
use crate::layers::replay_body::{BodyLimits, ReplayBodyLayer};
use crate::layers::rescue::RescueLayer;
use crate::layers::retry::RetryOn401Layer;
use crate::layers::tunnel::TunnelLayer;
use crate::metrics::Metrics;
use crate::upstream::ssrf::Resolve;

/// The proxy's service for one listener: every request in, every response (or JSON error) out.
pub fn proxy(
    live: SharedLive,
    metrics: Arc<Metrics>,
    config: &Config,
    resolver: Arc<dyn Resolve>,
) -> impl Service<
    Request<ClientBody>,
    Response = ProxyResponse,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    let server = &config.server;
    ServiceBuilder::new()
        // A span per request for everything below (method, URI; no headers); then requests by
        // route and status, their duration and the access log, as the client saw them.
        .layer(RecordLayer::new(metrics.clone()))
        // The one place a ProxyError becomes its JSON response; nothing below writes errors.
        .layer(RescueLayer)
        // Only allowed clients holding the shared key (if configured) get any further; then
        // pick the route, rewrite the URI, strip hop-by-hop, apply client_authorization (one
        // snapshot of the configuration for both); then shed load past
        // max_concurrent_requests (503 overloaded) instead of queueing it.
        .layer(AdmitLayer::new(
            live.clone(),
            server.max_concurrent_requests,
        ))
        // CONNECT to a `[forward] tunnel_allow` target: SSRF guard, dial, blind tunnel.
        .layer(TunnelLayer::new(
            live,
            resolver,
            server.connect_timeout,
            config.forward.max_tunnels,
        ))
        // Hold bodies to max_request_body and body_idle_timeout; buffer small ones for replay.
        .layer(ReplayBodyLayer::new(BodyLimits {
            max_replay_body: server.max_replay_body as u64,
            max_request_body: server.max_request_body,
            idle_timeout: server.body_idle_timeout,
        }))
        // On 401 to our token: invalidate it if still current, replay once with a fresh one.
        .layer(RetryOn401Layer)
        // Set Authorization from the cache (or the one shared exchange); after stripping.
        .layer(InjectBearerLayer)
        // Pooled http/https client, bounded by request_timeout; response bodies by idleness.
        .service(Forward::new(
            server.request_timeout,
            server.connect_timeout,
            server.body_idle_timeout,
        ))
}
