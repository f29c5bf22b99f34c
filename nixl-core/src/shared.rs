//! Host memory shared between an engine and the transfer code that reads it.

use std::sync::Arc;

use crate::error::Error;
use crate::mem::{MemRegion, host_layout};
use crate::sys::shared::SharedAlloc;

/// A zero-initialised, page-aligned host allocation that several handles share, read and written
/// only by copies ([`SharedHostBuffer::read_at`], [`SharedHostBuffer::write_at`]).
///
/// This is host KV memory as an engine and its transfer manager both see it: the engine writes
/// pages while a prefill manager gathers head slices out of other pages on its own thread
/// (nixl-kv's host packing), and NIXL peers write into it once it is registered. No slice of it
/// is ever handed out, so those accesses never alias a Rust reference; a byte written while
/// another handle reads it comes out as either value, as with a NIXL WRITE landing during a
/// read. Cloning makes another handle to the same bytes; the memory is freed with the last one.
#[derive(Clone)]
pub struct SharedHostBuffer {
    alloc: Arc<SharedAlloc>,
}

impl SharedHostBuffer {
    /// Allocates `len` zeroed bytes aligned to 4096 (a zero length allocates one page).
    pub fn new(len: usize) -> Result<Self, Error> {
        let layout = host_layout(len)?;
        let alloc = SharedAlloc::zeroed(layout, len).ok_or_else(|| Error::OutOfMemory {
            bytes: layout.size(),
        })?;
        Ok(Self {
            alloc: Arc::new(alloc),
        })
    }

    /// The number of usable bytes.
    pub fn len(&self) -> usize {
        self.alloc.len()
    }

    /// Whether the buffer has no usable bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The start address, as NIXL descriptors take it.
    pub fn addr(&self) -> u64 {
        self.alloc.addr()
    }

    /// The buffer as a host region.
    pub fn region(&self) -> MemRegion {
        MemRegion::dram(self.addr(), self.len() as u64)
    }

    /// Copies `out.len()` bytes from byte `offset` into `out`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), Error> {
        if self.alloc.read(offset, out) {
            Ok(())
        } else {
            Err(self.range_error(offset, out.len()))
        }
    }

    /// Copies `src` to byte `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), Error> {
        if self.alloc.write(offset, src) {
            Ok(())
        } else {
            Err(self.range_error(offset, src.len()))
        }
    }

    /// Copies `len` bytes from byte `src_off` of `src` to byte `dst_off` of this buffer (`src`
    /// may be this buffer, the ranges overlapping).
    pub fn copy_from(
        &self,
        dst_off: usize,
        src: &Self,
        src_off: usize,
        len: usize,
    ) -> Result<(), Error> {
        if self.alloc.copy_from(dst_off, &src.alloc, src_off, len) {
            Ok(())
        } else if src_off.checked_add(len).is_none_or(|e| e > src.len()) {
            Err(src.range_error(src_off, len))
        } else {
            Err(self.range_error(dst_off, len))
        }
    }

    /// Whether two handles share one allocation.
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.alloc, &other.alloc)
    }

    fn range_error(&self, offset: usize, len: usize) -> Error {
        Error::InvalidArgument {
            what: "host range",
            reason: format!("{len} bytes at {offset} in a {}-byte buffer", self.len()),
        }
    }
}

impl std::fmt::Debug for SharedHostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedHostBuffer")
            .field("addr", &self.addr())
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::HOST_ALIGN;

    #[test]
    fn handles_share_bytes_and_refuse_ranges_outside() {
        let a = SharedHostBuffer::new(8192).unwrap();
        let b = a.clone();
        assert!(a.same_as(&b));
        assert_eq!(a.addr() % HOST_ALIGN as u64, 0);
        a.write_at(4000, b"slice").unwrap();
        let mut out = [0u8; 7];
        b.read_at(3999, &mut out).unwrap();
        assert_eq!(&out, b"\0slice\0");
        assert!(b.read_at(8190, &mut out).is_err());
        assert!(a.write_at(usize::MAX, b"x").is_err());
        // A refused write changes nothing.
        assert!(a.write_at(8188, b"too long").is_err());
        let mut tail = [1u8; 8];
        a.read_at(8184, &mut tail).unwrap();
        assert_eq!(tail, [0u8; 8]);
        assert!(!a.same_as(&SharedHostBuffer::new(1).unwrap()));
        // Copies between buffers and within one, overlapping.
        let c = SharedHostBuffer::new(16).unwrap();
        c.copy_from(2, &a, 4000, 5).unwrap();
        c.copy_from(3, &c, 2, 5).unwrap();
        let mut got = [0u8; 16];
        c.read_at(0, &mut got).unwrap();
        assert_eq!(&got[..9], b"\0\0sslice\0");
        assert!(c.copy_from(12, &a, 0, 5).is_err());
        assert!(c.copy_from(0, &a, 8190, 5).is_err());
    }
}
