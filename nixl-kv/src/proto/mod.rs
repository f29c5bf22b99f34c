//! The sans-IO core: state machines, the descriptor planner and its lowering.
//!
//! Nothing here performs IO, spawns threads or reads the clock: inputs are messages,
//! notifications, IO outcomes and `now`; outputs are one ordered queue of commands per core and
//! poll states. The `driver` module feeds the cores and carries out their commands; it decides
//! nothing. The contract is in docs/protocol.md.

pub mod decode;
mod failure;
mod lists;
pub(crate) mod log_budget;
pub mod lower;
pub mod plan;
pub mod prefill;
pub mod route;
pub mod slicing;
pub mod staging;
pub mod targeting;
mod timers;

use std::fmt;

use nixl_core::MemType;

pub use failure::FailureReason;

/// A bootstrap server's `host:port`, as a decode names its prefill.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootstrapAddr(String);

impl BootstrapAddr {
    /// Wraps `host:port`.
    pub fn new(addr: impl Into<String>) -> Self {
        Self(addr.into())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BootstrapAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `tcp://host:port` of a ZeroMQ endpoint (IPv6 hosts bracketed), as both sides name a prefill
/// rank's PULL socket.
pub fn tcp_endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("tcp://[{host}]:{port}")
    } else {
        format!("tcp://{host}:{port}")
    }
}

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
#[non_exhaustive]
pub struct Layout {
    /// Where the KV buffers live (host or GPU memory); aux buffers are always host memory.
    pub kv_mem: MemType,
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
    /// This rank's place in its attention-TP group and its heads, for sliced transfers.
    pub tp: TpPlace,
}

/// A rank's place in its attention-TP group and, when the engine gave them, the KV heads and
/// tokens of its pages: what a prefill needs to slice heads for a decode of another TP size
/// (docs/protocol.md §5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TpPlace {
    /// Attention-TP size (TP size per DP rank).
    pub tp: u32,
    /// Engine rank (its place is `rank mod tp`).
    pub rank: u32,
    /// MLA: the latent cache is replicated, never sliced.
    pub is_mla: bool,
    /// KV heads per token on this rank, and tokens per page (`KvArgs::heads`).
    pub heads: Option<(u32, u32)>,
}

impl Default for TpPlace {
    fn default() -> Self {
        Self {
            tp: 1,
            rank: 0,
            is_mla: false,
            heads: None,
        }
    }
}

#[cfg(test)]
mod tests;
