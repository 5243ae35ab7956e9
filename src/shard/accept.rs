//! A socket's life before the Pusher session, in the accept task: the PROXY header (from trusted
//! load balancers), TLS detection and handshake, HTTP requests (the API, keep-alive, bodies,
//! `Expect: 100-continue`), and the WebSocket upgrade with its checks (path, app, protocol
//! version, origin, X-Forwarded-For, connection quota). The upgrade spawns the session task
//! (`conn::live`) and this task ends, so nothing of the request outlives it.
//!
//! Every step has a deadline (`handshake_timeout`) and a size bound; a request whose framing
//! cannot be trusted is answered and the connection closed, never guessed at.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use super::admission::Ticket;
use super::conn::live;
use super::{AppConnGuard, Shard};
use crate::protocol::{outbound, PusherError};
use crate::ws::chunked;
use crate::ws::codec;
use crate::ws::handshake::{self, Request};

/// Bytes read per `recv` while a request head or body is arriving.
const HEAD_READ: usize = 1024;
/// After a final response or a refusal: how long, and how many bytes, we keep reading (and
/// discarding) so our last bytes are not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// What the HTTP phase reads and writes: a plain TCP stream or a TLS stream over one.
trait Stream: AsyncRead + AsyncWrite + Unpin {}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for S {}

/// Serves one accepted TCP connection: HTTP API requests (keep-alive) until a WebSocket upgrade,
/// then hands the connection to a task of its own for the Pusher session.
///
/// This task (request heads, the API, checks, the 101, refusals, and for TLS the handshake) ends
/// at the upgrade, freeing everything it held; the session task, which lives as long as the
/// connection, carries none of it (measured: ~9 KiB per idle connection when the two were one
/// future, see BENCHMARKS.md).
///
/// The socket holds its place in the budget (`ticket`) from accept on; if the shard closes it to
/// make room for another address (`admission`), this task ends at its next turn, dropping the
/// stream and so closing the descriptor.
pub(super) async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr, ticket: Ticket) {
    let (watcher, slot) = (Rc::clone(&shard), ticket.slot());
    futures_lite::future::or(serve_admitted(shard, stream, peer, ticket), async move {
        super::admission::evicted(&watcher, slot).await
    })
    .await
}

async fn serve_admitted(shard: Rc<Shard>, mut stream: TcpStream, peer: SocketAddr, ticket: Ticket) {
    let _ = stream.set_nodelay(true);
    let hs_timeout = shard.shared.cfg.handshake_timeout;
    let _ = stream.set_read_timeout(Some(hs_timeout));
    // The address whose X-Forwarded-For is believed, if trusted: the peer, or the client a
    // trusted proxy's PROXY header names. Also what is counted per source address in the HTTP
    // phase (the console's failed logins).
    let mut hop = peer.ip();
    if shard.shared.cfg.proxy_protocol {
        match proxy_phase(&shard, &mut stream, peer, &ticket).await {
            Some(client) => hop = client,
            None => return,
        }
    }
    let tls = shard.tls.borrow().clone();
    if let Some(tls) = tls {
        // TLS and plain on one port: a TLS client speaks first with a handshake record.
        let mut first = [0u8; 1];
        let peeked =
            glommio::timer::timeout(hs_timeout, async { Ok(stream.peek(&mut first).await) }).await;
        match peeked {
            Ok(Ok(1)) if first[0] == crate::tls::HANDSHAKE_RECORD => {
                return serve_tls(shard, stream, tls, hop, ticket).await;
            }
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
    let Some(upgraded) = handshake(&shard, &mut stream, hop, &ticket).await else {
        return;
    };
    glommio::spawn_local(live(shard, stream, None, upgraded, ticket)).detach();
}

/// A connection that began with a TLS handshake: the same HTTP phase and upgrade, through
/// rustls; then the session, with the TLS state moved into the connection.
async fn serve_tls(
    shard: Rc<Shard>,
    stream: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    hop: IpAddr,
    ticket: Ticket,
) {
    let hs_timeout = shard.shared.cfg.handshake_timeout;
    let accept = futures_rustls::TlsAcceptor::from(cfg).accept(stream);
    let mut tls = match glommio::timer::timeout(hs_timeout, async { Ok(accept.await) }).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(shard = shard.id, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let Some(upgraded) = handshake(&shard, &mut tls, hop, &ticket).await else {
        return;
    };
    let (stream, session) = tls.into_inner();
    glommio::spawn_local(live(
        shard,
        stream,
        Some(Box::new(session)),
        upgraded,
        ticket,
    ))
    .detach();
}

/// PROXY protocol (on when `proxy_protocol` is set): a trusted load balancer's connection must
/// start with a v1 or v2 header, which is consumed and names the client (`Some`: the address to
/// count it against and whose X-Forwarded-For to believe); anyone else's must not, since a
/// client could otherwise claim any address. `None`: refused and answered; the caller ends.
async fn proxy_phase(
    shard: &Shard,
    stream: &mut TcpStream,
    peer: SocketAddr,
    ticket: &Ticket,
) -> Option<IpAddr> {
    let cfg = &shard.shared.cfg;
    let trusted = cfg.trusted_proxies.contains(peer.ip());
    let header = glommio::timer::timeout(cfg.handshake_timeout, async {
        Ok(read_proxy_header(stream, trusted).await)
    })
    .await;
    let refused = |why: &str| {
        tracing::debug!(shard = shard.id, %peer, why, "PROXY protocol: refused");
        shard
            .shared
            .admission
            .refused_proxy
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = format!(r#"{{"error":"{why}"}}"#);
        crate::sys::refuse_now(
            stream.as_raw_fd(),
            &handshake::json_response(400, &body, true),
        );
        None
    };
    match header {
        // Peer closed or went silent.
        Err(_) | Ok(Err(ProxyRead::Closed)) => None,
        Ok(Err(ProxyRead::Bad(e))) => refused(&e.to_string()),
        Ok(Err(ProxyRead::Missing)) => {
            refused("a PROXY protocol header is required from this load balancer")
        }
        Ok(Ok(Some(_))) if !trusted => {
            refused("PROXY protocol header from an address not in trusted_proxies")
        }
        Ok(Ok(None)) => Some(peer.ip()),
        Ok(Ok(Some(h))) => {
            let client = h.source.map_or(peer.ip(), |a| a.ip());
            tracing::debug!(shard = shard.id, %peer, %client, "PROXY protocol header");
            if let Err(why) = ticket.attribute(client) {
                crate::sys::refuse_now(stream.as_raw_fd(), why.http_response());
                return None;
            }
            Some(client)
        }
    }
}

enum ProxyRead {
    Closed,
    Missing,
    Bad(crate::proxy::ProxyError),
}

/// Looks at the start of the stream for a PROXY header. `consume`: read it off the stream (a
/// trusted peer); otherwise it is only looked at. `Ok(None)`: the stream does not start with
/// one (for a trusted peer that is `Err(Missing)`).
async fn read_proxy_header(
    stream: &mut TcpStream,
    consume: bool,
) -> Result<Option<crate::proxy::Header>, ProxyRead> {
    use crate::proxy::{parse, Parsed};
    // On the heap: only connections under PROXY protocol pay for it.
    let mut buf = vec![0u8; crate::proxy::V1_MAX + 1];
    loop {
        let n = match stream.peek(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => return Err(ProxyRead::Closed),
        };
        match parse(&buf[..n]).map_err(ProxyRead::Bad)? {
            Parsed::NotProxy if consume => return Err(ProxyRead::Missing),
            Parsed::NotProxy => return Ok(None),
            Parsed::Header(h) if !consume => return Ok(Some(h)),
            Parsed::Header(h) => {
                stream
                    .read_exact(&mut buf[..h.len])
                    .await
                    .map_err(|_| ProxyRead::Closed)?;
                return Ok(Some(h));
            }
            Parsed::Incomplete { need: Some(len) } if consume => {
                // A v2 header whose length is known: wait for exactly that much.
                let mut whole = vec![0u8; len];
                stream
                    .read_exact(&mut whole)
                    .await
                    .map_err(|_| ProxyRead::Closed)?;
                return match parse(&whole).map_err(ProxyRead::Bad)? {
                    Parsed::Header(h) => Ok(Some(h)),
                    _ => Err(ProxyRead::Missing),
                };
            }
            // The start of a header, on untrusted peers too: that is enough to refuse.
            Parsed::Incomplete { need: Some(_) } => {
                return Ok(Some(crate::proxy::Header {
                    source: None,
                    len: n,
                }))
            }
            // A header split over packets (load balancers send it in one): look again shortly.
            // `peek` returns at once while any byte is waiting, so this is a poll, bounded by
            // the caller's handshake timeout.
            Parsed::Incomplete { need: None } => {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// A WebSocket upgrade that passed its checks: what the session starts with.
pub(super) struct Upgraded {
    pub app: usize,
    /// Its place in the app's connection count.
    pub guard: AppConnGuard,
    /// Bytes the client sent after the request head.
    pub leftover: Vec<u8>,
    /// permessage-deflate: 0 not negotiated, `DEFLATE` negotiated, `| DEFLATE_CONTEXT` the
    /// client keeps its window (shared-context mode).
    pub deflate: u8,
}

/// The permessage-deflate answer to this upgrade: only when compression is on for the server
/// and for the app the path names, and the client offered something this server can honour.
fn deflate_answer(shard: &Shard, req: &Request) -> Option<crate::ws::deflate::Accepted> {
    if !shard.shared.cfg.compression {
        return None;
    }
    let offers = req.extensions.as_deref()?;
    let slot = shard.apps().by_key(req.path.strip_prefix("/app/")?)?;
    if !shard.app(slot).compression {
        return None;
    }
    crate::ws::deflate::negotiate(offers, shard.shared.cfg.compression_context)
}

/// HTTP requests, then the WebSocket upgrade with its checks. `Some` when a Pusher session may
/// start.
async fn handshake<S: Stream>(
    shard: &Rc<Shard>,
    stream: &mut S,
    hop: IpAddr,
    ticket: &Ticket,
) -> Option<Upgraded> {
    let (req, leftover) = http_phase(shard, stream, hop).await?;
    let Some(ws_key) = req
        .ws_key
        .as_deref()
        .filter(|_| req.ws_version.as_deref() == Some("13") && req.method == "GET")
    else {
        let body = r#"{"error":"WebSocket upgrade needs GET, Sec-WebSocket-Key and Sec-WebSocket-Version: 13"}"#;
        respond_and_close(stream, &handshake::json_response(400, body, true)).await;
        return None;
    };
    if !handshake::valid_ws_key(ws_key) {
        let body =
            r#"{"error":"Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 section 4.2.1)"}"#;
        respond_and_close(stream, &handshake::json_response(400, body, true)).await;
        return None;
    }
    let extension = deflate_answer(shard, &req);
    stream
        .write_all(&handshake::switching_protocols(
            ws_key,
            extension.map(|a| a.line),
        ))
        .await
        .ok()?;
    stream.flush().await.ok()?;
    let app = match check_upgrade(shard, &req) {
        Ok(app) => app,
        Err(err) => {
            refuse(stream, err).await;
            return None;
        }
    };
    if !crate::config::origin_allowed(&shard.app(app).allowed_origins, req.origin.as_deref()) {
        refuse(stream, PusherError::OriginNotAllowed).await;
        return None;
    }
    if ticket.unattributed() {
        // From a trusted proxy that sent no PROXY header naming a client: X-Forwarded-For
        // does (the right-most address that is not a trusted proxy).
        let client = shard
            .shared
            .cfg
            .trusted_proxies
            .client(hop, req.forwarded_for.as_deref());
        if let Err(why) = ticket.attribute(client) {
            tracing::debug!(shard = shard.id, %client, reason = why.label(), "refused");
            refuse(stream, why.pusher_error()).await;
            return None;
        }
    }
    let limit = shard.app(app).max_connections;
    let Some(guard) = AppConnGuard::try_new(Rc::clone(shard), app, limit) else {
        refuse(stream, PusherError::OverQuota).await;
        return None;
    };
    Some(Upgraded {
        app,
        guard,
        leftover,
        deflate: extension.map_or(0, |a| {
            if a.context {
                super::conn::DEFLATE | super::conn::DEFLATE_CONTEXT
            } else {
                super::conn::DEFLATE
            }
        }),
    })
}

/// Answers HTTP requests until the peer goes away (`None`) or asks for a WebSocket upgrade
/// (`Some`, with any bytes it already sent after the request head).
///
/// Time is bounded per request, however slowly bytes trickle in (slowloris, slow bodies): the
/// wait for a request's first byte (on a new connection, or between keep-alive requests) gets
/// `handshake_timeout`, and so does the rest of the request, head and body together, from that
/// first byte. An idle connection is closed silently; a request still incomplete at its deadline
/// is answered 408 and the connection closed. Each new request gets a fresh deadline.
async fn http_phase<S: Stream>(
    shard: &Shard,
    stream: &mut S,
    peer: IpAddr,
) -> Option<(Request, Vec<u8>)> {
    let cfg = &shard.shared.cfg;
    let limit = cfg.handshake_timeout;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.is_empty() {
            // No request has begun, so there is none to answer (RFC 9112 §9.5: a server may
            // close an idle connection at any time).
            match within(Instant::now() + limit, read_more(stream, &mut buf)).await {
                Some(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
        let deadline = Instant::now() + limit;
        let (req, head_len) = match within(deadline, read_head(stream, &mut buf)).await {
            None => return timed_out(stream, limit).await,
            Some(Ok(None)) => return None,
            Some(Ok(Some(x))) => x,
            Some(Err(e)) => return refuse_request(stream, e.status(), &e.to_string()).await,
        };
        // From here `buf` holds what followed the head: body, next request, or WebSocket frames.
        buf.drain(..head_len);
        if req.wants_upgrade {
            if req.chunked || req.content_length.unwrap_or(0) > 0 {
                // After the 101 the bytes that follow are frames to us, but a body to a proxy
                // that does not take part in the upgrade: refuse rather than disagree.
                return refuse_request(stream, 400, "a WebSocket upgrade request has no body")
                    .await;
            }
            return Some((req, buf));
        }
        if req.content_length.unwrap_or(0) > cfg.max_request_size {
            let too_large = chunked::ChunkError::TooLarge(cfg.max_request_size);
            return refuse_request(stream, 413, &too_large.to_string()).await;
        }
        let body = match within(deadline, read_body(shard, stream, &req, &mut buf)).await {
            None => return timed_out(stream, limit).await,
            Some(Ok(body)) => body,
            Some(Err(BodyError::Gone)) => return None,
            Some(Err(BodyError::Refused(resp))) => {
                respond_and_close(stream, &resp.to_bytes(true)).await;
                return None;
            }
            Some(Err(BodyError::Ended)) => {
                return refuse_request(stream, 400, "request body ended early").await
            }
            Some(Err(BodyError::Chunked(e))) => {
                return refuse_request(stream, e.status(), &e.to_string()).await
            }
        };
        let bytes = match &body {
            Body::Buffered(len) => &buf[..*len],
            Body::Decoded(v) => v.as_slice(),
        };
        let reply = super::http::handle(shard, &req, bytes, peer).await;
        let resp = reply.to_bytes(req.close);
        // A client that sends requests but reads no answers cannot hold the task either.
        let sent = within(Instant::now() + limit, async {
            stream.write_all(&resp).await?;
            stream.flush().await
        })
        .await;
        if !matches!(sent, Some(Ok(()))) || req.close {
            return None;
        }
        if let Body::Buffered(len) = body {
            buf.drain(..len);
        }
    }
}

/// Runs `fut` until `deadline`; `None` when the deadline came first.
async fn within<T>(deadline: Instant, fut: impl std::future::Future<Output = T>) -> Option<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    glommio::timer::timeout(left, async { Ok(fut.await) })
        .await
        .ok()
}

/// A request body, read: its first bytes of the read buffer (`Content-Length`), or decoded
/// (chunked, with the framing already dropped from the buffer).
enum Body {
    Buffered(usize),
    Decoded(Vec<u8>),
}

/// Why a body was not read.
enum BodyError {
    /// Malformed chunked framing, or over the size limit.
    Chunked(chunked::ChunkError),
    /// The peer closed (or the read failed) before the body was complete.
    Ended,
    /// `Expect: 100-continue` and the request is refused whatever its body: this answer.
    Refused(handshake::Response),
    /// Writing `100 Continue` failed: the peer is gone.
    Gone,
}

/// Reads the body of `req` (the head already removed from `buf`). On return `buf` starts with
/// the body (`Body::Buffered`) or with what followed it (`Body::Decoded`). Memory is bounded:
/// a `Content-Length` body was checked against the limit before this; a chunked body is
/// decoded as it arrives and refused at the first chunk size that passes the limit.
async fn read_body<S: Stream>(
    shard: &Shard,
    stream: &mut S,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<Body, BodyError> {
    // RFC 9110 §10.1.1: `100 Continue` (or the final answer) before waiting for the body, and
    // only then: a client that sent its body at once is not made to read an interim answer.
    let mut expecting = req.expect_continue;
    if req.chunked {
        let mut dec = chunked::Decoder::new(shard.shared.cfg.max_request_size);
        let mut body = Vec::new();
        loop {
            if !buf.is_empty() {
                let (used, progress) = dec.feed(buf, &mut body).map_err(BodyError::Chunked)?;
                buf.drain(..used);
                if progress == chunked::Progress::Done {
                    return Ok(Body::Decoded(body));
                }
            }
            if std::mem::take(&mut expecting) {
                continue_or_refuse(shard, stream, req).await?;
            }
            match read_more(stream, buf).await {
                Ok(n) if n > 0 => {}
                _ => return Err(BodyError::Ended),
            }
        }
    }
    let len = req.content_length.unwrap_or(0);
    while buf.len() < len {
        if std::mem::take(&mut expecting) {
            continue_or_refuse(shard, stream, req).await?;
        }
        match read_more(stream, buf).await {
            Ok(n) if n > 0 => {}
            _ => return Err(BodyError::Ended),
        }
    }
    Ok(Body::Buffered(len))
}

/// `Expect: 100-continue`: the final answer at once when the request is refused whatever its
/// body (unknown path or app, wrong method, bad signature), else `100 Continue`, so a client
/// never waits for nothing (curl waits 1 s before sending anyway).
async fn continue_or_refuse<S: Stream>(
    shard: &Shard,
    stream: &mut S,
    req: &Request,
) -> Result<(), BodyError> {
    if let Some(resp) = super::http::refuse_before_body(shard, req) {
        return Err(BodyError::Refused(resp));
    }
    if stream
        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        .await
        .is_err()
        || stream.flush().await.is_err()
    {
        return Err(BodyError::Gone);
    }
    Ok(())
}

/// Answers `status` with `{"error": msg}` and closes: the request's framing cannot be trusted,
/// so neither can anything after it on this connection.
async fn refuse_request<T, S: Stream>(stream: &mut S, status: u16, msg: &str) -> Option<T> {
    let body = serde_json::json!({ "error": msg }).to_string();
    respond_and_close(stream, &handshake::json_response(status, &body, true)).await;
    None
}

/// A request not complete at its deadline: 408, and the connection closed.
async fn timed_out<T, S: Stream>(stream: &mut S, limit: Duration) -> Option<T> {
    let msg = format!("request not completed within {} s", limit.as_secs());
    refuse_request(stream, 408, &msg).await
}

/// Sends a final response, half-closes, and discards what the client is still sending (bounded in
/// time and bytes), so that closing with unread input does not reset the connection before the
/// client has read the response.
async fn respond_and_close<S: Stream>(stream: &mut S, resp: &[u8]) {
    // A peer that reads nothing cannot hold the task: the write is bounded like the linger.
    let sent = glommio::timer::timeout(LINGER, async {
        Ok(async {
            stream.write_all(resp).await?;
            stream.flush().await
        }
        .await)
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = stream.close().await;
    // On the heap: this rare path must not grow every handshake future by 4 KiB.
    let mut sink = vec![0u8; 4096];
    let _ = glommio::timer::timeout(LINGER, async {
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => break,
            }
        }
        Ok(())
    })
    .await;
}

/// Reads once into `buf`'s spare capacity (no stack buffer held across the await: the HTTP phase
/// of thousands of simultaneous handshakes stays small).
async fn read_more<S: Stream>(stream: &mut S, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let len = buf.len();
    let want = (buf.capacity() - len).max(HEAD_READ);
    buf.resize(len + want, 0);
    let r = stream.read(&mut buf[len..]).await;
    let n = *r.as_ref().unwrap_or(&0);
    buf.truncate(len + n);
    r
}

/// Reads until a whole request head is buffered. `Ok(None)`: the peer closed or timed out.
async fn read_head<S: Stream>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<(Request, usize)>, handshake::HeadError> {
    loop {
        if !buf.is_empty() {
            if let Some(found) = handshake::parse(buf)? {
                return Ok(Some(found));
            }
        }
        match read_more(stream, buf).await {
            Ok(n) if n > 0 => {}
            _ => return Ok(None),
        }
    }
}

fn check_upgrade(shard: &Shard, req: &Request) -> Result<usize, PusherError> {
    let key = req
        .path
        .strip_prefix("/app/")
        .filter(|k| !k.is_empty() && !k.contains('/'))
        .ok_or(PusherError::PathNotFound)?;
    let app = shard.apps().by_key(key).ok_or(PusherError::AppNotFound)?;
    match req.query_param("protocol") {
        None => Err(PusherError::NoProtocol),
        Some(p) => match p.parse::<u32>() {
            Err(_) => Err(PusherError::InvalidVersion),
            Ok(7) => Ok(app),
            Ok(_) => Err(PusherError::UnsupportedProtocol),
        },
    }
}

/// Ends an upgraded connection that may not go on: `pusher:error`, then the same close code.
async fn refuse<S: Stream>(stream: &mut S, err: PusherError) {
    let msg = err.to_string();
    let mut bytes = codec::server_frame(codec::OP_TEXT, &outbound::error(Some(err.code()), &msg));
    bytes.extend(codec::close_frame(err.code(), &msg));
    respond_and_close(stream, &bytes).await;
}
