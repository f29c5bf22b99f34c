//! A prefill room: the decode infos it was given, its sender's progress through the pages, its
//! staged path and routes, and SGLang's status rule.

use std::time::Instant;

use bytes::Bytes;

use nixl_wire::{AgentName, TransferInfo};

use super::staged::StagedRoom;
use crate::proto::route::Route;
use crate::proto::{FailureReason, KvPoll};

/// A room's sender: how far it got through the pages.
#[derive(Debug)]
pub(super) struct Sender {
    pub(super) num_pages: u32,
    pub(super) aux_index: u32,
    pub(super) sent: u32,
    pub(super) chunk: u32,
    pub(super) finished_sending: bool,
}

/// One room as the prefill holds it.
#[derive(Debug)]
pub(super) struct Room {
    pub(super) status: KvPoll,
    pub(super) infos: Vec<TransferInfo>,
    pub(super) sender: Option<Sender>,
    pub(super) failure: Option<FailureReason>,
    pub(super) pushed: bool,
    pub(super) in_flight: usize,
    pub(super) touched: Instant,
    /// The staged path, one per real decode (empty: the room is not staged).
    pub(super) staged: Vec<StagedRoom>,
    /// The route to each real decode, chosen at the first chunk (empty before it).
    pub(super) routes: Vec<(AgentName, Route)>,
    /// Messages to 0.5.2x decode listeners that wait until nothing of the room is in flight
    /// (`KV_STATUS` 0, `ABORT_ACK`): endpoint and frames.
    pub(super) owed: Vec<(String, Vec<Bytes>)>,
    /// `KV_STATUS` 4 went to the room's 0.5.23 decodes.
    pub(super) concluded: bool,
    /// The listener of each real decode that sent a 0.5.2x TransferInfo.
    pub(super) listeners: Vec<(AgentName, String)>,
}

impl Room {
    pub(super) fn new(status: KvPoll, now: Instant) -> Self {
        Self {
            status,
            infos: Vec::new(),
            sender: None,
            failure: None,
            pushed: false,
            in_flight: 0,
            touched: now,
            staged: Vec::new(),
            routes: Vec::new(),
            owed: Vec::new(),
            concluded: false,
            listeners: Vec::new(),
        }
    }

    /// SGLang's max-merge rule; but Failed always wins (ours, as Mooncake does).
    pub(super) fn merge(&mut self, s: KvPoll) {
        if s == KvPoll::Failed {
            self.status = KvPoll::Failed;
        } else if self.status != KvPoll::Failed {
            self.status = self.status.max(s);
        }
    }
}
