//! tokengate: an authenticating reverse proxy and egress gateway.
//!
//! Legacy applications send plain HTTP; tokengate obtains a token through the provider's signed,
//! encrypted exchange, keeps it fresh, injects `Authorization: Bearer`, forwards the request and
//! replays it once with a fresh token on 401.
//!
//! Where things live:
//!
//! - [`config`]: `proxy.toml`, its defaults and validation.
//! - [`gateway`]: the [`Gateway`]: what a config builds, as one snapshot that reloads swap.
//! - [`server`]: listeners, the accept loop, graceful shutdown; [`front`]: tokengate's own
//!   HTTP/1.1 server side for plain-TCP clients, which hands what it does not take on to hyper
//!   through [`hibernate`] (until the connection idles); [`adapter`]: the stack served to hyper.
//! - [`stack`]: the request path, assembled in one place. Its layers, outside-in:
//!   [`record`] (span, metrics, access log), [`rescue`] (errors → JSON), [`access`] (allowed
//!   clients, shared key; a tower filter),
//!   [`shed`] (past `max_concurrent_requests` in flight, 503), [`tunnel`] (CONNECT to listed
//!   targets, through [`ssrf`]),
//!   [`route`] (match, rewrite, hop-by-hop; a tower filter), [`body`]
//!   (limits, replayable bodies), [`retry`] (once on 401), [`auth::inject`] (bearer),
//!   [`upstream`] (pooled clients; [`pool`]: the one for plain-HTTP upstreams, over
//!   tokengate's own HTTP/1.1 client codec, [`h1`]).
//! - [`ctx`]: what the layers tell each other about a request (its one extension).
//! - [`error`]: every request-path error and the one place it becomes a response.
//! - [`auth`]: the exchange ([`auth::exchange`], [`auth::crypto`]), [`auth::token`] and the
//!   token cache ([`auth::cache`]).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, the credentials API; [`metrics`]: the
//!   Prometheus registry.
//! - [`tls`]: outbound roots and inbound certificates; [`hop`]: hop-by-hop headers, framing;
//!   [`framing`]: the watch on the client's bytes that finds `Content-Length` +
//!   `Transfer-Encoding`;
//!   [`chunked`]: the chunked coding, followed for the watch and decoded for [`h1`];
//!   [`observe`]: the IO wrapper it (and the tunnels' idle timeout) reads through.
//! - [`ssrf`]: the SSRF guard (resolve, classify, dial what was checked) for egress tunnels.
//! - [`sandbox`]: a real auth server and upstream for the demo and the tests; [`demo`].

#![forbid(unsafe_code)]

pub mod access;
pub mod adapter;
pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod ctx;
pub mod demo;
pub mod error;
pub mod gateway;
pub mod http1;
pub mod metrics;
pub mod observe;
pub mod pool;
pub mod record;
pub mod rescue;
pub mod retry;
pub mod route;
pub mod sandbox;
pub mod server;
pub mod shed;
pub mod ssrf;
pub mod stack;
pub mod tls;
pub mod tunnel;
pub mod upstream;

pub use config::Config;
pub use gateway::Gateway;
pub use server::Running;
