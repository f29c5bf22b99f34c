//! Prefill→decode KV-cache transfer over NIXL, wire-compatible with SGLang 0.5.1's NIXL
//! connector.
//!
//! **Status: not implemented yet.** This crate will hold the transfer manager, the per-request
//! sender (prefill) and receiver (decode), and the bootstrap HTTP server, built as a sans-IO core
//! (`proto`) driven by an IO shell (`driver`) that owns the ZeroMQ sockets and the
//! [`nixl_core::Agent`]. It uses [`nixl_wire`] for every message that crosses between processes.
//! Today it only re-exports the poll states, whose numbers are part of SGLang's protocol.

/// The state of a transfer as SGLang's schedulers see it (their integers are on the wire of the
/// scheduler's all-reduce, so the discriminants are fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
#[allow(clippy::exhaustive_enums)] // Fixed by SGLang's KVPoll.
pub enum KvPoll {
    /// The transfer failed.
    Failed = 0,
    /// Waiting for the peer to register.
    Bootstrapping = 1,
    /// Registered; waiting for the data (decode) or the pages to send (prefill).
    WaitingForInput = 2,
    /// Data is moving.
    Transferring = 3,
    /// Everything arrived.
    Success = 4,
}

#[cfg(test)]
mod tests {
    use super::KvPoll;

    #[test]
    fn poll_numbers_match_sglang() {
        let all = [
            KvPoll::Failed,
            KvPoll::Bootstrapping,
            KvPoll::WaitingForInput,
            KvPoll::Transferring,
            KvPoll::Success,
        ];
        for (i, p) in all.iter().enumerate() {
            assert_eq!(*p as u8, i as u8);
        }
        // SGLang's max-merge rule relies on this order.
        assert!(KvPoll::WaitingForInput > KvPoll::Bootstrapping);
    }
}
