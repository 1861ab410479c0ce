//! Admission: who may send a request ([`super::access`]), where it goes ([`super::route`]),
//! both decided on one snapshot of the configuration, and whether there is room for it
//! ([`super::shed`]). A CONNECT is left unrouted for the tunnel layer when tunnels are
//! configured, and refused (405) otherwise. A refused request never counts as in flight.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Method, Request};
use tower::{Layer, Service};

use super::shed::{Counted, InFlight, Shed};
use crate::error::ProxyError;
use crate::gateway::SharedLive;

/// Admits requests by the current configuration and `server.max_concurrent_requests`; see the
/// module docs.
#[derive(Clone)]
pub struct AdmitLayer {
    live: SharedLive,
    shed: Shed,
}

impl AdmitLayer {
    /// Admits by `live`'s current access policy and routes, at most `max_in_flight` requests at
    /// once across the services it builds.
    pub fn new(live: SharedLive, max_in_flight: usize) -> Self {
        Self {
            live,
            shed: Shed::new(max_in_flight),
        }
    }
}

impl<S> Layer<S> for AdmitLayer {
    type Service = Admit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit {
            inner,
            live: self.live.clone(),
            shed: self.shed.clone(),
        }
    }
}

/// See [`AdmitLayer`].
#[derive(Clone)]
pub struct Admit<S> {
    inner: S,
    live: SharedLive,
    shed: Shed,
}

impl<S, B> Service<Request<B>> for Admit<S>
where
    S: Service<Request<B>>,
    S::Error: From<ProxyError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Counted<S::Future>, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.admit(&mut req) {
            Ok(in_flight) => Either::Left(Counted::new(self.inner.call(req), in_flight)),
            Err(refusal) => Either::Right(ready(Err(refusal.into()))),
        }
    }
}

impl<S> Admit<S> {
    /// The access check, the route, then a place in the count.
    fn admit<B>(&self, req: &mut Request<B>) -> Result<InFlight, ProxyError> {
        let live = self.live.load();
        super::access::check(&live.access, req)?;
        // A CONNECT is the tunnel layer's.
        if req.method() != Method::CONNECT || live.config.forward.tunnel_allow.is_empty() {
            super::route::route_request(&live.routes, req)?;
        }
        self.shed.enter()
    }
}
