//! A connection's outbound queue: the frames waiting for its socket, shared broadcasts
//! (`Rc<Bytes>`, one per event per shard) or its own replies, and the byte count every queued
//! frame is held to (`max_outbound_bytes`).
//!
//! No I/O here: the connection (`conn`) writes from it and reports what the socket took
//! (`advance`, which counts frames and bytes written in `metrics`).

use std::collections::VecDeque;
use std::rc::Rc;

use bytes::Bytes;

/// A queued frame: shared by every subscriber (broadcasts) or this connection's own (replies).
pub(super) enum Chunk {
    Shared(Rc<Bytes>),
    Own(Vec<u8>),
}

impl Chunk {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Chunk::Shared(b) => b,
            Chunk::Own(v) => v,
        }
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
