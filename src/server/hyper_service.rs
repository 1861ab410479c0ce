//! A tower service served to hyper: hyper calls `&self`, tower wants `&mut self` and readiness
//! first. hyper-util's adapter clones the service and drives it through a `Oneshot` future for
//! every request; this one clones it and, when it is ready at once, hands the request over in the
//! same step ([`call_mut`]), so the request future is the service's own. (The HTTP/1 server side
//! waits for its connection's own copy to be ready and calls it, without a clone.)
//!
//! The proxy's stack is always ready at once: load shedding ([`crate::layers::shed`]) answers 503 from
//! admission's `call` rather than waiting, and the rescue layer answers readiness errors (see
//! [`crate::stack`]). A service that is not ready takes the usual way, through tower's `Oneshot`.

use std::task::{Context, Poll, Waker};

use futures_util::future::Either;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

/// Serves the tower service `S` to hyper; see the module docs.
#[derive(Debug, Clone)]
pub struct Hyper<S>(pub S);

impl<S, R> hyper::service::Service<R> for Hyper<S>
where
    S: Service<R> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Oneshot<S, R>>;

    fn call(&self, req: R) -> Self::Future {
        call_mut(&mut self.0.clone(), req)
    }
}

/// Hands `req` to `service` in this step if it is ready at once, else to a clone of it through
/// tower's `Oneshot`, which waits for its readiness.
fn call_mut<S: Service<R> + Clone, R>(service: &mut S, req: R) -> Either<S::Future, Oneshot<S, R>> {
    // A service ready at once never looks at the waker; one that is not gets a real one
    // from the Oneshot below.
    let mut cx = Context::from_waker(Waker::noop());
    match service.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => Either::Left(service.call(req)),
        // Not ready, or failed: the Oneshot polls it again and reports what it says.
        _ => Either::Right(service.clone().oneshot(req)),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use super::*;

    /// Ready only from its second poll on; counts the calls.
    #[derive(Clone)]
    struct Slow {
        polls: Arc<AtomicUsize>,
        calls: Arc<AtomicUsize>,
    }

    impl Service<u32> for Slow {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.polls.fetch_add(1, Ordering::SeqCst) == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: u32) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(req * 2))
        }
    }

    #[tokio::test]
    async fn a_ready_service_is_called_at_once_and_a_slow_one_after_its_readiness() {
        let slow = Slow {
            polls: Arc::default(),
            calls: Arc::default(),
        };
        let hyper = Hyper(slow.clone());
        let mut first = hyper::service::Service::call(&hyper, 21);
        assert!(matches!(first, Either::Right(_)), "not ready at once");
        assert_eq!(
            slow.calls.load(Ordering::SeqCst),
            0,
            "not called before it is ready"
        );
        let answer = std::future::poll_fn(|cx| Pin::new(&mut first).poll(cx)).await;
        assert_eq!(answer.unwrap(), 42);
        let second = hyper::service::Service::call(&hyper, 1);
        assert!(matches!(second, Either::Left(_)), "ready at once");
        assert_eq!(slow.calls.load(Ordering::SeqCst), 2);
        assert_eq!(second.await.unwrap(), 2);
    }
}
