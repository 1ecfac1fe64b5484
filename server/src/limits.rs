//! Bounds on what clients can make the server hold that live below the protocol, and
//! the connection wrappers that enforce them: a deadline for an xDS connection's HTTP/2
//! preface, and caps on admin connections and event-stream clients. (Bounds inside the
//! protocol are in `xds::stream::StreamSettings`; docs/operations.md's "Limits and hardening"
//! table lists them all.) Every hit is counted in `filterplane_limit_hits_total`.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::mpsc,
    time::Sleep,
};
use tokio_util::sync::CancellationToken;

use crate::{
    accept::{accept_loop, AcceptSettings, Accepted, ConnectionHold},
    metrics::Metrics,
    tls::{MaybeTls, PeerInfo, ReloadingTls},
};

/// Connection-level bounds; their defaults are in `settings::defaults`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// xDS streams one HTTP/2 connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS).
    /// An Envoy opens one or two.
    pub max_streams_per_connection: u32,
    /// Time an xDS connection has to send the HTTP/2 preface before it is closed.
    pub handshake_timeout: Duration,
    /// xDS connections open at once (0: the file-descriptor limit less `fd_reserve`).
    pub max_xds_connections: usize,
    /// xDS connections open at once from one client address.
    pub max_xds_connections_per_address: usize,
    /// Output waiting behind flow control: per stream, per connection, in all.
    pub max_queued_bytes_per_stream: usize,
    pub max_queued_bytes_per_connection: usize,
    pub max_queued_bytes: usize,
    /// Admin connections open at once; more are answered 503 and closed.
    pub max_admin_connections: usize,
    /// `/api/v1/events` clients at once; more are answered 503.
    pub max_event_clients: usize,
    /// Time an admin connection has to send its first request.
    pub admin_request_timeout: Duration,
    /// Time an admin connection may go without reading or writing anything (an event
    /// stream writes a keep-alive comment every 15 s, so it is never idle that long).
    pub admin_idle_timeout: Duration,
}

/// The HTTP/2 client preface every gRPC connection starts with (RFC 9113, 3.4).
const PREFACE_BYTES: usize = 24;

/// An accepted xDS connection that must send the HTTP/2 preface before a deadline;
/// after that it is a plain connection (HTTP/2 keepalive pings watch it).
#[derive(Debug)]
pub struct Handshake<IO> {
    io: IO,
    /// The connection's place under the port's caps.
    _hold: ConnectionHold,
    /// `None` once the preface is in.
    deadline: Option<Pin<Box<Sleep>>>,
    seen: usize,
    metrics: Arc<Metrics>,
}

impl<IO> Handshake<IO> {
    pub fn new(io: IO, hold: ConnectionHold, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self { io, _hold: hold, deadline: Some(Box::pin(tokio::time::sleep(timeout))), seen: 0, metrics }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Handshake<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.deadline.is_none() {
            return read;
        }
        if let Poll::Ready(Ok(())) = read {
            self.seen += buf.filled().len() - before;
            if self.seen >= PREFACE_BYTES {
                self.deadline = None;
            }
            return read;
        }
        let expired = self.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if read.is_pending() && expired {
            self.metrics.limit_hit("handshake_timeout");
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no HTTP/2 preface in time")));
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Handshake<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Handshake<MaybeTls> {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.io.peer()
    }
}

/// The admin (or module) listener, with at most `max_admin_connections` connections
/// open: one more is answered 503 and closed (by `accept::accept_loop`), so admin clients can
/// never take the file descriptors Envoys need.
pub struct CappedListener {
    accepted: mpsc::Receiver<Accepted>,
    addr: std::net::SocketAddr,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
}

impl CappedListener {
    /// Accepts on `inner` (TLS when `tls` is set) until `shutdown`.
    pub fn new(
        inner: TcpListener,
        port: &'static str,
        tls: Option<Arc<ReloadingTls>>,
        limits: ConnectionLimits,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> io::Result<Self> {
        let addr = inner.local_addr()?;
        let settings = AcceptSettings {
            port,
            tls,
            handshake_timeout: limits.admin_request_timeout,
            max_connections: limits.max_admin_connections,
            max_per_address: None,
            busy_reply: BUSY,
            cap_limit: if port == "modules" { "module_connections" } else { "admin_connections" },
            address_limit: "",
            silent_limit: "admin_idle",
            gauge: None,
        };
        let accepted = accept_loop(inner, settings, metrics.clone(), shutdown);
        Ok(Self { accepted, addr, limits, metrics })
    }
}

/// A connection holding one of the listener's permits, closed when it sends no request
/// in time or goes idle: a held slot is a slot the next client (an Envoy fetching a
/// module) does not get.
pub struct Capped {
    io: MaybeTls,
    _hold: ConnectionHold,
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
    metrics: Arc<Metrics>,
}

impl Capped {
    fn alive(&mut self) {
        let idle = self.idle;
        self.deadline.as_mut().reset(tokio::time::Instant::now() + idle);
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 36\r\nconnection: close\r\n\r\ntoo many admin connections; retry.\r\n";

impl axum::serve::Listener for CappedListener {
    type Io = Capped;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Capped, std::net::SocketAddr) {
        let Some(Accepted { io, addr, hold }) = self.accepted.recv().await else {
            // The accept loop ended: shutting down.
            return std::future::pending().await;
        };
        let deadline = Box::pin(tokio::time::sleep(self.limits.admin_request_timeout));
        let (idle, metrics) = (self.limits.admin_idle_timeout, self.metrics.clone());
        (Capped { io, _hold: hold, deadline, idle, metrics }, addr)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        Ok(self.addr)
    }
}

impl AsyncRead for Capped {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.alive(),
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => {
                self.metrics.limit_hit("admin_idle");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "admin connection idle")));
            }
            _ => {}
        }
        read
    }
}

impl AsyncWrite for Capped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            if *n > 0 {
                self.alive();
            }
        }
        written
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
