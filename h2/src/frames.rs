//! HTTP/2 frames, pure: frame types, flags and error codes (RFC 9113, 6 and 7), the
//! frame header, and the response header blocks this server writes (HPACK literals only,
//! RFC 7541, so no encoder state).

use crate::Status;

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Length of a frame's header (RFC 9113, 4.1).
pub(crate) const FRAME_HEAD: usize = 9;

pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
pub(crate) const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
pub(crate) const PUSH_PROMISE: u8 = 0x5;
pub(crate) const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
pub(crate) const WINDOW_UPDATE: u8 = 0x8;
pub(crate) const CONTINUATION: u8 = 0x9;

pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

pub(crate) const NO_ERROR: u32 = 0x0;
pub(crate) const PROTOCOL_ERROR: u32 = 0x1;
pub(crate) const FLOW_CONTROL_ERROR: u32 = 0x3;
pub(crate) const STREAM_CLOSED: u32 = 0x5;
pub(crate) const FRAME_SIZE_ERROR: u32 = 0x6;
pub(crate) const REFUSED_STREAM: u32 = 0x7;
pub(crate) const COMPRESSION_ERROR: u32 = 0x9;
pub(crate) const ENHANCE_YOUR_CALM: u32 = 0xb;

/// How much of a status message goes into the `grpc-message` trailer.
pub(crate) const MAX_STATUS_MESSAGE: usize = 1024;

/// The stream a PRIORITY payload (or a HEADERS frame's priority part) depends on.
pub(crate) fn depends_on(p: &[u8]) -> u32 {
    u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff
}

pub(crate) fn frame_head(buf: &mut Vec<u8>, len: usize, ty: u8, flags: u8, id: u32) {
    buf.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags]);
    buf.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1).
pub(crate) fn hpack_int(buf: &mut Vec<u8>, n: u8, flags: u8, value: usize) {
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
pub(crate) fn literal(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.push(0);
    hpack_int(buf, 7, 0, name.len());
    buf.extend_from_slice(name);
    hpack_int(buf, 7, 0, value.len());
    buf.extend_from_slice(value);
}

/// `:status: 200` (static table entry 8) and `content-type: application/grpc` (name
/// from static entry 31).
pub(crate) fn response_headers(buf: &mut Vec<u8>) {
    buf.push(0x88);
    hpack_int(buf, 4, 0, 31);
    hpack_int(buf, 7, 0, b"application/grpc".len());
    buf.extend_from_slice(b"application/grpc");
}

/// `grpc-status` and, unless empty, `grpc-message` (percent-encoded, as gRPC asks).
pub(crate) fn trailers(buf: &mut Vec<u8>, status: &Status) {
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
