//! Routing: pick the first route matching host and path, rewrite the URI onto its upstream,
//! strip hop-by-hop headers and apply the route's `client_authorization` policy.

use std::sync::Arc;

use http::header::{AUTHORIZATION, HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Uri, Version};
use serde::Deserialize;
use tower::filter::Predicate;

use crate::auth::cache::TokenSource;
use crate::ctx::Ctx;
use crate::error::{BoxError, ProxyError};
use crate::gateway::SharedLive;
use crate::metrics::OkCount;
use crate::upstream::UpstreamClient;

/// What to do with an `Authorization` header the client sent itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthorization {
    /// Drop the client's header and inject the credential's token (the default).
    #[default]
    Replace,
    /// Forward the client's header as it is and inject nothing; no retry on 401.
    Keep,
    /// Refuse the request with 400 `bad_request`.
    Reject,
}

impl std::fmt::Display for ClientAuthorization {
    /// The config's spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Replace => "replace",
            Self::Keep => "keep",
            Self::Reject => "reject",
        })
    }
}

/// One route, ready to serve.
pub struct Route {
    /// Where it stands in the config, e.g. `routes[0]`, for logs and metrics.
    pub name: Arc<str>,
    host: Option<String>,
    path_prefix: String,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` the upstream gets, as the client would set it from the URI (built once).
    host_header: HeaderValue,
    base_path: String,
    strip_prefix: bool,
    client_authorization: ClientAuthorization,
    /// The token source of the route's credential.
    pub credential: TokenSource,
    /// The pooled client for the route's upstream.
    pub client: UpstreamClient,
    /// Its count of `200` answers, once it has one.
    pub ok_count: OkCount,
}

/// How a [`Route`] is described.
pub struct RouteSpec {
    /// The route's name, e.g. `routes[0]`.
    pub name: String,
    /// Host to match (lowercase; with a port, matched exactly), or any host.
    pub host: Option<String>,
    /// Path prefix to match (plain string prefix, like Envoy's `prefix`).
    pub path_prefix: String,
    /// The upstream base URL, `http(s)://authority[/base]`.
    pub upstream: Uri,
    /// Remove `path_prefix` before appending the path to the upstream's base path.
    pub strip_prefix: bool,
    /// The policy for a client's own `Authorization`.
    pub client_authorization: ClientAuthorization,
    /// The credential's token source.
    pub credential: TokenSource,
    /// The client for the upstream.
    pub client: UpstreamClient,
}

impl Route {
    /// Builds a route; `None` if `upstream` lacks a scheme or authority.
    pub fn new(spec: RouteSpec) -> Option<Self> {
        let base = spec.upstream.path().trim_end_matches('/').to_owned();
        Some(Self {
            name: spec.name.into(),
            host: spec.host.map(|h| h.to_ascii_lowercase()),
            path_prefix: spec.path_prefix,
            host_header: host_header(spec.upstream.scheme()?, spec.upstream.authority()?)?,
            scheme: spec.upstream.scheme()?.clone(),
            authority: spec.upstream.authority()?.clone(),
            base_path: base,
            strip_prefix: spec.strip_prefix,
            client_authorization: spec.client_authorization,
            credential: spec.credential,
            client: spec.client,
            ok_count: OkCount::default(),
        })
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) if want.contains(':') => want.eq_ignore_ascii_case(got),
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(strip_port(got)),
            (Some(_), None) => false,
        };
        host_ok && path.starts_with(&self.path_prefix)
    }

    /// The upstream URI for a request to `path_and_query`.
    fn rewrite(&self, pq: &PathAndQuery) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if self.base_path.is_empty() && !self.strip_prefix {
            // The common case: the path goes up as it came, without being re-parsed.
            parts.path_and_query = Some(pq.clone());
            return Ok(Uri::from_parts(parts)?);
        }
        let path = pq.path();
        let rest = if self.strip_prefix {
            &path[self.path_prefix.len().min(path.len())..]
        } else {
            path
        };
        let mut out = String::with_capacity(
            self.base_path.len() + rest.len() + 1 + pq.query().map_or(0, |q| q.len() + 1),
        );
        out.push_str(&self.base_path);
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if let Some(q) = pq.query() {
            out.push('?');
            out.push_str(q);
        }
        parts.path_and_query = Some(PathAndQuery::try_from(out)?);
        Ok(Uri::from_parts(parts)?)
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("path_prefix", &self.path_prefix)
            .field(
                "upstream",
                &format_args!("{}://{}{}", self.scheme, self.authority, self.base_path),
            )
            .field("credential", self.credential.name())
            .finish_non_exhaustive()
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || host.starts_with('[') => {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        }
        _ => host,
    }
}

/// The route table: first match wins.
#[derive(Debug, Default)]
pub struct Routes(Vec<Arc<Route>>);

impl Routes {
    /// A table of `routes`, in order.
    pub fn new(routes: Vec<Route>) -> Self {
        Self(routes.into_iter().map(Arc::new).collect())
    }

    /// The first route matching `host` (port optional) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.0.iter().find(|r| r.matches(host, path))
    }

    /// All routes, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.0.iter()
    }
}

/// The route a request was matched to, recorded in its [`Ctx`].
#[derive(Debug, Clone)]
pub struct RouteCtx {
    /// The matched route.
    pub route: Arc<Route>,
    /// Whether the credential's token is injected (false when a client's own header is kept).
    pub inject: bool,
}

/// Routing as a tower [`Predicate`] (for `tower::filter::FilterLayer`): matches each request to
/// a route of the current snapshot and rewrites it, or refuses it; see the module docs.
#[derive(Clone)]
pub struct RouteMatch {
    live: SharedLive,
}

impl RouteMatch {
    /// Routes over the current snapshot's routes.
    pub fn new(live: SharedLive) -> Self {
        Self { live }
    }
}

impl<B> Predicate<Request<B>> for RouteMatch {
    type Request = Request<B>;

    fn check(&mut self, mut req: Request<B>) -> Result<Request<B>, BoxError> {
        route_request(&self.live.load().routes, &mut req)?;
        Ok(req)
    }
}

/// `Host` for an upstream: its host, with the port unless it is the scheme's default (what
/// hyper's client would set from the URI).
fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let value = match authority.port_u16() {
        Some(port) if port != default_port => format!("{}:{port}", authority.host()),
        _ => authority.host().to_owned(),
    };
    HeaderValue::try_from(value).ok()
}

/// Matches `req` to a route and rewrites it for the upstream, in place.
pub fn route_request<B>(routes: &Routes, req: &mut Request<B>) -> Result<(), ProxyError> {
    // CONNECT would open a tunnel that carries no token; TRACE would echo the injected header.
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        return Err(ProxyError::MethodNotAllowed(req.method().clone()));
    }
    // An HTTP/1 request here has at most one valid Host (exactly one for HTTP/1.1): the server
    // side refuses any other ([`crate::http1::request`]).
    let host_header = req.headers().get(http::header::HOST);
    let ctx = Ctx::of(req)
        .ok_or(ProxyError::Internal("request without a context"))?
        .clone();
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
    let inject = match route.client_authorization {
        ClientAuthorization::Reject if has_client_auth => {
            return Err(ProxyError::BadRequest(
                "client Authorization refused by route policy",
            ));
        }
        ClientAuthorization::Keep if has_client_auth => false,
        _ => true,
    };

    let pq = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = route
        .rewrite(&pq)
        .map_err(|_| ProxyError::BadRequest("path cannot be rewritten onto the upstream"))?;
    // The version is per hop: the upstream connection negotiates its own (h2 by ALPN on https).
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    crate::http1::hop::strip(headers);
    // The client set Host for tokengate; the upstream gets its own authority.
    headers.insert(HOST, route.host_header.clone());
    if inject {
        headers.remove(AUTHORIZATION);
    }
    ctx.set_route(RouteCtx { route, inject });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_keeps_only_a_non_default_port() {
        let host = |uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            host_header(uri.scheme().unwrap(), uri.authority().unwrap()).unwrap()
        };
        assert_eq!(host("http://api.example.com:80/x"), "api.example.com");
        assert_eq!(host("https://api.example.com:443"), "api.example.com");
        assert_eq!(host("http://api.example.com:443"), "api.example.com:443");
        assert_eq!(host("https://127.0.0.1:8443"), "127.0.0.1:8443");
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
    }

    #[test]
    fn strip_port_handles_names_and_ipv6() {
        assert_eq!(strip_port("api.example.com:8443"), "api.example.com");
        assert_eq!(strip_port("api.example.com"), "api.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
