//! Admission: who may send a request ([`super::access`]) and where it goes
//! ([`super::route`]), both decided on one snapshot of the configuration. A CONNECT is left
//! unrouted for the tunnel layer when tunnels are configured, and refused (405) otherwise.

use http::{Method, Request};
use tower::filter::Predicate;

use crate::error::BoxError;
use crate::gateway::SharedLive;

/// Admission as a tower [`Predicate`] (for `tower::filter::FilterLayer`): the access check, then
/// the route, or the refusal of either; see the module docs.
#[derive(Clone)]
pub struct Admit {
    live: SharedLive,
}

impl Admit {
    /// Admits by the current snapshot's access policy and routes.
    pub fn new(live: SharedLive) -> Self {
        Self { live }
    }
}

impl<B> Predicate<Request<B>> for Admit {
    type Request = Request<B>;

    fn check(&mut self, mut req: Request<B>) -> Result<Request<B>, BoxError> {
        let live = self.live.load();
        super::access::check(&live.access, &mut req)?;
        if req.method() == Method::CONNECT && !live.config.forward.tunnel_allow.is_empty() {
            return Ok(req); // the tunnel layer's
        }
        super::route::route_request(&live.routes, &mut req)?;
        Ok(req)
    }
}
