//! A server TLS connection that holds no buffer while it is idle.
//!
//! rustls's buffered connection (the one tokio-rustls wraps) keeps a 4 KiB read buffer for
//! the whole life of each connection: at 10,000 idle xDS streams, 40 MB that a plaintext
//! connection does not hold. This one drives rustls's unbuffered API over the socket
//! itself, and holds bytes only while they are in flight:
//! - bytes read wait in `incoming` until every whole record in them is processed;
//! - decrypted data waits in `plaintext` until the reader takes it;
//! - encrypted output waits in `outgoing` until the socket takes it.
//!
//! Each buffer is let go as soon as it is empty. What an idle connection holds is rustls's
//! state (its keys and the peer's certificate) and the socket.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use rustls::{
    server::UnbufferedServerConnection,
    unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus},
    ServerConfig,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// One read from the socket: a whole record of the largest size TLS allows (16 KiB of data,
/// 256 bytes of expansion, the 5-byte header).
const READ_CHUNK: usize = 16 * 1024 + 256 + 5;
/// Bytes received and not yet processed, at most: a handshake message may span records
/// (rustls's own buffered connection allows 64 KiB), application data records are each
/// processed once whole.
const MAX_INCOMING: usize = 64 * 1024 + READ_CHUNK;
/// Plaintext encrypted per write: what a write call takes at most.
const WRITE_CHUNK: usize = 64 * 1024;
/// Encrypted output the socket has not taken yet, past which writers wait.
const OUTPUT_HIGH: usize = 64 * 1024;
/// Bytes one record adds to its data, at most (TLS 1.2 AES-GCM: header, explicit nonce, tag).
const RECORD_OVERHEAD: usize = 5 + 8 + 16;
/// The largest record's data.
const MAX_FRAGMENT: usize = 16 * 1024;

/// Bytes with a position up to which they are consumed; the allocation is let go when all
/// of them are.
#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    start: usize,
}

impl Buffer {
    fn pending(&self) -> &[u8] {
        &self.bytes[self.start..]
    }

    fn pending_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..]
    }

    fn len(&self) -> usize {
        self.bytes.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.bytes.len());
        if self.start == self.bytes.len() {
            *self = Buffer::default();
        }
    }

    /// Moves what is left to the front, so what comes next is appended after it.
    fn compact(&mut self) {
        if self.start > 0 {
            self.bytes.drain(..self.start);
            self.start = 0;
        }
    }

    fn append(&mut self, data: &[u8]) {
        self.compact();
        self.bytes.extend_from_slice(data);
    }

    /// `n` bytes at the end to write into; `commit` says how many were used.
    fn spare(&mut self, n: usize) -> &mut [u8] {
        self.compact();
        let at = self.bytes.len();
        self.bytes.resize(at + n, 0);
        &mut self.bytes[at..]
    }

    fn commit(&mut self, reserved: usize, used: usize) {
        let len = self.bytes.len() - reserved + used.min(reserved);
        self.bytes.truncate(len);
        if self.is_empty() {
            *self = Buffer::default();
        }
    }
}

/// What one call into rustls did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Records processed or output queued: call again.
    Progress,
    /// Nothing more without bytes from the peer.
    NeedInput,
    /// This many bytes of the data given were encrypted into the output.
    Wrote(usize),
    /// The peer sent close_notify (said once).
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

/// What a call into rustls may do once the connection carries data.
#[derive(Clone, Copy)]
enum Send<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// A server TLS connection over TCP (see the module's comment).
pub struct TlsConn {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    incoming: Buffer,
    plaintext: Buffer,
    outgoing: Buffer,
    /// The peer closed: close_notify received, or the end of its stream.
    read_closed: bool,
    close_queued: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("io", &self.io)
            .field("incoming", &self.incoming.len())
            .field("plaintext", &self.plaintext.len())
            .field("outgoing", &self.outgoing.len())
            .finish_non_exhaustive()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Why rustls did not write into the output it was given.
enum Unwritten {
    /// Too small: the size it needs.
    Needs(usize),
    /// Anything else, as rustls said it.
    Failed(String),
}

fn encode_error(e: EncodeError) -> Unwritten {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Unwritten::Needs(required_size),
        other => Unwritten::Failed(other.to_string()),
    }
}

fn encrypt_error(e: EncryptError) -> Unwritten {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Unwritten::Needs(required_size),
        other => Unwritten::Failed(other.to_string()),
    }
}

/// Grows `out` until rustls's write into it fits.
fn write_into(
    out: &mut Buffer,
    mut size: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Unwritten>,
) -> Result<(), rustls::Error> {
    // Twice at most: rustls says the size it needs when the first guess is short.
    for _ in 0..2 {
        let spare = out.spare(size);
        match write(spare) {
            Ok(n) => {
                out.commit(size, n);
                return Ok(());
            }
            Err(Unwritten::Needs(required)) => {
                out.commit(size, 0);
                size = required;
            }
            Err(Unwritten::Failed(why)) => {
                out.commit(size, 0);
                return Err(rustls::Error::General(format!("TLS output could not be written: {why}")));
            }
        }
    }
    Err(rustls::Error::General("TLS output did not fit the size rustls asked for".into()))
}

impl TlsConn {
    /// The server's side of a TLS handshake on an accepted connection. A failed handshake
    /// sends the peer rustls's alert (as far as the socket takes it at once).
    pub async fn accept(io: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsConn> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut tls = TlsConn {
            io,
            conn,
            incoming: Buffer::default(),
            plaintext: Buffer::default(),
            outgoing: Buffer::default(),
            read_closed: false,
            close_queued: false,
        };
        match std::future::poll_fn(|cx| tls.poll_handshake(cx)).await {
            Ok(()) => Ok(tls),
            Err(e) => {
                tls.send_alert();
                Err(e)
            }
        }
    }

    /// What rustls knows of the connection (the peer's certificates, the protocol).
    pub fn common(&self) -> &rustls::CommonState {
        &self.conn
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// After a failed handshake: the alert rustls queued, written if the socket takes it
    /// now (the connection is closed next either way).
    fn send_alert(&mut self) {
        // One call: the alert queued with the error is the first output it hands out. A
        // second would look at what was received again, and fail on it again.
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(self.incoming.pending_mut());
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = write_into(&mut self.outgoing, 256, |spare| encode.encode(spare).map_err(encode_error));
        }
        self.incoming.consume(discard);
        while !self.outgoing.is_empty() {
            match self.io.try_write(self.outgoing.pending()) {
                Ok(n) if n > 0 => self.outgoing.consume(n),
                _ => break,
            }
        }
    }

    /// One call into rustls over what was received, writing `send` if it comes to that.
    fn advance(&mut self, send: Send<'_>) -> Result<Step, rustls::Error> {
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(self.incoming.pending_mut());
        let step = match state {
            Err(e) => {
                self.incoming.consume(discard);
                return Err(e);
            }
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    self.plaintext.append(record?.payload);
                }
                Step::Progress
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                write_into(&mut self.outgoing, 1024, |spare| encode.encode(spare).map_err(encode_error))?;
                Step::Progress
            }
            // Sent with the rest of `outgoing`, before anything more is read.
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                Step::Progress
            }
            Ok(ConnectionState::BlockedHandshake) => Step::NeedInput,
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match send {
                Send::Nothing => Step::NeedInput,
                Send::Data(data) => {
                    let take = data.len().min(WRITE_CHUNK);
                    let size = take + (take / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
                    write_into(&mut self.outgoing, size, |spare| {
                        traffic.encrypt(&data[..take], spare).map_err(encrypt_error)
                    })?;
                    Step::Wrote(take)
                }
                Send::CloseNotify => {
                    // close_notify is written here, after anything rustls queued before it.
                    write_into(&mut self.outgoing, 256, |spare| {
                        traffic.queue_close_notify(spare).map_err(encrypt_error)
                    })?;
                    self.close_queued = true;
                    Step::Progress
                }
            },
            Ok(ConnectionState::PeerClosed) => Step::PeerClosed,
            Ok(ConnectionState::Closed) => Step::Closed,
            // Early data is not enabled; anything else is new to this version of rustls.
            Ok(other) => {
                let what = format!("unexpected TLS state {other:?}");
                self.incoming.consume(discard);
                return Err(rustls::Error::General(what));
            }
        };
        self.incoming.consume(discard);
        Ok(step)
    }

    /// Writes queued output; `Ready` once none is left.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outgoing.pending()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.consume(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Reads once from the socket; `Ready(false)` at the end of its stream.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_INCOMING} bytes of TLS received without a whole record or handshake message"),
            )));
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        if buf.filled().is_empty() {
            return Poll::Ready(Ok(false));
        }
        self.incoming.append(buf.filled());
        Poll::Ready(Ok(true))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let eof =
            || io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection during the TLS handshake");
        loop {
            ready!(self.poll_send(cx))?;
            // Done once rustls has nothing more to send: in TLS 1.2 the server's last flight
            // is queued by the same call that ends the handshake.
            match self.advance(Send::Nothing).map_err(tls_error)? {
                Step::Progress | Step::Wrote(_) => {}
                Step::NeedInput if !self.conn.is_handshaking() => return Poll::Ready(Ok(())),
                Step::NeedInput => {
                    if !ready!(self.poll_receive(cx))? {
                        return Poll::Ready(Err(eof()));
                    }
                }
                Step::PeerClosed | Step::Closed if !self.conn.is_handshaking() => {
                    self.read_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Step::PeerClosed | Step::Closed => return Poll::Ready(Err(eof())),
            }
        }
    }

    /// Output made while reading (the answer to a key update, session tickets) goes out as
    /// far as the socket takes it now; a writer's flush sends the rest.
    fn send_some(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plaintext.is_empty() {
                let pending = this.plaintext.pending();
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                this.plaintext.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.advance(Send::Nothing).map_err(tls_error)? {
                Step::Progress | Step::Wrote(_) => this.send_some(cx)?,
                Step::PeerClosed | Step::Closed => this.read_closed = true,
                Step::NeedInput => {
                    if !ready!(this.poll_receive(cx))? {
                        // The end of the stream without close_notify: the data may be cut.
                        this.read_closed = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection without a TLS close_notify",
                        )));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.close_queued {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS close_notify already sent")));
        }
        if this.outgoing.len() >= OUTPUT_HIGH {
            ready!(this.poll_send(cx))?;
        }
        loop {
            match this.advance(Send::Data(data)).map_err(tls_error)? {
                Step::Wrote(n) => {
                    this.send_some(cx)?;
                    return Poll::Ready(Ok(n));
                }
                Step::Progress => {
                    // Records for the reader decrypted here: it is woken to take them.
                    if !this.plaintext.is_empty() {
                        cx.waker().wake_by_ref();
                    }
                }
                // The peer may close its side and still read what is sent.
                Step::PeerClosed => this.read_closed = true,
                Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS connection closed")))
                }
                Step::NeedInput => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "TLS handshake not complete")))
                }
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Small slices (frame headers beside their payloads) go into one record, not one each.
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        let Some(first) = slices.next() else {
            return Poll::Ready(Ok(0));
        };
        if first.len() >= WRITE_CHUNK || slices.next().is_none() {
            return self.poll_write(cx, first);
        }
        let mut joined = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_CHUNK));
        for slice in bufs {
            let room = WRITE_CHUNK - joined.len();
            joined.extend_from_slice(&slice[..slice.len().min(room)]);
            if joined.len() == WRITE_CHUNK {
                break;
            }
        }
        self.poll_write(cx, &joined)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            // close_notify, then whatever rustls encodes with it; records still unread are
            // processed on the way (bounded by what was received).
            loop {
                let send = if this.close_queued { Send::Nothing } else { Send::CloseNotify };
                match this.advance(send).map_err(tls_error)? {
                    Step::Progress | Step::Wrote(_) | Step::PeerClosed => {}
                    Step::NeedInput | Step::Closed => break,
                }
            }
            this.close_queued = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
