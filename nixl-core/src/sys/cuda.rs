//! CUDA driver calls (feature `cuda`): device and pinned host allocations, copies, and pointer
//! attribute queries. Every call assumes the caller bound the right context to this thread.

use std::ptr::NonNull;

use cudarc::driver::{result, sys as cu};

use super::NixlBuffer;
use crate::cuda::{DeviceBuffer, PinnedBuffer, cuda_err};
use crate::error::Error;
use crate::mem::MemRegion;

/// `cuMemAlloc` plus a zero fill, on the context bound to this thread.
pub(crate) fn cuda_alloc_zeroed(len: usize) -> Result<u64, Error> {
    // SAFETY: the caller bound a live context to this thread; cuMemAlloc has no other
    // precondition and returns a fresh allocation of `len` bytes or an error.
    let ptr = unsafe { result::malloc_sync(len) }.map_err(cuda_err)?;
    // SAFETY: `ptr` is the allocation just made, `len` bytes long, owned by no one else yet.
    if let Err(e) = unsafe { result::memset_d8_sync(ptr, 0, len) } {
        // SAFETY: freeing the allocation made above, exactly once, on the same context.
        let _ = unsafe { result::free_sync(ptr) };
        return Err(cuda_err(e));
    }
    Ok(ptr)
}

/// Copies `src` to the start of `buf` (the caller checked the length and bound the context).
pub(crate) fn cuda_copy_to_device(buf: &mut DeviceBuffer, src: &[u8]) -> Result<(), Error> {
    // SAFETY: `buf` owns a live device allocation of at least `src.len()` bytes (checked by the
    // caller), `&mut` excludes concurrent use, and the copy is synchronous.
    unsafe { result::memcpy_htod_sync(buf.addr(), src) }.map_err(cuda_err)
}

/// Copies the whole of `buf` into `out` (same length; the caller bound the context).
pub(crate) fn cuda_copy_to_host(buf: &DeviceBuffer, out: &mut [u8]) -> Result<(), Error> {
    let n = out.len().min(buf.len());
    // SAFETY: `buf` owns a live device allocation of `buf.len()` bytes and `out` has room for
    // `n` ≤ that many; the copy is synchronous.
    unsafe { result::memcpy_dtoh_sync(&mut out[..n], buf.addr()) }.map_err(cuda_err)
}

/// Copies `src` to byte `offset` of `buf` (the caller checked the range and bound the context).
pub(crate) fn cuda_copy_to_device_at(
    buf: &mut DeviceBuffer,
    offset: usize,
    src: &[u8],
) -> Result<(), Error> {
    // SAFETY: `offset + src.len()` lies inside the live allocation (checked by the caller),
    // `&mut` excludes concurrent use, and the copy is synchronous.
    unsafe { result::memcpy_htod_sync(buf.addr() + offset as u64, src) }.map_err(cuda_err)
}

/// Copies `out.len()` bytes from byte `offset` of `buf` (range checked, context bound).
pub(crate) fn cuda_copy_to_host_at(
    buf: &DeviceBuffer,
    offset: usize,
    out: &mut [u8],
) -> Result<(), Error> {
    // SAFETY: `offset + out.len()` lies inside the live allocation (checked by the caller) and
    // the copy is synchronous.
    unsafe { result::memcpy_dtoh_sync(out, buf.addr() + offset as u64) }.map_err(cuda_err)
}

/// Frees `buf`'s allocation (from Drop, with its context bound).
pub(crate) fn cuda_free(buf: &mut DeviceBuffer) {
    // SAFETY: called once from DeviceBuffer::drop; the pointer came from cuMemAlloc and any
    // registration of it was dropped before (Registered drops the registration first).
    let _ = unsafe { result::free_sync(buf.addr()) };
}

/// Whether libcuda can be loaded (cudarc panics on first use otherwise).
pub(crate) fn cuda_driver_present() -> bool {
    // SAFETY: is_culib_present only attempts to dlopen the driver library and reports the result.
    unsafe { cu::is_culib_present() }
}

// SAFETY: the DeviceBuffer owns its cuMemAlloc allocation; the allocation neither moves nor is freed before
// the buffer drops, and the address/length are fixed at construction.
unsafe impl NixlBuffer for DeviceBuffer {
    fn region(&self) -> MemRegion {
        self.device_region()
    }
}

/// Copies `len` bytes from `src + src_off` to `dst + dst_off` and waits for the copy: on one GPU
/// with `cuMemcpyDtoD`, between GPUs with `cuMemcpyPeer` (the caller checked both ranges).
pub(crate) fn cuda_copy_device(
    dst: &mut DeviceBuffer,
    dst_off: usize,
    src: &DeviceBuffer,
    src_off: usize,
    len: usize,
) -> Result<(), Error> {
    let (d, s) = (dst.addr() + dst_off as u64, src.addr() + src_off as u64);
    if dst.ordinal() == src.ordinal() {
        // SAFETY: both ranges lie inside live allocations of the bound context (checked by the
        // caller) and `&mut dst` excludes concurrent use of the destination.
        unsafe { result::memcpy_dtod_sync(d, s, len) }.map_err(cuda_err)?;
    } else {
        // SAFETY: as above; each pointer is passed with the context that owns it.
        unsafe { cu::cuMemcpyPeer(d, dst.cu_ctx(), s, src.cu_ctx(), len) }
            .result()
            .map_err(cuda_err)?;
    }
    // Device-to-device copies do not wait for completion on their own.
    result::ctx::synchronize().map_err(cuda_err)
}

/// Whether the device memory at `addr` can be exported with legacy CUDA IPC handles, which is
/// what UCX's `cuda_ipc` transport uses (memory from stream-ordered pools cannot be).
pub(crate) fn cuda_ipc_capable(addr: u64) -> Result<bool, Error> {
    let mut capable: i32 = 0;
    // SAFETY: the attribute is documented to write one int through `data`, which points at
    // `capable`; an address the driver does not know yields an error code, not a fault.
    unsafe {
        cu::cuPointerGetAttribute(
            (&raw mut capable).cast(),
            cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
            addr,
        )
    }
    .result()
    .map_err(cuda_err)?;
    Ok(capable != 0)
}

/// Page-locked ("pinned") host memory from `cuMemHostAlloc`: the raw half of
/// [`crate::cuda::PinnedBuffer`].
pub(crate) struct PinnedAlloc {
    ptr: NonNull<u8>,
    len: usize,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

// SAFETY: the allocation is exclusively owned; `&self` gives shared reads only and `&mut self`
// exclusive writes, as for a Vec<u8>. The context handle is itself Send + Sync.
unsafe impl Send for PinnedAlloc {}
// SAFETY: see Send.
unsafe impl Sync for PinnedAlloc {}

impl PinnedAlloc {
    /// Allocates `len` zeroed bytes of pinned memory (one byte at least) on `ctx` (portable:
    /// every context sees it as pinned).
    pub(crate) fn zeroed(
        ctx: std::sync::Arc<cudarc::driver::CudaContext>,
        len: usize,
    ) -> Result<Self, Error> {
        let len = len.max(1);
        ctx.bind_to_thread().map_err(cuda_err)?;
        // SAFETY: a context is bound; cuMemHostAlloc returns `len` fresh bytes or an error.
        let raw =
            unsafe { result::malloc_host(len, cu::CU_MEMHOSTALLOC_PORTABLE) }.map_err(cuda_err)?;
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(Error::OutOfMemory { bytes: len })?;
        // SAFETY: `ptr` points at `len` writable bytes owned by no one else yet.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
        Ok(Self { ptr, len, ctx })
    }

    /// The address.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes owned by self; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` initialised bytes owned by self; exclusive borrow of self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PinnedAlloc {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the pointer came from cuMemHostAlloc and is freed once; any registration
            // was dropped before (Registered drops the registration first).
            let _ = unsafe { result::free_host(self.ptr.as_ptr().cast()) };
        }
    }
}

// SAFETY: the allocation is owned by the buffer, never moves, and its address and length are
// fixed at construction.
unsafe impl NixlBuffer for PinnedBuffer {
    fn region(&self) -> MemRegion {
        MemRegion::dram(self.addr(), self.len() as u64)
    }
}

/// The allocation holding device address `addr` (context bound): its start and length.
pub(crate) fn cuda_allocation_of(addr: u64) -> Result<(u64, u64), Error> {
    let (mut base, mut size): (cu::CUdeviceptr, usize) = (0, 0);
    // SAFETY: the call writes one pointer and one size through the two out-pointers, which
    // point at the locals above; an unknown address yields an error code, not a fault.
    unsafe { cu::cuMemGetAddressRange_v2(&raw mut base, &raw mut size, addr) }
        .result()
        .map_err(cuda_err)?;
    Ok((base, size as u64))
}

/// The legacy CUDA IPC handle of the allocation starting at `base` (context bound).
pub(crate) fn cuda_ipc_handle(base: u64) -> Result<[u8; 64], Error> {
    let mut h = cu::CUipcMemHandle_st { reserved: [0; 64] };
    // SAFETY: the call writes one 64-byte handle through the out-pointer, which points at `h`;
    // an address that is not an exportable allocation yields an error code, not a fault.
    unsafe { cu::cuIpcGetMemHandle(&raw mut h, base) }
        .result()
        .map_err(cuda_err)?;
    Ok(h.reserved.map(|c| c as u8))
}

/// Maps another process's allocation from its IPC handle into the bound context; returns the
/// local address of its first byte. Undone with [`cuda_ipc_close`].
pub(crate) fn cuda_ipc_open(handle: &[u8; 64]) -> Result<u64, Error> {
    let h = cu::CUipcMemHandle_st {
        reserved: handle.map(|b| b as ::core::ffi::c_char),
    };
    let mut ptr: cu::CUdeviceptr = 0;
    // SAFETY: the call writes one pointer through the out-pointer, which points at `ptr`; a
    // handle that names no live allocation (forged, stale, another host) yields an error code.
    unsafe {
        cu::cuIpcOpenMemHandle_v2(
            &raw mut ptr,
            h,
            cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
        )
    }
    .result()
    .map_err(cuda_err)?;
    Ok(ptr)
}

/// Unmaps what [`cuda_ipc_open`] mapped at `ptr` (context bound).
pub(crate) fn cuda_ipc_close(ptr: u64) {
    // SAFETY: `ptr` came from cuIpcOpenMemHandle and is closed once, by its owner's Drop, after
    // the owner's launches that use it were synchronized.
    let _ = unsafe { cu::cuIpcCloseMemHandle(ptr) };
}
