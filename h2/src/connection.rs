//! The I/O around a connection's state machine: reads from the socket into it, writes
//! what it framed, and its timers (keepalive PING, the streams' wake-ups) and signals
//! (events every stream hears of, the server stopping). One task per connection.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::futures::OwnedNotified;
use tokio_stream::Stream;

use crate::{
    broadcast::{Broadcast, Listener, Signal},
    frames::{NO_ERROR, PING},
    state::{fail, ConnError, ConnState, WRITE_HIGH},
    ConnContext, H2Settings, Handler,
};

/// What is read from the socket at a time (on the stack; only a frame cut in two is
/// kept between reads).
const READ_CHUNK: usize = 8 << 10;
/// Loop turns in one poll before the task yields to others.
const TURNS_PER_POLL: usize = 64;

/// One HTTP/2 connection, run as a future until it closes.
pub struct Connection<IO, H: Handler> {
    io: IO,
    state: ConnState<H>,
    /// A frame cut in two by a read; empty (unallocated) otherwise.
    rbuf: Vec<u8>,
    /// Events for every stream, and the server stopping.
    signals: Listener<H::Event>,
    /// Registered for the end of the push this connection holds its reads back for.
    push_done: Option<Pin<Box<OwnedNotified>>>,
    keepalive: Pin<Box<tokio::time::Sleep>>,
    /// The keepalive timer was polled since it was last set, so it wakes the connection
    /// when due: until then, a wake-up (one per push) need not poll it again.
    keepalive_armed: bool,
    /// The earliest stream timer (a Wasm resend, a held removal), when one is due.
    timer: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin, H: Handler> Connection<IO, H>
where
    H::Event: Clone,
{
    /// A connection on `io`, its streams sharing `ctx`, told of events by `signals`.
    pub fn new(io: IO, ctx: H::Context, settings: H2Settings, signals: &Broadcast<H::Event>) -> Self {
        let keepalive = Box::pin(tokio::time::sleep(settings.keepalive));
        Self {
            io,
            state: ConnState::new(ctx, settings),
            rbuf: Vec::new(),
            signals: signals.subscribe(),
            push_done: None,
            keepalive,
            keepalive_armed: false,
            timer: None,
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
        if !self.state.timer_stale {
            return self.timer.as_mut().is_some_and(|(_, sleep)| sleep.as_mut().poll(cx).is_ready());
        }
        self.state.timer_stale = false;
        let Some(at) = self.state.next_wakeup() else {
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

    /// Whether reads wait for the push under way to reach the other connections (see
    /// `broadcast`): only once this one has answered it, and only while it has no output
    /// waiting for the client's window (which a read may open). When it does, the end of
    /// the push wakes the connection.
    fn held_for_push(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.signals.pushing() || !self.state.answers_pushes() {
            self.push_done = None;
            return false;
        }
        let done = self.push_done.get_or_insert_with(|| Box::pin(self.signals.when_done()));
        // Registered first, then asked again: an end in between is not missed.
        if done.as_mut().poll(cx).is_ready() || !self.signals.pushing() {
            self.push_done = None;
            return false;
        }
        true
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
            let used = self.state.process(read)?;
            self.rbuf.extend_from_slice(&read[used..]);
        } else {
            let mut data = std::mem::take(&mut self.rbuf);
            data.extend_from_slice(read);
            let used = self.state.process(&data)?;
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
        while self.state.wpos < self.state.wbuf.len() {
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.state.wbuf[self.state.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.state.wpos += n;
        }
        // Through whatever the transport keeps (a TLS connection's records the socket has
        // not taken yet).
        std::task::ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        // Written: the buffer goes back, so an idle connection holds none.
        self.state.wbuf = Vec::new();
        self.state.wpos = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        for _ in 0..TURNS_PER_POLL {
            let mut progress = false;
            while let Poll::Ready(next) = Pin::new(&mut self.signals.rx).poll_next(cx) {
                match next {
                    Some(Signal::Event(e)) if !self.state.closing => self.state.on_event(&e),
                    Some(Signal::Event(_)) => {}
                    // Streams end with OK, as when the server stops.
                    Some(Signal::Stop) | None => self.state.stop(),
                }
                self.signals.answered();
                progress = true;
                if self.state.closing {
                    break;
                }
            }
            if self.keepalive_due(cx) {
                if self.state.ping_outstanding {
                    return Poll::Ready(Err(fail(NO_ERROR, "keepalive PING not answered")));
                }
                self.state.ping_outstanding = true;
                self.state.frame(PING, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 1]);
                let next = tokio::time::Instant::now() + self.state.settings.keepalive;
                self.keepalive.as_mut().reset(next);
                self.keepalive_armed = false;
                progress = true;
            }
            if self.poll_timer(cx) {
                self.timer = None;
                self.state.timer_stale = true;
                self.state.on_timers(Instant::now());
                progress = true;
            }
            if !self.state.closing && self.state.wbuf.len() - self.state.wpos < WRITE_HIGH && !self.held_for_push(cx) {
                match self.poll_read(cx) {
                    Poll::Ready(Ok(true)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(false)) => progress = true,
                    Poll::Ready(Err(e)) => {
                        self.state.go_away(e.code, e.why);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            self.state.pump();
            // A wake-up changed since the timer was armed (a stream started waiting on a
            // closed window): one more turn arms it before this task sleeps.
            progress |= self.state.timer_stale;
            let (before, waiting) = (self.state.wpos, self.state.wbuf.len());
            match self.poll_write(cx) {
                Poll::Ready(Ok(())) if self.state.closing => {
                    let _ = Pin::new(&mut self.io).poll_shutdown(cx);
                    return Poll::Ready(Ok(()));
                }
                // Written: streams held back by the output bound may go on.
                Poll::Ready(Ok(())) => progress |= waiting > before,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => progress |= self.state.wpos != before,
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

impl<IO: AsyncRead + AsyncWrite + Unpin, H: Handler> Future for Connection<IO, H>
where
    H::Event: Clone,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        match this.poll_run(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(e)) => {
                tracing::debug!(peer = %this.state.ctx.peer(), reason = e.why, "HTTP/2 connection closed");
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The read hold at the frame level: a client's PING is not read while a push is
    //! still reaching other connections, and is once the push has reached them; a
    //! connection whose output waits for its client's window reads on.
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::{
        frames::{frame_head, literal, ACK, END_HEADERS, HEADERS, PREFACE, SETTINGS},
        OutMessage, Output,
    };

    struct Ctx;

    impl ConnContext for Ctx {
        fn peer(&self) -> &str {
            "test"
        }
        fn limit_hit(&self, _: &'static str) {}
    }

    /// Answers each event with one message.
    struct Pusher;

    impl Handler for Pusher {
        type Context = Ctx;
        type Event = u8;
        type Method = ();
        fn route(_: &[u8]) -> Option<()> {
            Some(())
        }
        fn open(_: &Ctx, _: ()) -> Self {
            Pusher
        }
        fn on_message(&mut self, _: &Ctx, _: &[u8], _: &mut Output) {}
        fn on_requests_end(&mut self, _: &Ctx, _: &mut Output) {}
        fn on_event(&mut self, _: &Ctx, e: &u8, out: &mut Output) {
            out.messages.push(OutMessage { bytes: vec![*e; 16], supersedes: None });
        }
        fn next_wakeup(&self) -> Option<Instant> {
            None
        }
        fn on_timer(&mut self, _: &Ctx, _: Instant, _: &mut Output) {}
    }

    /// A client that opened one stream (with `window` as its initial stream window) on a
    /// connection of `b`'s, once the connection has read it (a PING answered shows it).
    async fn client(b: &Broadcast<u8>, window: u32) -> DuplexStream {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(Connection::<_, Pusher>::new(server, Ctx, H2Settings::default(), b));
        let mut out = PREFACE.to_vec();
        // SETTINGS_INITIAL_WINDOW_SIZE.
        frame_head(&mut out, 6, SETTINGS, 0, 0);
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&window.to_be_bytes());
        let mut block = Vec::new();
        for (n, v) in [(":method", "POST"), (":scheme", "http"), (":path", "/x"), (":authority", "a")] {
            literal(&mut block, n.as_bytes(), v.as_bytes());
        }
        literal(&mut block, b"content-type", b"application/grpc");
        literal(&mut block, b"te", b"trailers");
        frame_head(&mut out, block.len(), HEADERS, END_HEADERS, 1);
        out.extend_from_slice(&block);
        client.write_all(&out).await.unwrap();
        ping(&mut client).await;
        assert!(frame_comes(&mut client, PING, ACK, 0, Duration::from_secs(1)).await);
        client
    }

    /// Reads frames until one of type `ty` with flags `flags` on stream `id`, or until
    /// `within` passes with none: whether it came.
    async fn frame_comes(c: &mut DuplexStream, ty: u8, flags: u8, id: u32, within: Duration) -> bool {
        let read = async {
            loop {
                let mut head = [0u8; 9];
                c.read_exact(&mut head).await.unwrap();
                let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
                let mut payload = vec![0; len];
                c.read_exact(&mut payload).await.unwrap();
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                if head[3] == ty && head[4] & flags == flags && stream == id {
                    return;
                }
            }
        };
        tokio::time::timeout(within, read).await.is_ok()
    }

    async fn ping(c: &mut DuplexStream) {
        let mut out = Vec::new();
        frame_head(&mut out, 8, PING, 0, 0);
        out.extend_from_slice(&[1; 8]);
        c.write_all(&out).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_answered_a_push_reads_again_once_every_connection_has() {
        let b = Broadcast::new(0u8, Duration::from_secs(60));
        let mut c = client(&b, 65_535).await;
        // Another connection that has not answered yet.
        let elsewhere = b.subscribe();
        b.publish(7);
        assert!(frame_comes(&mut c, crate::frames::DATA, 0, 1, Duration::from_secs(1)).await, "the push went out");
        ping(&mut c).await;
        assert!(
            !frame_comes(&mut c, PING, ACK, 0, Duration::from_secs(5)).await,
            "read while another connection still had to answer the push"
        );
        drop(elsewhere);
        assert!(frame_comes(&mut c, PING, ACK, 0, Duration::from_secs(1)).await, "read once the push reached everyone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_output_waits_for_the_window_reads_through_a_push() {
        let b = Broadcast::new(0u8, Duration::from_secs(60));
        let mut c = client(&b, 0).await;
        let _elsewhere = b.subscribe();
        b.publish(7);
        ping(&mut c).await;
        assert!(
            frame_comes(&mut c, PING, ACK, 0, Duration::from_secs(1)).await,
            "a closed window's update comes by reading: never held"
        );
    }
}
