//! The xDS port's HTTP/2: just what gRPC over HTTP/2 needs (RFC 9113, the gRPC
//! HTTP/2 protocol), one task per connection, written here for what it costs per proxy.
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

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use filterplane_xds::snapshot::Generation;

use crate::xds::{
    grpc_frames::{FrameError, MessageReader},
    h2_output::{OutQueue, OutputBudget},
    h2_request::HeadCheck,
    service::{ConnPeer, Handler, Output, XdsServices},
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Length of a frame's header (RFC 9113, 4.1).
const FRAME_HEAD: usize = 9;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const STREAM_CLOSED: u32 = 0x5;
const FRAME_SIZE_ERROR: u32 = 0x6;
const REFUSED_STREAM: u32 = 0x7;
const COMPRESSION_ERROR: u32 = 0x9;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The largest frame a client may send (the protocol's default; not raised).
const MAX_FRAME_IN: usize = 16_384;
/// What a client may send on one stream before Filterplane says it read it. (A request
/// not complete yet is buffered up to `MAX_REQUEST`; all of a connection's such requests
/// together up to `MAX_BUFFERED`.)
const STREAM_WINDOW: u32 = 1 << 20;
/// Requests not complete yet, all streams of a connection together: a client that opens
/// many streams and half-sends a large request on each is cut off here.
pub const MAX_BUFFERED: usize = 8 << 20;
/// The same for the whole connection.
const CONN_WINDOW: u32 = 4 << 20;
/// A header block (HEADERS and its CONTINUATIONs) may be at most this large; Envoy's
/// are a few hundred bytes.
pub const MAX_HEADER_BLOCK: usize = 16 << 10;
/// Requests over 4 MiB are refused (tonic's default before); responses may be any size
/// (inline Wasm modules).
pub const MAX_REQUEST: usize = 4 << 20;
/// Past this much output waiting to be written, the connection stops reading (and
/// queuing) until the client reads: a client that never reads cannot grow it.
const WRITE_HIGH: usize = 64 << 10;
/// How long output may wait on a closed window before, with the server over its total
/// output bound, the stream counts as stuck and is reset (the connection's timer wakes
/// it then).
const STALL: Duration = Duration::from_secs(1);
/// What is read from the socket at a time (on the stack; only a frame cut in two is
/// kept between reads).
const READ_CHUNK: usize = 8 << 10;
/// How much of a status message goes into the `grpc-message` trailer.
const MAX_STATUS_MESSAGE: usize = 1024;
/// Loop turns in one poll before the task yields to others.
const TURNS_PER_POLL: usize = 64;

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

/// A connection error: GOAWAY with this code, then close.
#[derive(Debug)]
struct ConnError {
    code: u32,
    why: &'static str,
}

fn fail(code: u32, why: &'static str) -> ConnError {
    ConnError { code, why }
}

/// One open stream.
#[derive(Debug)]
struct Slot {
    id: u32,
    handler: Handler,
    /// What the client lets Filterplane send on this stream.
    send_window: i64,
    /// Bytes received since the last WINDOW_UPDATE for this stream.
    recv_unacked: u32,
    /// A request message not complete yet.
    inbuf: MessageReader,
    /// Messages to send, and how much of the first is sent.
    out: OutQueue,
    out_pos: usize,
    /// Over an output bound: reset with ENHANCE_YOUR_CALM at the next pump.
    reset: bool,
    /// Since when output has waited on a window the client keeps closed.
    blocked_since: Option<Instant>,
    /// End the stream with this once `out` is sent.
    end: Option<Status>,
    /// The client ended its side.
    remote_done: bool,
    /// What is left of the request body its `content-length` announced (RFC 9113, 8.1.1).
    content_left: Option<u64>,
}

/// A header block arriving in pieces.
#[derive(Debug)]
struct Partial {
    id: u32,
    end_stream: bool,
    self_dependent: bool,
    block: Vec<u8>,
}

/// One HTTP/2 connection, run as a future until it closes.
pub struct Connection<IO> {
    io: IO,
    services: XdsServices,
    peer: ConnPeer,
    settings: H2Settings,
    /// A frame cut in two by a read; empty (unallocated) otherwise.
    rbuf: Vec<u8>,
    /// Output not written yet, from `wpos`; unallocated once written.
    wbuf: Vec<u8>,
    wpos: usize,
    hpack: loona_hpack::Decoder<'static>,
    preface_done: bool,
    partial: Option<Box<Partial>>,
    streams: Vec<Slot>,
    last_stream_id: u32,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// What the client lets Filterplane send on the connection.
    send_window: i64,
    /// Bytes received since the last connection WINDOW_UPDATE.
    recv_unacked: u32,
    /// Bytes of requests not complete yet, all streams together (`MAX_BUFFERED`).
    buffered: usize,
    /// Bytes of messages waiting in the streams' queues, not yet framed into `wbuf`
    /// (counted in `settings.output` too).
    queued: usize,
    /// New configurations, and the server stopping.
    signals: tokio_stream::wrappers::WatchStream<Signal>,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    /// The keepalive timer was polled since it was last set, so it wakes the connection
    /// when due: until then, a wake-up (one per push) need not poll it again.
    keepalive_armed: bool,
    ping_outstanding: bool,
    /// The earliest stream timer (a Wasm resend, a held removal), when one is due.
    timer: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// A handler ran since the timer was armed: its wake-up may have changed.
    timer_stale: bool,
    /// GOAWAY sent or received: no new streams; close once the output is written.
    closing: bool,
    /// The streams closed last, and whether the client closed its side of each (its
    /// END_STREAM or RST_STREAM): a frame after that is an error (RFC 9113, 5.1), while
    /// one crossing this side's reset or trailers is not. Older ones are forgotten.
    /// (Boxed: 8 bytes in every connection, not a `VecDeque`'s 32, until a stream closes.)
    #[allow(clippy::box_collection)]
    recently_closed: Option<Box<VecDeque<(u32, bool)>>>,
}

/// How many closed streams a connection remembers (an Envoy closes almost none).
const CLOSED_REMEMBERED: usize = 32;

/// What a frame's stream id refers to (RFC 9113, 5.1).
enum StreamState {
    Open(usize),
    /// Above every id the client used: not opened yet.
    Idle,
    /// Closed after the client closed its side: it may not send on it again.
    ClosedByClient,
    /// Ended by this side: frames the client sent before it knew are dropped.
    ClosedHere,
    /// Below the last id, never opened here (skipped) or closed too long ago to tell.
    Unknown,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<IO> {
    pub fn new(
        io: IO,
        services: XdsServices,
        peer: ConnPeer,
        settings: H2Settings,
        signals: watch::Receiver<Signal>,
    ) -> Self {
        let signals = tokio_stream::wrappers::WatchStream::from_changes(signals);
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(4096);
        let keepalive = Box::pin(tokio::time::sleep(settings.keepalive));
        let mut conn = Self {
            io,
            services,
            peer,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            hpack,
            preface_done: false,
            partial: None,
            streams: Vec::new(),
            last_stream_id: 0,
            peer_initial_window: 65_535,
            peer_max_frame: 16_384,
            send_window: 65_535,
            recv_unacked: 0,
            buffered: 0,
            queued: 0,
            signals,
            keepalive,
            keepalive_armed: false,
            ping_outstanding: false,
            timer: None,
            timer_stale: false,
            closing: false,
            recently_closed: None,
            settings,
        };
        // The server's preface: its SETTINGS, then the connection window raised.
        let mut s = Vec::with_capacity(18);
        for (id, value) in [(0x3u16, conn.settings.max_streams), (0x4, STREAM_WINDOW), (0x6, MAX_HEADER_BLOCK as u32)] {
            s.extend_from_slice(&id.to_be_bytes());
            s.extend_from_slice(&value.to_be_bytes());
        }
        conn.frame(SETTINGS, 0, 0, &s);
        conn.window_update(0, CONN_WINDOW - 65_535);
        conn
    }

    fn frame(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) {
        // One allocation for the frame (the buffer is usually empty: it is freed once written).
        self.wbuf.reserve(FRAME_HEAD + payload.len());
        frame_head(&mut self.wbuf, payload.len(), ty, flags, id);
        self.wbuf.extend_from_slice(payload);
    }

    fn window_update(&mut self, id: u32, increment: u32) {
        self.frame(WINDOW_UPDATE, 0, id, &increment.to_be_bytes());
    }

    fn rst(&mut self, id: u32, code: u32) {
        self.frame(RST_STREAM, 0, id, &code.to_be_bytes());
    }

    /// GOAWAY: no stream after the last one seen will be served; close once written.
    fn go_away(&mut self, code: u32, why: &str) {
        if self.closing {
            return;
        }
        let mut p = Vec::with_capacity(8 + why.len());
        p.extend_from_slice(&self.last_stream_id.to_be_bytes());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(why.as_bytes());
        self.frame(GOAWAY, 0, 0, &p);
        self.closing = true;
    }

    /// Forgets stream `i` (dropping its handler takes the proxy out of the tracker).
    fn remove_stream(&mut self, i: usize) {
        let slot = self.streams.remove(i);
        self.buffered -= slot.inbuf.buffered();
        self.unqueue(waiting(&slot));
        self.closed(slot.id, slot.remote_done);
    }

    /// Remembers a closed stream (`by_client`: the client had closed its side).
    fn closed(&mut self, id: u32, by_client: bool) {
        let closed = self.recently_closed.get_or_insert_with(Default::default);
        if closed.len() == CLOSED_REMEMBERED {
            closed.pop_front();
        }
        closed.push_back((id, by_client));
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.streams.iter().position(|s| s.id == id)
    }

    fn state(&self, id: u32) -> StreamState {
        if let Some(i) = self.index(id) {
            return StreamState::Open(i);
        }
        if id > self.last_stream_id {
            return StreamState::Idle;
        }
        match self.recently_closed.iter().flat_map(|c| c.iter()).find(|(c, _)| *c == id) {
            Some((_, true)) => StreamState::ClosedByClient,
            Some((_, false)) => StreamState::ClosedHere,
            None => StreamState::Unknown,
        }
    }

    /// A stream error (RFC 9113, 5.4.2): the stream is reset, the connection goes on.
    fn stream_error(&mut self, id: u32, code: u32) {
        if let Some(i) = self.index(id) {
            self.remove_stream(i);
        }
        self.rst(id, code);
    }

    fn unqueue(&mut self, n: usize) {
        self.queued -= n;
        self.settings.output.give_back(n);
    }

    /// Hands a handler's output to its stream, and holds the output bounds.
    fn apply(&mut self, i: usize, out: Output) {
        self.timer_stale = true;
        let slot = &mut self.streams[i];
        if slot.end.is_none() {
            slot.end = out.end;
        }
        if out.messages.is_empty() {
            return;
        }
        let (mut added, mut freed) = (0, 0);
        for m in out.messages {
            added += m.bytes.len();
            // The first message may be partly sent already: it stays.
            let unsent = usize::from(slot.out_pos > 0);
            let older = m.supersedes.and_then(|k| slot.out.iter_mut().skip(unsent).find(|o| o.supersedes == Some(k)));
            match older {
                Some(older) => freed += std::mem::replace(older, m).bytes.len(),
                None => slot.out.push_back(m),
            }
        }
        let budget = &self.settings.output;
        budget.take(added);
        budget.give_back(freed);
        self.queued = self.queued + added - freed;
        // Cheapest checks first: a push usually leaves one message waiting.
        let limit = if slot.out.len() > 1 && waiting(slot) > budget.per_stream {
            "queued_bytes_per_stream"
        } else if self.queued > budget.per_connection {
            "queued_bytes_per_connection"
        } else if slot.blocked_since.is_some() && budget.over_total() && self.stuck(i, Instant::now()) {
            "queued_bytes_total"
        } else {
            return;
        };
        self.over_output_bound(i, limit);
    }

    /// Whether stream `i` has output that its client's windows have kept from going out
    /// for `STALL` or more (a client that reads opens them within a round trip).
    fn stuck(&self, i: usize, now: Instant) -> bool {
        self.streams[i].blocked_since.is_some_and(|t| now.duration_since(t) >= STALL)
    }

    /// Stream `i` (or its connection) went over an output bound: the stream is reset at
    /// the next pump; the connection, at once (its queued output dropped).
    fn over_output_bound(&mut self, i: usize, limit: &'static str) {
        self.services.ctx().tracker.metrics().limit_hit(limit);
        tracing::debug!(peer = %self.peer.addr, limit, queued = self.queued, "xDS output over its bound");
        if limit != "queued_bytes_per_connection" {
            self.streams[i].reset = true;
            return;
        }
        let queued = self.queued;
        self.unqueue(queued);
        for s in &mut self.streams {
            s.out = OutQueue::Empty;
            s.out_pos = 0;
        }
        self.go_away(ENHANCE_YOUR_CALM, "output waiting for the client over its bound");
    }

    /// Parses what was read; returns how much of `data` made whole frames.
    fn process(&mut self, data: &[u8]) -> Result<usize, ConnError> {
        let mut pos = 0;
        if !self.preface_done {
            if data.len() < PREFACE.len() {
                return if PREFACE.starts_with(data) { Ok(0) } else { Err(fail(PROTOCOL_ERROR, "not HTTP/2")) };
            }
            if &data[..PREFACE.len()] != PREFACE {
                return Err(fail(PROTOCOL_ERROR, "not HTTP/2"));
            }
            self.preface_done = true;
            pos = PREFACE.len();
        }
        while data.len() - pos >= 9 && !self.closing {
            let h = &data[pos..pos + 9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if len > MAX_FRAME_IN {
                return Err(fail(FRAME_SIZE_ERROR, "frame over SETTINGS_MAX_FRAME_SIZE"));
            }
            if data.len() - pos < 9 + len {
                break;
            }
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            self.on_frame(h[3], h[4], id, &data[pos + 9..pos + 9 + len])?;
            pos += 9 + len;
        }
        Ok(pos)
    }

    fn on_frame(&mut self, ty: u8, flags: u8, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if self.partial.as_ref().is_some_and(|h| ty != CONTINUATION || h.id != id) {
            return Err(fail(PROTOCOL_ERROR, "a header block was interrupted"));
        }
        match ty {
            DATA => self.on_data(flags, id, p),
            HEADERS => self.on_headers(flags, id, p),
            CONTINUATION => {
                let Some(mut partial) = self.partial.take() else {
                    return Err(fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
                };
                if partial.block.len() + p.len() > MAX_HEADER_BLOCK {
                    self.services.ctx().tracker.metrics().limit_hit("header_block_bytes");
                    return Err(fail(ENHANCE_YOUR_CALM, "header block over the limit"));
                }
                partial.block.extend_from_slice(p);
                if flags & END_HEADERS != 0 {
                    self.on_header_block(partial.id, partial.end_stream, partial.self_dependent, &partial.block)
                } else {
                    self.partial = Some(partial);
                    Ok(())
                }
            }
            PRIORITY if id == 0 => Err(fail(PROTOCOL_ERROR, "PRIORITY on stream 0")),
            PRIORITY => {
                // RFC 9113, 6.3: another length than 5 is a stream error.
                if p.len() != 5 {
                    self.stream_error(id, FRAME_SIZE_ERROR);
                } else if depends_on(p) == id {
                    // RFC 9113, 5.3.1: a stream cannot depend on itself.
                    self.stream_error(id, PROTOCOL_ERROR);
                }
                Ok(())
            }
            RST_STREAM => {
                if id == 0 {
                    return Err(fail(PROTOCOL_ERROR, "RST_STREAM on stream 0"));
                }
                if p.len() != 4 {
                    return Err(fail(FRAME_SIZE_ERROR, "RST_STREAM of another length than 4"));
                }
                match self.state(id) {
                    StreamState::Idle => Err(fail(PROTOCOL_ERROR, "RST_STREAM on an idle stream")),
                    StreamState::Open(i) => {
                        self.streams[i].remote_done = true;
                        self.remove_stream(i);
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            SETTINGS => self.on_settings(flags, id, p),
            PUSH_PROMISE => Err(fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")),
            PING => {
                // RFC 9113, 6.7: on a stream, PROTOCOL_ERROR; of another length, FRAME_SIZE_ERROR.
                if id != 0 {
                    return Err(fail(PROTOCOL_ERROR, "PING on a stream"));
                }
                if p.len() != 8 {
                    return Err(fail(FRAME_SIZE_ERROR, "PING of another length than 8"));
                }
                if flags & ACK != 0 {
                    self.ping_outstanding = false;
                } else {
                    self.frame(PING, ACK, 0, p);
                }
                Ok(())
            }
            GOAWAY if id != 0 => Err(fail(PROTOCOL_ERROR, "GOAWAY on a stream")),
            GOAWAY => {
                // The client is going (Envoy says so as it shuts down or drains).
                self.go_away(NO_ERROR, "");
                Ok(())
            }
            WINDOW_UPDATE => self.on_window_update(id, p),
            _ => Ok(()), // PRIORITY, and frame types this side does not know: ignored.
        }
    }

    fn on_settings(&mut self, flags: u8, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if id != 0 {
            return Err(fail(PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if flags & ACK != 0 {
            return if p.is_empty() { Ok(()) } else { Err(fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")) };
        }
        if !p.len().is_multiple_of(6) {
            return Err(fail(FRAME_SIZE_ERROR, "SETTINGS length"));
        }
        for s in p.chunks_exact(6) {
            let value = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match u16::from_be_bytes([s[0], s[1]]) {
                0x2 if value > 1 => return Err(fail(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH")),
                0x4 => {
                    if value > 0x7fff_ffff {
                        return Err(fail(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE"));
                    }
                    let delta = i64::from(value) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(value);
                    for s in &mut self.streams {
                        s.send_window += delta;
                    }
                }
                0x5 => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(fail(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE"));
                    }
                    self.peer_max_frame = value as usize;
                }
                // Header table size (no field is ever indexed here), push, concurrency of
                // pushes, header list size: nothing to do.
                _ => {}
            }
        }
        self.frame(SETTINGS, ACK, 0, &[]);
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if p.len() != 4 {
            return Err(fail(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE"));
        }
        let increment = i64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff);
        if id == 0 {
            if increment == 0 {
                return Err(fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > 0x7fff_ffff {
                return Err(fail(FLOW_CONTROL_ERROR, "connection window over 2^31-1"));
            }
            return Ok(());
        }
        let i = match self.state(id) {
            StreamState::Open(i) => i,
            StreamState::Idle => return Err(fail(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")),
            // A closed stream's window may still move for a while (RFC 9113, 5.1).
            _ => return Ok(()),
        };
        let window = self.streams[i].send_window + increment;
        if increment == 0 || window > 0x7fff_ffff {
            self.remove_stream(i);
            self.rst(id, if increment == 0 { PROTOCOL_ERROR } else { FLOW_CONTROL_ERROR });
            return Ok(());
        }
        self.streams[i].send_window = window;
        Ok(())
    }

    fn on_headers(&mut self, flags: u8, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if id == 0 || id.is_multiple_of(2) {
            return Err(fail(PROTOCOL_ERROR, "HEADERS on an even stream"));
        }
        let mut p = p;
        if flags & PADDED != 0 {
            let (&pad, rest) = p.split_first().ok_or(fail(PROTOCOL_ERROR, "bad padding"))?;
            p = rest.get(..rest.len().wrapping_sub(usize::from(pad))).ok_or(fail(PROTOCOL_ERROR, "bad padding"))?;
        }
        let mut self_dependent = false;
        if flags & PRIORITY_FLAG != 0 {
            self_dependent = p.len() >= 4 && depends_on(p) == id;
            p = p.get(5..).ok_or(fail(PROTOCOL_ERROR, "bad priority"))?;
        }
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS == 0 {
            self.partial = Some(Box::new(Partial { id, end_stream, self_dependent, block: p.to_vec() }));
            return Ok(());
        }
        self.on_header_block(id, end_stream, self_dependent, p)
    }

    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: &[u8],
    ) -> Result<(), ConnError> {
        let state = self.state(id);
        // Decoded whatever becomes of the stream: the table must stay in step.
        let mut check = if matches!(state, StreamState::Idle) { HeadCheck::request() } else { HeadCheck::trailers() };
        self.hpack
            .decode_with_cb(block, |name, value| check.field(&name, &value))
            .map_err(|_| fail(COMPRESSION_ERROR, "the header block does not decode"))?;
        let head = check.finish();
        match state {
            StreamState::Idle => {}
            StreamState::Open(i) if self.streams[i].remote_done => {
                // Half-closed (remote): nothing more may come (RFC 9113, 5.1).
                self.stream_error(id, STREAM_CLOSED);
                return Ok(());
            }
            StreamState::Open(i) => {
                // Trailers: the client's requests end here, and the body is complete.
                if !end_stream || head.is_err() || self.streams[i].content_left.is_some_and(|n| n != 0) {
                    self.stream_error(id, PROTOCOL_ERROR);
                } else {
                    self.end_requests(i);
                }
                return Ok(());
            }
            StreamState::ClosedByClient => {
                self.rst(id, STREAM_CLOSED);
                return Ok(());
            }
            // Its trailers or a reset from this side crossed the client's last frames:
            // what was in flight is dropped, as for DATA (RFC 9113, 5.1).
            StreamState::ClosedHere => return Ok(()),
            // RFC 9113, 5.1.1: a new stream's id is above every id used before.
            StreamState::Unknown => return Err(fail(PROTOCOL_ERROR, "a new stream with a lower id than the last")),
        }
        self.last_stream_id = id;
        if self.closing {
            self.refuse(id, REFUSED_STREAM);
            return Ok(());
        }
        let head = match head {
            Ok(head) if !self_dependent => head,
            // A malformed request (RFC 9113, 8.1.1), or one depending on itself (5.3.1).
            _ => {
                self.services.ctx().tracker.metrics().limit_hit("malformed_requests");
                self.refuse(id, PROTOCOL_ERROR);
                return Ok(());
            }
        };
        if self.streams.len() >= self.settings.max_streams as usize {
            self.services.ctx().tracker.metrics().limit_hit("streams_per_connection");
            self.refuse(id, REFUSED_STREAM);
            return Ok(());
        }
        let refused = match head.method {
            Some(m) if head.post && !head.compressed => Ok(m),
            Some(_) if !head.post => Err("gRPC methods are called with POST"),
            // No compression is offered, so a compressed request stream is refused.
            Some(_) => Err("compressed requests are not supported"),
            None => Err("no such method"),
        };
        let method = match refused {
            Ok(m) => m,
            Err(why) => {
                // Trailers only (gRPC over HTTP/2).
                let mut block = Vec::with_capacity(64);
                response_headers(&mut block);
                trailers(&mut block, &Status::unimplemented(why));
                self.frame(HEADERS, END_HEADERS | END_STREAM, id, &block);
                if !end_stream {
                    self.rst(id, NO_ERROR);
                }
                self.closed(id, end_stream);
                return Ok(());
            }
        };
        if end_stream && head.content_length.is_some_and(|n| n != 0) {
            self.refuse(id, PROTOCOL_ERROR);
            return Ok(());
        }
        let mut block = Vec::with_capacity(32);
        response_headers(&mut block);
        self.frame(HEADERS, END_HEADERS, id, &block);
        if self.streams.capacity() == 0 {
            // An Envoy opens one stream: room for one (a Vec's first growth is to four).
            self.streams.reserve_exact(1);
        }
        self.streams.push(Slot {
            id,
            handler: self.services.open(method),
            send_window: self.peer_initial_window,
            recv_unacked: 0,
            inbuf: MessageReader::default(),
            out: OutQueue::Empty,
            out_pos: 0,
            reset: false,
            blocked_since: None,
            end: None,
            remote_done: false,
            content_left: head.content_length,
        });
        if end_stream {
            let i = self.streams.len() - 1;
            self.end_requests(i);
        }
        Ok(())
    }

    /// A new stream refused before it opened: reset, and remembered as closed here.
    fn refuse(&mut self, id: u32, code: u32) {
        self.rst(id, code);
        self.closed(id, false);
    }

    fn end_requests(&mut self, i: usize) {
        let mut out = Output::default();
        let slot = &mut self.streams[i];
        slot.remote_done = true;
        if slot.end.is_none() {
            slot.handler.on_requests_end(&mut out);
        }
        self.apply(i, out);
    }

    fn on_data(&mut self, flags: u8, id: u32, p: &[u8]) -> Result<(), ConnError> {
        if id == 0 {
            return Err(fail(PROTOCOL_ERROR, "DATA on stream 0"));
        }
        // All of it counts against the windows, padding included.
        let len = p.len() as u32;
        if len > CONN_WINDOW - self.recv_unacked {
            return Err(fail(FLOW_CONTROL_ERROR, "more data than the connection window"));
        }
        self.recv_unacked += len;
        if self.recv_unacked >= CONN_WINDOW / 2 {
            let n = std::mem::take(&mut self.recv_unacked);
            self.window_update(0, n);
        }
        let mut data = p;
        if flags & PADDED != 0 {
            let (&pad, rest) = p.split_first().ok_or(fail(PROTOCOL_ERROR, "bad padding"))?;
            data = rest.get(..rest.len().wrapping_sub(usize::from(pad))).ok_or(fail(PROTOCOL_ERROR, "bad padding"))?;
        }
        let i = match self.state(id) {
            StreamState::Open(i) => i,
            StreamState::Idle => return Err(fail(PROTOCOL_ERROR, "DATA on a stream never opened")),
            StreamState::ClosedByClient => {
                // RFC 9113, 5.1: nothing may follow the client's END_STREAM or RST_STREAM.
                self.rst(id, STREAM_CLOSED);
                return Ok(());
            }
            // A stream this side ended already: what was in flight is dropped.
            StreamState::ClosedHere | StreamState::Unknown => return Ok(()),
        };
        let slot = &mut self.streams[i];
        if slot.remote_done {
            self.stream_error(id, STREAM_CLOSED);
            return Ok(());
        }
        let end_stream = flags & END_STREAM != 0;
        if let Some(left) = &mut slot.content_left {
            // RFC 9113, 8.1.1: the body must be as long as content-length says.
            let body = data.len() as u64;
            if body > *left || (end_stream && body != *left) {
                self.stream_error(id, PROTOCOL_ERROR);
                return Ok(());
            }
            *left -= body;
        }
        if len > STREAM_WINDOW - slot.recv_unacked {
            self.stream_error(id, FLOW_CONTROL_ERROR);
            return Ok(());
        }
        let slot = &mut self.streams[i];
        slot.recv_unacked += len;
        let update =
            (slot.recv_unacked >= STREAM_WINDOW / 2 && !end_stream).then(|| std::mem::take(&mut slot.recv_unacked));
        let mut out = Output::default();
        if slot.end.is_none() {
            let ctx = (&self.services, &self.peer);
            let before = slot.inbuf.buffered();
            read_messages(slot, data, ctx, &mut out);
            self.buffered = self.buffered + slot.inbuf.buffered() - before;
        }
        if self.buffered > MAX_BUFFERED {
            self.services.ctx().tracker.metrics().limit_hit("buffered_request_bytes");
            return Err(fail(ENHANCE_YOUR_CALM, "too much of unfinished requests buffered"));
        }
        self.apply(i, out);
        if let Some(n) = update {
            self.window_update(id, n);
        }
        if end_stream {
            self.end_requests(i);
        }
        Ok(())
    }

    /// Moves what streams have to send into the output, as flow control allows; sends the
    /// trailers of streams that are done, and forgets them.
    fn pump(&mut self) {
        let mut i = 0;
        let mut framed = 0;
        // A frame at most this large, whatever the client allows: the write buffer stays
        // near `WRITE_HIGH`.
        let max_frame = self.peer_max_frame.min(WRITE_HIGH) as i64;
        let mut now = None;
        while i < self.streams.len() {
            if self.streams[i].reset {
                let id = self.streams[i].id;
                self.remove_stream(i);
                self.rst(id, ENHANCE_YOUR_CALM);
                continue;
            }
            let slot = &mut self.streams[i];
            while let Some(front) = slot.out.front() {
                if self.wbuf.len() - self.wpos >= WRITE_HIGH {
                    break;
                }
                let left = front.bytes.len() - slot.out_pos;
                let n = (left as i64).min(self.send_window).min(slot.send_window).min(max_frame);
                if n <= 0 && left > 0 {
                    break;
                }
                let n = n.max(0) as usize;
                self.wbuf.reserve(FRAME_HEAD + n);
                frame_head(&mut self.wbuf, n, DATA, 0, slot.id);
                self.wbuf.extend_from_slice(&front.bytes[slot.out_pos..slot.out_pos + n]);
                self.send_window -= n as i64;
                slot.send_window -= n as i64;
                slot.out_pos += n;
                framed += n;
                if slot.out_pos == front.bytes.len() {
                    slot.out.pop_front();
                    slot.out_pos = 0;
                }
            }
            if !slot.out.is_empty() {
                if slot.send_window > 0 && self.send_window > 0 {
                    slot.blocked_since = None;
                } else {
                    let now = *now.get_or_insert_with(Instant::now);
                    if slot.blocked_since.is_none() {
                        slot.blocked_since = Some(now);
                        // Its stall may need a wake-up (`poll_timer`).
                        self.timer_stale = true;
                    }
                    if self.settings.output.over_total() && self.stuck(i, now) {
                        self.over_output_bound(i, "queued_bytes_total");
                        continue;
                    }
                }
                i += 1;
                continue;
            }
            slot.blocked_since = None;
            let Some(status) = slot.end.take() else {
                i += 1;
                continue;
            };
            let (id, remote_done) = (slot.id, slot.remote_done);
            // Dropping the handler takes the proxy out of the tracker.
            self.remove_stream(i);
            let mut block = Vec::with_capacity(32);
            trailers(&mut block, &status);
            self.frame(HEADERS, END_HEADERS | END_STREAM, id, &block);
            if !remote_done {
                // The client need not send more (RFC 9113, 8.1).
                self.rst(id, NO_ERROR);
            }
        }
        self.unqueue(framed);
    }

    fn on_generation(&mut self, generation: &Generation) {
        for i in 0..self.streams.len() {
            let mut out = Output::default();
            let slot = &mut self.streams[i];
            if slot.end.is_none() {
                slot.handler.on_generation(self.services.ctx(), &self.peer, generation, &mut out);
            }
            self.apply(i, out);
        }
    }

    fn on_timers(&mut self, now: Instant) {
        for i in 0..self.streams.len() {
            let mut out = Output::default();
            let slot = &mut self.streams[i];
            if slot.end.is_none() && slot.handler.next_wakeup().is_some_and(|at| at <= now) {
                slot.handler.on_timer(self.services.ctx(), now, &mut out);
            }
            self.apply(i, out);
        }
    }

    /// Whether the keepalive PING is due. Polls the timer only to arm it and once its
    /// time has come.
    fn keepalive_due(&mut self, cx: &mut Context<'_>) -> bool {
        if self.keepalive_armed && tokio::time::Instant::now() < self.keepalive.deadline() {
            return false;
        }
        self.keepalive_armed = true;
        self.keepalive.as_mut().poll(cx).is_ready()
    }

    /// The timer armed for the earliest stream wake-up; `true` when one is due now.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.timer_stale {
            return self.timer.as_mut().is_some_and(|(_, sleep)| sleep.as_mut().poll(cx).is_ready());
        }
        self.timer_stale = false;
        // Stream timers; and, with the server over its output bound, when a stream held by
        // a closed window will count as stuck (so it is cut then, not at the next PING).
        let over = self.settings.output.over_total();
        let next = self
            .streams
            .iter()
            .flat_map(|s| [s.handler.next_wakeup(), s.blocked_since.filter(|_| over).map(|t| t + STALL)])
            .flatten()
            .min();
        let Some(at) = next else {
            self.timer = None;
            return false;
        };
        match &mut self.timer {
            Some((armed, sleep)) if *armed == at => sleep.as_mut().poll(cx).is_ready(),
            _ => {
                let mut sleep = Box::pin(tokio::time::sleep_until(at.into()));
                let due = sleep.as_mut().poll(cx).is_ready();
                self.timer = Some((at, sleep));
                due
            }
        }
    }

    /// Reads once; `Ready(true)` at the end of the input.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, ConnError>> {
        // Not zeroed first (8 KiB per read, once per ACK): the reader fills what it reports.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Pending,
            // Reset, timed out (no preface in time), TLS error: nothing to say to it.
            Poll::Ready(Err(_)) => return Poll::Ready(Ok(true)),
            Poll::Ready(Ok(())) => {}
        }
        let read = buf.filled();
        let n = read.len();
        if n == 0 {
            return Poll::Ready(Ok(true));
        }
        if self.rbuf.is_empty() {
            let used = self.process(read)?;
            self.rbuf.extend_from_slice(&read[used..]);
        } else {
            let mut data = std::mem::take(&mut self.rbuf);
            data.extend_from_slice(read);
            let used = self.process(&data)?;
            data.drain(..used);
            self.rbuf = data;
        }
        if self.rbuf.is_empty() {
            self.rbuf = Vec::new();
        }
        Poll::Ready(Ok(false))
    }

    /// Writes what is waiting; `Ready` once all of it is written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        // Written: the buffer goes back, so an idle connection holds none.
        self.wbuf = Vec::new();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        for _ in 0..TURNS_PER_POLL {
            let mut progress = false;
            while let Poll::Ready(next) = Pin::new(&mut self.signals).poll_next(cx) {
                match next {
                    Some(Signal::Generation(Some(g))) if !self.closing => self.on_generation(&g),
                    Some(Signal::Generation(_)) => {}
                    Some(Signal::Stop) | None => {
                        // Streams end with OK, as when the server stops.
                        for s in &mut self.streams {
                            s.end.get_or_insert_with(|| Status::ok(""));
                        }
                        self.pump();
                        self.go_away(NO_ERROR, "shutting down");
                    }
                }
                progress = true;
                if self.closing {
                    break;
                }
            }
            if self.keepalive_due(cx) {
                if self.ping_outstanding {
                    return Poll::Ready(Err(fail(NO_ERROR, "keepalive PING not answered")));
                }
                self.ping_outstanding = true;
                self.frame(PING, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 1]);
                let next = tokio::time::Instant::now() + self.settings.keepalive;
                self.keepalive.as_mut().reset(next);
                self.keepalive_armed = false;
                progress = true;
            }
            if self.poll_timer(cx) {
                self.timer = None;
                self.timer_stale = true;
                self.on_timers(Instant::now());
                progress = true;
            }
            if !self.closing && self.wbuf.len() - self.wpos < WRITE_HIGH {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(true)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(false)) => progress = true,
                    Poll::Ready(Err(e)) => {
                        self.go_away(e.code, e.why);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            self.pump();
            // A wake-up changed since the timer was armed (a stream started waiting on a
            // closed window): one more turn arms it before this task sleeps.
            progress |= self.timer_stale;
            let (before, waiting) = (self.wpos, self.wbuf.len());
            match self.poll_write(cx) {
                Poll::Ready(Ok(())) if self.closing => {
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    return Poll::Ready(Ok(()));
                }
                // Written: streams held back by the output bound may go on.
                Poll::Ready(Ok(())) => progress |= waiting > before,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => progress |= self.wpos != before,
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Busy: let other connections run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<IO> Drop for Connection<IO> {
    fn drop(&mut self) {
        self.settings.output.give_back(self.queued);
    }
}

/// Bytes of a stream's queue not framed yet.
fn waiting(slot: &Slot) -> usize {
    slot.out.iter().map(|m| m.bytes.len()).sum::<usize>() - slot.out_pos
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Future for Connection<IO> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.poll_run(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(e)) => {
                tracing::debug!(peer = %this.peer.addr, reason = e.why, "xDS connection closed");
                Poll::Ready(())
            }
        }
    }
}

/// What every connection is told: a new configuration, or that the server stops. (One
/// channel for both: an idle connection waits on one thing, and one wake-up per change.)
#[derive(Debug, Clone)]
pub enum Signal {
    Generation(Option<Arc<Generation>>),
    Stop,
}

/// Serves every connection `accepted` hands over until `shutdown`; then waits (at most
/// five seconds) for connections to say goodbye.
pub async fn serve(
    mut accepted: tokio::sync::mpsc::Receiver<crate::accept::Accepted>,
    services: XdsServices,
    settings: H2Settings,
    handshake_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let (signals, _) = watch::channel(Signal::Generation(services.ctx().cache.current()));
    let forward = {
        let mut generations = services.ctx().cache.subscribe();
        let (signals, shutdown) = (signals.clone(), shutdown.clone());
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = generations.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let g = generations.borrow_and_update().clone();
                        signals.send_replace(Signal::Generation(g));
                    }
                }
            }
            signals.send_replace(Signal::Stop);
        }
    };
    let forwarding = tokio::spawn(forward);
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let a = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accepted.recv() => match a { Some(a) => a, None => break },
        };
        let peer = services.peer(a.io.peer());
        let io = crate::limits::Handshake::new(a.io, a.hold, handshake_timeout, metrics.clone());
        tasks.spawn(Connection::new(io, services.clone(), peer, settings.clone(), signals.subscribe()));
    }
    let _ = forwarding.await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}

/// Splits a stream's request bytes into gRPC messages and hands each to its handler;
/// keeps a message not complete yet (at most `MAX_REQUEST`).
fn read_messages(slot: &mut Slot, data: &[u8], (services, peer): (&XdsServices, &ConnPeer), out: &mut Output) {
    let handler = &mut slot.handler;
    let read = slot.inbuf.push(data, MAX_REQUEST, |message| {
        handler.on_message(services, peer, message, out);
        out.end.is_none()
    });
    match read {
        Ok(()) => {}
        Err(e @ FrameError::Compressed) => out.end = Some(Status::unimplemented(e.to_string())),
        Err(e @ FrameError::TooLarge { len, .. }) => {
            services.ctx().tracker.metrics().limit_hit("request_bytes");
            tracing::warn!(peer = %peer.addr, bytes = len, "closing xDS stream: request over the size limit");
            out.end = Some(Status::out_of_range(e.to_string()));
        }
    }
}

/// The stream a PRIORITY payload (or a HEADERS frame's priority part) depends on.
fn depends_on(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff
}

fn frame_head(buf: &mut Vec<u8>, len: usize, ty: u8, flags: u8, id: u32) {
    buf.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    buf.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1).
fn hpack_int(buf: &mut Vec<u8>, n: u8, flags: u8, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        buf.push(flags | value as u8);
        return;
    }
    buf.push(flags | max as u8);
    let mut v = value - max;
    while v >= 128 {
        buf.push((v % 128 + 128) as u8);
        v /= 128;
    }
    buf.push(v as u8);
}

/// A literal header field without indexing, its name a literal too (RFC 7541, 6.2.2).
fn literal(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.push(0);
    hpack_int(buf, 7, 0, name.len());
    buf.extend_from_slice(name);
    hpack_int(buf, 7, 0, value.len());
    buf.extend_from_slice(value);
}

/// `:status: 200` (static table entry 8) and `content-type: application/grpc` (name
/// from static entry 31).
fn response_headers(buf: &mut Vec<u8>) {
    buf.push(0x88);
    hpack_int(buf, 4, 0, 31);
    hpack_int(buf, 7, 0, b"application/grpc".len());
    buf.extend_from_slice(b"application/grpc");
}

/// `grpc-status` and, unless empty, `grpc-message` (percent-encoded, as gRPC asks).
fn trailers(buf: &mut Vec<u8>, status: &Status) {
    literal(buf, b"grpc-status", (status.code() as i32).to_string().as_bytes());
    let message = status.message();
    if message.is_empty() {
        return;
    }
    let mut encoded = Vec::with_capacity(message.len().min(MAX_STATUS_MESSAGE));
    for &b in message.as_bytes() {
        if encoded.len() + 3 > MAX_STATUS_MESSAGE {
            break;
        }
        if (0x20..0x7f).contains(&b) && b != b'%' {
            encoded.push(b);
        } else {
            encoded.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    literal(buf, b"grpc-message", &encoded);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541() {
        // C.1.1 – C.1.3.
        let mut b = Vec::new();
        hpack_int(&mut b, 5, 0, 10);
        assert_eq!(b, [10]);
        b.clear();
        hpack_int(&mut b, 5, 0, 1337);
        assert_eq!(b, [31, 154, 10]);
        b.clear();
        hpack_int(&mut b, 8, 0, 42);
        assert_eq!(b, [42]);
    }

    #[test]
    fn response_headers_and_trailers_decode() {
        let mut block = Vec::new();
        response_headers(&mut block);
        trailers(&mut block, &Status::out_of_range("too big: 100%\n"));
        let mut d = loona_hpack::Decoder::new();
        let headers = d.decode(&block).unwrap();
        let text: Vec<(String, String)> =
            headers.into_iter().map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())).collect();
        assert_eq!(
            text,
            [
                (":status".to_owned(), "200".to_owned()),
                ("content-type".to_owned(), "application/grpc".to_owned()),
                ("grpc-status".to_owned(), "11".to_owned()),
                ("grpc-message".to_owned(), "too big: 100%25%0A".to_owned()),
            ]
        );
    }

    #[test]
    fn a_long_status_message_is_cut_to_fit_one_frame() {
        let mut block = Vec::new();
        trailers(&mut block, &Status::internal("é".repeat(10_000)));
        assert!(block.len() < MAX_STATUS_MESSAGE + 64, "{}", block.len());
    }
}
