//! Dispatch of a frame set arriving at a prefill's PULL socket (docs/protocol.md §3.2).

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind, Reason};
use crate::frames::{GUARD, NONE};
use crate::register::KvArgsRegister;
use crate::transfer::TransferInfo;

/// A message a prefill receives from a decode.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // Both variants are heap-backed and short-lived.
#[non_exhaustive]
pub enum PrefillInbound {
    /// The decode registers (room frame `None`).
    Register(KvArgsRegister),
    /// The decode asks for one request's pages.
    Transfer(TransferInfo),
    /// Ours: the decode scattered a staged piece, its ring slot is free again.
    Freed(crate::ext::FreedMessage),
}

impl PrefillInbound {
    /// Decodes any frame set, never panicking: a GUARD mismatch, a wrong frame count or any
    /// malformed field is an error naming the frame.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let message = MessageKind::PrefillInbound;
        if frames.len() < 2 {
            return Err(DecodeError::FrameCount {
                message,
                expected: "at least 2",
                got: frames.len(),
            });
        }
        if frames[0].as_ref() != GUARD {
            return Err(DecodeError::field(
                message,
                0,
                "guard",
                Reason::Unexpected {
                    expected: "NixlMsgGuard",
                },
            ));
        }
        if frames[1].as_ref() == NONE {
            KvArgsRegister::decode(frames).map(Self::Register)
        } else if crate::ext::FreedMessage::is_freed(frames) {
            crate::ext::FreedMessage::decode(frames).map(Self::Freed)
        } else {
            TransferInfo::decode(frames).map(Self::Transfer)
        }
    }

    /// Encodes the frames.
    pub fn encode(&self) -> Vec<Bytes> {
        match self {
            Self::Register(m) => m.encode(),
            Self::Transfer(m) => m.encode(),
            Self::Freed(m) => m.encode(),
        }
    }
}
