//! The credential side: the exchange protocol, tokens, the token cache, and how the cache
//! shares its token with a fleet.

pub mod backoff;
pub mod cache;
pub mod crypto;
pub mod exchange;
pub mod shared;
pub mod token;
