//! The prefill side: rooms, decode peers, the status rule and chunked sends.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_wire::{
    AgentName, DecodeTpInfo, GpuId, KvArgsRegister, Notification, PrefillInbound, RoomId,
    TransferInfo,
};

use super::plan::{CopyOp, Run, group_runs, plan_aux, plan_kv};
use super::{KvPoll, Layout};

/// A registered decode agent.
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
}

/// Something the driver must do for the core.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Load a new decode agent's NIXL metadata; report the outcome with
    /// [`PrefillCore::remote_loaded`].
    LoadRemote {
        /// The agent.
        agent: AgentName,
        /// Its metadata.
        metadata: bytes::Bytes,
    },
}

/// One WRITE to post: copies to one decode agent, with the notification NIXL delivers after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    /// The decode agent.
    pub peer: AgentName,
    /// Source device (our GPU id) and destination device (theirs).
    pub src_dev: u32,
    /// Destination device.
    pub dst_dev: u32,
    /// The copies.
    pub ops: Vec<CopyOp>,
    /// Whether these are aux (host) copies rather than KV copies.
    pub aux: bool,
    /// The notification payload.
    pub notif: Vec<u8>,
    /// For KV transfers: the chunk's (prefill page, decode page) pairs, for callers that make
    /// requests from prepared per-page descriptor lists. For aux: (our slot, their slot).
    pub pages: Vec<(u32, u32)>,
}

#[derive(Debug)]
struct Sender {
    num_pages: u32,
    aux_index: u32,
    sent: u32,
    chunk: u32,
    finished_sending: bool,
}

#[derive(Debug)]
struct Room {
    status: KvPoll,
    infos: Vec<TransferInfo>,
    sender: Option<Sender>,
    failure: Option<String>,
    in_flight: usize,
    touched: Instant,
}

impl Room {
    fn new(status: KvPoll, now: Instant) -> Self {
        Self {
            status,
            infos: Vec::new(),
            sender: None,
            failure: None,
            in_flight: 0,
            touched: now,
        }
    }

    /// SGLang's max-merge rule; but Failed always wins (ours, as Mooncake does).
    fn merge(&mut self, s: KvPoll) {
        if s == KvPoll::Failed {
            self.status = KvPoll::Failed;
        } else if self.status != KvPoll::Failed {
            self.status = self.status.max(s);
        }
    }
}

/// Why a send was refused. The room is failed with the same reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("room {room}: {reason}")]
pub struct SendError {
    /// The room.
    pub room: RoomId,
    /// Why.
    pub reason: String,
}

/// The prefill side of one engine rank.
#[derive(Debug)]
pub struct PrefillCore {
    layout: std::sync::Arc<Layout>,
    peers: HashMap<AgentName, std::sync::Arc<Peer>>,
    pending_peers: HashMap<AgentName, Peer>,
    rooms: HashMap<RoomId, Room>,
    orphan_timeout: Duration,
    runs: Vec<Run>,
    src_idx: Vec<u32>,
    dst_idx: Vec<u32>,
}

impl PrefillCore {
    /// A core for `layout`. Rooms that no sender claims and that see no message for
    /// `orphan_timeout` are dropped by [`PrefillCore::handle_timeout`].
    pub fn new(layout: Layout, orphan_timeout: Duration) -> Self {
        Self {
            layout: std::sync::Arc::new(layout),
            peers: HashMap::new(),
            pending_peers: HashMap::new(),
            rooms: HashMap::new(),
            orphan_timeout,
            runs: Vec::new(),
            src_idx: Vec::new(),
            dst_idx: Vec::new(),
        }
    }

    /// Our layout (shared, immutable).
    pub fn layout(&self) -> std::sync::Arc<Layout> {
        std::sync::Arc::clone(&self.layout)
    }

    /// Handles a decoded message from a decode. Returns what the driver must do.
    pub fn handle_inbound(&mut self, msg: PrefillInbound, now: Instant) -> Option<Command> {
        match msg {
            PrefillInbound::Register(r) => self.handle_register(r),
            PrefillInbound::Transfer(t) => {
                self.handle_transfer_info(t, now);
                None
            }
            other => {
                tracing::warn!(?other, "unexpected prefill-bound message; dropped");
                None
            }
        }
    }

    fn handle_register(&mut self, r: KvArgsRegister) -> Option<Command> {
        if self.peers.contains_key(&r.agent) || self.pending_peers.contains_key(&r.agent) {
            tracing::debug!(agent = %r.agent, "decode agent already registered");
            return None;
        }
        let peer = Peer {
            kv_ptrs: r.kv_ptrs,
            aux_ptrs: r.aux_ptrs,
            gpu_id: r.gpu_id,
            tp_info: r.tp_info,
        };
        self.pending_peers.insert(r.agent.clone(), peer);
        Some(Command::LoadRemote {
            agent: r.agent,
            metadata: r.metadata,
        })
    }

    /// The outcome of a [`Command::LoadRemote`].
    pub fn remote_loaded(&mut self, agent: &AgentName, ok: bool) {
        if let Some(peer) = self.pending_peers.remove(agent)
            && ok
        {
            self.peers.insert(agent.clone(), std::sync::Arc::new(peer));
        }
    }

    /// Forgets a decode agent (its rooms with infos from it fail when they send).
    pub fn remove_peer(&mut self, agent: &AgentName) {
        self.peers.remove(agent);
        self.pending_peers.remove(agent);
    }

    /// Whether `agent` is registered.
    pub fn has_peer(&self, agent: &AgentName) -> bool {
        self.peers.contains_key(agent)
    }

    fn handle_transfer_info(&mut self, t: TransferInfo, now: Instant) {
        let required = t.required_dst_info_num as usize;
        let room = self
            .rooms
            .entry(t.room)
            .or_insert_with(|| Room::new(KvPoll::Bootstrapping, now));
        room.touched = now;
        match room.infos.iter_mut().find(|i| i.agent == t.agent) {
            Some(existing) => *existing = t,
            None => room.infos.push(t),
        }
        if room.infos.len() == required {
            room.merge(KvPoll::WaitingForInput);
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
    ) -> Result<(), SendError> {
        if aux_index >= self.layout.aux_slots {
            return Err(self.fail(
                room,
                format!(
                    "aux index {aux_index} outside {} slots",
                    self.layout.aux_slots
                ),
            ));
        }
        let Some(s) = self.rooms.get_mut(&room).and_then(|r| r.sender.as_mut()) else {
            return Err(SendError {
                room,
                reason: "no sender for this room".into(),
            });
        };
        s.num_pages = num_pages;
        s.aux_index = aux_index;
        Ok(())
    }

    /// Plans one chunk: the next `pages.len()` pages of the request. Returns one KV transfer per
    /// non-dummy decode (plus its aux transfer after the last chunk). Any problem fails the room.
    pub fn sender_send(
        &mut self,
        room: RoomId,
        pages: &[u32],
        now: Instant,
    ) -> Result<Vec<Transfer>, SendError> {
        let kv_pages = self.layout.kv_pages;
        if let Some(bad) = pages.iter().find(|&&p| p >= kv_pages) {
            return Err(self.fail(
                room,
                format!("page index {bad} outside the pool of {kv_pages} pages"),
            ));
        }
        let Some(r) = self.rooms.get_mut(&room) else {
            return Err(SendError {
                room,
                reason: "no sender for this room".into(),
            });
        };
        r.touched = now;
        if let Some(reason) = &r.failure {
            return Err(SendError {
                room,
                reason: reason.clone(),
            });
        }
        if r.status < KvPoll::WaitingForInput {
            let reason = "send before the decode side's transfer info arrived".to_owned();
            return Err(self.fail(room, reason));
        }
        let Some(s) = r.sender.as_mut() else {
            return Err(SendError {
                room,
                reason: "no sender for this room".into(),
            });
        };
        let n = pages.len() as u32;
        if s.finished_sending || s.sent + n > s.num_pages || n == 0 {
            let reason = format!(
                "chunk of {n} pages after {} of {} sent",
                s.sent, s.num_pages
            );
            return Err(self.fail(room, reason));
        }
        let (start, chunk) = (s.sent as usize, s.chunk);
        s.sent += n;
        s.chunk += 1;
        let last = s.sent == s.num_pages;
        s.finished_sending = last;
        let aux_index = s.aux_index;
        let infos: Vec<TransferInfo> = r.infos.clone();

        let mut out = Vec::new();
        for info in infos.iter().filter(|i| !i.is_dummy()) {
            let Some(peer) = self.peers.get(&info.agent) else {
                return Err(self.fail(
                    room,
                    format!("decode agent {} is not registered", info.agent),
                ));
            };
            let Some(dst) = info.dst_pages.get(start..start + pages.len()) else {
                let reason = format!(
                    "decode {} sent {} pages, need {}",
                    info.agent,
                    info.dst_pages.len(),
                    start + pages.len()
                );
                return Err(self.fail(room, reason));
            };
            if peer.kv_ptrs.len() != self.layout.kv_ptrs.len() {
                let reason = format!(
                    "decode has {} KV buffers, prefill {}",
                    peer.kv_ptrs.len(),
                    self.layout.kv_ptrs.len()
                );
                return Err(self.fail(room, reason));
            }
            self.src_idx.clear();
            self.src_idx.extend_from_slice(pages);
            self.dst_idx.clear();
            self.dst_idx.extend(dst.iter().map(|p| p.get()));
            group_runs(&self.src_idx, &self.dst_idx, &mut self.runs);
            let mut ops = Vec::new();
            plan_kv(
                &self.layout.kv_ptrs,
                &peer.kv_ptrs,
                &self.layout.kv_item_lens,
                &self.runs,
                &mut ops,
            );
            let notif = Notification::Kv {
                room,
                chunk: chunk.into(),
                last,
                pp: None,
            }
            .encode();
            let pages = self
                .src_idx
                .iter()
                .copied()
                .zip(self.dst_idx.iter().copied())
                .collect();
            out.push(Transfer {
                peer: info.agent.clone(),
                src_dev: self.layout.gpu_id,
                dst_dev: peer.gpu_id.get(),
                ops,
                aux: false,
                notif,
                pages,
            });
            if last {
                let mut ops = Vec::new();
                plan_aux(
                    &self.layout.aux_ptrs,
                    &peer.aux_ptrs,
                    &self.layout.aux_item_lens,
                    aux_index,
                    info.dst_aux_index,
                    &mut ops,
                );
                out.push(Transfer {
                    peer: info.agent.clone(),
                    src_dev: 0,
                    dst_dev: 0,
                    ops,
                    aux: true,
                    notif: Notification::Aux { room }.encode(),
                    pages: vec![(aux_index, info.dst_aux_index)],
                });
            }
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            // The infos stay until release: a later failure is pushed to those agents.
            r.in_flight += out.len();
        }
        Ok(out)
    }

    /// One transfer of `room` completed (`ok`) or failed.
    pub fn transfer_done(&mut self, room: RoomId, ok: Result<(), String>) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        r.in_flight = r.in_flight.saturating_sub(1);
        if let Err(reason) = ok {
            r.failure.get_or_insert(reason);
            r.merge(KvPoll::Failed);
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
        match &r.sender {
            Some(s) if s.finished_sending => {
                if r.in_flight == 0 {
                    KvPoll::Success
                } else {
                    KvPoll::WaitingForInput
                }
            }
            _ => r.status,
        }
    }

    /// The failure reason of `room`, if it failed.
    pub fn failure(&self, room: RoomId) -> Option<&str> {
        self.rooms.get(&room).and_then(|r| r.failure.as_deref())
    }

    /// Fails `room` with `reason`; returns the decode agents to tell (failure push).
    pub fn abort(&mut self, room: RoomId, reason: &str) -> Vec<AgentName> {
        let Some(r) = self.rooms.get_mut(&room) else {
            return Vec::new();
        };
        r.failure.get_or_insert_with(|| reason.to_owned());
        r.merge(KvPoll::Failed);
        r.infos
            .iter()
            .filter(|i| !i.is_dummy())
            .map(|i| i.agent.clone())
            .collect()
    }

    fn fail(&mut self, room: RoomId, reason: String) -> SendError {
        if let Some(r) = self.rooms.get_mut(&room) {
            r.failure.get_or_insert_with(|| reason.clone());
            r.merge(KvPoll::Failed);
        }
        SendError { room, reason }
    }

    /// The sender is gone: forget the room.
    pub fn release(&mut self, room: RoomId) {
        self.rooms.remove(&room);
    }

    /// Drops rooms without a sender that saw nothing for the orphan timeout (a decode gave up,
    /// or sent infos for a request this prefill never got). Returns how many.
    pub fn handle_timeout(&mut self, now: Instant) -> usize {
        let before = self.rooms.len();
        let timeout = self.orphan_timeout;
        self.rooms.retain(|_, r| {
            r.sender.is_some() || now.saturating_duration_since(r.touched) < timeout
        });
        before - self.rooms.len()
    }

    /// Rooms whose decode infos are complete but that no sender claims yet, with the number of
    /// pages the (first real) decode asked for. A server that learns of requests only from its
    /// decodes (like the `pd` example) creates senders for these.
    pub fn unclaimed(&self) -> Vec<(RoomId, u32)> {
        self.rooms
            .iter()
            .filter(|(_, r)| {
                r.sender.is_none() && r.status == KvPoll::WaitingForInput && r.failure.is_none()
            })
            .map(|(room, r)| {
                let pages = r
                    .infos
                    .iter()
                    .find(|i| !i.is_dummy())
                    .map_or(0, |i| i.dst_pages.len() as u32);
                (*room, pages)
            })
            .collect()
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
    pub fn peer(&self, agent: &AgentName) -> Option<std::sync::Arc<Peer>> {
        self.peers.get(agent).cloned()
    }
}
