//! Serving a [`Gateway`]: its listeners, the accept loop with a connection limit, and graceful
//! shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::adapter::Hyper;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

use crate::body::{self, ClientBody};
use crate::config::ServerConfig;
use crate::ctx::Ctx;
use crate::error::BoxError;
use crate::framing::{self, Verdicts, Watched};
use crate::gateway::Gateway;
use crate::{admin, front, hibernate, stack, tls};

/// The most connections the admin listener serves at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// The most request headers a client may send (HTTP/1): 431 beyond.
pub const MAX_HEADERS: usize = 100;
/// The most bytes of request head a client may send (HTTP/1).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most concurrent HTTP/2 streams per client connection.
pub const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 flow-control window per stream, in bytes: what a client may send before we read.
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 flow-control window per connection, in bytes.
pub const H2_CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// The largest HTTP/2 header list a client may send, in bytes.
pub const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// The most bytes buffered per HTTP/2 stream for sending.
pub const H2_MAX_SEND_BUF: usize = 1024 * 1024;
/// Streams a client may reset before they are accepted (rapid-reset protection).
pub const H2_MAX_PENDING_RESETS: usize = 20;
/// How often an idle HTTP/2 client is pinged, and how long its answer may take.
pub const H2_KEEPALIVE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(10));
/// The listen backlog: connections the kernel completes and queues before tokengate accepts
/// them. A burst of new clients larger than this, while the accept loop is busy (or at
/// `max_connections`), has its SYNs dropped, each retried a second later. The kernel caps it at
/// `net.core.somaxconn` (4096 by default since Linux 5.4). tokio's own `bind` uses 128, as std
/// does, and nginx 511.
pub const LISTEN_BACKLOG: u32 = 4096;
/// The pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// The client preface of HTTP/2 with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A listener on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (as tokio's `bind` sets it).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound; `key` is the setting that chose its address.
    #[error("{key}: cannot listen on {addr}")]
    Listen {
        /// `server.listen` or `admin.listen`.
        key: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// Why, e.g. the address is in use.
        #[source]
        source: std::io::Error,
    },
    /// The listeners were bound, but serving them failed to start.
    #[error("cannot start serving")]
    Serve(#[source] std::io::Error),
}

impl Gateway {
    /// Binds the configured listeners and starts serving.
    pub async fn start(&self) -> Result<Running, StartError> {
        let config = &self.snapshot().config;
        let bind =
            |key, addr| listen(addr).map_err(|source| StartError::Listen { key, addr, source });
        let proxy = bind("server.listen", config.server.listen)?;
        let admin = bind("admin.listen", config.admin.listen)?;
        self.start_on(proxy, admin).map_err(StartError::Serve)
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
        let http = Arc::new(Http::new(server, self.metrics().hibernating()));
        let mut tasks = JoinSet::new();
        let service = stack::proxy(
            self.shared(),
            self.metrics(),
            &snapshot.config,
            self.resolver(),
        );
        let tls = match &server.tls {
            None => None,
            Some(t) => {
                let config =
                    tls::server_config(&t.cert_file, &t.key_file, t.client_ca_file.as_deref())
                        .map_err(std::io::Error::other)?;
                Some(InboundTls {
                    acceptor: tokio_rustls::TlsAcceptor::from(config),
                    handshake_timeout: server.header_read_timeout,
                })
            }
        };
        let limits = ServeLimits {
            max_connections: server.max_connections,
            shutdown_grace: server.shutdown_grace,
            tls,
        };
        tasks.spawn(serve(proxy, service, http.clone(), stopped.clone(), limits));
        let limits = ServeLimits {
            max_connections: MAX_ADMIN_CONNECTIONS,
            shutdown_grace: server.shutdown_grace,
            tls: None,
        };
        let service = admin::service(self.shared(), self.metrics());
        let http = Arc::new(Http::new(server, Gauge::default()));
        tasks.spawn(serve(admin, service, http, stopped, limits));
        tracing::info!(%proxy_addr, %admin_addr, routes = snapshot.config.routes.len(), "tokengate serving");
        self.keep_tokens_warm();
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

    /// Stops accepting, lets in-flight requests finish (up to `server.shutdown_grace`) and returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// How a listener speaks HTTP to its clients.
pub struct Http {
    /// Plain-TCP HTTP/1 clients, served with hibernation ([`hibernate`]).
    http1: Arc<hibernate::Http1>,
    /// Everyone else (TLS clients, HTTP/2 with prior knowledge): HTTP/1 or HTTP/2 as they speak.
    auto: auto::Builder<TokioExecutor>,
    /// How long a client may take to send its first bytes, or idle between requests.
    header_read_timeout: Duration,
}

/// The HTTP/1 settings, for hyper's builder and for hyper-util's view of one (the same methods,
/// but no trait in common). `header_read_timeout` is hyper's only for TLS clients; plain ones
/// have it from [`hibernate`], which checks it on the tick it already keeps instead of arming
/// a timer for every request.
macro_rules! http1_settings {
    ($builder:expr) => {
        $builder
            .timer(TokioTimer::new())
            .max_buf_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS)
            .keep_alive(true)
    };
}

impl Http {
    /// Both builders, with the same HTTP/1 settings; `hibernating` counts the listener's
    /// hibernating connections.
    pub fn new(server: &ServerConfig, hibernating: Gauge) -> Self {
        let mut builder = http1::Builder::new();
        http1_settings!(builder);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        http1_settings!(auto.http1()).header_read_timeout(server.header_read_timeout);
        http2_settings(&mut auto);
        Self {
            http1: Arc::new(hibernate::Http1 {
                builder,
                idle_timeout: server.header_read_timeout,
                hibernating,
                write_timeout: server.body_idle_timeout,
            }),
            auto,
            header_read_timeout: server.header_read_timeout,
        }
    }
}

fn http2_settings(builder: &mut auto::Builder<TokioExecutor>) {
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_send_buf_size(H2_MAX_SEND_BUF)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .keep_alive_interval(H2_KEEPALIVE.0)
        .keep_alive_timeout(H2_KEEPALIVE.1);
}

/// The bounds of one listener, and its TLS.
#[derive(Clone)]
pub struct ServeLimits {
    /// The most connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// How long open connections may finish after `stop` flips.
    pub shutdown_grace: Duration,
    /// Serve over TLS.
    pub tls: Option<InboundTls>,
}

/// Inbound TLS for a listener.
#[derive(Clone)]
pub struct InboundTls {
    /// The acceptor, with the certificate and any client verification.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// How long a handshake may take.
    pub handshake_timeout: Duration,
}

/// Accepts connections on `listener` and serves `service` on each, within `limits`, until `stop`
/// flips; then stops accepting and drains open connections for at most the shutdown grace.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    http: Arc<Http>,
    mut stop: watch::Receiver<bool>,
    limits: ServeLimits,
) where
    S: Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = bytes::Bytes> + body::CarriesHead + Send + 'static,
    B::Error: Into<BoxError>,
{
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
        let (service, http, mut stop, tls) = (
            service.clone(),
            http.clone(),
            stop.clone(),
            limits.tls.clone(),
        );
        tokio::spawn(async move {
            match tls {
                None => match speaks_http1(&stream, http.header_read_timeout, &mut stop).await {
                    // Its own task: nothing of this one stays with a long-lived idle connection.
                    Some(true) => {
                        let serving = front::serve(http.http1.clone(), stream, peer, service, stop);
                        tokio::spawn(served(peer, permit, serving));
                    }
                    Some(false) => {
                        let verdicts = Arc::new(Verdicts::default());
                        let service = Hyper(with_ctx(service, peer, verdicts.clone()));
                        let serving = serve_one(&http.auto, io(stream, verdicts), service, stop);
                        served(peer, permit, Box::pin(serving)).await;
                    }
                    None => {}
                },
                Some(tls) => {
                    let handshake = tls.acceptor.accept(stream);
                    match tokio::time::timeout(tls.handshake_timeout, Box::pin(handshake)).await {
                        Ok(Ok(stream)) => {
                            let verdicts = Arc::new(Verdicts::default());
                            let service = Hyper(with_ctx(service, peer, verdicts.clone()));
                            let serving =
                                serve_one(&http.auto, io(stream, verdicts), service, stop);
                            served(peer, permit, Box::pin(serving)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    // Every connection holds a permit until it ends: holding them all means all have drained.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.shutdown_grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace over; closing connections");
    }
}

/// `service` for requests hyper parses from `peer`: each gets its context, with the framing
/// watch's verdict on its head (the watch reads the client's bytes before hyper does).
/// Their responses get the headers their bodies carry in wire form ([`body::with_headers`]),
/// for hyper to write.
pub fn with_ctx<S, B>(
    service: S,
    peer: SocketAddr,
    verdicts: Arc<Verdicts>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<B>,
    Error = S::Error,
    Future = impl Future<Output = Result<Response<B>, S::Error>> + Send + 'static,
> + Clone
+ Send
+ Unpin
+ 'static
where
    S: Service<Request<ClientBody>, Response = Response<B>> + Clone + Send + Unpin + 'static,
    S::Future: Send + 'static,
    B: body::CarriesHead + 'static,
{
    service
        .map_request(move |req: Request<Incoming>| {
            let mut req = req.map(ClientBody::Hyper);
            req.extensions_mut()
                .insert(Ctx::new(Some(peer), verdicts.next()));
            req
        })
        .map_response(body::with_headers)
}

/// Runs a connection's `serving` to its end, holding its connection `permit` until then.
/// (A combinator, not an `async fn`: that would hold `serving` twice, as argument and awaitee.)
fn served(
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    serving: impl Future<Output = Result<(), BoxError>>,
) -> impl Future<Output = ()> {
    serving.map(move |ended| {
        drop(permit);
        if let Err(error) = ended {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    })
}

/// Serves one connection (upgrades allowed, for CONNECT tunnels) until it ends; once `stop`
/// flips, it finishes in-flight requests and closes (HTTP/2: GOAWAY).
async fn serve_one<IO, S, B>(
    http: &auto::Builder<TokioExecutor>,
    io: IO,
    service: S,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let conn = http.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => return served,
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Whether a plain-TCP client speaks HTTP/1, from its first bytes (peeked, so hyper still reads
/// them): anything that does not start like the HTTP/2 preface does. `None` if the client sends
/// nothing within `timeout` or before `stop` flips, or the socket fails.
async fn speaks_http1(
    stream: &TcpStream,
    timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = tokio::select! {
        peeked = tokio::time::timeout(timeout, stream.peek(&mut first)) => peeked.ok()?.ok()?,
        _ = stop.wait_for(|stopped| *stopped) => return None,
    };
    // Nothing (the client closed) or a part of the preface: hyper-util's sniffing decides.
    Some(n > 0 && first[..n] != H2_PREFACE[..n])
}

/// A client connection as hyper reads it: through the framing watch.
fn io<IO>(stream: IO, verdicts: Arc<Verdicts>) -> TokioIo<Watched<IO>> {
    TokioIo::new(framing::watched(stream, verdicts))
}
