//! Dispatch of a frame set arriving at a prefill's PULL socket (docs/protocol.md §3.2, §10.1):
//! every profile's messages on one socket, told apart by their shape.

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
    /// A 0.5.20–0.5.23 decode registers.
    RegisterV2x(crate::v2x::KvArgsRegister),
    /// A 0.5.20–0.5.23 decode asks for one request's pages.
    TransferV2x(crate::v2x::TransferInfo),
    /// A 0.5.20–0.5.23 decode gives up on a room.
    Abort(crate::v2x::Abort),
    /// SGLang's staging (0.5.23): an allocation in the decode's staging buffer.
    StagingRsp(crate::v2x::StagingRsp),
    /// SGLang's staging (0.5.23): the decode's staging watermark.
    Watermark(crate::v2x::Watermark),
}

impl PrefillInbound {
    /// Decodes any frame set, never panicking: a GUARD mismatch, a wrong frame count or any
    /// malformed field is an error naming the frame.
    ///
    /// Tagged messages (`ABORT`, `STAGING_RSP`, `WATERMARK`) are told by their first frame;
    /// the rest start with GUARD. A registration whose frame 8 is a decimal (the GPU id) is
    /// 0.5.1's, any other a 0.5.2x one; a TransferInfo whose frames 8–10 have 0.5.2x's shape
    /// is 0.5.2x's, any other 0.5.1's with trailing frames.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        use crate::v2x;
        let message = MessageKind::PrefillInbound;
        match frames.first().map(Bytes::as_ref) {
            Some(v2x::ABORT) => return v2x::Abort::decode(frames).map(Self::Abort),
            Some(v2x::STAGING_RSP) => {
                return v2x::StagingRsp::decode(frames).map(Self::StagingRsp);
            }
            Some(v2x::WATERMARK) => return v2x::Watermark::decode(frames).map(Self::Watermark),
            _ => {}
        }
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
            let v051 = frames
                .get(8)
                .is_some_and(|f| crate::scalar::parse_unsigned(f, u64::MAX).is_ok());
            if v051 || frames.len() < 9 {
                KvArgsRegister::decode(frames).map(Self::Register)
            } else {
                v2x::KvArgsRegister::decode(frames).map(Self::RegisterV2x)
            }
        } else if crate::ext::FreedMessage::is_freed(frames) {
            crate::ext::FreedMessage::decode(frames).map(Self::Freed)
        } else if v2x::TransferInfoV2x::has_shape(frames) {
            v2x::TransferInfo::decode(frames).map(Self::TransferV2x)
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
            Self::RegisterV2x(m) => m.encode(),
            Self::TransferV2x(m) => m.encode(),
            Self::Abort(m) => m.encode(),
            Self::StagingRsp(m) => m.encode(),
            Self::Watermark(m) => m.encode(),
        }
    }

    /// The profile whose shape this message has, where its shape tells (tagged messages are
    /// 0.5.2x's; ours ride on any).
    pub fn profile(&self) -> Option<crate::Profile> {
        match self {
            Self::Register(_) | Self::Transfer(_) => Some(crate::Profile::Sglang051),
            Self::RegisterV2x(r) => Some(r.profile()),
            Self::TransferV2x(_) | Self::Abort(_) | Self::StagingRsp(_) | Self::Watermark(_) => {
                None
            }
            Self::Freed(_) => None,
        }
    }
}
