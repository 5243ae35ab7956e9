//! The shard's private io_uring for broadcast writes: after a burst, one `io_uring_enter` sends
//! the queued frames of up to `ENTRIES` connections, one `SENDMSG` (all of a connection's queued
//! frames as iovecs) each, instead of one `sendmsg(2)` system call per connection.
//!
//! Every entry carries `MSG_DONTWAIT`, so the kernel completes it inline during the submit
//! (a full socket answers `-EAGAIN` instead of parking the request): the completions are all
//! there when `submit_and_wait` returns, nothing is left in flight, and glommio's own rings never
//! see this one. What a socket did not take goes back to the connection's task, exactly as after
//! a short `sendmsg`. See `docs/glommio-findings.md` §3 for the measurements that
//! motivated it; BENCHMARKS.md for what it gains here.

use std::os::fd::RawFd;
use std::rc::Rc;

use io_uring::{opcode, types, IoUring};

/// What the ring writes: a connection with an outbound queue.
pub trait Peer {
    fn raw_fd(&self) -> RawFd;
    /// Fills `iov` with queued frames and returns (iovecs used, bytes), or `None` when this
    /// connection must be written the ordinary way. The memory the iovecs point at must stay
    /// unchanged and alive until `complete_send`.
    fn prepare_send(&self, iov: &mut [libc::iovec]) -> Option<(usize, usize)>;
    /// The entry's result: bytes sent, or `-errno`; `asked` is what `prepare_send` returned.
    fn complete_send(&self, res: i32, asked: usize);
    /// Writes the connection with `sendmsg` (when the ring cannot).
    fn flush_and_notify(&self);
}

/// Connections per `io_uring_enter`.
pub const ENTRIES: usize = 256;
/// Frames of one connection per entry; a connection with more queued is finished by
/// `Peer::complete_send` after its entry completes.
pub const IOV_PER_ENTRY: usize = 16;

pub struct SendRing<C: Peer> {
    ring: IoUring,
    /// One header per entry, pointing into `iovs`; both live as long as the ring, so the
    /// pointers in a submitted entry stay valid until its completion is reaped.
    hdrs: Box<[libc::msghdr]>,
    iovs: Box<[libc::iovec]>,
    /// Per entry: the connection, the bytes its entry asked to send, and whether it completed.
    pending: Vec<(Rc<C>, usize, bool)>,
}

impl<C: Peer> SendRing<C> {
    /// A ring of `ENTRIES` entries, or why there is none (io_uring disabled, memlock, an old
    /// kernel): the caller then writes with one `sendmsg` per connection.
    pub fn new() -> std::io::Result<SendRing<C>> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(ENTRIES as u32)
            .or_else(|_| IoUring::new(ENTRIES as u32))?;
        // SAFETY: msghdr and iovec are plain old data; all-zero values are valid (empty).
        let hdrs = (0..ENTRIES)
            .map(|_| unsafe { std::mem::zeroed::<libc::msghdr>() })
            .collect();
        let iovs = (0..ENTRIES * IOV_PER_ENTRY)
            .map(|_| libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            })
            .collect();
        Ok(SendRing {
            ring,
            hdrs,
            iovs,
            pending: Vec::with_capacity(ENTRIES),
        })
    }

    /// Writes the queued frames of every connection in `conns` (emptied), `ENTRIES` per system
    /// call. Connections the ring cannot serve (TLS, blocked, closing, nothing queued) get
    /// `Peer::flush_and_notify` instead. `Err`: the ring failed; the connections not yet written
    /// are left in `conns` for the caller to write the ordinary way.
    pub fn send(&mut self, conns: &mut Vec<Rc<C>>) -> std::io::Result<()> {
        while !conns.is_empty() {
            let take = conns.len().min(ENTRIES);
            self.pending.clear();
            {
                let mut sq = self.ring.submission();
                for conn in conns.drain(..take) {
                    let slot = self.pending.len();
                    let iov = &mut self.iovs[slot * IOV_PER_ENTRY..(slot + 1) * IOV_PER_ENTRY];
                    let Some((count, total)) = conn.prepare_send(iov) else {
                        conn.flush_and_notify();
                        continue;
                    };
                    let hdr = &mut self.hdrs[slot];
                    hdr.msg_iov = iov.as_mut_ptr();
                    hdr.msg_iovlen = count as _;
                    let entry = opcode::SendMsg::new(types::Fd(conn.raw_fd()), hdr)
                        .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                        .build()
                        .user_data(slot as u64);
                    // SAFETY: the entry's msghdr and iovecs live in `self` and are not touched
                    // until its completion is reaped below; the iovecs point into frames queued
                    // on `conn`, which stay queued (nothing else runs on this thread) until
                    // `Peer::complete_send` advances past them; the fd is the open socket of a
                    // connection held alive by `pending`.
                    if unsafe { sq.push(&entry) }.is_err() {
                        // Cannot happen (the queue holds ENTRIES and is empty at each round).
                        conn.flush_and_notify();
                        continue;
                    }
                    self.pending.push((conn, total, false));
                }
            }
            if self.pending.is_empty() {
                continue;
            }
            let want = self.pending.len();
            let mut reaped = 0;
            let mut res = self.ring.submit_and_wait(want);
            loop {
                self.reap(&mut reaped);
                if reaped >= want {
                    break;
                }
                match res {
                    Err(e) if e.kind() != std::io::ErrorKind::Interrupted => {
                        // Entries the kernel took complete inline and were reaped above; the
                        // rest are written the ordinary way, and the caller drops the ring.
                        self.recover();
                        return Err(e);
                    }
                    // Not expected with MSG_DONTWAIT (all complete inline), but never leave an
                    // entry whose buffers could change behind the kernel's back.
                    _ => res = self.ring.submit_and_wait(want - reaped),
                }
            }
            self.pending.clear();
        }
        Ok(())
    }

    fn reap(&mut self, reaped: &mut usize) {
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            if let Some((conn, total, done)) = self.pending.get_mut(slot) {
                if !*done {
                    *done = true;
                    conn.complete_send(cqe.result(), *total);
                    *reaped += 1;
                }
            }
        }
    }

    /// After a failed submit: the connections whose entries never completed are written with
    /// `sendmsg` so nothing is lost. (Their completions, if they still come, are ignored: the
    /// ring is dropped by the caller.)
    fn recover(&mut self) {
        for (conn, _, done) in self.pending.drain(..) {
            if !done {
                conn.flush_and_notify();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// A stand-in connection: a socket and the bytes it should send, in three iovecs.
    struct Pipe {
        tx: UnixStream,
        data: Vec<u8>,
        sent: Cell<usize>,
        results: RefCell<Vec<i32>>,
        fallback: Cell<u32>,
        refuse: bool,
    }

    impl Peer for Pipe {
        fn raw_fd(&self) -> RawFd {
            self.tx.as_raw_fd()
        }
        fn prepare_send(&self, iov: &mut [libc::iovec]) -> Option<(usize, usize)> {
            if self.refuse {
                return None;
            }
            let rest = &self.data[self.sent.get()..];
            let third = rest.len() / 3;
            let parts = [&rest[..third], &rest[third..2 * third], &rest[2 * third..]];
            for (v, p) in iov.iter_mut().zip(parts) {
                *v = libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                };
            }
            Some((3, rest.len()))
        }
        fn complete_send(&self, res: i32, _asked: usize) {
            if res > 0 {
                self.sent.set(self.sent.get() + res as usize);
            }
            self.results.borrow_mut().push(res);
        }
        fn flush_and_notify(&self) {
            self.fallback.set(self.fallback.get() + 1);
        }
    }

    fn pipe(len: usize, seed: u8, refuse: bool) -> (Rc<Pipe>, UnixStream) {
        let (tx, rx) = UnixStream::pair().unwrap();
        let data = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let p = Pipe {
            tx,
            data,
            sent: Cell::new(0),
            results: RefCell::default(),
            fallback: Cell::new(0),
            refuse,
        };
        (Rc::new(p), rx)
    }

    fn ring() -> Option<SendRing<Pipe>> {
        match SendRing::new() {
            Ok(r) => Some(r),
            // A host without io_uring (seccomp, io_uring_disabled): the shard falls back to
            // sendmsg; nothing to test here.
            Err(e) => {
                eprintln!("no io_uring here ({e}); skipping");
                None
            }
        }
    }

    #[test]
    fn sends_every_connection_in_rounds_of_entries() {
        let Some(mut ring) = ring() else { return };
        // More than one round of ENTRIES, and one connection the ring must hand back.
        let n = ENTRIES + 44;
        let mut pipes = Vec::new();
        let mut rxs = Vec::new();
        for i in 0..n {
            let (p, rx) = pipe(600 + i, i as u8, i == 7);
            pipes.push(p);
            rxs.push(rx);
        }
        let mut conns = pipes.clone();
        ring.send(&mut conns).unwrap();
        assert!(conns.is_empty());
        for (i, (p, rx)) in pipes.iter().zip(&mut rxs).enumerate() {
            if i == 7 {
                assert_eq!(
                    p.fallback.get(),
                    1,
                    "refused entry goes to flush_and_notify"
                );
                assert!(p.results.borrow().is_empty());
                continue;
            }
            assert_eq!(
                *p.results.borrow(),
                vec![p.data.len() as i32],
                "connection {i}"
            );
            let mut got = vec![0u8; p.data.len()];
            rx.read_exact(&mut got).unwrap();
            assert_eq!(got, p.data, "connection {i}: bytes and order");
            assert_eq!(p.fallback.get(), 0);
        }
    }

    #[test]
    fn a_full_socket_answers_eagain_or_a_short_write_and_others_still_go() {
        let Some(mut ring) = ring() else { return };
        let (full, _full_rx) = pipe(64 * 1024, 1, false);
        // Fill its send buffer without blocking.
        full.tx.set_nonblocking(true).unwrap();
        let junk = [0u8; 4096];
        while (&full.tx).write(&junk).is_ok() {}
        full.tx.set_nonblocking(false).unwrap();
        let others: Vec<_> = (0..5).map(|i| pipe(1000, i, false)).collect();
        let mut conns = vec![Rc::clone(&full)];
        conns.extend(others.iter().map(|(p, _)| Rc::clone(p)));
        ring.send(&mut conns).unwrap();
        let r = full.results.borrow();
        assert_eq!(r.len(), 1);
        assert!(
            r[0] == -libc::EAGAIN || (0..64 * 1024).contains(&r[0]),
            "full socket: {}",
            r[0]
        );
        for (p, _) in &others {
            assert_eq!(*p.results.borrow(), vec![1000]);
        }
    }
}
