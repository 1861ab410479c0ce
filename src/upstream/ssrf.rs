//! The SSRF guard for egress tunnels, in the manner of Smokescreen: resolve the target first,
//! classify every address it resolves to, and hand back one checked address to dial, so that
//! what is dialled is exactly what was checked (no second lookup an attacker's DNS could
//! answer differently).
//!
//! [`crate::layers::tunnel`] uses it for CONNECT.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures_util::future::BoxFuture;
use ipnet::IpNet;

/// Turns a host name into addresses. The seam tests use to play DNS.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses `host:port` resolves to, in the resolver's order.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// A resolver answering from a fixed table, for tests (and to pin names): unknown names fail
/// as "not found".
#[derive(Debug, Clone, Default)]
pub struct StaticResolver(pub HashMap<String, Vec<IpAddr>>);

impl Resolve for StaticResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        let found = self.0.get(&host.to_ascii_lowercase()).map(|ips| {
            ips.iter()
                .map(|&ip| SocketAddr::new(ip, port))
                .collect::<Vec<_>>()
        });
        Box::pin(async move { found.ok_or_else(|| io::ErrorKind::NotFound.into()) })
    }
}

/// Why an address may not be dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// 127.0.0.0/8, `::1`.
    #[error("loopback address")]
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, `fc00::/7`.
    #[error("private address")]
    Private,
    /// 169.254/16 (cloud metadata at 169.254.169.254 among them), `fe80::/10`.
    #[error("link-local address")]
    LinkLocal,
    /// 100.64/10, carrier-grade NAT.
    #[error("shared (CGNAT) address")]
    Cgnat,
    /// 0.0.0.0/8, `::`, multicast, 240/4 and broadcast: nothing a tunnel should reach.
    #[error("unspecified, multicast or reserved address")]
    Reserved,
    /// An IPv6 form carrying an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo), which
    /// could otherwise smuggle a denied IPv4 address past the IPv4 rules.
    #[error("IPv6 address embedding IPv4")]
    EmbeddedIpv4,
}

/// Why a tunnel target cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// The name.
        host: String,
        /// The resolver's error.
        #[source]
        source: io::Error,
    },
    /// It resolved to no address at all.
    #[error("{host} resolves to no address")]
    NoAddress {
        /// The name.
        host: String,
    },
    /// One of its addresses is denied.
    #[error("{host} resolves to {addr}: {reason}")]
    Denied {
        /// The name.
        host: String,
        /// The denied address.
        addr: IpAddr,
        /// Its class.
        reason: Denied,
    },
}

/// The class that denies `ip`, if any. Addresses inside an `allowed` range pass whatever their
/// class: that is how an operator opens, say, one internal service to tunnels.
pub fn classify(ip: IpAddr, allowed: &[IpNet]) -> Result<(), Denied> {
    if allowed.iter().any(|net| net.contains(&ip)) {
        return Ok(());
    }
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Result<(), Denied> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Err(Denied::Loopback)
    } else if ip.is_private() {
        Err(Denied::Private)
    } else if ip.is_link_local() {
        Err(Denied::LinkLocal)
    } else if a == 100 && (64..128).contains(&b) {
        Err(Denied::Cgnat)
    } else if a == 0 || ip.is_multicast() || a >= 240 {
        Err(Denied::Reserved)
    } else {
        Ok(())
    }
}

fn classify_v6(ip: Ipv6Addr) -> Result<(), Denied> {
    let s = ip.segments();
    if ip.is_loopback() {
        Err(Denied::Loopback)
    } else if ip.is_unspecified() || ip.is_multicast() {
        Err(Denied::Reserved)
    } else if s[0] & 0xfe00 == 0xfc00 {
        Err(Denied::Private)
    } else if s[0] & 0xffc0 == 0xfe80 {
        Err(Denied::LinkLocal)
    } else if embeds_ipv4(&s) {
        Err(Denied::EmbeddedIpv4)
    } else {
        Ok(())
    }
}

/// `::ffff:0:0/96` (mapped), `::/96` (compatible), `64:ff9b::/96` and `64:ff9b:1::/48` (NAT64),
/// `2002::/16` (6to4), `2001::/32` (Teredo).
fn embeds_ipv4(s: &[u16; 8]) -> bool {
    let zeros = |n: usize| s[..n].iter().all(|&x| x == 0);
    (zeros(5) && s[5] == 0xffff)
        || zeros(6)
        || (s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0; 4] || s[2] == 1))
        || s[0] == 0x2002
        || (s[0] == 0x2001 && s[1] == 0)
}

/// Resolves `host:port` with `resolver` and checks every address it gives: one denied address
/// denies the target (a DNS answer mixing a public and a private address is refused, not
/// raced). Returns the first address, the one to dial.
pub async fn checked_address(
    resolver: &dyn Resolve,
    host: &str,
    port: u16,
    allowed: &[IpNet],
) -> Result<SocketAddr, GuardError> {
    let addrs = resolver
        .resolve(host, port)
        .await
        .map_err(|source| GuardError::Resolve {
            host: host.to_owned(),
            source,
        })?;
    for addr in &addrs {
        classify(addr.ip(), allowed).map_err(|reason| GuardError::Denied {
            host: host.to_owned(),
            addr: addr.ip(),
            reason,
        })?;
    }
    addrs.first().copied().ok_or_else(|| GuardError::NoAddress {
        host: host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn denies_every_internal_class_and_ipv6_forms_that_embed_ipv4() {
        let cases = [
            ("127.0.0.1", Denied::Loopback),
            ("127.255.0.9", Denied::Loopback),
            ("::1", Denied::Loopback),
            ("10.1.2.3", Denied::Private),
            ("172.16.0.1", Denied::Private),
            ("172.31.255.255", Denied::Private),
            ("192.168.1.1", Denied::Private),
            ("fd12:3456::1", Denied::Private),
            ("169.254.169.254", Denied::LinkLocal),
            ("fe80::1", Denied::LinkLocal),
            ("100.64.0.1", Denied::Cgnat),
            ("100.127.255.254", Denied::Cgnat),
            ("0.0.0.0", Denied::Reserved),
            ("224.0.0.1", Denied::Reserved),
            ("255.255.255.255", Denied::Reserved),
            ("::", Denied::Reserved),
            ("ff02::1", Denied::Reserved),
            ("::ffff:127.0.0.1", Denied::EmbeddedIpv4),
            ("::ffff:169.254.169.254", Denied::EmbeddedIpv4),
            ("::127.0.0.1", Denied::EmbeddedIpv4),
            ("64:ff9b::a9fe:a9fe", Denied::EmbeddedIpv4),
            ("64:ff9b:1::a00:1", Denied::EmbeddedIpv4),
            ("2002:7f00:1::", Denied::EmbeddedIpv4),
            ("2001:0:4136:e378::1", Denied::EmbeddedIpv4),
        ];
        for (addr, want) in cases {
            assert_eq!(classify(ip(addr), &[]), Err(want), "{addr}");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
        ] {
            assert_eq!(classify(ip(public), &[]), Ok(()), "{public}");
        }
    }

    #[test]
    fn an_allowed_range_opens_only_itself() {
        let allowed: Vec<IpNet> = vec!["10.20.0.0/16".parse().unwrap()];
        assert_eq!(classify(ip("10.20.3.4"), &allowed), Ok(()));
        assert_eq!(classify(ip("10.21.3.4"), &allowed), Err(Denied::Private));
        assert_eq!(
            classify(ip("::ffff:10.20.3.4"), &allowed),
            Err(Denied::EmbeddedIpv4)
        );
    }

    #[tokio::test]
    async fn checks_every_resolved_address_and_returns_the_one_to_dial() {
        let dns = StaticResolver(HashMap::from(
            [
                (
                    "api.example.com",
                    vec![ip("93.184.216.34"), ip("2606:4700::1")],
                ),
                ("metadata.evil", vec![ip("169.254.169.254")]),
                ("mixed.evil", vec![ip("93.184.216.34"), ip("10.0.0.5")]),
                ("mapped.evil", vec![ip("::ffff:127.0.0.1")]),
                ("empty.example", vec![]),
            ]
            .map(|(host, ips)| (host.to_owned(), ips)),
        ));
        let got = checked_address(&dns, "api.example.com", 443, &[]).await;
        assert_eq!(got.unwrap(), "93.184.216.34:443".parse().unwrap());
        for (host, reason) in [
            ("metadata.evil", Denied::LinkLocal),
            ("mixed.evil", Denied::Private),
            ("mapped.evil", Denied::EmbeddedIpv4),
        ] {
            match checked_address(&dns, host, 443, &[]).await {
                Err(GuardError::Denied { reason: r, .. }) => assert_eq!(r, reason, "{host}"),
                other => panic!("{host}: {other:?}"),
            }
        }
        assert!(matches!(
            checked_address(&dns, "empty.example", 443, &[]).await,
            Err(GuardError::NoAddress { .. })
        ));
        assert!(matches!(
            checked_address(&dns, "nowhere.example", 443, &[]).await,
            Err(GuardError::Resolve { .. })
        ));
        let allowed = ["10.0.0.0/24".parse().unwrap()];
        let got = checked_address(&dns, "mixed.evil", 8443, &allowed).await;
        assert_eq!(got.unwrap(), "93.184.216.34:8443".parse().unwrap());
    }
}
