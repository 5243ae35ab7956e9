//! `reconnect`: C viewers on K positioned channels (bts-guru's `resume`); R events/s flow for D
//! seconds while every second a fraction of the viewers lose their connection (TCP shut down,
//! no close frame: a network loss) and reconnect after a pause, subscribing with the last
//! position they saw, as the resume script does. Checks, at every viewer: no loss, no duplicate,
//! no reordering (each channel's events carry a sequence number, so a viewer's sequence must
//! have no gap from its first event to the last one published), every resume answered
//! `recovered: true`; measures resume latency (reconnect started → `bts:recovered`, which
//! follows the last missed event) and the server's CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde_json::json;

use super::preflight;
use super::rows::{cpu_delta, fmt_kib, opt_round};
use crate::client::{Conn, Fate, Handler, Pool};
use crate::publish::Sink;
use crate::report::{round1, thousands, Report};
use crate::stats::{fmt_hist, new_hist, now_ns, summary_us, Errors};
use crate::wire::{find, num_field, str_field};
use crate::{Common, Env, Result};

#[derive(ClapArgs, Debug, Clone)]
pub struct ReconnectArgs {
    /// Viewers (connections).
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub connections: usize,
    /// Positioned channels; viewer i watches channel i mod K.
    #[arg(short = 'k', long, default_value_t = 10)]
    pub channels: usize,
    /// Events per second, all channels together.
    #[arg(short = 'r', long, default_value_t = 50.0)]
    pub rate: f64,
    /// Publishing time, seconds.
    #[arg(short = 'd', long, default_value_t = 10.0)]
    pub duration: f64,
    /// Share of the viewers dropped every second.
    #[arg(long, default_value_t = 0.05)]
    pub drop_fraction: f64,
    /// How long a dropped viewer stays away before reconnecting, ms.
    #[arg(long, default_value_t = 300)]
    pub away_ms: u64,
    /// Channel names are <prefix><i> (the server must list them in `resume`).
    #[arg(long, default_value = "sports.resume.m")]
    pub channel_prefix: String,
    /// After publishing, wait at most this long for every viewer to catch up, ms.
    #[arg(long, default_value_t = 8000)]
    pub drain_ms: u64,
}

pub fn estimate_secs(c: &Common, a: &ReconnectArgs) -> f64 {
    c.connect_secs(a.connections) + a.duration + a.drain_ms as f64 / 1000.0 + 5.0
}

/// One viewer, across its connections.
struct Viewer {
    channel: usize,
    /// The last position it saw (what it resumes from).
    position: Option<Box<[u8]>>,
    /// The last sequence number it got on its channel (0: none yet).
    last: u64,
    /// Its current connection, if any.
    tok: Option<u64>,
    /// When its current connection started (ns), if it is a resume not yet answered.
    resume_started: Option<u64>,
    /// Reconnect after this instant.
    away_until: Option<Instant>,
    subscribed: bool,
}

#[derive(Default)]
struct Counts {
    delivered: u64,
    lost: u64,
    duplicates: u64,
    recovered: u64,
    not_recovered: u64,
    replayed: u64,
    drops: u64,
    server_closes: u64,
}

struct Ctx {
    viewers: Vec<Viewer>,
    channels: Vec<String>,
    counts: Counts,
    resume_latency: Histogram<u64>,
    errors: Errors,
}

impl Handler<usize> for Ctx {
    fn text(&mut self, conn: &mut Conn<usize>, _tok: u64, msg: &[u8], now: u64) -> Fate {
        let v = &mut self.viewers[conn.app];
        let event = str_field(msg, "event").unwrap_or_default();
        match event {
            b"pusher:connection_established" => {
                let mut data = json!({ "channel": self.channels[v.channel] });
                if let Some(p) = &v.position {
                    data["bts_position"] = String::from_utf8_lossy(p).into_owned().into();
                }
                let sub = json!({"event": "pusher:subscribe", "data": data}).to_string();
                conn.send_text(sub.as_bytes());
            }
            b"pusher_internal:subscription_succeeded" => {
                v.subscribed = true;
                if v.position.is_none() {
                    v.position = str_field(msg, "bts_position").map(Into::into);
                }
            }
            b"bts:recovered" => {
                v.position = str_field(msg, "bts_position").map(Into::into);
                if find(msg, b"\\\"recovered\\\":true").is_some() {
                    self.counts.recovered += 1;
                    self.counts.replayed += num_field(msg, "missed").unwrap_or(0);
                    if let Some(t) = v.resume_started.take() {
                        let _ = self.resume_latency.record(now.saturating_sub(t).max(1));
                    }
                } else {
                    self.counts.not_recovered += 1;
                    v.resume_started = None;
                    self.errors.add(format!(
                        "not recovered: {}",
                        String::from_utf8_lossy(msg)
                            .chars()
                            .take(200)
                            .collect::<String>()
                    ));
                }
            }
            b"tick" => {
                let Some(seq) = num_field(msg, "seq") else {
                    self.errors.add("tick without seq");
                    return Fate::Keep;
                };
                self.counts.delivered += 1;
                // Publishing starts once every viewer is subscribed: the first is 1.
                if seq <= v.last {
                    self.counts.duplicates += 1;
                } else {
                    if seq > v.last + 1 {
                        self.counts.lost += seq - v.last - 1;
                    }
                    v.last = seq;
                }
                v.position = str_field(msg, "bts_position").map(Into::into);
                if v.position.is_none() {
                    self.errors
                        .add("tick without bts_position (is the channel positioned?)");
                }
            }
            b"pusher:error" => self.errors.add(
                String::from_utf8_lossy(msg)
                    .chars()
                    .take(200)
                    .collect::<String>(),
            ),
            _ => {}
        }
        Fate::Keep
    }

    fn server_closed(&mut self, _conn: &mut Conn<usize>, code: Option<u16>) {
        self.counts.server_closes += 1;
        self.errors.add(format!("server closed with {code:?}"));
    }
}

pub fn run(env: &Env, a: &ReconnectArgs) -> Result<Report> {
    if a.connections == 0 || a.channels == 0 || a.rate <= 0.0 || a.duration <= 0.0 {
        return Err(
            "reconnect needs --connections, --channels, --rate and --duration above 0".into(),
        );
    }
    env.check_fds(a.connections)?;
    preflight(env, true)?;
    let channels: Vec<String> = (0..a.channels)
        .map(|i| format!("{}{i}", a.channel_prefix))
        .collect();
    let target = env.target();
    let mut pool: Pool<usize> =
        Pool::new(&target, 0x5eed, false).map_err(|e| format!("epoll: {e}"))?;
    let mut ctx = Ctx {
        viewers: (0..a.connections)
            .map(|i| Viewer {
                channel: i % a.channels,
                position: None,
                last: 0,
                tok: None,
                resume_started: None,
                away_until: None,
                subscribed: false,
            })
            .collect(),
        channels: channels.clone(),
        counts: Counts::default(),
        resume_latency: new_hist(),
        errors: Errors::default(),
    };
    let sources = env.sources.clone();
    let mut next_src = 0usize;
    let mut open = |pool: &mut Pool<usize>, ctx: &mut Ctx, i: usize| {
        let src = if sources.is_empty() {
            None
        } else {
            next_src = (next_src + 1) % sources.len();
            Some(sources[next_src])
        };
        let v = &mut ctx.viewers[i];
        v.subscribed = false;
        v.away_until = None;
        v.resume_started = v.position.as_ref().map(|_| now_ns());
        match pool.open(src, i) {
            Ok(tok) => v.tok = Some(tok),
            Err(e) => {
                ctx.errors.add(e);
                v.away_until = Some(Instant::now() + Duration::from_millis(100));
            }
        }
    };
    let s0 = env.server();
    let mut scratch = vec![0u8; 64 << 10];
    let mut events = Vec::with_capacity(1024);
    let step = |pool: &mut Pool<usize>,
                ctx: &mut Ctx,
                scratch: &mut Vec<u8>,
                events: &mut Vec<(u64, u32)>,
                wait: i32| {
        if let Err(e) = pool.wait(wait, events) {
            ctx.errors.add(format!("epoll_wait: {e}"));
        }
        for &(tok, flags) in events.iter() {
            if let Fate::Drop(err) = pool.io(tok, flags, scratch, ctx) {
                if let Some(conn) = pool.remove(tok) {
                    let v = &mut ctx.viewers[conn.app];
                    v.tok = None;
                    v.away_until = Some(Instant::now() + Duration::from_millis(50));
                    if let Some(e) = err {
                        ctx.errors.add(e);
                    }
                }
            }
        }
        pool.recycle();
    };
    // Connect everyone and wait until subscribed.
    for i in 0..a.connections {
        open(&mut pool, &mut ctx, i);
        if i % 200 == 199 {
            step(&mut pool, &mut ctx, &mut scratch, &mut events, 0);
        }
    }
    let limit = Instant::now() + Duration::from_secs(60);
    while ctx.viewers.iter().any(|v| !v.subscribed) && Instant::now() < limit {
        step(&mut pool, &mut ctx, &mut scratch, &mut events, 10);
    }
    if ctx.viewers.iter().any(|v| !v.subscribed) {
        return Err("not every viewer subscribed within 60 s".into());
    }
    let s1 = env.server();
    eprintln!(
        "bts-guru-bench: {} viewers subscribed; publishing {}/s for {} s, dropping {}% a second",
        a.connections,
        a.rate,
        a.duration,
        a.drop_fraction * 100.0
    );

    // The publisher: event i goes to channel i mod K with that channel's next sequence number.
    let total = (a.rate * a.duration).round().max(1.0) as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let publisher = {
        let mut sink = Sink::open(&env.via, &env.creds)?;
        let channels = channels.clone();
        let (rate, stop, sent) = (a.rate, Arc::clone(&stop), Arc::clone(&sent));
        std::thread::spawn(move || -> (Vec<u64>, Errors) {
            let mut seqs = vec![0u64; channels.len()];
            let mut errors = Errors::default();
            let start = Instant::now();
            for i in 0..total {
                if stop.load(Relaxed) {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let k = (i as usize) % channels.len();
                let data = format!("{{\"seq\":{},\"sent_ns\":{}}}", seqs[k] + 1, now_ns());
                match sink.publish("tick", &[&channels[k]], &data) {
                    Ok(()) => seqs[k] += 1,
                    Err(e) => errors.add(e),
                }
                sent.fetch_add(1, Relaxed);
            }
            (seqs, errors)
        })
    };
    let per_second = ((a.connections as f64) * a.drop_fraction).round() as usize;
    let started = Instant::now();
    let mut next_drop = started + Duration::from_secs(1);
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    while sent.load(Relaxed) < total
        && started.elapsed() < Duration::from_secs_f64(a.duration * 3.0 + 10.0)
    {
        let now = Instant::now();
        if now >= next_drop {
            next_drop += Duration::from_secs(1);
            for _ in 0..per_second {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng as usize) % a.connections;
                let v = &mut ctx.viewers[i];
                let Some(tok) = v.tok.filter(|_| v.subscribed) else {
                    continue;
                };
                if let Some(conn) = pool.remove(tok) {
                    conn.shutdown();
                }
                v.tok = None;
                v.away_until = Some(now + Duration::from_millis(a.away_ms));
                ctx.counts.drops += 1;
            }
        }
        for i in 0..a.connections {
            if ctx.viewers[i].away_until.is_some_and(|t| t <= now) {
                open(&mut pool, &mut ctx, i);
            }
        }
        step(&mut pool, &mut ctx, &mut scratch, &mut events, 5);
    }
    stop.store(true, Relaxed);
    let (seqs, pub_errors) = publisher
        .join()
        .map_err(|_| "publisher panicked".to_owned())?;
    let published_at = started.elapsed();
    // Let everyone come back and catch up.
    let deadline = Instant::now() + Duration::from_millis(a.drain_ms);
    loop {
        let now = Instant::now();
        for i in 0..a.connections {
            if ctx.viewers[i].away_until.is_some_and(|t| t <= now) {
                open(&mut pool, &mut ctx, i);
            }
        }
        let behind = ctx
            .viewers
            .iter()
            .filter(|v| v.tok.is_none() || v.last < seqs[v.channel])
            .count();
        if behind == 0 || now > deadline {
            break;
        }
        step(&mut pool, &mut ctx, &mut scratch, &mut events, 5);
    }
    let s2 = env.server();
    // What is still missing at the end is lost.
    let mut missing_at_end = 0;
    for v in &ctx.viewers {
        missing_at_end += seqs[v.channel].saturating_sub(v.last);
    }
    for mut conn in pool.drain() {
        conn.close_now();
    }

    let c = &ctx.counts;
    let lost = c.lost + missing_at_end;
    let mut r = env.report("reconnect");
    r.set(
        "params",
        json!({
            "connections": a.connections, "channels": a.channels, "rate": a.rate,
            "duration_s": a.duration, "drop_fraction": a.drop_fraction, "away_ms": a.away_ms,
        }),
    );
    r.row(
        "params",
        format!(
            "{} viewers over {} positioned channels, {}/s for {} s, {}% dropped a second, away {} ms",
            thousands(a.connections as u64),
            a.channels,
            a.rate,
            a.duration,
            a.drop_fraction * 100.0,
            a.away_ms
        ),
    );
    let published: u64 = seqs.iter().sum();
    r.row(
        "published",
        format!("{published} events in {:.1} s", published_at.as_secs_f64()),
    );
    r.row(
        "drops / resumes",
        format!(
            "{} dropped; {} recovered, {} not recovered; {} events replayed; {} server closes",
            c.drops, c.recovered, c.not_recovered, c.replayed, c.server_closes
        ),
    );
    r.row(
        "deliveries",
        format!(
            "{} delivered, {lost} lost, {} duplicate or out of order",
            c.delivered, c.duplicates
        ),
    );
    r.row("resume latency", fmt_hist(&ctx.resume_latency));
    // ms of server CPU from the last subscribe to the end of the catch-up.
    let cpu = cpu_delta(s1, s2);
    let per_1000 = cpu.map(|ms| ms / (c.delivered.max(1) as f64 / 1000.0));
    r.row(
        "server",
        format!(
            "CPU {} ms while publishing ({} ms per 1,000 deliveries); RSS {} → {}",
            cpu.map_or("n/a".into(), |s| format!("{s:.0}")),
            per_1000.map_or("n/a".into(), |u| format!("{u:.3}")),
            fmt_kib(s0),
            fmt_kib(s2)
        ),
    );
    r.set(
        "result",
        json!({
            "published": published, "delivered": c.delivered, "lost": lost,
            "duplicates": c.duplicates, "drops": c.drops, "recovered": c.recovered,
            "not_recovered": c.not_recovered, "replayed": c.replayed,
            "server_closes": c.server_closes,
            "resume_latency_us": summary_us(&ctx.resume_latency),
            "server_cpu_ms": opt_round(cpu.map(round1)),
            "server_cpu_ms_per_1000_deliveries": opt_round(per_1000),
        }),
    );
    let mut errors = ctx.errors;
    errors.merge(&pub_errors);
    r.set("errors", errors.to_json());
    if lost > 0 {
        r.problem(format!("{lost} events lost"));
    }
    if c.duplicates > 0 {
        r.problem(format!("{} duplicate or out-of-order events", c.duplicates));
    }
    if c.not_recovered > 0 {
        r.problem(format!("{} resumes not recovered", c.not_recovered));
    }
    if c.recovered == 0 {
        r.problem("no resume happened");
    }
    if !pub_errors.is_empty() {
        r.problem(format!("{} publish errors", pub_errors.total()));
    }
    r.plots
        .push(("resume latency".into(), ctx.resume_latency.clone()));
    Ok(r)
}
