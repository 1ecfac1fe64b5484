//! The xDS port's HTTP/2, rule by rule (RFC 9113), with a scripted peer: raw frames in,
//! the frames the server answers with out. Each test sends what one rule forbids and
//! checks the error the RFC names (a stream reset, or GOAWAY for the connection); after a
//! stream error, the same connection still serves a well-formed request.

#[allow(dead_code)]
#[path = "conformance/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "conformance/raw_h2.rs"]
mod raw_h2;

use harness::Plane;
use raw_h2::*;

/// Runs `script` against a fresh server on a blocking thread.
async fn against_server(script: impl FnOnce(Peer) + Send + 'static) {
    let plane = Plane::start(&[("a", "1")]).await;
    let addr = plane.xds;
    tokio::task::spawn_blocking(move || script(Peer::connect(addr))).await.unwrap();
    assert!(plane.healthy());
}

/// Each malformed request (RFC 9113, 8.1.1) is reset with PROTOCOL_ERROR on its own, and
/// the next request on the connection is served.
async fn malformed(fields: &'static [(&'static str, &'static str)]) {
    against_server(|mut p| {
        p.headers(1, 0, fields);
        p.expect_reset(1, PROTOCOL_ERROR);
        p.still_serves(3);
    })
    .await;
}

const METHOD: (&str, &str) = (":method", "POST");
const SCHEME: (&str, &str) = (":scheme", "http");
const PATH: (&str, &str) = (":path", ADS);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_2_1_an_upper_case_field_name_is_malformed() {
    malformed(&[METHOD, SCHEME, PATH, ("Content-Type", "application/grpc")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_2_2_a_connection_specific_field_is_malformed() {
    malformed(&[METHOD, SCHEME, PATH, ("connection", "keep-alive")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_2_2_te_other_than_trailers_is_malformed() {
    malformed(&[METHOD, SCHEME, PATH, ("te", "trailers, deflate")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_1_a_request_without_path_is_malformed() {
    malformed(&[METHOD, SCHEME, ("content-type", "application/grpc")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_a_repeated_pseudo_header_is_malformed() {
    malformed(&[METHOD, METHOD, SCHEME, PATH]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_a_pseudo_header_after_a_regular_field_is_malformed() {
    malformed(&[METHOD, SCHEME, ("content-type", "application/grpc"), PATH]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_3_a_response_pseudo_header_in_a_request_is_malformed() {
    malformed(&[(":status", "200"), METHOD, SCHEME, PATH]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_1_a_pseudo_header_in_trailers_is_malformed() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.headers(1, END_STREAM, &[(":method", "POST")]);
        p.expect_reset(1, PROTOCOL_ERROR);
        p.still_serves(3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_8_1_1_data_that_disagrees_with_content_length_is_malformed() {
    against_server(|mut p| {
        // Less than announced, then the end.
        p.request(1, 0, &[("content-length", "10")]);
        p.send(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        p.expect_reset(1, PROTOCOL_ERROR);
        // More than announced.
        p.request(3, 0, &[("content-length", "2")]);
        p.send(DATA, 0, 3, &[0, 0, 0, 0, 0]);
        p.expect_reset(3, PROTOCOL_ERROR);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_rst_stream_on_an_idle_stream_is_a_connection_error() {
    against_server(|mut p| {
        p.send(RST_STREAM, 0, 1, &8u32.to_be_bytes());
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_window_update_on_an_idle_stream_is_a_connection_error() {
    against_server(|mut p| {
        p.send(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes());
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_data_on_an_idle_stream_is_a_connection_error() {
    against_server(|mut p| {
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_frames_after_the_clients_end_stream_are_stream_closed() {
    against_server(|mut p| {
        // Half-closed (remote): the client ended its side; the ADS stream stays open.
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(DATA, END_STREAM, 1, &[]);
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_reset(1, STREAM_CLOSED);
        // HEADERS the same way.
        p.request(3, 0, &[]);
        p.expect(HEADERS, 3);
        p.send(DATA, END_STREAM, 3, &[]);
        p.headers(3, END_STREAM, &[("x", "y")]);
        p.expect_reset(3, STREAM_CLOSED);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_frames_after_the_clients_rst_stream_are_stream_closed() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(RST_STREAM, 0, 1, &8u32.to_be_bytes());
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_reset(1, STREAM_CLOSED);
        p.request(3, 0, &[]);
        p.expect(HEADERS, 3);
        p.send(RST_STREAM, 0, 3, &8u32.to_be_bytes());
        p.request(3, 0, &[]);
        p.expect_reset(3, STREAM_CLOSED);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_1_1_a_stream_id_lower_than_the_last_is_a_connection_error() {
    against_server(|mut p| {
        p.request(5, 0, &[]);
        p.expect(HEADERS, 5);
        p.request(3, 0, &[]);
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_3_1_a_stream_depending_on_itself_is_a_stream_error() {
    against_server(|mut p| {
        // HEADERS with a priority part naming its own stream.
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.push(16);
        payload.extend(block(&[METHOD, SCHEME, PATH]));
        p.send(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, &payload);
        p.expect_reset(1, PROTOCOL_ERROR);
        // A PRIORITY frame doing the same to an open stream.
        p.request(3, 0, &[]);
        p.expect(HEADERS, 3);
        let mut prio = 3u32.to_be_bytes().to_vec();
        prio.push(16);
        p.send(PRIORITY, 0, 3, &prio);
        p.expect_reset(3, PROTOCOL_ERROR);
        p.still_serves(5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_in_flight_when_this_side_ended_the_stream_is_dropped_quietly() {
    against_server(|mut p| {
        // A method that does not exist: trailers only, then this side resets the stream.
        p.headers(1, 0, &[METHOD, SCHEME, (":path", "/no.Such/Method")]);
        p.expect_reset(1, 0);
        // The client did not know yet: its DATA is not an error.
        p.send(DATA, 0, 1, &[0; 5]);
        p.still_serves(3);
    })
    .await;
}

/// The admin port answers HTTP/2 too: its DNS-rebinding check reads `:authority` as it
/// reads `Host` (before, `:authority: evil.example` got 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_checks_the_authority_of_http2_requests() {
    let plane = Plane::start(&[("a", "1")]).await;
    let admin = plane.admin;
    let statuses = tokio::task::spawn_blocking(move || {
        let mut p = Peer::connect(admin);
        let mut decoder = loona_hpack::Decoder::new();
        let mut status = |p: &mut Peer, id: u32, authority: &'static str| {
            let fields =
                [(":method", "GET"), (":scheme", "http"), (":path", "/api/v1/config"), (":authority", authority)];
            p.headers(id, END_STREAM, &fields);
            let f = p.expect(HEADERS, id);
            let fields = decoder.decode(&f.payload).unwrap();
            String::from_utf8(fields.into_iter().find(|(n, _)| n == b":status").unwrap().1).unwrap()
        };
        (status(&mut p, 1, "evil.example"), status(&mut p, 3, "127.0.0.1"))
    })
    .await
    .unwrap();
    assert_eq!(statuses, ("421".to_owned(), "200".to_owned()));
}

// The rules b5fbd7f already kept, written down as tests too (h2spec's other sections).

/// A connection error with `code`, for a frame sent after a good start.
async fn connection_error(ty: u8, flags: u8, id: u32, payload: &'static [u8], code: u32) {
    against_server(move |mut p| {
        p.send(ty, flags, id, payload);
        p.expect_goaway(code);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_3_4_a_connection_without_the_preface_is_refused() {
    let plane = Plane::start(&[("a", "1")]).await;
    let addr = plane.xds;
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    })
    .await
    .unwrap();
    // Its SETTINGS, then GOAWAY with PROTOCOL_ERROR, then the connection is closed.
    let (mut pos, mut goaway) = (0, None);
    while pos + 9 <= answer.len() {
        let len = (usize::from(answer[pos]) << 16) | (usize::from(answer[pos + 1]) << 8) | usize::from(answer[pos + 2]);
        if answer[pos + 3] == GOAWAY {
            let p = &answer[pos + 9..pos + 9 + len];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        pos += 9 + len;
    }
    assert_eq!(goaway, Some(PROTOCOL_ERROR), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_4_2_a_frame_over_the_max_frame_size_is_a_connection_error() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.send(DATA, 0, 1, &[0; 16_385]);
        p.expect_goaway(FRAME_SIZE_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_4_3_a_header_block_that_does_not_decode_is_a_compression_error() {
    // An indexed field past the end of both tables.
    connection_error(HEADERS, END_HEADERS | END_STREAM, 1, &[0xff, 0xff, 0x7f], COMPRESSION_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_1_data_on_stream_zero_is_a_connection_error() {
    connection_error(DATA, 0, 0, &[0; 4], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_2_headers_with_more_padding_than_payload_is_a_connection_error() {
    connection_error(HEADERS, END_HEADERS | PADDED, 1, &[200, 0x82], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_4_rst_stream_on_stream_zero_is_a_connection_error() {
    connection_error(RST_STREAM, 0, 0, &[0, 0, 0, 8], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_5_settings_on_a_stream_is_a_connection_error() {
    connection_error(SETTINGS, 0, 1, &[], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_5_settings_of_a_length_not_a_multiple_of_six_is_a_frame_size_error() {
    connection_error(SETTINGS, 0, 0, &[0, 3, 0, 0, 0], FRAME_SIZE_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_5_a_settings_ack_with_a_payload_is_a_frame_size_error() {
    connection_error(SETTINGS, ACK, 0, &[0, 3, 0, 0, 0, 1], FRAME_SIZE_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_5_2_bad_setting_values_are_connection_errors() {
    // SETTINGS_ENABLE_PUSH 2; SETTINGS_INITIAL_WINDOW_SIZE 2^31; SETTINGS_MAX_FRAME_SIZE 2^24.
    connection_error(SETTINGS, 0, 0, &[0, 2, 0, 0, 0, 2], PROTOCOL_ERROR).await;
    connection_error(SETTINGS, 0, 0, &[0, 4, 0x80, 0, 0, 0], FLOW_CONTROL_ERROR).await;
    connection_error(SETTINGS, 0, 0, &[0, 5, 1, 0, 0, 0], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_5_3_settings_are_acknowledged() {
    against_server(|mut p| {
        p.send(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 10]);
        let ack = loop {
            let f = p.expect(SETTINGS, 0);
            if f.flags & ACK != 0 {
                break f;
            }
        };
        assert!(ack.payload.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_6_push_promise_from_a_client_is_a_connection_error() {
    connection_error(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_7_a_ping_is_answered_with_its_payload() {
    against_server(|mut p| {
        p.send(PING, 0, 0, b"filtrpln");
        let pong = loop {
            let f = p.expect(PING, 0);
            if f.flags & ACK != 0 {
                break f;
            }
        };
        assert_eq!(pong.payload, b"filtrpln");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_7_a_ping_on_a_stream_or_of_another_length_is_a_connection_error() {
    connection_error(PING, 0, 0, &[0; 7], FRAME_SIZE_ERROR).await;
    connection_error(PING, 0, 1, &[0; 8], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_8_the_clients_goaway_ends_the_connection_in_order() {
    against_server(|mut p| {
        p.send(GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]);
        p.expect_goaway(0);
        assert!(p.next().is_none(), "closed");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_9_a_window_update_of_zero_is_an_error() {
    // On the connection: a connection error.
    connection_error(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 0], PROTOCOL_ERROR).await;
    // On a stream: a stream error.
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(WINDOW_UPDATE, 0, 1, &[0, 0, 0, 0]);
        p.expect_reset(1, PROTOCOL_ERROR);
        p.still_serves(3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_9_1_a_window_over_two_to_the_31_is_a_flow_control_error() {
    connection_error(WINDOW_UPDATE, 0, 0, &[0x7f, 0xff, 0xff, 0xff], FLOW_CONTROL_ERROR).await;
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(WINDOW_UPDATE, 0, 1, &[0x7f, 0xff, 0xff, 0xff]);
        p.expect_reset(1, FLOW_CONTROL_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_10_an_interrupted_header_block_is_a_connection_error() {
    against_server(|mut p| {
        // HEADERS without END_HEADERS, then something other than its CONTINUATION.
        p.send(HEADERS, 0, 1, &block(&[METHOD]));
        p.send(DATA, 0, 1, &[0; 5]);
        p.expect_goaway(PROTOCOL_ERROR);
    })
    .await;
    connection_error(CONTINUATION, END_HEADERS, 1, &[0x82], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_10_a_header_block_in_continuations_is_read_whole() {
    against_server(|mut p| {
        let whole = block(&[METHOD, SCHEME, PATH, ("te", "trailers")]);
        let (a, b) = whole.split_at(10);
        p.send(HEADERS, END_STREAM, 1, a);
        p.send(CONTINUATION, END_HEADERS, 1, b);
        let f = p.expect(HEADERS, 1);
        assert_eq!(f.payload.first(), Some(&0x88), ":status 200");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_3_a_priority_frame_of_another_length_is_a_stream_error() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(PRIORITY, 0, 1, &[0, 0, 0, 3]);
        p.expect_reset(1, FRAME_SIZE_ERROR);
        p.still_serves(3);
    })
    .await;
    connection_error(PRIORITY, 0, 0, &[0, 0, 0, 3, 16], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_4_rst_stream_of_another_length_is_a_frame_size_error() {
    against_server(|mut p| {
        p.request(1, 0, &[]);
        p.expect(HEADERS, 1);
        p.send(RST_STREAM, 0, 1, &[0, 0, 0, 8, 0]);
        p.expect_goaway(FRAME_SIZE_ERROR);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_6_8_goaway_on_a_stream_is_a_connection_error() {
    connection_error(GOAWAY, 0, 1, &[0, 0, 0, 0, 0, 0, 0, 0], PROTOCOL_ERROR).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9113_5_5_unknown_frame_types_and_settings_are_ignored() {
    against_server(|mut p| {
        p.send(0xee, 0xff, 0, b"whatever");
        p.send(SETTINGS, 0, 0, &[0x12, 0x34, 0, 0, 0, 1]);
        p.still_serves(1);
    })
    .await;
}
