//! The packed path on the GPU (docs/protocol.md §5.6): a decode rank whose token slots our head
//! slices fill gets each piece of a chunk gathered into our packing area as whole decode pages
//! (one kernel launch), then one NIXL WRITE of those pages. The decode side is passive, so any
//! decode that takes head slices works: SGLang's Python peers included.
//!
//! One packing area of one staging slot, allocated and registered on first use; chunks go in
//! the order they were posted, their pieces one after the other (a piece's gather waits for the
//! previous piece's WRITE to leave the area), the chunk's notification on its last WRITE, so it
//! arrives after every byte of the chunk.

use std::collections::VecDeque;

use nixl_core::cuda::{DeviceBuffer, Staging, StagingEvent};
use nixl_core::staging::TokenSlice;
use nixl_core::{Agent, MemType, Registered, XferRequest, XferStatus};
use nixl_wire::RoomId;

use super::DirectEnd;
use crate::driver::packed_write::{PieceTarget, write_piece};
use crate::proto::FailureReason;
use crate::proto::lower::{Coords, PackedPiece};

/// What the chunk at the front waits for.
enum Phase {
    /// Nothing: its next piece's gather can be launched.
    Ready,
    /// Its piece's gather.
    Gathering(StagingEvent),
    /// Its piece's WRITE.
    Writing(XferRequest),
}

/// One chunk of the packed path.
struct Job {
    room: RoomId,
    peer: String,
    notif: Vec<u8>,
    slice: TokenSlice,
    item: u64,
    remote_mem: MemType,
    remote_gpu: u32,
    pieces: Vec<PackedPiece>,
    next: usize,
    phase: Phase,
}

/// The packed chunks of one prefill and the area they are gathered into.
pub(super) struct Packer {
    // Field order: requests end before the area they read is deregistered and freed.
    jobs: VecDeque<Job>,
    area: Option<Registered<DeviceBuffer>>,
    area_bytes: u64,
    gpu: u32,
}

impl Packer {
    /// A packer whose area (allocated on first use) is `area_bytes` on GPU `gpu`.
    pub(super) fn new(gpu: u32, area_bytes: u64) -> Self {
        Self {
            jobs: VecDeque::new(),
            area: None,
            area_bytes,
            gpu,
        }
    }

    /// Queues a packed chunk for `peer`; its notification goes with its last WRITE.
    pub(super) fn push(
        &mut self,
        agent: &Agent,
        room: RoomId,
        peer: &str,
        coords: &Coords,
        notif: Vec<u8>,
    ) -> Result<(), String> {
        let Coords::Packed {
            slice,
            item,
            remote_mem,
            remote_gpu,
            pieces,
        } = coords
        else {
            return Err("not a packed chunk".into());
        };
        if pieces.is_empty() {
            return Err("a packed chunk without pieces".into());
        }
        if self.area.is_none() {
            let len = usize::try_from(self.area_bytes)
                .map_err(|_| format!("a packing area of {} bytes", self.area_bytes))?;
            let buf = DeviceBuffer::new(self.gpu, len)
                .and_then(|b| agent.register(b))
                .map_err(|e| format!("packing area: {e}"))?;
            tracing::info!(bytes = len, gpu = self.gpu, "packing area registered");
            self.area = Some(buf);
        }
        self.jobs.push_back(Job {
            room,
            peer: peer.to_owned(),
            notif,
            slice: *slice,
            item: *item,
            remote_mem: *remote_mem,
            remote_gpu: *remote_gpu,
            pieces: pieces.clone(),
            next: 0,
            phase: Phase::Ready,
        });
        Ok(())
    }

    /// Moves the chunks on as far as they can go now; every chunk that ended (all its WRITEs
    /// done, or a launch or WRITE failed) is reported in `ended`.
    pub(super) fn progress(
        &mut self,
        agent: &Agent,
        staging: &mut Staging,
        ended: &mut Vec<DirectEnd>,
    ) {
        let Some(area) = self.area.as_mut() else {
            return;
        };
        while let Some(job) = self.jobs.front_mut() {
            match step(agent, staging, area, job) {
                Ok(false) => return,
                Ok(true) => {
                    if job.next < job.pieces.len() {
                        continue;
                    }
                    ended.push((job.room, Ok(())));
                }
                Err(reason) => ended.push((
                    job.room,
                    Err(FailureReason::Transfer {
                        peer: job.peer.clone(),
                        reason,
                    }),
                )),
            }
            self.jobs.pop_front();
        }
    }
}

/// One step of `job`'s current piece: `Ok(true)` when the piece is done (`job.next` moved on),
/// `Ok(false)` while it waits.
fn step(
    agent: &Agent,
    staging: &mut Staging,
    area: &mut Registered<DeviceBuffer>,
    job: &mut Job,
) -> Result<bool, String> {
    loop {
        let piece = job
            .pieces
            .get(job.next)
            .ok_or_else(|| "a packed piece past its chunk".to_owned())?;
        match &job.phase {
            Phase::Ready => {
                let ev = staging
                    .pack_sliced(&piece.src, area.buffer_mut(), 0, job.item, &job.slice)
                    .map_err(|e| format!("packing gather: {e}"))?;
                job.phase = Phase::Gathering(ev);
            }
            Phase::Gathering(ev) => {
                if !ev.is_done().map_err(|e| format!("packing gather: {e}"))? {
                    return Ok(false);
                }
                let last = job.next + 1 == job.pieces.len();
                let to = PieceTarget {
                    peer: &job.peer,
                    mem: job.remote_mem,
                    gpu: job.remote_gpu,
                };
                let notif = last.then_some(job.notif.as_slice());
                let req = write_piece(agent, &area.region(), 0, &piece.copies, &to, notif)?;
                job.phase = Phase::Writing(req);
            }
            Phase::Writing(req) => match req.status().map_err(|e| e.to_string())? {
                XferStatus::InProgress => return Ok(false),
                XferStatus::Done => {
                    job.next += 1;
                    job.phase = Phase::Ready;
                    return Ok(true);
                }
            },
        }
    }
}
