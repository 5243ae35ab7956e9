//! A connection's outbound queue: the frames waiting for its socket, shared broadcasts
//! (`Rc<Frame>`, one per event per shard) or its own replies, and the byte count every queued
//! frame is held to (`max_outbound_bytes`); and conflation, which drops a queued broadcast a
//! newer one supersedes.
//!
//! No I/O here: the connection (`conn`) writes from it and reports what the socket took
//! (`advance`, which counts frames and bytes written in `metrics`).

use std::collections::VecDeque;
use std::ops::Range;
use std::rc::Rc;

use bytes::Bytes;

use crate::fanout::frame::Framed;

/// A broadcast as a shard holds it: one per event per shard, shared by every local
/// subscriber's queue (and by the channel's cache entry).
#[derive(Debug)]
pub struct Frame {
    /// The frame every subscriber gets unless it negotiated compression, and the same message
    /// compressed once (permessage-deflate) for those that did, when it was compressed (not
    /// below the threshold, compression on, compressible): the `Bytes` the inbox carried, moved
    /// here and only borrowed from, so no reference count is touched per event on the shard.
    pub framed: Framed,
    /// When the event is one its app conflates: the length of the plain payload's prefix that
    /// names the event and its channel (`fanout::frame::conflation_key_len`), and where the
    /// payload starts. A newer frame with the same prefix supersedes this one while it waits
    /// in a slow connection's queue. Positioned channels conflate too: their history keeps
    /// every offset, so a superseded event is never a loss to resume (ARCHITECTURE.md,
    /// "Conflation (issue 16) and resume"; tests/resume.rs).
    pub conflate: Option<Range<usize>>,
}

impl Frame {
    /// A frame nobody conflates or compresses (a presence join's answer, tests).
    pub fn plain(bytes: Bytes) -> Frame {
        Frame {
            framed: Framed::plain_only(bytes),
            conflate: None,
        }
    }

    /// The plain frame.
    pub fn plain_bytes(&self) -> &[u8] {
        self.framed.plain_bytes()
    }

    /// There is a compressed frame.
    pub fn is_deflated(&self) -> bool {
        self.framed.deflated_bytes().is_some()
    }

    /// The bytes a connection is sent: the compressed frame when it negotiated compression and
    /// there is one.
    pub fn for_conn(&self, deflate: bool) -> &[u8] {
        self.form(if deflate { Form::Deflated } else { Form::Plain })
    }

    /// The bytes of one form (a form the frame lacks falls back to the next one it has: delta,
    /// then independent compressed, then plain).
    pub fn form(&self, form: Form) -> &[u8] {
        if form == Form::Delta {
            if let Some(d) = self.framed.delta_bytes() {
                return d;
            }
        }
        match self.framed.deflated_bytes() {
            Some(d) if form != Form::Plain => d,
            _ => self.framed.plain_bytes(),
        }
    }

    /// The form a connection is sent: `deflate`, whether it negotiated compression; `context`,
    /// whether it keeps its window and `last_tag`, the tag of the last compressed message
    /// queued to it (0: unknown). The delta is chosen exactly when its predecessor is that
    /// message: the client's window then ends with the delta's dictionary.
    pub fn choose(&self, deflate: bool, context: bool, last_tag: u64) -> Form {
        if !deflate || !self.is_deflated() {
            return Form::Plain;
        }
        let pred = self.framed.pred_tag();
        if context && pred != 0 && pred == last_tag {
            Form::Delta
        } else {
            Form::Deflated
        }
    }

    /// Same conflation key: the same conflated event on the same channel.
    fn supersedes(&self, older: &Frame) -> bool {
        match (&self.conflate, &older.conflate) {
            (Some(k1), Some(k2)) => {
                self.plain_bytes()[k1.clone()] == older.plain_bytes()[k2.clone()]
            }
            _ => false,
        }
    }
}

/// Which of a broadcast's forms a connection is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// The plain frame (RSV1 clear: leaves the client's window alone).
    Plain,
    /// Compressed on its own (no back-reference before the message).
    Deflated,
    /// Compressed against its predecessor (`Framed::pred_tag`): only right after it.
    Delta,
}

/// A queued frame: shared by every subscriber (broadcasts: the frame and which of its forms
/// this connection is sent) or this connection's own (replies).
pub(super) enum Chunk {
    Shared(Rc<Frame>, Form),
    Own(Vec<u8>),
}

impl Chunk {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Shared(f, form) => f.form(*form),
            Chunk::Own(v) => v,
        }
    }

    /// The tag of the compressed message this chunk is (shared-context mode), or 0.
    fn compressed_tag(&self) -> u64 {
        match self {
            Chunk::Shared(f, Form::Deflated | Form::Delta) => f.framed.tag(),
            _ => 0,
        }
    }

    /// Whether the chunk is sent compressed (RSV1: the client inflates it into its window).
    fn compressed(&self) -> bool {
        matches!(self, Chunk::Shared(_, Form::Deflated | Form::Delta))
    }
}

#[derive(Default)]
pub(super) struct OutQueue {
    pub(super) chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already sent.
    pub(super) head_off: usize,
    /// Unsent bytes in `chunks`, whatever queued them (broadcasts, replies, pings); bounded by
    /// `max_outbound_bytes`, plus at most one final `pusher:error` and close frame.
    pub(super) bytes: usize,
    /// `max_outbound_bytes` (here, next to `bytes`, for the compare on every queued frame).
    pub(super) max: usize,
    /// The last send hit a full socket buffer; the task is waiting for writability.
    pub(super) blocked: bool,
    /// TLS connections: how many chunks at the front are already encrypted records (the rest is
    /// plaintext, sealed just before sending).
    pub(super) sealed: usize,
}

impl OutQueue {
    pub(super) fn push(&mut self, c: Chunk) {
        self.bytes += c.as_slice().len();
        self.chunks.push_back(c);
    }

    /// Drops `n` sent bytes from the front; counts the frames and bytes written.
    pub(super) fn advance(&mut self, mut n: usize) {
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

    pub(super) fn front(&self) -> Option<&[u8]> {
        self.chunks.front().map(|c| &c.as_slice()[self.head_off..])
    }

    /// The unsent bytes, frame by frame: the front frame from `head_off`, then the others.
    pub(super) fn unsent(&self) -> impl Iterator<Item = &[u8]> {
        self.front()
            .into_iter()
            .chain(self.chunks.iter().skip(1).map(Chunk::as_slice))
    }

    /// Conflation: drops every queued frame `newer` supersedes (the same conflated event on the
    /// same channel), except a frame partly sent or possibly being sent (the front one, once
    /// started or while a write waits for the socket) and, with TLS, encrypted records. The
    /// order of what is left is unchanged. Returns how many were dropped.
    ///
    /// Shared context: a dropped compressed frame may be the predecessor of the next compressed
    /// frame queued, a delta; that one is switched to its independent form (the client's window
    /// will not hold the dropped message). `last_tag` (the tag of the last compressed message
    /// queued) is corrected when the dropped frame was the last compressed one: the tag of the
    /// compressed frame before it in the queue, or 0 (unknown) when none is queued.
    pub(super) fn conflate(&mut self, newer: &Frame, last_tag: &mut u64) -> u64 {
        if newer.conflate.is_none() {
            return 0;
        }
        let front_busy = self.head_off > 0 || self.blocked;
        let keep = usize::from(front_busy).max(self.sealed);
        let mut dropped = 0;
        let mut i = keep;
        while i < self.chunks.len() {
            if matches!(&self.chunks[i], Chunk::Shared(f, _) if newer.supersedes(f)) {
                if let Some(c) = self.chunks.remove(i) {
                    self.bytes -= c.as_slice().len();
                    dropped += 1;
                    if c.compressed() {
                        self.unlink(i, last_tag);
                    }
                }
            } else {
                i += 1;
            }
        }
        dropped
    }

    /// A compressed chunk that was at `i` is gone: the next compressed chunk, if a delta, is
    /// sent independent instead; if there is none, `last_tag` becomes the tag of the compressed
    /// chunk before `i` (0 if none is queued).
    fn unlink(&mut self, i: usize, last_tag: &mut u64) {
        for j in i..self.chunks.len() {
            if let Chunk::Shared(f, form) = &mut self.chunks[j] {
                match form {
                    Form::Plain => continue,
                    Form::Deflated => return,
                    Form::Delta => {
                        let before = f.form(Form::Delta).len();
                        *form = Form::Deflated;
                        let after = f.form(Form::Deflated).len();
                        self.bytes = self.bytes + after - before;
                        return;
                    }
                }
            }
        }
        *last_tag = self
            .chunks
            .range(..i)
            .rev()
            .find(|c| c.compressed())
            .map_or(0, Chunk::compressed_tag);
    }

    /// Drops every frame not yet started, keeping a partly sent one (and, with TLS, every
    /// encrypted record: dropping one would break the record sequence) so the stream stays valid.
    pub(super) fn discard_unsent(&mut self) {
        let keep = usize::from(self.head_off > 0).max(self.sealed);
        while self.chunks.len() > keep {
            if let Some(c) = self.chunks.pop_back() {
                self.bytes -= c.as_slice().len();
            }
        }
    }
}

pub(crate) enum Enqueued {
    /// Queued; the connection's unsent bytes now.
    Yes(usize),
    /// Over `max_outbound_bytes`: the connection is being closed with 4100.
    Overflow,
    /// Closing or dead: nothing queued.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// A frame whose bytes start with its sequence number; `key`: its channel and event, if it is
    /// of a conflated event.
    fn frame(seq: u32, len: usize, key: Option<(&Arc<str>, &Arc<str>)>) -> Rc<Frame> {
        let mut b = seq.to_be_bytes().to_vec();
        let mut conflate = None;
        if let Some((channel, event)) = key {
            // The key: the bytes naming the event and the channel.
            b.extend_from_slice(event.as_bytes());
            b.extend_from_slice(channel.as_bytes());
            conflate = Some(4..b.len());
        }
        b.resize(len.max(b.len()), b'.');
        Rc::new(Frame {
            framed: Framed::plain_only(Bytes::from(b)),
            conflate,
        })
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Queue a frame: channel 0..3, of the conflated event or not, its length.
        Push(u8, bool, usize),
        /// The socket takes this many bytes.
        Send(usize),
        /// The socket is full (a write waits) or not.
        Block(bool),
    }

    const MAX_LEN: usize = 300;

    /// A frame queued: (sequence number, its channel if of the conflated event, length).
    type Pushed = (u32, Option<u8>, usize);

    fn op(all_conflated: bool) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, any::<bool>(), 16usize..MAX_LEN)
                .prop_map(move |(c, k, l)| Op::Push(c, k || all_conflated, l)),
            1 => (0usize..2000).prop_map(Op::Send),
            1 => any::<bool>().prop_map(Op::Block),
        ]
    }

    /// Runs `ops` the way `Conn::enqueue_shared` conflates (over `threshold` queued bytes),
    /// checking the queue's byte count and, with `bound`, its size after every push. Returns
    /// what was pushed (seq, channel if conflated, length) and what reached the wire.
    fn run(
        ops: Vec<Op>,
        threshold: usize,
        bound: Option<usize>,
    ) -> Result<(Vec<Pushed>, Vec<u8>), TestCaseError> {
        let channels: Vec<Arc<str>> = (0..3).map(|i| Arc::from(format!("match.{i}"))).collect();
        let event: Arc<str> = Arc::from("match.update");
        let mut q = OutQueue {
            max: usize::MAX,
            ..OutQueue::default()
        };
        let mut pushed = Vec::new();
        let mut wire: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                Op::Push(c, conflated, len) => {
                    let seq = pushed.len() as u32;
                    let key = conflated.then(|| (&channels[c as usize], &event));
                    let f = frame(seq, len, key);
                    if q.bytes > threshold {
                        q.conflate(&f, &mut 0);
                    }
                    pushed.push((seq, conflated.then_some(c), f.plain_bytes().len()));
                    q.push(Chunk::Shared(f, Form::Plain));
                    if let Some(b) = bound {
                        prop_assert!(q.bytes <= b, "{} queued, bound {}", q.bytes, b);
                    }
                }
                Op::Send(n) if !q.blocked => {
                    let n = n.min(q.bytes);
                    wire.extend(q.unsent().flatten().copied().take(n));
                    q.advance(n);
                }
                Op::Send(_) => {}
                Op::Block(b) => q.blocked = b,
            }
            prop_assert_eq!(q.bytes, q.unsent().map(<[u8]>::len).sum::<usize>());
        }
        wire.extend(q.unsent().flatten().copied());
        Ok((pushed, wire))
    }

    /// Shared context: a connection's queue as `Conn::enqueue_shared` drives it, with real
    /// frames (independent and delta forms built as `node::Shared::deliver` builds them) on 3
    /// channels, conflation forced, and a client inflater that keeps its window: every message
    /// on the wire must inflate to exactly its payload, in order.
    fn run_context(ops: Vec<Op>, threshold: usize) -> Result<(), TestCaseError> {
        use crate::fanout::frame::SharedFrame;
        let mut q = OutQueue {
            max: usize::MAX,
            ..OutQueue::default()
        };
        let mut last_tag = 0u64;
        let mut next_tag = 1u64;
        let mut channel_last: [Option<(u64, Bytes)>; 3] = [None, None, None];
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        let mut wire: Vec<u8> = Vec::new();
        let mut deltas = 0;
        for op in ops {
            match op {
                Op::Push(c, conflated, len) => {
                    let seq = payloads.len();
                    let data = format!(
                        "\"{{\\\"seq\\\":{seq},\\\"home\\\":{},\\\"pad\\\":\\\"{}\\\"}}\"",
                        len % 7,
                        "ab".repeat(len / 2)
                    );
                    let name = if conflated {
                        "match.update"
                    } else {
                        "match.event"
                    };
                    let sf = SharedFrame::event(name, &format!("match.{c}"), data.as_bytes());
                    payloads.push(sf.payload().to_vec());
                    let slot = &mut channel_last[c as usize];
                    let framed = sf.framed_with(
                        true,
                        Some(|p: Bytes| {
                            let tag = next_tag;
                            next_tag += 1;
                            (tag, slot.replace((tag, p)))
                        }),
                    );
                    let key = crate::fanout::frame::conflation_key_len(
                        &framed.plain_bytes()[framed.plain_len() - payloads[seq].len()..],
                    );
                    let at = framed.plain_len() - payloads[seq].len();
                    let f = Rc::new(Frame {
                        conflate: if conflated {
                            key.map(|k| at..at + k)
                        } else {
                            None
                        },
                        framed,
                    });
                    if q.bytes > threshold {
                        q.conflate(&f, &mut last_tag);
                    }
                    let form = f.choose(true, true, last_tag);
                    if form == Form::Delta {
                        deltas += 1;
                    }
                    if form != Form::Plain {
                        last_tag = f.framed.tag();
                    }
                    q.push(Chunk::Shared(f, form));
                }
                Op::Send(n) if !q.blocked => {
                    let n = n.min(q.bytes);
                    wire.extend(q.unsent().flatten().copied().take(n));
                    q.advance(n);
                }
                Op::Send(_) => {}
                Op::Block(b) => q.blocked = b,
            }
            prop_assert_eq!(q.bytes, q.unsent().map(<[u8]>::len).sum::<usize>());
        }
        wire.extend(q.unsent().flatten().copied());
        // The client: one inflater for the whole connection (context kept).
        let mut z = flate2::Decompress::new(false);
        let (mut at, mut last_seq) = (0, None);
        while at < wire.len() {
            let (b0, b1) = (wire[at], wire[at + 1]);
            let (len, hdr) = match b1 & 0x7f {
                126 => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
                n => (n as usize, 2),
            };
            let body = &wire[at + hdr..at + hdr + len];
            at += hdr + len;
            let text = if b0 & 0x40 != 0 {
                let mut input = body.to_vec();
                input.extend_from_slice(&crate::ws::deflate::TRAILER);
                let mut out = Vec::with_capacity(64 << 10);
                z.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                    .map_err(|e| TestCaseError::fail(format!("corrupt stream: {e}")))?;
                out
            } else {
                body.to_vec()
            };
            let v: serde_json::Value = serde_json::from_slice(&text)
                .map_err(|e| TestCaseError::fail(format!("bad message {e}: {text:?}")))?;
            let data: serde_json::Value =
                serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
            let seq = data["seq"].as_u64().unwrap() as usize;
            prop_assert_eq!(&text, &payloads[seq], "message {} inflated wrong", seq);
            prop_assert!(last_seq.is_none_or(|l| l < seq), "order");
            last_seq = Some(seq);
        }
        let _ = deltas;
        Ok(())
    }

    proptest! {
        #[test]
        fn deltas_always_follow_their_predecessor_on_the_wire(
            ops in proptest::collection::vec(op(false), 1..150),
            threshold in 0usize..1500,
        ) {
            run_context(ops, threshold)?;
        }
    }

    proptest! {
        /// What goes out is whole frames in the order queued; only frames of the conflated
        /// event are ever missing, and each missing one was followed by a newer frame of the
        /// same channel.
        #[test]
        fn conflation_drops_only_superseded_frames_in_order(
            ops in proptest::collection::vec(op(false), 1..200),
            threshold in 0usize..1500,
        ) {
            let (pushed, wire) = run(ops, threshold, None)?;
            let mut got = Vec::new();
            let mut at = 0;
            while at < wire.len() {
                let seq = u32::from_be_bytes(wire[at..at + 4].try_into().unwrap());
                got.push(seq);
                at += pushed[seq as usize].2;
            }
            prop_assert_eq!(at, wire.len(), "whole frames only");
            prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "order kept: {:?}", got);
            for &(seq, key, _) in &pushed {
                if got.contains(&seq) {
                    continue;
                }
                prop_assert!(key.is_some(), "frame {} of another event was dropped", seq);
                prop_assert!(
                    pushed.iter().any(|&(s, k, _)| s > seq && k == key),
                    "frame {} dropped without a newer one of its channel", seq
                );
            }
        }

        /// With only conflated events on 3 channels, a connection that never reads holds at
        /// most the threshold plus a frame per channel, the front frame and the one crossing.
        #[test]
        fn conflation_bounds_a_stalled_queue(
            ops in proptest::collection::vec(op(true), 1..300),
            threshold in 0usize..1500,
        ) {
            run(ops, threshold, Some(threshold + 5 * MAX_LEN))?;
        }
    }
}
