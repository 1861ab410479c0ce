//! The innermost service of the request path: sends each routed request through its route's
//! upstream client, bounded by `request_timeout`, with hop-by-hop headers removed from the
//! response and a 401-answered request left for the retry layer.

use std::future::poll_fn;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Request, StatusCode};
use tower::Service;

use crate::body::{BodyError, Guarded, PeerBody, ProxyBody, ProxyResponse, Side};
use crate::ctx::Ctx;
use crate::error::{BoxError, ProxyError};
use crate::upstream::UpstreamClient;
use crate::upstream::pool::PoolError;

/// The error for a client body that gave out while it was being sent (413/408/400), if that is
/// what `error` comes down to.
fn body_error(error: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<BodyError>() {
            return Some(match body {
                BodyError::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
                BodyError::Idle { after, .. } => ProxyError::ClientTimeout(*after),
                BodyError::Transport(_) | BodyError::Client(_) => {
                    ProxyError::BadRequest("client body broke off")
                }
                BodyError::Upstream(_) => return None,
            });
        }
        source = e.source();
    }
    None
}

/// Classifies a failed send through hyper-util: the client's body gave out, the connect
/// attempt timed out (504), or the upstream could not be reached or talked to (502).
fn client_error(error: hyper_util::client::legacy::Error, connect_timeout: Duration) -> ProxyError {
    if let Some(e) = body_error(&error) {
        return e;
    }
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && error.is_connect()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return ProxyError::UpstreamTimeout(connect_timeout);
        }
        source = e.source();
    }
    ProxyError::UpstreamUnreachable(Box::new(error))
}

/// Classifies a failed send through a [`Pool`], as [`client_error`] does; a response head
/// past its deadline is a 504 after `timeout`.
fn pool_error(error: PoolError, connect_timeout: Duration, timeout: Duration) -> ProxyError {
    match error {
        PoolError::ConnectTimeout(_) => ProxyError::UpstreamTimeout(connect_timeout),
        PoolError::Exchange(crate::http1::client::Error::Timeout) => {
            ProxyError::UpstreamTimeout(timeout)
        }
        PoolError::Streamed(e) => client_error(e, connect_timeout),
        other => ProxyError::UpstreamUnreachable(Box::new(other) as BoxError),
    }
}

/// Sends each routed request to its route's upstream, waits at most `timeout` for the head,
/// and guards the response body with `body_idle` (a stalled upstream is cut off). A connect that
/// times out (after `connect_timeout`) is a 504 too.
#[derive(Debug, Clone, Copy)]
pub struct Forward {
    timeout: Duration,
    connect_timeout: Duration,
    body_idle: Duration,
}

impl Forward {
    /// An upstream sender; see the type's docs.
    pub fn new(timeout: Duration, connect_timeout: Duration, body_idle: Duration) -> Self {
        Self {
            timeout,
            connect_timeout,
            body_idle,
        }
    }
}

impl Service<Request<ProxyBody>> for Forward {
    type Response = ProxyResponse;
    type Error = ProxyError;
    type Future = BoxFuture<'static, Result<ProxyResponse, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let Some(client) = Ctx::route_of(&req).map(|c| c.route.client.clone()) else {
            return Box::pin(std::future::ready(Err(ProxyError::Internal(
                "request without a route",
            ))));
        };
        let Self {
            timeout,
            connect_timeout,
            body_idle,
        } = *self;
        let from_pool = move |e| pool_error(e, connect_timeout, timeout);
        // One future per way, each holding only what its way needs: the request moved once,
        // and the common one (a whole body to a plain upstream) under 1 KiB, which keeps its
        // box on mimalloc's fast path.
        match client {
            // tokengate's own client leaves the request with us and hop-by-hop headers out.
            UpstreamClient::Plain(pool) => match req.into_parts() {
                (parts, ProxyBody::Full(body)) => Box::pin(async move {
                    // One clock reading for the pool's idle check and the deadline, which the
                    // connection's own timer keeps (no timer per request).
                    let now = Instant::now();
                    let due = now + timeout.min(LONGEST_WAIT);
                    // Pinned where it was made, and the answer matched where it lands: each
                    // would otherwise be copied on its way (the future into the await, the
                    // response through `map_err` and `?`).
                    let mut response = {
                        let body = body.as_deref().unwrap_or_default();
                        let mut sent = pin!(pool.send(&parts, body, now, due));
                        match poll_fn(|cx| sent.as_mut().poll(cx)).await {
                            Ok(response) => response,
                            Err(error) => return Err(from_pool(error)),
                        }
                    };
                    if response.status() == StatusCode::UNAUTHORIZED {
                        let again = Request::from_parts(parts, ProxyBody::Full(body));
                        let ctx = Ctx::of(&again).cloned();
                        leave_for_retry(&mut response, ctx, Some(again));
                    }
                    Ok(guarded(response, body_idle))
                }),
                (parts, streaming) => {
                    let mut req = Request::from_parts(parts, streaming);
                    declare_unknown_length(&mut req);
                    let ctx = Ctx::of(&req).cloned();
                    Box::pin(async move {
                        let sent = pool.send_streaming(req);
                        let mut response = within(timeout, Instant::now(), sent, from_pool).await?;
                        if response.status() == StatusCode::UNAUTHORIZED {
                            leave_for_retry(&mut response, ctx, None);
                        }
                        let response = strip_hops(response);
                        Ok(guarded(response, body_idle))
                    })
                }
            },
            UpstreamClient::Tls(client) => Box::pin(async move {
                let mut req = req;
                declare_unknown_length(&mut req);
                let ctx = Ctx::of(&req).cloned();
                let again = whole_copy(&req);
                let sent = client.request(req);
                let mut response = within(timeout, Instant::now(), sent, |e| {
                    client_error(e, connect_timeout)
                })
                .await?;
                if response.status() == StatusCode::UNAUTHORIZED {
                    leave_for_retry(&mut response, ctx, again);
                }
                Ok(guarded(
                    strip_hops(response.map(PeerBody::Hyper)),
                    body_idle,
                ))
            }),
        }
    }
}

/// The response, its body guarded by `body_idle` (a stalled upstream is cut off).
fn guarded(response: http::Response<PeerBody>, body_idle: Duration) -> ProxyResponse {
    let (parts, body) = response.into_parts();
    let body = Guarded::new(body, Side::Upstream, u64::MAX, body_idle);
    ProxyResponse::from_parts(parts, ProxyBody::Streaming(Box::new(body)))
}

/// The longest wait [`within`] sets a deadline for; a longer `request_timeout` waits this long
/// (30 years, as tokio's own "far future").
const LONGEST_WAIT: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `sent`, given `timeout` from `started` for the response head (else 504), its error mapped
/// by `error`. A plain function over the timeout future, not an `async fn`: no second state
/// machine on the request path.
fn within<T, E>(
    timeout: Duration,
    started: Instant,
    sent: impl Future<Output = Result<T, E>>,
    error: impl FnOnce(E) -> ProxyError,
) -> impl Future<Output = Result<T, ProxyError>> {
    let deadline = started + timeout.min(LONGEST_WAIT);
    tokio::time::timeout_at(deadline.into(), sent).map(move |done| {
        done.map_err(|_| ProxyError::UpstreamTimeout(timeout))?
            .map_err(error)
    })
}

/// Leaves what the retry layer needs with a response answered 401: the request's context, on
/// the response, holding the request itself if its body was held whole (`again`). Only a 401
/// pays for this; other answers carry nothing back. Only the first answer to a token of ours
/// is replayed, so nothing is left for any other: a request kept in its own context that
/// nobody takes back would never be freed (each holds the other).
pub(crate) fn leave_for_retry<B>(
    response: &mut http::Response<B>,
    ctx: Option<Ctx>,
    again: Option<Request<ProxyBody>>,
) {
    let Some(ctx) = ctx.filter(|ctx| ctx.token_generation().is_some() && !ctx.replayed()) else {
        return;
    };
    if let Some(again) = again {
        ctx.keep_unanswered(again);
    }
    response.extensions_mut().insert(ctx);
}

/// Removes hop-by-hop headers from a response that came through hyper's client.
fn strip_hops<B>(mut response: http::Response<B>) -> http::Response<B> {
    crate::http1::hop::strip(response.headers_mut());
    response
}

/// Says `Transfer-Encoding: chunked` on a request whose body streams with no known length:
/// hyper's client sends no body at all for a GET, HEAD or CONNECT of unknown length unless the
/// request says so itself, and a body the client sent is never dropped. (Over HTTP/2 hyper
/// leaves the header out, as it must.)
fn declare_unknown_length(req: &mut Request<ProxyBody>) {
    use http::header::{CONTENT_LENGTH, HeaderValue, TRANSFER_ENCODING};
    use http_body::Body;
    if req.body().size_hint().exact().is_none() && !req.headers().contains_key(CONTENT_LENGTH) {
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// A copy of `req` for a replay, if its body is held whole (hyper's client consumes the
/// request; tokengate's own gives it back).
fn whole_copy(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let body = req.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    if let Some(ctx) = Ctx::of(req) {
        copy.extensions_mut().insert(ctx.clone());
    }
    Some(copy)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// A request with a body held whole, carrying `ctx`.
    fn request(ctx: &Ctx) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::Full(Some(Bytes::from_static(b"again"))));
        req.extensions_mut().insert(ctx.clone());
        req
    }

    #[test]
    fn only_a_first_401_to_our_token_is_left_for_the_retry() {
        let unauthorized = || http::Response::builder().status(401).body(()).unwrap();
        // A token of ours, not yet replayed: the context rides on the response, the request
        // in it.
        let ours = Ctx::new(None);
        ours.sent_with(7);
        let mut response = unauthorized();
        leave_for_retry(&mut response, Some(ours.clone()), Some(request(&ours)));
        assert!(response.extensions().get::<Ctx>().is_some());
        assert!(ours.take_unanswered().is_some());
        drop(response);
        assert_eq!(ours.holders(), 1);

        // The client's own token (none injected), or a replay answered 401 again: nothing is
        // kept, and nothing is left holding the context.
        let replayed = Ctx::new(None);
        replayed.sent_with(8);
        replayed.mark_replayed();
        for ctx in [Ctx::new(None), replayed] {
            let mut response = unauthorized();
            leave_for_retry(&mut response, Some(ctx.clone()), Some(request(&ctx)));
            assert!(response.extensions().get::<Ctx>().is_none());
            assert!(ctx.take_unanswered().is_none());
            drop(response);
            assert_eq!(ctx.holders(), 1);
        }
    }
}
