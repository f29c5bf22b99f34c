//! The decode's per-request receiver.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use nixl_wire::{AgentName, DecodeTpInfo, GpuId, KvArgsRegister, PageIndex, RoomId, TransferInfo};

use super::{KvManager, Shared};
use crate::bootstrap::BootstrapClient;
use crate::proto::KvPoll;
use crate::proto::targeting::{dp_group, targets};

/// One prefill rank this decode rank sends its infos to.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    endpoint: String,
    dummy: bool,
}

/// Receives one request's KV pages.
///
/// Problems (an unreachable bootstrap server, a dead prefill, a failure pushed by the prefill,
/// a timeout) end in [`KvPoll::Failed`] with a reason, never in a panic. Dropping the receiver
/// frees the room.
pub struct KvReceiver {
    shared: Arc<Shared>,
    room: RoomId,
    targets: Vec<Target>,
    required: u32,
}

impl std::fmt::Debug for KvReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReceiver")
            .field("room", &self.room)
            .field("targets", &self.targets.len())
            .finish()
    }
}

impl KvReceiver {
    /// A receiver for `room`, whose prefill's bootstrap server is `bootstrap` (`host:port`).
    /// Blocks for the bootstrap lookups (the first time per prefill) and the registration.
    pub fn new(mgr: &KvManager, bootstrap: &str, room: u64, dp_rank: Option<u32>) -> Self {
        let shared = Arc::clone(&mgr.shared);
        let room = RoomId::new(room);
        shared
            .decode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .receiver_new(room, bootstrap, Instant::now());
        let mut r = Self {
            shared,
            room,
            targets: Vec::new(),
            required: 1,
        };
        if let Err(reason) = r.connect(bootstrap, dp_rank) {
            tracing::warn!(room = %room, bootstrap, %reason, "receiver failed to bootstrap");
            r.shared
                .decode
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fail(room, &reason);
        }
        r
    }

    fn connect(&mut self, bootstrap: &str, dp_rank: Option<u32>) -> Result<(), String> {
        let s = &self.shared;
        let client = BootstrapClient::new(bootstrap, s.config.http_timeout);
        let cached = s
            .parallel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bootstrap)
            .copied();
        let (ptp, pdp) = match cached {
            Some(v) => v,
            None => {
                let info = client.parallel_info().map_err(|e| e.to_string())?;
                let (Some(tp), Some(dp)) = (info.prefill_tp_size, info.prefill_dp_size) else {
                    return Err("no prefill has registered with the bootstrap server yet".into());
                };
                s.parallel
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(bootstrap.to_owned(), (tp, dp));
                (tp, dp)
            }
        };
        let local = s.args.tp_size / s.args.dp_size.max(1);
        let remote = ptp / pdp.max(1);
        let t = targets(local, remote, s.args.engine_rank, s.args.is_mla)?;
        self.required = t.required_dst_info_num;
        let group = dp_group(self.room.get(), dp_rank, pdp);
        let key = format!("{bootstrap}_{group}_{}", t.real);
        let known = s
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some(targets) = known {
            self.targets = targets;
            return Ok(());
        }
        let mut list = Vec::with_capacity(t.ranks.len());
        for (rank, dummy) in &t.ranks {
            let info = client.rank_info(*rank, group).map_err(|e| e.to_string())?;
            let host = if info.rank_ip.contains(':') {
                format!("[{}]", info.rank_ip)
            } else {
                info.rank_ip
            };
            list.push(Target {
                endpoint: format!("tcp://{host}:{}", info.rank_port),
                dummy: *dummy,
            });
        }
        // First contact with this pool key: register with every target, dummies included.
        let reg = self.registration(local)?;
        for target in &list {
            self.send(&target.endpoint, reg.clone())?;
        }
        s.pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, list.clone());
        self.targets = list;
        Ok(())
    }

    fn registration(&self, local_tp: u32) -> Result<Vec<Bytes>, String> {
        let s = &self.shared;
        Ok(KvArgsRegister {
            local_ip: s.config.local_ip.clone(),
            rank_port: s.rank_port,
            agent: self.agent_name()?,
            metadata: s
                .agent
                .local_metadata()
                .map_err(|e| e.to_string())?
                .into_bytes()
                .into(),
            kv_ptrs: s.args.kv.iter().map(|r| r.addr).collect(),
            aux_ptrs: s.args.aux.iter().map(|r| r.addr).collect(),
            gpu_id: GpuId::new(s.args.gpu_id),
            tp_info: Some(DecodeTpInfo {
                decode_tp_size: local_tp,
                decode_tp_rank: s.args.engine_rank,
                dst_kv_item_len: s.args.kv_item_lens.first().copied().unwrap_or(0),
            }),
        }
        .encode())
    }

    fn agent_name(&self) -> Result<AgentName, String> {
        AgentName::new(self.shared.agent.name()).map_err(|e| format!("agent name: {e}"))
    }

    fn send(&self, endpoint: &str, frames: Vec<Bytes>) -> Result<(), String> {
        let zmq = self.shared.zmq.lock().unwrap_or_else(|e| e.into_inner());
        let z = zmq.as_ref().ok_or("zmq thread stopped")?;
        z.send(endpoint, frames)
    }

    /// Asks the prefill ranks for the request: destination `pages` in this rank's pool, aux
    /// row `aux_index`.
    pub fn init(&mut self, pages: &[u32], aux_index: u32) {
        if self.poll_quiet() == KvPoll::Failed {
            return;
        }
        let res = self.send_infos(pages, aux_index);
        let mut core = self.shared.decode.lock().unwrap_or_else(|e| e.into_inner());
        match res {
            Ok(()) => core.receiver_started(self.room, Instant::now()),
            Err(reason) => core.fail(self.room, &reason),
        }
    }

    fn send_infos(&self, pages: &[u32], aux_index: u32) -> Result<(), String> {
        let kv_pages = self
            .shared
            .prefill
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .layout()
            .kv_pages;
        if let Some(bad) = pages
            .iter()
            .find(|&&p| p >= kv_pages || p > i32::MAX as u32)
        {
            return Err(format!(
                "page index {bad} outside this pool of {kv_pages} pages"
            ));
        }
        let agent = self.agent_name()?;
        for t in &self.targets {
            let info = TransferInfo {
                room: self.room,
                local_ip: self.shared.config.local_ip.clone(),
                rank_port: self.shared.rank_port,
                agent: agent.clone(),
                dst_pages: if t.dummy {
                    Vec::new()
                } else {
                    pages.iter().copied().map(PageIndex::new).collect()
                },
                dst_aux_index: aux_index,
                required_dst_info_num: self.required,
            };
            self.send(&t.endpoint, info.encode())?;
        }
        Ok(())
    }

    /// Drains NIXL notifications and reports this room's state.
    pub fn poll(&mut self) -> KvPoll {
        let mut notifs = Vec::new();
        if let Err(e) = self.shared.agent.drain_notifications(&mut notifs) {
            tracing::warn!(error = %e, "cannot read notifications");
        }
        let mut core = self.shared.decode.lock().unwrap_or_else(|e| e.into_inner());
        for n in &notifs {
            core.handle_notification(&n.peer, &n.payload);
        }
        core.poll(self.room, Instant::now())
    }

    fn poll_quiet(&self) -> KvPoll {
        self.shared
            .decode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .poll(self.room, Instant::now())
    }

    /// Why the request failed.
    pub fn failure(&self) -> Option<String> {
        self.shared
            .decode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failure(self.room)
            .map(str::to_owned)
    }

    /// Fails the request locally (the scheduler aborted it).
    pub fn abort(&mut self, reason: &str) {
        self.shared
            .decode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail(self.room, reason);
    }

    /// The room.
    pub fn room(&self) -> u64 {
        self.room.get()
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        self.shared
            .decode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.room);
    }
}
