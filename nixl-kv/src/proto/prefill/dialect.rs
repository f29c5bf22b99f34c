//! Each decode in its own profile (docs/protocol.md §10): 0.5.2x registrations and
//! TransferInfos become the core's own, Success and failures reach every decode the way its
//! release expects (notifications, `KV_STATUS`, or both for decodes of ours), and `ABORT` ends a
//! room, acknowledged once nothing of it is in flight.

use nixl_wire::v2x::{self, Abort, AbortAck, KvStatus, MemKind};

use super::*;
use crate::proto::tcp_endpoint;

impl PrefillCore {
    /// This rank as SGLang's `KV_STATUS` and `ABORT_ACK` name it (`attn_tp_rank` with PP and
    /// CP of 1).
    fn unique_rank(&self) -> u32 {
        self.layout.tp.rank % self.layout.tp.tp.max(1)
    }

    /// The notification for chunk `chunk` of `room` to `peer`, in its profile: 0.5.1's form,
    /// 0.5.20's with our engine rank as the source, none for a 0.5.23 decode of SGLang's.
    pub(super) fn kv_notif(&self, peer: &Peer, room: RoomId, chunk: u32, last: bool) -> Vec<u8> {
        let pp = match peer.profile {
            Profile::Sglang0523 if !peer.ours => return Vec::new(),
            Profile::Sglang0520 => Some(nixl_wire::PpRank::new(self.layout.tp.rank)),
            _ => None,
        };
        Notification::Kv {
            room,
            chunk: chunk.into(),
            last,
            pp,
        }
        .encode()
    }

    /// The aux notification to `peer` (none for a 0.5.23 decode of SGLang's).
    pub(super) fn aux_notif(&self, peer: &Peer, room: RoomId) -> Vec<u8> {
        if peer.profile == Profile::Sglang0523 && !peer.ours {
            Vec::new()
        } else {
            Notification::Aux { room }.encode()
        }
    }

    pub(super) fn handle_register_v2x(&mut self, r: v2x::KvArgsRegister, now: Instant) {
        let profile = r.profile();
        let ours = match self.layout.kv_mem {
            MemType::Vram => MemKind::Vram,
            _ => MemKind::Dram,
        };
        let unsupported = r
            .unsupported()
            .map(str::to_owned)
            .or_else(|| {
                r.kv_mem_kinds.iter().find(|k| **k != ours).map(|k| {
                    format!(
                        "decode KV memory {} where ours is {}",
                        k.as_str(),
                        ours.as_str()
                    )
                })
            })
            .or_else(|| {
                r.kv_item_lens
                    .iter()
                    .any(|l| *l != r.dst_kv_item_len)
                    .then(|| "decode KV buffers with different page sizes".to_owned())
            });
        if let Some(why) = &unsupported {
            tracing::warn!(agent = %r.agent, %profile, reason = %why, "decode registered; its rooms will fail");
        }
        let reg = KvArgsRegister {
            local_ip: r.local_ip,
            rank_port: r.rank_port,
            agent: r.agent,
            metadata: r.metadata,
            kv_ptrs: r.kv_ptrs,
            aux_ptrs: r.aux_ptrs,
            gpu_id: r.gpu_id,
            tp_info: Some(DecodeTpInfo {
                decode_tp_size: r.decode_tp_size,
                decode_tp_rank: r.decode_tp_rank,
                dst_kv_item_len: r.dst_kv_item_len,
            }),
            trailing: r.trailing,
        };
        self.register(reg, profile, unsupported, now);
    }

    pub(super) fn handle_transfer_v2x(&mut self, t: v2x::TransferInfo, now: Instant) {
        let why = t.unsupported();
        let (room, agent, dummy) = (t.room, t.agent.clone(), t.is_dummy);
        let listener = tcp_endpoint(&t.local_ip, t.rank_port);
        let info = TransferInfo {
            room,
            local_ip: t.local_ip,
            rank_port: t.rank_port,
            agent: t.agent,
            // SGLang marks a dummy target with the flag and writes no pages for it.
            dst_pages: if dummy { Vec::new() } else { t.dst_pages },
            dst_aux_index: t.dst_aux_index,
            required_dst_info_num: t.required_dst_info_num,
            trailing: t.trailing,
        };
        self.handle_transfer_info(info, now);
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if !dummy
            && r.infos.iter().any(|i| i.agent == agent)
            && !r.listeners.iter().any(|(a, _)| *a == agent)
        {
            r.listeners.push((agent.clone(), listener));
        }
        let peer_why = self
            .peers
            .get(&agent)
            .and_then(|p| p.peer.unsupported.clone());
        if let Some(why) = why.map(str::to_owned).or(peer_why) {
            self.fail(room, FailureReason::Unsupported(why));
        }
    }

    /// `ABORT`: the room fails (unless it already succeeded) and, when the decode waits for
    /// it, `ABORT_ACK` goes back once nothing of the room is in flight.
    pub(super) fn handle_abort(&mut self, a: &Abort) {
        let room = a.room;
        if self.rooms.contains_key(&room) && self.sender_poll(room) != KvPoll::Success {
            self.fail(room, FailureReason::AbortedByDecode);
        }
        let Some(reply) = &a.reply else { return };
        let Some(generation) = reply.generation else {
            tracing::debug!(%room, "ABORT without a generation: no acknowledgement owed");
            return;
        };
        let endpoint = tcp_endpoint(&reply.ip, reply.port);
        let frames = AbortAck {
            room,
            prefill_rank: self.unique_rank(),
            generation: Some(generation),
        }
        .encode();
        match self.rooms.get_mut(&room) {
            Some(r) => r.owed.push((endpoint, frames)),
            None => self
                .commands
                .push_back(Command::SendStatus { endpoint, frames }),
        }
        self.settle(room);
    }

    /// Queues the `KV_STATUS` 0 that the room's 0.5.2x decodes get for `reason` (none when
    /// the decode itself aborted), sent once the room is drained; returns the agents that read
    /// the failure notification instead (0.5.1 decodes) or as well (ours).
    pub(super) fn fail_targets(&mut self, room: RoomId, reason: &FailureReason) -> Vec<AgentName> {
        let rank = self.unique_rank();
        let Some(r) = self.rooms.get_mut(&room) else {
            return Vec::new();
        };
        // 0.5.1 decodes (no listener) read the notification; 0.5.2x ones a KV_STATUS; ours both.
        let mut agents: Vec<AgentName> = r
            .infos
            .iter()
            .filter(|i| !i.is_dummy() && !r.listeners.iter().any(|(a, _)| *a == i.agent))
            .map(|i| i.agent.clone())
            .collect();
        for (agent, endpoint) in &r.listeners {
            if self.peers.get(agent).is_some_and(|p| p.peer.ours) {
                agents.push(agent.clone());
            }
            if *reason != FailureReason::AbortedByDecode {
                let frames = KvStatus::failed(room, rank, &reason.to_string()).encode();
                r.owed.push((endpoint.clone(), frames));
            }
        }
        agents
    }

    /// Sends what the room owes its 0.5.2x decodes once nothing of it is in flight: queued
    /// `KV_STATUS` 0 and `ABORT_ACK`, and `KV_STATUS` 4 to its 0.5.23 decodes at Success.
    pub(super) fn settle(&mut self, room: RoomId) {
        let success = self.sender_poll(room) == KvPoll::Success;
        let rank = self.unique_rank();
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if r.in_flight > 0 {
            return;
        }
        for (endpoint, frames) in r.owed.drain(..) {
            self.commands
                .push_back(Command::SendStatus { endpoint, frames });
        }
        if success && !r.concluded {
            r.concluded = true;
            for (agent, endpoint) in &r.listeners {
                let by_status = self
                    .peers
                    .get(agent)
                    .is_some_and(|p| p.peer.profile.success_by_status());
                if by_status {
                    self.commands.push_back(Command::SendStatus {
                        endpoint: endpoint.clone(),
                        frames: KvStatus::success(room, rank).encode(),
                    });
                }
            }
        }
    }
}
