//! Which port serves what, and how safely: the one place that says it, for the lines
//! `serve` logs at start.

use std::net::SocketAddr;

/// One listening port as an operator should know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortReport {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// What it serves, and to whom.
    pub serves: String,
    /// `plaintext`, `TLS`, `mTLS (...)`.
    pub security: String,
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

/// How each port is set up, as `serve` knows it.
#[derive(Debug, Clone, Default)]
pub struct PortSecurity {
    /// `None`: plaintext.
    pub xds_tls: Option<String>,
    /// `--node-identity` rules are set (only with mTLS).
    pub node_identity: bool,
    pub sensitive_to_authenticated_only: bool,
    pub admin_tls: bool,
    pub admin_token: bool,
    pub metrics_public: bool,
    /// `Some(tls)`: a module listener of its own.
    pub modules: Option<(SocketAddr, bool)>,
}

/// The ports `serve` listens on.
pub fn reports(xds: SocketAddr, admin: SocketAddr, s: &PortSecurity) -> Vec<PortReport> {
    let who = match (&s.xds_tls, s.node_identity) {
        (Some(_), true) => "to clients whose certificate allows the node they name (--node-identity)",
        (Some(t), false) if t.starts_with("mTLS") => {
            "to any client with a valid certificate, for any node id it names (no --node-identity)"
        }
        _ => "to any client that names a node id",
    };
    let secrets = if s.sensitive_to_authenticated_only {
        "secrets only to clients with a certificate"
    } else {
        "secrets included"
    };
    let mut v = vec![
        PortReport {
            name: "xDS",
            addr: xds,
            serves: format!("ADS and ECDS {who} (listeners, clusters, extension configs; {secrets})"),
            security: s.xds_tls.clone().unwrap_or_else(|| "plaintext".into()),
        },
        PortReport {
            name: "admin",
            addr: admin,
            serves: format!(
                "the page, the JSON API{}{} {}",
                if s.modules.is_none() { ", Wasm modules for remote delivery" } else { "" },
                if s.metrics_public { " (metrics without the token)" } else { ", metrics" },
                if s.admin_token { "to holders of the bearer token" } else { "to anyone (no --admin-token-file)" }
            ),
            security: if s.admin_tls { "TLS".into() } else { "plaintext".into() },
        },
    ];
    if let Some((addr, tls)) = s.modules {
        v.push(PortReport {
            name: "modules",
            addr,
            serves: "Wasm module bytes only, of modules the served config refers to, at unguessable paths".into(),
            security: if tls { "TLS".into() } else { "plaintext".into() },
        });
    }
    v
}

/// Logs one line per port, and a warning for each served off loopback without TLS.
pub fn log_at_start(xds: SocketAddr, admin: SocketAddr, security: &PortSecurity) {
    for port in reports(xds, admin, security) {
        if port.exposed_in_plaintext() {
            tracing::warn!(port = port.name, addr = %port.addr, "{}; anyone on the network can read and alter it (no TLS)", port.line());
        } else {
            tracing::info!(port = port.name, addr = %port.addr, "{}", port.line());
        }
    }
    if security.xds_tls.is_none() && !xds.ip().is_loopback() {
        tracing::warn!("xDS clients are not authenticated: any client can claim any node id and get its config; use --xds-tls-cert, --xds-client-ca and --node-identity across a network");
    }
    if !security.admin_token && !admin.ip().is_loopback() {
        tracing::warn!("the admin API is reachable off loopback without --admin-token-file: anyone who reaches it can read the config and reload it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_port_says_how_safe_it_is_and_who_reaches_it() {
        let plain = PortSecurity::default();
        let r = reports("0.0.0.0:18000".parse().unwrap(), "127.0.0.1:18001".parse().unwrap(), &plain);
        let (xds, admin) = (&r[0], &r[1]);
        assert_eq!(xds.reach(), "every network this host is on");
        assert!(xds.exposed_in_plaintext(), "xDS off loopback without TLS is warned about");
        assert!(
            xds.line().starts_with("xDS on 0.0.0.0:18000: plaintext, reachable from every network"),
            "{}",
            xds.line()
        );
        assert!(xds.line().contains("to any client that names a node id"), "{}", xds.line());
        assert_eq!(admin.reach(), "this host only (loopback)");
        assert!(!admin.exposed_in_plaintext());
        assert!(admin.line().contains("Wasm modules") && admin.line().contains("to anyone"), "{}", admin.line());
        let v6 = reports("[::1]:1".parse().unwrap(), "[::]:2".parse().unwrap(), &plain);
        assert!(!v6[0].exposed_in_plaintext());

        let secure = PortSecurity {
            xds_tls: Some("mTLS (client certificate required)".into()),
            node_identity: true,
            admin_tls: true,
            admin_token: true,
            modules: Some(("0.0.0.0:18002".parse().unwrap(), true)),
            ..Default::default()
        };
        let r = reports("0.0.0.0:18000".parse().unwrap(), "0.0.0.0:18001".parse().unwrap(), &secure);
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|p| !p.exposed_in_plaintext()));
        assert!(r[0].line().contains("mTLS (client certificate required)") && r[0].line().contains("--node-identity"));
        assert!(r[1].line().contains("bearer token") && !r[1].line().contains("Wasm modules"), "{}", r[1].line());
        assert!(r[2].line().starts_with("modules on 0.0.0.0:18002: TLS"), "{}", r[2].line());
    }
}
