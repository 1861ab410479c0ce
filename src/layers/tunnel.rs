//! CONNECT tunnels for egress clients: a target listed in `[forward] tunnel_allow`, resolved
//! and checked by the SSRF guard ([`crate::upstream::ssrf`]), dialled at exactly the checked address, and
//! bytes copied both ways. Tunnels are blind: they carry no token.
//!
//! Without `tunnel_allow`, CONNECT is refused (405) by admission, before it gets here.

pub mod observe;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{BoxFuture, Either};
use http::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::body::ProxyBody;
use crate::config::ForwardConfig;
use crate::error::{BoxError, ProxyError};
use crate::gateway::SharedLive;
use crate::http1::OnUpgrade;
use crate::http1::upgrade::Io;
use crate::layers::tunnel::observe::{Observed, Observer};
use crate::upstream::ssrf::{self, GuardError, Resolve};

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
    S: Service<Request<B>, Response = Response<ProxyBody>>,
    S::Error: From<ProxyError> + Send + 'static,
    B: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<ProxyBody>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if req.method() != Method::CONNECT {
            return Either::Left(self.inner.call(req));
        }
        let live = self.layer.live.load_full();
        if live.config.forward.tunnel_allow.is_empty() {
            // Tunnels were configured when the request was admitted, and are no longer.
            let refused = ProxyError::MethodNotAllowed(Method::CONNECT);
            return Either::Right(Box::pin(std::future::ready(Err(refused.into()))));
        }
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            open(req, &live.config.forward, &layer)
                .await
                .map_err(S::Error::from)
        }))
    }
}

/// Checks, dials and answers one CONNECT; the copying runs on its own task after the upgrade.
async fn open<B>(
    mut req: Request<B>,
    forward: &ForwardConfig,
    layer: &TunnelLayer,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (target, port) = req
        .uri()
        .authority()
        .and_then(|a| Some((a.clone(), a.port_u16()?)))
        .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    if !forward.allows_tunnel(target.as_str()) {
        return Err(ProxyError::TunnelNotListed(target));
    }
    let permit = layer
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ProxyError::Overloaded)?;
    let host = target.host().trim_start_matches('[').trim_end_matches(']');
    let addr = ssrf::checked_address(
        &*layer.resolver,
        host,
        port,
        &forward.tunnel_allow_addresses,
    )
    .await
    .map_err(|error| {
        tracing::warn!(target = %target, error = %crate::ErrorChain(&error), "tunnel refused");
        match error {
            GuardError::Denied { reason, .. } => ProxyError::TunnelDenied(reason),
            GuardError::Resolve { source, .. } => ProxyError::TunnelUnreachable(source),
            GuardError::NoAddress { .. } => {
                ProxyError::TunnelUnreachable(io::ErrorKind::NotFound.into())
            }
        }
    })?;
    let upstream = tokio::time::timeout(layer.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ProxyError::UpstreamTimeout(layer.connect_timeout))?
        .map_err(ProxyError::TunnelUnreachable)?;
    let _ = upstream.set_nodelay(true);
    let upgrade = client_connection(&mut req);
    let idle_timeout = forward.tunnel_idle_timeout;
    tokio::spawn(async move {
        let _permit = permit;
        let client = match upgrade.await {
            Ok(client) => client,
            Err(error) => return tracing::debug!(%error, "tunnel upgrade failed"),
        };
        match relay(client, upstream, idle_timeout).await {
            Ok((up, down)) => tracing::debug!(%addr, up, down, "tunnel closed"),
            Err(error) => tracing::debug!(%addr, %error, "tunnel ended"),
        }
    });
    tracing::info!(target = %target, %addr, "tunnel open");
    Ok(Response::new(ProxyBody::Full(None)))
}

/// The client's connection once the CONNECT's answer is out: from tokengate's own HTTP/1
/// server side, or from hyper's HTTP/2 (a stream).
fn client_connection<B>(req: &mut Request<B>) -> BoxFuture<'static, Result<Box<dyn Io>, BoxError>> {
    match req.extensions_mut().remove::<OnUpgrade>() {
        Some(on_upgrade) => Box::pin(async move {
            let client = on_upgrade.upgraded().await?;
            Ok(Box::new(client) as Box<dyn Io>)
        }),
        None => {
            let upgrade = hyper::upgrade::on(req);
            Box::pin(async move {
                let client = TokioIo::new(upgrade.await?);
                Ok(Box::new(client) as Box<dyn Io>)
            })
        }
    }
}

/// Copies both ways until either side closes, or until no byte has moved either way for
/// `idle_timeout`.
async fn relay<A, B>(client: A, upstream: B, idle_timeout: Duration) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity {
        start: Instant::now(),
        moved: Arc::new(AtomicU64::new(0)),
    };
    let (mut client, mut upstream) = (
        Observed::new(client, activity.clone()),
        Observed::new(upstream, activity.clone()),
    );
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        let last = activity.last();
        tokio::select! {
            done = &mut copy => return done,
            _ = tokio::time::sleep_until(last + idle_timeout) => {
                if activity.last() == last {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel idle"));
                }
            }
        }
    }
}

/// Notes, for both sides of a tunnel, when bytes last moved: milliseconds after `start`.
#[derive(Clone)]
struct Activity {
    start: Instant,
    moved: Arc<AtomicU64>,
}

impl Activity {
    fn note(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.moved.store(ms, Ordering::Relaxed);
    }

    /// When bytes last moved.
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.moved.load(Ordering::Relaxed))
    }
}

impl Observer for Activity {
    fn read(&mut self, _: &[u8]) {
        self.note();
    }

    fn wrote(&mut self, _: usize) {
        self.note();
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    /// The tokio clock is paused, so "idle for a minute" is exact and instant.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_lives_while_bytes_move_and_closes_after_idle_timeout() {
        let (client, mut client_end) = duplex(64);
        let (upstream, mut upstream_end) = duplex(64);
        let relay = tokio::spawn(relay(client, upstream, IDLE));

        // A one-way trickle, every 40 s, for 4 minutes: never idle for 60 s, so it stays open.
        let mut buf = [0u8; 4];
        for _ in 0..6 {
            upstream_end.write_all(b"data").await.unwrap();
            client_end.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"data");
            tokio::time::sleep(Duration::from_secs(40)).await;
            assert!(!relay.is_finished(), "closed while bytes were moving");
        }
        // Then silence: it closes once a full minute passes with nothing moving.
        tokio::time::sleep(Duration::from_secs(21)).await;
        let ended = relay.await.unwrap().unwrap_err();
        assert_eq!(ended.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_ends_when_either_side_closes() {
        let (client, mut client_end) = duplex(64);
        let (upstream, upstream_end) = duplex(64);
        let relay = tokio::spawn(relay(client, upstream, IDLE));
        client_end.write_all(b"up").await.unwrap();
        drop(client_end);
        let mut upstream_end = upstream_end;
        let mut got = Vec::new();
        upstream_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"up");
        drop(upstream_end);
        assert_eq!(relay.await.unwrap().unwrap(), (2, 0));
    }
}
