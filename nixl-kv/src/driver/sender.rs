//! The prefill's per-request sender.

use std::sync::Arc;
use std::time::Instant;

use nixl_core::{MemType, XferDescs, XferOp, XferRequest, XferStatus};
use nixl_wire::{Notification, RoomId};

use super::{KvManager, Shared};
use crate::proto::KvPoll;
use crate::proto::prefill::Transfer;

/// Sends one request's KV pages to the decode ranks that asked for them.
///
/// Never panics and never returns errors for per-request problems: they end in
/// [`KvPoll::Failed`] with a reason ([`KvSender::failure`]), and the decodes are told with a
/// `{room}_fail_{reason}` notification (seed decodes ignore it). Dropping the sender releases
/// its transfers and frees the room.
pub struct KvSender {
    shared: Arc<Shared>,
    room: RoomId,
    in_flight: Vec<XferRequest>,
    pushed_failure: bool,
}

impl std::fmt::Debug for KvSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSender")
            .field("room", &self.room)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl KvSender {
    /// A sender for `room` (status Bootstrapping until the decode's infos arrive).
    pub fn new(mgr: &KvManager, room: u64) -> Self {
        let room = RoomId::new(room);
        let shared = Arc::clone(&mgr.shared);
        {
            let mut core = shared.prefill.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            core.handle_timeout(now);
            core.sender_new(room, now);
        }
        Self {
            shared,
            room,
            in_flight: Vec::new(),
            pushed_failure: false,
        }
    }

    /// The request has `num_pages` pages; its aux row is slot `aux_index`.
    pub fn init(&mut self, num_pages: u32, aux_index: u32) {
        let res = self.core().sender_init(self.room, num_pages, aux_index);
        if let Err(e) = res {
            tracing::warn!(room = %self.room, error = %e, "sender init refused");
        }
    }

    /// Sends the next chunk: `pages` are prefill page indices, in request order. The last chunk
    /// also sends the aux rows.
    pub fn send(&mut self, pages: &[u32]) {
        let planned = self.core().sender_send(self.room, pages, Instant::now());
        let transfers = match planned {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "send refused");
                self.push_failure();
                return;
            }
        };
        for t in transfers {
            match self.post(&t) {
                Ok(req) => self.in_flight.push(req),
                Err(reason) => {
                    tracing::warn!(room = %self.room, peer = %t.peer, %reason, "transfer not posted");
                    self.core().transfer_done(self.room, Err(reason));
                }
            }
        }
    }

    fn post(&self, t: &Transfer) -> Result<XferRequest, String> {
        // The hot path: requests by index from lists prepared once per peer.
        let peer = self.core().peer(&t.peer);
        if let Some(peer) = peer {
            let layout = self.core().layout();
            let made = self
                .shared
                .prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .request(&self.shared.agent, &layout, self.shared.kv_mem, &peer, t);
            if let Some(res) = made {
                self.shared
                    .made_prepared
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req = res?;
                req.post().map_err(|e| e.to_string())?;
                return Ok(req);
            }
        }
        self.shared
            .made_per_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (src_mem, dst_mem) = if t.aux {
            (MemType::Dram, MemType::Dram)
        } else {
            (self.shared.kv_mem, self.shared.kv_mem)
        };
        let mut local = XferDescs::with_capacity(src_mem, t.ops.len());
        let mut remote = XferDescs::with_capacity(dst_mem, t.ops.len());
        for op in &t.ops {
            local.push(op.src, op.len, u64::from(t.src_dev));
            remote.push(op.dst, op.len, u64::from(t.dst_dev));
        }
        let agent = &self.shared.agent;
        let req = agent
            .create_request(
                XferOp::Write,
                &local,
                &remote,
                t.peer.as_str(),
                Some(&t.notif),
            )
            .map_err(|e| e.to_string())?;
        req.post().map_err(|e| e.to_string())?;
        Ok(req)
    }

    /// Polls: SGLang's states (WaitingForInput while transfers run), Success when every transfer
    /// of the last chunk completed, Failed with a reason on any error.
    pub fn poll(&mut self) -> KvPoll {
        let mut i = 0;
        while i < self.in_flight.len() {
            match self.in_flight[i].status() {
                Ok(XferStatus::InProgress) => i += 1,
                Ok(XferStatus::Done) => {
                    drop(self.in_flight.swap_remove(i));
                    self.core().transfer_done(self.room, Ok(()));
                }
                Err(e) => {
                    drop(self.in_flight.swap_remove(i));
                    self.core().transfer_done(self.room, Err(e.to_string()));
                }
            }
        }
        if self.in_flight.is_empty() {
            // Progress the agent anyway: a failure push (a stand-alone notification) leaves
            // only when its sender is progressed, and no progress thread runs by default.
            let mut stray = Vec::new();
            if self.shared.agent.drain_notifications(&mut stray).is_ok() && !stray.is_empty() {
                tracing::debug!(
                    count = stray.len(),
                    "prefill agent received notifications; ignored"
                );
            }
        }
        let state = self.core().sender_poll(self.room);
        if state == KvPoll::Failed {
            self.push_failure();
        }
        state
    }

    /// Why the request failed.
    pub fn failure(&self) -> Option<String> {
        self.core().failure(self.room).map(str::to_owned)
    }

    /// Fails the request (the scheduler aborted it); the decodes are told.
    pub fn abort(&mut self, reason: &str) {
        self.core().abort(self.room, reason);
        self.in_flight.clear();
        self.push_failure();
    }

    /// The room.
    pub fn room(&self) -> u64 {
        self.room.get()
    }

    fn push_failure(&mut self) {
        if self.pushed_failure {
            return;
        }
        self.pushed_failure = true;
        let (agents, reason) = {
            let mut core = self.core();
            let reason = core.failure(self.room).unwrap_or("failed").to_owned();
            (core.abort(self.room, &reason), reason)
        };
        let payload = Notification::fail(self.room, &reason).encode();
        for a in agents {
            if let Err(e) = self.shared.agent.send_notification(a.as_str(), &payload) {
                tracing::debug!(peer = %a, error = %e, "failure push not delivered");
            }
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, crate::proto::prefill::PrefillCore> {
        self.shared
            .prefill
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for KvSender {
    fn drop(&mut self) {
        self.in_flight.clear();
        self.core().release(self.room);
    }
}
