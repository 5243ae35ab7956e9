//! One client connection: the request head, the WebSocket upgrade, the Pusher session, and the
//! byte-bounded outbound queue that broadcasts are written from.
//!
//! Writes are synchronous `sendmsg` calls with every queued frame as an iovec, made by whoever
//! queued (the shard after a burst, or this connection's task after answering its client). The
//! connection's task only waits for writability when the socket's send buffer is full, and for
//! reads.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

use super::admission::Ticket;
use super::{AppConnGuard, ConnId, Shard};
use crate::protocol::{outbound, PusherError, SocketId};
use crate::sys;
use crate::ws::chunked;
use crate::ws::codec::{self, Decoder, Inbound, Text};
use crate::ws::handshake::{self, Request};

/// How long a closing connection may take to drain its queue and finish the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How many bytes a closing connection's peer may still send (read and discarded) before it is
/// dropped: enough to finish what was in flight, too little to keep a shard busy.
const CLOSE_LINGER_BYTES: usize = 1 << 20;
/// Bytes read per `recv`; a stack buffer, so idle connections hold no read buffer at all.
const READ_CHUNK: usize = 2048;
/// Bytes read per `recv` while a request head or body is arriving.
const HEAD_READ: usize = 1024;
/// After a final response or a refusal: how long, and how many bytes, we keep reading (and
/// discarding) so our last bytes are not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// What the HTTP phase reads and writes: a plain TCP stream or a TLS stream over one.
trait Stream: AsyncRead + AsyncWrite + Unpin {}
impl<S: AsyncRead + AsyncWrite + Unpin> Stream for S {}

/// A queued frame: shared by every subscriber (broadcasts) or this connection's own (replies).
enum Chunk {
    Shared(Rc<Bytes>),
    Own(Vec<u8>),
}

impl Chunk {
    fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Own(v) => v,
        }
    }
}

#[derive(Default)]
struct OutQueue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already sent.
    head_off: usize,
    /// Unsent bytes in `chunks`, whatever queued them (broadcasts, replies, pings); bounded by
    /// `max_outbound_bytes`, plus at most one final `pusher:error` and close frame.
    bytes: usize,
    /// `max_outbound_bytes` (here, next to `bytes`, for the compare on every queued frame).
    max: usize,
    /// The last send hit a full socket buffer; the task is waiting for writability.
    blocked: bool,
    /// TLS connections: how many chunks at the front are already encrypted records (the rest is
    /// plaintext, sealed just before sending).
    sealed: usize,
}

impl OutQueue {
    fn push(&mut self, c: Chunk) {
        self.bytes += c.as_slice().len();
        self.chunks.push_back(c);
    }

    /// Drops `n` sent bytes from the front; counts the frames and bytes written.
    fn advance(&mut self, mut n: usize) {
        if n == 0 {
            return;
        }
        self.bytes -= n;
        let (sent, mut frames) = (n, 0);
        while n > 0 {
            let front_left = self.chunks[0].as_slice().len() - self.head_off;
            if n >= front_left {
                n -= front_left;
                self.chunks.pop_front();
                self.head_off = 0;
                self.sealed = self.sealed.saturating_sub(1);
                frames += 1;
            } else {
                self.head_off += n;
                n = 0;
            }
        }
        crate::metrics::count_written(frames, sent as u64);
    }

    fn front(&self) -> Option<&[u8]> {
        self.chunks.front().map(|c| &c.as_slice()[self.head_off..])
    }

    /// The unsent bytes, frame by frame: the front frame from `head_off`, then the others.
    fn unsent(&self) -> impl Iterator<Item = &[u8]> {
        self.front()
            .into_iter()
            .chain(self.chunks.iter().skip(1).map(Chunk::as_slice))
    }

    /// Drops every frame not yet started, keeping a partly sent one (and, with TLS, every
    /// encrypted record: dropping one would break the record sequence) so the stream stays valid.
    fn discard_unsent(&mut self) {
        let keep = usize::from(self.head_off > 0).max(self.sealed);
        while self.chunks.len() > keep {
            if let Some(c) = self.chunks.pop_back() {
                self.bytes -= c.as_slice().len();
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// We sent (or queued) our close frame; the connection ends once it is flushed and the peer
    /// answers, or at `deadline`, or once the peer has sent `CLOSE_LINGER_BYTES` more.
    Closing {
        deadline: Instant,
    },
    Dead,
}

pub(crate) enum Enqueued {
    /// Queued; the connection's unsent bytes now.
    Yes(usize),
    /// Over `max_outbound_bytes`: the connection is being closed with 4100.
    Overflow,
    /// Closing or dead: nothing queued.
    Closed,
}

pub(super) enum Flush {
    Idle,
    Blocked,
    Failed,
}

/// What a connection's task was woken for.
enum Io {
    Read,
    Done,
}

/// What only signed-in connections and presence members need (`Conn::ext`).
#[derive(Default)]
pub(super) struct Extra {
    /// The user this connection signed in as (`pusher:signin`).
    pub user: Option<Rc<str>>,
    /// User ids whose online/offline changes this connection is told (from its `user_data`).
    pub watchlist: Vec<Rc<str>>,
    /// Presence channels joined: (channel, user id), so leaving and client events know the user.
    pub presence: Vec<(Rc<str>, Rc<str>)>,
    /// Presence channels whose owner shard has not answered the join yet.
    pub presence_pending: Vec<Rc<str>>,
}

/// A WebSocket connection's state shared between its task and its shard.
pub struct Conn {
    pub id: ConnId,
    pub socket_id: SocketId,
    /// Index of its app in `Config::apps`.
    pub app: usize,
    fd: RawFd,
    out: RefCell<OutQueue>,
    /// The connection task's waker, woken when the shard needs it (blocked, closing, dead).
    task: RefCell<Option<Waker>>,
    state: Cell<State>,
    /// The peer sent its close frame.
    peer_closed: Cell<bool>,
    /// The peer broke the WebSocket protocol: what it sends next is read and discarded until
    /// it closes, so our close frame is not lost to a reset caused by unread input.
    input_broken: Cell<bool>,
    write_shut: Cell<bool>,
    /// Bytes read from the peer since we started closing (at most `CLOSE_LINGER_BYTES`).
    closing_read: Cell<u32>,
    last_seen: Cell<Instant>,
    /// When the server pinged, if the client has not answered since.
    ping_sent: Cell<Option<Instant>>,
    /// Has frames waiting for the shard's write: on the shard's dirty list for the current
    /// burst, or deferred by write coalescing (frames queued meanwhile join the same write).
    pub(super) in_dirty: Cell<bool>,
    /// On the shard's deferred list (at most once).
    pub(super) in_deferred: Cell<bool>,
    /// Shard clock (`Shard::now_ms`) of the last broadcast write, for write coalescing.
    pub(super) last_write: Cell<u32>,
    /// The close code sent or received, for the disconnect metrics.
    close_code: Cell<Option<u16>>,
    /// Sign-in and presence state, allocated the first time a connection signs in or joins a
    /// presence channel: most connections never do, and each idle connection's size counts.
    extra: RefCell<Option<Box<Extra>>>,
    /// TLS state of a wss:// connection (boxed: plain connections pay one pointer).
    tls: Option<Box<RefCell<rustls::ServerConnection>>>,
    /// TLS: our close_notify is queued.
    tls_closing: Cell<bool>,
    /// Message rate limit window: when it started and how many messages it saw.
    pub(super) rate_window: Cell<(Instant, u32)>,
    /// Client-event token bucket: tokens left and when they were last topped up.
    pub(super) client_tokens: Cell<f64>,
    pub(super) client_refill: Cell<Instant>,
    /// Ping rate window (`max_pings_per_second`): its start on the shard clock
    /// (`Shard::now_ms`) and the pings seen in it.
    pub(super) ping_window: Cell<(u32, u32)>,
    /// Subscription-change token bucket: tokens left and the shard clock (`Shard::now_ms`) when
    /// they were last topped up (8 bytes: every connection pays for it).
    pub(super) sub_tokens: Cell<(f32, u32)>,
}

impl Conn {
    pub(super) fn new(
        id: ConnId,
        socket_id: SocketId,
        app: usize,
        fd: RawFd,
        tls: Option<Box<rustls::ServerConnection>>,
        max_outbound_bytes: usize,
    ) -> Conn {
        Conn {
            tls: tls.map(|t| Box::new(RefCell::new(*t))),
            tls_closing: Cell::new(false),
            id,
            socket_id,
            app,
            fd,
            out: RefCell::new(OutQueue {
                max: max_outbound_bytes,
                ..OutQueue::default()
            }),
            closing_read: Cell::new(0),
            task: RefCell::new(None),
            state: Cell::new(State::Open),
            peer_closed: Cell::new(false),
            input_broken: Cell::new(false),
            write_shut: Cell::new(false),
            last_seen: Cell::new(Instant::now()),
            ping_sent: Cell::new(None),
            in_dirty: Cell::new(false),
            in_deferred: Cell::new(false),
            last_write: Cell::new(0),
            close_code: Cell::new(None),
            extra: RefCell::new(None),
            rate_window: Cell::new((Instant::now(), 0)),
            client_tokens: Cell::new(f64::MAX),
            client_refill: Cell::new(Instant::now()),
            ping_window: Cell::new((0, 0)),
            sub_tokens: Cell::new((f32::MAX, 0)),
        }
    }

    /// Sign-in and presence state, created on first use.
    pub(super) fn ext(&self) -> std::cell::RefMut<'_, Extra> {
        std::cell::RefMut::map(self.extra.borrow_mut(), |e| {
            &mut **e.get_or_insert_with(Box::default)
        })
    }

    /// Takes the sign-in and presence state (the connection is ending).
    pub(super) fn take_ext(&self) -> Option<Box<Extra>> {
        self.extra.borrow_mut().take()
    }

    /// The signed-in user, if any (no allocation).
    pub(super) fn user(&self) -> Option<Rc<str>> {
        self.extra.borrow().as_ref().and_then(|e| e.user.clone())
    }

    /// The user this connection joined presence channel `channel` as (no allocation).
    pub(super) fn presence_user(&self, channel: &str) -> Option<Rc<str>> {
        self.extra.borrow().as_ref().and_then(|e| {
            e.presence
                .iter()
                .find(|(c, _)| &**c == channel)
                .map(|(_, u)| Rc::clone(u))
        })
    }

    /// Presence channels whose join is pending (no allocation).
    pub(super) fn pending_joins(&self) -> usize {
        self.extra
            .borrow()
            .as_ref()
            .map_or(0, |e| e.presence_pending.len())
    }

    /// Whether a join of `channel` is pending (no allocation).
    pub(super) fn join_pending(&self, channel: &str) -> bool {
        self.extra
            .borrow()
            .as_ref()
            .is_some_and(|e| e.presence_pending.iter().any(|c| &**c == channel))
    }

    /// Queues a broadcast frame. Over `max_outbound_bytes` unsent bytes, the connection is a slow
    /// consumer: its unsent frames are dropped and it is closed with 4100 so its client
    /// reconnects with backoff instead of this shard's memory growing.
    pub(super) fn enqueue_shared(&self, frame: &Rc<Bytes>) -> Enqueued {
        self.enqueue(frame.len(), || Chunk::Shared(Rc::clone(frame)))
    }

    /// Queues a frame of this connection's own (a reply, a pong, a ping) under the same bound as
    /// broadcasts: a client that sends and never reads cannot make the queue outgrow it.
    fn enqueue_own(&self, frame: Vec<u8>) -> Enqueued {
        self.enqueue(frame.len(), || Chunk::Own(frame))
    }

    fn enqueue(&self, len: usize, chunk: impl FnOnce() -> Chunk) -> Enqueued {
        if self.state.get() != State::Open {
            return Enqueued::Closed;
        }
        let mut out = self.out.borrow_mut();
        if out.bytes + len > out.max {
            out.discard_unsent();
            drop(out);
            tracing::debug!(socket_id = %self.socket_id, "slow consumer: closing with 4100");
            crate::metrics::count_slow_consumer();
            self.close_pusher(PusherError::OverCapacity);
            return Enqueued::Overflow;
        }
        out.push(chunk());
        Enqueued::Yes(out.bytes)
    }

    #[doc(hidden)]
    pub fn bench_clear(&self) {
        let mut out = self.out.borrow_mut();
        out.chunks.clear();
        out.bytes = 0;
        out.head_off = 0;
    }

    /// Queues a text frame for this connection alone (closing it with 4100 if that would take
    /// its queue over `max_outbound_bytes`).
    pub(super) fn send_text(&self, json: &[u8]) {
        if self.state.get() == State::Open {
            self.enqueue_own(codec::server_frame(codec::OP_TEXT, json));
        }
    }

    /// Answers a WebSocket ping (RFC 6455 §5.5.3: same payload), under the queue's bound.
    fn send_pong(&self, payload: &[u8]) {
        self.enqueue_own(codec::server_frame(codec::OP_PONG, payload));
    }

    /// Sends `pusher:error` and closes with the same code (protocol 7: fatal errors are both).
    /// Both frames are queued past `max_outbound_bytes` (a closing client should learn why, and
    /// the connection queues nothing after them, so they exceed it by a few hundred bytes once).
    pub(super) fn close_pusher(&self, err: PusherError) {
        if self.state.get() != State::Open {
            return;
        }
        let msg = err.to_string();
        self.out.borrow_mut().push(Chunk::Own(codec::server_frame(
            codec::OP_TEXT,
            &outbound::error(Some(err.code()), &msg),
        )));
        self.close_ws(err.code(), &msg);
    }

    pub(super) fn close_code(&self) -> Option<u16> {
        self.close_code.get()
    }

    /// Queues a close frame and starts the closing handshake.
    pub(super) fn close_ws(&self, code: u16, reason: &str) {
        if self.state.get() != State::Open {
            return;
        }
        self.close_code.set(Some(code));
        self.out
            .borrow_mut()
            .push(Chunk::Own(codec::close_frame(code, reason)));
        self.state.set(State::Closing {
            deadline: Instant::now() + CLOSE_GRACE,
        });
        self.wake();
    }

    pub(super) fn mark_dead(&self) {
        self.state.set(State::Dead);
        self.wake();
    }

    fn wake(&self) {
        if let Some(w) = self.task.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    pub(super) fn is_open(&self) -> bool {
        self.state.get() == State::Open
    }

    /// Unsent bytes in the outbound queue.
    pub(super) fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes
    }

    /// Writes as much of the queue as the socket takes now, in one `sendmsg` per up to
    /// `sys::MAX_IOV` frames.
    pub(super) fn flush(&self) -> Flush {
        if self.state.get() == State::Dead {
            return Flush::Failed;
        }
        loop {
            let mut out = self.out.borrow_mut();
            if out.blocked {
                return Flush::Blocked;
            }
            if !self.seal(&mut out) {
                drop(out);
                self.mark_dead();
                return Flush::Failed;
            }
            if out.chunks.is_empty() {
                return Flush::Idle;
            }
            let result = {
                let mut iov = [IoSlice::new(&[]); sys::MAX_IOV];
                let mut count = 0;
                let mut total = 0;
                for (v, s) in iov.iter_mut().zip(out.unsent()) {
                    *v = IoSlice::new(s);
                    count += 1;
                    total += s.len();
                }
                sys::send_vectored(self.fd, &iov[..count]).map(|n| (n, total))
            };
            match result {
                Ok((n, total)) => {
                    out.advance(n);
                    if n == 0 && total > 0 {
                        out.blocked = true;
                        return Flush::Blocked;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    out.blocked = true;
                    return Flush::Blocked;
                }
                Err(_) => {
                    drop(out);
                    self.mark_dead();
                    return Flush::Failed;
                }
            }
        }
    }

    /// TLS: encrypts the plaintext frames queued after the sealed ones (and anything rustls
    /// wants to send: handshake messages, alerts, close_notify) into one record batch. `false`
    /// when TLS failed. Plain connections: nothing to do.
    fn seal(&self, out: &mut OutQueue) -> bool {
        let Some(tls) = &self.tls else {
            return true;
        };
        let mut tls = tls.borrow_mut();
        if out.sealed == out.chunks.len() && !tls.wants_write() {
            return true;
        }
        let from = out.sealed;
        let mut cipher = Vec::new();
        let mut plain_bytes = 0;
        for chunk in out.chunks.drain(from..) {
            let mut s = chunk.as_slice();
            plain_bytes += s.len();
            while !s.is_empty() {
                match std::io::Write::write(&mut tls.writer(), s) {
                    Ok(n) if n > 0 => s = &s[n..],
                    _ => return false,
                }
                while tls.wants_write() {
                    if tls.write_tls(&mut cipher).is_err() {
                        return false;
                    }
                }
            }
        }
        while tls.wants_write() {
            if tls.write_tls(&mut cipher).is_err() {
                return false;
            }
        }
        out.bytes = out.bytes - plain_bytes + cipher.len();
        if !cipher.is_empty() {
            out.chunks.push_back(Chunk::Own(cipher));
        }
        out.sealed = out.chunks.len();
        true
    }

    /// Bytes read from the socket: plain connections append them to `rbuf`; TLS connections
    /// decrypt them (and first take any plaintext rustls already holds). `false`: the connection
    /// is over (TLS error, or the peer's close_notify).
    fn input(&self, raw: &[u8], rbuf: &mut Vec<u8>) -> bool {
        let Some(tls) = &self.tls else {
            rbuf.extend_from_slice(raw);
            return true;
        };
        let mut tls = tls.borrow_mut();
        let mut raw = raw;
        loop {
            match std::io::Read::read_to_end(&mut tls.reader(), rbuf) {
                // close_notify: a clean end of the stream.
                Ok(_) => return false,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            if raw.is_empty() {
                return true;
            }
            if tls.read_tls(&mut raw).is_err() {
                return false;
            }
            if let Err(e) = tls.process_new_packets() {
                tracing::debug!(socket_id = %self.socket_id, error = %e, "TLS error");
                return false;
            }
        }
    }

    /// Flushes, and wakes the task when only it can go on (socket full, closing, failed).
    pub(super) fn flush_and_notify(&self) {
        match self.flush() {
            Flush::Idle if self.is_open() => {}
            _ => self.wake(),
        }
    }

    pub(super) fn check_liveness(&self, now: Instant, activity: Duration, pong_timeout: Duration) {
        match self.state.get() {
            State::Open => match self.ping_sent.get() {
                Some(sent) if now.duration_since(sent) >= pong_timeout => {
                    tracing::debug!(socket_id = %self.socket_id, "no pong: closing with 4201");
                    self.close_pusher(PusherError::PongTimeout);
                    self.flush_and_notify();
                }
                Some(_) => {}
                None if now.duration_since(self.last_seen.get()) >= activity => {
                    self.send_text(outbound::ping());
                    self.ping_sent.set(Some(now));
                    self.flush_and_notify();
                }
                None => {}
            },
            State::Closing { deadline } if now >= deadline => self.mark_dead(),
            State::Closing { .. } | State::Dead => {}
        }
    }

    /// Any frame from the client proves it alive.
    fn touch(&self) {
        self.last_seen.set(Instant::now());
        self.ping_sent.set(None);
    }

    /// One step of the connection task: finish blocked writes, end a finished close, read.
    fn poll_io(
        &self,
        cx: &mut Context<'_>,
        stream: &mut TcpStream,
        rbuf: &mut Vec<u8>,
    ) -> Poll<Io> {
        {
            let mut w = self.task.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        if self.state.get() == State::Dead {
            return Poll::Ready(Io::Done);
        }
        // The socket was full: let glommio wait for POLLOUT, then go back to sendmsg.
        loop {
            let mut out = self.out.borrow_mut();
            if !out.blocked {
                break;
            }
            let Some(front) = out.front() else {
                out.blocked = false;
                break;
            };
            match Pin::new(&mut *stream).poll_write(cx, front) {
                Poll::Ready(Ok(n)) => {
                    out.advance(n);
                    out.blocked = false;
                    drop(out);
                    match self.flush() {
                        Flush::Idle => break,
                        Flush::Blocked => continue,
                        Flush::Failed => return Poll::Ready(Io::Done),
                    }
                }
                Poll::Ready(Err(_)) => {
                    drop(out);
                    self.mark_dead();
                    return Poll::Ready(Io::Done);
                }
                Poll::Pending => break,
            }
        }
        if let State::Closing { .. } = self.state.get() {
            if self.out.borrow().chunks.is_empty() {
                if self.peer_closed.get() {
                    return Poll::Ready(Io::Done);
                }
                if self.tls.is_some() && !self.tls_closing.replace(true) {
                    // TLS: close_notify first, then the TCP half-close.
                    if let Some(tls) = &self.tls {
                        tls.borrow_mut().send_close_notify();
                    }
                    let _ = self.flush();
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                if !self.write_shut.replace(true) {
                    // Our close frame is out: half-close and wait for the peer's close or EOF,
                    // so unread input does not turn our FIN into a reset that eats the frame.
                    let _ = Pin::new(&mut *stream).poll_close(cx);
                }
            }
        }
        // A closing connection whose socket is full has a peer that is not reading: it cannot
        // answer our close frame before the deadline, and reading (and discarding) what it sends
        // meanwhile would only let it keep this shard busy. Its writes wake us if it reads again.
        let stalled = self.state.get() != State::Open && self.out.borrow().blocked;
        if !self.peer_closed.get() && !stalled {
            let mut chunk = [0u8; READ_CHUNK];
            match Pin::new(&mut *stream).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Io::Done),
                Poll::Ready(Ok(n)) => {
                    if self.state.get() != State::Open {
                        // After our close frame a peer may finish what it was sending, not
                        // stream on: one that keeps a shard reading and discarding (a ping
                        // flood closed with 4301, say) is dropped, as after an HTTP refusal.
                        let read = self.closing_read.get() as usize + n;
                        if read > CLOSE_LINGER_BYTES {
                            tracing::debug!(socket_id = %self.socket_id, "still sending after our close: dropping");
                            self.mark_dead();
                            return Poll::Ready(Io::Done);
                        }
                        self.closing_read.set(read as u32);
                    }
                    if !self.input(&chunk[..n], rbuf) {
                        return Poll::Ready(Io::Done);
                    }
                    return Poll::Ready(Io::Read);
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

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
    let Some((app, guard, leftover)) = handshake(&shard, &mut stream, hop, &ticket).await else {
        return;
    };
    glommio::spawn_local(live(shard, stream, None, app, guard, ticket, leftover)).detach();
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
    let Some((app, guard, leftover)) = handshake(&shard, &mut tls, hop, &ticket).await else {
        return;
    };
    let (stream, session) = tls.into_inner();
    glommio::spawn_local(live(
        shard,
        stream,
        Some(Box::new(session)),
        app,
        guard,
        ticket,
        leftover,
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

/// The Pusher session of an upgraded connection, from `connection_established` to the end: the
/// one future that lives as long as the connection, so it holds only what the session needs.
async fn live(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    // Boxed: a `ServerConnection` is over a kilobyte.
    tls: Option<Box<rustls::ServerConnection>>,
    app: usize,
    _guard: AppConnGuard,
    ticket: Ticket,
    leftover: Vec<u8>,
) {
    if ticket.is_evicted() {
        // Closed to make room between the upgrade and this task's start.
        return;
    }
    let (activity_timeout, max_message) = {
        let cfg = shard.app(app);
        (cfg.activity_timeout, cfg.max_message_size)
    };
    let _ = stream.set_read_timeout(None);
    let conn = shard.register_with(app, stream.as_raw_fd(), tls);
    ticket.set_conn(conn.id);
    tracing::debug!(shard = shard.id, socket_id = %conn.socket_id, "connected");
    conn.send_text(&outbound::connection_established(
        conn.socket_id,
        activity_timeout,
    ));
    session(&shard, &conn, &mut stream, leftover, max_message).await;
    shard.unregister(&conn);
    tracing::debug!(shard = shard.id, socket_id = %conn.socket_id, "disconnected");
}

/// HTTP requests, then the WebSocket upgrade with its checks. `Some` when a Pusher session may
/// start: the app, its connection-count guard, and bytes the client sent after the request head.
async fn handshake<S: Stream>(
    shard: &Rc<Shard>,
    stream: &mut S,
    hop: IpAddr,
    ticket: &Ticket,
) -> Option<(usize, AppConnGuard, Vec<u8>)> {
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
    stream
        .write_all(&handshake::switching_protocols(ws_key))
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
    Some((app, guard, leftover))
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

/// The Pusher session: decode client frames, answer them, until the connection ends.
async fn session(
    shard: &Shard,
    conn: &Conn,
    stream: &mut TcpStream,
    mut rbuf: Vec<u8>,
    max_message: usize,
) {
    let mut dec = Decoder::default();
    loop {
        process(shard, conn, &mut dec, &mut rbuf, max_message);
        conn.flush();
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            // Idle connections hold no read buffer.
            rbuf = Vec::new();
        }
        match poll_fn(|cx| conn.poll_io(cx, stream, &mut rbuf)).await {
            Io::Read => {}
            Io::Done => return,
        }
    }
}

/// Handles every complete frame in `rbuf`, removing what it used.
fn process(shard: &Shard, conn: &Conn, dec: &mut Decoder, rbuf: &mut Vec<u8>, max_message: usize) {
    if conn.input_broken.get() {
        rbuf.clear();
        return;
    }
    let mut pos = 0;
    while pos < rbuf.len() && !conn.peer_closed.get() {
        let (msg, used) = match dec.next(&mut rbuf[pos..], max_message) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(socket_id = %conn.socket_id, error = %e, "WebSocket protocol error");
                conn.close_ws(e.close_code(), &e.to_string());
                // Nothing after a broken frame can be trusted.
                conn.input_broken.set(true);
                pos = rbuf.len();
                break;
            }
        };
        conn.touch();
        match msg {
            Inbound::Close(code) => {
                // RFC 6455 §5.5.1: answer with a close frame echoing the code.
                conn.close_ws(code.unwrap_or(codec::close::NORMAL), "");
                conn.peer_closed.set(true);
            }
            // Over the app's ping rate, `ping_allowed` closes the connection (4301) instead.
            Inbound::Ping(payload)
                if conn.is_open() && super::session::ping_allowed(shard, conn) =>
            {
                conn.send_pong(&payload)
            }
            Inbound::Text(text) if conn.is_open() => match text {
                Text::InBuf(r) => {
                    let (s, e) = (pos + r.start, pos + r.end);
                    super::session::on_text(shard, conn, &mut rbuf[s..e]);
                }
                Text::Assembled(mut v) => super::session::on_text(shard, conn, &mut v),
            },
            _ => {}
        }
        pos += used;
    }
    rbuf.drain(..pos);
}

/// The shard's send ring writes connections through these.
impl crate::sys::send_ring::Peer for Conn {
    fn raw_fd(&self) -> RawFd {
        self.fd
    }

    /// Fills `iov` with the queued frames (up to its length), or `None` when this connection
    /// must be written by `flush` (TLS, blocked on a full socket, not open, nothing queued).
    /// The iovecs point into the queue, which nothing changes until `complete_send`.
    fn prepare_send(&self, iov: &mut [libc::iovec]) -> Option<(usize, usize)> {
        if self.tls.is_some() || self.state.get() != State::Open {
            return None;
        }
        let out = self.out.borrow();
        if out.blocked || out.chunks.is_empty() {
            return None;
        }
        let mut total = 0;
        let mut count = 0;
        for (v, s) in iov.iter_mut().zip(out.unsent()) {
            *v = libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            };
            total += s.len();
            count += 1;
        }
        Some((count, total))
    }

    /// The send ring's result for this connection's entry: bytes sent, or `-errno`.
    fn complete_send(&self, res: i32, asked: usize) {
        if res < 0 {
            if res == -libc::EAGAIN {
                self.out.borrow_mut().blocked = true;
                self.wake();
            } else {
                self.mark_dead();
            }
            return;
        }
        let n = res as usize;
        let more = {
            let mut out = self.out.borrow_mut();
            out.advance(n);
            if n < asked {
                // The socket took part: it is full, so wait for writability (as `flush` would
                // after its next `sendmsg` answered EAGAIN).
                out.blocked = true;
                drop(out);
                self.wake();
                return;
            }
            !out.chunks.is_empty()
        };
        if more {
            // More frames than one entry carries.
            Conn::flush_and_notify(self);
        }
    }

    fn flush_and_notify(&self) {
        Conn::flush_and_notify(self);
    }
}
