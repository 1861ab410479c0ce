//! tokengate's own pool of HTTP/1.1 connections to one plain-HTTP upstream, over hyper's
//! low-level client (`hyper::client::conn::http1`).
//!
//! hyper-util's pooled client (still used for HTTPS upstreams, where ALPN may pick HTTP/2)
//! hashes its pool key twice per request and spawns a task per response to return the
//! connection; here a route already knows its upstream, so a checkout is a pop from one list,
//! and the connection goes back when the response body ends (see [`Checkin`]).
//!
//! - Checkout takes the most recently used idle connection (LIFO), skipping closed ones and
//!   ones idle longer than [`POOL_IDLE_TIMEOUT`]; without one it connects (within
//!   `connect_timeout`).
//! - A request that a pooled connection could not even start (the upstream had closed it) is
//!   sent once more on another connection; a request that was sent is never resent here.
//! - At most [`POOL_MAX_IDLE_PER_HOST`] idle connections are kept; there is no limit on busy
//!   ones (as with hyper-util). Idle connections are evicted when found stale at checkout, or
//!   when the upstream closes them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::ProxyBody;
use crate::upstream::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The TCP connect failed (or the name did not resolve).
    #[error("connect to {authority}: {source}")]
    Connect {
        /// The upstream.
        authority: Authority,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connect took longer than `connect_timeout`.
    #[error("connect to {0} timed out")]
    ConnectTimeout(Authority),
    /// The HTTP/1.1 exchange failed (including the client's request body failing).
    #[error("upstream exchange failed")]
    Send(#[source] hyper::Error),
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

/// The pool for one upstream `host:port`.
pub struct Pool {
    authority: Authority,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// A connection to give back to its pool once its response body has ended.
#[derive(Debug)]
pub struct Checkin {
    sender: SendRequest<ProxyBody>,
    pool: Arc<Pool>,
}

impl Checkin {
    /// The response ended: the connection may carry another request.
    pub fn done(self) {
        self.pool.put(self.sender);
    }
}

impl Pool {
    /// An empty pool for `authority` (`host:port`, port 80 if absent).
    pub fn new(authority: Authority, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            authority,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Sends `req` (its URI becomes origin-form) and returns the response head, with the
    /// connection to check in when the body ends.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<(Response<Incoming>, Checkin), PoolError> {
        let origin = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(origin);
        let mut resent = false;
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            if let Err(error) = sender.ready().await {
                if pooled {
                    continue; // closed meanwhile; the request is untouched
                }
                return Err(PoolError::Send(error));
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let checkin = Checkin {
                        sender,
                        pool: self.clone(),
                    };
                    return Ok((response, checkin));
                }
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if !resent => {
                        resent = true;
                        req = unsent;
                    }
                    _ => return Err(PoolError::Send(failed.into_error())),
                },
            }
        }
    }

    fn checkout(&self) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL_MAX_IDLE_PER_HOST {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self) -> Result<SendRequest<ProxyBody>, PoolError> {
        let host = self.authority.host();
        let host = host.trim_start_matches('[').trim_end_matches(']'); // an IPv6 literal
        let target = (host, self.authority.port_u16().unwrap_or(80));
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| PoolError::ConnectTimeout(self.authority.clone()))?
            .map_err(|source| PoolError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(PoolError::Send)?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%authority, %error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body::Body;
    use http_body_util::{BodyExt, Full};

    use super::*;
    use crate::body::{Guarded, Side};

    /// An upstream on 127.0.0.1 answering `ok` to every request; returns its address and the
    /// connections it accepted. With `one_shot`, it closes each connection after one answer,
    /// without saying so (as an upstream with a short keep-alive timeout does).
    async fn upstream(one_shot: bool) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                if one_shot {
                    // Read the head, answer as if keeping the connection, and close it.
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut head = Vec::new();
                        let mut buf = [0; 1024];
                        while !head.ends_with(b"\r\n\r\n") {
                            let Ok(n @ 1..) = stream.read(&mut buf).await else {
                                return;
                            };
                            head.extend_from_slice(&buf[..n]);
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        let _ = stream.write_all(answer).await;
                    });
                    continue;
                }
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::spawn(conn);
            }
        });
        (authority, accepted)
    }

    /// Sends one GET through `pool` and reads the answer as hyper's server does: until the body
    /// says it has ended (for a known length, that is after its last byte, with no `None`).
    async fn get(pool: &Arc<Pool>) -> Result<Bytes, PoolError> {
        let req = Request::get("http://upstream/x")
            .body(ProxyBody::full(Bytes::new()))
            .unwrap();
        let (response, checkin) = pool.send(req).await?;
        let idle = POOL_IDLE_TIMEOUT;
        let mut body =
            Guarded::new(response.into_body(), Side::Upstream, u64::MAX, idle).returning(checkin);
        let mut read = Vec::new();
        while !body.is_end_stream() {
            let frame = body.frame().await.expect("more body").unwrap();
            read.extend_from_slice(frame.data_ref().unwrap());
        }
        Ok(read.into())
    }

    #[tokio::test]
    async fn reuses_a_connection_once_its_response_has_ended() {
        let (authority, accepted) = upstream(false).await;
        let pool = Pool::new(authority, Duration::from_secs(5));
        for _ in 0..5 {
            assert_eq!(get(&pool).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // A response still being read keeps its connection: a second request gets another.
        let req = || {
            Request::get("/")
                .body(ProxyBody::full(Bytes::new()))
                .unwrap()
        };
        let (first, checkin) = pool.send(req()).await.unwrap();
        let (second, _) = pool.send(req()).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop((first, second, checkin));
    }

    #[tokio::test]
    async fn an_upstream_that_closed_its_idle_connections_is_reconnected_to() {
        let (authority, accepted) = upstream(true).await;
        let pool = Pool::new(authority, Duration::from_secs(5));
        for i in 0..20 {
            assert_eq!(get(&pool).await.unwrap(), "ok", "request {i}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let pool = Pool::new(authority, Duration::from_secs(5));
        assert!(matches!(get(&pool).await, Err(PoolError::Connect { .. })));
    }
}
