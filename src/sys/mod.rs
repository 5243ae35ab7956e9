//! The one module allowed `unsafe`: raw-fd `sendmsg` with iovecs (glommio's stream has no vectored
//! write), the shards' send ring (batched `SENDMSG` through io_uring), handing listening sockets
//! to glommio, CPU affinity, and resource limits.
#![allow(unsafe_code)]

pub mod send_ring;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Most iovecs passed to one `sendmsg`; Linux's UIO_MAXIOV is 1024, 64 frames is plenty.
pub const MAX_IOV: usize = 64;

/// Sends as much of `bufs` as the socket takes now, without blocking: one `sendmsg(2)` with
/// `MSG_DONTWAIT | MSG_NOSIGNAL`. `Err(WouldBlock)` when the send buffer is full.
pub fn send_vectored(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let n = bufs.len().min(MAX_IOV);
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with `struct iovec` on Unix (std docs), and `bufs`
    // outlives the call. sendmsg only reads through msg_iov.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = n as _;
    loop {
        // SAFETY: `fd` is an open socket owned by the caller's connection for the duration of the
        // call; `msg` points at `n` valid iovecs as set above; no ancillary data.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A listening socket with SO_REUSEPORT, so every shard binds its own on the same address and the
/// kernel spreads connections among them. Bound here, on the starting thread, so that a port in
/// use fails start-up with a clear error and port 0 resolves to one port for all shards.
pub fn reuseport_listener(addr: SocketAddr, backlog: i32) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sk = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_port(true)?;
    sk.set_reuse_address(true)?;
    sk.bind(&addr.into())?;
    sk.listen(backlog)?;
    Ok(sk)
}

/// Hands a listening socket to the calling glommio executor.
pub fn into_glommio_listener(sk: Socket) -> glommio::net::TcpListener {
    use std::os::fd::FromRawFd;
    let fd = sk.into_raw_fd();
    // SAFETY: `fd` is a bound, listening TCP socket we own (into_raw_fd gave up ownership), and
    // this runs on the glommio executor that will own it, as from_raw_fd requires.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd) }
}

/// The CPUs in this process's affinity mask, in order; `None` if it cannot be read.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain old data; sched_getaffinity fills it for pid 0 (this thread).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set` exactly.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return None;
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE, the size of the set.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU number too large",
        ));
    }
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe `set`; pid 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Option<libc::rlimit> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct to the pointer we pass.
    (unsafe { libc::getrlimit(resource, &mut rl) } == 0).then_some(rl)
}

/// Raises the soft open-files limit to the hard one (each connection is one fd) and returns it.
pub fn raise_nofile() -> Option<u64> {
    let mut rl = rlimit(libc::RLIMIT_NOFILE)?;
    if rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: setrlimit reads one rlimit struct; raising soft to hard needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
    }
    rlimit(libc::RLIMIT_NOFILE).map(|r| r.rlim_cur)
}

/// RLIMIT_NOFILE (soft, hard).
pub fn nofile_limits() -> Option<(u64, u64)> {
    let rl = rlimit(libc::RLIMIT_NOFILE)?;
    Some((rl.rlim_cur, rl.rlim_max))
}

/// Descriptors this process has open now (entries of /proc/self/fd, less the one reading it).
pub fn open_fds() -> Option<usize> {
    Some(
        std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1),
    )
}

/// Answers a socket we will not serve with `response` and half-closes it, without waiting for
/// anything: one non-blocking `send`, the client's unread bytes drained (bounded) so the close
/// that follows is a FIN after our answer rather than a reset that could destroy it, and
/// `shutdown(SHUT_WR)`. The caller closes the descriptor right after.
pub fn refuse_now(fd: RawFd, response: &[u8]) {
    // SAFETY: `fd` is an open socket the caller owns for the duration of the call; the pointer
    // and length describe `response`, which outlives the call.
    let _ = unsafe {
        libc::send(
            fd,
            response.as_ptr().cast(),
            response.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        // SAFETY: as above; `sink` is a writable buffer of the length passed.
        let n = unsafe { libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
    }
    // SAFETY: shutdown takes plain integers; on a socket it cannot touch memory.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// RLIMIT_MEMLOCK's soft value in bytes; `None` when unlimited.
pub fn memlock_limit() -> Option<u64> {
    let rl = rlimit(libc::RLIMIT_MEMLOCK)?;
    (rl.rlim_cur != libc::RLIM_INFINITY).then_some(rl.rlim_cur)
}

/// Whether this process holds CAP_IPC_LOCK, which exempts it from RLIMIT_MEMLOCK.
pub fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Opts this process out of transparent huge pages (`prctl(PR_SET_THP_DISABLE)`), for every
/// mapping made from now on; `false` if the kernel refused.
///
/// Why: mimalloc asks for huge pages on its arenas (MADV_HUGEPAGE, honoured under the common
/// `madvise` THP mode), so a few live objects keep a whole 2 MiB page resident. With 10,000 idle
/// connections that was 28 of 47 MiB of RSS in huge pages, and 3.3 KiB of RSS per connection
/// instead of 2.1 KiB (BENCHMARKS.md). `BTS_HUGE_PAGES=1` keeps them.
pub fn disable_transparent_huge_pages() -> bool {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integer arguments and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0 }
}

/// Returns memory this thread's allocator heap no longer uses to the OS now (`mi_collect`),
/// instead of when its next allocations get round to it: an idle shard would otherwise keep the
/// pages its handshakes used resident. Cheap when there is nothing to do; shards call it from
/// their 500 ms sweep.
pub fn allocator_collect() {
    // SAFETY: mi_collect only walks this thread's own mimalloc heap; no pointers are passed.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// Resident set size of this process in bytes, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

/// The process allocator: mimalloc, except for page-aligned blocks of 64 KiB and more, which go to
/// the system allocator.
///
/// Why: glommio allocates its io_uring buffers (`io_memory`, 4 KiB aligned) from the global
/// allocator and registers them with 3 rings, pinning them against RLIMIT_MEMLOCK. Taken from
/// mimalloc's huge-page-backed segments, each registration was charged far more than its size
/// (measured: 2 shards x 3 x 512 KiB failed to register under an 8 MiB limit; with the system
/// allocator 3 shards fit without a warning). Nothing on the hot path allocates such blocks.
pub struct Allocator;

fn is_io_block(layout: std::alloc::Layout) -> bool {
    layout.align() >= 4096 && layout.size() >= 64 << 10
}

// SAFETY: every block is freed or resized by the allocator that made it, decided by its layout,
// which the GlobalAlloc contract passes back unchanged; both allocators are GlobalAlloc-correct.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if is_io_block(layout) {
            // SAFETY: forwarded with the caller's (non-zero-size) layout.
            unsafe { std::alloc::System.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if is_io_block(layout) {
            // SAFETY: forwarded with the caller's layout.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        } else {
            // SAFETY: as above.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if is_io_block(layout) {
            // SAFETY: `ptr` came from System.alloc with this layout (same routing rule).
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        } else {
            // SAFETY: `ptr` came from MiMalloc with this layout.
            unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size and layout.align() form a valid layout.
        let new_layout =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (is_io_block(layout), is_io_block(new_layout)) {
            // SAFETY: same allocator on both sides; arguments forwarded unchanged.
            (false, false) => unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) },
            // SAFETY: as above.
            (true, true) => unsafe { std::alloc::System.realloc(ptr, layout, new_size) },
            _ => {
                // Crossing allocators: allocate, copy the common prefix, free the old block.
                // SAFETY: new_layout is valid (see above); ptr is valid for layout.size() bytes
                // and the new block for new_size bytes; they do not overlap.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}
