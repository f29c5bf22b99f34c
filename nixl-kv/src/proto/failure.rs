//! Why a request failed: one typed reason, shown to log readers and carried by the prefill's
//! `{room}_fail_{reason}` notification (docs/protocol.md §4.4).

use std::time::Duration;

use nixl_wire::AgentName;

use super::BootstrapAddr;
use super::targeting::TargetingError;

/// Why a transfer ended in [`KvPoll::Failed`](super::KvPoll::Failed). Its `Display` is what a log
/// reader needs; on the prefill it is also the text of the failure notification sent to decodes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FailureReason {
    /// A page index lies outside the KV pool.
    #[error("page index {page} outside the pool of {pages} pages")]
    PageOutsidePool {
        /// The index.
        page: u32,
        /// Pages in the pool.
        pages: u32,
    },
    /// An aux index lies outside the aux buffers.
    #[error("aux index {index} outside {slots} slots")]
    AuxOutsideSlots {
        /// The index.
        index: u32,
        /// Rows in the aux buffers.
        slots: u32,
    },
    /// The prefill sent before every decode's transfer info arrived.
    #[error("send before the decode side's transfer info arrived")]
    SendBeforeInfo,
    /// A chunk does not fit the request's page count (or came after the last one).
    #[error("chunk of {pages} pages after {sent} of {total} sent")]
    ChunkOverrun {
        /// Pages in the chunk.
        pages: u32,
        /// Pages sent before it.
        sent: u32,
        /// Pages in the request.
        total: u32,
    },
    /// The room has no sender (or was released).
    #[error("no sender for this room")]
    NoSender,
    /// A transfer info names a decode agent that never registered (or was forgotten).
    #[error("decode agent {0} is not registered")]
    DecodeNotRegistered(AgentName),
    /// A decode asked for fewer pages than the prefill sends.
    #[error("decode {agent} sent {got} pages, need {need}")]
    TooFewDecodePages {
        /// The decode agent.
        agent: AgentName,
        /// Pages it asked for.
        got: usize,
        /// Pages the prefill sends.
        need: usize,
    },
    /// The two sides do not have the same number of KV buffers.
    #[error("decode has {decode} KV buffers, prefill {prefill}")]
    KvBufferCount {
        /// The decode's.
        decode: usize,
        /// The prefill's.
        prefill: usize,
    },
    /// NIXL could not create, post or complete a transfer.
    #[error("transfer to {peer} failed: {reason}")]
    Transfer {
        /// The decode agent.
        peer: String,
        /// NIXL's error.
        reason: String,
    },
    /// The scheduler aborted the request.
    #[error("aborted: {0}")]
    Aborted(String),
    /// The decode sent `ABORT` for the room (SGLang ≥ 0.5.20).
    #[error("aborted by the decode")]
    AbortedByDecode,
    /// The decode asked for something we do not transfer yet (docs/protocol.md §10.10).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The prefill reported a failure (its `_fail_` notification).
    #[error("prefill failed the transfer: {0}")]
    PrefillFailed(String),
    /// Heartbeats to the prefill's bootstrap server failed too often.
    #[error("prefill at {bootstrap} is unreachable: {reason}")]
    PrefillUnreachable {
        /// The bootstrap server.
        bootstrap: BootstrapAddr,
        /// The last heartbeat error.
        reason: String,
    },
    /// A started receiver got no complete data within the waiting timeout.
    #[error("no data from the prefill within {0:?}")]
    WaitingTimeout(Duration),
    /// A bootstrap lookup failed.
    #[error("bootstrap {bootstrap}: {reason}")]
    Bootstrap {
        /// The bootstrap server.
        bootstrap: BootstrapAddr,
        /// Why.
        reason: String,
    },
    /// The bootstrap server knows no prefill yet.
    #[error("no prefill has registered with the bootstrap server {0} yet")]
    NoPrefillRegistered(BootstrapAddr),
    /// The parallel layouts of the two sides cannot be paired.
    #[error(transparent)]
    Targeting(#[from] TargetingError),
    /// A ZeroMQ message could not be delivered.
    #[error("sending to {endpoint} failed: {reason}")]
    Send {
        /// The prefill rank's endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// Another decode already claimed the room (refused to the latecomer only).
    #[error("room already claimed by another decode")]
    RoomClaimed,
    /// The infos of one room disagree (page counts, or how many infos are expected).
    #[error("transfer infos disagree: {0}")]
    InfosDisagree(String),
    /// The staged path went wrong (a piece outside its room's slots or pages, an overwrite of
    /// a slot still scattering, or a gather or scatter the GPU refused).
    #[error("staging: {0}")]
    Staging(String),
    /// A decode of another TP size whose heads cannot be sliced out of ours (docs/protocol.md
    /// §5.6).
    #[error("head slicing: {0}")]
    Slicing(String),
    /// The manager's IO threads are gone.
    #[error("the manager is shutting down")]
    ShuttingDown,
}
