//! Tests of the history: the replay arithmetic, the bounds, cluster positions, and the
//! model property test (random publishes, drops and resumes).
use super::*;
use proptest::prelude::*;
use std::time::Duration;

fn bounds(events: usize) -> ResumeBounds {
    ResumeBounds {
        events,
        max_replay: events,
        ..ResumeBounds::default()
    }
}

fn frame(i: u64) -> SharedFrame {
    let data = format!("\"{i}\"");
    SharedFrame::event("e", "sports.a", data.as_bytes())
}

/// The offset a positioned frame carries.
fn offset_of(f: &Bytes) -> u64 {
    position_of(f).offset
}

fn position_of(f: &Bytes) -> Position {
    let json = &f[f.iter().position(|b| *b == b'{').unwrap()..];
    let s = std::str::from_utf8(json).unwrap();
    let at = s.rfind("\"bts_position\":\"").unwrap();
    Position::parse(&s[at + 16..s.len() - 2]).unwrap()
}

#[test]
fn replays_exactly_the_gap() {
    let hs = Histories::new(bounds(5), 7);
    let now = Instant::now();
    let mut sent = vec![];
    for i in 0..3 {
        sent.push(hs.append(0, "sports.a", &frame(i), now, |f| f.bytes));
    }
    let a = hs.resume(0, "sports.a", None, now, |a| a);
    assert_eq!(a.head.offset, 3);
    assert_eq!(a.replay, Replay::Fresh);
    let from = Position {
        epoch: a.head.epoch,
        offset: 1,
    };
    let a = hs.resume(0, "sports.a", Some(from), now, |a| a);
    assert_eq!(a.replay, Replay::Recovered(sent[1..].to_vec()));
    let at_head = hs.resume(0, "sports.a", Some(a.head), now, |a| a);
    assert_eq!(at_head.replay, Replay::Recovered(vec![]));
    // Other epoch, or a position from the future: lost, missed unknown.
    for p in [
        Position {
            epoch: a.head.epoch ^ 1,
            offset: 1,
        },
        Position {
            epoch: a.head.epoch,
            offset: 9,
        },
    ] {
        let lost = hs.resume(0, "sports.a", Some(p), now, |a| a);
        assert_eq!(lost.replay, Replay::Lost { missed: None });
    }
    // Older than what is kept (5 events): lost, with how many.
    for i in 3..10 {
        hs.append(0, "sports.a", &frame(i), now, |_| ());
    }
    let old = hs.resume(0, "sports.a", Some(from), now, |a| a);
    assert_eq!(old.replay, Replay::Lost { missed: Some(9) });
    let edge = Position {
        epoch: from.epoch,
        offset: 5,
    };
    let a = hs.resume(0, "sports.a", Some(edge), now, |a| a);
    let Replay::Recovered(r) = a.replay else {
        panic!("{a:?}")
    };
    assert_eq!(
        r.iter().map(offset_of).collect::<Vec<_>>(),
        [6, 7, 8, 9, 10]
    );
}

#[test]
fn age_and_bytes_bound_a_channel() {
    let b = ResumeBounds {
        age: Duration::from_secs(10),
        bytes: 300,
        ..ResumeBounds::default()
    };
    let mut h = ChannelHistory::new(1, Instant::now(), 8);
    let t0 = Instant::now();
    for i in 0..10 {
        h.push(frame(i).bytes, t0, &b);
    }
    assert!(h.bytes <= 300 && h.kept() >= 1, "{}", h.bytes);
    h.expire(t0 + Duration::from_secs(11), &b);
    assert_eq!(h.kept(), 0);
    assert_eq!(h.charge(), CHANNEL_OVERHEAD + 8);
    let from = Position {
        epoch: 1,
        offset: 9,
    };
    assert_eq!(
        h.since(Some(from), 300).replay,
        Replay::Lost { missed: Some(1) }
    );
}

#[test]
fn memory_bound_drops_the_stalest_channels() {
    let b = ResumeBounds {
        memory: 20_000,
        ..ResumeBounds::default()
    };
    let hs = Histories::new(b, 1);
    let t0 = Instant::now();
    let first = hs.append(0, "sports.old", &frame(0), t0, |f| f.bytes);
    let old_pos = position_of(&first);
    for i in 0..2000u64 {
        let ch = format!("sports.{}", i % 50);
        let t = t0 + Duration::from_millis(i + 1);
        hs.append(0, &ch, &frame(i), t, |_| ());
        assert!(hs.stats().0 <= 20_000 + 2_000, "{}", hs.stats().0);
    }
    assert!(hs.stats().2 > 0, "some channel was dropped");
    let a = hs.resume(0, "sports.old", Some(old_pos), t0, |a| a);
    assert_eq!(a.replay, Replay::Lost { missed: None }, "a new epoch");
    assert_ne!(a.head.epoch, old_pos.epoch);
}

#[test]
fn cluster_positions_are_taken_as_given_and_gaps_filled() {
    let hs = Histories::new(bounds(10), 5);
    let epoch = 0xabc;
    let at = |o| Position { epoch, offset: o };
    let raw = |i: u64| frame(i);
    // The first announcement this node sees is offset 3: it reads 1 and 2 from Redis.
    let mut filled = 0;
    let got = hs.append_at(
        0,
        "sports.c",
        at(3),
        &raw(3),
        || {
            filled += 1;
            Some((epoch, vec![(1, raw(1)), (2, raw(2))]))
        },
        |f| offset_of(&f.bytes),
    );
    assert_eq!((got, filled), (Some(3), 1));
    // Following offsets append without asking; one already held is skipped.
    let no_fill = || -> Option<(u64, Vec<(u64, SharedFrame)>)> { panic!("no gap") };
    assert_eq!(
        hs.append_at(0, "sports.c", at(4), &raw(4), no_fill, |f| offset_of(
            &f.bytes
        )),
        Some(4)
    );
    assert_eq!(
        hs.append_at(0, "sports.c", at(4), &raw(4), no_fill, |_| 0),
        None
    );
    let a = hs.resume(0, "sports.c", Some(at(0)), Instant::now(), |a| a);
    let Replay::Recovered(r) = a.replay else {
        panic!("{a:?}")
    };
    assert_eq!(r.iter().map(offset_of).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // A gap Redis cannot fill (trimmed): the history restarts at the announcement.
    hs.append_at(
        0,
        "sports.c",
        at(9),
        &raw(9),
        || Some((epoch, vec![(6, raw(6))])),
        |_| (),
    );
    let a = hs.resume(0, "sports.c", Some(at(4)), Instant::now(), |a| a);
    assert_eq!(a.replay, Replay::Lost { missed: Some(5) });
    let a = hs.resume(0, "sports.c", Some(at(8)), Instant::now(), |a| a);
    let Replay::Recovered(r) = a.replay else {
        panic!("{a:?}")
    };
    assert_eq!(r.iter().map(offset_of).collect::<Vec<_>>(), [9]);
    // A node starting: the preload takes what Redis keeps.
    let fresh = Histories::new(bounds(10), 6);
    fresh.load(
        0,
        "sports.c",
        epoch,
        vec![(7, raw(7)), (8, raw(8))],
        Instant::now(),
    );
    let a = fresh.resume(0, "sports.c", Some(at(6)), Instant::now(), |a| a);
    let Replay::Recovered(r) = a.replay else {
        panic!("{a:?}")
    };
    assert_eq!(r.iter().map(offset_of).collect::<Vec<_>>(), [7, 8]);
}

#[derive(Debug, Clone)]
enum Step {
    Publish,
    /// Client `i` drops its connection.
    Drop(usize),
    /// Client `i` reconnects and resumes from the last position it saw.
    Resume(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Publish),
        1 => (0..3usize).prop_map(Step::Drop),
        1 => (0..3usize).prop_map(Step::Resume),
    ]
}

proptest! {
    /// Model: three clients on one channel; a connected client gets every event live; a
    /// dropped one gets nothing until it resumes, then exactly the replay. Whenever the
    /// replay was possible (`Recovered`), the client's sequence is exactly the published
    /// sequence from its first subscribe; when it was not, the answer says so and is
    /// never a partial replay.
    #[test]
    fn clients_see_the_published_sequence(steps in proptest::collection::vec(step(), 1..200), keep in 1usize..40) {
        let hs = Histories::new(bounds(keep), 3);
        let now = Instant::now();
        let start = hs.resume(0, "sports.a", None, now, |a| a.head);
        let mut published = 0u64;
        // (connected, last position seen, offsets received, broken by a Lost answer)
        let mut clients = vec![(true, start, Vec::<u64>::new(), false); 3];
        for s in steps {
            match s {
                Step::Publish => {
                    let f = hs.append(0, "sports.a", &frame(published), now, |f| f.bytes);
                    published += 1;
                    let off = offset_of(&f);
                    prop_assert_eq!(off, published);
                    for c in clients.iter_mut().filter(|c| c.0) {
                        c.2.push(off);
                        c.1.offset = off;
                    }
                }
                Step::Drop(i) => clients[i].0 = false,
                Step::Resume(i) if !clients[i].0 => {
                    let c = &mut clients[i];
                    let a = hs.resume(0, "sports.a", Some(c.1), now, |a| a);
                    prop_assert_eq!(a.head.offset, published);
                    match a.replay {
                        Replay::Recovered(frames) => {
                            prop_assert_eq!(frames.len() as u64, published - c.1.offset);
                            for f in &frames { c.2.push(offset_of(f)); }
                        }
                        Replay::Lost { missed } => {
                            prop_assert_eq!(missed, Some(published - c.1.offset));
                            prop_assert!(published - c.1.offset > keep as u64);
                            c.3 = true;
                            c.2.clear();
                        }
                        Replay::Fresh => prop_assert!(false, "asked with a position"),
                    }
                    c.1 = a.head;
                    c.0 = true;
                }
                Step::Resume(_) => {}
            }
        }
        for c in clients.iter().filter(|c| !c.3) {
            // Connected now or not, what it got is 1..=its last position, in order, once.
            let want: Vec<u64> = (1..=c.1.offset).collect();
            prop_assert_eq!(&c.2, &want);
        }
    }
}
