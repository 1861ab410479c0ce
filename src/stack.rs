//! The request path, assembled in one place. Read it top to bottom: a request flows outside-in.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};
use tower_http::trace::TraceLayer;

use crate::auth::inject::InjectBearerLayer;
use crate::body::ReplayBodyLayer;
use crate::config::ServerConfig;
use crate::rescue::RescueLayer;
use crate::retry::RetryOn401Layer;
use crate::route::{RouteLayer, Routes};
use crate::upstream::Upstream;

/// The proxy's service for one listener: every request in, every response (or JSON error) out.
pub fn proxy(
    routes: Arc<Routes>,
    server: &ServerConfig,
) -> impl Service<
    Request<Incoming>,
    Response = Response<impl Body<Data = bytes::Bytes, Error = hyper::Error> + Send + 'static>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    ServiceBuilder::new()
        // A span per request (method, URI, status, latency) for everything below; no headers.
        .layer(TraceLayer::new_for_http())
        // The one place a ProxyError becomes its JSON response; nothing below writes errors.
        .layer(RescueLayer)
        // Pick the route, rewrite the URI, strip hop-by-hop, apply client_authorization.
        .layer(RouteLayer::new(routes))
        // Buffer small bodies of known length so they can be replayed; stream the rest.
        .layer(ReplayBodyLayer::new(server.max_replay_body))
        // On 401 to our token: invalidate it if still current, replay once with a fresh one.
        .layer(RetryOn401Layer)
        // Set Authorization from the cache (or the one shared exchange); after stripping.
        .layer(InjectBearerLayer)
        // Pooled http/https client, bounded by request_timeout.
        .service(Upstream::new(server.request_timeout))
}
