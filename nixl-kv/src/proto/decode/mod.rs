//! The decode side: bootstrap lookups and their caches, registrations and transfer infos to
//! send, per-room completion from NIXL notifications, failures, timeouts and heartbeats.
//!
//! The driver performs the HTTP lookups the core asks for ([`DecodeCore::next_lookup`]), sends
//! the frames it queues ([`DecodeCore::poll_command`]) and reports heartbeat outcomes; every
//! decision (what to cache, when to forget it, when a room fails) is made here.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nixl_wire::ext::{self, IpcPools, ProofNotice, Ring, StagedNotice, StagedSlice};
use nixl_wire::http::{ParallelInfo, RankInfo};
use nixl_wire::{
    AgentName, DecodeTpInfo, GpuId, KvArgsRegister, Notification, PageIndex, RoomId, TransferInfo,
};

use super::staging::{QUARANTINE, Scattered, SlotRing};
use super::targeting::{TargetingError, Targets, dp_group, targets_sliced};
use super::{BootstrapAddr, FailureReason, KvPoll};

mod dialect;

/// An active decode sends its registration again before a transfer info when the last one to
/// that prefill rank is older than this, so a prefill that forgot it as idle (or restarted on
/// the same endpoint) knows it again before its next request. SGLang prefills ignore repeats.
pub const REREGISTER_INTERVAL: Duration = Duration::from_secs(60);

/// Parallel sizes a bootstrap server may announce; larger ones are refused before anything is
/// sized by them.
pub const MAX_PARALLEL_SIZE: u32 = 1 << 16;

/// This decode rank as its core is configured: who it is (what its registration carries), its
/// pools, its staging ring and exported pools, and whether it takes head slices.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodeConfig {
    /// The IP advertised in every message.
    pub local_ip: String,
    /// The port advertised (SGLang never binds it).
    pub rank_port: u16,
    /// Our NIXL agent.
    pub agent: AgentName,
    /// Our NIXL metadata.
    pub metadata: Bytes,
    /// KV buffer addresses.
    pub kv_ptrs: Vec<u64>,
    /// Bytes of one page of the first KV buffer.
    pub kv_item_len: u64,
    /// Aux buffer addresses.
    pub aux_ptrs: Vec<u64>,
    /// Our GPU.
    pub gpu_id: GpuId,
    /// Our rank inside the TP group.
    pub engine_rank: u32,
    /// TP size per DP rank.
    pub tp_per_dp: u32,
    /// Whether the model is MLA.
    pub is_mla: bool,
    /// Pages in our KV pool.
    pub kv_pages: u32,
    /// Rows in our aux buffers.
    pub aux_slots: u32,
    /// Our GPU staging ring, if the staged path is on (ours; `None`: SGLang's path only).
    pub staging: Option<DecodeStaging>,
    /// Our KV pools exported for same-node prefills (the direct path; ours only).
    pub direct: Option<IpcPools>,
    /// Ask a smaller prefill for head slices when the model is not MLA (its prefills must
    /// support them); off: such pairs fail, as in SGLang 0.5.1.
    pub sliced_tp: bool,
    /// The wire format this decode speaks (docs/protocol.md §10). From 0.5.20 on,
    /// `rank_port` is the port of our bound PULL listener.
    pub profile: nixl_wire::Profile,
    /// Where our KV buffers live, as 0.5.2x registrations name it.
    pub kv_mem: nixl_wire::v2x::MemKind,
    /// Tokens per page and the KV dtype name: a 0.5.2x prefill announcing others is refused.
    pub sglang_pages: Option<(u32, String)>,
}

/// A decode's staging ring (docs/protocol.md §3.5): announced in its registrations, and up to
/// `per_room` slots of it granted to each real target (writer) of a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodeStaging {
    /// The ring, registered with our agent before our metadata was taken.
    pub ring: Ring,
    /// Slots granted to one writer of a room at most (at least 1).
    pub per_room: u32,
}

impl DecodeStaging {
    /// A ring, granting up to `per_room` slots to each writer of a room (0 is taken as 1).
    pub fn new(ring: Ring, per_room: u32) -> Self {
        Self {
            ring,
            per_room: per_room.max(1),
        }
    }
}

/// Timeouts and heartbeat settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodeTimers {
    /// How long a started receiver waits for its data (`None`: forever).
    pub waiting_timeout: Option<Duration>,
    /// Time between heartbeat rounds.
    pub heartbeat_interval: Duration,
    /// Consecutive failed heartbeats before a prefill is declared dead.
    pub heartbeat_max_failures: u32,
}

impl DecodeTimers {
    /// Settings from their parts.
    pub fn new(
        waiting_timeout: Option<Duration>,
        heartbeat_interval: Duration,
        heartbeat_max_failures: u32,
    ) -> Self {
        Self {
            waiting_timeout,
            heartbeat_interval,
            heartbeat_max_failures: heartbeat_max_failures.max(1),
        }
    }
}

/// A prefill rank's connection-pool key: SGLang's `{addr}_{dp group}_{rank}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The bootstrap server.
    pub bootstrap: BootstrapAddr,
    /// The prefill DP group.
    pub dp_group: u32,
    /// The real target's TP rank.
    pub rank: u32,
}

/// What the driver must look up before a receiver can send.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// The prefill's parallel sizes: report with [`DecodeCore::parallel_learned`].
    Parallel(BootstrapAddr),
    /// The endpoints of these prefill ranks of `key.dp_group`: report with
    /// [`DecodeCore::ranks_learned`].
    Ranks {
        /// The pool key.
        key: PoolKey,
        /// The ranks, in order.
        ranks: Vec<u32>,
    },
    /// Nothing: the receiver knows its targets.
    Ready,
    /// Nothing: the room failed (or is gone).
    Failed,
}

/// A heartbeat's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Heartbeat {
    /// `/health` answered.
    Up,
    /// The server has no `/health` (a seed SGLang server): stop checking it.
    NoRoute,
    /// No answer, or an error.
    Down(String),
}

/// Something the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// A multipart ZeroMQ message to a prefill rank; report a failure with
    /// [`DecodeCore::send_failed`].
    Send {
        /// The room it is for (registrations are for the room that triggered them).
        room: RoomId,
        /// `tcp://host:port`.
        endpoint: String,
        /// The frames.
        frames: Vec<Bytes>,
    },
    /// Scatter the staged piece in ring `slot` into `pages` of our KV pool, on our stream;
    /// report its end with [`DecodeCore::scatter_done`].
    Scatter {
        /// The room.
        room: RoomId,
        /// The ring slot.
        slot: u32,
        /// Our pages the piece covers, in order.
        pages: Vec<u32>,
        /// Head slices of one of several prefill ranks: the slot holds that rank's pages, of
        /// which this slice of every token goes into our token slots (`None`: our own pages).
        slice: Option<StagedSlice>,
    },
}

/// A staged piece whose scatter runs.
#[derive(Debug, Clone)]
struct Scattering {
    slot: u32,
    chunk: u32,
    last: bool,
    /// The agent that wrote it.
    writer: String,
}

/// `tcp://host:port` of a prefill rank (IPv6 hosts bracketed).
fn endpoint_of(info: &RankInfo) -> String {
    super::tcp_endpoint(&info.rank_ip, info.rank_port)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    endpoint: String,
    dummy: bool,
}

#[derive(Debug)]
struct Room {
    bootstrap: BootstrapAddr,
    dp_rank: Option<u32>,
    targets: Vec<Target>,
    required: u32,
    started: bool,
    /// Chunks, last chunk and aux row seen, from any writer.
    progress: Progress,
    concluded: Option<KvPoll>,
    failure: Option<FailureReason>,
    since: Instant,
    /// The room's pages, kept when it was granted staging slots.
    pages: Vec<u32>,
    /// Its staged pieces being scattered.
    scattering: Vec<Scattering>,
    /// Its granted ring slots and the target (index into `targets`) each was granted to.
    slot_targets: Vec<(u32, usize)>,
    /// Prefill ranks that write the room: more than one when a larger prefill slices heads
    /// for us (docs/protocol.md §5.6); each must then complete on its own.
    writers: u32,
    /// With several writers, what each (by agent name) has sent.
    per_writer: Vec<(String, Progress)>,
    /// Prefill ranks that sent `KV_STATUS` 4 (0.5.23).
    succeeded: Vec<u32>,
    /// `ABORT` went to its prefill ranks.
    aborted: bool,
    /// The profile its prefill speaks: ours as configured until its bootstrap server answers.
    profile: nixl_wire::Profile,
}

/// One writer's chunks, last chunk and aux row.
#[derive(Debug, Default)]
struct Progress {
    chunks: Vec<u32>,
    expected: Option<u32>,
    aux: bool,
    /// Parts of chunks that come in parts (0.5.20–0.5.22): chunk, parts in all, parts seen.
    parts: Vec<(u32, u32, Vec<u32>)>,
}

/// Parts one chunk may come in at most.
const MAX_PARTS: u32 = 64;

impl Progress {
    /// A KV, aux or part notification (anything else changes nothing).
    fn note(&mut self, n: &Notification) {
        match n {
            Notification::Kv { chunk, last, .. } => self.chunk(chunk.get(), *last),
            Notification::Aux { .. } => self.aux = true,
            // The last chunk had no pages: `chunks` KV chunks came before it (0.5.20–0.5.22).
            Notification::AuxNoKv { chunks, .. } => {
                self.aux = true;
                self.expected = Some(*chunks);
            }
            Notification::KvPart {
                chunk,
                last,
                part,
                parts,
                ..
            } => self.part(chunk.get(), *last, *part, *parts),
            _ => {}
        }
    }

    /// Part `part` of `parts` of `chunk`: the chunk counts once every part arrived.
    fn part(&mut self, chunk: u32, last: bool, part: u32, parts: u32) {
        if parts <= 1 {
            return self.chunk(chunk, last);
        }
        if parts > MAX_PARTS || part >= parts {
            tracing::debug!(chunk, part, parts, "implausible chunk part; dropped");
            return;
        }
        let entry = match self.parts.iter().position(|(c, _, _)| *c == chunk) {
            Some(i) => &mut self.parts[i],
            None => {
                self.parts.push((chunk, parts, Vec::new()));
                let n = self.parts.len() - 1;
                &mut self.parts[n]
            }
        };
        if entry.1 != parts {
            tracing::debug!(chunk, "chunk parts announced differently; dropped");
            return;
        }
        if !entry.2.contains(&part) {
            entry.2.push(part);
        }
        if entry.2.len() as u32 == parts {
            self.chunk(chunk, last);
        }
    }

    /// Chunk `chunk` arrived (a staged piece counts once scattered); `last` marks the last.
    fn chunk(&mut self, chunk: u32, last: bool) {
        if !self.chunks.contains(&chunk) {
            self.chunks.push(chunk);
        }
        if last {
            self.expected = Some(chunk.saturating_add(1));
        }
    }

    fn complete(&self) -> bool {
        self.aux && self.expected.is_some_and(|e| self.chunks.len() as u32 == e)
    }
}

/// The decode side of one engine rank.
#[derive(Debug)]
pub struct DecodeCore {
    me: DecodeConfig,
    timers: DecodeTimers,
    rooms: HashMap<RoomId, Room>,
    /// The prefills this decode reaches: sizes, pool entries, registrations, proofs, heartbeats.
    directory: PrefillDirectory,
    /// Cached pool entries to look up again (a heartbeat found their prefill up), with the
    /// ranks to ask: see [`DecodeCore::take_pool_checks`].
    pool_checks: Vec<(PoolKey, Vec<u32>)>,
    commands: VecDeque<Command>,
    /// Our staging ring's slots (`None`: the staged path is off).
    ring: Option<SlotRing>,
    /// The last `ABORT` generation armed (0.5.23 numbers them per manager from 1).
    abort_generation: u64,
    /// Bounds the warnings a peer can cause on our listener.
    peer_logs: crate::proto::log_budget::LogBudget,
}

impl DecodeCore {
    /// A core for this decode rank; the first heartbeat round is due one interval after `now`.
    pub fn new(me: DecodeConfig, timers: DecodeTimers, now: Instant) -> Self {
        Self {
            timers,
            rooms: HashMap::new(),
            directory: PrefillDirectory::new(now),
            pool_checks: Vec::new(),
            commands: VecDeque::new(),
            ring: me
                .staging
                .map(|st| SlotRing::new(st.ring.slots, QUARANTINE)),
            abort_generation: 0,
            peer_logs: crate::proto::log_budget::LogBudget::new(20),
            me,
        }
    }

    /// The prefill ranks this decode rank asks, given the prefill's TP size per DP rank.
    fn targets(&self, remote: u32) -> Result<Targets, TargetingError> {
        targets_sliced(
            self.me.tp_per_dp,
            remote,
            self.me.engine_rank,
            self.me.is_mla,
            self.me.sliced_tp,
        )
    }

    /// The next command for the driver, in order.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Moves every queued command to `out`, in order.
    pub fn drain_commands(&mut self, out: &mut Vec<Command>) {
        out.extend(self.commands.drain(..));
    }

    /// A receiver for `room` whose prefill is reached through `bootstrap`.
    pub fn receiver_new(
        &mut self,
        room: RoomId,
        bootstrap: BootstrapAddr,
        dp_rank: Option<u32>,
        now: Instant,
    ) {
        let profile = self
            .directory
            .profile(&bootstrap)
            .unwrap_or(self.me.profile);
        self.rooms.insert(
            room,
            Room {
                bootstrap,
                dp_rank,
                targets: Vec::new(),
                required: 1,
                started: false,
                progress: Progress::default(),
                concluded: None,
                failure: None,
                since: now,
                pages: Vec::new(),
                scattering: Vec::new(),
                slot_targets: Vec::new(),
                writers: 1,
                per_writer: Vec::new(),
                succeeded: Vec::new(),
                aborted: false,
                profile,
            },
        );
    }

    /// What the receiver of `room` still needs looked up.
    pub fn next_lookup(&mut self, room: RoomId) -> Lookup {
        let Some(r) = self.rooms.get(&room) else {
            return Lookup::Failed;
        };
        if r.concluded.is_some() {
            return Lookup::Failed;
        }
        if !r.targets.is_empty() {
            return Lookup::Ready;
        }
        let Some((ptp, pdp)) = self.directory.parallel(&r.bootstrap) else {
            return Lookup::Parallel(r.bootstrap.clone());
        };
        let (bootstrap, dp_rank) = (r.bootstrap.clone(), r.dp_rank);
        if let Some(profile) = self.directory.profile(&bootstrap)
            && let Some(r) = self.rooms.get_mut(&room)
        {
            r.profile = profile;
        }
        let remote = ptp / pdp.max(1);
        let t = match self.targets(remote) {
            Ok(t) => t,
            Err(e) => {
                self.fail(room, FailureReason::Targeting(e));
                return Lookup::Failed;
            }
        };
        let key = PoolKey {
            bootstrap,
            dp_group: dp_group(room.get(), dp_rank, pdp),
            rank: t.real,
        };
        if let Some(pool) = self.directory.pool(&key).cloned()
            && let Some(r) = self.rooms.get_mut(&room)
        {
            r.targets = pool;
            r.required = t.required_dst_info_num;
            return Lookup::Ready;
        }
        Lookup::Ranks {
            key,
            ranks: t.ranks.iter().map(|&(rank, _)| rank).collect(),
        }
    }

    /// The bootstrap server's parallel sizes for the receiver of `room`, or why there are none
    /// (its answer to SGLang 0.5.1's query: the prefill speaks `sglang-0.5.1`).
    pub fn parallel_learned(&mut self, room: RoomId, info: Result<ParallelInfo, String>) {
        self.sizes_learned(room, info, nixl_wire::Profile::Sglang051);
    }

    /// The prefill's parallel sizes for `room`, from a server that answered in `profile`.
    fn sizes_learned(
        &mut self,
        room: RoomId,
        info: Result<ParallelInfo, String>,
        profile: nixl_wire::Profile,
    ) {
        let Some(bootstrap) = self.rooms.get(&room).map(|r| r.bootstrap.clone()) else {
            return;
        };
        let bad = |reason: String| FailureReason::Bootstrap {
            bootstrap: bootstrap.clone(),
            reason,
        };
        let sizes = match info {
            Err(reason) => Err(bad(reason)),
            Ok(ParallelInfo {
                prefill_tp_size: Some(tp),
                prefill_dp_size: Some(dp),
                ..
            }) => {
                if tp == 0 || dp == 0 || tp > MAX_PARALLEL_SIZE || dp > tp {
                    Err(bad(format!("implausible prefill sizes: TP {tp}, DP {dp}")))
                } else {
                    Ok((tp, dp))
                }
            }
            Ok(_) => Err(FailureReason::NoPrefillRegistered(bootstrap.clone())),
        };
        match sizes {
            Ok(s) => {
                self.directory.learn_parallel(bootstrap, s, profile);
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.profile = profile;
                }
            }
            Err(reason) => self.fail(room, reason),
        }
    }

    /// The endpoints of `key`'s ranks (in the order [`Lookup::Ranks`] named them), or why they
    /// could not be had. The registration goes to every one (dummies included) ahead of the
    /// first transfer info.
    pub fn ranks_learned(
        &mut self,
        room: RoomId,
        key: PoolKey,
        ranks: Result<Vec<RankInfo>, String>,
    ) {
        let infos = match ranks {
            Ok(i) => i,
            Err(reason) => {
                let bootstrap = key.bootstrap.clone();
                self.fail(room, FailureReason::Bootstrap { bootstrap, reason });
                return;
            }
        };
        let Some((ptp, pdp)) = self.directory.parallel(&key.bootstrap) else {
            return;
        };
        let t = match self.targets(ptp / pdp.max(1)) {
            Ok(t) if t.ranks.len() == infos.len() => t,
            Ok(_) => {
                let reason = "rank lookups do not match the targets".to_owned();
                let bootstrap = key.bootstrap.clone();
                self.fail(room, FailureReason::Bootstrap { bootstrap, reason });
                return;
            }
            Err(e) => {
                self.fail(room, FailureReason::Targeting(e));
                return;
            }
        };
        let pool: Vec<Target> = infos
            .iter()
            .zip(&t.ranks)
            .map(|(info, &(_, dummy))| Target {
                endpoint: endpoint_of(info),
                dummy,
            })
            .collect();
        if let Some(r) = self.rooms.get_mut(&room) {
            r.targets = pool.clone();
            r.required = t.required_dst_info_num;
        }
        // New endpoints get the registration with the next transfer info.
        self.directory.store_pool(key, pool);
    }

    fn registration(&self, profile: nixl_wire::Profile) -> Vec<Bytes> {
        let me = &self.me;
        if profile.decode_listens() {
            return self.registration_v2x(profile, self.ext_frames());
        }
        KvArgsRegister {
            local_ip: me.local_ip.clone(),
            rank_port: me.rank_port,
            agent: me.agent.clone(),
            metadata: me.metadata.clone(),
            kv_ptrs: me.kv_ptrs.clone(),
            aux_ptrs: me.aux_ptrs.clone(),
            gpu_id: me.gpu_id,
            tp_info: Some(DecodeTpInfo {
                decode_tp_size: me.tp_per_dp,
                decode_tp_rank: me.engine_rank,
                dst_kv_item_len: me.kv_item_len,
            }),
            trailing: self.ext_frames(),
        }
        .encode()
    }

    /// Our extension frames after a registration: SGLang prefills ignore them; ours then prove
    /// their transfer infos' origin, and stage into our ring if we have one.
    fn ext_frames(&self) -> Vec<Bytes> {
        let me = &self.me;
        let mut caps = vec![ext::CAP_PROOF];
        let mut frames = Vec::new();
        if let Some(st) = me.staging {
            caps.push(ext::CAP_STAGING);
            frames.push(st.ring.frame());
        }
        if let Some(ipc) = &me.direct {
            caps.push(ext::CAP_DIRECT);
            frames.push(ipc.frame());
        }
        frames.insert(0, ext::caps_frame(&caps));
        frames
    }

    /// The receiver asks for the request: destination `pages` of our pool, aux row `aux_index`.
    /// Queues one transfer info per target, each preceded by our registration when that target
    /// has none younger than [`REREGISTER_INTERVAL`]; the waiting timeout starts now.
    pub fn receiver_init(&mut self, room: RoomId, pages: &[u32], aux_index: u32, now: Instant) {
        let (kv_pages, slots) = (self.me.kv_pages, self.me.aux_slots);
        let bad = pages
            .iter()
            .find(|&&p| p >= kv_pages || p > i32::MAX as u32);
        let refusal = if let Some(&page) = bad {
            Some(FailureReason::PageOutsidePool {
                page,
                pages: kv_pages,
            })
        } else if aux_index >= slots {
            Some(FailureReason::AuxOutsideSlots {
                index: aux_index,
                slots,
            })
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.fail(room, reason);
            return;
        }
        let Some(r) = self.rooms.get(&room) else {
            return;
        };
        if r.concluded.is_some() {
            return;
        }
        let due: Vec<String> = r
            .targets
            .iter()
            .filter(|t| self.directory.registration_due(&t.endpoint, now))
            .map(|t| t.endpoint.clone())
            .collect();
        if !due.is_empty() {
            let reg = self.registration(r.profile);
            for endpoint in due {
                self.directory.registered(endpoint.clone(), now);
                self.commands.push_back(Command::Send {
                    room,
                    endpoint,
                    frames: reg.clone(),
                });
            }
        }
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        // Staging slots go to each real target (a prefill rank that writes), up to the
        // per-room count each, while the ring has free slots.
        let real = r.targets.iter().filter(|t| !t.dummy).count();
        r.writers = u32::try_from(real).unwrap_or(u32::MAX).max(1);
        let mut granted: Vec<Vec<u32>> = vec![Vec::new(); r.targets.len()];
        if let (Some(ring), Some(st)) = (&mut self.ring, self.me.staging)
            && !pages.is_empty()
            && !r.started
        {
            for (i, t) in r.targets.iter().enumerate() {
                if !t.dummy {
                    granted[i] = ring.grant(room, st.per_room, now);
                    r.slot_targets.extend(granted[i].iter().map(|&s| (s, i)));
                }
            }
        }
        if !r.slot_targets.is_empty() {
            r.pages = pages.to_vec();
        }
        for (t, granted) in r.targets.iter().zip(&granted) {
            let mut trailing: Vec<Bytes> = self
                .directory
                .proof(&t.endpoint)
                .map(|p| vec![ext::proof_frame(p)])
                .unwrap_or_default();
            if !t.dummy && !granted.is_empty() {
                trailing.push(ext::slots_frame(granted));
            }
            let info = TransferInfo {
                room,
                local_ip: self.me.local_ip.clone(),
                rank_port: self.me.rank_port,
                agent: self.me.agent.clone(),
                dst_pages: if t.dummy {
                    Vec::new()
                } else {
                    pages.iter().copied().map(PageIndex::new).collect()
                },
                dst_aux_index: aux_index,
                required_dst_info_num: r.required,
                trailing,
            };
            let frames = if r.profile.decode_listens() {
                dialect::transfer_info_v2x(info, t.dummy)
            } else {
                info.encode()
            };
            self.commands.push_back(Command::Send {
                room,
                endpoint: t.endpoint.clone(),
                frames,
            });
        }
        r.started = true;
        r.since = now;
    }

    /// A [`Command::Send`] for `room` to `endpoint` failed: the room fails, and every cached
    /// lookup that leads to `endpoint` is forgotten, so the next receiver bootstraps afresh (a
    /// prefill restarted on the same port gets new registrations).
    pub fn send_failed(&mut self, room: RoomId, endpoint: &str, reason: String) {
        self.fail(
            room,
            FailureReason::Send {
                endpoint: endpoint.to_owned(),
                reason,
            },
        );
        self.directory.forget_endpoint(endpoint);
    }

    /// Handles one notification payload. Unknown rooms and malformed payloads are logged and
    /// dropped (SGLang creates entries for them, which leak).
    pub fn handle_notification(&mut self, peer: &str, payload: &[u8]) {
        if self.ring.is_some()
            && let Some(n) = StagedNotice::decode(payload)
        {
            self.staged_landed(peer, n);
            return;
        }
        if let Some(p) = ProofNotice::decode(payload) {
            self.directory.learn_proof(p.endpoint, p.secret);
            return;
        }
        let n = match Notification::decode(payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(peer, error = %e, "ignoring foreign notification");
                return;
            }
        };
        let room = n.room();
        let Some(r) = self.rooms.get_mut(&room) else {
            tracing::debug!(peer, %room, "notification for an unknown room; dropped");
            return;
        };
        if r.concluded.is_some() {
            return;
        }
        let progress = matches!(
            n,
            Notification::Kv { .. }
                | Notification::Aux { .. }
                | Notification::AuxNoKv { .. }
                | Notification::KvPart { .. }
        );
        if r.writers > 1 && progress && !note_writer(r, peer, |p| p.note(&n)) {
            return;
        }
        match n {
            _ if progress => r.progress.note(&n),
            Notification::Staged { .. } | Notification::StatePart { .. } => {
                let why = "SGLang's staging or hybrid-model state, which we do not receive yet";
                r.failure = Some(FailureReason::Unsupported(why.into()));
                r.concluded = Some(KvPoll::Failed);
                self.end_slots(room, false);
            }
            Notification::Fail { reason, .. } => {
                r.failure = Some(FailureReason::PrefillFailed(reason.as_str().to_owned()));
                r.concluded = Some(KvPoll::Failed);
                self.end_slots(room, false);
            }
            Notification::State { .. } => {}
            other => tracing::debug!(?other, "unhandled notification"),
        }
    }

    /// The receiver's poll. Success once every chunk 0..last and the aux row arrived (from each
    /// writer, when several prefill ranks write the room).
    pub fn poll(&mut self, room: RoomId, now: Instant) -> KvPoll {
        let timeout = self.timers.waiting_timeout;
        let Some(r) = self.rooms.get_mut(&room) else {
            return KvPoll::Failed;
        };
        if let Some(c) = r.concluded {
            return c;
        }
        if !r.started {
            return KvPoll::WaitingForInput;
        }
        let by_notifications = if r.writers > 1 {
            r.per_writer.len() as u32 == r.writers && r.per_writer.iter().all(|(_, p)| p.complete())
        } else {
            r.progress.complete()
        };
        // 0.5.23 prefills signal by KV_STATUS only, 0.5.20–0.5.22 ones by notifications only,
        // ours by both (staged rooms still need the notifications: a piece counts once
        // scattered). A 0.5.2x decode takes either, as SGLang's 0.5.20–0.5.22 decodes do, so
        // that one configured for 0.5.23 is also served by a 0.5.22 prefill and the reverse.
        let by_status = r.succeeded.len() as u32 >= r.writers && r.slot_targets.is_empty();
        let done = by_notifications || (r.profile.decode_listens() && by_status);
        if done {
            r.concluded = Some(KvPoll::Success);
            self.end_slots(room, true);
            return KvPoll::Success;
        }
        if let Some(t) = timeout
            && now.saturating_duration_since(r.since) > t
        {
            r.failure = Some(FailureReason::WaitingTimeout(t));
            r.concluded = Some(KvPoll::Failed);
            self.send_abort(room);
            let Some(r) = self.rooms.get_mut(&room) else {
                return KvPoll::Failed;
            };
            // The prefill may have lost our registration (a load that failed while the link
            // was down): the next request to these ranks registers again.
            for target in &r.targets {
                self.directory.unregister(&target.endpoint);
            }
            self.end_slots(room, false);
            return KvPoll::Failed;
        }
        if r.progress.chunks.is_empty() {
            KvPoll::WaitingForInput
        } else {
            KvPoll::Transferring
        }
    }

    /// The receiver of `room` gave up its bootstrap (its deadline passed): the room fails with
    /// `reason`, naming its bootstrap server.
    pub fn bootstrap_failed(&mut self, room: RoomId, reason: String) {
        if let Some(bootstrap) = self.rooms.get(&room).map(|r| r.bootstrap.clone()) {
            self.fail(room, FailureReason::Bootstrap { bootstrap, reason });
        }
    }

    /// Fails `room` unless it already succeeded (an abort, or an error sending its infos).
    pub fn fail(&mut self, room: RoomId, reason: FailureReason) {
        if let Some(r) = self.rooms.get_mut(&room)
            && r.concluded != Some(KvPoll::Success)
        {
            r.failure.get_or_insert(reason);
            r.concluded = Some(KvPoll::Failed);
            self.end_slots(room, false);
            self.send_abort(room);
        }
    }

    /// `room` ended: its staging slots go back to the ring (see [`SlotRing::release`]).
    fn end_slots(&mut self, room: RoomId, clean: bool) {
        if let Some(ring) = &mut self.ring {
            ring.release(room, clean);
        }
    }

    /// When the driver must next call [`DecodeCore::heartbeat_due`]: the next heartbeat round.
    /// The heartbeat thread sleeps until then instead of on a tick of its own.
    pub fn poll_timeout(&self) -> Instant {
        self.directory.next_round(self.timers.heartbeat_interval)
    }

    /// The bootstrap servers to check now: every `heartbeat_interval`, those with unfinished
    /// rooms or cached connection info (minus servers without `/health`). Empty between rounds.
    pub fn heartbeat_due(&mut self, now: Instant) -> Vec<BootstrapAddr> {
        if !self
            .directory
            .heartbeat_round(now, self.timers.heartbeat_interval)
        {
            return Vec::new();
        }
        let mut due: Vec<BootstrapAddr> = self
            .rooms
            .values()
            .filter(|r| r.concluded.is_none())
            .map(|r| r.bootstrap.clone())
            .chain(self.directory.pooled().cloned())
            .filter(|b| self.directory.heartbeats(b))
            .collect();
        due.sort();
        due.dedup();
        due
    }

    /// The outcome of a heartbeat to `bootstrap`. After `heartbeat_max_failures` consecutive
    /// failures every unfinished room of that prefill fails and its cached lookups are
    /// forgotten. Returns how many rooms failed.
    pub fn heartbeat_result(&mut self, bootstrap: &BootstrapAddr, outcome: Heartbeat) -> usize {
        let max = self.timers.heartbeat_max_failures;
        if outcome == Heartbeat::Up {
            // A prefill restarted behind the same bootstrap server moves its ranks: look its
            // cached pool entries up again.
            let checks = self.pools_of(bootstrap);
            self.pool_checks.extend(checks);
        }
        if !self.directory.heartbeat_outcome(bootstrap, &outcome, max) {
            return 0;
        }
        let Heartbeat::Down(reason) = outcome else {
            return 0;
        };
        let mut n = 0;
        for r in self
            .rooms
            .values_mut()
            .filter(|r| &r.bootstrap == bootstrap && r.concluded.is_none())
        {
            r.failure = Some(FailureReason::PrefillUnreachable {
                bootstrap: bootstrap.clone(),
                reason: reason.clone(),
            });
            r.concluded = Some(KvPoll::Failed);
            n += 1;
        }
        self.directory.forget(bootstrap);
        tracing::error!(%bootstrap, rooms = n, "prefill declared dead");
        n
    }

    /// The pool entries to look up again since the last call (each answer goes to
    /// [`DecodeCore::pool_checked`]): those of every prefill a heartbeat found up.
    pub fn take_pool_checks(&mut self) -> Vec<(PoolKey, Vec<u32>)> {
        std::mem::take(&mut self.pool_checks)
    }

    /// The cached connection-pool entries of `bootstrap`, with the ranks to look up again to
    /// check them ([`DecodeCore::pool_checked`]), after a heartbeat found it up.
    pub fn pools_of(&self, bootstrap: &BootstrapAddr) -> Vec<(PoolKey, Vec<u32>)> {
        let Some((ptp, pdp)) = self.directory.parallel(bootstrap) else {
            return Vec::new();
        };
        let Ok(t) = self.targets(ptp / pdp.max(1)) else {
            return Vec::new();
        };
        let ranks: Vec<u32> = t.ranks.iter().map(|&(r, _)| r).collect();
        self.directory
            .pool_keys(bootstrap, t.real)
            .into_iter()
            .map(|k| (k, ranks.clone()))
            .collect()
    }

    /// What the bootstrap server says now about a cached pool entry: when a rank moved (a
    /// prefill restarted), the entry is forgotten, so the next receiver registers afresh.
    pub fn pool_checked(&mut self, key: &PoolKey, ranks: Result<Vec<RankInfo>, String>) {
        self.directory.pool_checked(key, ranks);
    }

    /// The failure reason of `room`.
    pub fn failure(&self, room: RoomId) -> Option<&FailureReason> {
        self.rooms.get(&room).and_then(|r| r.failure.as_ref())
    }

    /// The receiver is gone: forget the room.
    pub fn release(&mut self, room: RoomId) {
        if let Some(r) = self.rooms.remove(&room) {
            let clean = r.concluded == Some(KvPoll::Success);
            self.end_slots(room, clean);
        }
    }

    /// Rooms held (for leak checks).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Cached connection-pool entries (for leak checks).
    pub fn pools(&self) -> usize {
        self.directory.pools()
    }
}

mod directory;
mod staged;
use directory::PrefillDirectory;
use staged::note_writer;
