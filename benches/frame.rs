//! Micro-benchmarks of the per-event and per-message paths that need no sockets: building the
//! shared frame, parsing a client message, verifying a channel signature, and index churn.
//! Run with `cargo bench`; figures go in BENCHMARKS.md with the machine they came from.

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use bts_guru::fanout::frame::SharedFrame;
use bts_guru::fanout::router::ConnId;
use bts_guru::protocol::{auth, inbound, outbound};
use bts_guru::shard::index::SubscriptionIndex;

const MATCH_UPDATE: &str = r#"{"match_id":12345,"sport_id":"football","league_id":"premier-league","status":"live","home_team":{"id":101,"name":"Team A","score":2},"away_team":{"id":102,"name":"Team B","score":1},"period":"2nd Half","time":"75:00","last_updated":"2025-05-14T01:35:00Z"}"#;

fn frame(c: &mut Criterion) {
    c.bench_function("frame/match_update_3_channels", |b| {
        b.iter(|| {
            let mut data = Vec::with_capacity(MATCH_UPDATE.len() + 64);
            outbound::push_json_str(&mut data, black_box(MATCH_UPDATE));
            for ch in [
                "sports.football",
                "sports.football.leagues.premier-league",
                "sports.football.leagues.premier-league.matches.12345",
            ] {
                black_box(SharedFrame::event("match.update", ch, &data));
            }
        })
    });
}

/// A `match.update`-shaped event whose data is about `n` bytes (the original payload, then
/// more players with their minute-by-minute stats: JSON as repetitive as a real feed's).
fn payload_of_size(n: usize) -> String {
    let mut s = String::from(&MATCH_UPDATE[..MATCH_UPDATE.len() - 1]);
    let mut i = 0;
    s.push_str(r#","players":["#);
    while s.len() + 2 < n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"id":{},"name":"Player {}","team_id":{},"goals":{},"shots":{},"minutes":{}}}"#,
            1000 + i,
            i + 1,
            101 + i % 2,
            i % 3,
            (i * 7) % 5,
            60 + (i * 13) % 31
        ));
        i += 1;
    }
    s.push_str("]}");
    if n < MATCH_UPDATE.len() {
        // Shorter than the match.update itself: its first n bytes (data is a string anyway).
        s = MATCH_UPDATE[..n].to_owned();
    }
    s
}

/// The compress-once step: one event's frame built and compressed beside it (what
/// `node::Shared::deliver` does once per event and channel when compression is on), by payload
/// size, against building the plain frame alone. Prints each size's compressed/plain ratio.
fn deflate(c: &mut Criterion) {
    let mut g = c.benchmark_group("deflate");
    for n in [64usize, 128, 256, 0, 1024, 4096, 16384] {
        // 0: the original match.update payload itself.
        let payload = if n == 0 {
            MATCH_UPDATE.to_owned()
        } else {
            payload_of_size(n)
        };
        let mut data = Vec::new();
        outbound::push_json_str(&mut data, &payload);
        let f = SharedFrame::event(
            "match.update",
            "sports.football.leagues.premier-league",
            &data,
        );
        let plain = f.len();
        let z = f.clone().framed(true).deflated().map_or(plain, |d| d.len());
        let label = if n == 0 {
            "match_update".to_owned()
        } else {
            format!("{n}B")
        };
        eprintln!(
            "deflate/{label}: frame {plain} B, compressed frame {z} B, ratio {:.3}",
            z as f64 / plain as f64
        );
        g.bench_function(format!("frame_only/{label}"), |b| {
            b.iter(|| {
                black_box(
                    SharedFrame::event(
                        "match.update",
                        "sports.football.leagues.premier-league",
                        black_box(&data),
                    )
                    .framed(false),
                )
            })
        });
        g.bench_function(format!("frame_and_deflate/{label}"), |b| {
            b.iter(|| {
                black_box(
                    SharedFrame::event(
                        "match.update",
                        "sports.football.leagues.premier-league",
                        black_box(&data),
                    )
                    .framed(true),
                )
            })
        });
    }
    // Shared context: the match.update with a changed score, compressed independently and as a
    // delta against the previous one (`framed_with`, what `deliver` does in context mode).
    {
        let prev_payload = MATCH_UPDATE.replace(r#""score":2"#, r#""score":1"#);
        let mut prev = Vec::new();
        outbound::push_json_str(&mut prev, &prev_payload);
        let prev = SharedFrame::event(
            "match.update",
            "sports.football.leagues.premier-league",
            &prev,
        );
        let dict = bytes::Bytes::copy_from_slice(prev.payload());
        let mut data = Vec::new();
        outbound::push_json_str(&mut data, MATCH_UPDATE);
        let build = |data: &[u8]| {
            SharedFrame::event(
                "match.update",
                "sports.football.leagues.premier-league",
                data,
            )
            .framed_with(true, Some(|_p: bytes::Bytes| (2, Some((1, dict.clone())))))
        };
        let f = build(&data);
        eprintln!(
            "deflate/delta: match.update frame {} B, independent {} B, delta {} B",
            f.plain_len(),
            f.deflated_bytes().map_or(0, <[u8]>::len),
            f.delta_bytes().map_or(0, <[u8]>::len)
        );
        g.bench_function("frame_deflate_and_delta/match_update", |b| {
            b.iter(|| black_box(build(black_box(&data))))
        });
    }
    // The DEFLATE level (`ws::deflate::LEVEL`) on the original match.update: time and size.
    let mut data = Vec::new();
    outbound::push_json_str(&mut data, MATCH_UPDATE);
    let f = SharedFrame::event(
        "match.update",
        "sports.football.leagues.premier-league",
        &data,
    );
    for level in [1u32, 6, 9] {
        let mut c = flate2::Compress::new(flate2::Compression::new(level), false);
        let mut out = Vec::with_capacity(1024);
        let run = |c: &mut flate2::Compress, out: &mut Vec<u8>| {
            c.reset();
            out.clear();
            c.compress_vec(f.payload(), out, flate2::FlushCompress::Sync)
                .unwrap();
        };
        run(&mut c, &mut out);
        eprintln!(
            "deflate/level_{level}: match.update payload {} B -> {} B",
            f.payload().len(),
            out.len() - 4
        );
        g.bench_function(format!("level_{level}/match_update"), |b| {
            b.iter(|| run(&mut c, &mut out))
        });
    }
    g.finish();
}

fn parse(c: &mut Criterion) {
    let msg = br#"{"event":"pusher:subscribe","data":{"channel":"private-sports.football.leagues.premier-league.matches.12345","auth":"key:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"}}"#;
    c.bench_function("parse/subscribe", |b| {
        let mut buf = msg.to_vec();
        b.iter(|| {
            buf.copy_from_slice(msg);
            let m = inbound::parse(black_box(&mut buf)).unwrap();
            black_box(&m);
        })
    });
}

fn hmac(c: &mut Criterion) {
    let sig = auth::sign("secret", b"1234.5678:private-sports.football");
    let token = format!("key:{sig}");
    c.bench_function("auth/verify_private_channel", |b| {
        b.iter(|| {
            assert!(auth::verify_channel_auth(
                "key",
                "secret",
                black_box("1234.5678"),
                black_box("private-sports.football"),
                None,
                &token
            ))
        })
    });
}

fn index(c: &mut Criterion) {
    let channels: Vec<String> = (0..100)
        .map(|i| format!("sports.football.leagues.l{}.matches.{i}", i % 10))
        .collect();
    c.bench_function("index/subscribe_unsubscribe_10k", |b| {
        b.iter(|| {
            let mut idx = SubscriptionIndex::new(1);
            for n in 0..10_000u32 {
                let id = ConnId { slot: n, gen: 1 };
                idx.subscribe(id, 0, &channels[n as usize % 100]);
            }
            for n in 0..10_000u32 {
                let id = ConnId { slot: n, gen: 1 };
                idx.remove_conn(id);
            }
        })
    });
    let mut idx = SubscriptionIndex::new(1);
    for n in 0..10_000u32 {
        idx.subscribe(ConnId { slot: n, gen: 1 }, 0, &channels[n as usize % 100]);
    }
    c.bench_function("index/lookup", |b| {
        b.iter(|| black_box(idx.subscribers(0, black_box(&channels[42])).len()))
    });
}

criterion_group!(benches, frame, deflate, parse, hmac, index, fanout_10k);
criterion_main!(benches);

/// One event fanned out to 10,000 subscribers of one channel on one shard: the per-subscriber
/// cost of queueing the shared frame (an `Rc` clone and a queue push; no socket I/O here).
fn fanout_10k(c: &mut Criterion) {
    use bts_guru::config::{Cli, Config, RawFile};
    use bts_guru::fanout::router::Broadcast;
    use bts_guru::node::Shared;
    use bts_guru::shard::Shard;
    use std::collections::HashMap;
    use std::sync::Arc;

    let env: HashMap<String, String> = HashMap::new();
    let cfg = Config::from_parts(&Cli::default(), &env, RawFile::default(), vec![0]).unwrap();
    let shard = Shard::new(0, Arc::new(Shared::new(cfg)));
    let conns: Vec<_> = (0..10_000).map(|_| shard.register(0, -1)).collect();
    for conn in &conns {
        shard.bench_subscribe(conn, "sports.football.leagues.premier-league");
    }
    let mut data = Vec::new();
    outbound::push_json_str(&mut data, MATCH_UPDATE);
    let frame = SharedFrame::event(
        "match.update",
        "sports.football.leagues.premier-league",
        &data,
    );
    let channel: Arc<str> = Arc::from("sports.football.leagues.premier-league");
    c.bench_function("fanout/one_event_to_10k_subscribers", |b| {
        b.iter(|| {
            shard.bench_fanout(Broadcast {
                app: 0,
                channel: Arc::clone(&channel),
                frame: frame.clone().framed(false),
                conflate: false,
                except: None,
                cache: false,
                created: std::time::Instant::now(),
            })
        })
    });
}
