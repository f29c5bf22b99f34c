//! `TransferInfo`: one per request per target prefill rank (docs/protocol.md §3.4).

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind};
use crate::frames::{FrameReader, GUARD, decimal_frame};
use crate::ids::{AgentName, PageIndex, RoomId};
use crate::scalar;

/// Where a prefill rank should write one request's KV pages.
///
/// Wire layout (8 frames): GUARD, room, local IP, rank port, agent name, destination page
/// indices (i32 LE; empty for a dummy target), aux slot index, required number of infos; then
/// any trailing frames (SGLang ignores them; ours may carry a proof, see [`crate::ext`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    /// The request.
    pub room: RoomId,
    /// The decode's IP.
    pub local_ip: String,
    /// The decode's advertised port.
    pub rank_port: u16,
    /// The decode's NIXL agent name.
    pub agent: AgentName,
    /// Destination page indices in the decode's KV pool; empty for a dummy target.
    pub dst_pages: Vec<PageIndex>,
    /// The decode's aux (metadata) slot for this request.
    pub dst_aux_index: u32,
    /// How many decode agents must send their info before the prefill may start.
    pub required_dst_info_num: u32,
    /// Frames after the eighth, kept as they came.
    pub trailing: Vec<Bytes>,
}

impl TransferInfo {
    /// A dummy target receives nothing; SGLang marks it with an empty page list.
    pub fn is_dummy(&self) -> bool {
        self.dst_pages.is_empty()
    }

    /// Decodes the frames, GUARD included.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::new(frames, MessageKind::TransferInfo, 8, "at least 8")?;
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
            trailing: frames[8..].to_vec(),
        })
    }

    /// Encodes the frames, GUARD included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut pages = Vec::with_capacity(self.dst_pages.len() * 4);
        for p in &self.dst_pages {
            // Page indices are int32 on the wire; ours are < 2^31 when they came from a peer.
            let v = i32::try_from(p.get()).unwrap_or(i32::MAX);
            pages.extend_from_slice(&v.to_le_bytes());
        }
        let mut room = Vec::with_capacity(20);
        scalar::push_decimal(&mut room, self.room.get());
        let mut f = Vec::with_capacity(8 + self.trailing.len());
        f.extend([
            Bytes::from_static(GUARD),
            room.into(),
            Bytes::copy_from_slice(self.local_ip.as_bytes()),
            decimal_frame(self.rank_port.into()),
            Bytes::copy_from_slice(self.agent.as_str().as_bytes()),
            pages.into(),
            decimal_frame(self.dst_aux_index.into()),
            decimal_frame(self.required_dst_info_num.into()),
        ]);
        f.extend(self.trailing.iter().cloned());
        f
    }
}
