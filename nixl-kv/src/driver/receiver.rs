//! The decode's per-request receiver: performs the bootstrap lookups its core asks for, sends
//! the frames it queues, and feeds it NIXL notifications.

use std::sync::Arc;
use std::time::Instant;

use nixl_wire::RoomId;

use super::{DecodeIo, KvManager, Mode, Shared, exec, lock};
use crate::error::Error;
use crate::net::bootstrap::BootstrapClient;
use crate::proto::decode::Lookup;
use crate::proto::{BootstrapAddr, FailureReason, KvPoll};

/// Lookups one receiver performs at most (parallel sizes, then ranks, once more if a heartbeat
/// forgot them meanwhile).
const MAX_LOOKUPS: usize = 4;

/// Receives one request's KV pages.
///
/// Problems (an unreachable bootstrap server, a dead prefill, a failure pushed by the prefill,
/// a timeout) end in [`KvPoll::Failed`] with a reason, never in a panic. Dropping the receiver
/// frees the room.
///
/// After a failure the prefill may not know it (the protocol has no decode → prefill failure
/// message), and a WRITE it already posted can still land in the room's pages: keep a failed
/// room's pages and aux row out of reuse for a while (docs/protocol.md §8.3; `nixl-pd`
/// quarantines them for 30 s).
pub struct KvReceiver {
    shared: Arc<Shared>,
    room: RoomId,
}

impl std::fmt::Debug for KvReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReceiver")
            .field("room", &self.room)
            .finish()
    }
}

impl KvReceiver {
    /// A receiver for `room`, whose prefill's bootstrap server is `bootstrap` (`host:port`).
    /// Blocks for the bootstrap lookups (the first time per prefill rank) and the registration.
    /// Refused on a prefill manager.
    pub fn new(
        mgr: &KvManager,
        bootstrap: &str,
        room: RoomId,
        dp_rank: Option<u32>,
    ) -> Result<Self, Error> {
        let shared = Arc::clone(&mgr.shared);
        let d = shared.decode().ok_or(Error::WrongMode {
            actual: Mode::Prefill,
            wanted: Mode::Decode,
        })?;
        let addr = BootstrapAddr::new(bootstrap);
        lock(&d.core).receiver_new(room, addr.clone(), dp_rank, Instant::now());
        let client = BootstrapClient::new(bootstrap, shared.config.http_timeout);
        let deadline = Instant::now() + shared.config.bootstrap_deadline;
        for _ in 0..MAX_LOOKUPS {
            if Instant::now() >= deadline {
                let reason = format!(
                    "the bootstrap took longer than {:?}",
                    shared.config.bootstrap_deadline
                );
                lock(&d.core).bootstrap_failed(room, reason);
                break;
            }
            let lookup = lock(&d.core).next_lookup(room);
            match lookup {
                Lookup::Parallel(_) => {
                    parallel_lookup(
                        &client,
                        &d.core,
                        room,
                        shared.config.profile.decode_listens(),
                    );
                }
                Lookup::Ranks { key, ranks } => {
                    // In the form of the profile the server answered in.
                    let v2x = lock(&d.core).profile_of(room).decode_listens();
                    let ask = |r: u32| {
                        if v2x {
                            client.rank_info_v2x(r, key.dp_group)
                        } else {
                            client.rank_info(r, key.dp_group)
                        }
                        .map_err(|e| e.to_string())
                    };
                    let infos = lookup_ranks(&ranks, deadline, ask);
                    lock(&d.core).ranks_learned(room, key, infos);
                }
                _ => break,
            }
        }
        exec::drive_decode(&shared);
        if let Some(reason) = lock(&d.core).failure(room) {
            tracing::warn!(%room, bootstrap, %reason, "receiver failed to bootstrap");
        }
        Ok(Self { shared, room })
    }

    /// Always `Some`: `new` checked the mode, and a manager's mode never changes.
    fn io(&self) -> Option<&DecodeIo> {
        self.shared.decode()
    }

    /// Asks the prefill ranks for the request: destination `pages` in this rank's pool, aux
    /// row `aux_index`.
    pub fn init(&mut self, pages: &[u32], aux_index: u32) {
        let Some(d) = self.io() else { return };
        lock(&d.core).receiver_init(self.room, pages, aux_index, Instant::now());
        exec::drive_decode(&self.shared);
    }

    /// Drains NIXL notifications, runs what they cause (scatters of staged pieces, freed-slot
    /// notices) and reports this room's state.
    pub fn poll(&mut self) -> KvPoll {
        let Some(d) = self.io() else {
            return KvPoll::Failed;
        };
        let mut notifs = Vec::new();
        if let Err(e) = self.shared.agent.drain_notifications(&mut notifs) {
            tracing::warn!(error = %e, "cannot read notifications");
        }
        if !notifs.is_empty() {
            let mut core = lock(&d.core);
            for n in &notifs {
                core.handle_notification(&n.peer, &n.payload);
            }
        }
        // Staged pieces that landed are scattered, finished scatters counted and their slots
        // handed back (any room's: a dropped receiver's scatter still frees its slot).
        if !notifs.is_empty() || d.gpu.is_some() {
            exec::try_drive_decode(&self.shared);
        }
        let state = lock(&d.core).poll(self.room, Instant::now());
        if state == KvPoll::Failed {
            // A waiting timeout queues ABORT to the prefill ranks (0.5.2x).
            exec::try_drive_decode(&self.shared);
        }
        state
    }

    /// Why the request failed.
    pub fn failure(&self) -> Option<FailureReason> {
        let d = self.io()?;
        lock(&d.core).failure(self.room).cloned()
    }

    /// Fails the request locally (the scheduler aborted it).
    pub fn abort(&mut self, reason: &str) {
        if let Some(d) = self.io() {
            lock(&d.core).fail(self.room, FailureReason::Aborted(reason.to_owned()));
            // 0.5.2x prefills are told (ABORT).
            exec::drive_decode(&self.shared);
        }
    }

    /// The room.
    pub fn room(&self) -> RoomId {
        self.room
    }
}

impl Drop for KvReceiver {
    fn drop(&mut self) {
        if let Some(d) = self.io() {
            lock(&d.core).release(self.room);
        }
    }
}

/// The prefill's parallel info, asked first in our profile's form (`v2x`: SGLang 0.5.20–0.5.23's
/// query), then in the other one when that fails: the form that answers reveals the prefill's
/// profile (docs/protocol.md §10.12). Both failing reports the first answer's error.
/// Looks `ranks` up one after another with `ask`, stopping at the first error or at
/// `deadline` (a bootstrap server may name up to 65 536 ranks).
pub(super) fn lookup_ranks<T>(
    ranks: &[u32],
    deadline: Instant,
    ask: impl Fn(u32) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let mut out = Vec::with_capacity(ranks.len().min(1024));
    for (done, &r) in ranks.iter().enumerate() {
        if Instant::now() >= deadline {
            return Err(format!(
                "rank lookups stopped at the bootstrap deadline: {done} of {} answered",
                ranks.len()
            ));
        }
        out.push(ask(r)?);
    }
    Ok(out)
}

fn parallel_lookup(
    client: &BootstrapClient,
    core: &std::sync::Mutex<crate::proto::decode::DecodeCore>,
    room: RoomId,
    v2x: bool,
) {
    if v2x {
        match client.server_info() {
            Ok(i) => lock(core).server_info_learned(room, Ok(i)),
            Err(e) => match client.parallel_info() {
                Ok(i) => lock(core).parallel_learned(room, Ok(i)),
                Err(_) => lock(core).server_info_learned(room, Err(e.to_string())),
            },
        }
    } else {
        match client.parallel_info() {
            Ok(i) => lock(core).parallel_learned(room, Ok(i)),
            Err(e) => match client.server_info() {
                Ok(i) => lock(core).server_info_learned(room, Ok(i)),
                Err(_) => lock(core).parallel_learned(room, Err(e.to_string())),
            },
        }
    }
}
