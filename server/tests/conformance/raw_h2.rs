//! A scripted HTTP/2 peer for tests of the xDS port: raw frames in, the frames the server
//! answers with out (used by `h2_rfc.rs` and `h2_output.rs`).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

pub const PING: u8 = 0x6;
pub const PUSH_PROMISE: u8 = 0x5;
pub const CONTINUATION: u8 = 0x9;
pub const ACK: u8 = 0x1;
pub const PADDED: u8 = 0x8;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const PROTOCOL_ERROR: u32 = 0x1;
pub const STREAM_CLOSED: u32 = 0x5;

pub const ADS: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// A frame the server sent.
#[derive(Debug)]
pub struct Frame {
    pub ty: u8,
    pub flags: u8,
    pub id: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn code(&self) -> u32 {
        let p = if self.ty == GOAWAY { &self.payload[4..8] } else { &self.payload[..4] };
        u32::from_be_bytes([p[0], p[1], p[2], p[3]])
    }
}

/// One raw HTTP/2 client connection, past the preface and SETTINGS.
pub struct Peer {
    pub s: TcpStream,
}

impl Peer {
    pub fn connect(addr: SocketAddr) -> Peer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let mut p = Peer { s };
        p.send(SETTINGS, 0, 0, &[]);
        p
    }

    pub fn send(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) {
        let n = payload.len();
        let mut out = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(payload);
        self.s.write_all(&out).unwrap();
    }

    /// The next frame, or `None` once the server closed the connection.
    pub fn next(&mut self) -> Option<Frame> {
        let mut h = [0u8; 9];
        self.s.read_exact(&mut h).ok()?;
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let mut payload = vec![0; len];
        self.s.read_exact(&mut payload).ok()?;
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        Some(Frame { ty: h[3], flags: h[4], id, payload })
    }

    /// The first frame of type `ty` on stream `id` (0 for the connection).
    pub fn expect(&mut self, ty: u8, id: u32) -> Frame {
        loop {
            let f = self.next().unwrap_or_else(|| panic!("closed before a frame of type {ty} on stream {id}"));
            if f.ty == ty && f.id == id {
                return f;
            }
            assert!(f.ty != GOAWAY, "unexpected GOAWAY (code {}) waiting for type {ty} on {id}", f.code());
            assert!(f.ty != RST_STREAM || f.id != id, "unexpected RST_STREAM {} on {id}", f.code());
        }
    }

    pub fn expect_reset(&mut self, id: u32, code: u32) {
        let f = self.expect(RST_STREAM, id);
        assert_eq!(f.code(), code, "RST_STREAM code on stream {id}");
    }

    pub fn expect_goaway(&mut self, code: u32) {
        let f = self.expect(GOAWAY, 0);
        assert_eq!(f.code(), code, "GOAWAY code: {}", String::from_utf8_lossy(&f.payload[8..]));
    }

    /// A request on `id` that is well-formed, with the fields in `extra` after the usual ones.
    pub fn request(&mut self, id: u32, flags: u8, extra: &[(&str, &str)]) {
        let mut fields = vec![(":method", "POST"), (":scheme", "http"), (":path", ADS), (":authority", "xds")];
        fields.extend([("content-type", "application/grpc"), ("te", "trailers")]);
        fields.extend_from_slice(extra);
        self.headers(id, flags, &fields);
    }

    /// HEADERS with these fields, each a literal without indexing (RFC 7541, 6.2.2).
    pub fn headers(&mut self, id: u32, flags: u8, fields: &[(&str, &str)]) {
        self.send(HEADERS, flags | END_HEADERS, id, &block(fields));
    }

    /// After a stream error the connection goes on: a request on `id` is answered.
    pub fn still_serves(&mut self, id: u32) {
        self.request(id, END_STREAM, &[]);
        let f = self.expect(HEADERS, id);
        assert_eq!(f.payload.first(), Some(&0x88), ":status 200 (static table entry 8)");
    }
}

pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}
