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
use nixl_core::{Agent, Registered, XferRequest, XferStatus};
use nixl_wire::RoomId;

use super::WorkEnded;
use crate::driver::packed_chunk::PackedChunk;
use crate::proto::lower::Work;

/// What the chunk at the front waits for.
enum Phase {
    /// Nothing: its next piece's gather can be launched.
    Ready,
    /// Its piece's gather.
    Gathering(StagingEvent),
    /// Its piece's WRITE.
    Writing(XferRequest),
}

/// One chunk of the packed path and what it waits for.
struct Job {
    chunk: PackedChunk,
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
        work: &Work,
        notif: Vec<u8>,
    ) -> Result<(), String> {
        let chunk = PackedChunk::new(room, peer, work, notif)?;
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
            chunk,
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
        ended: &mut Vec<WorkEnded>,
    ) {
        let Some(area) = self.area.as_mut() else {
            return;
        };
        while let Some(job) = self.jobs.front_mut() {
            match step(agent, staging, area, job) {
                Ok(Step::Waiting) => return,
                Ok(Step::PieceDone) => continue,
                Ok(Step::ChunkDone) => ended.push(WorkEnded {
                    room: job.chunk.room,
                    result: Ok(()),
                }),
                Err(reason) => ended.push(job.chunk.failed(reason)),
            }
            self.jobs.pop_front();
        }
    }
}

/// What one step of a chunk came to.
enum Step {
    Waiting,
    PieceDone,
    ChunkDone,
}

/// One step of `job`'s current piece.
fn step(
    agent: &Agent,
    staging: &mut Staging,
    area: &mut Registered<DeviceBuffer>,
    job: &mut Job,
) -> Result<Step, String> {
    loop {
        match &job.phase {
            Phase::Ready => {
                let c = &job.chunk;
                let ev = staging
                    .pack_sliced(&c.piece()?.src, area.buffer_mut(), 0, c.item, &c.slice)
                    .map_err(|e| format!("packing gather: {e}"))?;
                job.phase = Phase::Gathering(ev);
            }
            Phase::Gathering(ev) => {
                if !ev.is_done().map_err(|e| format!("packing gather: {e}"))? {
                    return Ok(Step::Waiting);
                }
                job.phase = Phase::Writing(job.chunk.write(agent, &area.region(), 0)?);
            }
            Phase::Writing(req) => match req.status().map_err(|e| e.to_string())? {
                XferStatus::InProgress => return Ok(Step::Waiting),
                XferStatus::Done => {
                    job.phase = Phase::Ready;
                    return Ok(if job.chunk.advance() {
                        Step::PieceDone
                    } else {
                        Step::ChunkDone
                    });
                }
            },
        }
    }
}
