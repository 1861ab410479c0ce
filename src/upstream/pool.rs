//! tokengate's pool of HTTP/1.1 connections to one plain-HTTP upstream.
//!
//! A request whose body the proxy holds whole (none, or one buffered for replay) goes out
//! through tokengate's own client codec ([`crate::http1::client`]) on a pooled connection, driven by the
//! task serving the client. A request whose body streams goes through hyper's client, which
//! reads an early response while the body is still being sent.
//!
//! - Checkout takes the most recently used idle connection (LIFO), skipping ones the upstream
//!   closed and ones idle longer than [`POOL_IDLE_TIMEOUT`], counted from when their last
//!   request was sent (the request's clock reading: no other); without one it connects (within
//!   `connect_timeout`). Each return evicts the oldest idle connection if it has expired.
//! - A connection goes back when its response has been read to the end; a response dropped
//!   before its end closes its connection.
//! - A request that fails on a reused connection before any byte of a response arrived is sent
//!   once more, on a new connection, if none of it was sent or its method is idempotent (the
//!   upstream may have closed the idle connection as the request went out). nginx retries such
//!   requests the same way; a `POST` that may have reached the upstream is not resent.
//! - At most [`POOL_MAX_IDLE_PER_HOST`] idle connections are kept; there is no limit on busy
//!   ones (as with hyper-util).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response, request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;

use crate::body::{PeerBody, ProxyBody};
use crate::http1::client::{self as h1, Conn};
use crate::upstream::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE_PER_HOST};

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The TCP connect failed (or the name did not resolve).
    #[error("connect to {authority}")]
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
    /// The exchange with the upstream failed.
    #[error("upstream exchange failed")]
    Exchange(#[source] h1::Error),
    /// The exchange of a streamed request through hyper's client failed (including the
    /// client's request body failing).
    #[error("upstream exchange failed")]
    Streamed(#[source] hyper_util::client::legacy::Error),
}

struct Idle {
    conn: Box<Conn>,
    /// When it has idled [`POOL_IDLE_TIMEOUT`] (a comparison per checkout, no subtraction).
    stale_at: Instant,
}

/// The pool for one upstream `host:port`.
pub struct Pool {
    authority: Authority,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<Idle>>,
    /// hyper's client, for requests whose body streams.
    streaming: Client<HttpConnector, ProxyBody>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool for `authority` (`host:port`, port 80 if absent).
    pub fn new(authority: Authority, connect_timeout: Duration) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let streaming = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Arc::new(Self {
            authority,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
            streaming,
        })
    }

    /// Sends the request of `parts` with the whole `body` (its URI goes out in origin form) and
    /// returns the response, whose head must arrive by `due`, and whose body gives the
    /// connection back when it has been read to its end. The request stays the caller's, for a
    /// replay.
    pub async fn send(
        self: &Arc<Self>,
        parts: &request::Parts,
        body: &[u8],
        now: Instant,
        due: Instant,
    ) -> Result<Response<PeerBody>, PoolError> {
        let mut fresh = false;
        loop {
            let (mut conn, reused) = match self.checkout(fresh, now) {
                Some(conn) => (conn, true),
                // Boxed: the rare connect keeps its room out of every request's future.
                None => (Box::pin(self.connect()).await?, false),
            };
            conn.mark_sent(now); // its idle time counts from here when it comes back
            let home = self.clone() as Arc<dyn h1::Home>;
            match h1::exchange(conn, parts, body, due, home).await {
                Ok((head, body)) => return Ok(Response::from_parts(head, PeerBody::H1(body))),
                Err(failed)
                    if reused
                        && failed.unanswered
                        && (failed.unsent || parts.method.is_idempotent()) =>
                {
                    tracing::debug!(authority = %self.authority, error = %failed.error, "reused connection failed; sending again on a new one");
                    fresh = true;
                }
                Err(failed) => return Err(PoolError::Exchange(failed.error)),
            }
        }
    }

    /// Sends `req`, whose body streams, through hyper's client.
    pub async fn send_streaming(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<PeerBody>, PoolError> {
        let response = self.streaming.request(req).await;
        response
            .map(|r| r.map(PeerBody::Hyper))
            .map_err(PoolError::Streamed)
    }

    /// The most recently used idle connection that can carry a request at `now` (none if
    /// `fresh`).
    fn checkout(&self, fresh: bool, now: Instant) -> Option<Box<Conn>> {
        if fresh {
            return None;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(Idle { mut conn, stale_at }) = idle.pop_back() {
            if now < stale_at && conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Box<Conn>, PoolError> {
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
        Ok(Conn::new(stream))
    }
}

impl h1::Home for Pool {
    fn put(&self, conn: Box<Conn>) {
        // No clock reading of its own: the request's, from when it was sent. A connection is
        // thereby retired early (by its last response's duration), never late.
        let now = conn.sent_at().unwrap_or_else(Instant::now);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.front().is_some_and(|oldest| now >= oldest.stale_at) {
            idle.pop_front();
        }
        if idle.len() < POOL_MAX_IDLE_PER_HOST {
            idle.push_back(Idle {
                conn,
                stale_at: now + POOL_IDLE_TIMEOUT,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::{HeaderMap, Method, StatusCode};
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What a scripted upstream does with a request.
    enum Answer {
        /// Writes these bytes and keeps the connection.
        Send(&'static [u8]),
        /// Writes these bytes and closes the connection.
        SendAndClose(&'static [u8]),
        /// Closes the connection without a word.
        Hang,
    }

    /// A raw-TCP upstream on 127.0.0.1 answering each request (on whichever connection) with
    /// the next scripted answer; counts connections and keeps each request it read.
    struct Scripted {
        authority: Authority,
        accepted: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    async fn scripted(answers: Vec<Answer>) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let (count, log) = (accepted.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (answers, log) = (answers.clone(), log.clone());
                tokio::spawn(async move {
                    while let Some(request) = read_request(&mut stream).await {
                        log.lock().unwrap().push(request);
                        let answer = answers.lock().unwrap().pop_front();
                        match answer {
                            Some(Answer::Send(bytes)) => stream.write_all(bytes).await.unwrap(),
                            Some(Answer::SendAndClose(bytes)) => {
                                stream.write_all(bytes).await.unwrap();
                                return;
                            }
                            Some(Answer::Hang) | None => return,
                        }
                    }
                });
            }
        });
        Scripted {
            authority,
            accepted,
            seen,
        }
    }

    /// Reads one request: its head, and a `content-length` body.
    async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            request.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&request).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await.ok()?;
        request.extend_from_slice(&body);
        Some(request)
    }

    fn request(method: Method, body: &'static [u8]) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::full(Bytes::from_static(body)));
        *req.method_mut() = method;
        *req.uri_mut() = "http://upstream/x?y=1".parse().unwrap();
        req
    }

    /// Sends `req` (whose body is whole) through `pool`.
    async fn send_one(
        pool: &Arc<Pool>,
        req: Request<ProxyBody>,
    ) -> Result<Response<PeerBody>, PoolError> {
        let (parts, body) = req.into_parts();
        let ProxyBody::Full(body) = body else {
            panic!("a whole body");
        };
        let now = Instant::now();
        pool.send(
            &parts,
            &body.unwrap_or_default(),
            now,
            now + Duration::from_secs(30),
        )
        .await
    }

    /// Sends `req` and reads the whole answer as hyper's server would.
    async fn send(
        pool: &Arc<Pool>,
        req: Request<ProxyBody>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), PoolError> {
        let response = send_one(pool, req).await?;
        let (mut parts, mut body) = response.into_parts();
        if let PeerBody::H1(h1) = &mut body
            && let Some(wire) = h1.take_wire_head()
        {
            wire.append_to(&mut parts.headers);
        }
        let body = body.collect().await.expect("whole body").to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    async fn get(pool: &Arc<Pool>) -> Result<Bytes, PoolError> {
        send(pool, request(Method::GET, b""))
            .await
            .map(|(_, _, body)| body)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn reuses_a_connection_once_its_response_has_ended() {
        let up = scripted((0..7).map(|_| Answer::Send(OK)).collect()).await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        for _ in 0..5 {
            assert_eq!(get(&pool).await.unwrap(), "ok");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            up.seen.lock().unwrap()[0],
            b"GET /x?y=1 HTTP/1.1\r\n\r\n",
            "origin-form, no length for an empty GET"
        );

        // A response not yet read keeps its connection: a second request gets another.
        let first = send_one(&pool, request(Method::GET, b"")).await.unwrap();
        let second = send_one(&pool, request(Method::GET, b"")).await.unwrap();
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        drop((first, second));
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_since_its_last_send_is_not_reused() {
        let up = scripted((0..3).map(|_| Answer::Send(OK)).collect()).await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        let (parts, _) = request(Method::GET, b"").into_parts();
        // Sent (by its clock reading) a whole idle timeout ago: stale the moment it is back.
        let long_ago = Instant::now() - POOL_IDLE_TIMEOUT;
        let due = Instant::now() + Duration::from_secs(30);
        let response = pool.send(&parts, b"", long_ago, due).await.unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(get(&pool).await.unwrap(), "ok");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "a new connection");
        // Sent just now, it is fresh when back, and reused.
        assert_eq!(get(&pool).await.unwrap(), "ok");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2, "the same connection");
    }

    #[tokio::test]
    async fn an_upstream_that_closed_its_idle_connections_is_reconnected_to() {
        let up = scripted((0..20).map(|_| Answer::SendAndClose(OK)).collect()).await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        for i in 0..20 {
            assert_eq!(get(&pool).await.unwrap(), "ok", "request {i}");
        }
        assert_eq!(up.accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_get_that_met_a_closing_connection_is_sent_again_but_a_post_is_not() {
        // The second request on the first connection meets an upstream that closes it.
        let up = scripted(vec![Answer::Send(OK), Answer::Hang, Answer::Send(OK)]).await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        assert_eq!(get(&pool).await.unwrap(), "ok");
        assert_eq!(
            get(&pool).await.unwrap(),
            "ok",
            "sent again on a new connection"
        );
        assert_eq!(up.seen.lock().unwrap().len(), 3);
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);

        let up = scripted(vec![Answer::Send(OK), Answer::Hang, Answer::Send(OK)]).await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        let post = || request(Method::POST, b"pay once");
        assert_eq!(send(&pool, post()).await.unwrap().2, "ok");
        let failed = send(&pool, post())
            .await
            .expect_err("may have reached the upstream");
        assert!(
            matches!(failed, PoolError::Exchange(h1::Error::Closed)),
            "{failed:?}"
        );
        assert_eq!(up.seen.lock().unwrap().len(), 2, "not sent a second time");
        let seen = String::from_utf8(up.seen.lock().unwrap()[1].clone()).unwrap();
        assert!(
            seen.ends_with("content-length: 8\r\n\r\npay once"),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn reads_every_response_framing_and_reuses_only_what_ended_cleanly() {
        let up = scripted(vec![
            // Chunked, with an extension and a trailer: reused.
            Answer::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n"),
            // Informational answers first, then a 204 (no body, whatever it declares).
            Answer::Send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"),
            // HEAD: a length, and no body.
            Answer::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n"),
            // Connection: close: the body is read, the connection is not reused.
            Answer::Send(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nz"),
            // HTTP/1.0 without a length: read until the upstream closes.
            Answer::SendAndClose(b"HTTP/1.0 200 OK\r\n\r\nuntil close"),
            Answer::Send(OK),
        ])
        .await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        let (status, headers, body) = send(&pool, request(Method::GET, b"")).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"abcde"[..]));
        assert!(
            headers.get("transfer-encoding").is_none(),
            "framing is per hop"
        );
        let (status, _, body) = send(&pool, request(Method::PUT, b"x")).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (status, headers, body) = send(&pool, request(Method::HEAD, b"")).await.unwrap();
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        assert_eq!(headers["content-length"], "99");
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            1,
            "all on one connection so far"
        );
        assert_eq!(get(&pool).await.unwrap(), "z");
        assert_eq!(get(&pool).await.unwrap(), "until close");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(get(&pool).await.unwrap(), "ok");
        assert_eq!(up.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn hop_by_hop_response_headers_and_those_connection_names_are_left_out() {
        let up = scripted(vec![Answer::Send(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-Kept: yes\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\ncontent-length: 0\r\n\r\n",
        )])
        .await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        let (_, headers, _) = send(&pool, request(Method::GET, b"")).await.unwrap();
        let mut names: Vec<_> = headers.keys().map(|n| n.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "set-cookie", "x-kept"]);
        assert_eq!(headers.get_all("set-cookie").iter().count(), 2);
    }

    #[tokio::test]
    async fn header_names_remembered_from_the_last_response_never_mislabel_a_value() {
        let up = scripted(vec![
            Answer::Send(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Type: t1\r\nX-Long-Custom-Name: c1\r\ncontent-length: 0\r\n\r\n"),
            Answer::Send(b"HTTP/1.1 200 OK\r\ncontent-type: t2\r\nx-a: 2\r\nX-LONG-CUSTOM-NAME: c2\r\ncontent-length: 0\r\n\r\n"),
            Answer::Send(b"HTTP/1.1 200 OK\r\nContent-Type: t3\r\nX-A: 3\r\ncontent-length: 0\r\n\r\n"),
            Answer::Send(b"HTTP/1.1 200 OK\r\nContent-Type: t4\r\nX-B: 4\r\nX-A: 4\r\ncontent-length: 0\r\n\r\n"),
        ])
        .await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        let mut seen = Vec::new();
        for _ in 0..4 {
            let sent = send(&pool, request(Method::GET, b""));
            let (_, headers, _) = tokio::time::timeout(Duration::from_secs(10), sent)
                .await
                .expect("a response framed as its head says")
                .unwrap();
            let mut pairs: Vec<String> = headers
                .iter()
                .filter(|(n, _)| *n != "content-length")
                .map(|(n, v)| format!("{n}={}", v.to_str().unwrap()))
                .collect();
            pairs.sort();
            seen.push(pairs.join(" "));
        }
        assert_eq!(
            up.accepted.load(Ordering::SeqCst),
            1,
            "one connection throughout"
        );
        assert_eq!(
            seen,
            [
                "content-type=t1 x-a=1 x-long-custom-name=c1",
                "content-type=t2 x-a=2 x-long-custom-name=c2",
                "content-type=t3 x-a=3",
                "content-type=t4 x-a=4 x-b=4",
            ]
        );
    }

    #[tokio::test]
    async fn malformed_responses_fail_and_their_connections_are_not_reused() {
        let bad: [&'static [u8]; 6] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ];
        for (i, answer) in bad.into_iter().enumerate() {
            let up = scripted(vec![Answer::SendAndClose(answer)]).await;
            let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
            let failed = match send_one(&pool, request(Method::GET, b"")).await {
                Err(e) => e.to_string(),
                Ok(response) => match response.into_body().collect().await {
                    Err(e) => e.to_string(),
                    Ok(body) => panic!("answer {i} read as {:?}", body.to_bytes()),
                },
            };
            assert!(failed.contains("upstream"), "answer {i}: {failed}");
            assert!(pool.idle.lock().unwrap().is_empty(), "answer {i}");
        }
        // A head that never ends is cut off at its limit.
        let huge = Box::leak(
            [
                b"HTTP/1.1 200 OK\r\nx: ".as_slice(),
                &[b'a'; h1::MAX_RESPONSE_HEAD],
            ]
            .concat()
            .into_boxed_slice(),
        );
        let up = scripted(vec![Answer::Send(huge)]).await;
        let pool = Pool::new(up.authority.clone(), Duration::from_secs(5));
        let failed = send_one(&pool, request(Method::GET, b""))
            .await
            .expect_err("too large");
        assert!(
            matches!(failed, PoolError::Exchange(h1::Error::Malformed(_))),
            "{failed:?}"
        );
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
