//! Throttling of the workers' notices across the pool.
//!
//! Each worker sends at most one notice a second per kind and channel (a refusing channel,
//! a full one, a client no channel could take), with how many it held back meanwhile. With
//! W workers that would still be W lines a second about one dead backend: the supervisor
//! passes at most one a second per kind and channel whichever worker sent it, and counts
//! the ones it holds back into the next line it passes. Notices about one worker (out of
//! descriptors) stay per worker: they are news about that worker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ipc::{Notice, NoticeLine};

/// At most one line a second per key, as in each worker.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What a notice is throttled by: its kind, its channel, and the worker for news about one
/// worker.
type Key = (Notice, Option<(u16, u16)>, Option<usize>);

/// When a notice was last passed, and how many like it were held back since.
struct Passed {
    at: Instant,
    held: u64,
}

#[derive(Default)]
pub struct Gate {
    seen: HashMap<Key, Passed>,
}

impl Gate {
    /// Whether the notice `line` from worker `slot` goes to the log now: Some(n) with how
    /// many like it were held back since the last one passed (here and in the workers),
    /// None when it is held back (and counted).
    pub fn pass(&mut self, slot: usize, line: &NoticeLine, now: Instant) -> Option<u64> {
        let worker = line.kind.per_worker().then_some(slot);
        let key = (line.kind, line.channel, worker);
        let held = u64::from(line.held);
        match self.seen.get_mut(&key) {
            Some(p) if now.saturating_duration_since(p.at) < INTERVAL => {
                p.held = p.held.saturating_add(1).saturating_add(held);
                None
            }
            Some(p) => {
                p.at = now;
                Some(std::mem::take(&mut p.held).saturating_add(held))
            }
            None => {
                self.seen.insert(key, Passed { at: now, held: 0 });
                Some(held)
            }
        }
    }
}

/// The line as logged: the worker's text, what was held back, the worker.
pub fn line(text: &str, held: u64, slot: usize) -> String {
    if held > 0 {
        format!("{text} ({held} more like this since the last notice) (worker {slot})")
    } else {
        format!("{text} (worker {slot})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(kind: Notice, channel: Option<(u16, u16)>, held: u32) -> NoticeLine {
        NoticeLine {
            kind,
            channel,
            held,
        }
    }

    /// Four workers meeting the same refusing channel within a second: one line, and the
    /// next one a second later counts the three held back and what the workers held.
    #[test]
    fn one_line_a_second_per_channel_whichever_worker_sends_it() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        let failed = |held| notice(Notice::Failed, Some((0, 1)), held);
        assert_eq!(gate.pass(0, &failed(0), t0), Some(0));
        for slot in 1..4 {
            let at = t0 + Duration::from_millis(100 * slot as u64);
            assert_eq!(gate.pass(slot, &failed(0), at), None);
        }
        // Another channel, and another kind on the same channel, are lines of their own.
        assert_eq!(
            gate.pass(1, &notice(Notice::Failed, Some((0, 2)), 0), t0),
            Some(0)
        );
        assert_eq!(
            gate.pass(1, &notice(Notice::Full, Some((0, 1)), 0), t0),
            Some(0)
        );
        // Worker 2 again, a second later, with 7 it held back itself.
        assert_eq!(gate.pass(2, &failed(7), t0 + INTERVAL), Some(3 + 7));
        // Counted afresh from there.
        let t1 = t0 + INTERVAL;
        assert_eq!(
            gate.pass(0, &failed(5), t1 + Duration::from_millis(10)),
            None
        );
        assert_eq!(gate.pass(3, &failed(0), t1 + INTERVAL), Some(6));
    }

    /// A worker out of descriptors is news about that worker: each one's is logged.
    #[test]
    fn notices_about_one_worker_are_throttled_per_worker() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        let saturated = notice(Notice::Saturated, None, 0);
        assert_eq!(gate.pass(0, &saturated, t0), Some(0));
        assert_eq!(gate.pass(1, &saturated, t0), Some(0));
        assert_eq!(gate.pass(1, &saturated, t0), None);
        let turned_away = notice(Notice::NoChannel, None, 0);
        assert_eq!(gate.pass(0, &turned_away, t0), Some(0));
        assert_eq!(gate.pass(1, &turned_away, t0), None);
    }

    #[test]
    fn the_line_names_the_worker_after_what_was_held_back() {
        assert_eq!(line("x", 0, 2), "x (worker 2)");
        assert_eq!(
            line("x", 4, 2),
            "x (4 more like this since the last notice) (worker 2)"
        );
    }
}
