//! The TransferInfo of SGLang 0.5.20–0.5.23 decodes (docs/protocol.md §10.4): 0.5.1's eight
//! frames and three more (state indices, decode prefix length, dummy flag).

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind};
use crate::frames::{FrameReader, GUARD, decimal_frame};
use crate::ids::{AgentName, PageIndex, RoomId};
use crate::int_lists::pack_int_lists;

/// Where a prefill rank should write one request's KV pages, from a 0.5.20–0.5.23 decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    /// The request.
    pub room: RoomId,
    /// The decode's IP.
    pub local_ip: String,
    /// The decode's listener port (`KV_STATUS` and `ABORT_ACK` for this room go there).
    pub rank_port: u16,
    /// The decode's NIXL agent name.
    pub agent: AgentName,
    /// Destination page indices; empty for a dummy target or a decode-side prefix hit.
    pub dst_pages: Vec<PageIndex>,
    /// The decode's aux (metadata) slot for this request.
    pub dst_aux_index: u32,
    /// How many decode agents must send their info before the prefill may start.
    pub required_dst_info_num: u32,
    /// State slot indices per state component (hybrid models; empty for dense ones).
    pub state_indices: Vec<Vec<i32>>,
    /// Tokens the decode already holds in its radix cache (0: none).
    pub decode_prefix_len: u64,
    /// This target receives nothing (a context-parallel rank that does not own the pages).
    pub is_dummy: bool,
    /// Frames after the eleventh, kept as they came.
    pub trailing: Vec<Bytes>,
}

/// Frames, GUARD included.
pub(crate) const FRAMES: usize = 11;

impl TransferInfo {
    /// Decodes the frames, GUARD included: 11 and then trailing frames of ours.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::new(frames, MessageKind::TransferInfoV2x, FRAMES, "at least 11")?;
        let is_dummy = match frames[10].as_ref() {
            b"0" => false,
            b"1" => true,
            _ => return Err(r.invalid(10, "is dummy", "not 0 or 1")),
        };
        Ok(Self {
            room: RoomId::new(r.unsigned(1, "room", u64::MAX)?),
            local_ip: r.text(2, "local ip")?,
            rank_port: r.unsigned(3, "rank port", u16::MAX.into())? as u16,
            agent: r.agent(4)?,
            dst_pages: r
                .indices(5, "dst page indices")?
                .into_iter()
                .map(PageIndex::new)
                .collect(),
            dst_aux_index: r.unsigned(6, "dst aux index", i32::MAX as u64)? as u32,
            required_dst_info_num: r.unsigned(7, "required dst info num", u32::MAX.into())? as u32,
            state_indices: r.int_lists(8, "state indices")?,
            decode_prefix_len: r.unsigned(9, "decode prefix len", u64::MAX)?,
            is_dummy,
            trailing: frames[FRAMES..].to_vec(),
        })
    }

    /// Whether frames 8–10 have this message's shape (state indices, a decimal, `0`/`1`):
    /// how a prefill tells it from 0.5.1's eight frames followed by trailing frames.
    pub(crate) fn has_shape(frames: &[Bytes]) -> bool {
        frames.len() >= FRAMES
            && matches!(frames[10].as_ref(), b"0" | b"1")
            && crate::scalar::parse_unsigned(&frames[9], u64::MAX).is_ok()
            && crate::int_lists::unpack_int_lists::<i32>(&frames[8]).is_ok()
    }

    /// Encodes the frames, GUARD included, as SGLang builds them.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut pages = Vec::with_capacity(self.dst_pages.len() * 4);
        for p in &self.dst_pages {
            let v = i32::try_from(p.get()).unwrap_or(i32::MAX);
            pages.extend_from_slice(&v.to_le_bytes());
        }
        let mut f = vec![
            Bytes::from_static(GUARD),
            decimal_frame(self.room.get()),
            Bytes::copy_from_slice(self.local_ip.as_bytes()),
            decimal_frame(self.rank_port.into()),
            Bytes::copy_from_slice(self.agent.as_str().as_bytes()),
            pages.into(),
            decimal_frame(self.dst_aux_index.into()),
            decimal_frame(self.required_dst_info_num.into()),
            pack_int_lists(&self.state_indices).into(),
            decimal_frame(self.decode_prefix_len),
            Bytes::from_static(if self.is_dummy { b"1" } else { b"0" }),
        ];
        f.extend(self.trailing.iter().cloned());
        f
    }

    /// What this request asks that we do not transfer yet, named for a failure reason.
    pub fn unsupported(&self) -> Option<&'static str> {
        if self.state_indices.iter().any(|l| !l.is_empty()) {
            Some("hybrid-model state indices")
        } else if self.decode_prefix_len > 0 {
            Some("a decode-side radix prefix (decode_prefix_len > 0)")
        } else {
            None
        }
    }
}
