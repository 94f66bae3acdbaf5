//! The SSRF guard: webhooks go only to globally reachable addresses.
//!
//! Endpoint URLs come from users, so without a guard a webhook could reach
//! the cluster's own services, a cloud metadata endpoint or anything else
//! only the worker can see. Every address a request could go to is checked
//! against [`NON_GLOBAL`]:
//!
//! - a host name is resolved by [`GuardedResolver`], reqwest's resolver for
//!   the webhook client; if **any** answer is non-global the request is
//!   refused, otherwise the connection goes to exactly the addresses that
//!   were checked (no second lookup, so DNS rebinding has nothing to race);
//! - a literal IP never reaches a resolver (hyper connects to it directly),
//!   so [`GuardedClient::send`] checks it before sending;
//! - redirects are never followed (the client's redirect policy is `none`),
//!   so a `Location` cannot lead anywhere unchecked.
//!
//! An allow-list of CIDRs ([`SsrfConfig::allow`]) opens exactly the ranges
//! it names: tests and `herald dev` open loopback that way.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SsrfConfig {
    /// CIDRs webhooks may reach even though they are not global, such as
    /// `127.0.0.0/8`; empty (the default) opens nothing.
    pub allow: Vec<Cidr>,
    /// Whether a refusal recorded in an attempt (and so returned by the API
    /// and mailed) names the address the host resolved to. Off by default:
    /// the range's class ("private, RFC 1918") tells the endpoint's owner
    /// what is wrong without mapping the cluster's network for them.
    pub reveal_refused_address: bool,
    /// Bytes of the response body kept in the attempt record when the
    /// endpoint was reached only because `allow` opens its address. 0 (the
    /// default): nothing, since an internal service's answer is what the
    /// guard exists to keep from tenants.
    pub allowed_response_body_bytes: usize,
}

/// 127.0.0.0/8 and ::1/128, which `herald dev` and tests open.
pub const LOOPBACK: [Cidr; 2] = [
    Cidr::v4([127, 0, 0, 0], 8),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
];

/// An IP network written `address/prefix`, with no host bits set: an
/// [`IpNet`] parsed strictly (ipnet itself accepts `10.1.2.3/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Panics (at compile time, in a `const`) on a prefix over 32.
    const fn v4(octets: [u8; 4], prefix: u8) -> Cidr {
        let [a, b, c, d] = octets;
        Cidr(IpNet::V4(Ipv4Net::new_assert(
            Ipv4Addr::new(a, b, c, d),
            prefix,
        )))
    }

    /// Panics (at compile time, in a `const`) on a prefix over 128.
    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr(IpNet::V6(Ipv6Net::new_assert(
            Ipv6Addr::new(a, b, c, d, e, f, g, h),
            prefix,
        )))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a CIDR like 10.0.0.0/8 or fd00::/8: {1}")]
pub struct CidrError(String, &'static str);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let error = |why| CidrError(s.to_string(), why);
        // Split by hand rather than take `IpNet::from_str`'s one error, so
        // the message says which half is wrong.
        let (address, prefix) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| error("the /prefix is missing"))?;
        let address: IpAddr = address
            .parse()
            .map_err(|_| error("not an IP address before the /"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| error("the prefix is not a number"))?;
        let network = IpNet::new(address, prefix).map_err(|_| match address {
            IpAddr::V4(_) => error("an IPv4 prefix is at most 32"),
            IpAddr::V6(_) => error("an IPv6 prefix is at most 128"),
        })?;
        // Host bits set (10.1.2.3/8) usually means a typo in the address or
        // the prefix; refusing it beats silently opening 10.0.0.0/8.
        if network.trunc() != network {
            return Err(error("bits are set after the prefix"));
        }
        Ok(Cidr(network))
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Cidr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A non-global range. For the ranges that embed an IPv4 address, the
/// verdict is that of the embedded address.
struct Range {
    cidr: Cidr,
    name: &'static str,
    embeds_v4: Option<fn(Ipv6Addr) -> Ipv4Addr>,
}

const fn refuse(cidr: Cidr, name: &'static str) -> Range {
    Range {
        cidr,
        name,
        embeds_v4: None,
    }
}

const fn embedding(cidr: Cidr, name: &'static str, embedded: fn(Ipv6Addr) -> Ipv4Addr) -> Range {
    Range {
        cidr,
        name,
        embeds_v4: Some(embedded),
    }
}

fn low_32_bits(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from(u128::from(ip) as u32)
}

fn six_to_four(ip: Ipv6Addr) -> Ipv4Addr {
    Ipv4Addr::from((u128::from(ip) >> 80) as u32)
}

/// Every address range a webhook may not reach, first match wins (so a
/// narrower range comes before the wider one holding it). From the IANA
/// special-purpose registries (RFC 6890 and successors), plus everything
/// in IPv6 outside 2000::/3, the only space allocated for global unicast.
const NON_GLOBAL: &[Range] = &[
    refuse(Cidr::v4([0, 0, 0, 0], 8), "\"this network\", RFC 791"),
    refuse(Cidr::v4([10, 0, 0, 0], 8), "private, RFC 1918"),
    refuse(
        Cidr::v4([100, 64, 0, 0], 10),
        "shared address space (CGNAT), RFC 6598",
    ),
    refuse(Cidr::v4([127, 0, 0, 0], 8), "loopback"),
    refuse(
        Cidr::v4([169, 254, 0, 0], 16),
        "link-local, where cloud metadata services live",
    ),
    refuse(Cidr::v4([172, 16, 0, 0], 12), "private, RFC 1918"),
    refuse(
        Cidr::v4([192, 0, 0, 0], 24),
        "IETF protocol assignments, RFC 6890",
    ),
    refuse(
        Cidr::v4([192, 0, 2, 0], 24),
        "documentation (TEST-NET-1), RFC 5737",
    ),
    refuse(
        Cidr::v4([192, 88, 99, 0], 24),
        "6to4 relay anycast, RFC 7526",
    ),
    refuse(Cidr::v4([192, 168, 0, 0], 16), "private, RFC 1918"),
    refuse(Cidr::v4([198, 18, 0, 0], 15), "benchmarking, RFC 2544"),
    refuse(
        Cidr::v4([198, 51, 100, 0], 24),
        "documentation (TEST-NET-2), RFC 5737",
    ),
    refuse(
        Cidr::v4([203, 0, 113, 0], 24),
        "documentation (TEST-NET-3), RFC 5737",
    ),
    refuse(Cidr::v4([224, 0, 0, 0], 4), "multicast"),
    refuse(Cidr::v4([255, 255, 255, 255], 32), "limited broadcast"),
    refuse(Cidr::v4([240, 0, 0, 0], 4), "reserved, RFC 1112"),
    refuse(Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    refuse(Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    embedding(
        Cidr::v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96),
        "IPv4-mapped",
        low_32_bits,
    ),
    refuse(
        Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "IPv4-compatible, deprecated by RFC 4291",
    ),
    embedding(
        Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
        "NAT64, RFC 6052",
        low_32_bits,
    ),
    refuse(
        Cidr::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "local-use NAT64, RFC 8215",
    ),
    refuse(
        Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        "discard-only, RFC 6666",
    ),
    refuse(
        Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
        "Teredo, RFC 4380",
    ),
    refuse(
        Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        "IETF protocol assignments, RFC 2928",
    ),
    refuse(
        Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        "documentation, RFC 3849",
    ),
    embedding(
        Cidr::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
        "6to4, RFC 3056",
        six_to_four,
    ),
    refuse(
        Cidr::v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        "documentation, RFC 9637",
    ),
    refuse(
        Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique-local, RFC 4193",
    ),
    refuse(Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    refuse(
        Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local, deprecated by RFC 3879",
    ),
    refuse(Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
    refuse(
        Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 3),
        "outside 2000::/3, the only IPv6 global unicast space",
    ),
    refuse(
        Cidr::v6([0x4000, 0, 0, 0, 0, 0, 0, 0], 2),
        "outside 2000::/3, the only IPv6 global unicast space",
    ),
    refuse(
        Cidr::v6([0x8000, 0, 0, 0, 0, 0, 0, 0], 1),
        "outside 2000::/3, the only IPv6 global unicast space",
    ),
];

/// Why the guard refused an address; its text is what the attempt records.
#[derive(Clone)]
pub struct Refused {
    address: IpAddr,
    range: &'static Range,
    /// For an IPv6 range that embeds an IPv4 address: that address and the
    /// IPv4 range that refused it.
    embedded: Option<(Ipv4Addr, &'static Range)>,
}

impl Refused {
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// The range that refused the address.
    pub fn range(&self) -> Cidr {
        self.range.cidr
    }

    pub fn range_name(&self) -> &'static str {
        self.range.name
    }

    /// The embedded IPv4 address that decided, and its range.
    pub fn embedded(&self) -> Option<(Ipv4Addr, Cidr)> {
        self.embedded.map(|(ip, range)| (ip, range.cidr))
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused by the SSRF guard: {} is in {} ({})",
            self.address, self.range.cidr, self.range.name
        )?;
        if let Some((ip, range)) = &self.embedded {
            write!(
                f,
                " and embeds {ip}, which is in {} ({})",
                range.cidr, range.name
            )?;
        }
        Ok(())
    }
}

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// What an attempt records: the full [`Display`](fmt::Display) text with
    /// `reveal_address`, else the range without the address in it.
    pub fn describe(&self, reveal_address: bool) -> String {
        if reveal_address {
            return self.to_string();
        }
        let mut text = format!(
            "refused by the SSRF guard: the address is in {} ({})",
            self.range.cidr, self.range.name
        );
        if let Some((_, range)) = &self.embedded {
            text.push_str(&format!(
                " and embeds an address in {} ({})",
                range.cidr, range.name
            ));
        }
        text
    }
}

/// Decides which addresses webhooks may reach.
#[derive(Debug, Clone, Default)]
pub struct SsrfGuard {
    allow: Vec<Cidr>,
}

impl SsrfGuard {
    pub fn new(config: &SsrfConfig) -> SsrfGuard {
        SsrfGuard {
            allow: config.allow.clone(),
        }
    }

    /// `Ok` for a global address or one the allow-list opens.
    pub fn check(&self, address: IpAddr) -> Result<(), Refused> {
        if self.allows(address) {
            return Ok(());
        }
        let Some(range) = NON_GLOBAL.iter().find(|r| r.cidr.contains(address)) else {
            return Ok(());
        };
        let refused = Refused {
            address,
            range,
            embedded: None,
        };
        match (range.embeds_v4, address) {
            (Some(embedded), IpAddr::V6(v6)) => {
                // The packets go to the embedded IPv4 address, so it decides.
                let v4 = embedded(v6);
                self.check(IpAddr::V4(v4)).map_err(|inner| Refused {
                    embedded: Some((v4, inner.range)),
                    ..refused
                })
            }
            _ => Err(refused),
        }
    }

    /// Whether `address` is global: reachable without the allow-list.
    pub fn is_global(address: IpAddr) -> bool {
        SsrfGuard::default().check(address).is_ok()
    }

    fn allows(&self, address: IpAddr) -> bool {
        self.allow.iter().any(|cidr| cidr.contains(address))
    }

    /// Checks a URL whose host is a literal IP address; a host name is left
    /// to the resolver.
    fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }
}

/// Name resolution under the guard; tests answer with addresses of their
/// choosing, production asks the system ([`SystemResolver`]).
#[async_trait::async_trait]
pub trait Resolver: Send + Sync + 'static {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>>;
}

/// getaddrinfo, through tokio's blocking pool: what reqwest does by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

#[async_trait::async_trait]
impl Resolver for SystemResolver {
    async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        let addresses = tokio::net::lookup_host((host, 0)).await?;
        Ok(addresses.map(|a| a.ip()).collect())
    }
}

/// reqwest's resolver for webhooks: looks the name up once, refuses the
/// request if any answer is non-global, and hands the connector exactly the
/// addresses it checked.
struct GuardedResolver {
    guard: Arc<SsrfGuard>,
    resolver: Arc<dyn Resolver>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let addresses = resolver.lookup(name.as_str()).await?;
            for address in &addresses {
                guard.check(*address)?;
            }
            // Port 0: reqwest puts in the URL's port (or the scheme's).
            let checked: Vec<SocketAddr> = addresses
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            Ok(Box::new(checked.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Why a guarded request was not sent or failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

/// An HTTP client every request of which goes through the guard.
#[derive(Clone)]
pub struct GuardedClient {
    client: reqwest::Client,
    guard: Arc<SsrfGuard>,
}

impl GuardedClient {
    /// Builds the client from `builder`, which must not follow redirects or
    /// use a proxy (the guard would check the proxy, not the endpoint).
    pub fn new(
        builder: reqwest::ClientBuilder,
        guard: SsrfGuard,
        resolver: Arc<dyn Resolver>,
    ) -> reqwest::Result<GuardedClient> {
        let guard = Arc::new(guard);
        let client = builder
            .dns_resolver(Arc::new(GuardedResolver {
                guard: guard.clone(),
                resolver,
            }))
            .build()?;
        Ok(GuardedClient { client, guard })
    }

    pub fn post<U: reqwest::IntoUrl>(&self, url: U) -> reqwest::RequestBuilder {
        self.client.post(url)
    }

    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, SendError> {
        let request = request.build()?;
        // hyper connects to a literal IP without asking the resolver.
        self.guard.check_url(request.url())?;
        self.client
            .execute(request)
            .await
            .map_err(|e| match refusal_in(&e) {
                Some(refused) => SendError::Refused(refused.clone()),
                None => SendError::Http(e),
            })
    }
}

/// The guard's refusal somewhere in the causes of a request error.
fn refusal_in(error: &reqwest::Error) -> Option<&Refused> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        cause = e.source();
    }
    None
}

#[cfg(test)]
mod tests;
