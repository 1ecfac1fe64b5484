//! Accepting connections on one port: the cap on connections open at once and per client
//! address, the wait for a client's first byte (which holds nothing but its socket), the
//! TLS handshake in a task of its own, and the hand-over of finished connections.
//!
//! A client that sends nothing must not delay one that does: a silent connection takes
//! no handshake slot and no time on the accept path, and when the port is full the
//! oldest connection still silent makes room for a new one.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{
    log_limit,
    metrics::Metrics,
    tls::{MaybeTls, ReloadingTls},
};

/// A connection the accept loop finished: first byte in, TLS handshake done; it holds
/// its place under the port's caps for as long as it lives.
#[derive(Debug)]
pub struct Accepted {
    pub io: MaybeTls,
    pub addr: SocketAddr,
    pub hold: ConnectionHold,
}

/// A connection's place under its port's caps, given back when dropped. (Small: every
/// proxy's connection holds one.)
#[derive(Debug)]
pub struct ConnectionHold {
    port: Arc<PortPlaces>,
    /// Counted under this address.
    ip: Option<IpAddr>,
    /// Counted in the port's gauge.
    gauged: bool,
}

impl Drop for ConnectionHold {
    fn drop(&mut self) {
        self.port.cap.add_permits(1);
        if let Some(ip) = self.ip {
            self.port.leave(ip);
        }
        if let (true, Some(g)) = (self.gauged, &self.port.gauge) {
            g.dec();
        }
    }
}

/// A port's places: connections open in all, per client address, and its gauge.
#[derive(Debug)]
struct PortPlaces {
    cap: Semaphore,
    by_address: Mutex<HashMap<IpAddr, usize>>,
    gauge: Option<Gauge>,
}

impl PortPlaces {
    /// One more connection from `ip`, unless it has `max` already.
    fn enter(&self, ip: IpAddr, max: usize) -> bool {
        let mut m = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, ip: IpAddr) {
        let mut m = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }
}

/// How one port accepts connections.
#[derive(Debug, Clone)]
pub struct AcceptSettings {
    pub port: &'static str,
    pub tls: Option<Arc<ReloadingTls>>,
    /// Time a client has to send its first byte and finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections open at once, silent ones included.
    pub max_connections: usize,
    /// Connections open at once from one client address (`None`: no such cap).
    pub max_per_address: Option<usize>,
    /// Written to a plaintext connection refused for the caps, before it is closed.
    pub busy_reply: &'static [u8],
    /// The `limit` labels counted when each cap is hit.
    pub cap_limit: &'static str,
    pub address_limit: &'static str,
    /// The `limit` label counted when a plaintext client sends nothing in time.
    pub silent_limit: &'static str,
    /// Open connections (handed over), when the port has a gauge.
    pub gauge: Option<Gauge>,
}

/// Connections accepted and still silent, oldest first: each can be told to give its
/// place up. (Tokens of connections that spoke are cancelled by them and skipped.)
#[derive(Debug, Default)]
struct SilentQueue(Mutex<VecDeque<CancellationToken>>);

impl SilentQueue {
    fn enter(&self) -> CancellationToken {
        let token = CancellationToken::new();
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while q.front().is_some_and(CancellationToken::is_cancelled) {
            q.pop_front();
        }
        q.push_back(token.clone());
        token
    }

    /// Tells the oldest silent connection to go; false when none is silent.
    fn evict_oldest(&self) -> bool {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(t) = q.pop_front() {
            if !t.is_cancelled() {
                t.cancel();
                return true;
            }
        }
        false
    }
}

/// How long a new connection waits for an evicted silent one to give its place back.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// Accepts on `listener` until `shutdown`; each connection waits for its first byte and
/// does its TLS handshake in a task of its own, then goes to the returned channel.
pub fn accept_loop(
    listener: tokio::net::TcpListener,
    settings: AcceptSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(64);
    let port = Arc::new(PortPlaces {
        cap: Semaphore::new(settings.max_connections),
        by_address: Mutex::default(),
        gauge: settings.gauge.clone(),
    });
    let silent = Arc::new(SilentQueue::default());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait rather than spin, and
                    // say so once in a while, not 1,600 times.
                    metrics.limit_hit("accept_errors");
                    if let Some(left_out) = log_limit::ACCEPT_FAILURES.admit() {
                        tracing::warn!(port = settings.port, error = %e, left_out, "accept failed (logged once per 10 s)");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let placed = match port.cap.try_acquire() {
                Ok(p) => Some(p),
                // Full: the oldest connection that has not said a word makes room.
                Err(_) if silent.evict_oldest() => {
                    metrics.limit_hit("silent_connections_evicted");
                    tokio::time::timeout(EVICTION_WAIT, port.cap.acquire()).await.ok().and_then(Result::ok)
                }
                Err(_) => None,
            };
            let Some(permit) = placed else {
                metrics.limit_hit(settings.cap_limit);
                refuse(&tcp, &settings);
                continue;
            };
            // Given back by the hold's drop.
            permit.forget();
            let _ = tcp.set_nodelay(true);
            let _ = socket2::SockRef::from(&tcp)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)));
            let mut hold = ConnectionHold { port: port.clone(), ip: None, gauged: false };
            let token = silent.enter();
            let (tx, metrics, settings, shutdown) = (tx.clone(), metrics.clone(), settings.clone(), shutdown.clone());
            // Ends within the handshake timeout, or at shutdown.
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                // A byte really there, not a readiness that may be spurious.
                let mut first = [0u8; 1];
                let spoke = tokio::select! {
                    _ = token.cancelled() => return,
                    _ = shutdown.cancelled() => return,
                    r = tokio::time::timeout(settings.handshake_timeout, tcp.peek(&mut first)) => r,
                };
                // Spoke (or timed out): no longer a candidate for eviction.
                token.cancel();
                match spoke {
                    Ok(Ok(1..)) => {}
                    // Closed without a byte, or failed.
                    Ok(_) => return,
                    Err(_) => {
                        metrics.limit_hit(if settings.tls.is_some() {
                            "tls_handshake_timeout"
                        } else {
                            settings.silent_limit
                        });
                        return;
                    }
                }
                // Counted per address once it speaks (silent ones are bounded by the cap,
                // and evicted first): one address cannot hold every place.
                if let Some(max) = settings.max_per_address {
                    if !hold.port.enter(addr.ip(), max) {
                        metrics.limit_hit(settings.address_limit);
                        refuse(&tcp, &settings);
                        return;
                    }
                    hold.ip = Some(addr.ip());
                }
                let io = match &settings.tls {
                    None => MaybeTls::Plain(tcp),
                    Some(tls) => {
                        let left = settings.handshake_timeout.saturating_sub(started.elapsed());
                        let handshake = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            h = tokio::time::timeout(left, crate::tls::TlsConn::accept(tcp, tls.config())) => h,
                        };
                        match handshake {
                            Ok(Ok(stream)) => MaybeTls::Tls(Box::new(stream)),
                            Ok(Err(e)) => {
                                metrics
                                    .tls_handshake_failures
                                    .get_or_create(&crate::metrics::PortLabel::new(settings.port))
                                    .inc();
                                tracing::debug!(port = settings.port, peer = %addr, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                metrics.limit_hit("tls_handshake_timeout");
                                tracing::debug!(port = settings.port, peer = %addr, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                if let Some(g) = &hold.port.gauge {
                    g.inc();
                    hold.gauged = true;
                }
                let _ = tx.send(Accepted { io, addr, hold }).await;
            });
        }
    });
    rx
}

/// A connection refused for the caps: told so when plaintext, then closed.
fn refuse(tcp: &tokio::net::TcpStream, settings: &AcceptSettings) {
    if settings.tls.is_none() && !settings.busy_reply.is_empty() {
        // Best effort: a fresh socket's send buffer takes this at once.
        let _ = tcp.try_write(settings.busy_reply);
    }
}

/// File descriptors kept out of the xDS cap besides the admin and module connections:
/// the listeners, config and state files, module fetches, etcd, log files, probes.
pub const FD_RESERVE: usize = 256;

/// The xDS connection cap when `--max-xds-connections` is 0: the process's file
/// descriptor limit less the admin (and module) port caps and `FD_RESERVE`.
pub fn default_xds_cap(fd_limit: u64, other_ports: usize) -> usize {
    let fd_limit = usize::try_from(fd_limit).unwrap_or(usize::MAX);
    fd_limit.saturating_sub(other_ports + FD_RESERVE).max(fd_limit / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_xds_cap_keeps_descriptors_for_the_other_ports() {
        assert_eq!(default_xds_cap(20_000, 1024), 20_000 - 1024 - FD_RESERVE);
        // A tiny limit still lets half of it serve proxies.
        assert_eq!(default_xds_cap(1024, 1024), 512);
    }

    #[test]
    fn the_oldest_silent_connection_is_evicted_first() {
        let q = SilentQueue::default();
        let (a, b, c) = (q.enter(), q.enter(), q.enter());
        a.cancel(); // a spoke
        assert!(q.evict_oldest());
        assert!(b.is_cancelled() && !c.is_cancelled());
        assert!(q.evict_oldest());
        assert!(!q.evict_oldest(), "none left silent");
    }

    #[test]
    fn places_are_counted_and_given_back() {
        let port = Arc::new(PortPlaces { cap: Semaphore::new(3), by_address: Mutex::default(), gauge: None });
        let ip: IpAddr = [127, 0, 0, 1].into();
        let hold = |ip: Option<IpAddr>| {
            port.cap.try_acquire().unwrap().forget();
            ConnectionHold { port: port.clone(), ip, gauged: false }
        };
        assert!(port.enter(ip, 2) && port.enter(ip, 2));
        let (one, _two) = (hold(Some(ip)), hold(Some(ip)));
        assert!(!port.enter(ip, 2), "two from one address at most");
        assert!(port.enter([127, 0, 0, 2].into(), 2));
        let _three = hold(Some([127, 0, 0, 2].into()));
        assert!(port.cap.try_acquire().is_err(), "three in all");
        drop(one);
        assert!(port.cap.try_acquire().is_ok() && port.enter(ip, 2), "both places given back");
        assert!(std::mem::size_of::<ConnectionHold>() <= 32);
    }
}
