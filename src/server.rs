//! Serving: the [`Gateway`] built from a config, its listeners, the accept loop with a
//! connection limit, and graceful shutdown.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
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

use crate::access::{AccessPolicy, ClientAddr};
use crate::auth::cache::TokenSource;
use crate::auth::exchange::{ExchangeParams, Exchanger};
use crate::config::{Config, ConfigError, SecretEnv, ServerConfig};
use crate::error::BoxError;
use crate::route::{Route, RouteSpec, Routes};
use crate::upstream::UpstreamClient;
use crate::{admin, stack, tls, upstream};

/// The most connections the admin listener serves at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// The most request headers a client may send (HTTP/1): 431 beyond.
pub const MAX_HEADERS: usize = 100;
/// The most bytes of request head a client may send (HTTP/1).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most concurrent HTTP/2 streams per client connection.
pub const MAX_H2_STREAMS: u32 = 256;
/// How long in-flight requests may finish after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// The pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Everything a config describes, built and ready to serve.
pub struct Gateway {
    config: Config,
    access: AccessPolicy,
    credentials: Arc<BTreeMap<String, TokenSource>>,
    routes: Arc<Routes>,
}

impl Gateway {
    /// Resolves secrets, builds TLS clients, token sources and routes. `file` names the config
    /// in errors.
    pub fn new(config: Config, file: &str, env: &dyn SecretEnv) -> Result<Self, ConfigError> {
        let err = |key: String, problem: String| ConfigError {
            file: file.to_owned(),
            key,
            problem,
        };
        let mut credentials = BTreeMap::new();
        for (name, c) in &config.credentials {
            let secrets = config.resolve_secrets(name, env, file)?;
            let connector = tls::connector(c.ca_file.as_deref())
                .map_err(|e| err(format!("credentials.{name}.ca_file"), e.to_string()))?;
            let params = ExchangeParams {
                auth_url: c.auth_url.0.clone(),
                agent_id: c.agent_id.clone(),
                secret: secrets.secret,
                key: secrets.key,
                signature: c.signature,
                layout: c.cipher_text_layout,
                timeout: c.timeout,
            };
            let exchanger = Exchanger::new(params, connector)
                .map_err(|e| err(format!("credentials.{name}.agent_id"), e.to_string()))?;
            credentials.insert(
                name.clone(),
                TokenSource::new(name, exchanger, c.refresh_before, c.max_backoff),
            );
        }

        let access = AccessPolicy {
            allowed_clients: config.server.allowed_clients.clone().map(Into::into),
            required_header: config.resolve_client_key(env, file)?.map(Arc::new),
        };
        let mut clients: HashMap<Option<PathBuf>, UpstreamClient> = HashMap::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let client = match clients.get(&r.ca_file) {
                Some(c) => c.clone(),
                None => {
                    let connector = tls::connector(r.ca_file.as_deref())
                        .map_err(|e| err(format!("routes[{i}].ca_file"), e.to_string()))?;
                    let c = upstream::client(connector);
                    clients.insert(r.ca_file.clone(), c.clone());
                    c
                }
            };
            let spec = RouteSpec {
                name: format!("routes[{i}]"),
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                upstream: r.upstream.0.clone(),
                strip_prefix: r.strip_prefix,
                client_authorization: r.client_authorization,
                credential: credentials[&r.credential].clone(),
                client,
            };
            let route = Route::new(spec).ok_or_else(|| {
                err(
                    format!("routes[{i}].upstream"),
                    "must be an absolute URL".into(),
                )
            })?;
            routes.push(route);
        }
        Ok(Self {
            config,
            access,
            credentials: Arc::new(credentials),
            routes: Arc::new(Routes::new(routes)),
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The token source of credential `name`.
    pub fn credential(&self, name: &str) -> Option<&TokenSource> {
        self.credentials.get(name)
    }

    /// Binds the configured listeners and starts serving.
    pub async fn start(&self) -> std::io::Result<Running> {
        let proxy = TcpListener::bind(self.config.server.listen).await?;
        let admin = TcpListener::bind(self.config.admin.listen).await?;
        self.start_on(proxy, admin)
    }

    /// Starts serving on listeners the caller bound (tests bind `127.0.0.1:0`).
    pub fn start_on(&self, proxy: TcpListener, admin: TcpListener) -> std::io::Result<Running> {
        let proxy_addr = proxy.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let http = Arc::new(http_builder(&self.config.server));
        let mut tasks = JoinSet::new();
        let service = stack::proxy(
            self.routes.clone(),
            self.access.clone(),
            &self.config.server,
        );
        let max_connections = self.config.server.max_connections;
        tasks.spawn(serve(
            proxy,
            service,
            http.clone(),
            stopped.clone(),
            max_connections,
        ));
        let service = admin::service(self.credentials.clone());
        tasks.spawn(serve(admin, service, http, stopped, MAX_ADMIN_CONNECTIONS));
        tracing::info!(%proxy_addr, %admin_addr, routes = self.config.routes.len(), "tokengate serving");
        Ok(Running {
            proxy_addr,
            admin_addr,
            stop,
            tasks,
        })
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("credentials", &self.credentials)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
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

/// Accepts connections on `listener` and serves `service` on each, at most `max_connections` at
/// once, until `stop` flips; then drains open connections for at most [`SHUTDOWN_GRACE`].
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    http: Arc<auto::Builder<TokioExecutor>>,
    mut stop: watch::Receiver<bool>,
    max_connections: usize,
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
    let permits = Arc::new(Semaphore::new(max_connections));
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
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown grace over; closing connections"),
    }
}
