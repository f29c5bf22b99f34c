//! Decoding errors. Encoding is infallible.

use std::fmt;

/// Which message a [`DecodeError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MessageKind {
    /// A frame set arriving at a prefill, before it is known which message it is.
    PrefillInbound,
    /// The decode's registration (`KVArgsRegisterInfo`).
    KvArgsRegister,
    /// The per-request transfer message (`TransferInfo`).
    TransferInfo,
    /// A NIXL notification payload.
    Notification,
    /// A bootstrap HTTP query string.
    RouteQuery,
    /// SGLang ≥ 0.5.20's registration (24 or 25 frames).
    KvArgsRegisterV2x,
    /// SGLang ≥ 0.5.20's TransferInfo (11 frames).
    TransferInfoV2x,
    /// `KV_STATUS` (prefill → decode).
    KvStatus,
    /// `ABORT` (decode → prefill).
    Abort,
    /// `ABORT_ACK` (prefill → decode).
    AbortAck,
    /// `CHUNK_READY` (prefill → decode, SGLang's staging).
    ChunkReady,
    /// `STAGING_REQ` (prefill → decode, SGLang's staging).
    StagingReq,
    /// `STAGING_RSP` (decode → prefill, SGLang's staging).
    StagingRsp,
    /// `WATERMARK` (decode → prefill, SGLang's staging).
    Watermark,
    /// A frame set arriving at a decode's listener, before it is known which message it is.
    DecodeInbound,
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PrefillInbound => "prefill-bound message",
            Self::KvArgsRegister => "KVArgsRegisterInfo",
            Self::TransferInfo => "TransferInfo",
            Self::Notification => "notification",
            Self::RouteQuery => "route query",
            Self::KvArgsRegisterV2x => "KVArgsRegisterInfo (0.5.2x)",
            Self::TransferInfoV2x => "TransferInfo (0.5.2x)",
            Self::KvStatus => "KV_STATUS",
            Self::Abort => "ABORT",
            Self::AbortAck => "ABORT_ACK",
            Self::ChunkReady => "CHUNK_READY",
            Self::StagingReq => "STAGING_REQ",
            Self::StagingRsp => "STAGING_RSP",
            Self::Watermark => "WATERMARK",
            Self::DecodeInbound => "decode-bound message",
        })
    }
}

/// Why a field was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// Bytes outside printable ASCII.
    NotAscii,
    /// An empty field where a value is required.
    Empty,
    /// Not a decimal integer as Python's `str(int)` writes it (sign, leading zeros, other
    /// characters).
    NotDecimal,
    /// A decimal integer outside the range a peer could have sent.
    OutOfRange,
    /// A byte array whose length is not a multiple of its element size.
    BadLength {
        /// The frame's length.
        len: usize,
        /// The element size.
        elem_size: usize,
    },
    /// A negative page index, at this element position.
    NegativeIndex {
        /// Position in the array.
        position: usize,
    },
    /// A literal that did not match (the GUARD frame, `None`, a notification tag).
    Unexpected {
        /// What was expected.
        expected: &'static str,
    },
    /// A structure that does not hold together (a packed list's header, a count mismatch).
    Malformed {
        /// What is wrong, in words.
        what: &'static str,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAscii => f.write_str("not printable ASCII"),
            Self::Empty => f.write_str("empty"),
            Self::NotDecimal => f.write_str("not a canonical decimal integer"),
            Self::OutOfRange => f.write_str("integer out of range"),
            Self::BadLength { len, elem_size } => {
                write!(f, "length {len} is not a multiple of {elem_size}")
            }
            Self::NegativeIndex { position } => write!(f, "negative index at position {position}"),
            Self::Unexpected { expected } => write!(f, "expected {expected}"),
            Self::Malformed { what } => f.write_str(what),
        }
    }
}

/// A message that could not be decoded. Names the message, the frame (wire index, GUARD = 0) or
/// field, and the reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message has the wrong number of frames (or notification parts).
    #[error("{message}: expected {expected} frames, got {got}")]
    FrameCount {
        /// The message.
        message: MessageKind,
        /// The accepted counts, in words.
        expected: &'static str,
        /// The count received.
        got: usize,
    },
    /// One frame (or notification part, or query parameter) is malformed.
    #[error("{message}: frame {frame} ({field}): {reason}")]
    Field {
        /// The message.
        message: MessageKind,
        /// The frame's index on the wire (GUARD = 0), or the part's index in a notification.
        frame: usize,
        /// The field's name.
        field: &'static str,
        /// What is wrong.
        reason: Reason,
    },
}

impl DecodeError {
    pub(crate) fn field(
        message: MessageKind,
        frame: usize,
        field: &'static str,
        reason: Reason,
    ) -> Self {
        Self::Field {
            message,
            frame,
            field,
            reason,
        }
    }
}
