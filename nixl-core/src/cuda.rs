//! GPU memory on cudarc (feature `cuda`).
//!
//! The CUDA driver is loaded at run time; without one, [`DeviceBuffer::new`] returns
//! [`Error::Cuda`] instead of panicking as cudarc would.
//!
//! Buffers are allocated with plain `cuMemAlloc`, not cudarc's stream-ordered pool allocator:
//! UCX's `cuda_ipc` transport exports memory with legacy IPC handles, which pool allocations do
//! not support. With pool memory UCX silently falls back to software emulation (measured on an
//! H100: 0.4 GB/s instead of hundreds).

use std::sync::Arc;

use cudarc::driver::CudaContext;

use crate::error::Error;
use crate::mem::{MemRegion, MemType};
use crate::sys;

mod ipc;
mod staging;

pub use ipc::{IpcAllocation, PeerPools, export_allocations};
pub use staging::{Staging, StagingEvent};

/// Whether the CUDA driver library (`libcuda.so.1`) can be loaded.
pub fn driver_present() -> bool {
    sys::cuda::cuda_driver_present()
}

/// The number of CUDA devices (an error without a driver).
pub fn device_count() -> Result<u32, Error> {
    require_driver()?;
    let n = CudaContext::device_count().map_err(cuda_err)?;
    Ok(u32::try_from(n).unwrap_or(0))
}

pub(crate) fn require_driver() -> Result<(), Error> {
    if driver_present() {
        Ok(())
    } else {
        Err(Error::Cuda {
            reason: "CUDA driver library (libcuda.so.1) not found".into(),
        })
    }
}

/// Page-locked ("pinned") host memory from `cuMemHostAlloc`, usable by every CUDA context.
///
/// Copies between it and device memory run at the bus's speed without a staging copy; NIXL
/// registers it as ordinary host memory ([`MemType::Dram`]).
pub struct PinnedBuffer {
    alloc: sys::cuda::PinnedAlloc,
}

impl PinnedBuffer {
    /// Allocates `len` zeroed bytes of pinned host memory (one byte at least) through GPU
    /// `ordinal`'s context (portable: every context sees it as pinned).
    pub fn new(ordinal: u32, len: usize) -> Result<Self, Error> {
        require_driver()?;
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
        Ok(Self {
            alloc: sys::cuda::PinnedAlloc::zeroed(ctx, len)?,
        })
    }

    /// The address.
    pub fn addr(&self) -> u64 {
        self.alloc.addr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Always false (a zero-length request allocates one byte).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.alloc.as_slice()
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.alloc.as_mut_slice()
    }
}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("addr", &self.addr())
            .field("len", &self.len())
            .finish()
    }
}

/// Whether the device memory at `addr` on GPU `ordinal` can be exported with legacy CUDA IPC
/// handles. UCX's `cuda_ipc` transport needs that to reach it from another process; memory from
/// a stream-ordered pool (`cuMemAllocAsync`, PyTorch's expandable segments) cannot be, and UCX
/// then falls back to software emulation without a warning.
pub fn ipc_capable(ordinal: u32, addr: u64) -> Result<bool, Error> {
    require_driver()?;
    let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
    ctx.bind_to_thread().map_err(cuda_err)?;
    sys::cuda::cuda_ipc_capable(addr)
}

/// An owned device allocation on one GPU, registrable as VRAM.
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: u64,
    len: usize,
    ordinal: u32,
}

impl DeviceBuffer {
    /// Allocates `len` zeroed bytes on GPU `ordinal`.
    pub fn new(ordinal: u32, len: usize) -> Result<Self, Error> {
        require_driver()?;
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
        ctx.bind_to_thread().map_err(cuda_err)?;
        let ptr = sys::cuda::cuda_alloc_zeroed(len.max(1))?;
        Ok(Self {
            ctx,
            ptr,
            len,
            ordinal,
        })
    }

    /// The CUDA ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `src` to the start of the buffer (synchronously).
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), Error> {
        if src.len() > self.len {
            return Err(Error::InvalidArgument {
                what: "host slice",
                reason: format!("{} bytes into a {}-byte device buffer", src.len(), self.len),
            });
        }
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        sys::cuda::cuda_copy_to_device(self, src)
    }

    /// Copies `src` into the buffer at byte `offset` (synchronously).
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Result<(), Error> {
        self.check_range(offset, src.len())?;
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        sys::cuda::cuda_copy_to_device_at(self, offset, src)
    }

    /// Copies `out.len()` bytes from byte `offset` of the buffer into `out` (synchronously).
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), Error> {
        self.check_range(offset, out.len())?;
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        sys::cuda::cuda_copy_to_host_at(self, offset, out)
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), Error> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::InvalidArgument {
                what: "device range",
                reason: format!("{len} bytes at {offset} in a {}-byte buffer", self.len),
            });
        }
        Ok(())
    }

    /// Copies `len` bytes from byte `src_off` of `src` to byte `dst_off` of this buffer and
    /// waits for the copy; `src` may live on another GPU (`cuMemcpyPeer`).
    pub fn copy_from_device(
        &mut self,
        dst_off: usize,
        src: &Self,
        src_off: usize,
        len: usize,
    ) -> Result<(), Error> {
        self.check_range(dst_off, len)?;
        src.check_range(src_off, len)?;
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        sys::cuda::cuda_copy_device(self, dst_off, src, src_off, len)
    }

    pub(crate) fn cu_ctx(&self) -> cudarc::driver::sys::CUcontext {
        self.ctx.cu_ctx()
    }

    /// Copies the whole buffer to host memory (synchronously).
    pub fn to_host(&self) -> Result<Vec<u8>, Error> {
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        let mut out = vec![0u8; self.len];
        sys::cuda::cuda_copy_to_host(self, &mut out)?;
        Ok(out)
    }

    pub(crate) fn device_region(&self) -> MemRegion {
        MemRegion {
            addr: self.ptr,
            len: self.len as u64,
            dev: u64::from(self.ordinal),
            mem: MemType::Vram,
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            sys::cuda::cuda_free(self);
        }
    }
}

pub(crate) fn cuda_err(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda {
        reason: e.to_string(),
    }
}
