//! The clients toward upstreams: tokengate's own connection pool and client for plain-HTTP
//! upstreams ([`Pool`], [`crate::http1::client`]), hyper-util's pooled client over rustls for
//! HTTPS ones; and the SSRF guard for tunnel targets ([`ssrf`]).

pub mod pool;
pub mod ssrf;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;
use crate::tls::Connector;
use crate::upstream::pool::Pool;

/// How long an idle pooled upstream connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most idle pooled connections kept per upstream host.
pub const POOL_MAX_IDLE_PER_HOST: usize = 256;

/// How a route reaches its upstream.
#[derive(Clone, Debug)]
pub enum UpstreamClient {
    /// `http://`: tokengate's own pool of HTTP/1.1 connections to that host.
    Plain(Arc<Pool>),
    /// `https://`: hyper-util's pooled client with these TLS roots (HTTP/1.1 or HTTP/2 by ALPN).
    Tls(Arc<Client<Connector, ProxyBody>>),
}

/// Builds hyper-util's pooled client over `connector`, for HTTPS upstreams.
pub fn client(connector: Connector) -> Client<Connector, ProxyBody> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
        .build(connector)
}
