//! The upstream client: hyper-util's pooled client over rustls, bounded by `request_timeout`,
//! with hop-by-hop headers removed from the response.

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::body::{BodyError, Guarded, ProxyBody, ProxyResponse, Side};
use crate::error::ProxyError;
use crate::route::RouteCtx;
use crate::tls::Connector;

/// How long an idle pooled upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most idle pooled connections kept per upstream host.
pub const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// A pooled client for one set of TLS roots.
pub type UpstreamClient = Client<Connector, ProxyBody>;

/// Builds a pooled upstream client over `connector`.
pub fn client(connector: Connector) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(connector)
}

/// Classifies a failed send: the client's body gave out (413/408/400), the connect attempt timed
/// out (504), or the upstream could not be reached or talked to (502).
fn send_error(error: hyper_util::client::legacy::Error, connect_timeout: Duration) -> ProxyError {
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<BodyError>() {
            return match body {
                BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
                BodyError::Idle { after, .. } => ProxyError::ClientTimeout(*after),
                BodyError::Transport(_) => ProxyError::BadRequest("client body broke off"),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && error.is_connect()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return ProxyError::UpstreamTimeout(connect_timeout);
        }
        source = e.source();
    }
    ProxyError::UpstreamUnreachable(error)
}

/// Sends each routed request to its route's upstream, waits at most `timeout` for the head,
/// and guards the response body with `body_idle` (a stalled upstream is cut off). A connect that
/// times out (after `connect_timeout`, set on the route's connector) is a 504 too.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    timeout: Duration,
    connect_timeout: Duration,
    body_idle: Duration,
}

impl Upstream {
    /// An upstream sender; see the type's docs.
    pub fn new(timeout: Duration, connect_timeout: Duration, body_idle: Duration) -> Self {
        Self {
            timeout,
            connect_timeout,
            body_idle,
        }
    }
}

impl Service<Request<ProxyBody>> for Upstream {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let Some(client) = req
            .extensions()
            .get::<RouteCtx>()
            .map(|c| c.route.client.clone())
        else {
            return Box::pin(std::future::ready(Err(ProxyError::Internal(
                "request without a route",
            ))));
        };
        let sent = client.request(req);
        let Self {
            timeout,
            connect_timeout,
            body_idle,
        } = *self;
        Box::pin(async move {
            let response = tokio::time::timeout(timeout, sent)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
                .map_err(|e| send_error(e, connect_timeout))?;
            let (mut parts, body) = response.into_parts();
            crate::hop::strip(&mut parts.headers);
            let body = Guarded::new(body, Side::Upstream, u64::MAX, body_idle);
            Ok(ProxyResponse::from_parts(parts, ProxyBody::Streaming(body)))
        })
    }
}
