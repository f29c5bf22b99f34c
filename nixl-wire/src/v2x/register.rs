//! The registration of SGLang 0.5.20–0.5.23 decodes (docs/protocol.md §10.3): 24 frames from
//! 0.5.20–0.5.22, 25 from 0.5.23 (which adds the state data lengths).

use bytes::Bytes;

use crate::error::{DecodeError, MessageKind};
use crate::ext::EXT_PREFIX;
use crate::frames::{FrameReader, GUARD, NONE, decimal_frame, u32s_frame, u64s_frame};
use crate::ids::{AgentName, GpuId};
use crate::int_lists::pack_int_lists;
use crate::profile::Profile;

/// Where a KV buffer lives, as frame 18 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemKind {
    /// GPU memory (`VRAM`).
    Vram,
    /// Host memory (`DRAM`).
    Dram,
}

impl MemKind {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vram => "VRAM",
            Self::Dram => "DRAM",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "VRAM" => Some(Self::Vram),
            "DRAM" => Some(Self::Dram),
            _ => None,
        }
    }
}

/// SGLang's own staging buffer on the decode (frames 15 and 16; both empty when staging is off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SglangStaging {
    /// The staging buffer's base address.
    pub base: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// The registration a 0.5.20–0.5.23 decode rank sends to each target prefill rank.
///
/// Wire layout: GUARD, `None`, decode IP, listener port, agent name, agent metadata, KV
/// pointers (u64 LE), aux pointers (u64 LE), state pointers (packed lists of u64), GPU id,
/// decode attention-TP size, decode TP rank, first KV item length, state item lengths
/// (packed u32), state dimensions (packed u32), staging base (8 bytes or empty), staging size
/// (decimal or empty), slots per KV buffer (decimal or empty), KV memory kinds
/// (`VRAM,DRAM,...`), KV item lengths (u64 LE), state layer ids (packed u32), KV layer ids
/// (u32 LE), DCP size, DCP rank, and from 0.5.23 the state data lengths (packed u64). Then any
/// trailing frames (ours start with `nixl-rs:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvArgsRegister {
    /// The decode's IP.
    pub local_ip: String,
    /// The port of the decode's PULL listener (`KV_STATUS` and `ABORT_ACK` go there).
    pub rank_port: u16,
    /// The decode's NIXL agent name.
    pub agent: AgentName,
    /// The decode's NIXL agent metadata, opaque.
    pub metadata: Bytes,
    /// Base addresses of the decode's KV buffers.
    pub kv_ptrs: Vec<u64>,
    /// Base addresses of the decode's aux (metadata) buffers.
    pub aux_ptrs: Vec<u64>,
    /// Base addresses of each state component's buffers (hybrid models; empty for dense ones).
    pub state_ptrs: Vec<Vec<u64>>,
    /// The decode's GPU.
    pub gpu_id: GpuId,
    /// The decode's attention-TP size.
    pub decode_tp_size: u32,
    /// The decode's TP rank.
    pub decode_tp_rank: u32,
    /// Bytes of one page of the first KV buffer (0 without KV).
    pub dst_kv_item_len: u64,
    /// Bytes per slot of each state component's buffers.
    pub state_item_lens: Vec<Vec<u32>>,
    /// Dimension per tensor of each state component.
    pub state_dims: Vec<Vec<u32>>,
    /// SGLang's staging buffer, when the decode has one.
    pub staging: Option<SglangStaging>,
    /// Slots (pages) per KV buffer; `None` when the frame is empty.
    pub dst_num_slots: Option<u64>,
    /// Where each KV buffer lives, one per KV pointer.
    pub kv_mem_kinds: Vec<MemKind>,
    /// Bytes of one page of each KV buffer, one per KV pointer.
    pub kv_item_lens: Vec<u64>,
    /// Layer ids of each state component.
    pub state_layer_ids: Vec<Vec<u32>>,
    /// Layer id of each KV buffer (empty for plain MHA and MLA pools).
    pub kv_layer_ids: Vec<u32>,
    /// Decode context-parallel size.
    pub dcp_size: u32,
    /// Decode context-parallel rank.
    pub dcp_rank: u32,
    /// Bytes of each state component's buffers; `None` in 0.5.20–0.5.22's 24-frame form.
    pub state_data_lens: Option<Vec<Vec<u64>>>,
    /// Frames after the registration proper, kept as they came.
    pub trailing: Vec<Bytes>,
}

/// Frames of the 0.5.23 form, GUARD included.
const FRAMES_0523: usize = 25;
/// Frames of the 0.5.20–0.5.22 form.
const FRAMES_0520: usize = 24;

impl KvArgsRegister {
    /// The release family this registration's shape belongs to.
    pub fn profile(&self) -> Profile {
        if self.state_data_lens.is_some() {
            Profile::Sglang0523
        } else {
            Profile::Sglang0520
        }
    }

    /// Whether the decode announced anything we do not transfer yet (hybrid-model state,
    /// SGLang's staging buffer, decode context parallelism), named for a failure reason.
    pub fn unsupported(&self) -> Option<&'static str> {
        if self.state_ptrs.iter().any(|l| !l.is_empty()) {
            Some("hybrid-model state buffers")
        } else if self.staging.is_some() {
            Some("SGLang's staging buffer")
        } else if self.dcp_size > 1 {
            Some("decode context parallelism (DCP)")
        } else {
            None
        }
    }

    /// Decodes the frames, GUARD included: 24 or 25 frames and then trailing frames of ours.
    pub fn decode(frames: &[Bytes]) -> Result<Self, DecodeError> {
        let message = MessageKind::KvArgsRegisterV2x;
        let r = FrameReader::new(frames, message, FRAMES_0520, "24 or 25")?;
        r.literal(1, "room", NONE, "None")?;
        let own = if frames.len() == FRAMES_0520 || frames[FRAMES_0520].starts_with(EXT_PREFIX) {
            FRAMES_0520
        } else {
            FRAMES_0523
        };
        let kv_ptrs = r.u64s(6, "kv pointers")?;
        let dst_kv_item_len = r.unsigned(12, "dst kv item len", u64::MAX)?;
        // SGLang always writes both lists (empty only without KV buffers); its parser's defaults
        // for empty frames serve older senders that no release is.
        let kv_mem_kinds = if frames[18].is_empty() {
            Vec::new()
        } else {
            let text = r.text(18, "kv mem kinds")?;
            text.split(',')
                .map(MemKind::parse)
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| r.invalid(18, "kv mem kinds", "not VRAM or DRAM"))?
        };
        if kv_mem_kinds.len() != kv_ptrs.len() {
            return Err(r.invalid(18, "kv mem kinds", "count differs from the KV pointers"));
        }
        let kv_item_lens = r.u64s(19, "kv item lens")?;
        if kv_item_lens.len() != kv_ptrs.len() {
            return Err(r.invalid(19, "kv item lens", "count differs from the KV pointers"));
        }
        let staging = match (frames[15].len(), frames[16].is_empty()) {
            (0, true) => None,
            (8, false) => Some(SglangStaging {
                base: r.u64s(15, "staging base")?[0],
                size: r.unsigned(16, "staging size", u64::MAX)?,
            }),
            _ => return Err(r.invalid(15, "staging", "base and size must both be set or empty")),
        };
        Ok(Self {
            local_ip: r.text(2, "local ip")?,
            rank_port: r.unsigned(3, "rank port", u16::MAX.into())? as u16,
            agent: r.agent(4)?,
            metadata: r.raw(5),
            kv_ptrs,
            aux_ptrs: r.u64s(7, "aux pointers")?,
            state_ptrs: r.int_lists(8, "state pointers")?,
            gpu_id: GpuId::new(r.unsigned(9, "gpu id", u32::MAX.into())? as u32),
            decode_tp_size: r.unsigned(10, "decode tp size", u32::MAX.into())? as u32,
            decode_tp_rank: r.unsigned(11, "decode tp rank", u32::MAX.into())? as u32,
            dst_kv_item_len,
            state_item_lens: r.int_lists(13, "state item lens")?,
            state_dims: r.int_lists(14, "state dims")?,
            staging,
            dst_num_slots: if frames[17].is_empty() {
                None
            } else {
                Some(r.unsigned(17, "dst num slots", u64::MAX)?)
            },
            kv_mem_kinds,
            kv_item_lens,
            state_layer_ids: r.int_lists(20, "state layer ids")?,
            kv_layer_ids: r.u32s(21, "kv layer ids")?,
            dcp_size: r.unsigned(22, "dcp size", u32::MAX.into())? as u32,
            dcp_rank: r.unsigned(23, "dcp rank", u32::MAX.into())? as u32,
            state_data_lens: if own == FRAMES_0523 {
                Some(r.int_lists(24, "state data lens")?)
            } else {
                None
            },
            trailing: frames[own..].to_vec(),
        })
    }

    /// Encodes the frames, GUARD included, as SGLang builds them.
    pub fn encode(&self) -> Vec<Bytes> {
        let kinds: Vec<&str> = self.kv_mem_kinds.iter().map(|k| k.as_str()).collect();
        let (base, size) = match self.staging {
            Some(s) => (u64s_frame(&[s.base]), decimal_frame(s.size)),
            None => (Bytes::new(), Bytes::new()),
        };
        let mut f = vec![
            Bytes::from_static(GUARD),
            Bytes::from_static(NONE),
            Bytes::copy_from_slice(self.local_ip.as_bytes()),
            decimal_frame(self.rank_port.into()),
            Bytes::copy_from_slice(self.agent.as_str().as_bytes()),
            self.metadata.clone(),
            u64s_frame(&self.kv_ptrs),
            u64s_frame(&self.aux_ptrs),
            pack_int_lists(&self.state_ptrs).into(),
            decimal_frame(self.gpu_id.get().into()),
            decimal_frame(self.decode_tp_size.into()),
            decimal_frame(self.decode_tp_rank.into()),
            decimal_frame(self.dst_kv_item_len),
            pack_int_lists(&self.state_item_lens).into(),
            pack_int_lists(&self.state_dims).into(),
            base,
            size,
            self.dst_num_slots.map(decimal_frame).unwrap_or_default(),
            Bytes::from(kinds.join(",")),
            u64s_frame(&self.kv_item_lens),
            pack_int_lists(&self.state_layer_ids).into(),
            u32s_frame(&self.kv_layer_ids),
            decimal_frame(self.dcp_size.into()),
            decimal_frame(self.dcp_rank.into()),
        ];
        if let Some(lens) = &self.state_data_lens {
            f.push(pack_int_lists(lens).into());
        }
        f.extend(self.trailing.iter().cloned());
        f
    }
}
