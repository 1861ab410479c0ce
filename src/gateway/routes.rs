//! The route table a config builds: each route's match (host, path prefix), its upstream and
//! URI rewrite, its credential and client; first match wins. [`crate::layers::route`] applies it
//! to requests.

use std::sync::Arc;

use http::Uri;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};

use crate::auth::cache::TokenSource;
use crate::config::ClientAuthorization;
use crate::metrics::OkCount;
use crate::upstream::UpstreamClient;

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

    /// The policy for a client's own `Authorization`.
    pub fn client_authorization(&self) -> ClientAuthorization {
        self.client_authorization
    }

    /// The `Host` the upstream gets.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
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
    pub fn rewrite(&self, pq: PathAndQuery) -> Result<Uri, http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        if self.base_path.is_empty() && !self.strip_prefix {
            // The common case: the path goes up as it came, without being re-parsed.
            parts.path_and_query = Some(pq);
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

/// The route a request was matched to, recorded in its [`crate::ctx::Ctx`].
#[derive(Debug, Clone)]
pub struct RouteCtx {
    /// The matched route.
    pub route: Arc<Route>,
    /// Whether the credential's token is injected (false when a client's own header is kept).
    pub inject: bool,
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
