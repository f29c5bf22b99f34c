//! The sans-IO core: state machines and the descriptor planner.
//!
//! Nothing here performs IO, spawns threads or reads the clock: inputs are messages,
//! notifications, transfer outcomes and `now`; outputs are commands and poll states. The
//! `driver` module feeds it and carries out its commands.

pub mod decode;
pub mod plan;
pub mod prefill;
pub mod targeting;

use std::fmt;

/// The state of a transfer as SGLang's schedulers see it; the numbers are SGLang's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[allow(clippy::exhaustive_enums)] // Fixed by SGLang's KVPoll.
pub enum KvPoll {
    /// The transfer failed; the reason is available from the sender or receiver.
    Failed = 0,
    /// Waiting for the peer to register.
    Bootstrapping = 1,
    /// Registered; waiting for data (decode) or for pages to send (prefill).
    WaitingForInput = 2,
    /// Data is moving.
    Transferring = 3,
    /// Everything arrived.
    Success = 4,
}

impl fmt::Display for KvPoll {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The layout of one side's KV pool and aux buffers, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Base address of each KV buffer, in SGLang's order (K of every layer, then V).
    pub kv_ptrs: Vec<u64>,
    /// Bytes of one page of each KV buffer.
    pub kv_item_lens: Vec<u64>,
    /// Pages in each KV buffer.
    pub kv_pages: u32,
    /// Base address of each aux buffer.
    pub aux_ptrs: Vec<u64>,
    /// Bytes of one row of each aux buffer.
    pub aux_item_lens: Vec<u64>,
    /// Rows (slots) in the aux buffers.
    pub aux_slots: u32,
    /// Device id of the KV memory (CUDA ordinal, 0 for host memory).
    pub gpu_id: u32,
}

#[cfg(test)]
mod tests;
