//! Transfer descriptor lists built from plain values.

use crate::mem::{MemRegion, MemType};

/// One transfer descriptor: address (or offset), length and device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Desc {
    /// Start address, or offset for files and objects.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device id (CUDA ordinal, fd, object id, or 0).
    pub dev: u64,
}

/// A list of transfer descriptors of one memory type.
///
/// Plain data: it is `Send`, cheap to build, and lowered to NIXL's own list only when a request
/// is created or a list prepared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XferDescs {
    mem: MemType,
    descs: Vec<Desc>,
}

impl XferDescs {
    /// An empty list of the given memory type.
    pub fn new(mem: MemType) -> Self {
        Self {
            mem,
            descs: Vec::new(),
        }
    }

    /// An empty list with room for `n` descriptors.
    pub fn with_capacity(mem: MemType, n: usize) -> Self {
        Self {
            mem,
            descs: Vec::with_capacity(n),
        }
    }

    /// Appends a descriptor.
    pub fn push(&mut self, addr: u64, len: u64, dev: u64) {
        self.descs.push(Desc { addr, len, dev });
    }

    /// Appends a descriptor covering `len` bytes at `offset` into `region`.
    pub fn push_in(&mut self, region: &MemRegion, offset: u64, len: u64) {
        self.push(region.addr.saturating_add(offset), len, region.dev);
    }

    /// The memory type.
    pub fn mem_type(&self) -> MemType {
        self.mem
    }

    /// The descriptors.
    pub fn as_slice(&self) -> &[Desc] {
        &self.descs
    }

    /// Number of descriptors.
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Total bytes described.
    pub fn total_bytes(&self) -> u64 {
        self.descs.iter().map(|d| d.len).sum()
    }

    /// Removes every descriptor, keeping the allocation.
    pub fn clear(&mut self) {
        self.descs.clear();
    }

    pub(crate) fn to_sys(&self) -> Result<nixl_sys::XferDescList<'static>, crate::Error> {
        let mut list = crate::sys::check(
            crate::Op::BuildDescriptors,
            nixl_sys::XferDescList::new(crate::sys::sys_mem_type(self.mem)),
        )?;
        for d in &self.descs {
            let addr = usize::try_from(d.addr).map_err(|_| too_big("descriptor address"))?;
            let len = usize::try_from(d.len).map_err(|_| too_big("descriptor length"))?;
            list.add_desc(addr, len, d.dev);
        }
        Ok(list)
    }
}

fn too_big(what: &'static str) -> crate::Error {
    crate::Error::InvalidArgument {
        what,
        reason: "does not fit in usize".into(),
    }
}
