//! Memory kinds, regions and registrations.

use std::alloc::Layout;

use crate::error::Error;
use crate::sys;

pub use crate::sys::NixlBuffer;

/// The kind of memory or storage a region lives in, as NIXL names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MemType {
    /// Host memory.
    Dram,
    /// GPU memory; the device id is the CUDA ordinal.
    Vram,
    /// A block device.
    Block,
    /// An object in an object store; the device id names the object.
    Object,
    /// A file; the device id is an open file descriptor.
    File,
}

/// A span of memory or storage: address (or offset), length, device id and kind.
///
/// For [`MemType::File`] the address is a file offset and the device id the file descriptor; for
/// [`MemType::Object`] the address is an offset within the object and the device id the object's
/// id (the NIXL OBJ plugin stores it under the key `dev_id` in decimal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemRegion {
    /// Start address or offset.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device id (CUDA ordinal, file descriptor, object id, or 0 for host memory).
    pub dev: u64,
    /// Kind of memory.
    pub mem: MemType,
}

impl MemRegion {
    /// A host-memory region.
    pub fn dram(addr: u64, len: u64) -> Self {
        Self {
            addr,
            len,
            dev: 0,
            mem: MemType::Dram,
        }
    }

    /// The end address (exclusive), saturating.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len)
    }

    /// Whether `[addr, addr + len)` lies inside this region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.end())
    }
}

/// A live NIXL registration. Dropping it deregisters the memory.
#[derive(Debug)]
#[must_use = "dropping a Registration deregisters the memory at once"]
pub struct Registration {
    #[allow(dead_code, reason = "held for its Drop, which deregisters")]
    pub(crate) handle: nixl_sys::RegistrationHandle,
    pub(crate) region: MemRegion,
}

impl Registration {
    /// The registered region.
    pub fn region(&self) -> MemRegion {
        self.region
    }
}

/// A buffer together with its registration. The registration is dropped before the buffer.
#[derive(Debug)]
pub struct Registered<B> {
    // Field order matters: the registration drops first, then the memory it describes.
    registration: Registration,
    buffer: B,
}

impl<B: NixlBuffer> Registered<B> {
    pub(crate) fn new(registration: Registration, buffer: B) -> Self {
        Self {
            registration,
            buffer,
        }
    }

    /// The registered region.
    pub fn region(&self) -> MemRegion {
        self.registration.region
    }

    /// The buffer.
    pub fn buffer(&self) -> &B {
        &self.buffer
    }

    /// The buffer, mutably (for filling it before a transfer or reading after one).
    pub fn buffer_mut(&mut self) -> &mut B {
        &mut self.buffer
    }

    /// Deregisters and returns the buffer.
    pub fn into_inner(self) -> B {
        drop(self.registration);
        self.buffer
    }
}

/// A registration of a borrowed, exclusively held slice; deregistered when dropped, which the
/// borrow forces to happen before the slice can be used, moved or freed again.
///
/// Made by [`crate::Agent::register_slice_mut`].
#[derive(Debug)]
#[must_use = "dropping it deregisters the slice at once"]
pub struct BorrowedRegistration<'a> {
    registration: Registration,
    _slice: std::marker::PhantomData<&'a mut [u8]>,
}

impl BorrowedRegistration<'_> {
    pub(crate) fn new(registration: Registration) -> Self {
        Self {
            registration,
            _slice: std::marker::PhantomData,
        }
    }

    /// The registered region.
    pub fn region(&self) -> MemRegion {
        self.registration.region()
    }
}

/// The alignment of every [`HostBuffer`].
pub const HOST_ALIGN: usize = 4096;

/// The layout of a host allocation of `len` usable bytes: page-aligned, at least one byte.
pub(crate) fn host_layout(len: usize) -> Result<Layout, Error> {
    Layout::from_size_align(len.max(1), HOST_ALIGN).map_err(|e| Error::InvalidArgument {
        what: "host buffer length",
        reason: e.to_string(),
    })
}

/// An owned, zero-initialised, page-aligned host allocation.
///
/// Page alignment keeps NIXL and UCX on their fast paths and lets the kernel back large buffers
/// with transparent huge pages.
pub struct HostBuffer {
    alloc: sys::HostAlloc,
}

impl HostBuffer {
    /// Allocates `len` zeroed bytes aligned to 4096. A zero length allocates one page, so that
    /// every buffer has a distinct, registrable address.
    pub fn new(len: usize) -> Result<Self, Error> {
        let layout = host_layout(len)?;
        let alloc = sys::HostAlloc::zeroed(layout, len).ok_or_else(|| Error::OutOfMemory {
            bytes: layout.size(),
        })?;
        Ok(Self { alloc })
    }

    /// The number of usable bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the buffer has no usable bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The start address, as NIXL descriptors take it.
    pub fn addr(&self) -> u64 {
        self.alloc.addr()
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        self.alloc.as_slice()
    }

    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.alloc.as_mut_slice()
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("addr", &self.addr())
            .field("len", &self.len())
            .finish()
    }
}

/// Benchmark support (feature `__bench`, not covered by semver): a [`HostBuffer`]'s region as a
/// raw `nixl_sys` descriptor, so that a benchmark can register it with a raw `nixl_sys::Agent` and
/// raw and wrapped paths move identical memory.
#[cfg(feature = "__bench")]
#[derive(Debug)]
pub struct RawHostRegion(pub(crate) MemRegion);

#[cfg(feature = "__bench")]
impl RawHostRegion {
    /// The region of `buf`.
    pub fn new(buf: &HostBuffer) -> Self {
        Self(MemRegion::dram(buf.addr(), buf.len() as u64))
    }
}
