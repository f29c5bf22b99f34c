//! Lowering: a chunk's page pairs into the coordinates the driver posts, either indices into
//! descriptor lists prepared once, or explicit descriptors (the fallback). Pure arithmetic.
//!
//! A prepared list holds one descriptor per (buffer, page), buffer-major: entry `b·count + p` is
//! page `p` of buffer `b` (aux lists likewise, one row per entry). The core decides which lists
//! exist and with how many pages; the driver only hands them to NIXL.

use nixl_core::{MemType, XferDescs};
use nixl_wire::AgentName;

use super::plan::CopyOp;

/// KV pages or aux rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::exhaustive_enums)] // A prepared list covers one of the two pools.
pub enum ListKind {
    /// KV pages.
    Kv,
    /// Aux rows.
    Aux,
    /// Head slices: one entry per token slot of every page, `(buffer, page, token)` at entry
    /// `b·count + p·tokens + t` (heterogeneous TP's per-token descriptors, docs/protocol.md §5.6).
    Tokens,
}

/// Names a prepared descriptor list. A peer's list is re-prepared larger under a new
/// generation; the old one is released only after every request made from it was posted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ListId {
    /// Our own pool.
    Local(ListKind),
    /// Our own pool's head slices: `len` bytes at `offset` of every token slot.
    LocalTokens {
        /// Offset of the slice in a token slot.
        offset: u64,
        /// Bytes per token.
        len: u64,
    },
    /// A decode agent's pool.
    Peer {
        /// The agent.
        agent: AgentName,
        /// KV or aux.
        kind: ListKind,
        /// Which preparation.
        generation: u32,
    },
}

/// A list to prepare: its name, and its descriptors (buffer-major, `count` entries per buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSpec {
    /// The list's name.
    pub id: ListId,
    /// The descriptors.
    pub descs: XferDescs,
    /// Entries per buffer.
    pub count: u32,
}

/// Builds the per-entry list of `count` entries for each buffer.
pub fn list_spec(
    id: ListId,
    mem: MemType,
    ptrs: &[u64],
    items: &[u64],
    count: u32,
    dev: u32,
) -> ListSpec {
    let mut descs = XferDescs::with_capacity(mem, ptrs.len() * count as usize);
    for (p, item) in ptrs.iter().zip(items) {
        for i in 0..u64::from(count) {
            descs.push(p.wrapping_add(i.wrapping_mul(*item)), *item, u64::from(dev));
        }
    }
    ListSpec { id, descs, count }
}

/// The geometry of a [`ListKind::Tokens`] list: pages of `item` bytes holding `tokens` token
/// slots of `token` bytes, of which each entry takes `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenGeometry {
    /// Bytes of one page of one buffer.
    pub item: u64,
    /// Token slots per page.
    pub tokens: u32,
    /// Bytes of one token slot.
    pub token: u64,
    /// Offset of the slice in a token slot.
    pub offset: u64,
    /// Bytes per entry.
    pub len: u64,
}

/// Builds the token list of `pages` pages for each buffer (`pages · tokens` entries per buffer);
/// `None` when an address overflows.
pub fn token_list_spec(
    id: ListId,
    mem: MemType,
    ptrs: &[u64],
    g: TokenGeometry,
    pages: u32,
    dev: u32,
) -> Option<ListSpec> {
    let count = pages.checked_mul(g.tokens)?;
    let mut descs = XferDescs::with_capacity(mem, ptrs.len() * count as usize);
    for &base in ptrs {
        for p in 0..u64::from(pages) {
            let page = base.checked_add(p.checked_mul(g.item)?)?;
            for t in 0..u64::from(g.tokens) {
                let at = page.checked_add(t.checked_mul(g.token)?.checked_add(g.offset)?)?;
                descs.push(at, g.len, u64::from(dev));
            }
        }
    }
    Some(ListSpec { id, descs, count })
}

/// How one chunk moves, as the core lowered it; the driver has one executor per variant: a NIXL
/// WRITE (`Indexed`, `Explicit`), one kernel copy on our node (`Direct`), or a gather into a
/// packing area followed by WRITEs (`Packed`). Staged pieces go by [`Command::Stage`] instead,
/// as their slot bookkeeping reports back differently.
///
/// [`Command::Stage`]: super::prefill::Command::Stage
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Work {
    /// Indices into two prepared lists (the hot path).
    Indexed {
        /// Our list.
        local: ListId,
        /// The peer's list.
        remote: ListId,
        /// Entries of our list, in order.
        local_idx: Vec<i32>,
        /// Entries of the peer's list, paired with `local_idx`.
        remote_idx: Vec<i32>,
    },
    /// Explicit descriptors (one per contiguous run).
    Explicit {
        /// Ours.
        local: XferDescs,
        /// The peer's.
        remote: XferDescs,
    },
    /// The direct path (same node, docs/protocol.md §3.5): our pages copied by one kernel
    /// straight into the peer's mapped pool pages, pair by pair, then the notification sent.
    Direct {
        /// Our pages.
        src: Vec<u32>,
        /// The peer's pages, paired with `src`.
        dst: Vec<u32>,
        /// Heterogeneous TP: only this slice of every token slot (`None`: whole pages).
        slice: Option<nixl_core::staging::TokenSlice>,
    },
    /// The packed path (heterogeneous TP, a decode rank whose token slots our slices fill,
    /// docs/protocol.md §5.6): each piece's slices gathered by one kernel into our packing
    /// area as whole decode pages, then one NIXL WRITE of those pages, the pieces in order,
    /// the notification on the last one's WRITE.
    Packed {
        /// The slice of every token slot.
        slice: nixl_core::staging::TokenSlice,
        /// Bytes of one decode page of one buffer.
        item: u64,
        /// The peer's memory type and device.
        remote_mem: MemType,
        /// The peer's device id.
        remote_gpu: u32,
        /// The pieces, each at most one packing area.
        pieces: Vec<PackedPiece>,
        /// Which packer gathers them (the route chose it from our pools' memory).
        area: super::route::PackArea,
    },
}

/// One piece of a [`Work::Packed`] chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PackedPiece {
    /// Our pages, gathered in order into the packing area.
    pub src: Vec<u32>,
    /// The WRITE: (offset in the packing area, the peer's address, bytes).
    pub copies: Vec<(u64, u64, u64)>,
}

impl Work {
    /// Descriptors on each side.
    pub fn len(&self) -> usize {
        match self {
            Self::Indexed { local_idx, .. } => local_idx.len(),
            Self::Explicit { local, .. } => local.len(),
            Self::Direct { src, .. } => src.len(),
            Self::Packed { pieces, .. } => pieces.iter().map(|p| p.copies.len()).sum(),
        }
    }

    /// Whether nothing moves.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Index pairs for `buffers` buffers and the (our entry, their entry) pairs, buffer-major;
/// `None` when an index does not fit NIXL's `int` or an entry lies past a list.
pub fn lower_indexed(
    buffers: usize,
    local_count: u32,
    remote_count: u32,
    pairs: &[(u32, u32)],
) -> Option<(Vec<i32>, Vec<i32>)> {
    let mut li = Vec::with_capacity(buffers * pairs.len());
    let mut ri = Vec::with_capacity(buffers * pairs.len());
    for b in 0..buffers as u64 {
        for &(s, d) in pairs {
            if s >= local_count || d >= remote_count {
                return None;
            }
            let l = i32::try_from(b * u64::from(local_count) + u64::from(s)).ok()?;
            let r = i32::try_from(b * u64::from(remote_count) + u64::from(d)).ok()?;
            li.push(l);
            ri.push(r);
        }
    }
    Some((li, ri))
}

/// Explicit descriptors for `ops`, ours on `src_mem`/`src_dev` and theirs on `dst_mem`/`dst_dev`.
pub fn lower_explicit(
    ops: &[CopyOp],
    src_mem: MemType,
    src_dev: u32,
    dst_mem: MemType,
    dst_dev: u32,
) -> Work {
    let mut local = XferDescs::with_capacity(src_mem, ops.len());
    let mut remote = XferDescs::with_capacity(dst_mem, ops.len());
    for op in ops {
        local.push(op.src, op.len, u64::from(src_dev));
        remote.push(op.dst, op.len, u64::from(dst_dev));
    }
    Work::Explicit { local, remote }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexed_is_buffer_major_and_bounded() {
        let (l, r) = lower_indexed(2, 10, 20, &[(1, 5), (2, 19)]).unwrap();
        assert_eq!(l, vec![1, 2, 11, 12]);
        assert_eq!(r, vec![5, 19, 25, 39]);
        assert!(
            lower_indexed(1, 10, 20, &[(10, 0)]).is_none(),
            "past our list"
        );
        assert!(
            lower_indexed(1, 10, 20, &[(0, 20)]).is_none(),
            "past theirs"
        );
        assert!(
            lower_indexed(3, u32::MAX, u32::MAX, &[(0, u32::MAX - 1)]).is_none(),
            "past i32"
        );
    }

    #[test]
    fn list_entries_are_pages_of_each_buffer() {
        let s = list_spec(
            ListId::Local(ListKind::Kv),
            MemType::Dram,
            &[1000, 9000],
            &[10, 20],
            3,
            0,
        );
        let addrs: Vec<(u64, u64)> = s.descs.as_slice().iter().map(|d| (d.addr, d.len)).collect();
        assert_eq!(
            addrs,
            vec![
                (1000, 10),
                (1010, 10),
                (1020, 10),
                (9000, 20),
                (9020, 20),
                (9040, 20)
            ]
        );
    }
}
