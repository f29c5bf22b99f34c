//! Memory kinds, regions and registrations.

use crate::sys;

pub use crate::sys::{BorrowedRegistration, HOST_ALIGN, HostBuffer, NixlBuffer};

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

pub(crate) fn sys_region(region: MemRegion) -> sys::SysRegion {
    sys::SysRegion(region)
}
