//! A core's timers, after quinn's `TimerTable`: one deadline per kind of timer, the earliest of
//! its kind, behind `poll_timeout()`. The driver sleeps until the earliest and then calls the
//! core's `handle_timeout(now)`, which does the work and sets each deadline exactly again.
//!
//! Between two `handle_timeout` calls a deadline is only ever lowered (a new room, a new peer):
//! every deadline of a kind is a fixed duration after some instant, so a new one can be the
//! earliest only when none was set. Work that moves a deadline later (a room touched again)
//! leaves the table alone, which costs at most one early wake-up.

use std::time::Instant;

/// The prefill core's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// A room without a sender expires (`orphan_timeout` after it was last touched).
    Orphan,
    /// A decode agent no room refers to is forgotten (`peer_idle_timeout` after it was seen).
    PeerIdle,
    /// A staged room whose next piece waits for a slot fails (`STAGED_STALL_TIMEOUT`).
    StagedStall,
}

const TIMERS: usize = 3;

/// The earliest deadline of each [`Timer`].
#[derive(Debug, Default, Clone)]
pub(crate) struct TimerTable {
    data: [Option<Instant>; TIMERS],
}

impl TimerTable {
    /// Sets `timer`'s deadline (`None`: nothing of its kind is pending).
    pub(crate) fn set(&mut self, timer: Timer, at: Option<Instant>) {
        self.data[timer as usize] = at;
    }

    /// Lowers `timer`'s deadline to `at` if that is earlier (or none was set).
    pub(crate) fn lower(&mut self, timer: Timer, at: Instant) {
        let slot = &mut self.data[timer as usize];
        *slot = Some(slot.map_or(at, |d| d.min(at)));
    }

    /// The earliest deadline of any timer.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.data.iter().flatten().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_table_answers_the_earliest_deadline_and_only_lowers_between_sets() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = TimerTable::default();
        assert_eq!(t.next(), None);
        t.lower(Timer::Orphan, t0 + 5 * s);
        t.lower(Timer::Orphan, t0 + 7 * s);
        assert_eq!(t.next(), Some(t0 + 5 * s));
        t.lower(Timer::PeerIdle, t0 + 3 * s);
        assert_eq!(t.next(), Some(t0 + 3 * s));
        t.set(Timer::PeerIdle, None);
        t.set(Timer::Orphan, Some(t0 + 9 * s));
        assert_eq!(t.next(), Some(t0 + 9 * s));
        t.lower(Timer::StagedStall, t0 + 8 * s);
        assert_eq!(t.next(), Some(t0 + 8 * s));
    }
}
