//! Errors of nixl-kv. Per-request problems are not errors but `Failed` states with a
//! [`FailureReason`](crate::FailureReason).

use nixl_core::MemType;

use crate::driver::Mode;
use crate::net::bootstrap::BootstrapError;

/// Errors creating a manager, a sender or a receiver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A NIXL call failed.
    #[error(transparent)]
    Core(#[from] nixl_core::Error),
    /// The arguments do not describe a usable layout.
    #[error("invalid KV arguments: {0}")]
    Args(#[from] ArgsError),
    /// ZeroMQ could not start or bind.
    #[error("zmq: {0}")]
    Zmq(String),
    /// The bootstrap server refused or is unreachable.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// The agent's name cannot be carried by SGLang's frames.
    #[error("agent name {name:?} cannot be sent: {reason}")]
    AgentName {
        /// The name.
        name: String,
        /// Why.
        reason: nixl_wire::Reason,
    },
    /// An IO thread could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// Which thread.
        name: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The staged path was asked for but cannot run here (no GPU pools, no CUDA driver, a
    /// slot too small for a page, or a build without the `cuda` feature).
    #[error("staging: {0}")]
    Staging(String),
    /// Host packing was asked for but cannot run (pools not on the host, a KV buffer outside
    /// the pools given, areas of no or too many bytes).
    #[error("host packing: {0}")]
    HostPacking(String),
    /// A sender needs a prefill manager, a receiver a decode manager.
    #[error("this is a {actual:?} manager; a {wanted:?} manager is needed")]
    WrongMode {
        /// The manager's mode.
        actual: Mode,
        /// The mode needed.
        wanted: Mode,
    },
}

/// Why [`KvArgs`](crate::KvArgs) were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgsError {
    /// No KV buffer.
    #[error("no KV buffers")]
    NoKvBuffers,
    /// No aux buffer.
    #[error("no aux buffers")]
    NoAuxBuffers,
    /// An item length of zero, or larger than its region.
    #[error("{kind} buffer {index}: item length {item_len} does not fit its {len}-byte region")]
    ItemLen {
        /// "KV" or "aux".
        kind: &'static str,
        /// The buffer.
        index: usize,
        /// Its item length.
        item_len: u64,
        /// Its region's length.
        len: u64,
    },
    /// KV memory that is neither host nor GPU memory.
    #[error("KV buffers must be host or GPU memory, not {mem:?}")]
    KvMemory {
        /// The kind found.
        mem: MemType,
    },
    /// KV buffers of different kinds or devices.
    #[error(
        "KV buffer {index} is {mem:?} on device {dev}, buffer 0 is {first_mem:?} on device {first_dev}"
    )]
    MixedKv {
        /// The buffer.
        index: usize,
        /// Its kind.
        mem: MemType,
        /// Its device.
        dev: u64,
        /// Buffer 0's kind.
        first_mem: MemType,
        /// Buffer 0's device.
        first_dev: u64,
    },
    /// Aux buffers outside host memory.
    #[error("aux buffer {index} is {mem:?}; aux buffers must be host memory")]
    AuxNotHost {
        /// The buffer.
        index: usize,
        /// Its kind.
        mem: MemType,
    },
    /// Parallel sizes that do not fit together.
    #[error("engine rank {engine_rank} with TP size {tp_size} and DP size {dp_size}")]
    Parallel {
        /// The rank.
        engine_rank: u32,
        /// TP size.
        tp_size: u32,
        /// DP size.
        dp_size: u32,
    },
}
