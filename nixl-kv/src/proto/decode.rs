//! The decode side: per-room completion from NIXL notifications, failures, timeouts and
//! heartbeats.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_wire::{Notification, RoomId};

use super::KvPoll;

#[derive(Debug)]
struct Room {
    bootstrap: String,
    started: bool,
    chunks: Vec<u32>,
    expected: Option<u32>,
    aux: bool,
    concluded: Option<KvPoll>,
    failure: Option<String>,
    since: Instant,
}

/// The decode side of one engine rank.
#[derive(Debug)]
pub struct DecodeCore {
    rooms: HashMap<RoomId, Room>,
    waiting_timeout: Option<Duration>,
}

impl DecodeCore {
    /// A core that fails rooms waiting longer than `waiting_timeout` (`None`: never).
    pub fn new(waiting_timeout: Option<Duration>) -> Self {
        Self {
            rooms: HashMap::new(),
            waiting_timeout,
        }
    }

    /// A receiver for `room` whose prefill is reached through `bootstrap` (host:port).
    pub fn receiver_new(&mut self, room: RoomId, bootstrap: &str, now: Instant) {
        self.rooms.insert(
            room,
            Room {
                bootstrap: bootstrap.to_owned(),
                started: false,
                chunks: Vec::new(),
                expected: None,
                aux: false,
                concluded: None,
                failure: None,
                since: now,
            },
        );
    }

    /// The receiver sent its transfer infos; the waiting timeout starts now.
    pub fn receiver_started(&mut self, room: RoomId, now: Instant) {
        if let Some(r) = self.rooms.get_mut(&room) {
            r.started = true;
            r.since = now;
        }
    }

    /// Handles one notification payload. Unknown rooms and malformed payloads are logged and
    /// dropped (SGLang creates entries for them, which leak).
    pub fn handle_notification(&mut self, peer: &str, payload: &[u8]) {
        let n = match Notification::decode(payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(peer, error = %e, "ignoring foreign notification");
                return;
            }
        };
        let Some(r) = self.rooms.get_mut(&n.room()) else {
            tracing::debug!(peer, room = %n.room(), "notification for an unknown room; dropped");
            return;
        };
        if r.concluded.is_some() {
            return;
        }
        match n {
            Notification::Kv { chunk, last, .. } => {
                if !r.chunks.contains(&chunk.get()) {
                    r.chunks.push(chunk.get());
                }
                if last {
                    r.expected = Some(chunk.get() + 1);
                }
            }
            Notification::Aux { .. } => r.aux = true,
            Notification::Fail { reason, .. } => {
                r.failure = Some(format!("prefill failed the transfer: {reason}"));
                r.concluded = Some(KvPoll::Failed);
            }
            Notification::State { .. } => {}
            other => tracing::debug!(?other, "unhandled notification"),
        }
    }

    /// The receiver's poll. Success once every chunk 0..last and the aux row arrived.
    pub fn poll(&mut self, room: RoomId, now: Instant) -> KvPoll {
        let timeout = self.waiting_timeout;
        let Some(r) = self.rooms.get_mut(&room) else {
            return KvPoll::Failed;
        };
        if let Some(c) = r.concluded {
            return c;
        }
        if !r.started {
            return KvPoll::WaitingForInput;
        }
        if r.aux && r.expected.is_some_and(|e| r.chunks.len() as u32 == e) {
            r.concluded = Some(KvPoll::Success);
            return KvPoll::Success;
        }
        if let Some(t) = timeout
            && now.saturating_duration_since(r.since) > t
        {
            r.failure = Some(format!("no data from the prefill within {t:?}"));
            r.concluded = Some(KvPoll::Failed);
            return KvPoll::Failed;
        }
        if r.chunks.is_empty() {
            KvPoll::WaitingForInput
        } else {
            KvPoll::Transferring
        }
    }

    /// Fails `room` (an abort, or an error sending its infos).
    pub fn fail(&mut self, room: RoomId, reason: &str) {
        if let Some(r) = self.rooms.get_mut(&room)
            && r.concluded != Some(KvPoll::Success)
        {
            r.failure.get_or_insert_with(|| reason.to_owned());
            r.concluded = Some(KvPoll::Failed);
        }
    }

    /// Fails every unfinished room whose prefill is `bootstrap` (a dead prefill). Returns how many.
    pub fn fail_bootstrap(&mut self, bootstrap: &str, reason: &str) -> usize {
        let mut n = 0;
        for r in self
            .rooms
            .values_mut()
            .filter(|r| r.bootstrap == bootstrap && r.concluded.is_none())
        {
            r.failure = Some(reason.to_owned());
            r.concluded = Some(KvPoll::Failed);
            n += 1;
        }
        n
    }

    /// The bootstrap addresses with unfinished rooms (the ones to heartbeat).
    pub fn live_bootstraps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .rooms
            .values()
            .filter(|r| r.concluded.is_none())
            .map(|r| r.bootstrap.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The failure reason of `room`.
    pub fn failure(&self, room: RoomId) -> Option<&str> {
        self.rooms.get(&room).and_then(|r| r.failure.as_deref())
    }

    /// The receiver is gone: forget the room.
    pub fn release(&mut self, room: RoomId) {
        self.rooms.remove(&room);
    }

    /// Rooms held (for leak checks).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }
}
