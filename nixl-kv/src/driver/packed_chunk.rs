//! A chunk on the packed path (docs/protocol.md §5.6), out of a GPU packing area or a host one
//! alike: its pieces, the one being moved, and each piece's one WRITE of whole decode pages,
//! area → the decode's pages, the chunk's notification on the last.

use nixl_core::staging::TokenSlice;
use nixl_core::{Agent, MemRegion, MemType, XferDescs, XferOp, XferRequest};
use nixl_wire::RoomId;

use super::staged::WorkEnded;
use crate::proto::FailureReason;
use crate::proto::lower::{PackedPiece, Work};

/// One packed chunk.
pub(crate) struct PackedChunk {
    pub(crate) room: RoomId,
    pub(crate) peer: String,
    notif: Vec<u8>,
    pub(crate) slice: TokenSlice,
    /// Bytes of one decode page.
    pub(crate) item: u64,
    remote_mem: MemType,
    remote_gpu: u32,
    pieces: Vec<PackedPiece>,
    /// The piece being moved.
    next: usize,
}

impl PackedChunk {
    /// The chunk of `work` for `peer`; refused unless it is packed, has pieces, and its
    /// slice fills whole decode pages (a gap would carry stale area bytes into them).
    pub(crate) fn new(
        room: RoomId,
        peer: &str,
        work: &Work,
        notif: Vec<u8>,
    ) -> Result<Self, String> {
        let Work::Packed {
            slice,
            item,
            remote_mem,
            remote_gpu,
            pieces,
            ..
        } = work
        else {
            return Err("not a packed chunk".into());
        };
        if pieces.is_empty() {
            return Err("a packed chunk without pieces".into());
        }
        if !slice.fills_pages(*item) {
            return Err(format!("{slice:?} does not fill pages of {item} bytes"));
        }
        Ok(Self {
            room,
            peer: peer.to_owned(),
            notif,
            slice: *slice,
            item: *item,
            remote_mem: *remote_mem,
            remote_gpu: *remote_gpu,
            pieces: pieces.clone(),
            next: 0,
        })
    }

    /// The piece being moved.
    pub(crate) fn piece(&self) -> Result<&PackedPiece, String> {
        self.pieces
            .get(self.next)
            .ok_or_else(|| "a packed piece past its chunk".to_owned())
    }

    /// Moves on to the next piece; `false` when the piece done was the last.
    pub(crate) fn advance(&mut self) -> bool {
        self.next += 1;
        self.next < self.pieces.len()
    }

    /// Posts the WRITE of the current piece, gathered from byte `base` of `area` on: each of
    /// its copies is (offset in the piece, decode address, length). The chunk's notification
    /// goes with the last piece's.
    pub(crate) fn write(
        &self,
        agent: &Agent,
        area: &MemRegion,
        base: u64,
    ) -> Result<XferRequest, String> {
        let copies = &self.piece()?.copies;
        let mut local = XferDescs::with_capacity(area.mem, copies.len());
        let mut remote = XferDescs::with_capacity(self.remote_mem, copies.len());
        for &(off, dst, len) in copies {
            let at = base.checked_add(off);
            if at
                .and_then(|a| a.checked_add(len))
                .is_none_or(|e| e > area.len)
            {
                return Err(format!(
                    "{len} bytes at {off} of a piece at {base} of a {}-byte packing area",
                    area.len
                ));
            }
            local.push_in(area, base + off, len);
            remote.push(dst, len, u64::from(self.remote_gpu));
        }
        let last = self.next + 1 == self.pieces.len();
        let notif = (last && !self.notif.is_empty()).then_some(self.notif.as_slice());
        let req = agent
            .create_request(XferOp::Write, &local, &remote, &self.peer, notif)
            .map_err(|e| e.to_string())?;
        req.post().map_err(|e| e.to_string())?;
        Ok(req)
    }

    /// The chunk, failed for `reason`.
    pub(crate) fn failed(&self, reason: String) -> WorkEnded {
        WorkEnded {
            room: self.room,
            result: Err(FailureReason::Transfer {
                peer: self.peer.clone(),
                reason,
            }),
        }
    }
}
