//! Notifications received from peers.

/// One notification: the sending agent's name and the raw payload bytes.
///
/// Payloads are bytes, not text: NIXL does not require UTF-8, and wire formats are parsed above
/// this crate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The agent that sent it.
    pub peer: String,
    /// The payload exactly as sent.
    pub payload: Vec<u8>,
}
