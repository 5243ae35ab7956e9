//! The one WebSocket client every scenario drives: a [`Pool`] of non-blocking connections watched
//! by one epoll instance, owned by one client thread. It owns each connection's socket and
//! RFC 6455 (the upgrade and its answer, frames and fragments, pings, the close handshake,
//! masks) and buffers; what a text message means, and what a connection's end counts as, is
//! the scenario's: a [`Handler`] gets every message, and the thread that drives the pool gets
//! every [`Fate::Drop`] and decides what to count.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use flate2::{Decompress, FlushDecompress, Status};
use socket2::{Domain, Socket, Type};

use crate::stats::now_ns;
use crate::sys::{self, Epoll};
use crate::wire::{self, FrameHead};

/// Where and how every connection of a run connects.
pub struct Target {
    pub addr: SocketAddr,
    /// The upgrade request's Host header.
    pub host_header: String,
    /// The upgrade request's path (`/app/KEY?protocol=7...`).
    pub path: String,
    /// Source addresses to spread connections over (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// From connect to ready, per connection.
    pub connect_timeout: Duration,
    /// Largest server frame accepted, bytes.
    pub max_frame: usize,
    /// Offer permessage-deflate (as browsers do) and inflate what arrives compressed.
    pub deflate: bool,
}

/// What becomes of a connection after something happened on it.
#[must_use]
pub enum Fate {
    Keep,
    /// Remove it; the string is the error (None: a clean end).
    Drop(Option<String>),
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub enum St {
    Connecting,
    Upgrading,
    Open,
    /// We sent our close frame and wait for the server's.
    Closing,
}

/// One connection: the WebSocket's state, and the scenario's own (`app`).
pub struct Conn<A> {
    stream: TcpStream,
    pub st: St,
    /// When the TCP connect began.
    pub started: Instant,
    out_interest: bool,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    frag: Vec<u8>,
    fragmenting: bool,
    /// The message being reassembled is compressed.
    frag_compressed: bool,
    /// What the server's answer said about compression.
    deflate: wire::Deflate,
    /// The connection's own inflater, when the server keeps context between messages.
    inflater: Option<Box<Decompress>>,
    key: Option<Box<str>>,
    /// Xorshift state for this connection's masks.
    masks: u64,
    pub app: A,
}

impl<A> Conn<A> {
    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.masks;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.masks = x;
        (x as u32).to_le_bytes()
    }

    /// Queues a text message (sent by the next flush).
    pub fn send_text(&mut self, payload: &[u8]) {
        let m = self.next_mask();
        wire::encode_frame(&mut self.outbuf, wire::OP_TEXT, payload, m);
    }

    /// Queues our close frame (1000) and waits for the server's.
    pub fn start_close(&mut self) {
        let m = self.next_mask();
        wire::encode_frame(&mut self.outbuf, wire::OP_CLOSE, &1000u16.to_be_bytes(), m);
        self.st = St::Closing;
    }

    /// At the end of a run: an open connection's close frame, written now and not waited for
    /// (best effort); then the TCP connection is shut down.
    pub fn close_now(&mut self) {
        if self.st == St::Open {
            let m = self.next_mask();
            let mut close = Vec::new();
            wire::encode_frame(&mut close, wire::OP_CLOSE, &1000u16.to_be_bytes(), m);
            let _ = self.stream.write(&close);
        }
        self.shutdown();
    }

    /// Ends TCP at once, without a close frame.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Writes what is queued without blocking; asks epoll for POLLOUT only while something is
    /// left, and frees a large emptied buffer.
    fn flush(&mut self, epoll: &Epoll, tok: u64) -> Fate {
        let outbuf = &mut self.outbuf;
        while !outbuf.is_empty() {
            match self.stream.write(outbuf) {
                Ok(0) => return Fate::Drop(Some("write returned 0".into())),
                Ok(n) => {
                    outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Fate::Drop(Some(format!("write: {e}"))),
            }
        }
        let want_out = !outbuf.is_empty();
        if want_out != self.out_interest {
            let interest = if want_out {
                sys::IN | sys::OUT
            } else {
                sys::IN
            };
            if let Err(e) = epoll.modify(self.stream.as_raw_fd(), tok, interest) {
                return Fate::Drop(Some(format!("epoll_ctl: {e}")));
            }
            self.out_interest = want_out;
        }
        if outbuf.capacity() > 4096 && outbuf.is_empty() {
            *outbuf = Vec::new();
        }
        Fate::Keep
    }
}

/// What a scenario does with what its connections receive.
pub trait Handler<A> {
    /// A whole text message, read at `now` (ns since the epoch). `tok` names the connection.
    fn text(&mut self, conn: &mut Conn<A>, tok: u64, msg: &[u8], now: u64) -> Fate;
    /// The server closed the WebSocket (a close frame we did not ask for); its code, if any.
    /// The connection is dropped next with the error that says so.
    fn server_closed(&mut self, conn: &mut Conn<A>, code: Option<u16>);
}

/// A thread's connections and their epoll instance.
pub struct Pool<A> {
    epoll: Epoll,
    slots: Vec<Option<Conn<A>>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    /// Slots freed while handling events, reused only after them (see [`Pool::recycle`]).
    pending_free: Vec<u32>,
    addr: SocketAddr,
    host_header: String,
    path: String,
    max_frame: usize,
    /// The server must answer our close frame before it ends TCP; else ending TCP (or a read
    /// error) while we wait counts as a clean end.
    strict_close: bool,
    masks: u64,
    deflate: bool,
    /// Inflating: one inflater for every connection whose server compresses each message on
    /// its own, and the buffer messages are inflated into.
    inflate: Inflate,
    /// Bytes read from every socket (the upgrade's answers included) since the last
    /// [`Pool::take_bytes_in`].
    bytes_in: u64,
}

/// The pool's inflater and buffer.
struct Inflate {
    shared: Decompress,
    out: Vec<u8>,
}

/// An epoll token: a connection's slot and its generation, so a stale event never reaches a
/// newer connection in the same slot.
fn token(idx: u32, gen: u32) -> u64 {
    ((gen as u64) << 32) | idx as u64
}

/// The connection a token names, if its slot still holds that generation.
fn slot_mut<'a, A>(
    slots: &'a mut [Option<Conn<A>>],
    gens: &[u32],
    tok: u64,
) -> Option<&'a mut Conn<A>> {
    let idx = (tok & 0xFFFF_FFFF) as usize;
    if gens.get(idx) != Some(&((tok >> 32) as u32)) {
        return None;
    }
    slots.get_mut(idx)?.as_mut()
}

impl<A> Pool<A> {
    /// `seed` varies the masks between threads.
    pub fn new(target: &Target, seed: u64, strict_close: bool) -> io::Result<Pool<A>> {
        Ok(Pool {
            epoll: Epoll::new(1024)?,
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            pending_free: Vec::new(),
            addr: target.addr,
            host_header: target.host_header.clone(),
            path: target.path.clone(),
            max_frame: target.max_frame,
            strict_close,
            masks: seed | 1,
            deflate: target.deflate,
            inflate: Inflate {
                shared: Decompress::new(false),
                out: Vec::new(),
            },
            bytes_in: 0,
        })
    }

    /// Bytes read from the sockets since the last call (wire bytes: frames, headers, control
    /// frames, upgrade answers).
    pub fn take_bytes_in(&mut self) -> u64 {
        std::mem::take(&mut self.bytes_in)
    }

    /// Starts a connection (non-blocking connect, from `src` if given); its token.
    pub fn open(&mut self, src: Option<IpAddr>, app: A) -> Result<u64, String> {
        let stream = connect_nonblocking(self.addr, src).map_err(|e| {
            let from = src.map(|s| format!(" from {s}")).unwrap_or_default();
            format!("connect to {}{from}: {e}", self.addr)
        })?;
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let tok = token(idx, self.gens[idx as usize]);
        if let Err(e) = self.epoll.add(stream.as_raw_fd(), tok, sys::IN | sys::OUT) {
            self.free.push(idx);
            return Err(format!("epoll_ctl: {e}"));
        }
        self.masks = self
            .masks
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(1);
        self.slots[idx as usize] = Some(Conn {
            stream,
            st: St::Connecting,
            started: Instant::now(),
            out_interest: true,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            frag: Vec::new(),
            fragmenting: false,
            frag_compressed: false,
            deflate: wire::Deflate::Off,
            inflater: None,
            key: None,
            masks: self.masks | 1,
            app,
        });
        Ok(tok)
    }

    /// The connection a token names, if its slot still holds that generation.
    pub fn get_mut(&mut self, tok: u64) -> Option<&mut Conn<A>> {
        slot_mut(&mut self.slots, &self.gens, tok)
    }

    /// Takes a connection out (its socket closes when it is dropped, which also leaves the
    /// epoll set). Its slot is reused after the current events ([`Pool::recycle`]).
    pub fn remove(&mut self, tok: u64) -> Option<Conn<A>> {
        let idx = (tok & 0xFFFF_FFFF) as usize;
        self.get_mut(tok)?;
        let conn = self.slots[idx].take();
        self.gens[idx] = self.gens[idx].wrapping_add(1);
        self.pending_free.push(idx as u32);
        conn
    }

    /// Makes the slots freed since the last call available again.
    pub fn recycle(&mut self) {
        self.free.append(&mut self.pending_free);
    }

    /// How many slots there are (some empty): the bound for [`Pool::at`].
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The connection in slot `i`, if any, with its token.
    pub fn at(&mut self, i: usize) -> Option<(u64, &mut Conn<A>)> {
        let tok = token(i as u32, *self.gens.get(i)?);
        Some((tok, self.slots.get_mut(i)?.as_mut()?))
    }

    pub fn conns(&self) -> impl Iterator<Item = &Conn<A>> {
        self.slots.iter().flatten()
    }

    pub fn conns_mut(&mut self) -> impl Iterator<Item = &mut Conn<A>> {
        self.slots.iter_mut().flatten()
    }

    /// Takes every connection out.
    pub fn drain(&mut self) -> impl Iterator<Item = Conn<A>> + '_ {
        self.slots.iter_mut().filter_map(Option::take)
    }

    /// Waits up to `timeout_ms` for readiness: `(token, epoll flags)` pairs into `out`.
    pub fn wait(&mut self, timeout_ms: i32, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        self.epoll.wait(timeout_ms, out)
    }

    /// Writes what is queued on a connection.
    pub fn flush(&mut self, tok: u64) -> Fate {
        match slot_mut(&mut self.slots, &self.gens, tok) {
            Some(conn) => conn.flush(&self.epoll, tok),
            None => Fate::Keep,
        }
    }

    /// Handles readiness `flags` on connection `tok`: finishes the connect and sends the
    /// upgrade, writes what is queued, reads what came and hands each text message to `h`.
    pub fn io<H: Handler<A>>(
        &mut self,
        tok: u64,
        flags: u32,
        scratch: &mut [u8],
        h: &mut H,
    ) -> Fate {
        let Some(conn) = slot_mut(&mut self.slots, &self.gens, tok) else {
            return Fate::Keep;
        };
        let rules = Rules {
            max_frame: self.max_frame,
            strict_close: self.strict_close,
            offered: self.deflate,
        };
        if conn.st == St::Connecting {
            return match conn.stream.take_error() {
                Ok(None) if flags & (sys::ERR | sys::HUP) == 0 => {
                    let key = tungstenite::handshake::client::generate_key();
                    conn.outbuf.extend_from_slice(&wire::handshake_request(
                        &self.host_header,
                        &self.path,
                        &key,
                        self.deflate,
                    ));
                    conn.key = Some(key.into_boxed_str());
                    conn.st = St::Upgrading;
                    conn.flush(&self.epoll, tok)
                }
                Ok(None) => {
                    Fate::Drop(Some(format!("connect to {}: connection closed", self.addr)))
                }
                Ok(Some(e)) | Err(e) => Fate::Drop(Some(format!("connect to {}: {e}", self.addr))),
            };
        }
        let mut fate = Fate::Keep;
        if flags & sys::OUT != 0 {
            fate = conn.flush(&self.epoll, tok);
        }
        if matches!(fate, Fate::Keep) && flags & (sys::IN | sys::ERR | sys::HUP) != 0 {
            fate = read_input(
                conn,
                tok,
                scratch,
                rules,
                &mut self.inflate,
                &mut self.bytes_in,
                h,
            );
            if matches!(fate, Fate::Keep) && !conn.outbuf.is_empty() {
                fate = conn.flush(&self.epoll, tok);
            }
        }
        fate
    }
}

/// The pool's settings that reading needs.
#[derive(Clone, Copy)]
struct Rules {
    max_frame: usize,
    strict_close: bool,
    /// permessage-deflate was offered.
    offered: bool,
}

fn connect_nonblocking(addr: SocketAddr, src: Option<IpAddr>) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.set_nodelay(true)?;
    if let Some(ip) = src {
        let _ = sys::bind_address_no_port(s.as_raw_fd());
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(s.into())
}

/// Reads until the socket is empty, handling what arrives.
fn read_input<A, H: Handler<A>>(
    conn: &mut Conn<A>,
    tok: u64,
    scratch: &mut [u8],
    rules: Rules,
    inflate: &mut Inflate,
    bytes_in: &mut u64,
    h: &mut H,
) -> Fate {
    loop {
        let n = match conn.stream.read(scratch) {
            Ok(0) => {
                return match conn.st {
                    St::Closing if rules.strict_close => Fate::Drop(Some(
                        "server closed TCP before answering our close frame".into(),
                    )),
                    St::Closing => Fate::Drop(None),
                    St::Upgrading => Fate::Drop(Some(
                        "server closed the connection during the WebSocket upgrade".into(),
                    )),
                    _ => Fate::Drop(Some("server closed the TCP connection".into())),
                };
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Fate::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if conn.st == St::Closing && !rules.strict_close => return Fate::Drop(None),
            Err(e) => return Fate::Drop(Some(format!("read: {e}"))),
        };
        *bytes_in += n as u64;
        let fate = input(conn, tok, &scratch[..n], now_ns(), rules, inflate, h);
        if !matches!(fate, Fate::Keep) || n < scratch.len() {
            return fate;
        }
    }
}

/// Handles bytes read from a connection: the upgrade's answer, then frames; keeps what is left
/// of an incomplete one for the next read.
fn input<A, H: Handler<A>>(
    conn: &mut Conn<A>,
    tok: u64,
    data: &[u8],
    now: u64,
    rules: Rules,
    inflate: &mut Inflate,
    h: &mut H,
) -> Fate {
    let mut buf = std::mem::take(&mut conn.inbuf);
    let src: &[u8] = if buf.is_empty() {
        data
    } else {
        buf.extend_from_slice(data);
        &buf
    };
    let mut pos = 0;
    if conn.st == St::Upgrading {
        match wire::head_end(src) {
            Some(end) => {
                let key = conn.key.take().unwrap_or_default();
                match wire::check_handshake(&src[..end], &key, rules.offered) {
                    Ok(d) => {
                        conn.deflate = d;
                        if d == wire::Deflate::Context {
                            conn.inflater = Some(Box::new(Decompress::new(false)));
                        }
                    }
                    Err(e) => {
                        let body = String::from_utf8_lossy(&src[end..src.len().min(end + 200)]);
                        let body = body.trim();
                        return Fate::Drop(Some(if body.is_empty() {
                            e
                        } else {
                            format!("{e} {body:?}")
                        }));
                    }
                }
                conn.st = St::Open;
                pos = end;
            }
            None if src.len() > 16 << 10 => {
                return Fate::Drop(Some("WebSocket upgrade answer too large".into()));
            }
            None => {
                conn.inbuf = src.to_vec();
                return Fate::Keep;
            }
        }
    }
    let mut fate = Fate::Keep;
    while pos < src.len() {
        let deflate = conn.deflate != wire::Deflate::Off;
        let head = match wire::parse_frame(&src[pos..], rules.max_frame, deflate) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => return Fate::Drop(Some(e)),
        };
        let FrameHead {
            fin,
            rsv1,
            opcode,
            start,
            end,
        } = head;
        let payload = &src[pos + start..pos + end];
        pos += end;
        fate = frame(conn, tok, (fin, rsv1), opcode, payload, now, inflate, h);
        if !matches!(fate, Fate::Keep) {
            return fate;
        }
    }
    if pos < src.len() {
        conn.inbuf = src[pos..].to_vec();
    }
    fate
}

/// Inflates one compressed message (RFC 7692 §7.2.2: the `00 00 ff ff` trailer put back) into
/// `inflate.out`: with the pool's inflater, reset first, or the connection's own (`own`: the
/// server keeps context between messages).
fn inflate_msg(
    inflate: &mut Inflate,
    own: Option<&mut Decompress>,
    data: &[u8],
    max: usize,
) -> Result<(), String> {
    let d = match own {
        Some(d) => d,
        None => {
            inflate.shared.reset(false);
            &mut inflate.shared
        }
    };
    let out = &mut inflate.out;
    out.clear();
    for part in [data, &[0, 0, 0xff, 0xff][..]] {
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(4096));
            }
            let (i0, o0) = (d.total_in(), d.total_out());
            let st = d
                .decompress_vec(&part[pos..], out, FlushDecompress::Sync)
                .map_err(|e| format!("server sent invalid DEFLATE data: {e}"))?;
            pos += (d.total_in() - i0) as usize;
            let wrote = d.total_out() - o0;
            if out.len() > max {
                return Err(format!("compressed message inflates past {max} bytes"));
            }
            if st == Status::StreamEnd || (pos == part.len() && out.len() < out.capacity()) {
                break;
            }
            if wrote == 0 && pos < part.len() && out.len() < out.capacity() {
                return Err("server sent DEFLATE data that does not inflate".into());
            }
        }
    }
    Ok(())
}

/// A whole text message to the handler, inflated first when it came compressed.
#[allow(clippy::too_many_arguments)]
fn deliver<A, H: Handler<A>>(
    conn: &mut Conn<A>,
    tok: u64,
    compressed: bool,
    msg: &[u8],
    now: u64,
    inflate: &mut Inflate,
    max: usize,
    h: &mut H,
) -> Fate {
    if !compressed {
        return h.text(conn, tok, msg, now);
    }
    if let Err(e) = inflate_msg(inflate, conn.inflater.as_deref_mut(), msg, max) {
        return Fate::Drop(Some(e));
    }
    let out = std::mem::take(&mut inflate.out);
    let f = h.text(conn, tok, &out, now);
    inflate.out = out;
    f
}

/// One server frame (RFC 6455 §5): text (whole or in fragments, inflated when compressed) to
/// the handler, pings answered, a close answered and reported. `(fin, rsv1)`: the header's bits.
#[allow(clippy::too_many_arguments)]
fn frame<A, H: Handler<A>>(
    conn: &mut Conn<A>,
    tok: u64,
    (fin, rsv1): (bool, bool),
    opcode: u8,
    payload: &[u8],
    now: u64,
    inflate: &mut Inflate,
    h: &mut H,
) -> Fate {
    const MAX_INFLATED: usize = 64 << 20;
    if rsv1 && opcode != wire::OP_TEXT {
        return Fate::Drop(Some(format!("RSV1 on a frame with opcode {opcode}")));
    }
    match opcode {
        wire::OP_TEXT if fin && !conn.fragmenting => {
            deliver(conn, tok, rsv1, payload, now, inflate, MAX_INFLATED, h)
        }
        wire::OP_TEXT if !conn.fragmenting => {
            conn.fragmenting = true;
            conn.frag_compressed = rsv1;
            conn.frag.clear();
            conn.frag.extend_from_slice(payload);
            Fate::Keep
        }
        wire::OP_CONT if conn.fragmenting => {
            conn.frag.extend_from_slice(payload);
            if !fin {
                return Fate::Keep;
            }
            conn.fragmenting = false;
            let msg = std::mem::take(&mut conn.frag);
            let compressed = std::mem::take(&mut conn.frag_compressed);
            let f = deliver(conn, tok, compressed, &msg, now, inflate, MAX_INFLATED, h);
            conn.frag = if msg.capacity() > 4096 {
                Vec::new()
            } else {
                msg
            };
            f
        }
        wire::OP_BINARY if !conn.fragmenting => {
            Fate::Drop(Some("server sent a binary frame".into()))
        }
        wire::OP_PING => {
            let m = conn.next_mask();
            wire::encode_frame(&mut conn.outbuf, wire::OP_PONG, payload, m);
            Fate::Keep
        }
        wire::OP_PONG => Fate::Keep,
        wire::OP_CLOSE => {
            if conn.st == St::Closing {
                return Fate::Drop(None);
            }
            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned();
            // Answer the close after whatever is queued (one write, best effort), then drop.
            let m = conn.next_mask();
            let code_only = &payload[..payload.len().min(2)];
            wire::encode_frame(&mut conn.outbuf, wire::OP_CLOSE, code_only, m);
            let _ = conn.stream.write(&conn.outbuf);
            h.server_closed(conn, code);
            let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
            let reason = if reason.is_empty() {
                String::new()
            } else {
                format!(" ({reason})")
            };
            Fate::Drop(Some(format!(
                "server closed the WebSocket with code {code}{reason}"
            )))
        }
        _ => Fate::Drop(Some(format!(
            "unexpected frame opcode {opcode} (fragmenting: {})",
            conn.fragmenting
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bts_guru::ws::codec::{self, Decoder, Inbound};
    use std::net::TcpListener;

    /// Collects what the pool hands to a scenario.
    #[derive(Default)]
    struct Seen {
        texts: Vec<String>,
        closed_with: Option<Option<u16>>,
    }

    impl Handler<()> for Seen {
        fn text(&mut self, _: &mut Conn<()>, _: u64, msg: &[u8], _: u64) -> Fate {
            self.texts.push(String::from_utf8_lossy(msg).into_owned());
            Fate::Keep
        }
        fn server_closed(&mut self, _: &mut Conn<()>, code: Option<u16>) {
            self.closed_with = Some(code);
        }
    }

    /// A listener and a pool aimed at it.
    fn pool(strict_close: bool) -> (TcpListener, Pool<()>) {
        pool_with(strict_close, false)
    }

    fn pool_with(strict_close: bool, deflate: bool) -> (TcpListener, Pool<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Target {
            addr,
            host_header: addr.to_string(),
            path: "/app/key?protocol=7".into(),
            sources: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            max_frame: 1 << 20,
            deflate,
        };
        (listener, Pool::new(&target, 7, strict_close).unwrap())
    }

    /// The server's side of the upgrade: reads the request and accepts it.
    fn accept_upgrade(listener: &TcpListener) -> TcpStream {
        accept_upgrade_with(listener, None)
    }

    /// The same, answering `extension` (which the request must have offered).
    fn accept_upgrade_with(listener: &TcpListener, extension: Option<&str>) -> TcpStream {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
        let ext = match extension {
            Some(e) => {
                assert!(head.contains(wire::DEFLATE_OFFER), "{head}");
                format!("Sec-WebSocket-Extensions: {e}\r\n")
            }
            None => String::new(),
        };
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n{ext}\r\n"
        );
        s.write_all(answer.as_bytes()).unwrap();
        s
    }

    /// The next frame the client sent, checked by the daemon's decoder, and its bytes
    /// (payload unmasked).
    fn client_frame(s: &mut TcpStream, dec: &mut Decoder, buf: &mut Vec<u8>) -> (Inbound, Vec<u8>) {
        loop {
            if let Some((msg, used)) = dec.next(buf, 1 << 20, false).unwrap() {
                return (msg, buf.drain(..used).collect());
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "the client closed TCP");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Drives the pool until `done` says so or a connection is dropped (its error returned).
    fn drive(
        pool: &mut Pool<()>,
        h: &mut Seen,
        mut done: impl FnMut(&mut Pool<()>) -> bool,
    ) -> Option<Option<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut events, mut scratch) = (Vec::new(), vec![0u8; 4096]);
        while Instant::now() < deadline {
            if done(pool) {
                return None;
            }
            pool.wait(20, &mut events).unwrap();
            for &(tok, flags) in &events {
                if let Fate::Drop(e) = pool.io(tok, flags, &mut scratch, h) {
                    pool.remove(tok);
                    return Some(e);
                }
            }
        }
        panic!("the client did not get there within 10 s");
    }

    // Offered and accepted permessage-deflate: the daemon's compressed frames (RSV1) reach the
    // scenario inflated, a fragmented compressed message too, plain ones as they are; every
    // byte read is counted. With context takeover (another server's choice) the connection
    // inflates with its own window.
    #[test]
    fn compressed_messages_arrive_inflated_and_bytes_are_counted() {
        for answer in [
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "permessage-deflate",
        ] {
            let (listener, mut pool) = pool_with(false, true);
            let tok = pool.open(None, ()).unwrap();
            let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let sent2 = sent.clone();
            let server = std::thread::spawn(move || {
                let mut s = accept_upgrade_with(&listener, Some(answer));
                let json = br#"{"event":"match.update","channel":"c","data":"{\"score\":[1,2,1,2,1,2,1,2]}"}"#;
                let f = bts_guru::fanout::frame::SharedFrame::text(json);
                let z = f.deflated().unwrap();
                // The same compressed payload, split in two fragments (RSV1 on the first).
                let body = codec::payload_of(&z);
                let (a, b) = body.split_at(body.len() / 2);
                let mut out = z.to_vec();
                out.extend_from_slice(&f.bytes);
                out.extend_from_slice(&[0x41, a.len() as u8]);
                out.extend_from_slice(a);
                out.extend_from_slice(&[0x80, b.len() as u8]);
                out.extend_from_slice(b);
                s.write_all(&out).unwrap();
                sent2.store(out.len() as u64, std::sync::atomic::Ordering::SeqCst);
                // Then TCP ends: the pool drops the connection after reading everything.
            });
            let mut h = Seen::default();
            let end = drive(&mut pool, &mut h, |_| false);
            assert_eq!(end, Some(Some("server closed the TCP connection".into())));
            let json =
                r#"{"event":"match.update","channel":"c","data":"{\"score\":[1,2,1,2,1,2,1,2]}"}"#;
            assert_eq!(h.texts, vec![json; 3], "{answer}");
            server.join().unwrap();
            let read = pool.take_bytes_in();
            let frames = sent.load(std::sync::atomic::Ordering::SeqCst);
            assert!(
                read > frames,
                "{read} read, {frames} in frames (plus the 101)"
            );
            assert_eq!(pool.take_bytes_in(), 0);
            let _ = tok;
        }
    }

    // A message split in fragments with a ping between them arrives whole; the ping is
    // answered with a pong carrying its payload; a close from the server is answered with its
    // code, reported to the scenario with it, and ends the connection with its reason.
    #[test]
    fn fragments_pings_and_the_servers_close() {
        let (listener, mut pool) = pool(false);
        let tok = pool.open(None, ()).unwrap();
        let server = std::thread::spawn(move || {
            let mut s = accept_upgrade(&listener);
            let mut out = vec![0x01, 3];
            out.extend_from_slice(b"hel");
            out.extend_from_slice(&codec::server_frame(codec::OP_PING, b"p"));
            out.extend_from_slice(&[0x80, 2]);
            out.extend_from_slice(b"lo");
            out.extend_from_slice(&codec::close_frame(4001, "bye"));
            s.write_all(&out).unwrap();
            let (mut dec, mut buf) = (Decoder::default(), Vec::new());
            let pong = client_frame(&mut s, &mut dec, &mut buf);
            let close = client_frame(&mut s, &mut dec, &mut buf);
            (pong, close)
        });
        let mut seen = Seen::default();
        let end = drive(&mut pool, &mut seen, |_| false).expect("dropped");
        assert_eq!(seen.texts, vec!["hello".to_string()]);
        assert_eq!(seen.closed_with, Some(Some(4001)));
        assert_eq!(
            end.as_deref(),
            Some("server closed the WebSocket with code 4001 (bye)")
        );
        assert!(pool.get_mut(tok).is_none());
        let ((pong, pong_bytes), (close, _)) = server.join().unwrap();
        assert_eq!(pong, Inbound::Pong);
        assert_eq!(pong_bytes.last(), Some(&b'p'), "the pong echoes the ping");
        assert_eq!(close, Inbound::Close(Some(4001)));
    }

    // We close; the server reads our close frame and ends TCP without answering it. The soak
    // (strict) counts that as an error, churn (lenient) as the end of a cycle.
    #[test]
    fn a_close_the_server_does_not_answer() {
        for strict in [true, false] {
            let (listener, mut pool) = pool(strict);
            let tok = pool.open(None, ()).unwrap();
            let server = std::thread::spawn(move || {
                let mut s = accept_upgrade(&listener);
                let (mut dec, mut buf) = (Decoder::default(), Vec::new());
                client_frame(&mut s, &mut dec, &mut buf).0
            });
            let mut seen = Seen::default();
            let open = |p: &mut Pool<()>| p.get_mut(tok).is_some_and(|c| c.st == St::Open);
            assert_eq!(drive(&mut pool, &mut seen, open), None);
            pool.get_mut(tok).unwrap().start_close();
            assert!(matches!(pool.flush(tok), Fate::Keep));
            assert_eq!(server.join().unwrap(), Inbound::Close(Some(1000)));
            let end = drive(&mut pool, &mut seen, |_| false).expect("dropped");
            let want = strict.then(|| "server closed TCP before answering our close frame".into());
            assert_eq!(end, want, "strict: {strict}");
            assert_eq!(seen.closed_with, None);
        }
    }
}
