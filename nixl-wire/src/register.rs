//! `KVArgsRegisterInfo`: the decode's registration, sent once per connection-pool key and target
//! prefill rank (docs/protocol.md §3.3).

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind};
use crate::frames::{FrameReader, GUARD, NONE, decimal_frame, u64s_frame};
use crate::ids::{AgentName, GpuId};

/// The three frames SGLang ≥ 2025-09 (#9960) appends; seed prefills ignore them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeTpInfo {
    /// The decode's attention-TP size.
    pub decode_tp_size: u32,
    /// The decode's TP rank (its engine rank).
    pub decode_tp_rank: u32,
    /// The decode's KV item length (bytes of one page of one layer buffer).
    pub dst_kv_item_len: u64,
}

/// The registration a decode rank sends to each target prefill rank.
///
/// Wire layout (9 frames, or 12 with [`DecodeTpInfo`]): GUARD, `None`, local IP, rank port,
/// agent name, agent metadata, KV pointers (u64 LE), aux pointers (u64 LE), GPU id; then any
/// trailing frames (SGLang's prefill ignores them; ours read a capability frame, see
/// [`crate::ext`]). Frames 10–12 are the TP info only when all three are decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvArgsRegister {
    /// The decode's IP (IPv6 without brackets).
    pub local_ip: String,
    /// The decode's advertised port (informational; nobody connects to it).
    pub rank_port: u16,
    /// The decode's NIXL agent name.
    pub agent: AgentName,
    /// The decode's NIXL agent metadata, opaque.
    pub metadata: Bytes,
    /// Base addresses of the decode's KV buffers, in SGLang's order.
    pub kv_ptrs: Vec<u64>,
    /// Base addresses of the decode's aux (metadata) buffers.
    pub aux_ptrs: Vec<u64>,
    /// The decode's GPU.
    pub gpu_id: GpuId,
    /// Present when the decode is a later SGLang (or wants heterogeneous TP).
    pub tp_info: Option<DecodeTpInfo>,
    /// Frames after the registration proper (after the TP info, if present), kept as they came.
    pub trailing: Vec<Bytes>,
}

impl KvArgsRegister {
    /// Decodes the frames, GUARD included.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let r = FrameReader::new(frames, MessageKind::KvArgsRegister, 9, "at least 9")?;
        r.literal(1, "room", NONE, "None")?;
        let tp = || -> Result<DecodeTpInfo, DecodeError> {
            Ok(DecodeTpInfo {
                decode_tp_size: r.unsigned(9, "decode tp size", u32::MAX.into())? as u32,
                decode_tp_rank: r.unsigned(10, "decode tp rank", u32::MAX.into())? as u32,
                dst_kv_item_len: r.unsigned(11, "dst kv item len", u64::MAX)?,
            })
        };
        let tp_info = if r.len() >= 12 { tp().ok() } else { None };
        let trailing = frames[if tp_info.is_some() { 12 } else { 9 }..].to_vec();
        Ok(Self {
            local_ip: r.text(2, "local ip")?,
            rank_port: r.unsigned(3, "rank port", u16::MAX.into())? as u16,
            agent: r.agent(4)?,
            metadata: r.raw(5),
            kv_ptrs: r.u64s(6, "kv pointers")?,
            aux_ptrs: r.u64s(7, "aux pointers")?,
            gpu_id: GpuId::new(r.unsigned(8, "gpu id", u32::MAX.into())? as u32),
            tp_info,
            trailing,
        })
    }

    /// Encodes the frames, GUARD included.
    pub fn encode(&self) -> Vec<Bytes> {
        let mut f = Vec::with_capacity(12);
        f.push(Bytes::from_static(GUARD));
        f.push(Bytes::from_static(NONE));
        f.push(Bytes::copy_from_slice(self.local_ip.as_bytes()));
        f.push(decimal_frame(self.rank_port.into()));
        f.push(Bytes::copy_from_slice(self.agent.as_str().as_bytes()));
        f.push(self.metadata.clone());
        f.push(u64s_frame(&self.kv_ptrs));
        f.push(u64s_frame(&self.aux_ptrs));
        f.push(decimal_frame(self.gpu_id.get().into()));
        if let Some(t) = &self.tp_info {
            f.push(decimal_frame(t.decode_tp_size.into()));
            f.push(decimal_frame(t.decode_tp_rank.into()));
            f.push(decimal_frame(t.dst_kv_item_len));
        }
        f.extend(self.trailing.iter().cloned());
        f
    }
}
