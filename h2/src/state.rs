//! One connection's HTTP/2 state machine, pure: bytes read go in (`process`), frames to
//! write come out (`wbuf`), and the streams' handlers sit between. RFC 9113's stream
//! states (5.1) are `StreamState`; flow control both ways, the header block and request
//! bounds, and the output bounds are held here. Frames as they arrive: `receive.rs`.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::{
    frames::*,
    grpc::{FrameError, MessageReader},
    output::OutQueue,
    ConnContext, H2Settings, Handler, Output, Status,
};

mod receive;

/// The largest frame a client may send (the protocol's default; not raised).
pub(crate) const MAX_FRAME_IN: usize = 16_384;
/// What a client may send on one stream before Filterplane says it read it. (A request
/// not complete yet is buffered up to `MAX_REQUEST`; all of a connection's such requests
/// together up to `MAX_BUFFERED`.)
pub(crate) const STREAM_WINDOW: u32 = 1 << 20;
/// Requests not complete yet, all streams of a connection together: a client that opens
/// many streams and half-sends a large request on each is cut off here.
pub const MAX_BUFFERED: usize = 8 << 20;
/// The same for the whole connection.
pub(crate) const CONN_WINDOW: u32 = 4 << 20;
/// A header block (HEADERS and its CONTINUATIONs) may be at most this large; Envoy's
/// are a few hundred bytes.
pub const MAX_HEADER_BLOCK: usize = 16 << 10;
/// Requests over 4 MiB are refused (tonic's default before); responses may be any size
/// (inline Wasm modules).
pub const MAX_REQUEST: usize = 4 << 20;
/// Past this much output waiting to be written, the connection stops reading (and
/// queuing) until the client reads: a client that never reads cannot grow it.
pub(crate) const WRITE_HIGH: usize = 64 << 10;
/// How long output may wait on a closed window before, with the server over its total
/// output bound, the stream counts as stuck and is reset (the connection's timer wakes
/// it then).
pub(crate) const STALL: Duration = Duration::from_secs(1);

/// A connection error: GOAWAY with this code, then close.
#[derive(Debug)]
pub(crate) struct ConnError {
    pub(crate) code: u32,
    pub(crate) why: &'static str,
}

pub(crate) fn fail(code: u32, why: &'static str) -> ConnError {
    ConnError { code, why }
}

/// One open stream.
struct Slot<H> {
    id: u32,
    handler: H,
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
    /// The handler's `next_wakeup`, as it said after it last ran: the connection's timer
    /// is worked out from these, without going through every stream's state again.
    wakeup: Option<Instant>,
    /// End the stream with this once `out` is sent.
    end: Option<Status>,
    /// The client ended its side.
    remote_done: bool,
    /// What is left of the request body its `content-length` announced (RFC 9113, 8.1.1).
    content_left: Option<u64>,
}

impl<H> Slot<H> {
    /// A stream just opened: nothing received, queued or sent yet.
    fn new(id: u32, handler: H, send_window: i64, content_left: Option<u64>) -> Self {
        Slot {
            id,
            handler,
            send_window,
            recv_unacked: 0,
            inbuf: MessageReader::default(),
            out: OutQueue::Empty,
            out_pos: 0,
            reset: false,
            blocked_since: None,
            wakeup: None,
            end: None,
            remote_done: false,
            content_left,
        }
    }
}

/// A header block arriving in pieces.
#[derive(Debug)]
struct Partial {
    id: u32,
    end_stream: bool,
    self_dependent: bool,
    block: Vec<u8>,
}

/// One connection's protocol state: bytes in (`process`), frames out (`wbuf`), and the
/// streams' handlers between. No I/O and no timers of its own (`Connection` has them).
pub(crate) struct ConnState<H: Handler> {
    pub(crate) ctx: H::Context,
    pub(crate) settings: H2Settings,
    /// Output not written yet, from `wpos`; unallocated once written.
    pub(crate) wbuf: Vec<u8>,
    pub(crate) wpos: usize,
    hpack: loona_hpack::Decoder<'static>,
    preface_done: bool,
    partial: Option<Box<Partial>>,
    streams: Vec<Slot<H>>,
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
    pub(crate) ping_outstanding: bool,
    /// A handler ran since the timer was armed: its wake-up may have changed.
    pub(crate) timer_stale: bool,
    /// GOAWAY sent or received: no new streams; close once the output is written.
    pub(crate) closing: bool,
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

impl<H: Handler> ConnState<H> {
    pub(crate) fn new(ctx: H::Context, settings: H2Settings) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(4096);
        let mut conn = Self {
            ctx,
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
            ping_outstanding: false,
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

    pub(crate) fn frame(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) {
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
    pub(crate) fn go_away(&mut self, code: u32, why: &str) {
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

    /// Hands a handler's output to its stream (leaving `out` empty, to be used again: a
    /// push reuses one for every stream of the connection), and holds the output bounds.
    fn apply(&mut self, i: usize, out: &mut Output) {
        let slot = &mut self.streams[i];
        // Asked while the stream's state is at hand; the timer is armed anew only when
        // it moved (most steps set none: a push, an ACK).
        let wakeup = slot.handler.next_wakeup();
        if wakeup != slot.wakeup {
            slot.wakeup = wakeup;
            self.timer_stale = true;
        }
        // Taken whatever happens to it: `out` goes on to the next stream.
        let end = out.end.take();
        if slot.end.is_none() {
            slot.end = end;
        }
        if out.messages.is_empty() {
            return;
        }
        let (mut added, mut freed) = (0, 0);
        for m in out.messages.drain(..) {
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
        self.ctx.limit_hit(limit);
        tracing::debug!(peer = %self.ctx.peer(), limit, queued = self.queued, "xDS output over its bound");
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

    /// Moves what streams have to send into the output, as flow control allows; sends the
    /// trailers of streams that are done, and forgets them.
    pub(crate) fn pump(&mut self) {
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

    /// Something every stream hears of (a new configuration).
    pub(crate) fn on_event(&mut self, event: &H::Event) {
        let mut out = Output::default();
        for i in 0..self.streams.len() {
            let slot = &mut self.streams[i];
            if slot.end.is_none() {
                slot.handler.on_event(&self.ctx, event, &mut out);
            }
            self.apply(i, &mut out);
        }
    }

    pub(crate) fn on_timers(&mut self, now: Instant) {
        let mut out = Output::default();
        for i in 0..self.streams.len() {
            let slot = &mut self.streams[i];
            if slot.end.is_none() && slot.wakeup.is_some_and(|at| at <= now) {
                slot.handler.on_timer(&self.ctx, now, &mut out);
                self.apply(i, &mut out);
            }
        }
    }

    /// The server stops: every stream ends with OK after what it has queued, then GOAWAY.
    pub(crate) fn stop(&mut self) {
        for s in &mut self.streams {
            s.end.get_or_insert_with(|| Status::ok(""));
        }
        self.pump();
        self.go_away(NO_ERROR, "shutting down");
    }

    /// Whether this connection takes part in pushes and can wait to read: it has streams,
    /// and none has output waiting for the client's window (a read may open it).
    pub(crate) fn answers_pushes(&self) -> bool {
        !self.streams.is_empty() && self.queued == 0
    }

    /// The earliest stream wake-up; and, with the server over its output bound, when a
    /// stream held by a closed window will count as stuck (so it is cut then, not at the
    /// next PING).
    pub(crate) fn next_wakeup(&self) -> Option<Instant> {
        let over = self.settings.output.over_total();
        self.streams
            .iter()
            .flat_map(|s| [s.wakeup, s.blocked_since.filter(|_| over).map(|t| t + STALL)])
            .flatten()
            .min()
    }
}

impl<H: Handler> Drop for ConnState<H> {
    fn drop(&mut self) {
        self.settings.output.give_back(self.queued);
    }
}

/// Bytes of a stream's queue not framed yet.
fn waiting<H>(slot: &Slot<H>) -> usize {
    slot.out.iter().map(|m| m.bytes.len()).sum::<usize>() - slot.out_pos
}

/// Splits a stream's request bytes into gRPC messages and hands each to its handler;
/// keeps a message not complete yet (at most `MAX_REQUEST`).
fn read_messages<H: Handler>(slot: &mut Slot<H>, data: &[u8], ctx: &H::Context, out: &mut Output) {
    let handler = &mut slot.handler;
    let read = slot.inbuf.push(data, MAX_REQUEST, |message| {
        handler.on_message(ctx, message, out);
        out.end.is_none()
    });
    match read {
        Ok(()) => {}
        Err(e @ FrameError::Compressed) => out.end = Some(Status::unimplemented(e.to_string())),
        Err(e @ FrameError::TooLarge { len, .. }) => {
            ctx.limit_hit("request_bytes");
            tracing::warn!(peer = %ctx.peer(), bytes = len, "closing xDS stream: request over the size limit");
            out.end = Some(Status::out_of_range(e.to_string()));
        }
    }
}

#[cfg(test)]
mod timer_tests {
    use super::*;

    struct Ctx;

    impl ConnContext for Ctx {
        fn peer(&self) -> &str {
            "test"
        }
        fn limit_hit(&self, _: &'static str) {}
    }

    /// A handler whose wake-up is what the last event said; its timer clears it.
    #[derive(Default)]
    struct Timed {
        wake: Option<Instant>,
        fired: u32,
    }

    impl Handler for Timed {
        type Context = Ctx;
        type Event = Option<Instant>;
        type Method = ();
        fn route(_: &[u8]) -> Option<()> {
            Some(())
        }
        fn open(_: &Ctx, _: ()) -> Self {
            Timed::default()
        }
        fn on_message(&mut self, _: &Ctx, _: &[u8], _: &mut Output) {}
        fn on_requests_end(&mut self, _: &Ctx, _: &mut Output) {}
        fn on_event(&mut self, _: &Ctx, wake: &Option<Instant>, _: &mut Output) {
            if wake.is_some() {
                self.wake = *wake;
            }
        }
        fn next_wakeup(&self) -> Option<Instant> {
            self.wake
        }
        fn on_timer(&mut self, _: &Ctx, _: Instant, _: &mut Output) {
            self.fired += 1;
            self.wake = None;
        }
    }

    fn conn(streams: u32) -> ConnState<Timed> {
        let mut conn = ConnState::new(Ctx, H2Settings::default());
        for id in (1..=streams).map(|n| 2 * n - 1) {
            conn.streams.push(Slot::new(id, Timed::default(), 65_535, None));
        }
        conn
    }

    /// The connection's timer comes from the wake-ups its handlers gave after they ran;
    /// it is marked for re-arming only when one moved, and only due handlers are woken.
    #[test]
    fn the_timer_follows_what_handlers_said_after_running_and_wakes_only_those_due() {
        let mut c = conn(3);
        c.on_event(&None);
        assert!(!c.timer_stale, "nobody's wake-up moved: the timer stays as armed");
        assert_eq!(c.next_wakeup(), None);

        let soon = Instant::now();
        let later = soon + Duration::from_secs(60);
        c.on_event(&Some(soon));
        assert!(c.timer_stale);
        assert_eq!(c.next_wakeup(), Some(soon), "the earliest of what the handlers said");

        c.timer_stale = false;
        c.on_timers(soon);
        let fired: Vec<u32> = c.streams.iter().map(|s| s.handler.fired).collect();
        assert_eq!(fired, [1, 1, 1], "every stream was due at `soon`");
        assert!(c.timer_stale, "their wake-ups moved");
        assert_eq!(c.next_wakeup(), None);

        // One stream due later: a timer before then wakes nobody.
        c.streams[2].handler.wake = Some(later);
        c.on_event(&None);
        assert_eq!(c.next_wakeup(), Some(later));
        c.on_timers(soon);
        assert_eq!(c.streams[2].handler.fired, 1, "not due yet");
        c.on_timers(later);
        assert_eq!(c.streams.iter().map(|s| s.handler.fired).sum::<u32>(), 4);
        assert_eq!(c.next_wakeup(), None);
    }
}
