//! Serving a [`Gateway`]: its listeners, the accept loop with a connection limit, and graceful
//! shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tower::Service;
use tower_http::add_extension::AddExtension;

use crate::access::ClientAddr;
use crate::config::ServerConfig;
use crate::error::BoxError;
use crate::gateway::Gateway;
use crate::{admin, stack};

/// The most connections the admin listener serves at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// The most request headers a client may send (HTTP/1): 431 beyond.
pub const MAX_HEADERS: usize = 100;
/// The most bytes of request head a client may send (HTTP/1).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most concurrent HTTP/2 streams per client connection.
pub const MAX_H2_STREAMS: u32 = 256;
/// The pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

impl Gateway {
    /// Binds the configured listeners and starts serving.
    pub async fn start(&self) -> std::io::Result<Running> {
        let config = &self.snapshot().config;
        let proxy = TcpListener::bind(config.server.listen).await?;
        let admin = TcpListener::bind(config.admin.listen).await?;
        self.start_on(proxy, admin)
    }

    /// Starts serving on listeners the caller bound (tests bind `127.0.0.1:0`). `[server]`
    /// settings are read now and stay until restart; routes, credentials and access follow
    /// reloads.
    pub fn start_on(&self, proxy: TcpListener, admin: TcpListener) -> std::io::Result<Running> {
        let proxy_addr = proxy.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let snapshot = self.snapshot();
        let server = &snapshot.config.server;
        let (stop, stopped) = watch::channel(false);
        let http = Arc::new(http_builder(server));
        let mut tasks = JoinSet::new();
        let service = stack::proxy(self.shared(), server);
        let limits = ServeLimits {
            max_connections: server.max_connections,
            shutdown_grace: server.shutdown_grace,
        };
        tasks.spawn(serve(proxy, service, http.clone(), stopped.clone(), limits));
        let limits = ServeLimits {
            max_connections: MAX_ADMIN_CONNECTIONS,
            shutdown_grace: server.shutdown_grace,
        };
        let service = admin::service(self.shared());
        tasks.spawn(serve(admin, service, http, stopped, limits));
        tracing::info!(%proxy_addr, %admin_addr, routes = snapshot.config.routes.len(), "tokengate serving");
        Ok(Running {
            proxy_addr,
            admin_addr,
            stop,
            tasks,
        })
    }
}

/// A serving gateway; [`Running::shutdown`] drains it.
#[derive(Debug)]
pub struct Running {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Where the proxy listens.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Where the admin endpoints listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Stops accepting, lets in-flight requests finish (up to [`SHUTDOWN_GRACE`]) and returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

fn http_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS);
    builder
}

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// The most connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// How long open connections may finish after `stop` flips.
    pub shutdown_grace: Duration,
}

/// Accepts connections on `listener` and serves `service` on each, within `limits`, until `stop`
/// flips; then stops accepting and drains open connections for at most the shutdown grace.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    http: Arc<auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
    limits: ServeLimits,
) where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = AddExtension::new(service.clone(), ClientAddr(peer));
        let conn = http
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%peer, error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_grace) => tracing::warn!("shutdown grace over; closing connections"),
    }
}
