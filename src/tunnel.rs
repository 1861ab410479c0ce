//! CONNECT tunnels for egress clients: a target listed in `[forward] tunnel_allow`, resolved
//! and checked by the SSRF guard ([`crate::ssrf`]), dialled at exactly the checked address, and
//! bytes copied both ways. Tunnels are blind: they carry no token.
//!
//! Without `tunnel_allow`, CONNECT passes on and the route layer answers 405.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::config::ForwardConfig;
use crate::error::{BoxError, ProxyError};
use crate::gateway::SharedLive;
use crate::ssrf::{self, GuardError, Resolve};

/// Opens CONNECT tunnels to listed targets; passes every other request on.
#[derive(Clone)]
pub struct TunnelLayer {
    live: SharedLive,
    resolver: Arc<dyn Resolve>,
    connect_timeout: Duration,
    slots: Arc<Semaphore>,
}

impl TunnelLayer {
    /// Tunnels per `live`'s `[forward]`, resolving with `resolver`, at most `max_tunnels` open.
    pub fn new(
        live: SharedLive,
        resolver: Arc<dyn Resolve>,
        connect_timeout: Duration,
        max_tunnels: usize,
    ) -> Self {
        Self {
            live,
            resolver,
            connect_timeout,
            slots: Arc::new(Semaphore::new(max_tunnels)),
        }
    }
}

impl<S> Layer<S> for TunnelLayer {
    type Service = Tunnel<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Tunnel {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`TunnelLayer`].
#[derive(Clone)]
pub struct Tunnel<S> {
    inner: S,
    layer: TunnelLayer,
}

impl<S, B> Service<Request<B>> for Tunnel<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError>,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<ProxyBody>, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.method() != Method::CONNECT {
            return Either::Left(self.inner.call(req));
        }
        let live = self.layer.live.load_full();
        if live.config.forward.tunnel_allow.is_empty() {
            return Either::Left(self.inner.call(req));
        }
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            open(req, &live.config.forward, &layer)
                .await
                .map_err(BoxError::from)
        }))
    }
}

/// Checks, dials and answers one CONNECT; the copying runs on its own task after the upgrade.
async fn open<B>(
    mut req: Request<B>,
    forward: &ForwardConfig,
    layer: &TunnelLayer,
) -> Result<Response<ProxyBody>, ProxyError> {
    let target = req
        .uri()
        .authority()
        .filter(|a| a.port_u16().is_some())
        .cloned()
        .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    if !forward.allows_tunnel(target.as_str()) {
        return Err(ProxyError::NoRoute {
            absolute_form: true,
        });
    }
    let permit: OwnedSemaphorePermit = layer
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let host = target.host().trim_start_matches('[').trim_end_matches(']');
    let port = target.port_u16().unwrap_or_default();
    let addr = ssrf::checked_address(
        &*layer.resolver,
        host,
        port,
        &forward.tunnel_allow_addresses,
    )
    .await
    .map_err(|error| {
        tracing::warn!(target = %target, error = %crate::error::Chain(&error), "tunnel refused");
        match error {
            GuardError::Denied { reason, .. } => ProxyError::TunnelDenied(reason),
            GuardError::Resolve { source, .. } => ProxyError::TunnelUnreachable(source),
            GuardError::NoAddress { .. } => {
                ProxyError::TunnelUnreachable(io::ErrorKind::NotFound.into())
            }
        }
    })?;
    let mut upstream = tokio::time::timeout(layer.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(layer.connect_timeout))?
        .map_err(ProxyError::TunnelUnreachable)?;
    let _ = upstream.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _permit = permit;
        let mut client = match upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(error) => return tracing::debug!(%error, "tunnel upgrade failed"),
        };
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(%addr, up, down, "tunnel closed"),
            Err(error) => tracing::debug!(%addr, %error, "tunnel broke off"),
        }
    });
    tracing::info!(target = %target, %addr, "tunnel open");
    Ok(Response::new(ProxyBody::Full(None)))
}
