//! The frames of SGLang 0.5.20–0.5.23 (docs/protocol.md §10): a longer registration and
//! TransferInfo on the prefill's PULL socket, and tagged messages both ways, with the decode's
//! own PULL listener receiving `KV_STATUS`, `ABORT_ACK` and SGLang's staging messages.

mod register;
mod staging;
mod status;
mod transfer;

use bytes::Bytes;

pub use register::{KvArgsRegister, MemKind, SglangStaging};
pub use staging::{CHUNK_READY, ChunkReady, STAGING_REQ, STAGING_RSP, StagingReq, StagingRsp};
pub use staging::{WATERMARK, Watermark};
pub use status::{ABORT, ABORT_ACK, Abort, AbortAck, AbortReply, KV_STATUS, KvStatus};
pub use transfer::TransferInfo;
pub(crate) use transfer::TransferInfo as TransferInfoV2x;

use crate::error::{DecodeError, MessageKind, Reason};

/// A message a decode's listener receives from a prefill (0.5.20 on).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeInbound {
    /// A room's Success or failure.
    KvStatus(KvStatus),
    /// An abort was drained.
    AbortAck(AbortAck),
    /// SGLang's staging: a chunk landed.
    ChunkReady(ChunkReady),
    /// SGLang's staging: a request for staging room.
    StagingReq(StagingReq),
}

impl DecodeInbound {
    /// Decodes any frame set by its tag, never panicking.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        match frames.first().map(Bytes::as_ref) {
            Some(KV_STATUS) => KvStatus::decode(frames).map(Self::KvStatus),
            Some(ABORT_ACK) => AbortAck::decode(frames).map(Self::AbortAck),
            Some(CHUNK_READY) => ChunkReady::decode(frames).map(Self::ChunkReady),
            Some(STAGING_REQ) => StagingReq::decode(frames).map(Self::StagingReq),
            Some(_) => Err(DecodeError::field(
                MessageKind::DecodeInbound,
                0,
                "tag",
                Reason::Unexpected {
                    expected: "KV_STATUS, ABORT_ACK, CHUNK_READY or STAGING_REQ",
                },
            )),
            None => Err(DecodeError::FrameCount {
                message: MessageKind::DecodeInbound,
                expected: "at least 1",
                got: 0,
            }),
        }
    }

    /// Encodes the frames.
    pub fn encode(&self) -> Vec<Bytes> {
        match self {
            Self::KvStatus(m) => m.encode(),
            Self::AbortAck(m) => m.encode(),
            Self::ChunkReady(m) => m.encode(),
            Self::StagingReq(m) => m.encode(),
        }
    }
}
