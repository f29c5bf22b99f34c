//! The packed path on host pools (docs/protocol.md §5.6, `ManagerConfig::host_packing`): each
//! piece of a chunk of head slices is gathered on the CPU, token by token, into one of our
//! registered packing areas as whole decode pages, then written with one NIXL WRITE of those
//! pages. The decode side is passive, so any decode that takes head slices works.
//!
//! The gather follows the staging kernels' own table (`StagingLayout::sliced_table` into a
//! `StagingLayout::packed` area), so the host and GPU paths pack the same bytes. The pieces of
//! one chunk go one after the other (its notification on its last WRITE, after every byte of
//! the chunk); chunks go side by side, one area each, and wait in order when all areas are busy.

use std::collections::VecDeque;

use nixl_core::staging::StagingLayout;
use nixl_core::{Agent, MemType, Registered, SharedHostBuffer, XferRequest, XferStatus};
use nixl_wire::RoomId;

use super::config::HostPacking;
use super::packed_chunk::PackedChunk;
use super::staged::WorkEnded;
use crate::error::Error;
use crate::proto::Layout;
use crate::proto::lower::Work;

/// A chunk whose current piece is being written out of area `area`.
struct Writing {
    job: PackedChunk,
    area: u32,
    req: XferRequest,
}

/// Where one of our KV buffers lives: `[addr, addr + len)` is bytes `offset..` of `pools[pool]`.
#[derive(Debug, Clone, Copy)]
struct Source {
    addr: u64,
    len: u64,
    pool: usize,
    offset: u64,
}

/// The host packer of one prefill.
pub(crate) struct HostPacker {
    // Field order: requests end before the areas they read are deregistered and freed.
    writing: Vec<Writing>,
    waiting: VecDeque<PackedChunk>,
    free: Vec<u32>,
    areas: Option<Registered<SharedHostBuffer>>,
    area_bytes: u64,
    area_count: u32,
    ours: StagingLayout,
    /// Our KV buffers by address.
    sources: Vec<Source>,
    pools: Vec<SharedHostBuffer>,
}

impl HostPacker {
    /// A packer for `layout`'s host KV buffers, each of which must lie in one of `cfg.pools`.
    pub(crate) fn new(layout: &Layout, cfg: &HostPacking) -> Result<Self, Error> {
        let refuse = |why: String| Error::HostPacking(why);
        if layout.kv_mem != MemType::Dram {
            return Err(refuse(format!(
                "the KV pools are {:?} memory",
                layout.kv_mem
            )));
        }
        let total = cfg.area_bytes.checked_mul(u64::from(cfg.areas));
        if cfg.area_bytes == 0 || total.is_none_or(|t| usize::try_from(t).is_err()) {
            return Err(refuse(format!(
                "{} areas of {} bytes",
                cfg.areas, cfg.area_bytes
            )));
        }
        let ours = crate::proto::staging::staging_layout(layout).map_err(refuse)?;
        let mut sources = Vec::with_capacity(ours.buffers().len());
        for b in ours.buffers() {
            let found = cfg
                .pools
                .iter()
                .enumerate()
                .find(|(_, p)| p.region().contains(b.addr, b.len))
                .ok_or_else(|| {
                    refuse(format!(
                        "the KV buffer of {} bytes at {:#x} is in none of the {} pools given",
                        b.len,
                        b.addr,
                        cfg.pools.len()
                    ))
                })?;
            sources.push(Source {
                addr: b.addr,
                len: b.len,
                pool: found.0,
                offset: b.addr - found.1.addr(),
            });
        }
        sources.sort_by_key(|s| s.addr);
        Ok(Self {
            writing: Vec::new(),
            waiting: VecDeque::new(),
            free: (0..cfg.areas).rev().collect(),
            areas: None,
            area_bytes: cfg.area_bytes,
            area_count: cfg.areas,
            ours,
            sources,
            pools: cfg.pools.clone(),
        })
    }

    /// Queues a packed chunk for `peer`; its notification goes with its last WRITE.
    pub(crate) fn push(
        &mut self,
        room: RoomId,
        peer: &str,
        work: &Work,
        notif: Vec<u8>,
    ) -> Result<(), String> {
        self.waiting
            .push_back(PackedChunk::new(room, peer, work, notif)?);
        Ok(())
    }

    /// Moves the chunks on as far as they can go now: WRITEs that ended free their areas, and
    /// waiting pieces are gathered and written into free ones. Every chunk that ended (all its
    /// WRITEs done, or a gather or WRITE failed) is reported in `ended`.
    pub(crate) fn progress(&mut self, agent: &Agent, ended: &mut Vec<WorkEnded>) {
        let mut i = 0;
        while i < self.writing.len() {
            let status = self.writing[i].req.status();
            if matches!(status, Ok(XferStatus::InProgress)) {
                i += 1;
                continue;
            }
            let Writing { mut job, area, .. } = self.writing.swap_remove(i);
            self.free.push(area);
            match status {
                // The chunk's next piece goes before chunks that have not started.
                Ok(_) if job.advance() => self.waiting.push_front(job),
                Ok(_) => ended.push(WorkEnded {
                    room: job.room,
                    result: Ok(()),
                }),
                Err(e) => ended.push(job.failed(e.to_string())),
            }
        }
        while !self.free.is_empty() {
            let Some(job) = self.waiting.pop_front() else {
                return;
            };
            let Some(area) = self.free.pop() else {
                return;
            };
            match self.start(agent, &job, area) {
                Ok(req) => self.writing.push(Writing { job, area, req }),
                Err(reason) => {
                    self.free.push(area);
                    ended.push(job.failed(reason));
                }
            }
        }
    }

    /// Gathers `job`'s current piece into area `area` and posts its WRITE.
    fn start(
        &mut self,
        agent: &Agent,
        job: &PackedChunk,
        area: u32,
    ) -> Result<XferRequest, String> {
        if self.areas.is_none() {
            let len = usize::try_from(self.area_bytes * u64::from(self.area_count))
                .map_err(|_| "a packing area too large for this host".to_owned())?;
            let buf = SharedHostBuffer::new(len)
                .and_then(|b| agent.register(b))
                .map_err(|e| format!("packing areas: {e}"))?;
            tracing::info!(
                bytes = len,
                areas = self.area_count,
                "host packing areas registered"
            );
            self.areas = Some(buf);
        }
        let Some(areas) = self.areas.as_ref() else {
            return Err("no packing area".into());
        };
        let piece = job.piece()?;
        let base = u64::from(area) * self.area_bytes;
        let buf = areas.buffer();
        let n = piece.src.len();
        let need = self.ours.packed_bytes(n, job.item);
        if need.is_none_or(|b| b > self.area_bytes) {
            return Err(format!(
                "{n} pages of {} bytes in {} buffers exceed a packing area of {} bytes",
                job.item,
                self.ours.buffers().len(),
                self.area_bytes
            ));
        }
        let at = StagingLayout::packed(buf.addr() + base, self.ours.buffers().len(), n, job.item)
            .map_err(|e| e.to_string())?;
        let dst: Vec<u32> = (0..u32::try_from(n).unwrap_or(u32::MAX)).collect();
        let table = self
            .ours
            .sliced_table(&piece.src, &at, &dst, &job.slice)
            .map_err(|e| format!("packing gather: {e}"))?;
        let mut hint = 0;
        for (s, d, len) in table.copies() {
            let (pool, off) = self
                .locate(s, len, &mut hint)
                .ok_or_else(|| format!("{len} bytes at {s:#x} are in none of our KV buffers"))?;
            let to = usize::try_from(d - buf.addr()).map_err(|e| e.to_string())?;
            let len = usize::try_from(len).map_err(|e| e.to_string())?;
            buf.copy_from(to, pool, off, len)
                .map_err(|e| format!("packing gather: {e}"))?;
        }
        job.write(agent, &areas.region(), base)
    }

    /// The pool and offset holding `[addr, addr + len)`; `hint` is the source the previous
    /// copy came from (copies go buffer by buffer, so it nearly always holds the next one).
    fn locate(&self, addr: u64, len: u64, hint: &mut usize) -> Option<(&SharedHostBuffer, usize)> {
        let inside = |s: &Source| {
            addr >= s.addr && addr.checked_add(len).is_some_and(|e| e <= s.addr + s.len)
        };
        if !self.sources.get(*hint).is_some_and(inside) {
            *hint = self
                .sources
                .partition_point(|s| s.addr <= addr)
                .checked_sub(1)
                .filter(|&i| self.sources.get(i).is_some_and(inside))
                // Buffers that overlap: any that holds the range.
                .or_else(|| self.sources.iter().position(inside))?;
        }
        let s = self.sources.get(*hint)?;
        let off = usize::try_from(s.offset + (addr - s.addr)).ok()?;
        Some((self.pools.get(s.pool)?, off))
    }
}
