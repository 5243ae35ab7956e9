//! A shard's connections: the slab that names them (`ConnId`: slot and generation, so a stale id
//! never reaches a newer connection), registering and forgetting them, and the per-app
//! connection count each one holds while it lives (`AppConnGuard`).
//!
//! The slab is the only owner of a shard's `Rc<Conn>`s; everything else names connections by id.

use std::rc::Rc;
use std::sync::atomic::Ordering;

use super::conn::{Conn, Extra};
use super::{bump, Shard};
use crate::fanout::router::ConnId;
use crate::protocol::SocketId;

#[derive(Default)]
pub(super) struct Slab {
    entries: Vec<(u32, Option<Rc<Conn>>)>,
    free: Vec<u32>,
    len: usize,
}

impl Slab {
    pub(super) fn insert(&mut self, make: impl FnOnce(ConnId) -> Rc<Conn>) -> Rc<Conn> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push((0, None));
                (self.entries.len() - 1) as u32
            }
        };
        let entry = &mut self.entries[slot as usize];
        entry.0 = entry.0.wrapping_add(1);
        let conn = make(ConnId { slot, gen: entry.0 });
        entry.1 = Some(Rc::clone(&conn));
        self.len += 1;
        conn
    }

    pub(super) fn get(&self, id: ConnId) -> Option<&Rc<Conn>> {
        match self.entries.get(id.slot as usize) {
            Some((gen, Some(c))) if *gen == id.gen => Some(c),
            _ => None,
        }
    }

    pub(super) fn remove(&mut self, id: ConnId) {
        if let Some(entry) = self.entries.get_mut(id.slot as usize) {
            if entry.0 == id.gen && entry.1.take().is_some() {
                self.free.push(id.slot);
                self.len -= 1;
            }
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Rc<Conn>> {
        self.entries.iter().filter_map(|(_, c)| c.as_ref())
    }

    /// Owned handles, for loops that may touch the slab while they run.
    pub(super) fn all(&self) -> Vec<Rc<Conn>> {
        self.iter().cloned().collect()
    }
}

impl Shard {
    /// A fresh socket id: the low half is unique per process (counter × shards + shard), the
    /// high half random, both in Pusher's `<digits>.<digits>` form.
    pub(super) fn new_socket_id(&self) -> SocketId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        SocketId {
            hi: self.random() % 1_000_000_000 + 1,
            lo: n * self.shared.cfg.shards() as u64 + self.id as u64 + 1,
        }
    }

    pub fn register(&self, app: usize, fd: std::os::fd::RawFd) -> Rc<Conn> {
        self.register_with(app, fd, None, 0)
    }

    /// Registers a connection, with its TLS state when it came in over wss://.
    pub fn register_with(
        &self,
        app: usize,
        fd: std::os::fd::RawFd,
        tls: Option<Box<rustls::ServerConnection>>,
        deflate: u8,
    ) -> Rc<Conn> {
        bump(&self.stats.connects);
        let socket_id = self.new_socket_id();
        self.conns.borrow_mut().insert(|id| {
            Rc::new(Conn::new(
                id,
                socket_id,
                app,
                fd,
                tls,
                self.shared.cfg.max_outbound_bytes,
                deflate,
            ))
        })
    }

    /// Forgets a finished connection: its subscriptions, counts and presence memberships.
    pub fn unregister(&self, conn: &Conn) {
        let code = conn.close_code().unwrap_or(1006);
        *self.stats.closes.borrow_mut().entry(code).or_default() += 1;
        conn.mark_dead();
        let chans = self.with_channel_count(conn.app, |index| index.remove_conn(conn.id));
        for (app, ch) in &chans {
            self.count_changed(*app, ch, -1);
        }
        if let Some(ext) = conn.take_ext() {
            let Extra {
                user,
                watchlist,
                presence,
                ..
            } = *ext;
            for (ch, user) in presence {
                self.send_leave(conn, &ch, &user);
            }
            if let Some(user) = user {
                self.user_offline(conn, &user, watchlist);
            }
        }
        self.conns.borrow_mut().remove(conn.id);
    }

    /// The live connection with this id, if any.
    pub(crate) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(id).cloned()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.borrow().len
    }
}

/// Decrements an app's live-connection count when a connection ends, however it ends.
pub(crate) struct AppConnGuard {
    shard: Rc<Shard>,
    app: usize,
}

impl AppConnGuard {
    /// Counts a new connection; `None` (and nothing counted) when the app is at `max`.
    pub(crate) fn try_new(shard: Rc<Shard>, app: usize, max: Option<usize>) -> Option<Self> {
        let counter = &shard.shared.app_conns[app];
        let before = counter.fetch_add(1, Ordering::Relaxed);
        if max.is_some_and(|m| before >= m) {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(AppConnGuard { shard, app })
    }
}

impl Drop for AppConnGuard {
    fn drop(&mut self) {
        self.shard.shared.app_conns[self.app].fetch_sub(1, Ordering::Relaxed);
    }
}
