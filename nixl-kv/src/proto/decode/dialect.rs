//! A decode speaking SGLang 0.5.20–0.5.23 (docs/protocol.md §10): its registration and
//! TransferInfo in that form, the parallel info of a 0.5.2x bootstrap server, what its PULL
//! listener receives (`KV_STATUS`, `ABORT_ACK`, SGLang's staging messages), and `ABORT` to its
//! prefill ranks when a room fails here.

use std::time::Instant;

use bytes::Bytes;
use nixl_wire::http::ParallelInfo;
use nixl_wire::http::v2x::PrefillServerInfo;
use nixl_wire::v2x::{self, Abort, AbortReply, DecodeInbound, KvStatus};
use nixl_wire::{Profile, RoomId, TransferInfo};

use super::{Command, DecodeCore, KvPoll, MAX_PARALLEL_SIZE};
use crate::proto::FailureReason;
use crate::proto::log_budget::peer_warn;

/// Our TransferInfo in 0.5.2x's 11 frames (no state, no radix prefix).
pub(super) fn transfer_info_v2x(info: TransferInfo, dummy: bool) -> Vec<Bytes> {
    v2x::TransferInfo {
        room: info.room,
        local_ip: info.local_ip,
        rank_port: info.rank_port,
        agent: info.agent,
        dst_pages: info.dst_pages,
        dst_aux_index: info.dst_aux_index,
        required_dst_info_num: info.required_dst_info_num,
        state_indices: Vec::new(),
        decode_prefix_len: 0,
        is_dummy: dummy,
        trailing: info.trailing,
    }
    .encode()
}

impl DecodeCore {
    /// Our registration in 0.5.2x's form (25 frames for 0.5.23, 24 for 0.5.20), then `ext`.
    pub(super) fn registration_v2x(&self, profile: Profile, ext: Vec<Bytes>) -> Vec<Bytes> {
        let me = &self.me;
        v2x::KvArgsRegister {
            local_ip: me.local_ip.clone(),
            rank_port: me.rank_port,
            agent: me.agent.clone(),
            metadata: me.metadata.clone(),
            kv_ptrs: me.kv_ptrs.clone(),
            aux_ptrs: me.aux_ptrs.clone(),
            state_ptrs: Vec::new(),
            gpu_id: me.gpu_id,
            decode_tp_size: me.tp_per_dp,
            decode_tp_rank: me.engine_rank,
            dst_kv_item_len: me.kv_item_len,
            state_item_lens: Vec::new(),
            state_dims: Vec::new(),
            staging: None,
            dst_num_slots: Some(me.kv_pages.into()),
            kv_mem_kinds: vec![me.kv_mem; me.kv_ptrs.len()],
            kv_item_lens: vec![me.kv_item_len; me.kv_ptrs.len()],
            state_layer_ids: Vec::new(),
            kv_layer_ids: Vec::new(),
            dcp_size: 1,
            dcp_rank: 0,
            state_data_lens: (profile == Profile::Sglang0523).then(Vec::new),
            trailing: ext,
        }
        .encode()
    }

    /// A 0.5.2x bootstrap server's parallel info for the receiver of `room`: what we cannot
    /// serve fails the room with the reason; the rest goes on as 0.5.1's sizes do. The answer
    /// tells the profile: 0.5.23's has `enable_kv_cache_sharding`, 0.5.20–0.5.22's (and our
    /// server's, which serves both) does not.
    pub fn server_info_learned(&mut self, room: RoomId, info: Result<PrefillServerInfo, String>) {
        let profile = match &info {
            Ok(i) if i.enable_kv_cache_sharding.is_some() => Profile::Sglang0523,
            _ => Profile::Sglang0520,
        };
        let info = info.and_then(|i| {
            if i.attn_cp_size != 1 || i.pp_size != 1 {
                return Err(format!(
                    "the prefill has context parallel size {} and pipeline size {}; only 1 is supported",
                    i.attn_cp_size, i.pp_size
                ));
            }
            if i.enable_kv_cache_sharding == Some(true) {
                return Err("the prefill shards its KV cache; not supported".into());
            }
            if let Some((page, dtype)) = &self.me.sglang_pages {
                if i.page_size.is_some_and(|p| p != *page) {
                    return Err(format!("page size {:?} differs from ours ({page})", i.page_size));
                }
                if i.kv_cache_dtype.as_deref().is_some_and(|d| d != dtype) {
                    return Err(format!(
                        "KV dtype {:?} differs from ours ({dtype})",
                        i.kv_cache_dtype
                    ));
                }
            }
            if i.attn_tp_size == 0 || i.dp_size == 0 {
                return Err("zero parallel sizes".into());
            }
            let tp = i
                .attn_tp_size
                .checked_mul(i.dp_size)
                .filter(|tp| *tp <= MAX_PARALLEL_SIZE)
                .ok_or_else(|| "implausible parallel sizes".to_owned())?;
            Ok(ParallelInfo {
                prefill_tp_size: Some(tp),
                prefill_dp_size: Some(i.dp_size),
            })
        });
        self.sizes_learned(room, info, profile);
    }

    /// The profile the receiver of `room` speaks to its prefill (as configured until the
    /// prefill's bootstrap server answered).
    pub fn profile_of(&self, room: RoomId) -> Profile {
        self.rooms.get(&room).map_or(self.me.profile, |r| r.profile)
    }

    /// A message on our PULL listener (0.5.20 on), arrived at `now`. Malformed ones and those
    /// for rooms we do not hold are logged (within a budget) and dropped.
    pub fn handle_listener(&mut self, frames: &[Bytes], now: Instant) {
        let msg = match DecodeInbound::decode(frames) {
            Ok(m) => m,
            Err(e) => {
                peer_warn!(self.peer_logs, now, error = %e, "malformed message on the decode listener; dropped");
                return;
            }
        };
        match msg {
            DecodeInbound::KvStatus(s) => self.kv_status(&s),
            DecodeInbound::AbortAck(a) => {
                tracing::debug!(room = %a.room, rank = a.prefill_rank, generation = ?a.generation, "ABORT_ACK");
            }
            DecodeInbound::ChunkReady(c) => {
                self.fail_from_prefill(
                    c.room,
                    "SGLang's staging path (CHUNK_READY) is not supported",
                );
            }
            DecodeInbound::StagingReq(r) => {
                self.fail_from_prefill(
                    r.room,
                    "SGLang's staging path (STAGING_REQ) is not supported",
                );
            }
            other => tracing::debug!(?other, "unhandled listener message"),
        }
    }

    fn kv_status(&mut self, s: &KvStatus) {
        let Some(r) = self.rooms.get_mut(&s.room) else {
            tracing::debug!(room = %s.room, "KV_STATUS for an unknown room; dropped");
            return;
        };
        if r.concluded.is_some() {
            return;
        }
        match s.status {
            KvStatus::SUCCESS => {
                if !r.succeeded.contains(&s.prefill_rank) {
                    r.succeeded.push(s.prefill_rank);
                }
            }
            KvStatus::FAILED => {
                let why = s
                    .reason
                    .clone()
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "KV transfer failed".into());
                self.fail_from_prefill(s.room, &why);
            }
            other => tracing::debug!(room = %s.room, status = other, "KV_STATUS ignored"),
        }
    }

    /// The prefill failed `room` (no `ABORT` goes back: it knows).
    fn fail_from_prefill(&mut self, room: RoomId, why: &str) {
        if let Some(r) = self.rooms.get_mut(&room)
            && r.concluded.is_none()
        {
            r.failure = Some(FailureReason::PrefillFailed(why.to_owned()));
            r.concluded = Some(KvPoll::Failed);
            self.end_slots(room, false);
        }
    }

    /// Tells the prefill ranks of a room that failed here to stop (0.5.20 on): `ABORT` with our
    /// listener, and from 0.5.23 a fresh generation, to every target once. A room that failed
    /// before its transfer info went out (a page outside our pool) is aborted too: its prefill
    /// would otherwise hold the request until its bootstrap timeout.
    pub(super) fn send_abort(&mut self, room: RoomId) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        if !r.profile.decode_listens() || r.targets.is_empty() || r.aborted {
            return;
        }
        let generation = if r.profile == Profile::Sglang0523 {
            self.abort_generation += 1;
            Some(self.abort_generation)
        } else {
            None
        };
        r.aborted = true;
        let frames = Abort {
            room,
            reply: Some(AbortReply {
                ip: self.me.local_ip.clone(),
                port: self.me.rank_port,
                generation,
            }),
        }
        .encode();
        for t in &r.targets {
            self.commands.push_back(Command::Send {
                room,
                endpoint: t.endpoint.clone(),
                frames: frames.clone(),
            });
        }
    }
}
