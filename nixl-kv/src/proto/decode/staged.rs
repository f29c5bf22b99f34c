//! The decode's staged path (docs/protocol.md §3.5): staged pieces landing in our ring, their
//! scatters (whole pages, or a larger prefill's head slices), each counted for its writer once
//! scattered, and the slot freed back to the writer it was granted to.

use nixl_wire::RoomId;
use nixl_wire::ext::{self, FreedMessage, FreedNotice, StagedNotice, StagedSlice};

use super::{Command, DecodeCore, FailureReason, Progress, Room, Scattered, Scattering, SlotRing};

/// Counts `f` for `writer` of a room of several writers (the first `writers` agents that
/// write it); false, and a warning, for one writer too many.
pub(super) fn note_writer(r: &mut Room, writer: &str, f: impl FnOnce(&mut Progress)) -> bool {
    match r.per_writer.iter().position(|(w, _)| w == writer) {
        Some(i) => f(&mut r.per_writer[i].1),
        None if r.per_writer.len() < r.writers as usize => {
            let mut p = Progress::default();
            f(&mut p);
            r.per_writer.push((writer.to_owned(), p));
        }
        None => {
            tracing::warn!(writer, writers = r.writers, "a writer too many; ignored");
            return false;
        }
    }
    true
}

/// Bytes of one page of a slot a staged slice `t` is scattered from (the writer's page), if
/// the slice fits both its token slots and ours within our pages of `ours` bytes.
fn slice_item(t: &StagedSlice, ours: u64) -> Option<u64> {
    let fits = |token: u64, offset: u64| offset.checked_add(t.len).is_some_and(|e| e <= token);
    let ok = t.tokens > 0
        && t.len > 0
        && fits(t.src_token, t.src_offset)
        && fits(t.dst_token, t.dst_offset)
        && t.dst_token
            .checked_mul(u64::from(t.tokens))
            .is_some_and(|n| n <= ours);
    ok.then(|| t.src_token.checked_mul(u64::from(t.tokens)))
        .flatten()
}

impl DecodeCore {
    /// A staged piece landed in our ring: its scatter is queued if the slot is the room's and
    /// idle and the pages are the room's; anything else fails the room (or, for a room we do
    /// not hold, is dropped).
    pub(super) fn staged_landed(&mut self, peer: &str, n: StagedNotice) {
        let room = n.room;
        let Some(r) = self.rooms.get_mut(&room) else {
            tracing::debug!(peer, %room, "staged piece for an unknown room; dropped");
            return;
        };
        if r.concluded.is_some() {
            return;
        }
        let end = n.first_page_offset.saturating_add(n.pages) as usize;
        // A piece larger than a slot would make the scatter read past it: the slot holds our
        // pages, or with a slice the writer's pages of `tokens · src_token` bytes; and a
        // scatter takes at most as many pages as the slot holds of ours.
        let ours = self.me.kv_item_len;
        let item = match &n.slice {
            None => Some(ours),
            Some(t) => slice_item(t, ours).map(|i| i.max(ours)),
        };
        let page_bytes = item.map_or(0, |i| i.saturating_mul(self.me.kv_ptrs.len() as u64));
        // A room written by several prefill ranks takes only slices: whole pages of one of them
        // would overwrite the others' heads.
        let shape_ok = r.writers == 1 || n.slice.is_some();
        let fits = self.me.staging.is_some_and(|st| {
            page_bytes > 0 && u64::from(n.pages) <= st.ring.slot_bytes / page_bytes
        });
        let pages = r
            .pages
            .get(n.first_page_offset as usize..end)
            .filter(|_| fits && shape_ok);
        let landed = self
            .ring
            .as_mut()
            .is_some_and(|ring| ring.landed(room, n.slot));
        let refusal = match (pages, landed) {
            (Some(_), true) => None,
            (_, false) => Some(format!("slot {} is not this room's or still busy", n.slot)),
            (None, true) => Some(format!(
                "pages {}..{end} outside the room's {} or its slot",
                n.first_page_offset,
                r.pages.len()
            )),
        };
        if let Some(reason) = refusal {
            tracing::warn!(peer, %room, %reason, "staged piece refused");
            // A slot that did start scattering is drained by its (never queued) scatter: give
            // it back through the release below instead.
            if landed && let Some(ring) = &mut self.ring {
                ring.scattered(n.slot);
            }
            self.fail(room, FailureReason::Staging(reason));
            return;
        }
        let pages = pages.map(<[u32]>::to_vec).unwrap_or_default();
        r.scattering.push(Scattering {
            slot: n.slot,
            chunk: n.chunk,
            last: n.last,
            writer: peer.to_owned(),
        });
        self.commands.push_back(Command::Scatter {
            room,
            slot: n.slot,
            pages,
            slice: n.slice,
        });
    }

    /// The [`Command::Scatter`] of `room` out of `slot` ended: on success the piece counts like
    /// a `_kv_` chunk and the prefill is told the slot is free; a failed scatter fails the room.
    pub fn scatter_done(&mut self, room: RoomId, slot: u32, outcome: Result<(), String>) {
        let back = match &mut self.ring {
            Some(ring) => ring.scattered(slot),
            None => Scattered::Stale,
        };
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(at) = r.scattering.iter().position(|p| p.slot == slot) else {
            return;
        };
        let piece = r.scattering.swap_remove(at);
        if back != Scattered::Granted(room) || r.concluded.is_some() {
            return;
        }
        if let Err(reason) = outcome {
            self.fail(room, FailureReason::Staging(format!("scatter: {reason}")));
            return;
        }
        r.progress.chunk(piece.chunk, piece.last);
        if r.writers > 1 && !note_writer(r, &piece.writer, |p| p.chunk(piece.chunk, piece.last)) {
            return;
        }
        // The slot goes back to the target it was granted to.
        let Some(endpoint) = r
            .slot_targets
            .iter()
            .find(|(s, _)| *s == slot)
            .and_then(|(_, i)| r.targets.get(*i))
            .map(|t| t.endpoint.clone())
        else {
            return;
        };
        let trailing = self
            .directory
            .proof(&endpoint)
            .map(|p| vec![ext::proof_frame(p)])
            .unwrap_or_default();
        let freed = FreedMessage {
            notice: FreedNotice { room, slot },
            agent: self.me.agent.clone(),
            trailing,
        };
        self.commands.push_back(Command::Send {
            room,
            endpoint,
            frames: freed.encode(),
        });
    }

    /// Free slots of our staging ring (`None`: the staged path is off).
    pub fn free_slots(&self) -> Option<u32> {
        self.ring.as_ref().map(SlotRing::free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_fits_both_token_slots_and_our_pages_or_is_refused() {
        let ok = StagedSlice {
            tokens: 16,
            src_token: 1024,
            dst_token: 2048,
            src_offset: 0,
            dst_offset: 1024,
            len: 1024,
        };
        assert_eq!(slice_item(&ok, 32768), Some(16 * 1024), "the writer's page");
        let bad = [
            StagedSlice { tokens: 0, ..ok },
            StagedSlice { len: 0, ..ok },
            StagedSlice {
                dst_offset: 1025,
                ..ok
            },
            StagedSlice {
                src_offset: 1,
                ..ok
            },
            StagedSlice {
                dst_offset: u64::MAX,
                ..ok
            },
            StagedSlice {
                tokens: u32::MAX,
                dst_token: u64::MAX,
                ..ok
            },
            StagedSlice {
                src_token: u64::MAX,
                tokens: 2,
                ..ok
            },
        ];
        for t in bad {
            assert_eq!(slice_item(&t, 32768), None, "{t:?}");
        }
        // Token slots past our pages.
        assert_eq!(slice_item(&ok, 16 * 2048 - 1), None);
    }
}
