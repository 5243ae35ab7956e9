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
    /// `Transfer-Encoding: chunked`; not supported for API bodies (411).
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
}

impl Request {
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed HTTP request")]
    Malformed,
    #[error("request head larger than 8 KiB")]
    TooLarge,
    #[error("invalid Content-Length")]
    BadLength,
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
            out.content_length = Some(value.parse().map_err(|_| HeadError::BadLength)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("expect") {
            out.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("authorization") {
            out.authorization = Some(value.to_owned());
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
    out.wants_upgrade = upgrade && conn_upgrade;
    Ok(Some((out, n)))
}

/// The `101 Switching Protocols` answer. No extensions are offered back: permessage-deflate is
/// never negotiated, so every subscriber can be sent the same frame bytes.
pub fn switching_protocols(ws_key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
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
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body: body.into_bytes().into(),
        }
    }

    /// The complete HTTP/1.1 response: head and body.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut out = head(self.status, self.content_type, self.body.len(), close).into_bytes();
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
        let resp = String::from_utf8(switching_protocols(req.ws_key.as_deref().unwrap())).unwrap();
        // RFC 6455 §1.3's worked example.
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
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
        };
        assert_eq!(
            page.to_bytes(false),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 9\r\nConnection: keep-alive\r\n\r\n<p>hi</p>"
        );
        assert_eq!(
            Response::json(404, "{}".into()).to_bytes(true),
            json_response(404, "{}", true)
        );
    }
}
