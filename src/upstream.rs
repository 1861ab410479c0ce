//! The upstream client: hyper-util's pooled client over rustls, bounded by `request_timeout`,
//! with hop-by-hop headers removed from the response.

use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::body::{ProxyBody, ProxyResponse};
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

/// Whether a client error is a connect attempt that timed out (504, not 502).
fn is_connect_timeout(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return error.is_connect() && io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = e.source();
    }
    false
}

/// Sends each routed request to its route's upstream and waits at most `timeout` for the head.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    timeout: Duration,
}

impl Upstream {
    /// An upstream sender waiting at most `timeout` for each response head.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
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
        let timeout = self.timeout;
        Box::pin(async move {
            let response = tokio::time::timeout(timeout, sent)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
                .map_err(|e| match is_connect_timeout(&e) {
                    true => ProxyError::UpstreamTimeout(crate::tls::CONNECT_TIMEOUT),
                    false => ProxyError::UpstreamUnreachable(e),
                })?;
            let (mut parts, body) = response.into_parts();
            crate::hop::strip(&mut parts.headers);
            Ok(ProxyResponse::from_parts(parts, ProxyBody::Streaming(body)))
        })
    }
}
