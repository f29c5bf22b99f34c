//! The prefill's per-request sender: forwards calls to the core, runs the commands they cause,
//! and polls the NIXL requests posted for its room.

use std::sync::Arc;
use std::time::Instant;

use nixl_wire::RoomId;

use super::{KvManager, Mode, PrefillIo, Shared, exec, lock};
use crate::error::Error;
use crate::proto::{FailureReason, KvPoll};

/// Sends one request's KV pages to the decode ranks that asked for them.
///
/// Never panics and never returns errors for per-request problems: they end in
/// [`KvPoll::Failed`] with a reason ([`KvSender::failure`]), and the decodes are told with a
/// `{room}_fail_{reason}` notification (seed decodes ignore it). Dropping the sender releases
/// its transfers and frees the room.
pub struct KvSender {
    shared: Arc<Shared>,
    room: RoomId,
}

impl std::fmt::Debug for KvSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvSender")
            .field("room", &self.room)
            .finish()
    }
}

impl KvSender {
    /// A sender for `room` (status Bootstrapping until the decode's infos arrive). Refused on a
    /// decode manager.
    pub fn new(mgr: &KvManager, room: RoomId) -> Result<Self, Error> {
        let shared = Arc::clone(&mgr.shared);
        let p = shared.prefill().ok_or(Error::WrongMode {
            actual: Mode::Decode,
            wanted: Mode::Prefill,
        })?;
        lock(&p.core).sender_new(room, Instant::now());
        Ok(Self { shared, room })
    }

    /// Always `Some`: `new` checked the mode, and a manager's mode never changes.
    fn io(&self) -> Option<&PrefillIo> {
        self.shared.prefill()
    }

    /// The request has `num_pages` pages; its aux row is slot `aux_index`.
    pub fn init(&mut self, num_pages: u32, aux_index: u32) {
        let Some(p) = self.io() else { return };
        let res = lock(&p.core).sender_init(self.room, num_pages, aux_index);
        if let Err(reason) = res {
            tracing::warn!(room = %self.room, %reason, "sender init refused");
        }
        exec::drive_prefill(&self.shared);
    }

    /// Sends the next chunk: `pages` are prefill page indices, in request order. The last chunk
    /// also sends the aux rows.
    pub fn send(&mut self, pages: &[u32]) {
        let Some(p) = self.io() else { return };
        let res = lock(&p.core).sender_send(self.room, pages, Instant::now());
        if let Err(reason) = res {
            tracing::warn!(room = %self.room, %reason, "send refused");
        }
        exec::drive_prefill(&self.shared);
    }

    /// Polls: SGLang's states (WaitingForInput while transfers run), Success when every transfer
    /// of the last chunk completed, Failed with a reason on any error.
    pub fn poll(&mut self) -> KvPoll {
        let Some(p) = self.io() else {
            return KvPoll::Failed;
        };
        let idle = !exec::reap(p, Some(self.room));
        if idle {
            // Progress the agent anyway: a failure push (a stand-alone notification) leaves
            // only when its sender is progressed, and no progress thread runs by default.
            exec::progress(&self.shared.agent, p);
        }
        exec::drive_prefill(&self.shared);
        lock(&p.core).sender_poll(self.room)
    }

    /// Why the request failed.
    pub fn failure(&self) -> Option<FailureReason> {
        let p = self.io()?;
        lock(&p.core).failure(self.room).cloned()
    }

    /// Fails the request (the scheduler aborted it); the decodes are told.
    pub fn abort(&mut self, reason: &str) {
        let Some(p) = self.io() else { return };
        lock(&p.core).abort(self.room, FailureReason::Aborted(reason.to_owned()));
        drop(lock(&p.in_flight).remove(&self.room));
        exec::drive_prefill(&self.shared);
    }

    /// The room.
    pub fn room(&self) -> RoomId {
        self.room
    }
}

impl Drop for KvSender {
    fn drop(&mut self) {
        if let Some(p) = self.io() {
            drop(lock(&p.in_flight).remove(&self.room));
            lock(&p.core).release(self.room);
            // What the room still owed its decodes leaves now.
            exec::drive_prefill(&self.shared);
        }
    }
}
