//! The HTTP/1.1 request head every connection starts with, and the WebSocket Upgrade answer.
//!
//! One parser serves both the WebSocket endpoint (`GET /app/{key}` with `Upgrade: websocket`) and
//! the Pusher HTTP API on the same port.

/// Largest request head accepted (request line plus headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 48;

/// The parts of a request head the server acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string, still percent-encoded (it is signed that way).
    pub path: String,
    /// Decoded query parameters in request order.
    pub query: Vec<(String, String)>,
    /// `Upgrade: websocket` and `Connection: upgrade` both present.
    pub wants_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub content_length: Option<usize>,
    /// `Transfer-Encoding: chunked`, the only transfer coding accepted (`ws::chunked` decodes it).
    pub chunked: bool,
    /// HTTP/1.0, or `Connection: close`.
    pub close: bool,
    pub origin: Option<String>,
    /// `Expect: 100-continue` (curl sends it for bodies over 1 KiB, Guzzle over 1 MB).
    pub expect_continue: bool,
    /// The `Authorization` header (the debug console takes `Bearer <token>`).
    pub authorization: Option<String>,
    /// `X-Forwarded-For`, several headers joined with `, ` in order (RFC 9110 §5.3); believed
    /// only from a trusted proxy (`proxy::Trusted::client`).
    pub forwarded_for: Option<String>,
    /// `Sec-WebSocket-Extensions`, several headers joined with `, ` in order (RFC 6455 §9.1);
    /// `ws::deflate::negotiate` reads it.
    pub extensions: Option<String>,
}

impl Request {
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A request head refused. Each is answered (`status`) and the connection closed: after a head
/// whose framing is in doubt, nothing that follows on the connection can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed HTTP request")]
    Malformed,
    #[error("request head larger than 8 KiB")]
    TooLarge,
    #[error("invalid Content-Length")]
    BadLength,
    #[error("more than one Content-Length")]
    DuplicateLength,
    #[error("more than one Transfer-Encoding")]
    DuplicateEncoding,
    #[error("Transfer-Encoding other than chunked")]
    UnsupportedEncoding,
    #[error("both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    EncodingInHttp10,
    #[error("line in the request head not ended by CRLF")]
    BareLineEnding,
}

impl HeadError {
    /// 431 for an oversized head (RFC 6585 §5), 400 for the rest.
    pub fn status(self) -> u16 {
        if self == HeadError::TooLarge {
            431
        } else {
            400
        }
    }
}

/// `Content-Length = 1*DIGIT` (RFC 9110 §8.6): no sign, no spaces, no list, and it must fit.
/// (`str::parse` alone would take `+5`.)
fn content_length(value: &str) -> Result<usize, HeadError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HeadError::BadLength);
    }
    value.parse().map_err(|_| HeadError::BadLength)
}

/// httparse accepts a bare LF as a line ending (RFC 9112 §2.2 allows it); a proxy in front of us
/// may not, and would then see other header fields than we do (request smuggling). So every
/// line of the head must end with CRLF, and a CR may not appear elsewhere.
fn has_bare_line_ending(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| match b {
        b'\n' => i == 0 || head[i - 1] != b'\r',
        b'\r' => head.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// RFC 6455 §4.2.1: `Sec-WebSocket-Key` is a base64-encoded 16-byte nonce.
pub fn valid_ws_key(key: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

/// Parses a request head from the front of `buf`: `Ok(None)` means read more; `Ok(Some((req,
/// n)))` means the head took `n` bytes (any body follows).
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    if n > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    if has_bare_line_ending(&buf[..n]) {
        return Err(HeadError::BareLineEnding);
    }
    // httparse knows only HTTP/1.0 and HTTP/1.1 (anything else, HTTP/2.0 included, is a version
    // error above); obs-fold lines are refused by it in requests (a header name cannot start
    // with whitespace), as RFC 9112 §5.2 asks.
    let target = req.path.ok_or(HeadError::Malformed)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: req.method.ok_or(HeadError::Malformed)?.to_owned(),
        path: path.to_owned(),
        query: form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect(),
        close: req.version == Some(0),
        ..Request::default()
    };
    let (mut upgrade, mut conn_upgrade) = (false, false);
    let mut encoding = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HeadError::Malformed)?
            .trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("upgrade") {
                    conn_upgrade = true;
                } else if token.eq_ignore_ascii_case("close") {
                    out.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    out.close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            // Two Content-Length fields are refused even when equal: RFC 9110 §8.6 lets a
            // recipient merge identical values, but a proxy in front of us may take either one
            // or reject, and any disagreement about where a body ends is request smuggling.
            // No client we serve sends two.
            if out.content_length.is_some() {
                return Err(HeadError::DuplicateLength);
            }
            out.content_length = Some(content_length(value)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if encoding {
                return Err(HeadError::DuplicateEncoding);
            }
            encoding = true;
            // RFC 9112 §6.1: chunked must be the final coding; we decode no other coding, so
            // it must be the only one (`gzip, chunked`, `chunked, gzip`, `identity`: refused).
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(HeadError::UnsupportedEncoding);
            }
            out.chunked = true;
        } else if name.eq_ignore_ascii_case("expect") {
            out.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("authorization") {
            out.authorization = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            match &mut out.extensions {
                Some(v) => {
                    v.push_str(", ");
                    v.push_str(value);
                }
                None => out.extensions = Some(value.to_owned()),
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            match &mut out.forwarded_for {
                Some(v) => {
                    v.push_str(", ");
                    v.push_str(value);
                }
                None => out.forwarded_for = Some(value.to_owned()),
            }
        }
    }
    if encoding && out.content_length.is_some() {
        // RFC 9112 §6.3: a message with both may be an attempt at request smuggling.
        return Err(HeadError::LengthAndEncoding);
    }
    if encoding && req.version == Some(0) {
        // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        return Err(HeadError::EncodingInHttp10);
    }
    out.wants_upgrade = upgrade && conn_upgrade;
    Ok(Some((out, n)))
}

/// The `101 Switching Protocols` answer, with the accepted extension (`ws::deflate::negotiate`)
/// if any. The extension answered is always the same (no context kept on either side), so every
/// compressing subscriber can be sent the same compressed bytes.
pub fn switching_protocols(ws_key: &str, extension: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let ext = match extension {
        Some(e) => format!("Sec-WebSocket-Extensions: {e}\r\n"),
        None => String::new(),
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
    )
    .into_bytes()
}

/// An HTTP answer before it is written. Static bodies (the console's assets) are borrowed from
/// the binary, never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: std::borrow::Cow<'static, [u8]>,
    /// More header lines (the console's `Cache-Control`, `X-Frame-Options`, …).
    pub headers: &'static [(&'static str, &'static str)],
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into_bytes().into(),
            headers: &[],
        }
    }

    /// The complete HTTP/1.1 response: head and body.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut head = head(self.status, self.content_type, self.body.len(), close);
        // Before the blank line that ends the head.
        head.truncate(head.len() - 2);
        for (name, value) in self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn head(status: u16, content_type: &str, len: usize, close: bool) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let connection = if close { "close" } else { "keep-alive" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: {connection}\r\n\r\n"
    )
}

/// A complete HTTP/1.1 response with a JSON body.
pub fn json_response(status: u16, body: &str, close: bool) -> Vec<u8> {
    let mut out = head(status, "application/json", body.len(), close).into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_request() {
        let raw = b"GET /app/key?protocol=7&client=js&version=8.4.0&flash=false HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let (req, n) = parse(raw).unwrap().unwrap();
        assert_eq!(n, raw.len());
        assert_eq!(req.path, "/app/key");
        assert_eq!(req.query_param("protocol"), Some("7"));
        assert!(req.wants_upgrade);
        let resp =
            String::from_utf8(switching_protocols(req.ws_key.as_deref().unwrap(), None)).unwrap();
        // RFC 6455 §1.3's worked example.
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn extension_headers_are_joined_and_answered() {
        let raw = b"GET /app/k HTTP/1.1\r\nSec-WebSocket-Extensions: x-foo\r\nHost: x\r\nsec-websocket-extensions: permessage-deflate; client_max_window_bits\r\n\r\n";
        let (req, _) = parse(raw).unwrap().unwrap();
        assert_eq!(
            req.extensions.as_deref(),
            Some("x-foo, permessage-deflate; client_max_window_bits")
        );
        let ok = String::from_utf8(switching_protocols(
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("permessage-deflate"),
        ))
        .unwrap();
        assert!(
            ok.ends_with("Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
            "{ok}"
        );
        let none =
            String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(!none.contains("Extensions"));
    }

    #[test]
    fn forwarded_for_headers_are_joined_in_order() {
        let raw = b"GET /app/k HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nHost: x\r\nx-forwarded-for: 3.3.3.3\r\n\r\n";
        let (req, _) = parse(raw).unwrap().unwrap();
        assert_eq!(
            req.forwarded_for.as_deref(),
            Some("1.1.1.1, 2.2.2.2, 3.3.3.3")
        );
        let (req, _) = parse(b"GET / HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(req.forwarded_for, None);
    }

    #[test]
    fn partial_and_limits() {
        assert_eq!(parse(b"GET /up HTTP/1.1\r\nHost"), Ok(None));
        let big = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 1));
        assert_eq!(parse(big.as_bytes()), Err(HeadError::TooLarge));
        assert_eq!(
            parse(b"\x00\x01 nonsense\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        let bad_len = b"POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(parse(bad_len), Err(HeadError::BadLength));
    }

    /// Each shape a proxy could read differently from us (RFC 9112 §6.3, §2.2, §5.2) is refused.
    #[test]
    fn request_smuggling_shapes_are_refused() {
        use HeadError::*;
        let cases: &[(&str, HeadError)] = &[
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked",
                LengthAndEncoding,
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 5",
                LengthAndEncoding,
            ),
            ("Transfer-Encoding: gzip, chunked", UnsupportedEncoding),
            ("Transfer-Encoding: chunked, gzip", UnsupportedEncoding),
            ("Transfer-Encoding: identity", UnsupportedEncoding),
            ("Transfer-Encoding: xchunked", UnsupportedEncoding),
            ("Transfer-Encoding: chunked;q=1", UnsupportedEncoding),
            ("Transfer-Encoding:", UnsupportedEncoding),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                DuplicateEncoding,
            ),
            ("Content-Length: 5\r\nContent-Length: 5", DuplicateLength),
            ("Content-Length: 5\r\nContent-Length: 6", DuplicateLength),
            ("Content-Length: +5", BadLength),
            ("Content-Length: -1", BadLength),
            ("Content-Length: 5 5", BadLength),
            ("Content-Length: 5, 5", BadLength),
            ("Content-Length: 0x5", BadLength),
            ("Content-Length: five", BadLength),
            ("Content-Length:", BadLength),
            ("Content-Length: 99999999999999999999999", BadLength),
        ];
        for (headers, want) in cases {
            let raw = format!("POST /apps/1/events HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n");
            assert_eq!(parse(raw.as_bytes()), Err(*want), "{headers:?}");
            assert_eq!(want.status(), 400);
        }
        // Exactly `chunked`, in any case, with surrounding whitespace, is accepted.
        let raw = b"POST /x HTTP/1.1\r\nTransfer-Encoding:  ChUnKeD \r\n\r\n";
        let (req, _) = parse(raw).unwrap().unwrap();
        assert!(req.chunked && req.content_length.is_none());
        let raw = b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(raw), Err(EncodingInHttp10));
        // Bare LF anywhere, or a CR alone, is refused (httparse itself would accept the LFs).
        for raw in [
            &b"POST /x HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: x\r\n\n",
            b"POST /x HTTP/1.1\n\n",
            b"\nPOST /x HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw),
                Err(BareLineEnding),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(parse(b"POST /x HTTP/1.1\r\nX-A: a\rb\r\n\r\n").is_err());
        // obs-fold, whitespace before the colon, other versions: httparse refuses them.
        for raw in [
            &b"POST /x HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nX-A: a\r\n\tb\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
            b"POST /x HTTP/2.0\r\nHost: x\r\n\r\n",
            b"POST /x HTTP/1.2\r\nHost: x\r\n\r\n",
            b"POST /x HTTP/1.10\r\nHost: x\r\n\r\n",
            b"POST /x HTTP/1\r\nHost: x\r\n\r\n",
            b"POST /x FOO/1.1\r\nHost: x\r\n\r\n",
            b"POST /x\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(
                parse(raw),
                Err(Malformed),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_eq!(HeadError::TooLarge.status(), 431);
    }

    #[test]
    fn websocket_keys_are_16_bytes_of_base64() {
        assert!(valid_ws_key("dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            "",
            "x",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25j",
            "dGhlIHNhbXBsZSBub25jZSE=",
            "!!!!!!!!!!!!!!!!!!!!!!==",
        ] {
            assert!(!valid_ws_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn api_request_query_is_decoded() {
        let raw = b"POST /apps/1/events?auth_key=k&auth_signature=a%2Bb HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        let (req, n) = parse(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], b"{}");
        assert_eq!(req.query_param("auth_signature"), Some("a+b"));
        assert_eq!(req.content_length, Some(2));
        assert!(req.close && !req.wants_upgrade);
        assert_eq!(req.authorization, None);
    }

    #[test]
    fn responses_carry_their_content_type() {
        let raw = b"GET /console/api/stats HTTP/1.1\r\nAuthorization: Bearer t0ken\r\n\r\n";
        let (req, _) = parse(raw).unwrap().unwrap();
        assert_eq!(req.authorization.as_deref(), Some("Bearer t0ken"));
        let page = Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: (&b"<p>hi</p>"[..]).into(),
            headers: &[],
        };
        assert_eq!(
            page.to_bytes(false),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 9\r\nConnection: keep-alive\r\n\r\n<p>hi</p>"
        );
        assert_eq!(
            Response::json(404, "{}".into()).to_bytes(true),
            json_response(404, "{}", true)
        );
        let page = Response {
            headers: &[("X-Frame-Options", "DENY"), ("Retry-After", "60")],
            ..page
        };
        assert_eq!(
            page.to_bytes(true),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 9\r\nConnection: close\r\nX-Frame-Options: DENY\r\nRetry-After: 60\r\n\r\n<p>hi</p>"
        );
    }
}
