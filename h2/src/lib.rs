//! A lean HTTP/2 server transport for gRPC: just what gRPC over HTTP/2 needs (RFC 9113,
//! the gRPC HTTP/2 protocol), one task per connection, written for what it costs per
//! connection. It knows nothing of what the streams carry: a `Handler` does (for
//! Filterplane, the xDS services).
//!
//! A general HTTP/2 server (h2, under tonic) gives every connection a 16 KiB write
//! buffer, an 8 KiB read buffer and a 4 KiB HPACK buffer for as long as it stays open,
//! and runs each stream as a task of its own beside the connection's: with one
//! connection per Envoy, that was most of the memory per proxy, and four task wake-ups
//! per push and ACK. Here an idle connection holds no buffer at all (what is read is
//! parsed in place; what is written is freed once sent), its streams are handled inside
//! its task, and one notification of a new configuration wakes the connection once for
//! all its streams.
//!
//! What it does: the connection preface and SETTINGS (both ways), HEADERS and
//! CONTINUATION (HPACK decoded with `loona-hpack`; responses use literal fields only, so
//! no encoder state), DATA with flow control both ways, WINDOW_UPDATE, PING (answered,
//! and sent as keepalive), RST_STREAM and GOAWAY. PRIORITY and unknown frames are
//! ignored, as the RFC allows; PUSH_PROMISE from a client is a protocol error.
//! Everything a client sends is bounded: frame size, header block size, streams per
//! connection, request size, and output waiting to be written (past it, the connection
//! stops reading until the client reads).
//!
//! Layers, each in its file: `frames` (pure encode of frames and header blocks),
//! `request` (a request's header block checked, RFC 9113 8.2–8.3), `grpc` (gRPC message
//! framing), `output` (what waits behind flow control, bounded), `state` (the connection
//! state machine: bytes in, frames out, RFC 9113's stream states), `broadcast` (events
//! for every connection, and how far a push has reached), and `connection` (the I/O and
//! timers around it).

#![deny(clippy::unwrap_used)]

use std::time::{Duration, Instant};

pub mod broadcast;
pub mod connection;
mod frames;
pub mod grpc;
pub mod output;
pub mod request;
mod state;
pub mod status;

pub use broadcast::{Broadcast, Signal};
pub use connection::Connection;
pub use output::{OutMessage, OutputBudget};
pub use state::{MAX_BUFFERED, MAX_HEADER_BLOCK, MAX_REQUEST};
pub use status::{Code, Status};

use std::sync::Arc;

/// How connections behave; the same for all of them.
#[derive(Debug, Clone)]
pub struct H2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams one connection may have open.
    pub max_streams: u32,
    /// A PING is sent this long after the last one; a client that did not answer the
    /// last one by then is gone, and its connection is closed.
    pub keepalive: Duration,
    /// Output waiting behind flow control: its bounds, and what all connections hold.
    pub output: Arc<OutputBudget>,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self { max_streams: 100, keepalive: Duration::from_secs(30), output: Arc::default() }
    }
}

/// What the streams of one connection share, and what the connection reports through it.
pub trait ConnContext: Send + Unpin + 'static {
    /// The peer, as logs name it.
    fn peer(&self) -> &str;
    /// A bound was hit: `limit` names it (`request_bytes`, `header_block_bytes`,
    /// `streams_per_connection`, `buffered_request_bytes`, `malformed_requests`,
    /// `queued_bytes_per_stream`, `queued_bytes_per_connection`, `queued_bytes_total`).
    fn limit_hit(&self, limit: &'static str);
}

/// One gRPC stream's handler: it is given the request messages, the end of the requests,
/// events every stream hears of, and its timers, and answers with `Output`.
pub trait Handler: Sized + Send + Unpin + 'static {
    type Context: ConnContext;
    /// What every stream of every connection is told of (`Signal::Event`).
    type Event: Send + Sync + 'static;
    /// A method this handler serves.
    type Method: Copy;

    /// The method a request's `:path` names, if served.
    fn route(path: &[u8]) -> Option<Self::Method>;
    /// A new stream for `method`.
    fn open(ctx: &Self::Context, method: Self::Method) -> Self;
    /// A request message arrived (its gRPC frame removed).
    fn on_message(&mut self, ctx: &Self::Context, message: &[u8], out: &mut Output);
    /// The client ended its requests.
    fn on_requests_end(&mut self, ctx: &Self::Context, out: &mut Output);
    fn on_event(&mut self, ctx: &Self::Context, event: &Self::Event, out: &mut Output);
    /// When `on_timer` has something to do next, if ever. Asked after each call into the
    /// handler (it may change only then).
    fn next_wakeup(&self) -> Option<Instant>;
    fn on_timer(&mut self, ctx: &Self::Context, now: Instant, out: &mut Output);
}

/// What a stream handler asks of its connection after an event.
#[derive(Debug, Default)]
pub struct Output {
    /// gRPC messages to send, in order.
    pub messages: Vec<OutMessage>,
    /// End the stream with this status (after the messages).
    pub end: Option<Status>,
}
