//! Serving a [`Gateway`]: its listeners, the accept loop with a connection limit, and graceful
//! shutdown.

pub mod hyper_service;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tower::{Service, ServiceExt};

use crate::body::ClientBody;
use crate::config::ServerConfig;
use crate::ctx::Ctx;
use crate::error::{BoxError, ProxyError};
use crate::gateway::Gateway;
use crate::http1::{self, CarriesHead, Refusal, Rewound};
use crate::server::hyper_service::Hyper;
use crate::{admin, stack, tls};

/// The most connections the admin listener serves at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
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
        tasks.spawn(serve(
            proxy,
            service,
            refuse,
            http.clone(),
            stopped.clone(),
            limits,
        ));
        let limits = ServeLimits {
            max_connections: MAX_ADMIN_CONNECTIONS,
            shutdown_grace: server.shutdown_grace,
            tls: None,
        };
        let service = admin::service(self.shared(), self.metrics());
        let http = Arc::new(Http::new(server, Gauge::default()));
        tasks.spawn(serve(admin, service, refuse, http, stopped, limits));
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

/// The answer to a request head the HTTP/1 server side refuses: its JSON error.
fn refuse(refusal: Refusal) -> crate::body::ProxyResponse {
    ProxyError::from(refusal).into_response()
}

/// How a listener speaks HTTP to its clients.
pub struct Http {
    /// HTTP/1 clients: tokengate's own server side.
    http1: http1::Http1,
    /// HTTP/2 clients (with prior knowledge, or by ALPN): hyper.
    http2: http2::Builder<TokioExecutor>,
}

impl Http {
    /// Both protocols' settings; `hibernating` counts the listener's HTTP/1 connections waiting
    /// between requests.
    pub fn new(server: &ServerConfig, hibernating: Gauge) -> Self {
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_H2_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .keep_alive_interval(H2_KEEPALIVE.0)
            .keep_alive_timeout(H2_KEEPALIVE.1);
        Self {
            http1: http1::Http1 {
                header_read_timeout: server.header_read_timeout,
                write_timeout: server.body_idle_timeout,
                hibernating,
            },
            http2,
        }
    }
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
/// `refuse` answers the HTTP/1 request heads that are refused.
pub async fn serve<S, B, R>(
    listener: TcpListener,
    service: S,
    refuse: R,
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
    B: Body<Data = bytes::Bytes> + CarriesHead + Send + 'static,
    B::Error: Into<BoxError> + std::fmt::Display + Send,
    R: Fn(Refusal) -> Response<B> + Clone + Send + Sync + 'static,
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
        let (service, refuse, http, stop, tls) = (
            service.clone(),
            refuse.clone(),
            http.clone(),
            stop.clone(),
            limits.tls.clone(),
        );
        // One task type per transport, so a plain connection's task is not sized for TLS.
        let Some(tls) = tls else {
            tokio::spawn(async move {
                let serving = serve_connection(http, stream, false, peer, service, refuse, stop);
                served(peer, permit, serving).await;
            });
            continue;
        };
        tokio::spawn(async move {
            let handshake = tls.acceptor.accept(stream);
            match tokio::time::timeout(tls.handshake_timeout, Box::pin(handshake)).await {
                Ok(Ok(stream)) => {
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let serving = serve_connection(http, stream, h2, peer, service, refuse, stop);
                    served(peer, permit, serving).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
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

/// Serves one client connection: HTTP/2 if ALPN chose it (`h2`) or the client opens with the
/// HTTP/2 preface, else HTTP/1. Either way the chosen server reads every byte from there on.
async fn serve_connection<IO, S, B>(
    http: Arc<Http>,
    mut io: IO,
    h2: bool,
    peer: SocketAddr,
    service: S,
    refuse: impl Fn(Refusal) -> Response<B>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static,
    S: Service<Request<ClientBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Unpin
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = bytes::Bytes> + CarriesHead + Send + 'static,
    B::Error: Into<BoxError> + std::fmt::Display + Send,
{
    let (read, h2) = if h2 {
        (BytesMut::new(), true)
    } else {
        let first = first_bytes(&mut io, http.http1.header_read_timeout, &mut stop);
        match first.await? {
            Some(first) => first,
            None => return Ok(()),
        }
    };
    if h2 {
        let io = WriteTimeout::new(Rewound::new(Box::new(io), read), http.http1.write_timeout);
        let service = Hyper(with_ctx(service, peer));
        return Box::pin(serve_http2(&http.http2, io, service, stop)).await;
    }
    let tag = |extensions: &mut http::Extensions| {
        extensions.insert(Ctx::new(Some(peer)));
    };
    Ok(http1::serve(&http.http1, io, read, service, tag, refuse, stop).await?)
}

/// Reads a new client's first bytes, until they tell HTTP/2 with prior knowledge (its preface)
/// from HTTP/1: the bytes, and whether it is HTTP/2. `None` if the client closes or sends
/// nothing within `timeout`, or the listener stops.
async fn first_bytes<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<Option<(BytesMut, bool)>> {
    let mut first = BytesMut::new();
    let reading = async {
        loop {
            // Onto the stack, then into a buffer of the size that came (as for every head).
            let n = std::future::poll_fn(|cx| {
                let mut room = [MaybeUninit::<u8>::uninit(); http1::READ_SIZE];
                let mut read = ReadBuf::uninit(&mut room);
                ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
                first.extend_from_slice(read.filled());
                Poll::Ready(Ok::<_, io::Error>(read.filled().len()))
            })
            .await?;
            let seen = first.len().min(H2_PREFACE.len());
            if n == 0 || first[..seen] != H2_PREFACE[..seen] {
                return Ok::<_, io::Error>(Some(n > 0));
            }
            if seen == H2_PREFACE.len() {
                return Ok(Some(true));
            }
        }
    };
    let spoke = tokio::select! {
        spoke = tokio::time::timeout(timeout, reading) => spoke.unwrap_or(Ok(None))?,
        _ = stop.wait_for(|stopped| *stopped) => None,
    };
    if spoke != Some(true) {
        return Ok(None);
    }
    let h2 = first.starts_with(H2_PREFACE);
    Ok(Some((first, h2)))
}

/// `service` for requests hyper parses from `peer` (HTTP/2): each gets its context; their
/// responses get the headers their bodies carry in wire form ([`http1::response::with_headers`]),
/// for hyper to write.
pub fn with_ctx<S, B>(
    service: S,
    peer: SocketAddr,
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
    B: CarriesHead + 'static,
{
    service
        .map_request(move |req: Request<Incoming>| {
            let mut req = req.map(ClientBody::Hyper);
            req.extensions_mut().insert(Ctx::new(Some(peer)));
            req
        })
        .map_response(http1::response::with_headers)
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

/// Serves one HTTP/2 connection until it ends; once `stop` flips, it finishes in-flight
/// streams and closes (GOAWAY).
async fn serve_http2<IO, S, B>(
    http: &http2::Builder<TokioExecutor>,
    io: IO,
    service: S,
    mut stop: watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => return Ok(served?),
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
    conn.as_mut().graceful_shutdown();
    Ok(conn.await?)
}

/// A connection whose writes may each wait at most `timeout` for the peer to take bytes: past
/// it, the write fails and the connection ends (a client that stopped reading).
struct WriteTimeout<IO> {
    io: IO,
    timeout: Duration,
    /// Armed while a write waits.
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<IO> WriteTimeout<IO> {
    fn new(io: IO, timeout: Duration) -> Self {
        Self {
            io,
            timeout,
            waiting: None,
        }
    }

    /// `poll`'s answer, or a timeout error once a write has waited `timeout`.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(Pin<&mut IO>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        IO: Unpin,
    {
        if let Poll::Ready(done) = poll(Pin::new(&mut self.io), cx) {
            self.waiting = None;
            return Poll::Ready(done);
        }
        let timeout = self.timeout;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(waiting.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading",
        )))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().bounded(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .bounded(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().bounded(cx, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
