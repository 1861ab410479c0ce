//! tokengate's own HTTP/1.1, both sides: the server side that reads every plain HTTP/1 client
//! request ([`server`]), the client side for upstreams ([`client`]), and what they share: the
//! limits below, the field rules ([`fields`]), hop-by-hop headers ([`hop`]) and the chunked
//! coding ([`chunked`]). Both sides are strict to RFC 9112 and RFC 9110 with the leniencies
//! hyper has (bare LF line endings, empty lines before a request line); `docs/DESIGN.md` lists
//! every rule and what breaking it costs the sender.
//!
//! One parser owns a connection's bytes: once [`server::serve`] has a connection, no other code
//! frames a byte of it. Its bytes leave it only for a CONNECT tunnel ([`upgrade`]), for good.

pub mod chunked;
pub mod client;
pub mod fields;
pub mod hop;
pub mod request;
pub mod request_body;
pub mod response;
pub mod server;
pub mod upgrade;

/// The most header fields in one head (request, response or trailer section): 431 beyond.
pub const MAX_HEADERS: usize = 100;
/// The most bytes of one head, from its first byte to the empty line: 431 beyond.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most one read takes, and the room made in a connection's buffer for its next bytes.
pub const READ_SIZE: usize = 8 * 1024;

pub use request::Refusal;
pub use request_body::RequestBody;
pub use response::{CarriesHead, WireHead};
pub use server::{Http1, serve};
pub use upgrade::{OnUpgrade, Rewound};
