//! Load shedding: past `server.max_concurrent_requests` in flight, a request is answered 503
//! `overloaded` at once instead of queueing.
//!
//! tower's `LoadShed` over `ConcurrencyLimit` did this with a semaphore: a permit taken in
//! `poll_ready` and given back through the semaphore's waiter lock, for waiters that load
//! shedding never lets wait. One counter shared by the service's clones does it with two atomic
//! operations on it per request (`docs/BENCHMARKS.md` has the measurement).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::error::ProxyError;

/// Sheds requests past `max` in flight; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct ShedLayer {
    max: usize,
}

impl ShedLayer {
    /// At most `max` requests in flight through each service this layer builds.
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            max: self.max,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// See [`ShedLayer`]. Its clones share one count.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    max: usize,
    in_flight: Arc<AtomicUsize>,
}

impl<S, R> Service<R> for Shed<S>
where
    S: Service<R>,
    S::Error: From<ProxyError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Counted<S::Future>, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // Counted first, checked after: two racing calls cannot both take the last place.
        // Relaxed, as the count guards no other memory.
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Either::Right(ready(Err(ProxyError::Overloaded.into())));
        }
        Either::Left(Counted {
            inner: self.inner.call(req),
            _in_flight: InFlight(self.in_flight.clone()),
        })
    }
}

pin_project! {
    /// A request in flight: it counts until its response head is out, or it fails or is dropped.
    pub struct Counted<F> {
        #[pin]
        inner: F,
        _in_flight: InFlight,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

/// One place in the count, given back when dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::future::pending;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn sheds_past_the_limit_across_clones_and_frees_places_as_requests_end() {
        // Its requests never answer: each stays in flight until its future is dropped.
        let never = tower::service_fn(|(): ()| pending::<Result<(), ProxyError>>());
        let mut a = ShedLayer::new(2).layer(never);
        let mut b = a.clone();
        let first = a.ready().await.unwrap().call(());
        let second = b.ready().await.unwrap().call(());
        // The third, on either clone, is shed at once.
        let third = a.ready().await.unwrap().call(());
        assert!(matches!(third.await, Err(ProxyError::Overloaded)));
        assert!(matches!(
            b.ready().await.unwrap().call(()),
            Either::Right(_)
        ));
        // A request that ends (here: dropped) gives its place back.
        drop(first);
        assert!(matches!(b.ready().await.unwrap().call(()), Either::Left(_)));
        drop(second);
    }
}
