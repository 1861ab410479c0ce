//! Who may use the credentials: the proxy listener's access policy, as a config builds it
//! (`allowed_clients`, `require_header`); [`crate::layers::access`] applies it to requests.

use std::net::IpAddr;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// The access policy of the proxy listener.
#[derive(Clone, Default)]
pub struct AccessPolicy {
    /// Networks clients may connect from; `None` allows any.
    pub allowed_clients: Option<Arc<[IpNet]>>,
    /// A header every request must carry with exactly this value.
    pub required_header: Option<Arc<(HeaderName, SecretString)>>,
}

impl AccessPolicy {
    /// The header that must carry the shared key, if one is required.
    pub fn key_header(&self) -> Option<&HeaderName> {
        self.required_header.as_deref().map(|(name, _)| name)
    }

    /// Whether a client at `peer` presenting `key` in [`Self::key_header`] may use the
    /// credentials; if not, why (the key is compared in constant time).
    pub fn admits(
        &self,
        peer: Option<IpAddr>,
        key: Option<&HeaderValue>,
    ) -> Result<(), &'static str> {
        if let Some(allowed) = &self.allowed_clients {
            let ip = canonical(peer.ok_or("client address unknown")?);
            if !allowed.iter().any(|net| net.contains(&ip)) {
                return Err("client address not allowed");
            }
        }
        if let Some(required) = &self.required_header {
            let expected = required.1.expose_secret().as_bytes();
            if !key.is_some_and(|v| bool::from(v.as_bytes().ct_eq(expected))) {
                return Err("client key missing or wrong");
            }
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are matched as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl std::fmt::Debug for AccessPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessPolicy")
            .field("allowed_clients", &self.allowed_clients)
            .field(
                "required_header",
                &self.required_header.as_ref().map(|r| &r.0),
            )
            .finish()
    }
}
