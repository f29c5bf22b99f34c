//! The staged path's pure bookkeeping (docs/protocol.md §3.5, docs/runtime.md §12): the decode's
//! ring of staging slots, the prefill's per-room slot schedule, its own staging slots, and the
//! check that decides whether a room may be staged at all.
//!
//! The staged path is between two of our peers only: a decode that advertised `staging` and
//! announced a [`Ring`] grants each room up to a few slots of it in the room's transfer infos;
//! the prefill splits the room's chunks into pieces that fit a slot, gathers a piece into one of
//! its own staging slots, and makes one WRITE into a granted decode slot, carrying a
//! [`StagedNotice`](nixl_wire::ext::StagedNotice). The decode scatters the slot into the room's
//! pages, counts the piece like a `_kv_` chunk only once the scatter completed, and gives the
//! slot back to the prefill with a [`FreedNotice`](nixl_wire::ext::FreedNotice). A piece never
//! goes to a slot the prefill has not seen freed: it waits in the schedule.
//!
//! Nothing here performs IO; the cores own these structures and the driver reports events.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nixl_core::MemType;
use nixl_core::staging::{PoolBuffer, StagingLayout};
use nixl_wire::RoomId;
use nixl_wire::ext::Ring;

use super::Layout;

/// How long a slot of a room that ended without success sits out before it is granted again: a
/// prefill that did not learn of the end may still have WRITEs into it in flight (the decode
/// cannot tell it; SGLang's protocol has no decode → prefill failure message).
pub const QUARANTINE: Duration = Duration::from_secs(30);

/// The state of one decode ring slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// Nobody holds it.
    Free,
    /// Granted to a room; the prefill may write into it.
    Granted(RoomId),
    /// A staged piece of the room landed in it and its scatter is running.
    Scattering(RoomId),
    /// Its room ended while a scatter was running: not reused while the GPU may still read it;
    /// then free, or quarantined if the room did not succeed.
    Draining {
        /// Quarantine it after the scatter.
        quarantine: bool,
    },
    /// Its room ended without success: free [`QUARANTINE`] after the first grant that saw it
    /// (the core reads no clock, so the time is stamped by the next grant).
    Quarantined(Option<Instant>),
}

/// What the decode learns when a scatter completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scattered {
    /// The slot is the room's again: count the piece and tell the prefill the slot is free.
    Granted(RoomId),
    /// The room had ended: nothing to count or tell.
    Drained,
    /// The slot was not scattering (a stale or duplicate report): ignore it.
    Stale,
}

/// The decode's bounded ring of staging slots: who holds each slot.
#[derive(Debug, Clone)]
pub struct SlotRing {
    slots: Vec<Slot>,
    quarantine: Duration,
}

impl SlotRing {
    /// A ring of `slots` free slots; slots of rooms that failed sit out `quarantine`.
    pub fn new(slots: u32, quarantine: Duration) -> Self {
        Self {
            slots: vec![Slot::Free; slots as usize],
            quarantine,
        }
    }

    /// Slots in the ring.
    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Whether the ring has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Free slots (quarantined ones not counted).
    pub fn free(&self) -> u32 {
        self.slots.iter().filter(|s| **s == Slot::Free).count() as u32
    }

    /// Grants `room` up to `want` free slots, lowest first; empty when none is free (the room
    /// then takes the plain path). Quarantines that ended by `now` end first.
    pub fn grant(&mut self, room: RoomId, want: u32, now: Instant) -> Vec<u32> {
        for s in &mut self.slots {
            match *s {
                Slot::Quarantined(None) => *s = Slot::Quarantined(Some(now)),
                Slot::Quarantined(Some(at))
                    if now.saturating_duration_since(at) >= self.quarantine =>
                {
                    *s = Slot::Free;
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if out.len() as u32 >= want {
                break;
            }
            if *s == Slot::Free {
                *s = Slot::Granted(room);
                out.push(i as u32);
            }
        }
        out
    }

    /// The slots `room` holds (granted or scattering).
    pub fn held_by(&self, room: RoomId) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Granted(r) | Slot::Scattering(r) if *r == room))
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// A staged piece of `room` landed in `slot`: true (start its scatter) only if the slot is
    /// granted to `room` and idle; false for a slot outside the ring, another room's slot, or one
    /// still scattering (a prefill that overwrote it: the room must fail).
    pub fn landed(&mut self, room: RoomId, slot: u32) -> bool {
        match self.slots.get_mut(slot as usize) {
            Some(s) if *s == Slot::Granted(room) => {
                *s = Slot::Scattering(room);
                true
            }
            _ => false,
        }
    }

    /// The scatter out of `slot` completed.
    pub fn scattered(&mut self, slot: u32) -> Scattered {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return Scattered::Stale;
        };
        match *s {
            Slot::Scattering(room) => {
                *s = Slot::Granted(room);
                Scattered::Granted(room)
            }
            Slot::Draining { quarantine } => {
                *s = if quarantine {
                    Slot::Quarantined(None)
                } else {
                    Slot::Free
                };
                Scattered::Drained
            }
            _ => Scattered::Stale,
        }
    }

    /// `room` ended: after a success (`clean`: every piece was scattered, nothing more comes)
    /// its idle slots are free now; after a failure, abort, timeout or release they are
    /// quarantined. Scattering slots follow once their scatters complete.
    pub fn release(&mut self, room: RoomId, clean: bool) {
        for s in &mut self.slots {
            match *s {
                Slot::Granted(r) if r == room => {
                    *s = if clean {
                        Slot::Free
                    } else {
                        Slot::Quarantined(None)
                    };
                }
                Slot::Scattering(r) if r == room => *s = Slot::Draining { quarantine: !clean },
                _ => {}
            }
        }
    }
}

/// A free list of the prefill's own staging slots (its gather targets), shared by its rooms. A
/// slot is held from its gather until its WRITE completed or failed.
#[derive(Debug, Clone)]
pub struct LocalSlots {
    free: Vec<u32>,
    len: u32,
}

impl LocalSlots {
    /// `slots` free slots.
    pub fn new(slots: u32) -> Self {
        Self {
            free: (0..slots).rev().collect(),
            len: slots,
        }
    }

    /// Free slots.
    pub fn free(&self) -> u32 {
        self.free.len() as u32
    }

    /// Takes the lowest free slot.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives `slot` back; false (ignored) for a slot outside the list or already free.
    pub fn put(&mut self, slot: u32) -> bool {
        if slot >= self.len || self.free.contains(&slot) {
            return false;
        }
        self.free.push(slot);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        true
    }
}

/// One staged WRITE: a piece of a chunk that fits one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Piece {
    /// Its number in the room's staged sequence (dense from 0; the decode counts these like
    /// `_kv_` chunks).
    pub chunk: u32,
    /// The room's last piece.
    pub last: bool,
    /// Offset of its first page in the room's page lists (the sender's pages and the decode's
    /// `dst_pages` alike).
    pub first_page_offset: u32,
    /// Pages in it (at least one, at most the slot's capacity).
    pub pages: u32,
}

/// What the prefill posts next for a room: gather `piece` into `local_slot`, then WRITE it
/// into the decode's `remote_slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StagedPost {
    /// The piece.
    pub piece: Piece,
    /// The decode's ring slot (granted to the room and seen free).
    pub remote_slot: u32,
    /// The prefill's own staging slot.
    pub local_slot: u32,
}

/// What [`SlotSchedule::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Pushed {
    /// The chunk's pieces wait for slots.
    Queued,
    /// An empty last chunk with no piece left to mark: send `{room}_kv_{chunk}_1` without data
    /// (the decode counts it like a piece).
    EmptyLast {
        /// Its number in the room's staged sequence.
        chunk: u32,
    },
    /// Nothing queued: a chunk after the last, an empty chunk that is not the last, or page
    /// offsets that would overflow (the room must fail).
    Refused,
}

/// The prefill's schedule for one staged room: the slots the decode granted, which of them are
/// free, and the pieces waiting for one.
#[derive(Debug, Clone)]
pub struct SlotSchedule {
    /// Granted slots, and whether each is free (not holding an unscattered piece).
    granted: Vec<(u32, bool)>,
    pages_per_slot: u32,
    queue: VecDeque<Piece>,
    next_chunk: u32,
    next_offset: u32,
    sealed: bool,
    posted: u32,
}

impl SlotSchedule {
    /// A schedule over the decode's `granted` slots (duplicates dropped), each holding up to
    /// `pages_per_slot` pages; `None` if either is empty.
    pub fn new(granted: &[u32], pages_per_slot: u32) -> Option<Self> {
        let mut g: Vec<(u32, bool)> = Vec::new();
        for &s in granted {
            if !g.iter().any(|(x, _)| *x == s) {
                g.push((s, true));
            }
        }
        (!g.is_empty() && pages_per_slot > 0).then_some(Self {
            granted: g,
            pages_per_slot,
            queue: VecDeque::new(),
            next_chunk: 0,
            next_offset: 0,
            sealed: false,
            posted: 0,
        })
    }

    /// Queues a chunk of `pages` pages (the next pages of the room, in order), split into
    /// pieces that fit a slot; `last` marks the room's last chunk.
    pub fn push(&mut self, pages: u32, last: bool) -> Pushed {
        if self.sealed || (pages == 0 && !last) || self.next_offset.checked_add(pages).is_none() {
            return Pushed::Refused;
        }
        self.sealed = last;
        if pages == 0 {
            // An empty last chunk: the last piece still queued becomes the last; with none
            // queued, a data-less `_kv_` notification ends the sequence.
            return match self.queue.back_mut() {
                Some(p) => {
                    p.last = true;
                    Pushed::Queued
                }
                None => {
                    let chunk = self.next_chunk;
                    self.next_chunk = self.next_chunk.saturating_add(1);
                    Pushed::EmptyLast { chunk }
                }
            };
        }
        let mut left = pages;
        while left > 0 {
            let n = left.min(self.pages_per_slot);
            left -= n;
            self.queue.push_back(Piece {
                chunk: self.next_chunk,
                last: last && left == 0,
                first_page_offset: self.next_offset,
                pages: n,
            });
            self.next_chunk = self.next_chunk.saturating_add(1);
            self.next_offset += n;
        }
        Pushed::Queued
    }

    /// The next post, if a piece waits, one of the room's granted slots is free and a local
    /// slot is free; the remote slot is then busy until [`freed`](Self::freed).
    pub fn next(&mut self, local: &mut LocalSlots) -> Option<StagedPost> {
        self.queue.front()?;
        let at = self.granted.iter().position(|(_, free)| *free)?;
        let local_slot = local.take()?;
        let piece = self.queue.pop_front()?;
        self.granted[at].1 = false;
        self.posted = self.posted.saturating_add(1);
        Some(StagedPost {
            piece,
            remote_slot: self.granted[at].0,
            local_slot,
        })
    }

    /// The decode freed `slot`: true if it was one of the room's busy slots (false: ignore).
    pub fn freed(&mut self, slot: u32) -> bool {
        match self.granted.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, free)) if !*free => {
                *free = true;
                true
            }
            _ => false,
        }
    }

    /// Pieces waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Pieces posted so far.
    pub fn posted(&self) -> u32 {
        self.posted
    }

    /// Whether the last chunk was queued and every piece posted.
    pub fn all_posted(&self) -> bool {
        self.sealed && self.queue.is_empty()
    }

    /// Granted slots not holding a piece.
    pub fn free_slots(&self) -> usize {
        self.granted.iter().filter(|(_, f)| *f).count()
    }
}

/// The staging layout of one side's KV pool (every buffer holds `kv_pages` items).
pub fn staging_layout(layout: &Layout) -> Result<StagingLayout, String> {
    if layout.kv_ptrs.len() != layout.kv_item_lens.len() {
        return Err(format!(
            "{} KV buffers with {} item lengths",
            layout.kv_ptrs.len(),
            layout.kv_item_lens.len()
        ));
    }
    let buffers = layout
        .kv_ptrs
        .iter()
        .zip(&layout.kv_item_lens)
        .map(|(&addr, &item_len)| {
            let len = item_len
                .checked_mul(u64::from(layout.kv_pages))
                .ok_or_else(|| format!("a buffer of {} x {item_len} bytes", layout.kv_pages))?;
            Ok(PoolBuffer {
                addr,
                len,
                item_len,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    StagingLayout::new(buffers).map_err(|e| e.to_string())
}

/// Whether a room between `local` (the prefill's pools, staging slots of `local_slot_bytes`)
/// and `remote` (the decode's pools and its `ring`) may be staged, and how many pages fit a
/// piece: both KV pools in VRAM, layouts that stage the same bytes at the same offsets, and at
/// least one page per slot on both sides. `Err` says why not (the room takes the plain path).
pub fn pages_per_piece(
    local: &Layout,
    local_slot_bytes: u64,
    remote: &Layout,
    ring: &Ring,
) -> Result<u32, String> {
    if local.kv_mem != MemType::Vram || remote.kv_mem != MemType::Vram {
        return Err("both KV pools must be in GPU memory".into());
    }
    let (l, r) = (staging_layout(local)?, staging_layout(remote)?);
    if !l.compatible(&r) {
        return Err("the pools' item lengths differ".into());
    }
    let per = l
        .pages_per_slot(local_slot_bytes)
        .min(r.pages_per_slot(ring.slot_bytes));
    match u32::try_from(per) {
        Ok(0) => Err(format!(
            "a page of {} bytes fits no slot (ours {local_slot_bytes}, theirs {})",
            l.bytes_per_page(),
            ring.slot_bytes
        )),
        Ok(n) => Ok(n),
        Err(_) => Ok(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(n: u64) -> RoomId {
        RoomId::new(n)
    }

    #[test]
    fn ring_grants_bounded_slots_and_frees_them_in_every_end() {
        let t0 = Instant::now();
        let q = Duration::from_secs(30);
        let mut ring = SlotRing::new(4, q);
        assert_eq!(ring.grant(room(1), 2, t0), vec![0, 1]);
        assert_eq!(ring.grant(room(2), 3, t0), vec![2, 3]);
        assert!(ring.grant(room(3), 1, t0).is_empty(), "full: plain path");
        assert_eq!(ring.free(), 0);

        // Only the holder may land in a slot, and never twice before its scatter completes.
        assert!(!ring.landed(room(2), 0));
        assert!(!ring.landed(room(1), 9));
        assert!(ring.landed(room(1), 0));
        assert!(!ring.landed(room(1), 0), "an overwrite while scattering");
        assert_eq!(ring.scattered(0), Scattered::Granted(room(1)));
        assert_eq!(ring.scattered(0), Scattered::Stale);
        assert!(ring.landed(room(1), 0));

        // Room 1 succeeds while slot 0 scatters: slot 1 is free now, slot 0 after its scatter.
        ring.release(room(1), true);
        assert_eq!(ring.free(), 1);
        assert!(ring.held_by(room(1)).is_empty());
        assert_eq!(ring.grant(room(3), 4, t0), vec![1]);
        assert_eq!(ring.scattered(0), Scattered::Drained);
        assert_eq!(ring.free(), 1);

        // Room 2 fails: its slots sit out the quarantine, counted from the next grant.
        assert!(ring.landed(room(2), 3));
        ring.release(room(2), false);
        ring.release(room(2), false);
        assert_eq!(ring.scattered(3), Scattered::Drained);
        assert_eq!(ring.free(), 1);
        assert_eq!(ring.grant(room(4), 4, t0 + q), vec![0]);
        assert!(ring.grant(room(5), 4, t0 + q + q / 2).is_empty());
        assert_eq!(ring.grant(room(5), 4, t0 + q + q), vec![2, 3]);
        for r in 3..=5 {
            ring.release(room(r), true);
        }
        assert_eq!(ring.free(), 4);
        assert_eq!(ring.scattered(7), Scattered::Stale);
        assert!(SlotRing::new(0, q).grant(room(1), 1, t0).is_empty());
    }

    #[test]
    fn schedule_splits_chunks_and_waits_for_freed_slots() {
        let mut local = LocalSlots::new(8);
        let mut s = SlotSchedule::new(&[3, 1, 3], 32).expect("schedule");
        assert_eq!(s.push(40, false), Pushed::Queued);
        assert_eq!(s.push(32, true), Pushed::Queued);
        assert_eq!(s.push(1, true), Pushed::Refused, "after the last chunk");
        assert_eq!(s.waiting(), 3);
        let a = s.next(&mut local).expect("first");
        let b = s.next(&mut local).expect("second");
        assert_eq!(
            (a.piece, a.remote_slot, a.local_slot),
            (
                Piece {
                    chunk: 0,
                    last: false,
                    first_page_offset: 0,
                    pages: 32
                },
                3,
                0
            )
        );
        assert_eq!((b.piece.first_page_offset, b.piece.pages), (32, 8));
        assert_eq!(b.remote_slot, 1);
        // Both granted slots hold unscattered pieces: the third waits, never overwrites.
        assert_eq!(s.next(&mut local), None);
        assert!(!s.freed(0), "not granted");
        assert!(s.freed(1));
        assert!(!s.freed(1), "a duplicate freed");
        let c = s.next(&mut local).expect("third");
        assert_eq!(
            c.piece,
            Piece {
                chunk: 2,
                last: true,
                first_page_offset: 40,
                pages: 32
            }
        );
        assert_eq!(c.remote_slot, 1);
        assert!(s.all_posted());
        assert_eq!(s.posted(), 3);
        assert_eq!(s.free_slots(), 0);

        // Local slots bound every room together.
        let mut tight = LocalSlots::new(1);
        let mut s = SlotSchedule::new(&[0, 1], 4).expect("schedule");
        assert_eq!(s.push(8, true), Pushed::Queued);
        let p = s.next(&mut tight).expect("first");
        assert_eq!(s.next(&mut tight), None, "no local slot");
        assert!(tight.put(p.local_slot));
        assert!(!tight.put(p.local_slot));
        assert!(!tight.put(5));
        assert!(s.next(&mut tight).is_some());

        assert!(SlotSchedule::new(&[], 4).is_none());
        assert!(SlotSchedule::new(&[0], 0).is_none());
    }

    #[test]
    fn schedule_empty_last_chunk_marks_the_last_piece() {
        let mut local = LocalSlots::new(2);
        let mut s = SlotSchedule::new(&[0], 16).expect("schedule");
        assert_eq!(s.push(0, false), Pushed::Refused);
        assert_eq!(s.push(16, false), Pushed::Queued);
        assert_eq!(s.push(0, true), Pushed::Queued);
        let p = s.next(&mut local).expect("piece");
        assert!(p.piece.last);
        assert!(s.all_posted());

        // The first piece went out already: a data-less notification numbered after it ends
        // the sequence.
        let mut s = SlotSchedule::new(&[0], 16).expect("schedule");
        assert_eq!(s.push(16, false), Pushed::Queued);
        assert!(s.next(&mut local).is_some());
        assert_eq!(s.push(0, true), Pushed::EmptyLast { chunk: 1 });
        assert!(s.all_posted());

        let mut s = SlotSchedule::new(&[0], 16).expect("schedule");
        assert_eq!(s.push(0, true), Pushed::EmptyLast { chunk: 0 });
        assert!(s.all_posted());
        assert_eq!(s.posted(), 0);
        assert_eq!(s.push(0, true), Pushed::Refused);
    }

    fn layout(mem: MemType, items: &[u64]) -> Layout {
        Layout {
            kv_mem: mem,
            kv_ptrs: (0..items.len() as u64)
                .map(|i| 0x1000_0000 * (i + 1))
                .collect(),
            kv_item_lens: items.to_vec(),
            kv_pages: 1024,
            aux_ptrs: Vec::new(),
            aux_item_lens: Vec::new(),
            aux_slots: 1,
            gpu_id: 0,
            tp: crate::proto::TpPlace::default(),
        }
    }

    #[test]
    fn rooms_are_staged_only_between_compatible_gpu_pools() {
        let ring = Ring {
            addr: 0x9000_0000,
            slot_bytes: 64 * 32768 * 8,
            slots: 2,
            gpu: 0,
        };
        let gpu = layout(MemType::Vram, &[32768; 64]);
        assert_eq!(pages_per_piece(&gpu, 64 << 20, &gpu, &ring), Ok(8));
        assert_eq!(pages_per_piece(&gpu, 64 * 32768 * 4, &gpu, &ring), Ok(4));
        assert!(pages_per_piece(&gpu, 1000, &gpu, &ring).is_err());
        let host = layout(MemType::Dram, &[32768; 64]);
        assert!(pages_per_piece(&host, 64 << 20, &gpu, &ring).is_err());
        assert!(pages_per_piece(&gpu, 64 << 20, &host, &ring).is_err());
        let other = layout(MemType::Vram, &[16384; 64]);
        assert!(pages_per_piece(&gpu, 64 << 20, &other, &ring).is_err());
        let mut broken = gpu.clone();
        broken.kv_item_lens.pop();
        assert!(pages_per_piece(&broken, 64 << 20, &gpu, &ring).is_err());
    }
}
