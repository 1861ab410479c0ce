//! Load shedding, as admission applies it ([`super::admit`]): past
//! `server.max_concurrent_requests` in flight, a request is answered 503 `overloaded` at once
//! instead of queueing.
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

use pin_project_lite::pin_project;

use crate::error::ProxyError;

/// The count of requests in flight, shared by its clones, with its limit.
#[derive(Debug, Clone)]
pub struct Shed {
    max: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Shed {
    /// At most `max` requests in flight across this count's clones.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A place for one more request, held until the [`InFlight`] is dropped; `Overloaded` if
    /// all are taken.
    pub fn enter(&self) -> Result<InFlight, ProxyError> {
        // Counted first, checked after: two racing calls cannot both take the last place.
        // Relaxed, as the count guards no other memory.
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(ProxyError::Overloaded);
        }
        Ok(InFlight(self.in_flight.clone()))
    }
}

/// One place in the count, given back when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A request in flight: it counts until its response head is out, or it fails or is dropped.
    pub struct Counted<F> {
        #[pin]
        inner: F,
        in_flight: InFlight,
    }
}

impl<F> Counted<F> {
    /// `inner`, holding its place in the count.
    pub fn new(inner: F, in_flight: InFlight) -> Self {
        Self { inner, in_flight }
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_past_the_limit_across_clones_and_frees_places_as_requests_end() {
        let a = Shed::new(2);
        let b = a.clone();
        let first = a.enter().unwrap();
        let second = b.enter().unwrap();
        // The third, on either clone, is shed at once.
        assert!(matches!(a.enter(), Err(ProxyError::Overloaded)));
        assert!(matches!(b.enter(), Err(ProxyError::Overloaded)));
        // A request that ends gives its place back; a shed one took none.
        drop(first);
        let third = b.enter().unwrap();
        assert!(matches!(a.enter(), Err(ProxyError::Overloaded)));
        drop((second, third));
        assert!(a.enter().is_ok());
    }
}
