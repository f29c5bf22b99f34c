//! The prefill's lowering of head slices (heterogeneous TP, docs/protocol.md §5.6): which slice
//! a decode of another TP size takes, as per-token descriptors or packed pieces.

use super::*;

impl PrefillCore {
    /// The head slice `peer` takes, when it is a decode of another attention-TP size for a
    /// model that is not MLA (its registration says so, SGLang's frames 10–12); `None` when it
    /// takes whole pages.
    pub(super) fn head_slice(&self, peer: &Peer) -> Option<Result<HeadSlice, FailureReason>> {
        let place = self.layout.tp;
        let tp = peer.tp_info.as_ref()?;
        if place.is_mla || tp.decode_tp_size == place.tp {
            return None;
        }
        let Some((kv_heads, page_tokens)) = place.heads else {
            return Some(Err(FailureReason::Slicing(format!(
                "a decode of TP size {} asks a prefill of TP size {} that was not given its heads (KvArgs::heads)",
                tp.decode_tp_size, place.tp
            ))));
        };
        let params = SliceParams {
            prefill_tp: place.tp,
            decode_tp: tp.decode_tp_size,
            prefill_rank: place.rank,
            decode_rank: tp.decode_tp_rank,
            kv_heads,
            page_tokens,
            src_item: self.layout.kv_item_lens.first().copied().unwrap_or(0),
            dst_item: tp.dst_kv_item_len,
        };
        Some(HeadSlice::new(&params).map_err(|e| FailureReason::Slicing(e.to_string())))
    }

    /// Lowers the KV pages of `c` as head slices: one descriptor per token slot
    /// of every page of every buffer, as indices into prepared token lists (tokens.rs) once
    /// they are ready, else explicit, merged where they continue each other.
    pub(super) fn lower_sliced(
        &mut self,
        slice: &HeadSlice,
        agent: &AgentName,
        peer: &Peer,
        c: &Chunk<'_>,
    ) -> Result<Work, FailureReason> {
        if self
            .layout
            .kv_item_lens
            .iter()
            .any(|&i| i != slice.src_item)
        {
            return Err(FailureReason::Slicing(
                "the prefill's KV buffers differ in item length".into(),
            ));
        }
        if let Some(lowered) = self.lower_tokens_prepared(slice, agent, c) {
            return Ok(lowered);
        }
        let l = &self.layout;
        let pairs = c.pairs();
        let copies = slice
            .copies(&l.kv_ptrs, &peer.kv_ptrs, &pairs)
            .ok_or_else(|| FailureReason::Slicing("a page address overflows".into()))?;
        let ops: Vec<CopyOp> = copies
            .into_iter()
            .map(|(src, dst, len)| CopyOp { src, dst, len })
            .collect();
        Ok(lower_explicit(
            &ops,
            l.kv_mem,
            l.gpu_id,
            l.kv_mem,
            peer.gpu_id.get(),
        ))
    }

    /// Where `slice` can be packed into whole decode pages: packing is on and we can gather (on
    /// GPU pools a staging buffer, so also a packing area of one slot; on host pools host
    /// packing areas), the slice fills the decode's token slots, and an area holds at least one
    /// page. `None`: the per-token path.
    pub(super) fn pack_area(&self, slice: &HeadSlice) -> Option<PackArea> {
        let l = &self.layout;
        if !slice.fills_decode_slots() || l.kv_item_lens.iter().any(|&i| i != slice.src_item) {
            return None;
        }
        let nb = l.kv_ptrs.len() as u64;
        let (area, per_page, gpu) = match l.kv_mem {
            // A piece fits the area as decode pages, and one gather launch as our pages (the
            // staging kernels' table holds one slot's worth of our pages).
            MemType::Vram if self.packing => (
                self.staging.as_ref()?.slot_bytes,
                slice.dst_item.max(slice.src_item).checked_mul(nb)?,
                true,
            ),
            // The CPU gathers any number of pages: a piece fills the area as decode pages.
            MemType::Dram => (self.host_area?, slice.dst_item.checked_mul(nb)?, false),
            _ => return None,
        };
        let per = u32::try_from(area / per_page.max(1))
            .ok()
            .filter(|&p| p > 0)?;
        Some(if gpu {
            PackArea::Gpu { per }
        } else {
            PackArea::Host { per }
        })
    }

    /// Lowers the KV pages of `c` as packed pieces of `area`'s size.
    pub(super) fn lower_packed(
        &self,
        slice: &HeadSlice,
        area: PackArea,
        peer: &Peer,
        c: &Chunk<'_>,
    ) -> Result<Work, FailureReason> {
        let per = area.per() as usize;
        let pieces = c
            .src
            .chunks(per)
            .zip(c.dst.chunks(per))
            .map(|(src, dst)| {
                Some(PackedPiece {
                    src: src.to_vec(),
                    copies: slice.packed_copies(&peer.kv_ptrs, dst)?,
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| FailureReason::Slicing("a page address overflows".into()))?;
        let l = &self.layout;
        Ok(Work::Packed {
            slice: slice.token_slice(),
            item: slice.dst_item,
            remote_mem: l.kv_mem,
            remote_gpu: peer.gpu_id.get(),
            pieces,
            area,
        })
    }
}
