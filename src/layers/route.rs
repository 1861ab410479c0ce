//! Routing: pick the first route matching host and path, rewrite the URI onto its upstream,
//! strip hop-by-hop headers and apply the route's `client_authorization` policy. Applied by
//! [`super::admit`], after the access check.

use http::header::{AUTHORIZATION, HOST};
use http::uri::PathAndQuery;
use http::{Method, Request, Version};

use crate::config::ClientAuthorization;
use crate::ctx::Ctx;
use crate::error::ProxyError;
use crate::gateway::routes::{RouteCtx, Routes};

/// Matches `req` to a route and rewrites it for the upstream, in place.
pub fn route_request<B>(routes: &Routes, req: &mut Request<B>) -> Result<(), ProxyError> {
    // CONNECT would open a tunnel that carries no token; TRACE would echo the injected header.
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        return Err(ProxyError::MethodNotAllowed(req.method().clone()));
    }
    // An HTTP/1 request here has at most one valid Host (exactly one for HTTP/1.1): the server
    // side refuses any other ([`crate::http1::request`]).
    let host_header = req.headers().get(http::header::HOST);
    // HTTP/1 absolute-form (`GET http://host/x`) is how an HTTP_PROXY client speaks; HTTP/2
    // always carries :authority, so there only the scheme-less origin form exists.
    let absolute_form = req.version() < Version::HTTP_2 && req.uri().scheme().is_some();
    let host = match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => host_header.and_then(|h| h.to_str().ok()),
    };
    let path = req.uri().path();
    let route = routes
        .find(host, path)
        .ok_or(ProxyError::NoRoute { absolute_form })?
        .clone();

    let has_client_auth = req.headers().contains_key(AUTHORIZATION);
    let inject = match route.client_authorization() {
        ClientAuthorization::Reject if has_client_auth => {
            return Err(ProxyError::BadRequest(
                "client Authorization refused by route policy",
            ));
        }
        ClientAuthorization::Keep if has_client_auth => false,
        _ => true,
    };

    // Moved out of the client's URI, not copied: its bytes are shared with the head's.
    let pq = std::mem::take(req.uri_mut())
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = route
        .rewrite(pq)
        .map_err(|_| ProxyError::BadRequest("path cannot be rewritten onto the upstream"))?;
    // The version is per hop: the upstream connection negotiates its own (h2 by ALPN on https).
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    crate::http1::hop::strip(headers);
    // The client set Host for tokengate; the upstream gets its own authority.
    headers.insert(HOST, route.host_header().clone());
    if inject {
        headers.remove(AUTHORIZATION);
    }
    Ctx::of(req)
        .ok_or(ProxyError::Internal("request without a context"))?
        .set_route(RouteCtx { route, inject });
    Ok(())
}
