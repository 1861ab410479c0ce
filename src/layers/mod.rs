//! The tower middleware of the request path, one per file; [`crate::stack`] assembles them, in
//! the order a request meets them: [`record`] (span, metrics, access log), [`rescue`] (errors
//! become their JSON responses), [`admit`] ([`access`]: allowed clients, shared key; then
//! [`route`]: match, rewrite, hop-by-hop; then [`shed`]: load past `max_concurrent_requests`),
//! [`tunnel`] (CONNECT to listed targets), [`replay_body`] (limits, replayable bodies),
//! [`retry`] (once on 401), [`inject_bearer`] (the token); then [`forward`], the service at the
//! core that sends the request upstream.

pub mod access;
pub mod admit;
pub mod forward;
pub mod inject_bearer;
pub mod record;
pub mod replay_body;
pub mod rescue;
pub mod retry;
pub mod route;
pub mod shed;
pub mod tunnel;
