//! Which prepared descriptor lists a prefill keeps for each decode peer, and when to prepare a
//! larger one. The wire does not carry a decode's pool size, so a peer's list starts at our own
//! pool size and grows (under a new generation) when a request reaches past it, up to a cap;
//! requests the current list cannot serve are lowered to explicit descriptors meanwhile.

/// A peer's list is never prepared with more entries than this across all its buffers, nor more
/// than four times our own pool per buffer (past it, requests use explicit descriptors).
pub(crate) const MAX_PEER_LIST_DESCS: u64 = 1 << 22;

/// Failed preparations of one list before the peer uses explicit descriptors for good.
const MAX_FAILED_ATTEMPTS: u32 = 4;

/// The state of one list kind of one peer.
#[derive(Debug, Default)]
pub(crate) struct ListTrack {
    /// (generation, entries per buffer) of the list requests are made from.
    pub(crate) ready: Option<(u32, u32)>,
    pending: Option<(u32, u32)>,
    failed_at: Option<u32>,
    failures: u32,
    next_generation: u32,
}

impl ListTrack {
    /// Entries per buffer of the ready list, if it covers entry `need - 1`.
    pub(crate) fn covering(&self, need: u32) -> Option<(u32, u32)> {
        self.ready.filter(|&(_, n)| n >= need)
    }

    /// Whether to prepare a list now, for a request that reaches entry `need - 1`, with our own
    /// pool of `base` entries and at most `cap` entries: `Some((generation, entries))`.
    pub(crate) fn want(&mut self, need: u32, base: u32, cap: u32) -> Option<(u32, u32)> {
        if self.covering(need).is_some()
            || self.pending.is_some()
            || self.failures >= MAX_FAILED_ATTEMPTS
            || need > cap
            || need == 0
        {
            return None;
        }
        let mut count = if self.ready.is_some() {
            need.checked_next_power_of_two().unwrap_or(need)
        } else {
            need.max(base)
        }
        .min(cap);
        if let Some(f) = self.failed_at {
            if need >= f {
                return None;
            }
            if count >= f {
                count = need;
            }
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        self.pending = Some((generation, count));
        Some((generation, count))
    }

    /// The outcome of preparing `generation`. Returns the generation the new list replaces (to
    /// release), if any.
    pub(crate) fn prepared(&mut self, generation: u32, ok: bool) -> Option<u32> {
        let (g, count) = self.pending.filter(|&(g, _)| g == generation)?;
        self.pending = None;
        if ok {
            self.failures = 0;
            self.ready.replace((g, count)).map(|(old, _)| old)
        } else {
            self.failures += 1;
            self.failed_at = Some(self.failed_at.map_or(count, |f| f.min(count)));
            None
        }
    }
}

/// The per-buffer cap of a peer list over `buffers` buffers, for our pool of `base` entries.
pub(crate) fn peer_cap(base: u32, buffers: usize) -> u32 {
    let by_total = MAX_PEER_LIST_DESCS / (buffers.max(1) as u64);
    let cap = u64::from(base)
        .saturating_mul(4)
        .min(by_total)
        .max(u64::from(base));
    u32::try_from(cap).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_our_size_grows_by_powers_of_two_and_stops_at_the_cap() {
        let mut t = ListTrack::default();
        assert_eq!(t.want(10, 100, 400), Some((0, 100)));
        assert_eq!(t.want(10, 100, 400), None, "one preparation at a time");
        assert_eq!(t.prepared(0, true), None);
        assert_eq!(t.covering(100), Some((0, 100)));
        assert_eq!(t.want(50, 100, 400), None, "covered");
        assert_eq!(t.want(150, 100, 400), Some((1, 256)));
        assert_eq!(
            t.prepared(1, true),
            Some(0),
            "the old generation is released"
        );
        assert_eq!(
            t.want(401, 100, 400),
            None,
            "past the cap: explicit descriptors"
        );
    }

    #[test]
    fn refusals_shrink_to_the_need_then_give_up() {
        let mut t = ListTrack::default();
        assert_eq!(t.want(10, 100, 400), Some((0, 100)));
        assert_eq!(t.prepared(0, false), None);
        assert_eq!(t.want(10, 100, 400), Some((1, 10)), "the exact need");
        assert_eq!(t.want(10, 100, 400), None);
        assert_eq!(t.prepared(7, true), None, "a stale generation is ignored");
        assert_eq!(t.prepared(1, false), None);
        assert_eq!(t.want(10, 100, 400), None, "10 was refused");
        assert_eq!(t.want(5, 100, 400), Some((2, 5)));
        t.prepared(2, false);
        assert_eq!(t.want(3, 100, 400), Some((3, 3)));
        t.prepared(3, false);
        assert_eq!(t.want(1, 100, 400), None, "gave up after four refusals");
    }

    #[test]
    fn the_cap_bounds_descriptors() {
        assert_eq!(peer_cap(1000, 64), 4000);
        assert_eq!(peer_cap(30_000, 64), 65_536);
        assert_eq!(
            peer_cap(1_000_000, 64),
            1_000_000,
            "never below our own pool"
        );
    }
}
