//! The tagged status messages of SGLang 0.5.20–0.5.23 (docs/protocol.md §10.5): `KV_STATUS` and
//! `ABORT_ACK` from prefill to decode, `ABORT` from decode to prefill.

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind};
use crate::frames::{FrameReader, decimal_frame};
use crate::ids::RoomId;

/// The tag of [`KvStatus`].
pub const KV_STATUS: &[u8] = b"KV_STATUS";
/// The tag of [`Abort`].
pub const ABORT: &[u8] = b"ABORT";
/// The tag of [`AbortAck`].
pub const ABORT_ACK: &[u8] = b"ABORT_ACK";

/// A prefill rank's verdict on a room: Success (0.5.23) or Failed with a reason (0.5.20 on).
///
/// Wire layout: `KV_STATUS`, room, status (SGLang's `KVPoll` value), the prefill's unique
/// rank, and the failure reason (UTF-8; empty on Success; absent from senders that carry
/// none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvStatus {
    /// The request.
    pub room: RoomId,
    /// `KVPoll` as a number: [`KvStatus::SUCCESS`], [`KvStatus::FAILED`] or (ignored by SGLang)
    /// another state.
    pub status: u32,
    /// `attn_tp_rank · pp_size · attn_cp_size + pp_rank · attn_cp_size + attn_cp_rank` of the
    /// sender; a decode counts distinct ranks toward Success.
    pub prefill_rank: u32,
    /// The failure reason (`None`: the frame is absent). SGLang encodes a Python `str`, so it
    /// is UTF-8; anything else is refused.
    pub reason: Option<String>,
}

impl KvStatus {
    /// `KVPoll.Failed`.
    pub const FAILED: u32 = 0;
    /// `KVPoll.Success`.
    pub const SUCCESS: u32 = 4;

    /// Success from `prefill_rank`, as 0.5.23 sends it (an empty reason frame).
    pub fn success(room: RoomId, prefill_rank: u32) -> Self {
        Self {
            room,
            status: Self::SUCCESS,
            prefill_rank,
            reason: Some(String::new()),
        }
    }

    /// Failed with `reason`.
    pub fn failed(room: RoomId, prefill_rank: u32, reason: &str) -> Self {
        Self {
            room,
            status: Self::FAILED,
            prefill_rank,
            reason: Some(reason.to_owned()),
        }
    }

    /// Decodes the frames, tag included (4 or 5).
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(frames, MessageKind::KvStatus, KV_STATUS, (4, 5), "4 or 5")?;
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            status: r.unsigned(2, "status", u32::MAX.into())? as u32,
            prefill_rank: r.unsigned(3, "prefill rank", u32::MAX.into())? as u32,
            reason: match frames.get(4) {
                Some(f) => Some(
                    String::from_utf8(f.to_vec())
                        .map_err(|_| r.invalid(4, "reason", "not UTF-8"))?,
                ),
                None => None,
            },
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut f = vec![
            Bytes::from_static(KV_STATUS),
            decimal_frame(self.room.get()),
            decimal_frame(self.status.into()),
            decimal_frame(self.prefill_rank.into()),
        ];
        if let Some(reason) = &self.reason {
            f.push(Bytes::copy_from_slice(reason.as_bytes()));
        }
        f
    }
}

/// Where a prefill acknowledges an [`Abort`]: the decode's listener, and the abort's
/// generation when the decode waits for an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortReply {
    /// The decode's IP.
    pub ip: String,
    /// The decode's listener port.
    pub port: u16,
    /// The generation to echo (0.5.22 on); without it no acknowledgement is sent.
    pub generation: Option<u64>,
}

/// A decode gives up on a room.
///
/// Wire layout: `ABORT`, room, then optionally the decode's IP and listener port, then
/// optionally a generation (2, 4 or 5 frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    /// The request.
    pub room: RoomId,
    /// Where to acknowledge, when the decode knows its address.
    pub reply: Option<AbortReply>,
}

impl Abort {
    /// Decodes the frames, tag included (2, 4 or 5).
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(frames, MessageKind::Abort, ABORT, (2, 5), "2, 4 or 5")?;
        if frames.len() == 3 {
            return Err(DecodeError::FrameCount {
                message: MessageKind::Abort,
                expected: "2, 4 or 5",
                got: 3,
            });
        }
        let reply = if frames.len() >= 4 {
            Some(AbortReply {
                ip: r.text(2, "decode ip")?,
                port: r.unsigned(3, "decode port", u16::MAX.into())? as u16,
                generation: if frames.len() == 5 {
                    Some(r.unsigned(4, "generation", u64::MAX)?)
                } else {
                    None
                },
            })
        } else {
            None
        };
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            reply,
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut f = vec![Bytes::from_static(ABORT), decimal_frame(self.room.get())];
        if let Some(r) = &self.reply {
            f.push(Bytes::copy_from_slice(r.ip.as_bytes()));
            f.push(decimal_frame(r.port.into()));
            if let Some(g) = r.generation {
                f.push(decimal_frame(g));
            }
        }
        f
    }
}

/// A prefill rank has nothing of an aborted room in flight any more.
///
/// Wire layout: `ABORT_ACK`, room, the prefill's unique rank, and the abort's generation
/// (0.5.22 on; 3 or 4 frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortAck {
    /// The request.
    pub room: RoomId,
    /// The sender's unique rank (as in [`KvStatus`]).
    pub prefill_rank: u32,
    /// The generation of the abort it answers.
    pub generation: Option<u64>,
}

impl AbortAck {
    /// Decodes the frames, tag included (3 or 4).
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(frames, MessageKind::AbortAck, ABORT_ACK, (3, 4), "3 or 4")?;
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            prefill_rank: r.unsigned(2, "prefill rank", u32::MAX.into())? as u32,
            generation: if frames.len() == 4 {
                Some(r.unsigned(3, "generation", u64::MAX)?)
            } else {
                None
            },
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut f = vec![
            Bytes::from_static(ABORT_ACK),
            decimal_frame(self.room.get()),
            decimal_frame(self.prefill_rank.into()),
        ];
        if let Some(g) = self.generation {
            f.push(decimal_frame(g));
        }
        f
    }
}
