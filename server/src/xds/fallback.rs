//! The fallback transport of the xDS port (`--xds-http2 tonic`): tonic's server (hyper and
//! h2) carries the same stream handlers as the lean transport (`filterplane_h2::Handler`),
//! so an operator can switch should the lean transport ever have a flaw.
//!
//! What differs is where the work happens (h2 runs each stream as a task of its own and
//! buffers per connection as it does) and one reaction: the handler, its events and
//! timers, the request-size bound and the three output bounds are the same, but a stream
//! past an output bound closes its connection (counted under the same limit) instead of
//! being reset alone: hyper does not poll a response body while its client keeps the
//! stream's window closed, so a reset from the body would never be sent.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::http::{self, HeaderValue};
use bytes::Bytes;
use filterplane_h2::{
    grpc::{FrameError, MessageReader},
    ConnContext, Handler, OutMessage, Output, OutputBudget, Signal, Status, MAX_REQUEST,
};
use http_body_util::BodyExt;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::tls::PeerInfo;

/// How long a stream's output may wait behind a closed window, with the server over its
/// total output bound, before the stream is reset (as the lean transport).
const STALL: Duration = Duration::from_secs(1);

/// A stream's output: what waits for h2 to take it, shared by the stream's task (which
/// adds) and its response body (which h2 polls when it has room).
#[derive(Debug)]
struct Outbox {
    state: Mutex<OutboxState>,
    /// Tells the task that the body took something or was dropped.
    taken: Notify,
    connection: Arc<AtomicUsize>,
    budget: Arc<OutputBudget>,
}

#[derive(Debug, Default)]
struct OutboxState {
    queue: VecDeque<OutMessage>,
    /// Bytes in `queue` and in h2 (the last message it took), counted in the budgets.
    queued: usize,
    /// Bytes of the last message h2 took: it holds it until the client's window lets it
    /// go, and asks for the next one only then.
    in_h2: usize,
    /// The status to end with once the queue is empty.
    end: Option<Status>,
    /// The body is gone (the client reset the stream or went away).
    gone: bool,
    waker: Option<std::task::Waker>,
    /// Since when the oldest output has waited.
    waiting_since: Option<Instant>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, state: &mut OutboxState, added: usize, removed: usize) {
        state.queued = state.queued + added - removed;
        if added > 0 {
            self.connection.fetch_add(added, Ordering::Relaxed);
            self.budget.take(added);
        }
        if removed > 0 {
            self.connection.fetch_sub(removed, Ordering::Relaxed);
            self.budget.give_back(removed);
        }
    }
}

/// The response body h2 sends from.
pub struct ResponseBody {
    outbox: Option<Arc<Outbox>>,
    /// A trailers-only answer (an unknown method).
    only: Option<Status>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if let Some(status) = self.only.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(status_headers(&status)))));
        }
        let Some(outbox) = &self.outbox else { return Poll::Ready(None) };
        let mut state = outbox.lock();
        // h2 asks for more: the message it took last has gone out.
        let sent = std::mem::take(&mut state.in_h2);
        outbox.count(&mut state, 0, sent);
        let frame = if let Some(m) = state.queue.pop_front() {
            state.in_h2 = m.bytes.len();
            state.waiting_since = Some(Instant::now());
            Some(http_body::Frame::data(Bytes::from(m.bytes)))
        } else if let Some(status) = state.end.take() {
            Some(http_body::Frame::trailers(status_headers(&status)))
        } else {
            state.waiting_since = None;
            state.waker = Some(cx.waker().clone());
            None
        };
        drop(state);
        outbox.taken.notify_one();
        match frame {
            Some(f) => Poll::Ready(Some(Ok(f))),
            None => Poll::Pending,
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let Some(outbox) = &self.outbox else { return };
        let mut state = outbox.lock();
        state.gone = true;
        state.queue.clear();
        let all = state.queued;
        outbox.count(&mut state, 0, all);
        state.in_h2 = 0;
        drop(state);
        outbox.taken.notify_one();
    }
}

/// What tonic hands every request of one connection (`Connected::ConnectInfo`): the peer,
/// the connection's queued output, and a switch that closes it.
#[derive(Debug, Clone)]
pub struct FallbackConn {
    pub peer: PeerInfo,
    queued: Arc<AtomicUsize>,
    /// Request bytes held for messages not complete yet, all streams together.
    buffered: Arc<AtomicUsize>,
    close: CancellationToken,
}

/// A connection that its streams can close (past an output bound).
pub struct Closable<IO> {
    io: IO,
    conn: FallbackConn,
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<IO> Closable<IO> {
    pub fn new(io: IO, peer: PeerInfo) -> Self {
        let close = CancellationToken::new();
        let closed = Box::pin(close.clone().cancelled_owned());
        Self { io, conn: FallbackConn { peer, queued: Arc::default(), buffered: Arc::default(), close }, closed }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "over an output bound")),
            Poll::Pending => Ok(()),
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Closable<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Closable<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Send + 'static> tonic::transport::server::Connected for Closable<IO> {
    type ConnectInfo = FallbackConn;
    fn connect_info(&self) -> FallbackConn {
        self.conn.clone()
    }
}

/// Makes the streams' shared context for a connection's peer.
pub type MakeContext<H> = Arc<dyn Fn(&PeerInfo) -> <H as Handler>::Context + Send + Sync>;

/// The tower service tonic's server calls for every request: routes by path, and runs
/// each stream's handler in a task of its own.
pub struct FallbackService<H: Handler> {
    /// The streams' shared context, made for the request's connection.
    pub context: MakeContext<H>,
    pub signals: watch::Receiver<Signal<H::Event>>,
    pub budget: Arc<OutputBudget>,
}

impl<H: Handler> Clone for FallbackService<H> {
    fn clone(&self) -> Self {
        Self { context: self.context.clone(), signals: self.signals.clone(), budget: self.budget.clone() }
    }
}

/// A response that is only trailers: the stream ends at once with `status`.
fn trailers_only(status: Status) -> http::Response<ResponseBody> {
    grpc_response(ResponseBody { outbox: None, only: Some(status) })
}

fn grpc_response(body: ResponseBody) -> http::Response<ResponseBody> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

fn status_headers(status: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(status.code() as i32));
    if !status.message().is_empty() {
        // grpc-message is percent-encoded (gRPC over HTTP/2).
        let encoded: String = status
            .message()
            .bytes()
            .map(|b| match b {
                b' '..=b'~' if b != b'%' => (b as char).to_string(),
                b => format!("%{b:02X}"),
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            h.insert("grpc-message", v);
        }
    }
    h
}

impl<H: Handler> tower_service::Service<http::Request<tonic::body::Body>> for FallbackService<H>
where
    H::Event: Clone,
    H::Method: Send + 'static,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(method) = H::route(req.uri().path().as_bytes()) else {
            return std::future::ready(Ok(trailers_only(Status::unimplemented(format!(
                "unknown method {}",
                crate::log_limit::Cut(req.uri().path())
            )))));
        };
        let Some(conn) = req.extensions().get::<FallbackConn>().cloned() else {
            return std::future::ready(Ok(trailers_only(Status::internal("no connection info"))));
        };
        let ctx = (self.context)(&conn.peer);
        let outbox = Arc::new(Outbox {
            state: Mutex::default(),
            taken: Notify::new(),
            connection: conn.queued.clone(),
            budget: self.budget.clone(),
        });
        let stream = StreamTask::<H> {
            handler: H::open(&ctx, method),
            ctx,
            outbox: outbox.clone(),
            close: conn.close,
            buffered: conn.buffered,
            held: 0,
        };
        tokio::spawn(stream.run(req.into_body(), self.signals.clone()));
        std::future::ready(Ok(grpc_response(ResponseBody { outbox: Some(outbox), only: None })))
    }
}

/// One stream: its handler, and its output waiting for room in h2.
struct StreamTask<H: Handler> {
    handler: H,
    ctx: H::Context,
    outbox: Arc<Outbox>,
    /// Closes the connection.
    close: CancellationToken,
    /// The connection's unfinished request bytes, and this stream's share of them.
    buffered: Arc<AtomicUsize>,
    held: usize,
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl<H: Handler> StreamTask<H>
where
    H::Event: Clone,
{
    async fn run(mut self, mut body: tonic::body::Body, mut signals: watch::Receiver<Signal<H::Event>>) {
        signals.borrow_and_update();
        let mut reader = MessageReader::default();
        let mut requests_open = true;
        let mut ending = false;
        loop {
            let (gone, since) = {
                let state = self.outbox.lock();
                (state.gone || (ending && state.end.is_none() && state.queue.is_empty()), state.waiting_since)
            };
            if gone {
                return;
            }
            let mut out = Output::default();
            // Checked a second after output started waiting, and each second after.
            let stall = since.map(|t| t + STALL * (1 + t.elapsed().as_secs() as u32));
            let outbox = self.outbox.clone();
            tokio::select! {
                _ = outbox.taken.notified() => continue,
                frame = body.frame(), if requests_open && !ending => match frame {
                    None => {
                        requests_open = false;
                        self.handler.on_requests_end(&self.ctx, &mut out);
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.read(&mut reader, &data, &mut out);
                            if !self.hold(reader.buffered()) {
                                return;
                            }
                        }
                    }
                    // The client reset the stream, or its connection is gone.
                    Some(Err(_)) => return,
                },
                changed = signals.changed(), if !ending => {
                    let signal = match changed {
                        Ok(()) => signals.borrow_and_update().clone(),
                        Err(_) => Signal::Stop,
                    };
                    match signal {
                        Signal::Event(e) => self.handler.on_event(&self.ctx, &e, &mut out),
                        Signal::Stop => out.end = Some(Status::ok("")),
                    }
                }
                _ = sleep_until(self.handler.next_wakeup()), if !ending => {
                    self.handler.on_timer(&self.ctx, Instant::now(), &mut out);
                }
                _ = sleep_until(stall) => {
                    if self.outbox.budget.over_total() {
                        self.close("queued_bytes_total");
                        return;
                    }
                    continue;
                }
            }
            ending |= out.end.is_some();
            if !self.take(out) {
                return;
            }
        }
    }

    /// Counts what the stream holds of unfinished requests; past the connection's bound
    /// (as the lean transport's), the connection is closed.
    fn hold(&mut self, now: usize) -> bool {
        let total = if now >= self.held {
            self.buffered.fetch_add(now - self.held, Ordering::Relaxed) + now - self.held
        } else {
            self.buffered.fetch_sub(self.held - now, Ordering::Relaxed) - (self.held - now)
        };
        self.held = now;
        if total > filterplane_h2::MAX_BUFFERED {
            self.close("buffered_request_bytes");
            return false;
        }
        true
    }

    /// Splits request bytes into gRPC messages for the handler (as the lean transport).
    fn read(&mut self, reader: &mut MessageReader, data: &[u8], out: &mut Output) {
        let (handler, ctx) = (&mut self.handler, &self.ctx);
        let read = reader.push(data, MAX_REQUEST, |message| {
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

    /// Queues what the handler asked to send (a SotW response replaces an unsent one of
    /// its type); false when the connection was closed for it.
    fn take(&mut self, out: Output) -> bool {
        if out.messages.is_empty() && out.end.is_none() {
            return true;
        }
        let outbox = &self.outbox;
        let mut state = outbox.lock();
        for m in out.messages {
            let added = m.bytes.len();
            let older = m.supersedes.and_then(|k| state.queue.iter_mut().find(|o| o.supersedes == Some(k)));
            let removed = match older {
                Some(o) => std::mem::replace(o, m).bytes.len(),
                None => {
                    state.queue.push_back(m);
                    0
                }
            };
            outbox.count(&mut state, added, removed);
        }
        let waiting = state.queue.len() + usize::from(state.in_h2 > 0);
        let limit = if waiting > 1 && state.queued > outbox.budget.per_stream {
            Some("queued_bytes_per_stream")
        } else if outbox.connection.load(Ordering::Relaxed) > outbox.budget.per_connection {
            Some("queued_bytes_per_connection")
        } else {
            None
        };
        if state.waiting_since.is_none() && !state.queue.is_empty() {
            state.waiting_since = Some(Instant::now());
        }
        if let Some(status) = out.end {
            state.end.get_or_insert(status);
        }
        let waker = state.waker.take();
        drop(state);
        if let Some(limit) = limit {
            self.close(limit);
            return false;
        }
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Closes the stream's connection, counted under `limit`.
    fn close(&mut self, limit: &'static str) {
        self.ctx.limit_hit(limit);
        tracing::warn!(peer = %self.ctx.peer(), limit, "xDS connection closed: its client does not read what it is sent");
        self.close.cancel();
    }
}

impl<H: Handler> Drop for StreamTask<H> {
    fn drop(&mut self) {
        self.buffered.fetch_sub(self.held, Ordering::Relaxed);
        // What waits for a stream that is over goes with it (the body may outlive it).
        let mut state = self.outbox.lock();
        let all = state.queue.iter().map(|m| m.bytes.len()).sum::<usize>();
        state.queue.clear();
        self.outbox.count(&mut state, 0, all);
        if let Some(w) = state.waker.take() {
            w.wake();
        }
    }
}

/// tonic's server on the accepted connections, until `shutdown`.
pub fn serve<H: Handler, IO>(
    incoming: impl futures_util::Stream<Item = Result<Closable<IO>, std::io::Error>> + Send + 'static,
    service: FallbackService<H>,
    settings: &filterplane_h2::H2Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send
where
    H::Event: Clone,
    H::Method: Send + 'static,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(settings.max_streams)
        .http2_keepalive_interval(Some(settings.keepalive))
        .http2_keepalive_timeout(Some(settings.keepalive))
        .http2_max_header_list_size(filterplane_h2::MAX_HEADER_BLOCK as u32)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    async move {
        if let Err(e) = server.serve_with_incoming_shutdown(service, incoming, shutdown).await {
            tracing::error!(error = %e, "xDS server (tonic) stopped");
        }
    }
}
