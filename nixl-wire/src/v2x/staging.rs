//! The messages of SGLang's own staging path (0.5.23, heterogeneous TP with
//! `SGLANG_DISAGG_STAGING_BUFFER=1`; docs/protocol.md §10.6). We decode them so that a room that
//! would need them fails with a reason instead of hanging; we do not act on them.

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind};
use crate::frames::{FrameReader, decimal_frame, signed_frame};
use crate::ids::{AgentName, RoomId};

/// The tag of [`ChunkReady`].
pub const CHUNK_READY: &[u8] = b"CHUNK_READY";
/// The tag of [`StagingReq`].
pub const STAGING_REQ: &[u8] = b"STAGING_REQ";
/// The tag of [`StagingRsp`].
pub const STAGING_RSP: &[u8] = b"STAGING_RSP";
/// The tag of [`Watermark`].
pub const WATERMARK: &[u8] = b"WATERMARK";

/// Prefill → decode: one staged chunk was written (7 frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReady {
    /// The request.
    pub room: RoomId,
    /// The chunk.
    pub chunk: u64,
    /// Its first page.
    pub page_start: u64,
    /// Its page count.
    pub num_pages: u64,
    /// The writing prefill agent.
    pub writer: AgentName,
    /// The writer's unique rank.
    pub prefill_rank: u32,
}

impl ChunkReady {
    /// Decodes the frames, tag included.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(frames, MessageKind::ChunkReady, CHUNK_READY, (7, 7), "7")?;
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            chunk: r.unsigned(2, "chunk", u64::MAX)?,
            page_start: r.unsigned(3, "page start", u64::MAX)?,
            num_pages: r.unsigned(4, "num pages", u64::MAX)?,
            writer: r.agent(5)?,
            prefill_rank: r.unsigned(6, "prefill rank", u32::MAX.into())? as u32,
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        vec![
            Bytes::from_static(CHUNK_READY),
            decimal_frame(self.room.get()),
            decimal_frame(self.chunk),
            decimal_frame(self.page_start),
            decimal_frame(self.num_pages),
            Bytes::copy_from_slice(self.writer.as_str().as_bytes()),
            decimal_frame(self.prefill_rank.into()),
        ]
    }
}

/// Prefill → decode: asks for staging room for one chunk (5 or 6 frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingReq {
    /// The request.
    pub room: RoomId,
    /// The chunk.
    pub chunk: u64,
    /// Its page count.
    pub chunk_pages: u64,
    /// The prefill's staging session.
    pub session: String,
    /// The requesting pipeline rank, when the prefill has several.
    pub pp_rank: Option<u32>,
}

impl StagingReq {
    /// Decodes the frames, tag included.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(
            frames,
            MessageKind::StagingReq,
            STAGING_REQ,
            (5, 6),
            "5 or 6",
        )?;
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            chunk: r.unsigned(2, "chunk", u64::MAX)?,
            chunk_pages: r.unsigned(3, "chunk pages", u64::MAX)?,
            session: r.text(4, "session")?,
            pp_rank: if frames.len() == 6 {
                Some(r.unsigned(5, "pp rank", u32::MAX.into())? as u32)
            } else {
                None
            },
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut f = vec![
            Bytes::from_static(STAGING_REQ),
            decimal_frame(self.room.get()),
            decimal_frame(self.chunk),
            decimal_frame(self.chunk_pages),
            Bytes::copy_from_slice(self.session.as_bytes()),
        ];
        if let Some(p) = self.pp_rank {
            f.push(decimal_frame(p.into()));
        }
        f
    }
}

/// Decode → prefill: where in the decode's staging buffer a chunk goes (7 frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingRsp {
    /// The request.
    pub room: RoomId,
    /// The chunk.
    pub chunk: u64,
    /// Byte offset in the staging buffer (−1: none).
    pub offset: i64,
    /// The allocator's round.
    pub round: i64,
    /// The allocation's end (−1: none).
    pub end: i64,
    /// The prefill's staging session.
    pub session: String,
}

impl StagingRsp {
    /// Decodes the frames, tag included.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(frames, MessageKind::StagingRsp, STAGING_RSP, (7, 7), "7")?;
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            chunk: r.unsigned(2, "chunk", u64::MAX)?,
            offset: r.signed(3, "offset")?,
            round: r.signed(4, "round")?,
            end: r.signed(5, "end")?,
            session: r.text(6, "session")?,
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        vec![
            Bytes::from_static(STAGING_RSP),
            decimal_frame(self.room.get()),
            decimal_frame(self.chunk),
            signed_frame(self.offset),
            signed_frame(self.round),
            signed_frame(self.end),
            Bytes::copy_from_slice(self.session.as_bytes()),
        ]
    }
}

/// Decode → prefill: how far the decode's staging allocator has been drained (3 or 4 frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    /// The allocator's round.
    pub round: i64,
    /// The drained tail.
    pub tail: i64,
    /// The staging session (absent: SGLang reads the empty session).
    pub session: Option<String>,
}

impl Watermark {
    /// Decodes the frames, tag included.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::tagged(frames, MessageKind::Watermark, WATERMARK, (3, 4), "3 or 4")?;
        Ok(Self {
            round: r.signed(1, "round")?,
            tail: r.signed(2, "tail")?,
            session: if frames.len() == 4 {
                Some(r.text(3, "session")?)
            } else {
                None
            },
        })
    }

    /// Encodes the frames, tag included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut f = vec![
            Bytes::from_static(WATERMARK),
            signed_frame(self.round),
            signed_frame(self.tail),
        ];
        if let Some(s) = &self.session {
            f.push(Bytes::copy_from_slice(s.as_bytes()));
        }
        f
    }
}
