//! Descriptor planning: which bytes go where for one chunk. Pure arithmetic, no IO.
//!
//! The KV plan is SGLang's `send_kvcache`: the chunk's prefill and decode page indices are split
//! into runs where *both* sides advance by exactly one page (`group_concurrent_contiguous`),
//! then, for every buffer in order and every run in order, one copy of `run_len` pages of that
//! buffer's item length. The aux plan copies one row per aux buffer.

/// A maximal stretch of pages contiguous on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First source page.
    pub src: u32,
    /// First destination page.
    pub dst: u32,
    /// Number of pages.
    pub len: u32,
}

/// SGLang's `group_concurrent_contiguous`: a run breaks before position k when
/// `src[k] - src[k-1] != 1` or `dst[k] - dst[k-1] != 1`. Appends to `out` (cleared first).
/// Both slices must have the same length (checked by the caller); extra elements are ignored.
pub fn group_runs(src: &[u32], dst: &[u32], out: &mut Vec<Run>) {
    out.clear();
    let n = src.len().min(dst.len());
    if n == 0 {
        return;
    }
    let mut cur = Run {
        src: src[0],
        dst: dst[0],
        len: 1,
    };
    for k in 1..n {
        let contiguous = i64::from(src[k]) - i64::from(src[k - 1]) == 1
            && i64::from(dst[k]) - i64::from(dst[k - 1]) == 1;
        if contiguous {
            cur.len += 1;
        } else {
            out.push(cur);
            cur = Run {
                src: src[k],
                dst: dst[k],
                len: 1,
            };
        }
    }
    out.push(cur);
}

/// One copy: `len` bytes from `src` to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CopyOp {
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

/// Appends the KV copies of one chunk to `out`: for every buffer `i`, for every run,
/// `src_ptrs[i] + run.src·item_lens[i] → dst_ptrs[i] + run.dst·item_lens[i]`, `run.len·item_lens[i]`
/// bytes. The prefill item length is applied to both sides, as in SGLang. Buffers beyond the
/// shortest of the three lists are not planned (the caller checks the layouts match).
pub fn plan_kv(
    src_ptrs: &[u64],
    dst_ptrs: &[u64],
    item_lens: &[u64],
    runs: &[Run],
    out: &mut Vec<CopyOp>,
) {
    let buffers = src_ptrs.len().min(dst_ptrs.len()).min(item_lens.len());
    out.reserve(buffers * runs.len());
    for i in 0..buffers {
        let item = item_lens[i];
        for r in runs {
            out.push(CopyOp {
                src: src_ptrs[i].wrapping_add(u64::from(r.src).wrapping_mul(item)),
                dst: dst_ptrs[i].wrapping_add(u64::from(r.dst).wrapping_mul(item)),
                len: u64::from(r.len).wrapping_mul(item),
            });
        }
    }
}

/// How many aux buffers the prefill copies to a decode that registered `decode_buffers`: every
/// buffer when both sides have the same number (same model, same `MetadataBuffers`), else only
/// buffer 0, as SGLang 0.5.1's prefill always does (docs/protocol.md §6).
pub fn aux_buffers(prefill_buffers: usize, decode_buffers: usize) -> usize {
    if prefill_buffers == decode_buffers {
        prefill_buffers
    } else {
        prefill_buffers.min(decode_buffers).min(1)
    }
}

/// Appends the aux copies: row `src_slot` of each aux buffer to row `dst_slot` of the peer's,
/// for the buffers [`aux_buffers`] allows. The prefill's item lengths apply to both sides.
pub fn plan_aux(
    src_ptrs: &[u64],
    dst_ptrs: &[u64],
    item_lens: &[u64],
    src_slot: u32,
    dst_slot: u32,
    out: &mut Vec<CopyOp>,
) {
    let buffers = aux_buffers(src_ptrs.len().min(item_lens.len()), dst_ptrs.len());
    for i in 0..buffers {
        let item = item_lens[i];
        out.push(CopyOp {
            src: src_ptrs[i].wrapping_add(u64::from(src_slot).wrapping_mul(item)),
            dst: dst_ptrs[i].wrapping_add(u64::from(dst_slot).wrapping_mul(item)),
            len: item,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglang_example() {
        // docs/protocol.md §7: src [3,4,5,9,10], dst [7,8,20,21,22] → [3,4],[5],[9,10] / [7,8],[20],[21,22].
        let mut runs = Vec::new();
        group_runs(&[3, 4, 5, 9, 10], &[7, 8, 20, 21, 22], &mut runs);
        assert_eq!(
            runs,
            vec![
                Run {
                    src: 3,
                    dst: 7,
                    len: 2
                },
                Run {
                    src: 5,
                    dst: 20,
                    len: 1
                },
                Run {
                    src: 9,
                    dst: 21,
                    len: 2
                }
            ]
        );
        group_runs(&[], &[], &mut runs);
        assert!(runs.is_empty());
        // Duplicates and descending order break runs.
        group_runs(&[1, 1, 0], &[5, 6, 7], &mut runs);
        assert_eq!(runs.len(), 3);
    }

    #[test]
    fn kv_plan_is_buffer_major_then_runs() {
        let runs = [
            Run {
                src: 1,
                dst: 10,
                len: 2,
            },
            Run {
                src: 5,
                dst: 3,
                len: 1,
            },
        ];
        let mut out = Vec::new();
        plan_kv(&[1000, 2000], &[50_000, 60_000], &[16, 32], &runs, &mut out);
        assert_eq!(
            out,
            vec![
                CopyOp {
                    src: 1016,
                    dst: 50_160,
                    len: 32
                },
                CopyOp {
                    src: 1080,
                    dst: 50_048,
                    len: 16
                },
                CopyOp {
                    src: 2032,
                    dst: 60_320,
                    len: 64
                },
                CopyOp {
                    src: 2160,
                    dst: 60_096,
                    len: 32
                },
            ]
        );
        // Six aux buffers on the prefill, one on the decode: only buffer 0 goes (SGLang 0.5.1).
        let mut aux = Vec::new();
        plan_aux(&[100, 200], &[900], &[64, 512], 2, 3, &mut aux);
        assert_eq!(
            aux,
            vec![CopyOp {
                src: 228,
                dst: 1092,
                len: 64
            }]
        );
        // The same count on both sides: every buffer, each with its own item length.
        aux.clear();
        plan_aux(&[100, 200], &[900, 5000], &[64, 512], 2, 3, &mut aux);
        assert_eq!(
            aux,
            vec![
                CopyOp {
                    src: 228,
                    dst: 1092,
                    len: 64
                },
                CopyOp {
                    src: 1224,
                    dst: 6536,
                    len: 512
                }
            ]
        );
        assert_eq!(aux_buffers(6, 3), 1);
        assert_eq!(aux_buffers(6, 0), 0);
        assert_eq!(aux_buffers(0, 0), 0);
    }
}
