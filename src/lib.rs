//! tokengate: an authenticating reverse proxy and egress gateway.
//!
//! Legacy applications send plain HTTP; tokengate obtains a token through the provider's signed,
//! encrypted exchange, keeps it fresh, injects `Authorization: Bearer`, forwards the request and
//! replays it once with a fresh token on 401.
//!
//! The tree is the map, outside-in:
//!
//! - [`server`]: listeners, the accept loop with its connection limit, TLS, telling HTTP/2
//!   from HTTP/1, graceful shutdown; HTTP/2 is hyper's.
//! - [`http1`]: tokengate's own HTTP/1.1, both sides: the server side that owns every byte of
//!   an HTTP/1 client connection, the upstream client, and the rules and limits they share.
//! - [`stack`]: the request path, assembled in one place from the middleware in [`layers`],
//!   one per file, around the service that forwards to the upstream.
//! - [`upstream`]: the pooled clients toward upstreams, and the SSRF guard for tunnels.
//! - [`auth`]: the token exchange, its crypto, tokens and the token cache with its keepers;
//!   [`fleet`]: the cache the replicas of a fleet share through Redis.
//! - [`config`]: `proxy.toml`, its defaults and validation; [`gateway`]: what a config builds
//!   (token sources, the route table, the access policy), as one snapshot that reloads swap.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` and the credentials API; [`metrics`]: the
//!   Prometheus registry.
//! - [`body`]: the bodies requests and responses travel in; [`ctx`]: what the layers tell each
//!   other about a request; [`error`]: every request-path error and the one place it becomes a
//!   response; [`tls`]: outbound roots and inbound certificates.
//! - [`sandbox`]: a real auth server and upstream for the demo and the tests; [`demo`].
//!
//! Folders depend downwards only, in this order: `http1`, `tls`, `metrics` at the bottom;
//! `fleet`; `body`, `auth`, `upstream`; `config`; `error`, `gateway`; `ctx`; `layers`, `admin`;
//! `stack`; `server`; `sandbox`, `demo` (`tests/layout.rs` fails on a cycle).

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod ctx;
pub mod demo;
pub mod error;
pub mod fleet;
pub mod gateway;
pub mod http1;
pub mod layers;
pub mod metrics;
pub mod sandbox;
pub mod server;
pub mod stack;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use gateway::Gateway;
pub use server::Running;

/// Displays an error with its chain of sources, `outer: inner: root` (each `Display` in the
/// crate names its own step, never its source's).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
