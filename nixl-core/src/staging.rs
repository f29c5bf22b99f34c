//! The copy tables of the staged KV path: pure, checked on any machine.
//!
//! A KV pool is a set of buffers (one per layer for K and one for V in SGLang's MHA layout), each
//! an array of fixed-size items, one item per page. To move a request's pages between two GPUs
//! with one NIXL WRITE instead of one descriptor per page and buffer, the sender *gathers* the
//! pages of every buffer into a contiguous staging area, writes that area to the receiver's
//! staging area, and the receiver *scatters* it into its own pages (docs/runtime.md §12).
//!
//! [`StagingLayout`] describes one side's pools and validates them; [`StagingLayout::table`]
//! turns a chunk of page indices into the argument table of one kernel launch ([`CopyTable`]),
//! rejecting pages outside a pool; [`StagingLayout::chunks`] splits a request's pages into
//! chunks that fit a staging slot. The staged bytes are laid out buffer-major: for a chunk of
//! `n` pages, buffer `b`'s items come first in page order, at
//! `offset(b) = n × Σ item_len(b' < b)`, so two sides whose buffers have the same item lengths
//! agree on the layout whatever their page indices ([`StagingLayout::compatible`]). The GPU
//! kernels that consume the table (`kernels/staging.cu`) are launched by `cuda::Staging`
//! (feature `cuda`).

use crate::error::Error;

/// Bytes one block of a kernel launch copies at most: segments longer than this are split over
/// `blockIdx.y` (must equal `SLICE` in `kernels/staging.cu`).
pub const SLICE_BYTES: u64 = 65536;
/// Grid limit of `blockIdx.y`.
const MAX_SLICES: u64 = 65535;
/// Grid limit of `blockIdx.x`.
const MAX_SEGMENTS: u64 = (1 << 31) - 1;

/// One pool buffer: its base address, its length, and the length of one item (page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_structs)] // plain data by design
pub struct PoolBuffer {
    /// Base address (a device address for the GPU kernels).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Bytes per item: page `p` occupies `[addr + p × item_len, addr + (p + 1) × item_len)`.
    pub item_len: u64,
}

impl PoolBuffer {
    /// Number of whole items the buffer holds.
    pub fn items(&self) -> u64 {
        self.len / self.item_len.max(1)
    }
}

/// One side's pool buffers, validated: at least one buffer, non-zero item lengths no longer
/// than the buffer, no address overflow, and item lengths the kernel grid can cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingLayout {
    buffers: Vec<PoolBuffer>,
    bytes_per_page: u64,
}

impl StagingLayout {
    /// Validates `buffers`.
    pub fn new(buffers: Vec<PoolBuffer>) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidArgument {
            what: "staging pool buffers",
            reason,
        };
        if buffers.is_empty() {
            return Err(invalid("no buffers".into()));
        }
        if u32::try_from(buffers.len()).is_err() {
            return Err(invalid(format!("{} buffers", buffers.len())));
        }
        let mut bytes_per_page = 0u64;
        for (b, buf) in buffers.iter().enumerate() {
            if buf.item_len == 0 || buf.item_len > buf.len {
                return Err(invalid(format!(
                    "buffer {b}: item length {} in a {}-byte buffer",
                    buf.item_len, buf.len
                )));
            }
            if buf.item_len > SLICE_BYTES * MAX_SLICES {
                return Err(invalid(format!(
                    "buffer {b}: item length {} over {}",
                    buf.item_len,
                    SLICE_BYTES * MAX_SLICES
                )));
            }
            if buf.addr.checked_add(buf.len).is_none() {
                return Err(invalid(format!(
                    "buffer {b}: {} bytes at {:#x} overflow",
                    buf.len, buf.addr
                )));
            }
            bytes_per_page = bytes_per_page
                .checked_add(buf.item_len)
                .ok_or_else(|| invalid("bytes per page overflow".into()))?;
        }
        Ok(Self {
            buffers,
            bytes_per_page,
        })
    }

    /// The buffers.
    pub fn buffers(&self) -> &[PoolBuffer] {
        &self.buffers
    }

    /// Staged bytes per page: the sum of the item lengths.
    pub fn bytes_per_page(&self) -> u64 {
        self.bytes_per_page
    }

    /// Staged bytes of `pages` pages.
    pub fn staged_bytes(&self, pages: usize) -> u64 {
        self.bytes_per_page.saturating_mul(pages as u64)
    }

    /// How many pages fit in a staging slot of `slot_bytes` (0 if not even one).
    pub fn pages_per_slot(&self, slot_bytes: u64) -> usize {
        usize::try_from(slot_bytes / self.bytes_per_page).unwrap_or(usize::MAX)
    }

    /// Whether a peer's layout stages the same bytes at the same offsets: the same number of
    /// buffers with the same item lengths, in order.
    pub fn compatible(&self, other: &Self) -> bool {
        self.buffers.len() == other.buffers.len()
            && self
                .buffers
                .iter()
                .zip(&other.buffers)
                .all(|(a, b)| a.item_len == b.item_len)
    }

    /// Splits `pages` into chunks of at most as many pages as fit in `slot_bytes`; an error if
    /// not even one page fits.
    pub fn chunks<'a>(
        &self,
        pages: &'a [u32],
        slot_bytes: u64,
    ) -> Result<std::slice::Chunks<'a, u32>, Error> {
        let per = self.pages_per_slot(slot_bytes);
        if per == 0 {
            return Err(Error::InvalidArgument {
                what: "staging slot",
                reason: format!(
                    "{slot_bytes} bytes hold no page of {} bytes",
                    self.bytes_per_page
                ),
            });
        }
        Ok(pages.chunks(per))
    }

    /// The argument table of one launch moving `pages` of every buffer to or from a staging
    /// area of `slot_bytes`: every page must lie inside every buffer, and the chunk must fit.
    pub fn table(&self, pages: &[u32], slot_bytes: u64) -> Result<CopyTable, Error> {
        let invalid = |reason: String| Error::InvalidArgument {
            what: "staging pages",
            reason,
        };
        if pages.is_empty() {
            return Err(invalid("no pages".into()));
        }
        let np = u32::try_from(pages.len()).map_err(|_| invalid("too many pages".into()))?;
        let nb = self.buffers.len();
        let segments = nb as u64 * u64::from(np);
        if segments > MAX_SEGMENTS {
            return Err(invalid(format!(
                "{segments} segments in one launch (at most {MAX_SEGMENTS})"
            )));
        }
        let staged = self.staged_bytes(pages.len());
        if staged > slot_bytes {
            return Err(invalid(format!(
                "{} pages stage {staged} bytes, over the {slot_bytes}-byte slot",
                pages.len()
            )));
        }
        for (b, buf) in self.buffers.iter().enumerate() {
            let items = buf.items();
            if let Some(&p) = pages.iter().find(|&&p| u64::from(p) >= items) {
                return Err(invalid(format!(
                    "page {p} outside buffer {b} ({items} pages of {} bytes)",
                    buf.item_len
                )));
            }
        }
        let mut words = Vec::with_capacity(3 * nb + pages.len().div_ceil(2));
        words.extend(self.buffers.iter().map(|b| b.addr));
        words.extend(self.buffers.iter().map(|b| b.item_len));
        let mut off = 0u64;
        for b in &self.buffers {
            words.push(off);
            off += b.item_len * u64::from(np);
        }
        pack_pages(&mut words, pages);
        let max_item = self.buffers.iter().map(|b| b.item_len).max().unwrap_or(0);
        Ok(CopyTable {
            words,
            buffers: nb as u32,
            pages: np,
            staged,
            slices: u32::try_from(max_item.div_ceil(SLICE_BYTES)).unwrap_or(u32::MAX),
        })
    }
}

/// Appends `pages` as 32-bit indices, two per word (low half first), as the kernels read them.
fn pack_pages(words: &mut Vec<u64>, pages: &[u32]) {
    for pair in pages.chunks(2) {
        let lo = u64::from(pair[0]);
        let hi = pair.get(1).map_or(0, |&p| u64::from(p));
        words.push(lo | (hi << 32));
    }
}

/// Page `i` of a list packed by [`pack_pages`] starting at `words[0]`.
fn packed_page(words: &[u64], i: usize) -> u64 {
    let word = words[i / 2];
    if i.is_multiple_of(2) {
        word & 0xffff_ffff
    } else {
        word >> 32
    }
}

/// The argument table of one gather or scatter launch (see `kernels/staging.cu` for the word
/// layout), with the grid it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTable {
    words: Vec<u64>,
    buffers: u32,
    pages: u32,
    staged: u64,
    slices: u32,
}

impl CopyTable {
    /// The table's 64-bit words, as the kernel reads them.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of buffers.
    pub fn buffers(&self) -> u32 {
        self.buffers
    }

    /// Number of pages.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Bytes staged: the size of the contiguous staging range the launch reads or writes.
    pub fn staged_bytes(&self) -> u64 {
        self.staged
    }

    /// The launch grid: (segments = buffers × pages, slices per segment).
    pub fn grid(&self) -> (u32, u32) {
        (self.buffers * self.pages, self.slices.max(1))
    }

    /// Every copy the launch makes, as the kernel computes it from the table: (pool address,
    /// offset in the staging area, length). For tests and host-memory fallbacks.
    pub fn segments(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let nb = self.buffers as usize;
        let np = self.pages as usize;
        (0..nb * np).map(move |s| {
            let (b, i) = (s / np, s % np);
            let page = packed_page(&self.words[3 * nb..], i);
            let len = self.words[nb + b];
            (
                self.words[b] + page * len,
                self.words[2 * nb + b] + i as u64 * len,
                len,
            )
        })
    }
}

/// The argument table of one direct launch: pages of our pools copied straight into pages of
/// a peer's pools that this process has mapped (CUDA IPC, same node), with no staging area.
/// Words (see `kernels/staging.cu`): `nb` source bases, `nb` item lengths, `nb` destination
/// bases, then the `np` source pages and the `np` destination pages, two per word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectTable {
    words: Vec<u64>,
    buffers: u32,
    pages: u32,
    slices: u32,
}

impl StagingLayout {
    /// The table of one launch copying `src_pages` of our buffers into `dst_pages` of `dst`'s
    /// (pair by pair): both layouts must have the same item lengths, the lists the same length,
    /// and every page must lie inside every buffer of its side.
    pub fn direct_table(
        &self,
        src_pages: &[u32],
        dst: &Self,
        dst_pages: &[u32],
    ) -> Result<DirectTable, Error> {
        let invalid = |reason: String| Error::InvalidArgument {
            what: "direct copy pages",
            reason,
        };
        if !self.compatible(dst) {
            return Err(invalid(
                "the two pools differ in buffers or item lengths".into(),
            ));
        }
        let src = self.check_pairs(src_pages, dst, dst_pages)?;
        let nb = self.buffers.len();
        let mut words = Vec::with_capacity(3 * nb + src_pages.len() + 2);
        words.extend(self.buffers.iter().map(|b| b.addr));
        words.extend(self.buffers.iter().map(|b| b.item_len));
        words.extend(dst.buffers.iter().map(|b| b.addr));
        pack_pages(&mut words, src_pages);
        pack_pages(&mut words, dst_pages);
        Ok(DirectTable {
            words,
            buffers: src.buffers,
            pages: src.pages,
            slices: src.slices,
        })
    }
}

impl StagingLayout {
    /// The checks both direct tables share: as many buffers on both sides, lists of one
    /// length, every page inside every buffer of its side, the segment limit. Returns our
    /// side's gather table (for its counts and grid).
    fn check_pairs(
        &self,
        src_pages: &[u32],
        dst: &Self,
        dst_pages: &[u32],
    ) -> Result<CopyTable, Error> {
        let invalid = |reason: String| Error::InvalidArgument {
            what: "direct copy pages",
            reason,
        };
        if self.buffers.len() != dst.buffers.len() {
            return Err(invalid("the two pools differ in buffer count".into()));
        }
        if src_pages.len() != dst_pages.len() {
            return Err(invalid(format!(
                "{} source pages for {} destination pages",
                src_pages.len(),
                dst_pages.len()
            )));
        }
        let src = self.table(src_pages, u64::MAX)?;
        dst.table(dst_pages, u64::MAX)?;
        Ok(src)
    }
}

impl DirectTable {
    /// The table's 64-bit words, as the kernel reads them.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of buffers.
    pub fn buffers(&self) -> u32 {
        self.buffers
    }

    /// Number of page pairs.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// The launch grid: (segments = buffers × pages, slices per segment).
    pub fn grid(&self) -> (u32, u32) {
        (self.buffers * self.pages, self.slices.max(1))
    }

    /// Every copy the launch makes, as the kernel computes it: (source address, destination
    /// address, length).
    pub fn copies(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let nb = self.buffers as usize;
        let np = self.pages as usize;
        let page = move |list: usize, i: usize| {
            packed_page(&self.words[3 * nb + list * np.div_ceil(2)..], i)
        };
        (0..nb * np).map(move |s| {
            let (b, i) = (s / np, s % np);
            let len = self.words[nb + b];
            (
                self.words[b] + page(0, i) * len,
                self.words[2 * nb + b] + page(1, i) * len,
                len,
            )
        })
    }
}

/// Where one token's bytes go when pages are sliced by heads (heterogeneous TP): for every
/// token `t < tokens` of a page pair, `len` bytes from `src_offset + t·src_token` in the source
/// page to `dst_offset + t·dst_token` in the destination page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_structs)] // plain data by design
pub struct TokenSlice {
    /// Tokens per page.
    pub tokens: u32,
    /// Bytes of one source token slot.
    pub src_token: u64,
    /// Bytes of one destination token slot.
    pub dst_token: u64,
    /// Offset of the slice in a source token slot.
    pub src_offset: u64,
    /// Offset of the slice in a destination token slot.
    pub dst_offset: u64,
    /// Bytes per token.
    pub len: u64,
}

impl TokenSlice {
    /// Whether the slice fills whole destination pages of `item` bytes: it covers every byte of
    /// each destination token slot, and the page holds exactly `tokens` of them. Only such a
    /// slice can be packed into destination pages (a gap would carry stale bytes along).
    pub fn fills_pages(&self, item: u64) -> bool {
        self.dst_offset == 0
            && self.len == self.dst_token
            && self.dst_token.checked_mul(u64::from(self.tokens)) == Some(item)
    }
}

/// The argument table of one sliced direct launch (see `kernels/staging.cu`): `nb` source
/// bases, `nb` source item lengths, `nb` destination bases, `nb` destination item lengths,
/// then the source and destination pages, two per word; the slice goes as kernel arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicedTable {
    words: Vec<u64>,
    buffers: u32,
    pages: u32,
    slice: TokenSlice,
    slices: u32,
}

impl StagingLayout {
    /// The table of one launch copying `slice` of every token of `src_pages` of our buffers
    /// into `dst_pages` of `dst`'s (pair by pair): the same number of buffers, lists of one
    /// length, every page inside every buffer of its side, and the slice inside a token slot
    /// and the token slots inside an item on both sides.
    pub fn sliced_table(
        &self,
        src_pages: &[u32],
        dst: &Self,
        dst_pages: &[u32],
        slice: &TokenSlice,
    ) -> Result<SlicedTable, Error> {
        let invalid = |reason: String| Error::InvalidArgument {
            what: "sliced copy",
            reason,
        };
        let t = u64::from(slice.tokens);
        let fits = |token: u64, offset: u64, bufs: &[PoolBuffer]| {
            slice.len > 0
                && offset.checked_add(slice.len).is_some_and(|e| e <= token)
                && token
                    .checked_mul(t)
                    .is_some_and(|n| bufs.iter().all(|b| n <= b.item_len))
        };
        if slice.tokens == 0
            || !fits(slice.src_token, slice.src_offset, &self.buffers)
            || !fits(slice.dst_token, slice.dst_offset, &dst.buffers)
        {
            return Err(invalid(format!("{slice:?} does not fit the pages")));
        }
        let src = self.check_pairs(src_pages, dst, dst_pages)?;
        let nb = self.buffers.len();
        let mut words = Vec::with_capacity(4 * nb + src_pages.len() + 2);
        words.extend(self.buffers.iter().map(|b| b.addr));
        words.extend(self.buffers.iter().map(|b| b.item_len));
        words.extend(dst.buffers.iter().map(|b| b.addr));
        words.extend(dst.buffers.iter().map(|b| b.item_len));
        pack_pages(&mut words, src_pages);
        pack_pages(&mut words, dst_pages);
        let per_page = slice.len.saturating_mul(t);
        Ok(SlicedTable {
            words,
            buffers: src.buffers,
            pages: src.pages,
            slice: *slice,
            slices: u32::try_from(per_page.div_ceil(SLICE_BYTES).clamp(1, MAX_SLICES)).unwrap_or(1),
        })
    }
}

impl StagingLayout {
    /// A contiguous area at `base` seen as `buffers` pool buffers of `pages` pages of
    /// `item_len` bytes each, buffer-major: page `i` of buffer `b` at `base + (b·pages + i)·
    /// item_len`. The packed path gathers head slices into such an area (pages `0..pages`), so
    /// that every destination page is one contiguous run for its WRITE.
    pub fn packed(base: u64, buffers: usize, pages: usize, item_len: u64) -> Result<Self, Error> {
        let len = item_len.checked_mul(pages as u64);
        let total = len.and_then(|l| l.checked_mul(buffers as u64));
        let (Some(len), Some(_)) = (len, total) else {
            return Err(Error::InvalidArgument {
                what: "packed area",
                reason: format!("{buffers} buffers of {pages} pages of {item_len} bytes overflow"),
            });
        };
        let bufs = (0..buffers as u64)
            .map(|b| PoolBuffer {
                addr: base.wrapping_add(b.wrapping_mul(len)),
                len,
                item_len,
            })
            .collect();
        Self::new(bufs)
    }

    /// Bytes of the packed area of [`StagingLayout::packed`] for `pages` pages of `item_len`
    /// bytes in each of our buffers (`None` on overflow).
    pub fn packed_bytes(&self, pages: usize, item_len: u64) -> Option<u64> {
        item_len
            .checked_mul(pages as u64)?
            .checked_mul(self.buffers.len() as u64)
    }
}

impl SlicedTable {
    /// The table's 64-bit words, as the kernel reads them.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of buffers.
    pub fn buffers(&self) -> u32 {
        self.buffers
    }

    /// Number of page pairs.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// The slice.
    pub fn slice(&self) -> &TokenSlice {
        &self.slice
    }

    /// The launch grid: (segments = buffers × pages, blocks per segment).
    pub fn grid(&self) -> (u32, u32) {
        (self.buffers * self.pages, self.slices.max(1))
    }

    /// Every copy the launch makes, as the kernel computes it: (source, destination, length),
    /// one per token of every page pair of every buffer.
    pub fn copies(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let nb = self.buffers as usize;
        let np = self.pages as usize;
        let page = move |list: usize, i: usize| {
            packed_page(&self.words[4 * nb + list * np.div_ceil(2)..], i)
        };
        let s = self.slice;
        (0..nb * np * s.tokens as usize).map(move |k| {
            let (seg, t) = (k / s.tokens as usize, (k % s.tokens as usize) as u64);
            let (b, i) = (seg / np, seg % np);
            (
                self.words[b] + page(0, i) * self.words[nb + b] + s.src_offset + t * s.src_token,
                self.words[2 * nb + b]
                    + page(1, i) * self.words[3 * nb + b]
                    + s.dst_offset
                    + t * s.dst_token,
                s.len,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_fills_pages_only_when_it_covers_every_byte_of_every_destination_slot() {
        let whole = TokenSlice {
            tokens: 4,
            src_token: 512,
            dst_token: 256,
            src_offset: 256,
            dst_offset: 0,
            len: 256,
        };
        assert!(whole.fills_pages(1024));
        assert!(!whole.fills_pages(2048), "pages longer than the tokens");
        assert!(
            !TokenSlice {
                dst_offset: 128,
                ..whole
            }
            .fills_pages(1024)
        );
        assert!(!TokenSlice { len: 128, ..whole }.fills_pages(1024));
        assert!(
            !TokenSlice {
                tokens: u32::MAX,
                dst_token: u64::MAX,
                len: u64::MAX,
                ..whole
            }
            .fills_pages(1024)
        );
    }

    fn layout(lens: &[u64], pages: u64) -> StagingLayout {
        let buffers = lens
            .iter()
            .enumerate()
            .map(|(b, &l)| PoolBuffer {
                addr: 0x1000_0000 * (b as u64 + 1),
                len: l * pages,
                item_len: l,
            })
            .collect();
        StagingLayout::new(buffers).unwrap()
    }

    /// Runs a table's segments over host byte arrays, as the kernel does on the GPU.
    fn gather_on_host(t: &CopyTable, pools: &[Vec<u8>], l: &StagingLayout) -> Vec<u8> {
        let mut staged = vec![0u8; t.staged_bytes() as usize];
        for (addr, off, len) in t.segments() {
            let b = l
                .buffers()
                .iter()
                .position(|x| x.addr <= addr && addr < x.addr + x.len);
            let b = b.unwrap();
            let from = (addr - l.buffers()[b].addr) as usize;
            staged[off as usize..(off + len) as usize]
                .copy_from_slice(&pools[b][from..from + len as usize]);
        }
        staged
    }

    #[test]
    fn the_table_lays_out_bases_lengths_offsets_and_packed_pages() {
        let l = layout(&[32, 48], 10);
        let t = l.table(&[3, 7, 1], 1 << 20).unwrap();
        let w = t.words();
        assert_eq!(&w[..2], &[0x1000_0000, 0x2000_0000]);
        assert_eq!(&w[2..4], &[32, 48]);
        assert_eq!(&w[4..6], &[0, 3 * 32]);
        assert_eq!(w[6], 3 | (7 << 32));
        assert_eq!(w[7], 1);
        assert_eq!(t.staged_bytes(), 3 * (32 + 48));
        assert_eq!(t.grid(), (6, 1));
    }

    #[test]
    fn segments_cover_the_staging_area_exactly_once() {
        let l = layout(&[16, 5, 4096, 70_000], 9);
        let pages = [8, 0, 4, 4, 2];
        let t = l.table(&pages, u64::MAX).unwrap();
        let mut covered = vec![0u8; t.staged_bytes() as usize];
        for (_, off, len) in t.segments() {
            for c in &mut covered[off as usize..(off + len) as usize] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
        assert_eq!(
            t.grid(),
            (20, 2),
            "70 000-byte items need two 64 KiB slices"
        );
    }

    #[test]
    fn gather_then_scatter_with_other_pages_moves_every_byte() {
        // Odd item lengths (not multiples of 16) included.
        let lens = [32u64, 13, 1, 4099];
        let (src_l, dst_l) = (layout(&lens, 12), layout(&lens, 20));
        assert!(src_l.compatible(&dst_l));
        let pools: Vec<Vec<u8>> = src_l
            .buffers()
            .iter()
            .enumerate()
            .map(|(b, x)| (0..x.len).map(|i| (i as u8) ^ (b as u8 * 37)).collect())
            .collect();
        let (src_pages, dst_pages) = ([11u32, 0, 5], [19u32, 2, 7]);
        let staged = gather_on_host(&src_l.table(&src_pages, 1 << 20).unwrap(), &pools, &src_l);
        let mut out: Vec<Vec<u8>> = dst_l
            .buffers()
            .iter()
            .map(|x| vec![0; x.len as usize])
            .collect();
        let t = dst_l.table(&dst_pages, 1 << 20).unwrap();
        for (addr, off, len) in t.segments() {
            let b = dst_l
                .buffers()
                .iter()
                .position(|x| x.addr <= addr && addr < x.addr + x.len);
            let b = b.unwrap();
            let at = (addr - dst_l.buffers()[b].addr) as usize;
            out[b][at..at + len as usize]
                .copy_from_slice(&staged[off as usize..(off + len) as usize]);
        }
        for (b, &len) in lens.iter().enumerate() {
            for (s, d) in src_pages.iter().zip(dst_pages) {
                let (s, d, len) = (*s as usize, d as usize, len as usize);
                assert_eq!(
                    out[b][d * len..(d + 1) * len],
                    pools[b][s * len..(s + 1) * len]
                );
            }
        }
    }

    #[test]
    fn pages_outside_a_pool_and_oversized_chunks_are_rejected() {
        let l = layout(&[32, 64], 10);
        assert!(l.table(&[9], 1 << 20).is_ok());
        assert!(matches!(
            l.table(&[10], 1 << 20),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(l.table(&[], 1 << 20).is_err());
        assert!(l.table(&[1, 2], 96 * 2).is_ok());
        assert!(l.table(&[1, 2, 3], 96 * 2).is_err());
        // A shorter second buffer bounds the pages of all.
        let short = StagingLayout::new(vec![
            PoolBuffer {
                addr: 0,
                len: 320,
                item_len: 32,
            },
            PoolBuffer {
                addr: 4096,
                len: 64 * 3,
                item_len: 64,
            },
        ])
        .unwrap();
        assert!(short.table(&[2], 1 << 20).is_ok());
        assert!(short.table(&[3], 1 << 20).is_err());
    }

    #[test]
    fn invalid_buffers_are_rejected() {
        let ok = PoolBuffer {
            addr: 0,
            len: 64,
            item_len: 32,
        };
        assert!(StagingLayout::new(vec![]).is_err());
        assert!(StagingLayout::new(vec![PoolBuffer { item_len: 0, ..ok }]).is_err());
        assert!(StagingLayout::new(vec![PoolBuffer { item_len: 65, ..ok }]).is_err());
        assert!(
            StagingLayout::new(vec![PoolBuffer {
                addr: u64::MAX,
                ..ok
            }])
            .is_err()
        );
        assert!(StagingLayout::new(vec![ok]).is_ok());
    }

    #[test]
    fn chunks_fit_the_slot() {
        let l = layout(&[32768; 64], 600);
        assert_eq!(l.bytes_per_page(), 2 << 20);
        let pages: Vec<u32> = (0..100).collect();
        let sizes: Vec<usize> = l
            .chunks(&pages, 64 << 20)
            .unwrap()
            .map(<[u32]>::len)
            .collect();
        assert_eq!(sizes, [32, 32, 32, 4]);
        for c in l.chunks(&pages, 64 << 20).unwrap() {
            assert!(l.table(c, 64 << 20).is_ok());
        }
        assert!(l.chunks(&pages, (2 << 20) - 1).is_err());
        assert!(!l.compatible(&layout(&[32768; 63], 600)));
        assert!(!l.compatible(&layout(&[16384; 64], 600)));
    }

    #[test]
    fn a_direct_table_pairs_source_and_destination_pages_and_checks_both_sides() {
        let src = layout(&[32, 48], 10);
        let dst = StagingLayout::new(
            [32u64, 48]
                .iter()
                .enumerate()
                .map(|(b, &l)| PoolBuffer {
                    addr: 0x9000_0000 + 0x100_0000 * b as u64,
                    len: l * 4,
                    item_len: l,
                })
                .collect(),
        )
        .unwrap();
        let t = src.direct_table(&[3, 7, 1], &dst, &[0, 2, 3]).unwrap();
        let copies: Vec<_> = t.copies().collect();
        assert_eq!(t.grid(), (6, 1));
        assert_eq!(copies[0], (0x1000_0000 + 3 * 32, 0x9000_0000, 32));
        assert_eq!(copies[2], (0x1000_0000 + 32, 0x9000_0000 + 3 * 32, 32));
        assert_eq!(copies[4], (0x2000_0000 + 7 * 48, 0x9100_0000 + 2 * 48, 48));
        // A destination page past the peer's pool, unequal lists, other item lengths: refused.
        assert!(src.direct_table(&[3], &dst, &[4]).is_err());
        assert!(src.direct_table(&[3, 1], &dst, &[0]).is_err());
        assert!(
            src.direct_table(&[3], &layout(&[32, 40], 10), &[0])
                .is_err()
        );
    }

    #[test]
    fn a_sliced_table_copies_each_token_slice_and_checks_that_it_fits() {
        // Prefill pages of 4 tokens × 4 heads × 16 bytes; decode pages of 4 tokens × 2 heads.
        let src = layout(&[256, 256], 8);
        let dst = StagingLayout::new(
            (0..2u64)
                .map(|b| PoolBuffer {
                    addr: 0x9000_0000 + 0x100_0000 * b,
                    len: 128 * 4,
                    item_len: 128,
                })
                .collect(),
        )
        .unwrap();
        let slice = TokenSlice {
            tokens: 4,
            src_token: 64,
            dst_token: 32,
            src_offset: 32,
            dst_offset: 0,
            len: 32,
        };
        let t = src.sliced_table(&[5, 2], &dst, &[3, 0], &slice).unwrap();
        let c: Vec<_> = t.copies().collect();
        assert_eq!(c.len(), 2 * 2 * 4);
        assert_eq!(
            c[0],
            (0x1000_0000 + 5 * 256 + 32, 0x9000_0000 + 3 * 128, 32)
        );
        assert_eq!(
            c[1],
            (
                0x1000_0000 + 5 * 256 + 32 + 64,
                0x9000_0000 + 3 * 128 + 32,
                32
            )
        );
        assert_eq!(c[4].1, 0x9000_0000);
        assert_eq!(c[8].0, 0x2000_0000 + 5 * 256 + 32);
        // A slice past its token slot, tokens past the page, a page past the peer's pool.
        let past = TokenSlice {
            src_offset: 48,
            ..slice
        };
        assert!(src.sliced_table(&[5], &dst, &[3], &past).is_err());
        let long = TokenSlice { tokens: 5, ..slice };
        assert!(src.sliced_table(&[5], &dst, &[3], &long).is_err());
        assert!(src.sliced_table(&[5], &dst, &[4], &slice).is_err());
    }

    #[test]
    fn a_packed_area_holds_each_decode_page_contiguously_buffer_major() {
        // Two buffers of pages of 4 tokens × 4 heads × 16 bytes; the packed pages hold 2 heads.
        let src = layout(&[256, 256], 8);
        assert_eq!(src.packed_bytes(3, 128), Some(2 * 3 * 128));
        let area = StagingLayout::packed(0x7000_0000, 2, 3, 128).unwrap();
        let slice = TokenSlice {
            tokens: 4,
            src_token: 64,
            dst_token: 32,
            src_offset: 32,
            dst_offset: 0,
            len: 32,
        };
        let t = src
            .sliced_table(&[5, 2, 7], &area, &[0, 1, 2], &slice)
            .unwrap();
        // Every byte of the area written exactly once, page i of buffer b at (b·3 + i)·128.
        let mut covered = vec![0u8; 2 * 3 * 128];
        for (s, d, len) in t.copies() {
            let off = (d - 0x7000_0000) as usize;
            let (b, i) = (off / (3 * 128), off % (3 * 128) / 128);
            let page = [5u64, 2, 7][i];
            let token = (off % 128 / 32) as u64;
            assert_eq!(
                s,
                0x1000_0000 * (b as u64 + 1) + page * 256 + token * 64 + 32
            );
            for c in &mut covered[off..off + len as usize] {
                *c += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
        assert!(StagingLayout::packed(u64::MAX - 10, 2, 3, 128).is_err());
        assert!(StagingLayout::packed(0, 2, usize::MAX, 128).is_err());
        assert!(src.packed_bytes(usize::MAX, 128).is_none());
    }
}
