//! gRPC's length-prefixed messages (gRPC over HTTP/2: a compressed flag, a 4-byte length,
//! the message) read out of a stream's DATA frames, pure: bytes in, whole messages out.
//!
//! Work per byte received is constant: whole messages in a frame are handed over in place,
//! and a message cut over frames is copied once, as its bytes arrive (a client that sends
//! a 4 MiB message one byte per frame costs one copy of 4 MiB, not one per frame).

/// Length of the prefix in front of every message.
pub const PREFIX: usize = 5;

/// Why a stream's requests cannot be read on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("compressed requests are not supported")]
    Compressed,
    #[error("a request of {len} bytes is over the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

/// The part of a message that arrived so far; empty (unallocated) between messages.
#[derive(Debug, Default)]
pub struct MessageReader {
    partial: Vec<u8>,
    /// Bytes copied into `partial`, ever (tests check that it stays linear).
    #[cfg(test)]
    copied: usize,
}

impl MessageReader {
    /// Bytes held for a message not complete yet.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Reads `data`: hands each whole message to `on_message` (which returns `false` to
    /// stop reading) and keeps what is left of an unfinished one. Messages over `limit`
    /// are refused as soon as their prefix is read.
    pub fn push(
        &mut self,
        mut data: &[u8],
        limit: usize,
        mut on_message: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), FrameError> {
        if !self.partial.is_empty() {
            // Complete the prefix, then the message, copying only what it still lacks.
            if self.partial.len() < PREFIX {
                let take = (PREFIX - self.partial.len()).min(data.len());
                self.keep(&data[..take]);
                data = &data[take..];
                if self.partial.len() < PREFIX {
                    return Ok(());
                }
            }
            let len = declared(&self.partial, limit)?;
            let take = (PREFIX + len - self.partial.len()).min(data.len());
            self.keep(&data[..take]);
            data = &data[take..];
            if self.partial.len() < PREFIX + len {
                return Ok(());
            }
            let message = std::mem::take(&mut self.partial);
            if !on_message(&message[PREFIX..]) {
                return Ok(());
            }
        }
        // Whole messages are read where they lie.
        while data.len() >= PREFIX {
            let len = declared(data, limit)?;
            if data.len() < PREFIX + len {
                break;
            }
            if !on_message(&data[PREFIX..PREFIX + len]) {
                return Ok(());
            }
            data = &data[PREFIX + len..];
        }
        if !data.is_empty() {
            self.keep(data);
        }
        Ok(())
    }

    fn keep(&mut self, bytes: &[u8]) {
        #[cfg(test)]
        {
            self.copied += bytes.len();
        }
        // Grows as bytes arrive (amortized), never by what the prefix claims: a client that
        // declares 4 MiB and sends five bytes gets five bytes held.
        self.partial.extend_from_slice(bytes);
    }
}

/// The length a prefix declares, checked.
fn declared(prefix: &[u8], limit: usize) -> Result<usize, FrameError> {
    if prefix[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_message_sent_one_byte_per_frame_is_copied_once() {
        // Issue 20: 3.9 MiB in one frame, then the rest a byte at a time. Before, every
        // frame copied all that was held again (2.17 s of CPU for 200 KB on the wire).
        let body = vec![7u8; 4 << 20];
        let bytes = framed(&body);
        let mut r = MessageReader::default();
        let mut got = Vec::new();
        let first = bytes.len() - 200_000;
        r.push(&bytes[..first], 4 << 20, |m| {
            got.push(m.len());
            true
        })
        .unwrap();
        for b in bytes[first..].chunks(1) {
            r.push(b, 4 << 20, |m| {
                got.push(m.len());
                true
            })
            .unwrap();
        }
        assert_eq!(got, [body.len()]);
        assert_eq!(r.copied, bytes.len(), "each byte copied once");
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn whole_messages_are_read_in_place_and_a_tail_is_kept() {
        let mut bytes = framed(b"one");
        bytes.extend(framed(b"two"));
        let third = framed(b"three");
        bytes.extend_from_slice(&third[..4]);
        let mut r = MessageReader::default();
        let mut got: Vec<Vec<u8>> = Vec::new();
        r.push(&bytes, 100, |m| {
            got.push(m.to_vec());
            true
        })
        .unwrap();
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec()]);
        assert_eq!((r.copied, r.buffered()), (4, 4));
        r.push(&third[4..], 100, |m| {
            got.push(m.to_vec());
            true
        })
        .unwrap();
        assert_eq!(got[2], b"three");
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_its_prefix() {
        let mut r = MessageReader::default();
        let e = r.push(&[0, 0, 0, 1, 0], 255, |_| true).unwrap_err();
        assert_eq!(e, FrameError::TooLarge { len: 256, limit: 255 });
        // Also when the prefix arrives in pieces.
        let mut r = MessageReader::default();
        r.push(&[0, 0], 255, |_| true).unwrap();
        assert!(r.push(&[0, 1, 0, 9], 255, |_| true).is_err());
        let e = MessageReader::default().push(&[1, 0, 0, 0, 0], 255, |_| true).unwrap_err();
        assert_eq!(e, FrameError::Compressed);
    }

    #[test]
    fn any_split_into_frames_gives_the_same_messages() {
        // Fixed-seed xorshift: messages of random sizes, cut at random points.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |below: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % below as u64) as usize
        };
        for _ in 0..200 {
            let messages: Vec<Vec<u8>> =
                (0..next(8) + 1).map(|i| vec![i as u8; [0, 1, 4, 5, 100, 70_000][next(6)]]).collect();
            let bytes: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
            let mut r = MessageReader::default();
            let mut got = Vec::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let (chunk, after) = rest.split_at((next(20_000) + 1).min(rest.len()));
                r.push(chunk, 1 << 20, |m| {
                    got.push(m.to_vec());
                    true
                })
                .unwrap();
                rest = after;
            }
            assert_eq!(got, messages);
            assert_eq!(r.buffered(), 0);
            assert!(r.copied <= bytes.len(), "never more than one copy");
        }
    }

    #[test]
    fn the_handler_can_stop_reading() {
        let mut bytes = framed(b"a");
        bytes.extend(framed(b"b"));
        let mut n = 0;
        MessageReader::default()
            .push(&bytes, 10, |_| {
                n += 1;
                false
            })
            .unwrap();
        assert_eq!(n, 1);
    }
}
