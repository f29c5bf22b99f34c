//! The prefill side: rooms, decode peers, the status rule, chunked sends and their lowering.
//!
//! Inputs are decoded messages, sender calls, IO outcomes and `now`; the output is one ordered
//! queue of [`Command`]s ([`PrefillCore::poll_command`]) that the driver carries out in order.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nixl_core::MemType;
use nixl_wire::ext::{self, FreedMessage, IpcPools, ProofNotice, Ring, StagedNotice};
use nixl_wire::{
    AgentName, DecodeTpInfo, GpuId, KvArgsRegister, Notification, PrefillInbound, Profile, RoomId,
    TransferInfo,
};

use super::lists::{ListTrack, peer_cap};
use super::log_budget::{LogBudget, peer_warn};
use super::lower::{
    ListId, ListKind, ListSpec, PackedPiece, Work, list_spec, lower_explicit, lower_indexed,
};
use super::plan::{CopyOp, Run, aux_buffers, group_runs, plan_aux, plan_kv};
use super::route::{PackArea, Route, RouteInputs};
use super::slicing::{HeadSlice, SliceParams};
use super::staging::{LocalSlots, Pushed, SlotSchedule, pages_per_piece, staging_layout};
use super::timers::{Timer, TimerTable};
use super::{FailureReason, KvPoll, Layout};

/// A registered decode agent, as its registration describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The decode's KV buffer addresses.
    pub kv_ptrs: Vec<u64>,
    /// The decode's aux buffer addresses.
    pub aux_ptrs: Vec<u64>,
    /// The decode's GPU.
    pub gpu_id: GpuId,
    /// What later SGLang decodes add.
    pub tp_info: Option<DecodeTpInfo>,
    /// It advertised the `proof` capability.
    pub proves: bool,
    /// Its staging ring, if it advertised `staging` with a well-formed ring frame (ours).
    pub ring: Option<Ring>,
    /// Its exported KV pools, if it advertised `direct` with a well-formed ipc frame (ours).
    pub ipc: Option<IpcPools>,
    /// The wire format it speaks: how Success and failures reach it (docs/protocol.md §10).
    pub profile: Profile,
    /// It sent our capability frame: a decode of ours, which reads notifications in any profile.
    pub ours: bool,
    /// What it announced that we do not transfer yet: every room to it fails with this.
    pub unsupported: Option<String>,
}

/// One chunk (or aux row) to move, lowered: how it moves and the notification the decode gets
/// after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// The room it belongs to.
    pub room: RoomId,
    /// The decode agent.
    pub peer: AgentName,
    /// KV pages or the aux rows.
    pub kind: ListKind,
    /// The notification payload.
    pub notif: Vec<u8>,
    /// How it moves.
    pub work: Work,
}

/// Something the driver must do for the core, in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Load a decode agent's NIXL metadata; report with [`PrefillCore::remote_loaded`].
    LoadRemote {
        /// The agent the registration names.
        agent: AgentName,
        /// Its metadata.
        metadata: Bytes,
    },
    /// Drop a remote agent's metadata and every list prepared for it.
    Forget {
        /// The agent's name as NIXL knows it.
        agent: String,
    },
    /// Prepare a descriptor list; report with [`PrefillCore::list_prepared`].
    Prepare(ListSpec),
    /// Release a prepared list (every request made from it was already posted).
    Release(ListId),
    /// Start one chunk's [`Work`] (a NIXL WRITE, a direct kernel copy or a packed pipeline);
    /// report its end with [`PrefillCore::transfer_done`].
    Post(Post),
    /// Send a stand-alone notification to decode agents (the failure push).
    Notify {
        /// The agents.
        agents: Vec<AgentName>,
        /// The payload.
        payload: Vec<u8>,
    },
    /// Gather, then WRITE one staged piece; report with [`PrefillCore::staged_done`].
    Stage(StagedWrite),
    /// Send a message to a decode's listener without waiting (0.5.2x `KV_STATUS` and
    /// `ABORT_ACK`, docs/protocol.md §10.5).
    SendStatus {
        /// `tcp://HOST:PORT` of the decode's PULL listener.
        endpoint: String,
        /// The frames.
        frames: Vec<Bytes>,
    },
    /// Map a same-node decode's exported KV pools; report with [`PrefillCore::direct_opened`].
    OpenDirect {
        /// The agent as NIXL knows it.
        agent: AgentName,
        /// Its exported allocations.
        pools: IpcPools,
        /// Its KV buffer addresses (in its address space).
        kv_ptrs: Vec<u64>,
        /// Bytes of one page of each of its KV buffers.
        item_len: u64,
    },
}

/// A room whose decode infos are complete but that no sender claims yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnclaimedRoom {
    /// The room.
    pub room: RoomId,
    /// Pages the (first real) decode asked for.
    pub pages: u32,
}

#[derive(Debug)]
struct PeerState {
    peer: Arc<Peer>,
    kv: ListTrack,
    aux: ListTrack,
    /// Its token list for head slices, and the slice shape it was prepared for.
    tokens: ListTrack,
    tokens_geometry: Option<super::lower::TokenGeometry>,
    /// Its last registration or transfer info.
    last_seen: Instant,
    /// It advertised that it echoes proofs (our decodes do).
    proves: bool,
    /// It echoed the right proof once: from now on every info must carry it.
    proven: bool,
    /// Its pools are mapped into our process: KV pages go by the direct path.
    direct: bool,
}

/// One chunk to one decode: our pages and the decode's, pair by pair.
pub(super) struct Chunk<'a> {
    pub(super) src: &'a [u32],
    pub(super) dst: &'a [u32],
}

impl Chunk<'_> {
    /// The (prefill page, decode page) pairs.
    pub(super) fn pairs(&self) -> Vec<(u32, u32)> {
        self.src
            .iter()
            .copied()
            .zip(self.dst.iter().copied())
            .collect()
    }

    /// Entries a decode's list must have to cover the chunk's pages.
    pub(super) fn need(&self) -> u32 {
        self.dst.iter().max().map_or(0, |m| m.saturating_add(1))
    }
}

/// Runs averaging at least this many pages are posted merged (explicit descriptors) rather
/// than page by page from prepared lists.
pub const MERGE_RUN_PAGES: usize = 2;

/// A decode agent whose metadata NIXL refused is not loaded again for this long (each failed
/// load can leak a descriptor inside UCX; the refusal may be transient).
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(5);

/// Registered plus loading decode agents a prefill keeps at most; registrations beyond are
/// dropped (each load costs NIXL state, and a failed one leaks a descriptor inside UCX).
pub const MAX_PEERS: usize = 4096;

/// A decode agent that sent nothing for this long, and that no room refers to, is forgotten
/// (its NIXL metadata released). Our decodes re-register at least every
/// [`REREGISTER_INTERVAL`](super::decode::REREGISTER_INTERVAL) while active.
pub const DEFAULT_PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// How often idle decodes that rooms still refer to are looked at again.
const PEER_RECHECK: Duration = Duration::from_secs(10);
/// Warnings decodes can cause, per 5 s (the rest are counted in the next one).
const PEER_LOG_BURST: u32 = 20;

/// Whether our own prepared lists exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Pending,
    Ready,
    Failed,
}

/// The prefill side of one engine rank.
#[derive(Debug)]
pub struct PrefillCore {
    layout: Arc<Layout>,
    /// Decode agents: registered, loading, refused lately.
    peers: PeerTable,
    rooms: HashMap<RoomId, Room>,
    orphan_timeout: Duration,
    peer_idle_timeout: Duration,
    proofs: Option<Proofs>,
    local_kv: Readiness,
    local_aux: Readiness,
    /// Our token lists for head slices, by (offset, length) of the slice.
    local_tokens: HashMap<(u64, u64), Readiness>,
    commands: VecDeque<Command>,
    runs: Vec<Run>,
    staging: Option<PrefillStaging>,
    /// Our node's identity, when the direct path is on (see [`PrefillCore::with_direct`]).
    node: Option<String>,
    /// Whether head slices may go packed (see [`PrefillCore::with_packing`]).
    packing: bool,
    /// Bytes of one host packing area, when head slices on host pools go packed (see
    /// [`PrefillCore::with_host_packing`]).
    host_area: Option<u64>,
    /// When [`PrefillCore::handle_timeout`] has work next (see [`PrefillCore::poll_timeout`]).
    timers: TimerTable,
    /// Bounds the warnings decodes can cause (bad proofs, conflicts, unloadable metadata, ...).
    peer_logs: LogBudget,
}

impl PrefillCore {
    /// A core for `layout`. Rooms that no sender claims and that see no message for
    /// `orphan_timeout` are dropped by [`PrefillCore::handle_timeout`]. The first commands
    /// prepare our own descriptor lists.
    pub fn new(layout: Layout, orphan_timeout: Duration) -> Self {
        let mut commands = VecDeque::new();
        commands.push_back(Command::Prepare(list_spec(
            ListId::Local(ListKind::Kv),
            layout.kv_mem,
            &layout.kv_ptrs,
            &layout.kv_item_lens,
            layout.kv_pages,
            layout.gpu_id,
        )));
        commands.push_back(Command::Prepare(list_spec(
            ListId::Local(ListKind::Aux),
            MemType::Dram,
            &layout.aux_ptrs,
            &layout.aux_item_lens,
            layout.aux_slots,
            0,
        )));
        Self {
            layout: Arc::new(layout),
            peers: PeerTable::default(),
            rooms: HashMap::new(),
            orphan_timeout,
            peer_idle_timeout: DEFAULT_PEER_IDLE_TIMEOUT,
            proofs: None,
            local_kv: Readiness::Pending,
            local_aux: Readiness::Pending,
            local_tokens: HashMap::new(),
            commands,
            runs: Vec::new(),
            staging: None,
            node: None,
            packing: false,
            timers: TimerTable::default(),
            peer_logs: LogBudget::new(PEER_LOG_BURST),
            host_area: None,
        }
    }

    /// Turns the staged path on: our staging buffer (registered with our agent) holds `slots`
    /// slots of `slot_bytes`. Rooms to decodes that grant slots of their ring then go staged.
    #[must_use]
    pub fn with_staging(mut self, slot_bytes: u64, slots: u32) -> Self {
        self.staging = (slot_bytes > 0 && slots > 0).then(|| PrefillStaging {
            slot_bytes,
            local: LocalSlots::new(slots),
        });
        self
    }

    /// Sends head slices by the packed path (docs/protocol.md §5.6) when the staging buffer
    /// allows it (see [`PrefillCore::with_staging`]): the driver gathers them into whole decode
    /// pages in a packing area of one slot.
    #[must_use]
    pub fn with_packing(mut self) -> Self {
        self.packing = true;
        self
    }

    /// Sends head slices out of host KV pools by the packed path: the driver gathers them on the
    /// CPU into whole decode pages, in packing areas of `area_bytes` (a piece is as many pages of
    /// every buffer as fit one area).
    #[must_use]
    pub fn with_host_packing(mut self, area_bytes: u64) -> Self {
        self.host_area = (area_bytes > 0).then_some(area_bytes);
        self
    }

    /// Sets how long an idle decode agent is kept.
    #[must_use]
    pub fn with_peer_idle_timeout(mut self, t: Duration) -> Self {
        self.peer_idle_timeout = t;
        self
    }

    /// Sends decodes that advertise it a proof to echo, and checks it.
    #[must_use]
    pub fn with_proofs(mut self, proofs: Proofs) -> Self {
        self.proofs = Some(proofs);
        self
    }

    /// Our layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The next command for the driver, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Moves every queued command to `out`, in order.
    pub fn drain_commands(&mut self, out: &mut Vec<Command>) {
        out.extend(self.commands.drain(..));
    }

    /// Handles a decoded message from a decode.
    pub fn handle_inbound(&mut self, msg: PrefillInbound, now: Instant) {
        match msg {
            PrefillInbound::Register(r) => self.handle_register(r, now),
            PrefillInbound::Transfer(t) => self.handle_transfer_info(t, now),
            PrefillInbound::Freed(f) => self.handle_freed(&f, now),
            PrefillInbound::RegisterV2x(r) => self.handle_register_v2x(r, now),
            PrefillInbound::TransferV2x(t) => self.handle_transfer_v2x(t, now),
            PrefillInbound::Abort(a) => self.handle_abort(&a),
            PrefillInbound::StagingRsp(m) => {
                peer_warn!(self.peer_logs, now, room = %m.room, "STAGING_RSP: SGLang's staging path is not supported");
                self.fail(
                    m.room,
                    FailureReason::Unsupported("SGLang's staging path".into()),
                );
            }
            other => {
                peer_warn!(
                    self.peer_logs,
                    now,
                    ?other,
                    "unexpected prefill-bound message; dropped"
                );
            }
        }
    }

    fn handle_transfer_info(&mut self, t: TransferInfo, now: Instant) {
        if !self.origin_ok(&t.agent, &t.trailing) {
            peer_warn!(self.peer_logs, now, room = %t.room, agent = %t.agent, "transfer info without the proof its agent owes; refused");
            return;
        }
        if let Some(p) = self.peers.get_mut(&t.agent) {
            p.last_seen = now;
        }
        let room_id = t.room;
        self.timers.lower(Timer::Orphan, now + self.orphan_timeout);
        let r = self
            .rooms
            .entry(room_id)
            .or_insert_with(|| Room::new(KvPoll::Bootstrapping, now));
        r.touched = now;
        let started = r.sender.as_ref().is_some_and(|s| s.sent > 0);
        let known = r.infos.iter().position(|i| i.agent == t.agent);
        let required = r
            .infos
            .first()
            .map_or(t.required_dst_info_num, |i| i.required_dst_info_num);
        let complete = r.infos.len() >= required as usize;
        // A claimed room cannot be re-targeted: once its pages move, nothing changes; once its
        // infos are complete, no other decode joins. The refused sender is told, never the
        // decodes the room belongs to.
        let conflict = match known {
            Some(_) => started,
            None => started || complete,
        };
        if conflict {
            peer_warn!(self.peer_logs, now, room = %room_id, agent = %t.agent, "conflicting transfer info refused");
            if known.is_none() && self.peers.contains_key(&t.agent) {
                let payload =
                    Notification::fail(room_id, &FailureReason::RoomClaimed.to_string()).encode();
                self.commands.push_back(Command::Notify {
                    agents: vec![t.agent],
                    payload,
                });
            }
            return;
        }
        if t.required_dst_info_num != required {
            let reason = FailureReason::InfosDisagree(format!(
                "{} expects {} infos, {required} before it",
                t.agent, t.required_dst_info_num
            ));
            r.infos.push(t);
            self.fail(room_id, reason);
            return;
        }
        match known {
            Some(k) => r.infos[k] = t,
            None => r.infos.push(t),
        }
        if r.infos.len() == required as usize {
            let mut counts = r
                .infos
                .iter()
                .filter(|i| !i.is_dummy())
                .map(|i| i.dst_pages.len());
            let first = counts.next();
            if let Some(other) = counts.find(|&c| Some(c) != first) {
                let reason = FailureReason::InfosDisagree(format!(
                    "decodes ask for {} and {other} pages",
                    first.unwrap_or(0)
                ));
                self.fail(room_id, reason);
                return;
            }
            r.merge(KvPoll::WaitingForInput);
        }
    }

    /// A sender is created for `room` (status at least Bootstrapping).
    pub fn sender_new(&mut self, room: RoomId, now: Instant) {
        let r = self
            .rooms
            .entry(room)
            .or_insert_with(|| Room::new(KvPoll::Bootstrapping, now));
        r.touched = now;
        r.merge(KvPoll::Bootstrapping);
        if r.sender.is_none() {
            r.sender = Some(Sender {
                num_pages: 0,
                aux_index: 0,
                sent: 0,
                chunk: 0,
                finished_sending: false,
            });
        }
    }

    /// The sender learns the request's page count and its aux slot.
    pub fn sender_init(
        &mut self,
        room: RoomId,
        num_pages: u32,
        aux_index: u32,
    ) -> Result<(), FailureReason> {
        if aux_index >= self.layout.aux_slots {
            let slots = self.layout.aux_slots;
            return Err(self.fail(
                room,
                FailureReason::AuxOutsideSlots {
                    index: aux_index,
                    slots,
                },
            ));
        }
        let Some(s) = self.rooms.get_mut(&room).and_then(|r| r.sender.as_mut()) else {
            return Err(FailureReason::NoSender);
        };
        s.num_pages = num_pages;
        s.aux_index = aux_index;
        Ok(())
    }

    /// Plans and lowers one chunk: the next `pages.len()` pages of the request. Queues one KV
    /// [`Command::Post`] per non-dummy decode (plus its aux post after the last chunk). Any
    /// problem fails the room, queues the failure push, and is returned.
    pub fn sender_send(
        &mut self,
        room: RoomId,
        pages: &[u32],
        now: Instant,
    ) -> Result<(), FailureReason> {
        match self.plan_chunk(room, pages, now) {
            Ok(posts) => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    // The infos stay until release: a later failure is pushed to those agents.
                    r.in_flight += posts.len();
                }
                self.commands.extend(posts.into_iter().map(Command::Post));
                self.pump(room);
                Ok(())
            }
            Err(reason) => Err(self.fail(room, reason)),
        }
    }

    fn plan_chunk(
        &mut self,
        room: RoomId,
        pages: &[u32],
        now: Instant,
    ) -> Result<Vec<Post>, FailureReason> {
        let kv_pages = self.layout.kv_pages;
        if let Some(&bad) = pages.iter().find(|&&p| p >= kv_pages) {
            return Err(FailureReason::PageOutsidePool {
                page: bad,
                pages: kv_pages,
            });
        }
        let r = self.rooms.get_mut(&room).ok_or(FailureReason::NoSender)?;
        r.touched = now;
        if let Some(reason) = &r.failure {
            return Err(reason.clone());
        }
        if r.status < KvPoll::WaitingForInput {
            return Err(FailureReason::SendBeforeInfo);
        }
        let s = r.sender.as_mut().ok_or(FailureReason::NoSender)?;
        let n = pages.len() as u32;
        if s.finished_sending || s.sent.saturating_add(n) > s.num_pages || n == 0 {
            return Err(FailureReason::ChunkOverrun {
                pages: n,
                sent: s.sent,
                total: s.num_pages,
            });
        }
        let (start, chunk) = (s.sent as usize, s.chunk);
        s.sent += n;
        s.chunk += 1;
        let last = s.sent == s.num_pages;
        s.finished_sending = last;
        let aux_index = s.aux_index;
        let infos: Vec<TransferInfo> = r.infos.iter().filter(|i| !i.is_dummy()).cloned().collect();
        if start == 0 {
            self.choose_staging(room, &infos, now);
            self.choose_routes(room, &infos)?;
        }
        if self.rooms.get(&room).is_some_and(|r| !r.staged.is_empty()) {
            // Its pieces may wait for slots from now on: a stall is looked for by then.
            self.timers
                .lower(Timer::StagedStall, now + STAGED_STALL_TIMEOUT);
            return self.stage_chunk(room, &infos, pages, last, aux_index);
        }

        let mut out = Vec::with_capacity(infos.len() * 2);
        for info in &infos {
            let peer = self
                .peers
                .get(&info.agent)
                .map(|p| Arc::clone(&p.peer))
                .ok_or_else(|| FailureReason::DecodeNotRegistered(info.agent.clone()))?;
            let dst = info
                .dst_pages
                .get(start..start + pages.len())
                .ok_or_else(|| FailureReason::TooFewDecodePages {
                    agent: info.agent.clone(),
                    got: info.dst_pages.len(),
                    need: start + pages.len(),
                })?;
            if peer.kv_ptrs.len() != self.layout.kv_ptrs.len() {
                return Err(FailureReason::KvBufferCount {
                    decode: peer.kv_ptrs.len(),
                    prefill: self.layout.kv_ptrs.len(),
                });
            }
            let dst: Vec<u32> = dst.iter().map(|p| p.get()).collect();
            let c = Chunk {
                src: pages,
                dst: &dst,
            };
            let notif = self.kv_notif(&peer, room, chunk, last);
            let route = self
                .rooms
                .get(&room)
                .and_then(|r| r.routes.iter().find(|(a, _)| *a == info.agent))
                .map(|(_, route)| *route)
                .ok_or_else(|| FailureReason::DecodeNotRegistered(info.agent.clone()))?;
            let work = match route {
                Route::Pages => self.lower_kv(&info.agent, &peer, &c),
                Route::Tokens(slice) => self.lower_sliced(&slice, &info.agent, &peer, &c)?,
                Route::Packed(slice, area) => self.lower_packed(&slice, area, &peer, &c)?,
                Route::Direct(slice) => Work::Direct {
                    src: c.src.to_vec(),
                    dst: c.dst.to_vec(),
                    slice: slice.map(|s| s.token_slice()),
                },
                // Staged rooms were lowered above, and every decode of one is staged.
                Route::Staged => {
                    return Err(FailureReason::Staging(
                        "a staged route in a room that is not staged".into(),
                    ));
                }
            };
            out.push(Post {
                room,
                peer: info.agent.clone(),
                kind: ListKind::Kv,
                notif,
                work,
            });
            if last {
                let work = self.lower_aux(&info.agent, &peer, aux_index, info.dst_aux_index);
                out.push(Post {
                    room,
                    peer: info.agent.clone(),
                    kind: ListKind::Aux,
                    notif: self.aux_notif(&peer, room),
                    work,
                });
            }
        }
        Ok(out)
    }

    /// Chooses the route to each real decode of `room` ([`route::choose`]), once, at its first
    /// chunk (after the staged decision), and logs them. A decode that cannot take any route
    /// fails the room.
    ///
    /// [`route::choose`]: super::route::choose
    fn choose_routes(&mut self, room: RoomId, infos: &[TransferInfo]) -> Result<(), FailureReason> {
        let staged = self.rooms.get(&room).is_some_and(|r| !r.staged.is_empty());
        let mut routes = Vec::with_capacity(infos.len());
        for info in infos {
            let state = self
                .peers
                .get(&info.agent)
                .ok_or_else(|| FailureReason::DecodeNotRegistered(info.agent.clone()))?;
            let slice = self.head_slice(&state.peer);
            let pack = match &slice {
                Some(Ok(s)) => self.pack_area(s),
                _ => None,
            };
            let inputs = RouteInputs {
                staged,
                mapped: state.direct,
                slice,
                pack,
            };
            let route = super::route::choose(&inputs)?;
            tracing::debug!(%room, agent = %info.agent, %route, "route chosen");
            routes.push((info.agent.clone(), route));
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            r.routes = routes;
        }
        Ok(())
    }

    /// Lowers the KV pages of `c` to `agent`: indices into prepared lists when both cover them,
    /// else explicit descriptors (queuing a larger list when one is due).
    fn lower_kv(&mut self, agent: &AgentName, peer: &Peer, c: &Chunk<'_>) -> Work {
        let need = c.need();
        let pairs = c.pairs();
        group_runs(c.src, c.dst, &mut self.runs);
        // Runs merge adjacent pages into one descriptor per buffer. Each descriptor costs the
        // transport a fixed overhead (several µs under UCX cuda_ipc), so once runs average two
        // pages or more the merged explicit copies beat per-page indices into prepared lists.
        let merge = self.runs.len().saturating_mul(MERGE_RUN_PAGES) <= pairs.len();
        if !merge && let Some(c) = self.lower_prepared(agent, ListKind::Kv, need, &pairs) {
            return c;
        }
        let mut ops: Vec<CopyOp> = Vec::new();
        let l = &self.layout;
        plan_kv(
            &l.kv_ptrs,
            &peer.kv_ptrs,
            &l.kv_item_lens,
            &self.runs,
            &mut ops,
        );
        lower_explicit(&ops, l.kv_mem, l.gpu_id, l.kv_mem, peer.gpu_id.get())
    }

    fn lower_aux(&mut self, agent: &AgentName, peer: &Peer, ours: u32, theirs: u32) -> Work {
        let need = theirs.saturating_add(1);
        if let Some(c) = self.lower_prepared(agent, ListKind::Aux, need, &[(ours, theirs)]) {
            return c;
        }
        let mut ops = Vec::new();
        let l = &self.layout;
        plan_aux(
            &l.aux_ptrs,
            &peer.aux_ptrs,
            &l.aux_item_lens,
            ours,
            theirs,
            &mut ops,
        );
        lower_explicit(&ops, MemType::Dram, 0, MemType::Dram, 0)
    }

    fn lower_prepared(
        &mut self,
        agent: &AgentName,
        kind: ListKind,
        need: u32,
        pairs: &[(u32, u32)],
    ) -> Option<Work> {
        let (local_ready, local_count) = match kind {
            ListKind::Kv => (self.local_kv, self.layout.kv_pages),
            ListKind::Aux => (self.local_aux, self.layout.aux_slots),
            ListKind::Tokens => return None,
        };
        let state = self.peers.get_mut(agent)?;
        let track = match kind {
            ListKind::Kv => &state.kv,
            ListKind::Aux => &state.aux,
            ListKind::Tokens => &state.tokens,
        };
        let covering = track.covering(need);
        if covering.is_none() {
            peers::prepare_peer_list(&self.layout, &mut self.commands, agent, state, kind, need);
        }
        let buffers = match kind {
            ListKind::Kv | ListKind::Tokens => self.layout.kv_ptrs.len(),
            ListKind::Aux => aux_buffers(self.layout.aux_ptrs.len(), state.peer.aux_ptrs.len()),
        };
        let (generation, remote_count) = covering?;
        if local_ready != Readiness::Ready {
            return None;
        }
        let (local_idx, remote_idx) = lower_indexed(buffers, local_count, remote_count, pairs)?;
        Some(Work::Indexed {
            local: ListId::Local(kind),
            remote: ListId::Peer {
                agent: agent.clone(),
                kind,
                generation,
            },
            local_idx,
            remote_idx,
        })
    }

    /// One posted transfer of `room` completed (`Ok`) or failed.
    pub fn transfer_done(&mut self, room: RoomId, outcome: Result<(), FailureReason>) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        r.in_flight = r.in_flight.saturating_sub(1);
        match outcome {
            Err(reason) => {
                self.fail(room, reason);
            }
            Ok(()) => self.settle(room),
        }
    }

    /// The sender's poll: Failed, Bootstrapping, WaitingForInput (also while transfers run, as
    /// SGLang reports), or Success once the last chunk's transfers all completed.
    pub fn sender_poll(&self, room: RoomId) -> KvPoll {
        let Some(r) = self.rooms.get(&room) else {
            return KvPoll::Failed;
        };
        if r.failure.is_some() || r.status == KvPoll::Failed {
            return KvPoll::Failed;
        }
        let staged_done = r
            .staged
            .iter()
            .all(|s| s.sched.all_posted() && s.aux.is_none());
        match &r.sender {
            Some(s) if s.finished_sending => {
                if r.in_flight == 0 && staged_done {
                    KvPoll::Success
                } else {
                    KvPoll::WaitingForInput
                }
            }
            _ => r.status,
        }
    }

    /// The failure reason of `room`, if it failed.
    pub fn failure(&self, room: RoomId) -> Option<&FailureReason> {
        self.rooms.get(&room).and_then(|r| r.failure.as_ref())
    }

    /// Fails `room` (the scheduler aborted it); the decodes are told.
    pub fn abort(&mut self, room: RoomId, reason: FailureReason) {
        self.fail(room, reason);
    }

    /// Fails `room` with `reason` (the first reason stays) and queues the failure push to its
    /// decodes once. Returns the reason.
    fn fail(&mut self, room: RoomId, reason: FailureReason) -> FailureReason {
        let Some(r) = self.rooms.get_mut(&room) else {
            return reason;
        };
        let first = r.failure.get_or_insert_with(|| reason.clone()).clone();
        r.merge(KvPoll::Failed);
        if !r.pushed {
            r.pushed = true;
            let agents = self.fail_targets(room, &first);
            if !agents.is_empty() {
                let payload = Notification::fail(room, &first.to_string()).encode();
                self.commands.push_back(Command::Notify { agents, payload });
            }
        }
        self.settle(room);
        reason
    }

    /// The sender is gone: forget the room. What it still owes its 0.5.2x decodes (a failure
    /// or an acknowledgement waiting for WRITEs to settle) goes now: nobody reaps those WRITEs
    /// any more, and a decode must not wait for a message that would never come.
    pub fn release(&mut self, room: RoomId) {
        if let Some(mut r) = self.rooms.remove(&room) {
            for (endpoint, frames) in r.owed.drain(..) {
                self.commands
                    .push_back(Command::SendStatus { endpoint, frames });
            }
        }
    }

    /// Drops rooms without a sender that saw nothing for the orphan timeout (a decode gave up,
    /// or sent infos for a request this prefill never got). Returns how many.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        let stalled: Vec<RoomId> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.failure.is_none())
            .filter(|(_, r)| {
                r.staged.iter().any(|s| {
                    s.sched.waiting() > 0
                        && now.saturating_duration_since(s.progress) >= STAGED_STALL_TIMEOUT
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for room in stalled {
            let why = format!("no staging slot freed within {STAGED_STALL_TIMEOUT:?}");
            self.fail(room, FailureReason::Staging(why));
        }
        let before = self.rooms.len();
        let timeout = self.orphan_timeout;
        self.rooms.retain(|_, r| {
            r.sender.is_some() || now.saturating_duration_since(r.touched) < timeout
        });
        let idle = self.peer_idle_timeout;
        let rooms = &self.rooms;
        let gone: Vec<AgentName> = self
            .peers
            .iter()
            .filter(|(a, p)| {
                now.saturating_duration_since(p.last_seen) >= idle
                    && !rooms
                        .values()
                        .any(|r| r.infos.iter().any(|i| &i.agent == *a))
            })
            .map(|(a, _)| a.clone())
            .collect();
        for a in gone {
            tracing::info!(agent = %a, "idle decode agent forgotten");
            self.remove_peer(&a);
        }
        self.set_timers(now);
        before - self.rooms.len()
    }

    /// When [`PrefillCore::handle_timeout`] has work next: the earliest orphan expiry, idle
    /// decode, or staged stall (`None`: nothing pending). The driver sleeps until then, or
    /// less, and never needs to guess a tick.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Sets every timer exactly, after `handle_timeout` at `now` did its work.
    fn set_timers(&mut self, now: Instant) {
        let orphan = self
            .rooms
            .values()
            .filter(|r| r.sender.is_none())
            .map(|r| r.touched + self.orphan_timeout)
            .min();
        let stall = self
            .rooms
            .values()
            .filter(|r| r.failure.is_none())
            .flat_map(|r| &r.staged)
            .filter(|s| s.sched.waiting() > 0)
            .map(|s| s.progress + STAGED_STALL_TIMEOUT)
            .min();
        // A decode that rooms still refer to cannot go yet: look again in a while.
        let recheck = now
            + self
                .peer_idle_timeout
                .clamp(Duration::from_secs(1), PEER_RECHECK);
        let idle = self
            .peers
            .iter()
            .map(|(a, p)| {
                let at = p.last_seen + self.peer_idle_timeout;
                let referred = self
                    .rooms
                    .values()
                    .any(|r| r.infos.iter().any(|i| &i.agent == a));
                if referred { at.max(recheck) } else { at }
            })
            .min();
        self.timers.set(Timer::Orphan, orphan);
        self.timers.set(Timer::StagedStall, stall);
        self.timers.set(Timer::PeerIdle, idle);
    }

    /// Rooms whose decode infos are complete but that no sender claims yet, and that have pages
    /// to send. A server that learns of requests only from its decodes (like `nixl-pd`) creates
    /// senders for these. A room of dummy infos only is never offered (a sender for it would
    /// wait for pages forever); it expires as an orphan.
    pub fn unclaimed(&self) -> Vec<UnclaimedRoom> {
        self.rooms
            .iter()
            .filter(|(_, r)| {
                r.sender.is_none() && r.status == KvPoll::WaitingForInput && r.failure.is_none()
            })
            .filter(|(_, r)| {
                // A sender for a room naming an unknown decode could only fail.
                r.infos
                    .iter()
                    .filter(|i| !i.is_dummy())
                    .all(|i| self.peers.contains_key(&i.agent))
            })
            .filter_map(|(room, r)| {
                let pages = r.infos.iter().find(|i| !i.is_dummy())?.dst_pages.len();
                Some(UnclaimedRoom {
                    room: *room,
                    pages: u32::try_from(pages).ok()?,
                })
            })
            .collect()
    }

    /// Whether [`PrefillCore::unclaimed`] would name a room.
    pub fn has_unclaimed(&self) -> bool {
        !self.unclaimed().is_empty()
    }

    /// Rooms held (for leak checks).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Registered decode agents.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// A registered decode agent's buffers.
    pub fn peer(&self, agent: &AgentName) -> Option<Arc<Peer>> {
        self.peers.get(agent).map(|p| Arc::clone(&p.peer))
    }
}

mod dialect;
mod direct;
mod origin;
mod peer_table;
mod peers;
mod room;
mod sliced;
mod staged;
pub use origin::Proofs;
use peer_table::PeerTable;
use room::{Room, Sender};
use staged::PrefillStaging;
pub use staged::{STAGED_STALL_TIMEOUT, StagedPack, StagedWrite};
mod tokens;
