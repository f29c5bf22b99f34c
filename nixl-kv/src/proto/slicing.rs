//! Heterogeneous tensor parallelism for non-MLA models: which KV heads a prefill rank writes
//! into a decode rank whose TP size differs, and the byte arithmetic (docs/protocol.md §5.6).
//!
//! A prefill rank of TP size `P` holds `H` KV heads per token; a decode rank of TP size `D`
//! holds `Hd = H·P/D`. Every token slot of a page is `heads × bytes_per_head` bytes, heads in
//! order. With `P > D` several prefill ranks feed one decode rank, each its `H` heads at its
//! place among the decode rank's; with `P < D` one prefill rank feeds several decode ranks, each
//! the `Hd` heads it owns. Pure: no IO; the result is a [`HeadSlice`] or a [`SliceError`].
//!
//! SGLang (from 0.5.2) places a prefill rank's heads at `(rank mod P)·H` when `P > D`, which is
//! right only for the first decode rank's group (for `P = 4, D = 2` ranks 2 and 3 would land past
//! the token slot). We place them at `(rank mod (P/D))·H`, where the decode rank expects them; the
//! wire is unchanged (the decode side is passive).

use std::fmt;

/// The two sides of one sliced transfer, as the prefill rank sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SliceParams {
    /// The prefill's attention TP size `P`.
    pub prefill_tp: u32,
    /// The decode's attention TP size `D` (a 12-frame registration's frame 10).
    pub decode_tp: u32,
    /// This prefill rank's engine rank (its place is `rank mod P`).
    pub prefill_rank: u32,
    /// The decode's TP rank (frame 11; its place is `rank mod D`).
    pub decode_rank: u32,
    /// KV heads per token on this prefill rank, `H`.
    pub kv_heads: u32,
    /// Tokens per page, `S`.
    pub page_tokens: u32,
    /// Bytes of one page of one prefill KV buffer (`kv_item_lens[0]`).
    pub src_item: u64,
    /// Bytes of one page of one decode KV buffer (frame 12).
    pub dst_item: u64,
}

/// Where one token's heads go between a prefill rank and a decode rank: the slice of every token
/// slot ([`TokenSlice`], the one geometry the kernels and the staged notices carry too) and the
/// page lengths on both sides.
///
/// [`TokenSlice`]: nixl_core::staging::TokenSlice
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeadSlice {
    /// `len` bytes from `src_offset` in each prefill token slot (of `src_token` bytes) to
    /// `dst_offset` in the decode's (of `dst_token`), for each of `tokens` tokens per page.
    pub slice: nixl_core::staging::TokenSlice,
    /// Bytes of one page of one prefill buffer.
    pub src_item: u64,
    /// Bytes of one page of one decode buffer.
    pub dst_item: u64,
}

/// Why two ranks cannot exchange sliced pages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SliceError {
    /// A size that must be positive is zero.
    Zero(&'static str),
    /// The larger TP size is not a multiple of the smaller one.
    Ratio {
        /// `P`.
        prefill_tp: u32,
        /// `D`.
        decode_tp: u32,
    },
    /// A page does not split into whole token slots, or a token slot into whole heads.
    Split {
        /// What does not split.
        what: &'static str,
        /// Its bytes.
        bytes: u64,
        /// Into how many parts.
        parts: u64,
    },
    /// The prefill's heads are not the size of the decode's.
    HeadBytes {
        /// Bytes per head on the prefill (`src_item / S / H`).
        prefill: u64,
        /// Bytes per head on the decode (`dst_item / S / Hd`).
        decode: u64,
    },
    /// This prefill rank holds none of the decode rank's heads.
    NotPaired {
        /// The prefill rank's place.
        prefill: u32,
        /// The decode rank's place.
        decode: u32,
    },
}

impl fmt::Display for SliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero(what) => write!(f, "{what} is zero"),
            Self::Ratio {
                prefill_tp,
                decode_tp,
            } => write!(
                f,
                "prefill TP {prefill_tp} and decode TP {decode_tp}: neither divides the other"
            ),
            Self::Split { what, bytes, parts } => {
                write!(
                    f,
                    "{what} of {bytes} bytes does not split into {parts} parts"
                )
            }
            Self::HeadBytes { prefill, decode } => write!(
                f,
                "heads of {prefill} bytes on the prefill and {decode} on the decode"
            ),
            Self::NotPaired { prefill, decode } => write!(
                f,
                "prefill rank {prefill} holds none of decode rank {decode}'s heads"
            ),
        }
    }
}

impl std::error::Error for SliceError {}

fn split(what: &'static str, bytes: u64, parts: u64) -> Result<u64, SliceError> {
    if parts == 0 || !bytes.is_multiple_of(parts) {
        return Err(SliceError::Split { what, bytes, parts });
    }
    Ok(bytes / parts)
}

impl HeadSlice {
    /// The slice prefill rank `p.prefill_rank` writes into decode rank `p.decode_rank`, checked:
    /// every size positive, one TP size a multiple of the other, pages of whole token slots,
    /// token slots of whole heads of one size on both sides, and the two ranks paired (the
    /// prefill rank holds heads the decode rank owns).
    pub fn new(p: &SliceParams) -> Result<Self, SliceError> {
        for (v, what) in [
            (p.prefill_tp, "the prefill TP size"),
            (p.decode_tp, "the decode TP size"),
            (p.kv_heads, "the KV head count"),
            (p.page_tokens, "the page size"),
        ] {
            if v == 0 {
                return Err(SliceError::Zero(what));
            }
        }
        let (pt, dt) = (u64::from(p.prefill_tp), u64::from(p.decode_tp));
        if !pt.is_multiple_of(dt) && !dt.is_multiple_of(pt) {
            return Err(SliceError::Ratio {
                prefill_tp: p.prefill_tp,
                decode_tp: p.decode_tp,
            });
        }
        let h = u64::from(p.kv_heads);
        let hd = split("H·P heads", h * pt, dt)?;
        let tokens = u64::from(p.page_tokens);
        let src_token = split("a prefill page", p.src_item, tokens)?;
        let dst_token = split("a decode page", p.dst_item, tokens)?;
        let head = split("a decode token slot", dst_token, hd)?;
        let src_head = split("a prefill token slot", src_token, h)?;
        if src_head != head {
            return Err(SliceError::HeadBytes {
                prefill: src_head,
                decode: head,
            });
        }
        let (rp, rd) = (p.prefill_rank % p.prefill_tp, p.decode_rank % p.decode_tp);
        let not_paired = SliceError::NotPaired {
            prefill: rp,
            decode: rd,
        };
        let (src_head_at, dst_head_at, count) = if pt >= dt {
            // P/D prefill ranks per decode rank; ours is the (rp mod P/D)-th of decode rank
            // rp / (P/D).
            let group = pt / dt;
            if u64::from(rp) / group != u64::from(rd) {
                return Err(not_paired);
            }
            (0, (u64::from(rp) % group) * h, h)
        } else {
            // D/P decode ranks per prefill rank; decode rank rd is fed by rank rd / (D/P).
            let group = dt / pt;
            if u64::from(rd) / group != u64::from(rp) {
                return Err(not_paired);
            }
            ((u64::from(rd) * hd) % h, 0, hd)
        };
        Ok(Self {
            slice: nixl_core::staging::TokenSlice {
                tokens: p.page_tokens,
                src_token,
                dst_token,
                src_offset: src_head_at * head,
                dst_offset: dst_head_at * head,
                len: count * head,
            },
            src_item: p.src_item,
            dst_item: p.dst_item,
        })
    }

    /// The per-token slice, as the direct path's kernel takes it.
    pub fn token_slice(&self) -> nixl_core::staging::TokenSlice {
        self.slice
    }

    /// Whether the slice fills the decode's token slots: this prefill rank holds every head a
    /// decode rank owns (`P < D`), so whole decode pages can be packed and written as pages.
    pub fn fills_decode_slots(&self) -> bool {
        self.token_slice().fills_pages(self.dst_item)
    }

    /// The packed path's WRITE of `dst_pages` pages (in order) for `buffers` buffers: the
    /// slices were gathered into an area packed buffer-major (page `i` of buffer `b` at
    /// `(b·n + i)·dst_item`); each yields `(area offset, decode address, dst_item)`, merged where
    /// a page continues the previous one on both sides. `None` if an address overflows.
    pub fn packed_copies(&self, dst: &[u64], dst_pages: &[u32]) -> Option<Vec<(u64, u64, u64)>> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        let n = dst_pages.len() as u64;
        for (b, &db) in dst.iter().enumerate() {
            for (i, &dp) in dst_pages.iter().enumerate() {
                let off = (b as u64)
                    .checked_mul(n)?
                    .checked_add(i as u64)?
                    .checked_mul(self.dst_item)?;
                let d = db.checked_add(u64::from(dp).checked_mul(self.dst_item)?)?;
                match out.last_mut() {
                    Some(last)
                        if last.0 + last.2 == off && last.1.checked_add(last.2) == Some(d) =>
                    {
                        last.2 += self.dst_item;
                    }
                    _ => out.push((off, d, self.dst_item)),
                }
            }
        }
        Some(out)
    }

    /// The copies of a chunk: for every buffer (prefill base `src[b]`, decode base `dst[b]`),
    /// every page pair `(prefill page, decode page)` and every token, `(src, dst, len)`;
    /// copies that continue the previous one on both sides are merged (whole-token slices of
    /// adjacent pages become one copy). `None` if an address overflows.
    pub fn copies(
        &self,
        src: &[u64],
        dst: &[u64],
        pages: &[(u32, u32)],
    ) -> Option<Vec<(u64, u64, u64)>> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for (&sb, &db) in src.iter().zip(dst) {
            for &(sp, dp) in pages {
                let s_page = sb.checked_add(u64::from(sp).checked_mul(self.src_item)?)?;
                let d_page = db.checked_add(u64::from(dp).checked_mul(self.dst_item)?)?;
                for t in 0..u64::from(self.slice.tokens) {
                    let s = s_page.checked_add(t * self.slice.src_token + self.slice.src_offset)?;
                    let d = d_page.checked_add(t * self.slice.dst_token + self.slice.dst_offset)?;
                    match out.last_mut() {
                        Some(last)
                            if last.0.checked_add(last.2) == Some(s)
                                && last.1.checked_add(last.2) == Some(d) =>
                        {
                            last.2 += self.slice.len;
                        }
                        _ => out.push((s, d, self.slice.len)),
                    }
                }
            }
        }
        Some(out)
    }
}

/// The prefill ranks (places `0..P`) decode rank `decode_rank` of TP size `decode_tp` reads
/// from: `P/D` of them when `P > D`, else the one holding its heads; empty if neither TP size
/// divides the other.
pub fn sources(prefill_tp: u32, decode_tp: u32, decode_rank: u32) -> Vec<u32> {
    if prefill_tp == 0 || decode_tp == 0 {
        return Vec::new();
    }
    let d = decode_rank % decode_tp;
    if prefill_tp.is_multiple_of(decode_tp) {
        let group = prefill_tp / decode_tp;
        (d * group..(d + 1) * group).collect()
    } else if decode_tp.is_multiple_of(prefill_tp) {
        vec![d / (decode_tp / prefill_tp)]
    } else {
        Vec::new()
    }
}

/// A token slice as a staged notice carries it (nixl-wire cannot name nixl-core's type).
pub fn notice_slice(t: &nixl_core::staging::TokenSlice) -> nixl_wire::ext::StagedSlice {
    nixl_wire::ext::StagedSlice {
        tokens: t.tokens,
        src_token: t.src_token,
        dst_token: t.dst_token,
        src_offset: t.src_offset,
        dst_offset: t.dst_offset,
        len: t.len,
    }
}

/// The token slice a staged notice carries, for the scatter kernel's table.
pub fn token_slice_of(t: &nixl_wire::ext::StagedSlice) -> nixl_core::staging::TokenSlice {
    nixl_core::staging::TokenSlice {
        tokens: t.tokens,
        src_token: t.src_token,
        dst_token: t.dst_token,
        src_offset: t.src_offset,
        dst_offset: t.dst_offset,
        len: t.len,
    }
}

#[cfg(test)]
mod tests;
