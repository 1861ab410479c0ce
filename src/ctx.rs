//! What the layers of the request path tell each other about one request: one shared value,
//! [`Ctx`], the only extension a request carries. The accept loop creates it (client address,
//! the clock reading the request's layers share); the route filter
//! records the route; bearer injection records the token it sent; the upstream layer leaves a
//! request answered 401 for the retry layer, which marks the replay; the observing layer reads
//! it all back for metrics and the access log once the response is out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use http::Request;

use crate::body::ProxyBody;
use crate::gateway::routes::RouteCtx;

/// No token was injected.
const NO_TOKEN: u64 = u64::MAX;

/// The shared context of one request; cheap to clone.
#[derive(Clone, Debug)]
pub struct Ctx(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    peer: Option<SocketAddr>,
    arrived: Instant,
    route: OnceLock<RouteCtx>,
    token: AtomicU64,
    unanswered: Mutex<Option<Box<Request<ProxyBody>>>>,
    replayed: AtomicBool,
}

impl Ctx {
    /// The context of a request from `peer` (if known), arriving now.
    pub fn new(peer: Option<SocketAddr>) -> Self {
        Self(Arc::new(Inner {
            peer,
            arrived: Instant::now(),
            route: OnceLock::new(),
            token: AtomicU64::new(NO_TOKEN),
            unanswered: Mutex::new(None),
            replayed: AtomicBool::new(false),
        }))
    }

    /// The context `req` carries, if any.
    pub fn of<B>(req: &Request<B>) -> Option<&Ctx> {
        req.extensions().get::<Ctx>()
    }

    /// The route `req` was matched to, if it has been.
    pub fn route_of<B>(req: &Request<B>) -> Option<&RouteCtx> {
        Self::of(req).and_then(Ctx::route)
    }

    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.0.peer
    }

    /// When the request arrived (its head was read): the one clock reading the layers share for
    /// its duration and for its token's freshness.
    pub fn arrived(&self) -> Instant {
        self.0.arrived
    }

    /// Records the matched route (once; later calls change nothing).
    pub fn set_route(&self, route: RouteCtx) {
        let _ = self.0.route.set(route);
    }

    /// The matched route, once the route filter has run.
    pub fn route(&self) -> Option<&RouteCtx> {
        self.0.route.get()
    }

    /// Records that the request went upstream with the token of `generation`.
    pub fn sent_with(&self, generation: u64) {
        self.0.token.store(generation, Ordering::Relaxed);
    }

    /// The generation of the token the request last went upstream with, if one was injected.
    pub fn token_generation(&self) -> Option<u64> {
        Some(self.0.token.load(Ordering::Relaxed)).filter(|&g| g != NO_TOKEN)
    }

    /// Leaves `req`, answered 401 and with its body held whole, for a replay.
    pub fn keep_unanswered(&self, req: Request<ProxyBody>) {
        *self
            .0
            .unanswered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Box::new(req));
    }

    /// The request left by [`Ctx::keep_unanswered`], if any.
    pub fn take_unanswered(&self) -> Option<Request<ProxyBody>> {
        let kept = self
            .0
            .unanswered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        kept.map(|req| *req)
    }

    /// Marks the request as replayed after a 401.
    pub fn mark_replayed(&self) {
        self.0.replayed.store(true, Ordering::Relaxed);
    }

    /// Whether the request was replayed after a 401.
    pub fn replayed(&self) -> bool {
        self.0.replayed.load(Ordering::Relaxed)
    }

    /// How many hold this context (tests: a request kept in its own context is never freed).
    #[cfg(test)]
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.0)
    }
}
