//! SGLang's KVArgs: an engine rank's registered memory and its parallel layout, validated when
//! built.

use nixl_core::{MemRegion, MemType};

use crate::error::ArgsError;
use crate::proto::{Layout, TpPlace};

/// One engine rank's KV and aux buffers (already registered on the manager's agent by the
/// caller) and its parallel layout. Built with [`KvArgs::new`], which checks every buffer.
#[derive(Debug, Clone)]
pub struct KvArgs {
    kv: Vec<(MemRegion, u64)>,
    aux: Vec<(MemRegion, u64)>,
    engine_rank: u32,
    tp_size: u32,
    dp_size: u32,
    is_mla: bool,
    heads: Option<(u32, u32)>,
}

impl KvArgs {
    /// Args from `(region, item length)` pairs: KV buffers in SGLang's order (K of every layer,
    /// then V; one latent buffer per layer for MLA) with the bytes of one page each, and aux
    /// buffers (SGLang's `MetadataBuffers`, host memory) with the bytes of one row each.
    ///
    /// Refused: no KV or no aux buffer, an item length of zero or larger than its region, KV
    /// buffers of different memory kinds or devices, aux buffers outside host memory.
    pub fn new(
        kv: impl IntoIterator<Item = (MemRegion, u64)>,
        aux: impl IntoIterator<Item = (MemRegion, u64)>,
    ) -> Result<Self, ArgsError> {
        let kv: Vec<(MemRegion, u64)> = kv.into_iter().collect();
        let aux: Vec<(MemRegion, u64)> = aux.into_iter().collect();
        let first = kv.first().ok_or(ArgsError::NoKvBuffers)?.0;
        if aux.is_empty() {
            return Err(ArgsError::NoAuxBuffers);
        }
        for (kind, list) in [("KV", &kv), ("aux", &aux)] {
            for (index, &(region, item_len)) in list.iter().enumerate() {
                if item_len == 0 || item_len > region.len {
                    return Err(ArgsError::ItemLen {
                        kind,
                        index,
                        item_len,
                        len: region.len,
                    });
                }
            }
        }
        if !matches!(first.mem, MemType::Dram | MemType::Vram) {
            return Err(ArgsError::KvMemory { mem: first.mem });
        }
        if let Some((index, (r, _))) = kv
            .iter()
            .enumerate()
            .find(|(_, (r, _))| r.mem != first.mem || r.dev != first.dev)
        {
            return Err(ArgsError::MixedKv {
                index,
                mem: r.mem,
                dev: r.dev,
                first_mem: first.mem,
                first_dev: first.dev,
            });
        }
        if let Some((index, (r, _))) = aux
            .iter()
            .enumerate()
            .find(|(_, (r, _))| r.mem != MemType::Dram)
        {
            return Err(ArgsError::AuxNotHost { index, mem: r.mem });
        }
        Ok(Self {
            kv,
            aux,
            engine_rank: 0,
            tp_size: 1,
            dp_size: 1,
            is_mla: false,
            heads: None,
        })
    }

    /// Sets the engine rank (prefill: global TP rank; decode: rank inside its attention-TP
    /// group) and the server's TP and DP sizes. Refused: a zero size, a TP size that is not a
    /// multiple of the DP size, or a rank outside the TP size.
    pub fn parallel(
        mut self,
        engine_rank: u32,
        tp_size: u32,
        dp_size: u32,
    ) -> Result<Self, ArgsError> {
        if tp_size == 0
            || dp_size == 0
            || !tp_size.is_multiple_of(dp_size)
            || engine_rank >= tp_size
        {
            return Err(ArgsError::Parallel {
                engine_rank,
                tp_size,
                dp_size,
            });
        }
        self.engine_rank = engine_rank;
        self.tp_size = tp_size;
        self.dp_size = dp_size;
        Ok(self)
    }

    /// The KV heads per token of this rank and the tokens per page (SGLang's `kv_head_num` and
    /// `page_size`): a prefill given them slices heads for decodes of another TP size
    /// (docs/protocol.md §5.6). Zeros are taken as not given.
    #[must_use]
    pub fn heads(mut self, kv_heads: u32, page_tokens: u32) -> Self {
        self.heads = (kv_heads > 0 && page_tokens > 0).then_some((kv_heads, page_tokens));
        self
    }

    /// Marks the model as MLA (its latent cache is replicated across TP ranks).
    #[must_use]
    pub fn mla(mut self, is_mla: bool) -> Self {
        self.is_mla = is_mla;
        self
    }

    /// KV buffers with their page sizes.
    pub fn kv(&self) -> &[(MemRegion, u64)] {
        &self.kv
    }

    /// Aux buffers with their row sizes.
    pub fn aux(&self) -> &[(MemRegion, u64)] {
        &self.aux
    }

    /// The engine rank.
    pub fn engine_rank(&self) -> u32 {
        self.engine_rank
    }

    /// The server's TP size.
    pub fn tp_size(&self) -> u32 {
        self.tp_size
    }

    /// The server's DP size.
    pub fn dp_size(&self) -> u32 {
        self.dp_size
    }

    /// Whether the model is MLA.
    pub fn is_mla(&self) -> bool {
        self.is_mla
    }

    /// The GPU of the KV memory (CUDA ordinal; 0 for host memory).
    pub fn gpu_id(&self) -> u32 {
        let first = self.kv[0].0;
        if first.mem == MemType::Vram {
            u32::try_from(first.dev).unwrap_or(0)
        } else {
            0
        }
    }

    /// The layout the cores plan with: pages per pool (the smallest buffer decides) and rows.
    pub(crate) fn layout(&self) -> Layout {
        let count = |list: &[(MemRegion, u64)]| {
            let n = list.iter().map(|(r, i)| r.len / i).min().unwrap_or(0);
            u32::try_from(n).unwrap_or(u32::MAX)
        };
        Layout {
            kv_mem: self.kv[0].0.mem,
            kv_ptrs: self.kv.iter().map(|(r, _)| r.addr).collect(),
            kv_item_lens: self.kv.iter().map(|&(_, i)| i).collect(),
            kv_pages: count(&self.kv),
            aux_ptrs: self.aux.iter().map(|(r, _)| r.addr).collect(),
            aux_item_lens: self.aux.iter().map(|&(_, i)| i).collect(),
            aux_slots: count(&self.aux),
            gpu_id: self.gpu_id(),
            tp: TpPlace {
                tp: self.tp_size / self.dp_size.max(1),
                rank: self.engine_rank,
                is_mla: self.is_mla,
                heads: self.heads,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dram(addr: u64, len: u64) -> MemRegion {
        MemRegion::dram(addr, len)
    }

    #[test]
    fn valid_args_give_the_smallest_pool() {
        let a = KvArgs::new(
            [
                (dram(0x1000, 4096 * 10), 4096),
                (dram(0x10_0000, 4096 * 8), 4096),
            ],
            [(dram(0x20_0000, 64 * 4), 64)],
        )
        .unwrap()
        .parallel(1, 4, 2)
        .unwrap();
        let l = a.layout();
        assert_eq!((l.kv_pages, l.aux_slots, l.gpu_id), (8, 4, 0));
        assert_eq!(a.engine_rank(), 1);
    }

    #[test]
    fn bad_args_are_refused_at_construction() {
        let kv = || [(dram(0x1000, 4096), 4096)];
        let aux = || [(dram(0x9000, 64), 64)];
        assert_eq!(KvArgs::new([], aux()).unwrap_err(), ArgsError::NoKvBuffers);
        assert_eq!(KvArgs::new(kv(), []).unwrap_err(), ArgsError::NoAuxBuffers);
        assert!(matches!(
            KvArgs::new([(dram(0x1000, 100), 4096)], aux()),
            Err(ArgsError::ItemLen { kind: "KV", .. })
        ));
        assert!(matches!(
            KvArgs::new(kv(), [(dram(0x9000, 64), 0)]),
            Err(ArgsError::ItemLen { kind: "aux", .. })
        ));
        let vram = MemRegion {
            mem: MemType::Vram,
            ..dram(0x5000, 4096)
        };
        assert!(matches!(
            KvArgs::new([(dram(0x1000, 4096), 4096), (vram, 4096)], aux()),
            Err(ArgsError::MixedKv { index: 1, .. })
        ));
        assert!(matches!(
            KvArgs::new(kv(), [(vram, 64)]),
            Err(ArgsError::AuxNotHost { index: 0, .. })
        ));
        let a = KvArgs::new(kv(), aux()).unwrap();
        assert!(a.clone().parallel(4, 4, 1).is_err(), "rank outside TP");
        assert!(
            a.clone().parallel(0, 4, 3).is_err(),
            "TP not a multiple of DP"
        );
        assert!(a.parallel(0, 0, 1).is_err());
    }
}
