//! Positioned channels: every event on a channel an app names in `resume` carries a
//! **position** (an epoch and an offset), and the node keeps a bounded history of the channel's
//! frames so a client that reconnects with the last position it saw is sent exactly what it
//! missed (`history`). The client side is `resume.js`, served at `/bts-guru/resume.js`.
//!
//! The position travels inside the shared frame, as the last member of the event object:
//! `{"event":…,"channel":…,"data":…,"bts_position":"<epoch>:<offset>"}`. pusher-js decodes
//! `event`, `channel`, `data` and `user_id` only, so stock clients never see it; every
//! subscriber still gets the same bytes.
//!
//! Pure bookkeeping plus locks: no sockets, no shard state. The one place positions are assigned
//! is `node::Shared::deliver`, through [`history::Histories::append`].

pub mod history;
pub mod store;

use std::fmt;

pub use history::{Answer, Histories};

/// Where an event sits in its channel: `epoch` names one unbroken run of offsets (a new one
/// whenever continuity is lost: the node restarted, the channel's history was dropped), and
/// `offset` counts the channel's events in that run from 1. Offset 0 means "before the first
/// event" (a channel whose history is empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

impl Position {
    /// `<16 hex digits>:<decimal offset>`, as written into frames and sent back by clients.
    pub fn parse(s: &str) -> Option<Position> {
        let (e, o) = s.split_once(':')?;
        if e.is_empty() || e.len() > 16 || o.is_empty() || o.len() > 20 {
            return None;
        }
        if !o.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position {
            epoch: u64::from_str_radix(e, 16).ok()?,
            offset: o.parse().ok()?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.epoch, self.offset)
    }
}

/// The name of the top-level member frames carry their position in.
pub const FIELD: &str = "bts_position";

/// The client side, a UMD file: a `<script>` defines `window.BtsGuruResume`, `require()`
/// returns it, and an ES module import of it defines `globalThis.BtsGuruResume`.
pub const SCRIPT: &str = include_str!("resume.js");

/// The same code as an ES module with a default export (`import BtsGuruResume from
/// '/bts-guru/resume.mjs'`): the UMD file run against a module-local `module`.
pub const SCRIPT_MJS: &str = concat!(
    "// bts-guru resume plugin, ES module build of /bts-guru/resume.js\n",
    "const module = { exports: {} };\n",
    include_str!("resume.js"),
    "\nconst BtsGuruResume = module.exports;\n",
    "export const attach = BtsGuruResume.attach;\n",
    "export default BtsGuruResume;\n"
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn positions_round_trip() {
        let p = Position {
            epoch: 0xdead_beef,
            offset: 42,
        };
        assert_eq!(p.to_string(), "00000000deadbeef:42");
        assert_eq!(Position::parse(&p.to_string()), Some(p));
        for bad in [
            "",
            ":",
            "x:1",
            "1:",
            "1:-1",
            "1:1.5",
            "12345678901234567:1",
            "1:1:1",
        ] {
            assert_eq!(Position::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_position_round_trips(epoch: u64, offset: u64) {
            let p = Position { epoch, offset };
            prop_assert_eq!(Position::parse(&p.to_string()), Some(p));
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = Position::parse(&s);
        }
    }
}
