//! One soak connection's life, as its client thread's [`Handler`]: what it subscribes to (and
//! the presence book that follows who is in which channel), its windows' catch-up before it
//! leaves one, how it closes, and every message it reads: deliveries checked against their
//! window, presence views kept, errors counted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::json;

use super::plan::{Board, Kind, Plan};
use super::window::{Seen, Sub, SubSt, Then};
use crate::client::{self, Fate, Handler, St};
use crate::stats::{new_hist, now_ns, Errors};
use crate::wire;

/// What one client thread counted.
pub struct Tally {
    pub establish: Histogram<u64>,
    pub latency: Histogram<u64>,
    pub fence_wait: Histogram<u64>,
    pub errors: Errors,
    pub server_close_codes: BTreeMap<String, u64>,
    pub connects: u64,
    pub established: u64,
    pub connect_failed: u64,
    pub closes_clean: u64,
    pub closes_abrupt: u64,
    pub server_closed: u64,
    pub subscribes: u64,
    pub subscribed: u64,
    pub unsubscribes: u64,
    pub sub_errors: u64,
    pub windows: u64,
    pub deliveries: u64,
    pub steady_deliveries: u64,
    pub missing: u64,
    pub steady_missing: u64,
    pub gaps: u64,
    pub dup_or_reordered: u64,
    pub unexpected: u64,
    pub fence_timeouts: u64,
    pub presence_joins: u64,
    pub presence_refused_by_cap: u64,
    pub dup_added: u64,
    pub unknown_removed: u64,
    pub pings: u64,
    pub malformed: u64,
    pub other: u64,
}

impl Tally {
    pub fn new() -> Tally {
        Tally {
            establish: new_hist(),
            latency: new_hist(),
            fence_wait: new_hist(),
            errors: Errors::default(),
            server_close_codes: BTreeMap::new(),
            connects: 0,
            established: 0,
            connect_failed: 0,
            closes_clean: 0,
            closes_abrupt: 0,
            server_closed: 0,
            subscribes: 0,
            subscribed: 0,
            unsubscribes: 0,
            sub_errors: 0,
            windows: 0,
            deliveries: 0,
            steady_deliveries: 0,
            missing: 0,
            steady_missing: 0,
            gaps: 0,
            dup_or_reordered: 0,
            unexpected: 0,
            fence_timeouts: 0,
            presence_joins: 0,
            presence_refused_by_cap: 0,
            dup_added: 0,
            unknown_removed: 0,
            pings: 0,
            malformed: 0,
            other: 0,
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        let _ = self.establish.add(&o.establish);
        let _ = self.latency.add(&o.latency);
        let _ = self.fence_wait.add(&o.fence_wait);
        self.errors.merge(&o.errors);
        for (k, v) in &o.server_close_codes {
            *self.server_close_codes.entry(k.clone()).or_default() += v;
        }
        self.connects += o.connects;
        self.established += o.established;
        self.connect_failed += o.connect_failed;
        self.closes_clean += o.closes_clean;
        self.closes_abrupt += o.closes_abrupt;
        self.server_closed += o.server_closed;
        self.subscribes += o.subscribes;
        self.subscribed += o.subscribed;
        self.unsubscribes += o.unsubscribes;
        self.sub_errors += o.sub_errors;
        self.windows += o.windows;
        self.deliveries += o.deliveries;
        self.steady_deliveries += o.steady_deliveries;
        self.missing += o.missing;
        self.steady_missing += o.steady_missing;
        self.gaps += o.gaps;
        self.dup_or_reordered += o.dup_or_reordered;
        self.unexpected += o.unexpected;
        self.fence_timeouts += o.fence_timeouts;
        self.presence_joins += o.presence_joins;
        self.presence_refused_by_cap += o.presence_refused_by_cap;
        self.dup_added += o.dup_added;
        self.unknown_removed += o.unknown_removed;
        self.pings += o.pings;
        self.malformed += o.malformed;
        self.other += o.other;
    }
}

/// What a soak thread keeps per connection beside its WebSocket.
pub struct Peer {
    pub closing_since: Option<Instant>,
    pub established: bool,
    pub socket_id: Option<Box<str>>,
    pub steady: bool,
    pub gid: u32,
    pub user: u32,
    pub subs: Vec<Sub>,
    /// Chosen to disconnect: counted out of the population already.
    pub leaving: bool,
    /// Disconnect once no window is catching up (true: without a close frame).
    pub close_when_fenced: Option<bool>,
    /// Remove now, dropping TCP without a close frame.
    pub drop_now: bool,
}

pub type Conn = client::Conn<Peer>;

pub struct Ctx {
    pub plan: Arc<Plan>,
    pub board: Arc<Board>,
    pub rng: u64,
    pub t: Tally,
}

impl Ctx {
    pub fn rand(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.rand() % n.max(1) as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.rand() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Counts a connection out of the population (once).
pub fn leave_pop(ctx: &mut Ctx, conn: &mut Conn, pop: &mut usize) {
    if !conn.app.leaving {
        conn.app.leaving = true;
        *pop -= 1;
        if conn.app.established {
            ctx.board.live.fetch_sub(1, Relaxed);
        }
    }
}

/// The connection is going away: the server drops its presence memberships.
pub fn release_presence(ctx: &mut Ctx, conn: &mut Conn) {
    let plan = ctx.plan.clone();
    let mut book = None;
    for sub in conn.app.subs.iter_mut().filter(|s| s.on_server) {
        sub.on_server = false;
        if let Some(slot) = plan.pres_slot[sub.chan as usize] {
            let b = book.get_or_insert_with(|| ctx.board.book.lock().expect("presence book"));
            book_leave(&mut b[slot], conn.app.user);
        }
    }
}

fn book_leave(members: &mut HashMap<u32, u32>, user: u32) {
    if let Some(n) = members.get_mut(&user) {
        *n -= 1;
        if *n == 0 {
            members.remove(&user);
        }
    }
}

pub fn start_close(ctx: &mut Ctx, conn: &mut Conn, now: Instant) {
    release_presence(ctx, conn);
    conn.start_close();
    conn.app.closing_since = Some(now);
}

/// Disconnects a connection chosen to leave once none of its windows is catching up.
pub fn maybe_close(ctx: &mut Ctx, conn: &mut Conn) {
    let Some(abrupt) = conn.app.close_when_fenced else {
        return;
    };
    if conn.st != St::Open
        || conn
            .app
            .subs
            .iter()
            .any(|s| matches!(s.st, SubSt::Fencing { .. }))
    {
        return;
    }
    conn.app.close_when_fenced = None;
    if abrupt {
        release_presence(ctx, conn);
        conn.app.drop_now = true;
    } else {
        start_close(ctx, conn, Instant::now());
    }
}

/// Before a window ends: wait until every event the server accepted so far has arrived.
pub fn start_fence(ctx: &mut Ctx, conn: &mut Conn, i: usize, then: Then, now: Instant) {
    let sub = &mut conn.app.subs[i];
    let target = ctx.board.answered[sub.chan as usize].load(SeqCst);
    sub.st = SubSt::Fencing {
        target,
        since: now,
        then,
    };
    if sub.abandoned || sub.caught_up(target) {
        complete_fence(ctx, conn, i, now);
    }
}

pub fn complete_fence(ctx: &mut Ctx, conn: &mut Conn, i: usize, now: Instant) {
    let SubSt::Fencing { since, then, .. } = conn.app.subs[i].st else {
        return;
    };
    ctx.t
        .fence_wait
        .saturating_record(now.duration_since(since).as_nanos().max(1) as u64);
    match then {
        Then::Stay => conn.app.subs[i].st = SubSt::Active,
        Then::Unsubscribe => {
            let chan = conn.app.subs[i].chan;
            let name = ctx.plan.channels[chan as usize].clone();
            let msg = json!({"event":"pusher:unsubscribe","data":{"channel": name}}).to_string();
            conn.send_text(msg.as_bytes());
            ctx.t.unsubscribes += 1;
            let sub = &mut conn.app.subs[i];
            sub.st = SubSt::Left;
            sub.on_server = false;
            if let Some(slot) = ctx.plan.pres_slot[chan as usize] {
                let mut book = ctx.board.book.lock().expect("presence book");
                book_leave(&mut book[slot], conn.app.user);
            }
        }
    }
    maybe_close(ctx, conn);
}

/// Subscribes `conn` to `chan`; `false` when the presence channel is full (nothing sent).
fn subscribe(ctx: &mut Ctx, conn: &mut Conn, chan: u32) -> bool {
    let plan = ctx.plan.clone();
    let name = &plan.channels[chan as usize];
    let i = match conn.app.subs.iter().position(|s| s.chan == chan) {
        Some(i) if conn.app.subs[i].on_server => return false,
        Some(i) => i,
        None => {
            conn.app.subs.push(Sub {
                chan,
                st: SubSt::Left,
                on_server: false,
                had_window: false,
                abandoned: false,
                first_required: 0,
                expect: None,
                view: None,
            });
            conn.app.subs.len() - 1
        }
    };
    let socket_id = conn.app.socket_id.as_deref().unwrap_or("");
    let msg = match plan.kinds[chan as usize] {
        Kind::Public | Kind::Private => plan.creds.subscribe_message(socket_id, name, None),
        Kind::Presence => {
            let slot = plan.pres_slot[chan as usize].expect("presence slot");
            {
                let mut book = ctx.board.book.lock().expect("presence book");
                let members = &mut book[slot];
                if !members.contains_key(&conn.app.user) && members.len() >= plan.presence_cap {
                    ctx.t.presence_refused_by_cap += 1;
                    return false;
                }
                *members.entry(conn.app.user).or_default() += 1;
            }
            ctx.t.presence_joins += 1;
            let data = json!({"user_id": format!("u{}", conn.app.user),
                              "user_info": {"name": format!("Soak user {}", conn.app.user)}})
            .to_string();
            plan.creds.subscribe_message(socket_id, name, Some(&data))
        }
    };
    let sub = &mut conn.app.subs[i];
    sub.st = SubSt::Pending {
        since: Instant::now(),
    };
    sub.on_server = true;
    ctx.t.subscribes += 1;
    conn.send_text(msg.as_bytes());
    true
}

/// One random subscription change: subscribe to a channel not held, or leave one.
pub fn sub_op(ctx: &mut Ctx, conn: &mut Conn) {
    let held = conn
        .app
        .subs
        .iter()
        .filter(|s| matches!(s.st, SubSt::Pending { .. } | SubSt::Active))
        .count();
    let add = held == 0 || (held < ctx.plan.max_subs && ctx.rand() & 1 == 0);
    if add {
        for _ in 0..4 {
            let chan = ctx.below(ctx.plan.channels.len()) as u32;
            if subscribe(ctx, conn, chan) {
                return;
            }
        }
        return;
    }
    let active: Vec<usize> = (0..conn.app.subs.len())
        .filter(|&i| matches!(conn.app.subs[i].st, SubSt::Active))
        .collect();
    if active.is_empty() {
        return;
    }
    let i = active[ctx.below(active.len())];
    start_fence(ctx, conn, i, Then::Unsubscribe, Instant::now());
}

impl Handler<Peer> for Ctx {
    fn text(&mut self, conn: &mut Conn, _tok: u64, msg: &[u8], _read_at: u64) -> Fate {
        let fate = text(self, conn, msg);
        if matches!(fate, Fate::Keep) && conn.app.drop_now {
            // Chosen to leave without a close frame: nothing more is read from it.
            return Fate::Drop(None);
        }
        fate
    }

    fn server_closed(&mut self, _conn: &mut Conn, code: Option<u16>) {
        let code = code.map(|c| c.to_string()).unwrap_or_else(|| "none".into());
        *self.t.server_close_codes.entry(code).or_default() += 1;
    }
}

fn text(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) -> Fate {
    if conn.st == St::Closing {
        // The window ended when we decided to leave; what is still in flight is not owed.
        return Fate::Keep;
    }
    let Some(ev) = wire::str_field(msg, "event") else {
        ctx.t.malformed += 1;
        return Fate::Keep;
    };
    if ev == ctx.plan.event.as_bytes() {
        delivery(ctx, conn, msg);
        return Fate::Keep;
    }
    match ev {
        b"pusher:connection_established" => established(ctx, conn, msg),
        b"pusher_internal:subscription_succeeded" => {
            succeeded(ctx, conn, msg);
            Fate::Keep
        }
        b"pusher_internal:member_added" | b"pusher_internal:member_removed" => {
            member_event(ctx, conn, msg, ev == b"pusher_internal:member_added");
            Fate::Keep
        }
        b"pusher:ping" => {
            ctx.t.pings += 1;
            conn.send_text(wire::PUSHER_PONG);
            Fate::Keep
        }
        b"pusher:error" => {
            ctx.board.troubles.fetch_add(1, Relaxed);
            ctx.t.errors.add(wire::pusher_error(msg));
            Fate::Keep
        }
        b"pusher:subscription_error" => {
            let ch = wire::str_field(msg, "channel").unwrap_or(b"");
            let chan = ctx.plan.lookup.get(ch).copied();
            ctx.t.sub_errors += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
            ctx.t.errors.add(format!(
                "pusher:subscription_error on {}: {}",
                String::from_utf8_lossy(ch),
                wire::data_value(msg).unwrap_or_default()
            ));
            if let Some(i) = chan.and_then(|c| conn.app.subs.iter().position(|s| s.chan == c)) {
                let plan = ctx.plan.clone();
                let sub = &mut conn.app.subs[i];
                if sub.on_server {
                    sub.on_server = false;
                    if let Some(slot) = plan.pres_slot[sub.chan as usize] {
                        let mut book = ctx.board.book.lock().expect("presence book");
                        book_leave(&mut book[slot], conn.app.user);
                    }
                }
                sub.st = SubSt::Left;
            }
            Fate::Keep
        }
        b"pusher:pong" | b"pusher_internal:subscription_count" => Fate::Keep,
        _ => {
            ctx.t.other += 1;
            Fate::Keep
        }
    }
}

fn established(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) -> Fate {
    let Some(sid) = wire::socket_id(msg) else {
        return Fate::Drop(Some("connection_established without a socket_id".into()));
    };
    if conn.app.established {
        ctx.t
            .errors
            .add("second pusher:connection_established on one connection");
        return Fate::Keep;
    }
    conn.app.socket_id = Some(sid.into_boxed_str());
    conn.app.established = true;
    ctx.t.established += 1;
    ctx.t
        .establish
        .saturating_record(conn.started.elapsed().as_nanos() as u64);
    if !conn.app.leaving {
        ctx.board.live.fetch_add(1, Relaxed);
    }
    let plan = ctx.plan.clone();
    if conn.app.steady {
        // One channel of each kind, for the whole run.
        let g = conn.app.gid as usize;
        for set in [&plan.public, &plan.private, &plan.presence] {
            if !set.is_empty() {
                subscribe(ctx, conn, set[g % set.len()]);
            }
        }
    } else {
        let n = 1 + ctx.below(2);
        for _ in 0..n {
            let chan = ctx.below(plan.channels.len()) as u32;
            subscribe(ctx, conn, chan);
        }
    }
    Fate::Keep
}

/// The connection's record of the channel a message names; a channel that is not the run's
/// counts as another event, one the connection never subscribed to as unexpected.
fn sub_of<'a>(ctx: &mut Ctx, conn: &'a mut Conn, msg: &[u8]) -> Option<&'a mut Sub> {
    let ch = wire::str_field(msg, "channel").unwrap_or(b"");
    let Some(chan) = ctx.plan.lookup.get(ch).copied() else {
        ctx.t.other += 1;
        return None;
    };
    let sub = conn.app.subs.iter_mut().find(|s| s.chan == chan);
    if sub.is_none() {
        ctx.t.unexpected += 1;
    }
    sub
}

fn succeeded(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) {
    let Some(sub) = sub_of(ctx, conn, msg) else {
        return;
    };
    let chan = sub.chan;
    if !matches!(sub.st, SubSt::Pending { .. }) {
        ctx.t
            .errors
            .add("subscription_succeeded without a subscribe");
        ctx.board.troubles.fetch_add(1, Relaxed);
        return;
    }
    // A new window: every event whose publish begins from now on is owed.
    sub.first_required = ctx.board.started[chan as usize].load(SeqCst);
    sub.expect = None;
    sub.abandoned = false;
    sub.had_window = true;
    sub.st = SubSt::Active;
    ctx.t.subscribed += 1;
    ctx.t.windows += 1;
    if ctx.plan.pres_slot[chan as usize].is_some() {
        let ids: HashSet<u32> = wire::presence_ids(msg)
            .iter()
            .filter_map(|id| user_of(id))
            .collect();
        sub.view = Some(ids);
    }
}

pub fn user_of(id: &str) -> Option<u32> {
    id.strip_prefix('u')?.parse().ok()
}

fn member_event(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8], added: bool) {
    let Some(sub) = sub_of(ctx, conn, msg) else {
        return;
    };
    // Events for a window that ended (or has not been acknowledged yet) are not ours to check.
    if !matches!(sub.st, SubSt::Active | SubSt::Fencing { .. }) {
        return;
    }
    let Some(view) = sub.view.as_mut() else {
        ctx.t.unexpected += 1;
        return;
    };
    let Some(user) = wire::member_id(msg).as_deref().and_then(user_of) else {
        ctx.t.malformed += 1;
        return;
    };
    if added {
        if !view.insert(user) {
            ctx.t.dup_added += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
        }
    } else if !view.remove(&user) {
        ctx.t.unknown_removed += 1;
        ctx.board.troubles.fetch_add(1, Relaxed);
    }
}

fn delivery(ctx: &mut Ctx, conn: &mut Conn, msg: &[u8]) {
    let (Some(seq), Some(sent)) = (wire::num_field(msg, "seq"), wire::num_field(msg, "sent_ns"))
    else {
        ctx.t.malformed += 1;
        return;
    };
    let ch = wire::str_field(msg, "channel").unwrap_or(b"");
    let Some(chan) = ctx.plan.lookup.get(ch).copied() else {
        ctx.t.unexpected += 1;
        return;
    };
    let Some(i) = conn.app.subs.iter().position(|s| s.chan == chan) else {
        ctx.t.unexpected += 1;
        ctx.board.troubles.fetch_add(1, Relaxed);
        return;
    };
    let sub = &mut conn.app.subs[i];
    if sub.abandoned {
        return;
    }
    if !sub.had_window {
        // Before the first subscription_succeeded: no window it could belong to.
        ctx.t.unexpected += 1;
        ctx.board.troubles.fetch_add(1, Relaxed);
        return;
    }
    ctx.t.deliveries += 1;
    if conn.app.steady {
        ctx.t.steady_deliveries += 1;
    }
    ctx.t
        .latency
        .saturating_record(now_ns().saturating_sub(sent).max(1));
    match sub.receive(seq) {
        Seen::InOrder => {}
        Seen::Gap(n) => {
            ctx.t.gaps += 1;
            ctx.t.missing += n;
            if conn.app.steady {
                ctx.t.steady_missing += n;
            }
            ctx.board.troubles.fetch_add(1, Relaxed);
        }
        Seen::Backward => {
            ctx.t.dup_or_reordered += 1;
            ctx.board.troubles.fetch_add(1, Relaxed);
            return;
        }
    }
    if let SubSt::Fencing { target, .. } = sub.st {
        if sub.caught_up(target) {
            complete_fence(ctx, conn, i, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_user_ids_round_trip() {
        assert_eq!(user_of("u42"), Some(42));
        assert_eq!(user_of("42"), None);
        assert_eq!(user_of("u"), None);
    }
}
