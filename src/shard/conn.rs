//! One upgraded client connection: its state shared with the shard (`Conn`), its writes
//! (`sendmsg` of the queued frames, TLS sealing), its reads and liveness, and the session loop
//! that decodes client frames and hands their messages to `session`. What happens before the
//! upgrade is `accept`'s; the queue itself is `outqueue`'s.
//!
//! Writes are synchronous `sendmsg` calls with every queued frame as an iovec, made by whoever
//! queued (the shard after a burst, or this connection's task after answering its client). The
//! connection's task only waits for writability when the socket's send buffer is full, and for
//! reads.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

use super::admission::Ticket;
pub(crate) use super::outqueue::Enqueued;
use super::outqueue::{Chunk, Form, Frame, OutQueue};
use super::{ConnId, Shard};
use crate::protocol::{outbound, PusherError, SocketId};
use crate::sys;
use crate::ws::codec::{self, Decoder, Inbound, Text};

/// How long a closing connection may take to drain its queue and finish the close handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How many bytes a closing connection's peer may still send (read and discarded) before it is
/// dropped: enough to finish what was in flight, too little to keep a shard busy.
const CLOSE_LINGER_BYTES: usize = 1 << 20;
/// Bytes read per `recv`; a stack buffer, so idle connections hold no read buffer at all.
const READ_CHUNK: usize = 2048;
/// `Conn::deflate`: permessage-deflate negotiated.
pub(super) const DEFLATE: u8 = 1;
/// `Conn::deflate`: the client keeps its window across server messages (shared context).
pub(super) const DEFLATE_CONTEXT: u8 = 2;

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
    /// Subscriptions waiting for an answer: presence channels whose owner shard has not
    /// answered the join yet, and positioned channels whose `ShardCmd::Resume` is still in
    /// this shard's inbox.
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
    /// permessage-deflate was negotiated (`DEFLATE`): broadcasts are sent compressed when they
    /// have a compressed frame, and client messages may arrive compressed; and the client keeps
    /// its window (`DEFLATE_CONTEXT`): delta frames may be sent. Flags, no zlib state.
    deflate: u8,
    /// Shared context: the tag of the last compressed message queued to this connection (0:
    /// unknown or none). A delta frame is sent only when its predecessor's tag is this one.
    last_tag: Cell<u64>,
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
        deflate: u8,
    ) -> Conn {
        Conn {
            deflate,
            last_tag: Cell::new(0),
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
    /// Queues a broadcast (its compressed form if this connection negotiated compression).
    /// Over `conflate_over` queued bytes, the queued, unsent frames it supersedes are dropped
    /// first (conflation: only frames of the same conflated event and channel); the bound on
    /// the queue then applies to what is left.
    pub(super) fn enqueue_shared(&self, frame: &Rc<Frame>, conflate_over: usize) -> Enqueued {
        if frame.conflate.is_some() && self.state.get() == State::Open {
            let mut out = self.out.borrow_mut();
            if out.bytes > conflate_over {
                let mut last = self.last_tag.get();
                let n = out.conflate(frame, &mut last);
                self.last_tag.set(last);
                if n > 0 {
                    crate::metrics::count_conflated(n);
                }
            }
        }
        let form = frame.choose(
            self.deflates(),
            self.deflate & DEFLATE_CONTEXT != 0,
            self.last_tag.get(),
        );
        let len = frame.form(form).len();
        let queued = self.enqueue(len, || Chunk::Shared(Rc::clone(frame), form));
        if matches!(queued, Enqueued::Yes(_)) {
            match form {
                Form::Plain => {}
                Form::Deflated => self.last_tag.set(frame.framed.tag()),
                Form::Delta => {
                    self.last_tag.set(frame.framed.tag());
                    crate::metrics::count_delta();
                }
            }
        }
        queued
    }

    /// permessage-deflate was negotiated.
    pub(super) fn deflates(&self) -> bool {
        self.deflate & DEFLATE != 0
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

/// The Pusher session of an upgraded connection, from `connection_established` to the end: the
/// one future that lives as long as the connection, so it holds only what the session needs.
pub(super) async fn live(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    // Boxed: a `ServerConnection` is over a kilobyte.
    tls: Option<Box<rustls::ServerConnection>>,
    upgraded: super::accept::Upgraded,
    ticket: Ticket,
) {
    let super::accept::Upgraded {
        app,
        guard: _guard,
        leftover,
        deflate,
    } = upgraded;
    if ticket.is_evicted() {
        // Closed to make room between the upgrade and this task's start.
        return;
    }
    let (activity_timeout, max_message) = {
        let cfg = shard.app(app);
        (cfg.activity_timeout, cfg.max_message_size)
    };
    let _ = stream.set_read_timeout(None);
    let conn = shard.register_with(app, stream.as_raw_fd(), tls, deflate);
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
        let (msg, used) = match dec.next(&mut rbuf[pos..], max_message, conn.deflates()) {
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
            Inbound::Deflated(text) if conn.is_open() => {
                let compressed = text.bytes(&rbuf[pos..]);
                match inflate(compressed, max_message) {
                    Ok(mut msg) => {
                        super::session::on_text(shard, conn, &mut msg);
                        INFLATED.with(|b| b.replace(msg));
                    }
                    Err(e) => {
                        tracing::debug!(socket_id = %conn.socket_id, error = %e, "compressed message refused");
                        conn.close_ws(e.close_code(), &e.to_string());
                        conn.input_broken.set(true);
                        pos = rbuf.len();
                        break;
                    }
                }
            }
            _ => {}
        }
        pos += used;
    }
    rbuf.drain(..pos);
}

thread_local! {
    /// One inflater per shard, reset for every message: clients compress each message on its
    /// own (`client_no_context_takeover` is part of every permessage-deflate answer), so no
    /// connection keeps any zlib state.
    static INFLATER: RefCell<crate::ws::deflate::Inflater> = RefCell::new(Default::default());
    /// The shard's buffer for inflated messages, reused (and cut back when a big one grew it).
    static INFLATED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A compressed client message inflated (into the shard's reused buffer) and checked: at most
/// `max_message` bytes once inflated (a decompression bomb stops there: 1009), valid DEFLATE
/// (1007) and valid UTF-8 (1007).
fn inflate(compressed: &[u8], max_message: usize) -> Result<Vec<u8>, codec::WsError> {
    let mut out = INFLATED.with(|b| b.take());
    out.clear();
    if out.capacity() > 64 << 10 {
        out = Vec::new();
    }
    let res = INFLATER.with(|i| i.borrow_mut().inflate(compressed, max_message, &mut out));
    let checked = match res {
        Err(crate::ws::deflate::InflateError::TooBig) => Err(codec::WsError::TooBig),
        Err(crate::ws::deflate::InflateError::Corrupt) => Err(codec::WsError::BadDeflate),
        Ok(()) if std::str::from_utf8(&out).is_err() => Err(codec::WsError::InvalidUtf8),
        Ok(()) => return Ok(out),
    };
    INFLATED.with(|b| b.replace(out));
    checked
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

#[cfg(test)]
mod tests {
    /// Every connection pays for `Conn` (in an `Rc`: 16 more bytes): shared-context
    /// compression's `last_tag` took it from 296 to 304 bytes, and the `Rc` allocation stays in
    /// mimalloc's 320-byte size class (the one it was in before).
    #[test]
    fn conn_stays_in_its_allocation_class() {
        let rc = std::mem::size_of::<super::Conn>() + 16;
        eprintln!("size_of::<Conn>() = {}", rc - 16);
        assert!(rc <= 320, "Rc<Conn> is {rc} bytes");
    }
}
