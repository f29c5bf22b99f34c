//! The raw half of [`crate::SharedHostBuffer`]: a host allocation shared by handles, read and
//! written only by byte copies through its raw pointer.

use std::alloc::Layout;

use super::HostAlloc;

/// A zeroed host allocation whose bytes are never borrowed: every access copies through the raw
/// pointer, so no Rust reference to its contents exists while NIXL peers (or other handles on
/// other threads) read and write them.
pub(crate) struct SharedAlloc {
    alloc: HostAlloc,
}

impl SharedAlloc {
    /// Allocates `layout` zeroed, of which the first `len` bytes are usable (see
    /// [`HostAlloc::zeroed`]).
    pub(crate) fn zeroed(layout: Layout, len: usize) -> Option<Self> {
        HostAlloc::zeroed(layout, len).map(|alloc| Self { alloc })
    }

    /// The start address.
    pub(crate) fn addr(&self) -> u64 {
        self.alloc.addr()
    }

    /// The usable length.
    pub(crate) fn len(&self) -> usize {
        self.alloc.len
    }

    /// Copies `out.len()` bytes from byte `offset` into `out`; `false` (and nothing copied) if the
    /// range leaves the allocation.
    pub(crate) fn read(&self, offset: usize, out: &mut [u8]) -> bool {
        if offset
            .checked_add(out.len())
            .is_none_or(|e| e > self.alloc.len)
        {
            return false;
        }
        // SAFETY: the range is inside the live allocation (checked above; the allocation lives
        // as long as self) and `out` is a distinct exclusive borrow (the allocation is never
        // handed out as a slice, so they cannot overlap). No reference to the allocation's bytes
        // is created: the copy reads them as a DMA engine would, and bytes that a peer or
        // another handle writes meanwhile come out as either value, as with a NIXL WRITE
        // landing during a read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.alloc.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        true
    }

    /// Copies `src` to byte `offset`; `false` (and nothing copied) if the range leaves the
    /// allocation.
    pub(crate) fn write(&self, offset: usize, src: &[u8]) -> bool {
        if offset
            .checked_add(src.len())
            .is_none_or(|e| e > self.alloc.len)
        {
            return false;
        }
        // SAFETY: as in `read`, with the roles swapped: the range is inside the live
        // allocation and `src` cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.alloc.ptr.as_ptr().add(offset),
                src.len(),
            );
        }
        true
    }

    /// Copies `len` bytes from byte `src_off` of `src` to byte `dst_off` (the two may be the
    /// same allocation, the ranges overlapping); `false` (and nothing copied) if either range
    /// leaves its allocation.
    pub(crate) fn copy_from(&self, dst_off: usize, src: &Self, src_off: usize, len: usize) -> bool {
        let inside = |off: usize, a: &Self| off.checked_add(len).is_some_and(|e| e <= a.alloc.len);
        if !inside(dst_off, self) || !inside(src_off, src) {
            return false;
        }
        // SAFETY: both ranges are inside live allocations (checked above; each lives as long
        // as its SharedAlloc, borrowed here). `ptr::copy` allows the ranges to overlap (the
        // same allocation). No reference to either allocation's bytes is created (see `read`).
        unsafe {
            std::ptr::copy(
                src.alloc.ptr.as_ptr().add(src_off),
                self.alloc.ptr.as_ptr().add(dst_off),
                len,
            );
        }
        true
    }
}

// SharedAlloc is Send + Sync through HostAlloc's impls: it exposes no slice, and the raw
// copies above need no exclusive access, so handles on any thread may use it at once.

// SAFETY: the allocation is owned by the Arc inside the buffer; it never moves or shrinks and
// is freed only when the last handle drops, so it outlives any registration made through one
// handle (Registered keeps that handle). `addr()`/`len()` are fixed at construction.
unsafe impl super::NixlBuffer for crate::SharedHostBuffer {
    fn region(&self) -> crate::MemRegion {
        crate::MemRegion::dram(self.addr(), self.len() as u64)
    }
}
