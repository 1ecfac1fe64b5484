//! What a request's header block must be (RFC 9113, 8.2 and 8.3), checked field by field
//! as HPACK decodes it, pure. A block that breaks a rule is a malformed request: the
//! stream is reset with PROTOCOL_ERROR (8.1.1), the connection goes on.

/// A malformed request: which rule it broke.
pub type Malformed = &'static str;

/// The fields Filterplane reads off a well-formed request.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub post: bool,
    /// `:path`, as sent.
    pub path: Option<Vec<u8>>,
    /// `grpc-encoding` other than `identity`.
    pub compressed: bool,
    /// `content-length`, when sent: the DATA that follows must add up to it (8.1.1).
    pub content_length: Option<u64>,
}

/// Reads one header block (a request's, or its trailers'), one field at a time.
#[derive(Debug, Default)]
pub struct HeadCheck {
    trailers: bool,
    head: RequestHead,
    /// A regular field was seen: no pseudo-header may follow (8.3).
    regular_seen: bool,
    /// `:method`, `:scheme`, `:path`, `:authority`, each at most once.
    pseudo_seen: [bool; 4],
    error: Option<Malformed>,
}

impl HeadCheck {
    pub fn request() -> Self {
        Self::default()
    }

    /// Trailers: no pseudo-header at all (8.1).
    pub fn trailers() -> Self {
        Self { trailers: true, ..Self::default() }
    }

    /// One field, in the order of the block. The first rule broken is kept.
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.error.is_none() {
            if let Err(why) = self.check(name, value) {
                self.error = Some(why);
            }
        }
    }

    fn check(&mut self, name: &[u8], value: &[u8]) -> Result<(), Malformed> {
        // 8.2.1: a name is lower case, without controls, spaces or non-ASCII (a leading
        // colon only for pseudo-headers); a value holds no NUL, CR or LF and no
        // whitespace at either end.
        let (pseudo, bare) = match name.strip_prefix(b":") {
            Some(rest) => (true, rest),
            None => (false, name),
        };
        if bare.is_empty() || bare.iter().any(|&b| b <= 0x20 || b.is_ascii_uppercase() || b >= 0x7f || b == b':') {
            return Err(if bare.iter().any(u8::is_ascii_uppercase) {
                "a field name in upper case"
            } else {
                "a field name with a character RFC 9113 does not allow"
            });
        }
        if value.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n')
            || value.first().is_some_and(|&b| b == b' ' || b == b'\t')
            || value.last().is_some_and(|&b| b == b' ' || b == b'\t')
        {
            return Err("a field value with NUL, CR, LF or whitespace at an end");
        }
        if pseudo {
            if self.trailers {
                return Err("a pseudo-header in trailers");
            }
            if self.regular_seen {
                return Err("a pseudo-header after a regular field");
            }
            let slot = match bare {
                b"method" => 0,
                b"scheme" => 1,
                b"path" => 2,
                b"authority" => 3,
                _ => return Err("a pseudo-header a request cannot have"),
            };
            if std::mem::replace(&mut self.pseudo_seen[slot], true) {
                return Err("a pseudo-header repeated");
            }
            match slot {
                0 => self.head.post = value == b"POST",
                2 if value.is_empty() => return Err("an empty :path"),
                2 => self.head.path = Some(value.to_vec()),
                _ => {}
            }
            return Ok(());
        }
        self.regular_seen = true;
        match name {
            // 8.2.2: connection-specific fields have no place in HTTP/2.
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade" => {
                Err("a connection-specific field")
            }
            b"te" if value != b"trailers" => Err("te other than \"trailers\""),
            b"content-length" => {
                let n = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or("a content-length that is not a number")?;
                if self.head.content_length.is_some_and(|before| before != n) {
                    return Err("two different content-lengths");
                }
                self.head.content_length = Some(n);
                Ok(())
            }
            b"grpc-encoding" => {
                self.head.compressed = value != b"identity";
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The block ended: a request must have `:method`, `:scheme` and `:path` (8.3.1).
    pub fn finish(self) -> Result<RequestHead, Malformed> {
        if let Some(why) = self.error {
            return Err(why);
        }
        if !self.trailers && !self.pseudo_seen[..3].iter().all(|&s| s) {
            return Err("a request without :method, :scheme or :path");
        }
        Ok(self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(fields: &[(&str, &str)]) -> Result<RequestHead, Malformed> {
        let mut c = HeadCheck::request();
        for (n, v) in fields {
            c.field(n.as_bytes(), v.as_bytes());
        }
        c.finish()
    }

    const GOOD: [(&str, &str); 5] = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"),
        (":authority", "xds"),
        ("content-type", "application/grpc"),
    ];

    fn with(extra: (&'static str, &'static str)) -> Vec<(&'static str, &'static str)> {
        let mut f = GOOD.to_vec();
        f.push(extra);
        f
    }

    #[test]
    fn a_grpc_request_is_well_formed() {
        let head = check(&with(("te", "trailers"))).unwrap();
        assert!(head.post && !head.compressed);
        assert_eq!(head.path.as_deref(), Some(GOOD[2].1.as_bytes()));
    }

    #[test]
    fn each_rule_of_rfc_9113_8_2_and_8_3_refuses_its_case() {
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (with(("X-Upper", "1")), "upper case"),
            (with(("connection", "keep-alive")), "connection-specific"),
            (with(("transfer-encoding", "chunked")), "connection-specific"),
            (with(("te", "gzip")), "te other"),
            (with(("content-length", "x1")), "not a number"),
            (vec![GOOD[0], (":status", "200"), GOOD[1], GOOD[2]], "cannot have"),
            (vec![GOOD[0], GOOD[1], GOOD[2], (":path", "/again")], "repeated"),
            (with(("bad", "a\nb")), "field value"),
            (GOOD[1..].to_vec(), "without :method"),
            (vec![GOOD[0], GOOD[1], (":path", "")], "empty :path"),
            (vec![GOOD[0], ("x", "y"), GOOD[1], GOOD[2]], "after a regular field"),
        ];
        for (fields, expect) in cases {
            let e = check(&fields).unwrap_err();
            assert!(e.contains(expect), "{fields:?}: {e}");
        }
    }

    #[test]
    fn trailers_carry_no_pseudo_headers() {
        let mut c = HeadCheck::trailers();
        c.field(b"grpc-status", b"0");
        assert!(c.finish().is_ok());
        let mut c = HeadCheck::trailers();
        c.field(b":method", b"POST");
        assert_eq!(c.finish().unwrap_err(), "a pseudo-header in trailers");
    }
}
