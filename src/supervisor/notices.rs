//! Throttling of the workers' notices across the pool.
//!
//! Each worker sends at most one notice a second per kind and channel (a refusing channel,
//! a full one, a client no channel could take), with how many it held back meanwhile. With
//! W workers that would still be W lines a second about one dead backend: the supervisor
//! passes at most one a second per kind and channel whichever worker sent it, and counts
//! the ones it holds back into the next line it passes, or, when none comes, into the last
//! one it held back, logged once the second is over ([`Gate::due`]). Notices about one
//! worker (out of descriptors) stay per worker: they are news about that worker.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::ipc::{Notice, NoticeLine};
use crate::table::{MAX_CHANNELS, MAX_GROUPS};

/// A little under the workers' one second: a worker's next line, sent a second after its
/// last by the worker's clock, must not arrive a moment early by this one's and wait a
/// second more.
pub const INTERVAL: Duration = Duration::from_millis(900);

/// What a notice is throttled by: its kind, its channel, and the worker for news about one
/// worker.
type Key = (Notice, Option<(u16, u16)>, Option<usize>);

/// When a notice was last passed, how many like it were held back since, and the last of
/// those (its text and worker).
struct Passed {
    at: Instant,
    held: u64,
    last: Option<(String, usize)>,
}

#[derive(Default)]
pub struct Gate {
    seen: HashMap<Key, Passed>,
}

impl Gate {
    /// Whether the notice `line` (`text`, from worker `slot`) goes to the log now: Some(n)
    /// with how many like it were held back since the last one passed (here and in the
    /// workers), None when it is held back (and counted).
    pub fn pass(
        &mut self,
        slot: usize,
        line: &NoticeLine,
        text: &str,
        now: Instant,
    ) -> Option<u64> {
        let worker = line.kind.per_worker().then_some(slot);
        let key = (line.kind, line.channel, worker);
        let held = u64::from(line.held);
        match self.seen.get_mut(&key) {
            Some(p) if now.saturating_duration_since(p.at) < INTERVAL => {
                p.held = p.held.saturating_add(1).saturating_add(held);
                p.last = Some((kept(text), slot));
                None
            }
            Some(p) => {
                p.at = now;
                p.last = None;
                Some(std::mem::take(&mut p.held).saturating_add(held))
            }
            None => {
                let first = Passed {
                    at: now,
                    held: 0,
                    last: None,
                };
                self.seen.insert(key, first);
                Some(held)
            }
        }
    }

    /// The notices held back whose second is over with no line passed since: the last of
    /// each, as logged (counting the others), and its kind. Without this, the count of a
    /// burst that stops, and a worker's line that came a moment after another's, would
    /// never reach the log.
    pub fn due(&mut self, now: Instant) -> Vec<(Notice, String)> {
        let mut lines = Vec::new();
        for ((kind, _, _), p) in &mut self.seen {
            if now.saturating_duration_since(p.at) < INTERVAL {
                continue;
            }
            if let Some((text, slot)) = p.last.take() {
                let others = std::mem::take(&mut p.held).saturating_sub(1);
                p.at = now;
                lines.push((*kind, line(&text, others, slot)));
            }
        }
        lines
    }
}

/// Whether a worker's notice is one a worker sends: about a channel that can exist when
/// its kind is about a channel, about none otherwise.
pub fn valid(line: &NoticeLine) -> bool {
    let about_channel = matches!(line.kind, Notice::Full | Notice::Failed | Notice::Shortage);
    match line.channel {
        Some((g, c)) => about_channel && (g as usize) < MAX_GROUPS && (c as usize) < MAX_CHANNELS,
        None => !about_channel,
    }
}

/// Most of a held-back notice's text kept (a notice is a line of a hundred-odd bytes): a
/// worker sending long ones about every channel cannot make the supervisor hold megabytes.
const KEPT_TEXT: usize = 512;

fn kept(text: &str) -> String {
    let mut end = text.len().min(KEPT_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
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
        assert_eq!(gate.pass(0, &failed(0), "a", t0), Some(0));
        for slot in 1..4 {
            let at = t0 + Duration::from_millis(100 * slot as u64);
            assert_eq!(gate.pass(slot, &failed(0), "b", at), None);
        }
        // Another channel, and another kind on the same channel, are lines of their own.
        let other_channel = notice(Notice::Failed, Some((0, 2)), 0);
        assert_eq!(gate.pass(1, &other_channel, "c", t0), Some(0));
        let other_kind = notice(Notice::Full, Some((0, 1)), 0);
        assert_eq!(gate.pass(1, &other_kind, "d", t0), Some(0));
        // Nothing is due within the second.
        assert!(gate.due(t0 + INTERVAL / 2).is_empty());
        // Worker 2 again, a second later, with 7 it held back itself.
        assert_eq!(gate.pass(2, &failed(7), "e", t0 + INTERVAL), Some(3 + 7));
        // Counted afresh from there.
        let t1 = t0 + INTERVAL;
        let soon = t1 + Duration::from_millis(10);
        assert_eq!(gate.pass(0, &failed(5), "f", soon), None);
        assert_eq!(gate.pass(3, &failed(0), "g", t1 + INTERVAL), Some(6));
        // Counts near the limit saturate nowhere short of the sum.
        let t2 = t1 + INTERVAL;
        for _ in 0..3 {
            assert_eq!(gate.pass(1, &failed(u32::MAX), "h", t2), None);
        }
        let sum = 4 * u64::from(u32::MAX) + 3;
        assert_eq!(
            gate.pass(1, &failed(u32::MAX), "i", t2 + INTERVAL),
            Some(sum)
        );
    }

    /// A burst that stops: what was held back is logged once its second is over, as its
    /// last line with the count of the others, and only once.
    #[test]
    fn what_is_held_back_is_logged_when_its_second_is_over() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        let failed = |held| notice(Notice::Failed, Some((2, 3)), held);
        assert_eq!(gate.pass(0, &failed(0), "refused", t0), Some(0));
        assert_eq!(gate.pass(1, &failed(4), "refused", t0), None);
        assert_eq!(gate.pass(3, &failed(0), "timed out", t0), None);
        assert!(gate.due(t0 + INTERVAL / 2).is_empty());
        let due = gate.due(t0 + INTERVAL);
        let expected = "timed out (5 more like this since the last notice) (worker 3)";
        assert_eq!(due, [(Notice::Failed, expected.to_string())]);
        assert!(gate.due(t0 + 3 * INTERVAL).is_empty());
        // The line logged from what was held back starts the next second.
        let t1 = t0 + INTERVAL;
        assert_eq!(gate.pass(0, &failed(0), "refused", t1 + INTERVAL / 2), None);
        assert_eq!(gate.pass(0, &failed(0), "refused", t1 + INTERVAL), Some(1));
    }

    #[test]
    fn a_notice_is_about_a_channel_that_can_exist_or_about_none() {
        let ok = [
            notice(Notice::Failed, Some((0, 0)), 0),
            notice(Notice::Full, Some((31, 63)), 0),
            notice(Notice::Shortage, Some((1, 2)), u32::MAX),
            notice(Notice::Saturated, None, 0),
            notice(Notice::Source, None, 0),
            notice(Notice::NoChannel, None, 0),
        ];
        assert!(ok.iter().all(valid));
        let bad = [
            notice(Notice::Failed, None, 0),
            notice(Notice::Full, Some((32, 0)), 0),
            notice(Notice::Failed, Some((0, 64)), 0),
            notice(Notice::NoChannel, Some((0, 0)), 0),
            notice(Notice::Saturated, Some((0, 1)), 0),
        ];
        assert!(!bad.iter().any(valid));
    }

    /// A worker out of descriptors is news about that worker: each one's is logged.
    #[test]
    fn notices_about_one_worker_are_throttled_per_worker() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        let saturated = notice(Notice::Saturated, None, 0);
        assert_eq!(gate.pass(0, &saturated, "x", t0), Some(0));
        assert_eq!(gate.pass(1, &saturated, "x", t0), Some(0));
        assert_eq!(gate.pass(1, &saturated, "x", t0), None);
        let turned_away = notice(Notice::NoChannel, None, 0);
        assert_eq!(gate.pass(0, &turned_away, "x", t0), Some(0));
        assert_eq!(gate.pass(1, &turned_away, "x", t0), None);
    }

    #[test]
    fn a_held_back_text_is_kept_short() {
        let mut gate = Gate::default();
        let t0 = Instant::now();
        let failed = notice(Notice::Failed, Some((0, 0)), 0);
        let long = "é".repeat(KEPT_TEXT);
        assert_eq!(gate.pass(0, &failed, &long, t0), Some(0));
        assert_eq!(gate.pass(0, &failed, &long, t0), None);
        let due = gate.due(t0 + INTERVAL);
        assert_eq!(due.len(), 1);
        assert!(due[0].1.starts_with(&"é".repeat(KEPT_TEXT / 2)));
        assert_eq!(
            due[0].1,
            format!("{} (worker 0)", "é".repeat(KEPT_TEXT / 2))
        );
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
