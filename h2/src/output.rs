//! Output waiting behind HTTP/2 flow control, bounded per stream, per connection and for
//! the whole server. A client that reads its socket but never opens its window would
//! otherwise hold one more response per new configuration, forever.

use prometheus_client::metrics::gauge::Gauge;

/// A gRPC message a stream's handler wants sent.
#[derive(Debug)]
pub struct OutMessage {
    pub bytes: Vec<u8>,
    /// While it waits unsent, a later message with the same key replaces it: a SotW
    /// response carries the whole state of its type, so only the newest one matters
    /// (the client ACKs that one's nonce). `None`: it must go out (a delta response).
    pub supersedes: Option<u8>,
}

/// The bounds on queued output, and what all connections hold together.
#[derive(Debug)]
pub struct OutputBudget {
    /// Bytes one stream may have waiting; past it (with more than one message waiting,
    /// so one large response always goes) the stream is reset with ENHANCE_YOUR_CALM.
    pub per_stream: usize,
    /// Bytes one connection may have waiting, all streams together; past it, GOAWAY
    /// with ENHANCE_YOUR_CALM and the connection is closed.
    pub per_connection: usize,
    /// Bytes all connections may have waiting; past it, a stream whose output has been
    /// held for a second or more by a window its client keeps closed is reset with
    /// ENHANCE_YOUR_CALM (clients that read, whose windows open within a round trip, go
    /// on). The connection wakes when a stream's second is up.
    pub total: usize,
    /// Bytes waiting on every connection now (`filterplane_xds_queued_bytes`).
    used: Gauge,
}

impl OutputBudget {
    pub fn new(per_stream: usize, per_connection: usize, total: usize, used: Gauge) -> Self {
        Self { per_stream, per_connection, total, used }
    }

    /// Bytes waiting on every connection now.
    pub fn used(&self) -> usize {
        self.used.get().max(0) as usize
    }

    pub fn over_total(&self) -> bool {
        self.used() > self.total
    }

    pub fn take(&self, n: usize) {
        if n > 0 {
            self.used.inc_by(n as i64);
        }
    }

    pub fn give_back(&self, n: usize) {
        if n > 0 {
            self.used.dec_by(n as i64);
        }
    }
}

impl Default for OutputBudget {
    fn default() -> Self {
        Self::new(DEFAULT_PER_STREAM, DEFAULT_PER_CONNECTION, DEFAULT_TOTAL, Gauge::default())
    }
}

pub const DEFAULT_PER_STREAM: usize = 64 << 20;
pub const DEFAULT_PER_CONNECTION: usize = 128 << 20;
pub const DEFAULT_TOTAL: usize = 256 << 20;

/// A stream's messages waiting to be sent, oldest first. Most of the time there is one (a
/// push, then the next push after it went out): held inline, so a push allocates no queue.
#[derive(Debug, Default)]
pub enum OutQueue {
    #[default]
    Empty,
    One(OutMessage),
    Many(std::collections::VecDeque<OutMessage>),
}

impl OutQueue {
    pub fn front(&self) -> Option<&OutMessage> {
        match self {
            OutQueue::Empty => None,
            OutQueue::One(m) => Some(m),
            OutQueue::Many(q) => q.front(),
        }
    }

    pub fn push_back(&mut self, m: OutMessage) {
        match std::mem::take(self) {
            OutQueue::Empty => *self = OutQueue::One(m),
            OutQueue::One(first) => *self = OutQueue::Many([first, m].into()),
            OutQueue::Many(mut q) => {
                q.push_back(m);
                *self = OutQueue::Many(q);
            }
        }
    }

    /// Drops the oldest message; an emptied queue frees what it held.
    pub fn pop_front(&mut self) {
        match self {
            OutQueue::Empty => {}
            OutQueue::One(_) => *self = OutQueue::Empty,
            OutQueue::Many(q) => {
                q.pop_front();
                if q.is_empty() {
                    *self = OutQueue::Empty;
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, OutQueue::Empty)
    }

    pub fn len(&self) -> usize {
        match self {
            OutQueue::Empty => 0,
            OutQueue::One(_) => 1,
            OutQueue::Many(q) => q.len(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &OutMessage> {
        let (one, many) = match self {
            OutQueue::Empty => (None, None),
            OutQueue::One(m) => (Some(m), None),
            OutQueue::Many(q) => (None, Some(q.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut OutMessage> {
        let (one, many) = match self {
            OutQueue::Empty => (None, None),
            OutQueue::One(m) => (Some(m), None),
            OutQueue::Many(q) => (None, Some(q.iter_mut())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(n: u8) -> OutMessage {
        OutMessage { bytes: vec![n], supersedes: None }
    }

    #[test]
    fn a_queue_keeps_order_and_holds_one_message_inline() {
        let mut q = OutQueue::default();
        q.push_back(m(1));
        assert!(matches!(q, OutQueue::One(_)));
        q.push_back(m(2));
        q.push_back(m(3));
        assert_eq!(q.iter().map(|m| m.bytes[0]).collect::<Vec<_>>(), [1, 2, 3]);
        q.iter_mut().for_each(|m| m.bytes[0] *= 10);
        assert_eq!((q.len(), q.front().map(|m| m.bytes[0])), (3, Some(10)));
        q.pop_front();
        q.pop_front();
        q.pop_front();
        assert!(q.is_empty() && matches!(q, OutQueue::Empty));
    }
}
