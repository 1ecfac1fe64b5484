//! Frames as they arrive (RFC 9113, 6): each checked, then applied to the connection
//! and its streams.

use crate::request::HeadCheck;

use super::*;

impl<H: Handler> ConnState<H> {
    /// Parses what was read; returns how much of `data` made whole frames.
    pub(crate) fn process(&mut self, data: &[u8]) -> Result<usize, ConnError> {
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
                    self.ctx.limit_hit("header_block_bytes");
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
                self.ctx.limit_hit("malformed_requests");
                self.refuse(id, PROTOCOL_ERROR);
                return Ok(());
            }
        };
        if self.streams.len() >= self.settings.max_streams as usize {
            self.ctx.limit_hit("streams_per_connection");
            self.refuse(id, REFUSED_STREAM);
            return Ok(());
        }
        let refused = match head.path.as_deref().and_then(H::route) {
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
        let handler = H::open(&self.ctx, method);
        self.streams.push(Slot::new(id, handler, self.peer_initial_window, head.content_length));
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
            slot.handler.on_requests_end(&self.ctx, &mut out);
        }
        self.apply(i, &mut out);
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
            let before = slot.inbuf.buffered();
            read_messages(slot, data, &self.ctx, &mut out);
            self.buffered = self.buffered + slot.inbuf.buffered() - before;
        }
        if self.buffered > MAX_BUFFERED {
            self.ctx.limit_hit("buffered_request_bytes");
            return Err(fail(ENHANCE_YOUR_CALM, "too much of unfinished requests buffered"));
        }
        self.apply(i, &mut out);
        if let Some(n) = update {
            self.window_update(id, n);
        }
        if end_stream {
            self.end_requests(i);
        }
        Ok(())
    }
}
