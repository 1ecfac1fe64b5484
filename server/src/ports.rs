//! Which port serves what, and how safely: the one place that says it, for the lines
//! `serve` logs at start. (Every port is plaintext today; TLS will be reported here.)

use std::net::SocketAddr;

/// One listening port as an operator should know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReport {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// What it serves.
    pub serves: &'static str,
    /// `plaintext`, for now.
    pub security: &'static str,
}

impl PortReport {
    /// Who can reach it, from its bind address.
    pub fn reach(&self) -> &'static str {
        let ip = self.addr.ip();
        if ip.is_loopback() {
            "this host only (loopback)"
        } else if ip.is_unspecified() {
            "every network this host is on"
        } else {
            "the network of that address"
        }
    }

    /// Whether an operator must be warned: anything but loopback, in plaintext.
    pub fn exposed_in_plaintext(&self) -> bool {
        !self.addr.ip().is_loopback() && self.security == "plaintext"
    }

    pub fn line(&self) -> String {
        format!(
            "{} on {}: {}, reachable from {}; serves {}",
            self.name,
            self.addr,
            self.security,
            self.reach(),
            self.serves
        )
    }
}

/// The ports `serve` listens on.
pub fn reports(xds: SocketAddr, admin: SocketAddr) -> [PortReport; 2] {
    [
        PortReport {
            name: "xDS",
            addr: xds,
            serves: "ADS and ECDS to any client that names a node id (listeners, clusters, extension configs, secrets)",
            security: "plaintext",
        },
        PortReport {
            name: "admin",
            addr: admin,
            serves: "the page, the JSON API, metrics and Wasm modules for remote delivery",
            security: "plaintext",
        },
    ]
}

/// Logs one line per port, and a warning for each served off loopback without TLS.
pub fn log_at_start(xds: SocketAddr, admin: SocketAddr) {
    for port in reports(xds, admin) {
        if port.exposed_in_plaintext() {
            tracing::warn!(port = port.name, addr = %port.addr, "{}; anyone who can reach it can read it (no TLS, no client authentication yet)", port.line());
        } else {
            tracing::info!(port = port.name, addr = %port.addr, "{}", port.line());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_port_says_how_safe_it_is_and_who_reaches_it() {
        let [xds, admin] = reports("0.0.0.0:18000".parse().unwrap(), "127.0.0.1:18001".parse().unwrap());
        assert_eq!(xds.reach(), "every network this host is on");
        assert!(xds.exposed_in_plaintext(), "xDS off loopback without TLS is warned about");
        assert!(
            xds.line().starts_with("xDS on 0.0.0.0:18000: plaintext, reachable from every network"),
            "{}",
            xds.line()
        );
        assert_eq!(admin.reach(), "this host only (loopback)");
        assert!(!admin.exposed_in_plaintext());
        let [v6, _] = reports("[::1]:1".parse().unwrap(), "[::]:2".parse().unwrap());
        assert!(!v6.exposed_in_plaintext());
    }
}
