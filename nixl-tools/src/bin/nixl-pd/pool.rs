//! Who owns each of the decode's KV pages and aux slots.
//!
//! A page or slot is Free (it holds the sentinel), Owned by the room of a live request, or
//! Quarantined after that request failed or was aborted: a prefill's WRITE for the room may
//! still land, and that is the room's own memory, not a stray write. Only Free pages and slots
//! are handed out. A quarantine ends after one period, oldest first; the caller then puts the
//! sentinel back and frees them. A request that succeeded is verified, refilled and freed at
//! once. Pages are handed out as before this bookkeeping existed: random runs from the free
//! list ([`nixl_tools::take_page_runs`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Free,
    Owned(u64),
    Quarantined(u64),
}

/// A quarantined request's pages and slot.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) room: u64,
    pub(crate) pages: Vec<u32>,
    pub(crate) slot: u32,
    until: Instant,
}

/// One kind of unit (pages, or aux slots): states, the free list, the last owner of each (for
/// reports) and a round-robin cursor for the periodic checks.
struct Units {
    state: Vec<State>,
    last: Vec<Option<u64>>,
    free: Vec<u32>,
    cursor: usize,
}

impl Units {
    fn new(n: u32) -> Self {
        Self {
            state: vec![State::Free; n as usize],
            last: vec![None; n as usize],
            free: (0..n).collect(),
            cursor: 0,
        }
    }

    fn own(&mut self, room: u64, u: u32) {
        self.state[u as usize] = State::Owned(room);
        self.last[u as usize] = Some(room);
    }

    /// `u` goes from `from` to `to`; a unit in another state is left as it is (a caller bug,
    /// caught in debug builds), so that no unit enters the free list twice.
    fn set(&mut self, u: u32, from: State, to: State) {
        let s = &mut self.state[u as usize];
        debug_assert_eq!(*s, from, "unit {u}");
        if *s == from {
            *s = to;
            if to == State::Free {
                self.free.push(u);
            }
        }
    }

    /// Up to `n` Free units, continuing round the pool from where the last call stopped.
    fn next_free(&mut self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        let len = self.state.len();
        for _ in 0..len {
            if out.len() == n {
                break;
            }
            let u = self.cursor;
            self.cursor = (self.cursor + 1) % len;
            if self.state[u] == State::Free {
                out.push(u as u32);
            }
        }
        out
    }

    fn all_free(&self) -> Vec<u32> {
        (0..self.state.len() as u32)
            .filter(|&u| self.state[u as usize] == State::Free)
            .collect()
    }
}

/// The decode's pages and aux slots.
pub(crate) struct Pages {
    pages: Units,
    slots: Units,
    /// In the order they entered quarantine, which is also the order they leave it.
    held: VecDeque<Held>,
    period: Duration,
}

impl Pages {
    pub(crate) fn new(pages: u32, slots: u32, period: Duration) -> Self {
        Self {
            pages: Units::new(pages),
            slots: Units::new(slots),
            held: VecDeque::new(),
            period,
        }
    }

    /// Whether [`Self::take`] of `n` pages would succeed.
    pub(crate) fn can_take(&self, n: usize) -> bool {
        self.pages.free.len() >= n && !self.slots.free.is_empty()
    }

    /// `n` Free pages and a Free slot, now Owned by `room`; `None` if too few are Free.
    pub(crate) fn take(
        &mut self,
        room: u64,
        n: usize,
        rng: &mut impl Rng,
    ) -> Option<(Vec<u32>, u32)> {
        if !self.can_take(n) {
            return None;
        }
        let pages = nixl_tools::take_page_runs(&mut self.pages.free, n, rng);
        let slot = self.slots.free.pop()?;
        for &p in &pages {
            self.pages.own(room, p);
        }
        self.slots.own(room, slot);
        Some((pages, slot))
    }

    /// Owned pages and slot back to Free: the request succeeded and the caller refilled them,
    /// or no peer ever learned of them.
    pub(crate) fn free(&mut self, room: u64, pages: &[u32], slot: u32) {
        for &p in pages {
            self.pages.set(p, State::Owned(room), State::Free);
        }
        self.slots.set(slot, State::Owned(room), State::Free);
    }

    /// Owned pages and slot into quarantine, for one period from `now`.
    pub(crate) fn quarantine(&mut self, room: u64, pages: Vec<u32>, slot: u32, now: Instant) {
        for &p in &pages {
            self.pages
                .set(p, State::Owned(room), State::Quarantined(room));
        }
        self.slots
            .set(slot, State::Owned(room), State::Quarantined(room));
        self.held.push_back(Held {
            room,
            pages,
            slot,
            until: now + self.period,
        });
    }

    /// The oldest quarantine whose period is over at `now`. Its pages stay Quarantined (out of
    /// reach of [`Self::take`]) until the caller has refilled them and calls [`Self::release`].
    pub(crate) fn expired(&mut self, now: Instant) -> Option<Held> {
        if self.held.front().is_some_and(|h| now >= h.until) {
            self.held.pop_front()
        } else {
            None
        }
    }

    /// A quarantine that [`Self::expired`] returned, refilled: Free.
    pub(crate) fn release(&mut self, h: &Held) {
        for &p in &h.pages {
            self.pages.set(p, State::Quarantined(h.room), State::Free);
        }
        self.slots
            .set(h.slot, State::Quarantined(h.room), State::Free);
    }

    /// When the oldest quarantine ends.
    pub(crate) fn next_expiry(&self) -> Option<Instant> {
        self.held.front().map(|h| h.until)
    }

    pub(crate) fn quarantined_pages(&self) -> usize {
        self.held.iter().map(|h| h.pages.len()).sum()
    }

    #[cfg(test)]
    pub(crate) fn page_state(&self, p: u32) -> State {
        self.pages.state[p as usize]
    }

    #[cfg(test)]
    pub(crate) fn slot_state(&self, s: u32) -> State {
        self.slots.state[s as usize]
    }

    /// The room that owned page `p` last.
    pub(crate) fn page_owner(&self, p: u32) -> Option<u64> {
        self.pages.last[p as usize]
    }

    pub(crate) fn slot_owner(&self, s: u32) -> Option<u64> {
        self.slots.last[s as usize]
    }

    /// Up to `n` Free pages to check, round-robin over the pool.
    pub(crate) fn next_free_pages(&mut self, n: usize) -> Vec<u32> {
        self.pages.next_free(n)
    }

    pub(crate) fn next_free_slots(&mut self, n: usize) -> Vec<u32> {
        self.slots.next_free(n)
    }

    /// Every Free page, for the final check.
    pub(crate) fn all_free_pages(&self) -> Vec<u32> {
        self.pages.all_free()
    }

    pub(crate) fn all_free_slots(&self) -> Vec<u32> {
        self.slots.all_free()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::sentinel::Sentinel;
    use crate::sentinel::tests::Mem;

    #[test]
    fn never_hands_out_owned_or_quarantined_pages() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let period = Duration::from_secs(30);
        let mut pool = Pages::new(64, 8, period);
        let mut live: Vec<(u64, Vec<u32>, u32)> = Vec::new();
        for step in 0..2000u64 {
            let now = t0 + Duration::from_millis(step * 50);
            while let Some(h) = pool.expired(now) {
                assert!(now >= h.until);
                pool.release(&h);
            }
            if let Some((pages, slot)) = pool.take(step, 4, &mut rng) {
                for &p in &pages {
                    assert_eq!(pool.page_state(p), State::Owned(step));
                }
                assert_eq!(pool.slot_state(slot), State::Owned(step));
                live.push((step, pages, slot));
            }
            // Every live page and slot is owned by exactly one live request.
            let mut seen: Vec<u32> = live.iter().flat_map(|l| l.1.iter().copied()).collect();
            seen.sort_unstable();
            let n = seen.len();
            seen.dedup();
            assert_eq!(n, seen.len(), "a page handed out twice");
            if live.len() >= 4 || rng.random_range(0..3) == 0 {
                let i = rng.random_range(0..live.len().max(1));
                if i < live.len() {
                    let (room, pages, slot) = live.swap_remove(i);
                    if rng.random_range(0..4) == 0 {
                        pool.quarantine(room, pages, slot, now);
                    } else {
                        pool.free(room, &pages, slot);
                    }
                }
            }
        }
        // Everything still quarantined is Quarantined; no free page is.
        for p in pool.all_free_pages() {
            assert_eq!(pool.page_state(p), State::Free);
        }
        let held: usize = pool.quarantined_pages();
        let owned: usize = live.iter().map(|l| l.1.len()).sum();
        assert_eq!(pool.all_free_pages().len() + held + owned, 64);
    }

    #[test]
    fn quarantine_expires_after_its_period_oldest_first() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let mut pool = Pages::new(8, 2, Duration::from_secs(10));
        let (a, sa) = pool.take(1, 4, &mut rng).unwrap();
        let (b, sb) = pool.take(2, 4, &mut rng).unwrap();
        // The pool is exhausted: no allocation until a quarantine ends.
        assert!(!pool.can_take(1));
        pool.quarantine(1, a.clone(), sa, t0);
        pool.quarantine(2, b, sb, t0 + Duration::from_secs(1));
        assert!(pool.take(3, 1, &mut rng).is_none());
        assert!(pool.expired(t0 + Duration::from_secs(9)).is_none());
        assert_eq!(pool.next_expiry(), Some(t0 + Duration::from_secs(10)));
        let h = pool.expired(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!((h.room, &h.pages), (1, &a));
        // Expired but not yet refilled: still out of reach.
        assert!(pool.take(3, 1, &mut rng).is_none());
        assert!(pool.expired(t0 + Duration::from_secs(10)).is_none());
        pool.release(&h);
        let (c, _) = pool.take(3, 4, &mut rng).unwrap();
        let (mut c, mut a) = (c, a);
        c.sort_unstable();
        a.sort_unstable();
        assert_eq!(c, a, "the oldest quarantine's pages are the ones reused");
        assert_eq!(pool.page_owner(c[0]), Some(3));
        assert_eq!(pool.quarantined_pages(), 4);
    }

    #[test]
    fn expired_pages_are_refilled_before_reuse_and_strays_are_seen() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let mut m = Mem::new(2, 8, 16, 2);
        let mut s = Sentinel::new(true);
        s.fill_all(&mut m, 2).unwrap();
        let mut pool = Pages::new(8, 2, Duration::from_secs(1));
        let (pages, slot) = pool.take(7, 3, &mut rng).unwrap();
        // The request fails; its prefill's late write lands in its own quarantined page: not
        // a stray write (quarantined pages are not checked).
        pool.quarantine(7, pages.clone(), slot, t0);
        m.kv[1][pages[0] as usize * 16] = 0;
        for p in pool.next_free_pages(8) {
            assert!(s.check_page(&mut m, p, pool.page_owner(p)).unwrap());
        }
        let h = pool.expired(t0 + Duration::from_secs(1)).unwrap();
        s.refill(&mut m, &h.pages, h.slot).unwrap();
        pool.release(&h);
        for p in pool.all_free_pages() {
            assert!(s.check_page(&mut m, p, pool.page_owner(p)).unwrap());
        }
        // A write after the quarantine is a stray write.
        m.kv[0][pages[1] as usize * 16 + 3] = 9;
        let strays = pool
            .all_free_pages()
            .into_iter()
            .filter(|&p| !s.check_page(&mut m, p, pool.page_owner(p)).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(strays, vec![pages[1]]);
        assert_eq!(s.counts().stray_pages, 1);
    }

    #[test]
    fn periodic_checks_cover_every_free_page() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut pool = Pages::new(10, 1, Duration::from_secs(1));
        let (owned, _) = pool.take(1, 3, &mut rng).unwrap();
        let mut seen: Vec<u32> = (0..4).flat_map(|_| pool.next_free_pages(2)).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 7);
        assert!(seen.iter().all(|p| !owned.contains(p)));
    }
}
