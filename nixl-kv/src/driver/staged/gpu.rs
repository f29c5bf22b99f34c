//! The staged path on the GPU: nixl-core's gather and scatter kernels, one staging buffer per
//! manager, registered with its agent once.

use std::collections::HashMap;

use nixl_core::cuda::{DeviceBuffer, IpcAllocation, PeerPools, Staging, StagingEvent};
use nixl_core::staging::TokenSlice;
use nixl_core::{
    Agent, MemRegion, MemType, Registered, XferDescs, XferOp, XferRequest, XferStatus,
};
use nixl_wire::RoomId;
use nixl_wire::ext::{IpcAlloc, IpcPools, Ring, StagedSlice};

use super::packed::Packer;
use super::{ScatterEnd, StageEnd, WorkEnded};
use crate::driver::config::StagingConfig;
use crate::error::Error;
use crate::proto::decode::DecodeStaging;
use crate::proto::lower::Work;
use crate::proto::prefill::StagedWrite;
use crate::proto::staging::staging_layout;
use crate::proto::{FailureReason, Layout};

/// A staging buffer of `cfg.slots` slots on the pools' GPU, registered with `agent`, and the
/// kernels over `layout`'s pools for pieces of up to one slot.
fn prepare(
    agent: &Agent,
    layout: &Layout,
    cfg: StagingConfig,
) -> Result<(Staging, Registered<DeviceBuffer>), Error> {
    let refuse = |why: String| Error::Staging(why);
    if layout.kv_mem != MemType::Vram {
        return Err(refuse("the KV pool is not in GPU memory".into()));
    }
    let pools = staging_layout(layout).map_err(refuse)?;
    let per_slot = pools.pages_per_slot(cfg.slot_bytes);
    if per_slot == 0 {
        return Err(refuse(format!(
            "a slot of {} bytes holds no page of {} bytes",
            cfg.slot_bytes,
            pools.bytes_per_page()
        )));
    }
    let len = cfg
        .slot_bytes
        .checked_mul(u64::from(cfg.slots))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| refuse(format!("{} slots of {} bytes", cfg.slots, cfg.slot_bytes)))?;
    let staging = Staging::new(layout.gpu_id, pools, per_slot)?;
    let buf = agent.register(DeviceBuffer::new(layout.gpu_id, len)?)?;
    Ok((staging, buf))
}

/// What a staged piece is waiting for.
enum Phase {
    /// Its gather kernel.
    Gathering(StagingEvent),
    /// Its WRITE (with the `nixl-rs:staged:` notification).
    Writing(XferRequest),
}

struct Piece {
    w: StagedWrite,
    phase: Phase,
}

/// The prefill's staging buffer: gathers pieces into its slots and WRITEs each into the
/// decode's ring slot once its gather is done.
pub(crate) struct PrefillGpu {
    // Field order: requests end before the buffer they read is deregistered and freed.
    packer: Packer,
    pieces: Vec<Piece>,
    buf: Registered<DeviceBuffer>,
    /// Direct copies whose kernels have not finished yet: (room, peer, notification, the
    /// last launch's event).
    direct: Vec<(RoomId, String, Vec<u8>, StagingEvent)>,
    /// Same-node decodes' pools, mapped (dropped after `staging` is synchronized).
    peers: HashMap<String, PeerPools>,
    staging: Staging,
    slot_bytes: u64,
}

impl PrefillGpu {
    /// Allocates and registers the staging buffer; the core is then given
    /// `with_staging(cfg.slot_bytes, cfg.slots)`.
    pub(crate) fn new(agent: &Agent, layout: &Layout, cfg: StagingConfig) -> Result<Self, Error> {
        let (staging, buf) = prepare(agent, layout, cfg)?;
        tracing::info!(
            slots = cfg.slots,
            slot_bytes = cfg.slot_bytes,
            gpu = layout.gpu_id,
            "prefill staging buffer registered"
        );
        Ok(Self {
            packer: Packer::new(layout.gpu_id, cfg.slot_bytes),
            pieces: Vec::new(),
            buf,
            direct: Vec::new(),
            peers: HashMap::new(),
            staging,
            slot_bytes: cfg.slot_bytes,
        })
    }

    /// Maps a same-node decode's exported pools for the direct path.
    pub(crate) fn open_direct(
        &mut self,
        agent: &str,
        pools: &IpcPools,
        kv_ptrs: &[u64],
        item_len: u64,
    ) -> Result<(), String> {
        let allocs: Vec<IpcAllocation> = pools
            .allocs
            .iter()
            .map(|a| IpcAllocation {
                base: a.base,
                len: a.len,
                handle: a.handle,
            })
            .collect();
        let mapped = PeerPools::open(self.staging.ordinal(), &allocs, kv_ptrs, item_len)
            .map_err(|e| e.to_string())?;
        // Whole pages need the same page lengths; head slices are checked at each launch.
        let ours = self.staging.layout();
        let same_lens = ours.compatible(mapped.layout());
        if ours.buffers().len() != mapped.layout().buffers().len() {
            return Err("the decode's pools differ from ours in buffer count".into());
        }
        tracing::debug!(agent, same_lens, "decode pools mapped");
        self.peers.insert(agent.to_owned(), mapped);
        Ok(())
    }

    /// Unmaps a forgotten decode's pools (after every launch so far has finished).
    pub(crate) fn forget(&mut self, agent: &str) {
        if self.peers.contains_key(agent) {
            if let Err(e) = self.staging.synchronize() {
                tracing::debug!(error = %e, "staging stream not synchronized");
            }
            self.peers.remove(agent);
        }
    }

    /// Launches the direct copy of `src` pages (or of `slice` of each of their tokens) into the
    /// mapped pools of `peer` (`dst`, pair by pair), in launches of at most one slot's worth of pages; `notif` is sent once the
    /// last one is done ([`PrefillGpu::progress`]).
    pub(crate) fn direct(
        &mut self,
        room: RoomId,
        peer: &str,
        src: &[u32],
        dst: &[u32],
        slice: Option<TokenSlice>,
        notif: Vec<u8>,
    ) -> Result<(), String> {
        let pools = self
            .peers
            .get(peer)
            .ok_or_else(|| format!("the pools of {peer} are not mapped"))?;
        if src.len() != dst.len() || src.is_empty() {
            return Err(format!(
                "{} pages for {} destination pages",
                src.len(),
                dst.len()
            ));
        }
        let per = self.staging.max_pages();
        let mut last = None;
        for (s, d) in src.chunks(per).zip(dst.chunks(per)) {
            let ev = match &slice {
                None => self.staging.copy_direct(s, pools, d),
                Some(t) => self.staging.copy_sliced(s, pools, d, t),
            }
            .map_err(|e| format!("direct copy: {e}"))?;
            last = Some(ev);
        }
        if let Some(ev) = last {
            self.direct.push((room, peer.to_owned(), notif, ev));
        }
        Ok(())
    }

    /// Queues a packed chunk ([`Work::Packed`]); its first gather is launched, and it ends,
    /// in [`PrefillGpu::progress`].
    pub(crate) fn pack(
        &mut self,
        agent: &Agent,
        room: RoomId,
        peer: &str,
        work: &Work,
        notif: Vec<u8>,
    ) -> Result<(), String> {
        self.packer.push(agent, room, peer, work, notif)
    }

    /// Launches the gather of `w` (of head slices packed as decode pages when `w.pack` says
    /// so); its WRITE is posted by [`PrefillGpu::progress`] once the
    /// gather is done. A launch that fails ends the piece at once.
    pub(crate) fn stage(&mut self, w: StagedWrite) -> Result<(), StageEnd> {
        let end = |w: &StagedWrite, why: String| StageEnd {
            room: w.room,
            slot: w.local_slot,
            result: Err(FailureReason::Staging(why)),
        };
        if w.bytes > self.slot_bytes {
            let why = format!(
                "a piece of {} bytes in a slot of {}",
                w.bytes, self.slot_bytes
            );
            return Err(end(&w, why));
        }
        let offset = u64::from(w.local_slot).saturating_mul(self.slot_bytes);
        let gathered = match &w.pack {
            None => self
                .staging
                .gather(&w.src_pages, self.buf.buffer_mut(), offset),
            Some(p) => self.staging.pack_sliced(
                &w.src_pages,
                self.buf.buffer_mut(),
                offset,
                p.item,
                &p.slice,
            ),
        };
        match gathered {
            Ok(ev) => {
                self.pieces.push(Piece {
                    w,
                    phase: Phase::Gathering(ev),
                });
                Ok(())
            }
            Err(e) => Err(end(&w, format!("gather: {e}"))),
        }
    }

    /// Moves every piece on: a finished gather gets its WRITE posted at once, a finished WRITE
    /// ends the piece (reported in `ended`, its slot free again).
    pub(crate) fn progress(
        &mut self,
        agent: &Agent,
        ended: &mut Vec<StageEnd>,
        direct: &mut Vec<WorkEnded>,
    ) {
        self.direct.retain(|(room, peer, notif, ev)| {
            let res = match ev.is_done() {
                Ok(false) => return true,
                Ok(true) if notif.is_empty() => Ok(()),
                Ok(true) => agent
                    .send_notification(peer, notif)
                    .map_err(|e| format!("notification: {e}")),
                Err(e) => Err(format!("direct copy: {e}")),
            };
            direct.push(WorkEnded {
                room: *room,
                result: res.map_err(|reason| FailureReason::Transfer {
                    peer: peer.clone(),
                    reason,
                }),
            });
            false
        });
        self.packer.progress(agent, &mut self.staging, direct);
        let region = self.buf.region();
        let slot_bytes = self.slot_bytes;
        self.pieces.retain_mut(|p| {
            let outcome = step(agent, region, slot_bytes, p);
            match outcome {
                None => true,
                Some(res) => {
                    ended.push(StageEnd {
                        room: p.w.room,
                        slot: p.w.local_slot,
                        result: res,
                    });
                    false
                }
            }
        });
    }
}

/// One piece's next step: `None` while it waits, else how it ended.
fn step(
    agent: &Agent,
    region: MemRegion,
    slot_bytes: u64,
    p: &mut Piece,
) -> Option<Result<(), FailureReason>> {
    if let Phase::Gathering(ev) = &p.phase {
        match ev.is_done() {
            Ok(false) => return None,
            Ok(true) => match post(agent, region, slot_bytes, &p.w) {
                Ok(req) => p.phase = Phase::Writing(req),
                Err(reason) => return Some(Err(transfer(&p.w, reason))),
            },
            Err(e) => return Some(Err(FailureReason::Staging(format!("gather: {e}")))),
        }
    }
    let Phase::Writing(req) = &p.phase else {
        return None;
    };
    match req.status() {
        Ok(XferStatus::InProgress) => None,
        Ok(XferStatus::Done) => Some(Ok(())),
        Err(e) => Some(Err(transfer(&p.w, e.to_string()))),
    }
}

fn transfer(w: &StagedWrite, reason: String) -> FailureReason {
    FailureReason::Transfer {
        peer: w.peer.as_str().to_owned(),
        reason,
    }
}

/// The one WRITE of a gathered piece: our slot → the decode's ring slot, with its notification.
fn post(
    agent: &Agent,
    region: MemRegion,
    slot_bytes: u64,
    w: &StagedWrite,
) -> Result<XferRequest, String> {
    let mut local = XferDescs::with_capacity(MemType::Vram, 1);
    local.push_in(&region, u64::from(w.local_slot) * slot_bytes, w.bytes);
    let mut remote = XferDescs::with_capacity(MemType::Vram, 1);
    remote.push(w.remote_addr, w.bytes, u64::from(w.remote_gpu));
    let req = agent
        .create_request(
            XferOp::Write,
            &local,
            &remote,
            w.peer.as_str(),
            Some(&w.notif),
        )
        .map_err(|e| e.to_string())?;
    req.post().map_err(|e| e.to_string())?;
    Ok(req)
}

impl Drop for PrefillGpu {
    fn drop(&mut self) {
        // No gather may still write into the buffer when it is freed.
        if let Err(e) = self.staging.synchronize() {
            tracing::debug!(error = %e, "staging stream not synchronized");
        }
    }
}

/// The decode's staging ring: prefills WRITE pieces into its slots; each is scattered into
/// the room's pages on our stream when its notification arrives.
pub(crate) struct DecodeGpu {
    scattering: Vec<(RoomId, u32, StagingEvent)>,
    ring: Registered<DeviceBuffer>,
    staging: Staging,
    slot_bytes: u64,
}

impl DecodeGpu {
    /// Allocates and registers the ring (before the agent's metadata is taken, so that
    /// prefills can write into it) and says how it is announced.
    pub(crate) fn new(
        agent: &Agent,
        layout: &Layout,
        cfg: StagingConfig,
    ) -> Result<(Self, DecodeStaging, Option<IpcPools>), Error> {
        let (staging, ring) = prepare(agent, layout, cfg)?;
        let ipc = if cfg.direct { export(layout) } else { None };
        let announced = Ring {
            addr: ring.region().addr,
            slot_bytes: cfg.slot_bytes,
            slots: cfg.slots,
            gpu: layout.gpu_id,
        };
        tracing::info!(
            slots = cfg.slots,
            slot_bytes = cfg.slot_bytes,
            gpu = layout.gpu_id,
            "decode staging ring registered"
        );
        let gpu = Self {
            scattering: Vec::new(),
            ring,
            staging,
            slot_bytes: cfg.slot_bytes,
        };
        Ok((gpu, DecodeStaging::new(announced, cfg.per_room), ipc))
    }

    /// Launches the scatter of ring `slot` into `pages` (of `slice` of every token of the
    /// writer's pages the slot holds, when given).
    pub(crate) fn scatter(
        &mut self,
        room: RoomId,
        slot: u32,
        pages: &[u32],
        slice: Option<&StagedSlice>,
    ) -> Result<(), ScatterEnd> {
        let offset = u64::from(slot).saturating_mul(self.slot_bytes);
        let launched = match slice {
            None => self.staging.scatter(pages, self.ring.buffer(), offset),
            Some(t) => {
                let slice = crate::proto::slicing::token_slice_of(t);
                let item = t.src_token.saturating_mul(u64::from(t.tokens));
                self.staging
                    .unpack_sliced(self.ring.buffer(), offset, item, pages, &slice)
            }
        };
        match launched {
            Ok(ev) => {
                self.scattering.push((room, slot, ev));
                Ok(())
            }
            Err(e) => Err(ScatterEnd {
                room,
                slot,
                result: Err(e.to_string()),
            }),
        }
    }

    /// Reports the scatters that finished.
    pub(crate) fn progress(&mut self, ended: &mut Vec<ScatterEnd>) {
        self.scattering
            .retain(|(room, slot, ev)| match ev.is_done() {
                Ok(false) => true,
                Ok(true) => {
                    ended.push(ScatterEnd {
                        room: *room,
                        slot: *slot,
                        result: Ok(()),
                    });
                    false
                }
                Err(e) => {
                    ended.push(ScatterEnd {
                        room: *room,
                        slot: *slot,
                        result: Err(e.to_string()),
                    });
                    false
                }
            });
    }
}

/// Our KV pools' allocations as IPC handles, for same-node prefills (`None`, logged, when the
/// memory cannot be exported or the node has no identity).
fn export(layout: &Layout) -> Option<IpcPools> {
    let host = super::node_id()?;
    match nixl_core::cuda::export_allocations(layout.gpu_id, &layout.kv_ptrs) {
        Ok(allocs) => Some(IpcPools {
            host,
            gpu: layout.gpu_id,
            allocs: allocs
                .iter()
                .map(|a| IpcAlloc {
                    base: a.base,
                    len: a.len,
                    handle: a.handle,
                })
                .collect(),
        }),
        Err(e) => {
            tracing::info!(error = %e, "KV pools not exported: no direct path");
            None
        }
    }
}

impl Drop for DecodeGpu {
    fn drop(&mut self) {
        if let Err(e) = self.staging.synchronize() {
            tracing::debug!(error = %e, "staging stream not synchronized");
        }
    }
}
