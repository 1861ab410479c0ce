//! The credential side: the exchange protocol, tokens, the token cache and bearer injection.

pub mod backoff;
pub mod cache;
pub mod crypto;
pub mod exchange;
pub mod token;
