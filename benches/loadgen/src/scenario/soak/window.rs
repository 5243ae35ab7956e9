//! Subscription windows and what a subscriber is owed in one.
//!
//! **What a subscriber is owed.** Each channel has one publisher thread and one sequence
//! (`seq` 0, 1, 2...), published in order over one HTTP connection, so every shard sees a
//! channel's events in sequence order. A subscription *window* runs from the client reading
//! `subscription_succeeded` to its unsubscribe (or disconnect). Within a window the sequence
//! numbers received must be consecutive: a jump is a loss, a step back a duplicate or reorder.
//! At its start, every event whose publish *began* after the client read `subscription_succeeded`
//! is owed (the server registered the subscription before sending that), so the first one
//! received may not come after that point. At its end, before unsubscribing or disconnecting,
//! the client waits until it has every event the server had *accepted* (HTTP 200) by then,
//! for at most `--catch-up-s`; what is still missing is counted. Events that arrive after the
//! unsubscribe was sent (fanned out before the server read it) must continue the sequence.
//! Neither edge needs a timing margin.

use std::collections::HashSet;
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Then {
    Unsubscribe,
    Stay,
}

#[derive(Clone, Copy, Debug)]
pub enum SubSt {
    Pending {
        since: Instant,
    },
    Active,
    /// Waiting to have every event up to `target` before `then`.
    Fencing {
        target: u64,
        since: Instant,
        then: Then,
    },
    Left,
}

/// One connection's record of one channel, kept for the connection's life.
pub struct Sub {
    pub chan: u32,
    pub st: SubSt,
    /// A subscribe was sent and no unsubscribe since: the server counts it.
    pub on_server: bool,
    /// An earlier window exists, whose trailing events may still arrive.
    pub had_window: bool,
    /// The window was given up on (catch-up timeout): its events are ignored.
    pub abandoned: bool,
    pub first_required: u64,
    pub expect: Option<u64>,
    pub view: Option<HashSet<u32>>,
}

/// What one received sequence number means for its window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    InOrder,
    /// This many events before it never came.
    Gap(u64),
    /// At or before one already received: a duplicate or a reorder.
    Backward,
}

impl Sub {
    pub fn receive(&mut self, seq: u64) -> Seen {
        let from = self.expect.unwrap_or(self.first_required);
        if self.expect.is_some_and(|e| seq < e) {
            return Seen::Backward;
        }
        self.expect = Some(seq + 1);
        // The first event of a window may be older than `first_required` (published before
        // the subscribe, fanned out after it), never newer.
        if seq > from {
            Seen::Gap(seq - from)
        } else {
            Seen::InOrder
        }
    }

    /// Has every event below `target` that this window is owed.
    pub fn caught_up(&self, target: u64) -> bool {
        self.expect.unwrap_or(self.first_required) >= target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(first_required: u64) -> Sub {
        Sub {
            chan: 0,
            st: SubSt::Active,
            on_server: true,
            had_window: true,
            abandoned: false,
            first_required,
            expect: None,
            view: None,
        }
    }

    fn run(first_required: u64, seqs: &[u64]) -> Vec<Seen> {
        let mut w = window(first_required);
        seqs.iter().map(|&s| w.receive(s)).collect()
    }

    #[test]
    fn a_window_accepts_only_a_gapless_run_that_starts_early_enough() {
        use Seen::*;
        // Events published before the subscribe may still arrive; then every one in order.
        assert_eq!(run(5, &[3, 4, 5, 6]), vec![InOrder; 4]);
        assert_eq!(run(5, &[5, 6, 7]), vec![InOrder; 3]);
        // The first event owed (5) never came.
        assert_eq!(run(5, &[7, 8]), vec![Gap(2), InOrder]);
        // A hole in the middle, a duplicate, a reorder.
        assert_eq!(
            run(0, &[0, 1, 3, 4]),
            vec![InOrder, InOrder, Gap(1), InOrder]
        );
        assert_eq!(
            run(0, &[0, 1, 1, 2]),
            vec![InOrder, InOrder, Backward, InOrder]
        );
        assert_eq!(
            run(0, &[0, 2, 1, 3]),
            vec![InOrder, Gap(1), Backward, InOrder]
        );
    }

    #[test]
    fn catching_up_means_having_everything_below_the_target() {
        let mut w = window(5);
        // Nothing owed below 5.
        assert!(w.caught_up(5));
        assert!(!w.caught_up(6));
        w.receive(4);
        assert!(!w.caught_up(6));
        w.receive(5);
        assert!(w.caught_up(6));
        assert!(!w.caught_up(7));
    }
}
