//! Where module downloads may connect (SSRF guard, as Istio's agent has): link-local
//! addresses and the cloud metadata services are refused by default, after DNS
//! resolution and on every redirect; `--wasm-fetch-deny-cidr` adds ranges,
//! `--wasm-fetch-allow-cidr` exempts ranges from the deny list.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
    sync::Arc,
};

/// An address range, `ADDR/PREFIX` (or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| format!("{s:?}: not ADDRESS/PREFIX"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{s:?}: prefix 0-{max}"))?,
            None => max,
        };
        Ok(Cidr { net: net.to_canonical(), prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Refused unless allowed: link-local (where every cloud's metadata service lives) and
/// the metadata addresses outside it.
pub const DEFAULT_DENY: [&str; 4] = ["169.254.0.0/16", "fe80::/10", "100.100.100.200/32", "fd00:ec2::254/128"];

/// Which addresses module downloads may connect to.
#[derive(Debug, Clone)]
pub struct AddressGuard {
    deny: Vec<Cidr>,
    allow: Vec<Cidr>,
}

impl Default for AddressGuard {
    fn default() -> Self {
        Self::new(&[], &[])
    }
}

impl AddressGuard {
    /// The default deny list plus `deny`, with `allow` exempted.
    pub fn new(deny: &[Cidr], allow: &[Cidr]) -> Self {
        let mut all: Vec<Cidr> = DEFAULT_DENY.iter().filter_map(|c| c.parse().ok()).collect();
        all.extend_from_slice(deny);
        Self { deny: all, allow: allow.to_vec() }
    }

    /// `Err` names the range that refuses `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allow.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        match self.deny.iter().find(|c| c.contains(ip)) {
            Some(c) => Err(format!("{ip} is in a denied range ({c}; --wasm-fetch-deny-cidr, --wasm-fetch-allow-cidr)")),
            None => Ok(()),
        }
    }

    /// Checks a URL whose host is an IP literal (those are not resolved, so the resolver
    /// below never sees them).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check(IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }
}

/// A DNS resolver that drops denied addresses (and fails when none is left), so a name
/// that resolves to the metadata service, or is re-pointed there, is never connected to.
#[derive(Debug, Clone)]
pub struct GuardedResolver(pub Arc<AddressGuard>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = all
                .into_iter()
                .filter(|a| match guard.check(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refused.unwrap_or_else(|| "no address".into());
                return Err(format!("{host}: refused: {why}").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Redirects: at most 10, each target's IP literal checked (names go through the
/// resolver).
pub fn redirect_policy(guard: Arc<AddressGuard>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 10 {
            return attempt.error("more than 10 redirects");
        }
        match guard.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(e) => {
                let msg = format!("redirect to {} refused: {e}", attempt.url());
                attempt.error(msg)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_and_link_local_are_refused_unless_allowed() {
        let g = AddressGuard::default();
        for ip in ["169.254.169.254", "fe80::1", "100.100.100.200", "fd00:ec2::254", "::ffff:169.254.169.254"] {
            assert!(g.check(ip.parse().unwrap()).is_err(), "{ip}");
        }
        for ip in ["127.0.0.1", "10.0.0.1", "::1"] {
            assert!(g.check(ip.parse().unwrap()).is_ok(), "{ip}");
        }
        let deny: Cidr = "127.0.0.2/32".parse().unwrap();
        let allow: Cidr = "169.254.10.0/24".parse().unwrap();
        let g = AddressGuard::new(&[deny], &[allow]);
        assert!(g.check("127.0.0.2".parse().unwrap()).unwrap_err().contains("127.0.0.2/32"));
        assert!(g.check("127.0.0.3".parse().unwrap()).is_ok());
        assert!(g.check("169.254.10.7".parse().unwrap()).is_ok(), "allowed out of the default deny");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "nope".parse::<Cidr>().is_err());
        assert!("::/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
    }
}
