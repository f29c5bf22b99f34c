//! Same-node peers' GPU memory through legacy CUDA IPC handles: a decode exports the
//! allocations holding its KV pools ([`export_allocations`]); a prefill on the same node maps
//! them ([`PeerPools::open`]) and copies pages straight into them with one kernel launch
//! ([`super::Staging::copy_direct`]), with no staging buffer and no NIXL transfer.

use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::{cuda_err, require_driver};
use crate::error::Error;
use crate::staging::{PoolBuffer, StagingLayout};
use crate::sys::cuda::{cuda_allocation_of, cuda_ipc_close, cuda_ipc_handle, cuda_ipc_open};

/// One exported allocation: where it starts in the exporter's address space, its length, and
/// its IPC handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_structs)] // plain data by design
pub struct IpcAllocation {
    /// Start address in the exporting process.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// The 64-byte legacy IPC handle.
    pub handle: [u8; 64],
}

/// The distinct allocations (on GPU `ordinal`) that hold the device addresses `addrs`, each
/// once, with their IPC handles. Fails for memory that cannot be exported (not device memory,
/// or from a stream-ordered pool).
pub fn export_allocations(ordinal: u32, addrs: &[u64]) -> Result<Vec<IpcAllocation>, Error> {
    require_driver()?;
    let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
    ctx.bind_to_thread().map_err(cuda_err)?;
    let mut out: Vec<IpcAllocation> = Vec::new();
    for &a in addrs {
        if out.iter().any(|x| x.base <= a && a - x.base < x.len) {
            continue;
        }
        let (base, len) = cuda_allocation_of(a)?;
        let handle = cuda_ipc_handle(base)?;
        out.push(IpcAllocation { base, len, handle });
    }
    Ok(out)
}

/// A peer's allocations mapped into this process, unmapped on drop.
struct Mapping {
    local: u64,
    alloc: IpcAllocation,
}

/// A same-node peer's KV pools as this process sees them: each of the peer's pool buffers
/// translated into a mapped address, bounded by the end of its allocation.
pub struct PeerPools {
    mappings: Vec<Mapping>,
    layout: StagingLayout,
    ctx: Arc<CudaContext>,
}

impl PeerPools {
    /// Maps `allocs` into GPU `ordinal`'s context and describes the peer's pool buffers, which
    /// start at `buffers` (peer addresses) with `item_len` bytes per page each. Every buffer
    /// must start inside one of the allocations; a handle that does not open (another node, a
    /// process gone, forged bytes) fails the whole, with nothing left mapped.
    pub fn open(
        ordinal: u32,
        allocs: &[IpcAllocation],
        buffers: &[u64],
        item_len: u64,
    ) -> Result<Self, Error> {
        require_driver()?;
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
        ctx.bind_to_thread().map_err(cuda_err)?;
        let mut pools = Self {
            mappings: Vec::with_capacity(allocs.len()),
            layout: StagingLayout::new(vec![PoolBuffer {
                addr: 0,
                len: 1,
                item_len: 1,
            }])?,
            ctx,
        };
        for a in allocs {
            let local = cuda_ipc_open(&a.handle)?;
            pools.mappings.push(Mapping { local, alloc: *a });
        }
        let mut mapped = Vec::with_capacity(buffers.len());
        for (b, &addr) in buffers.iter().enumerate() {
            let m = pools
                .mappings
                .iter()
                .find(|m| m.alloc.base <= addr && addr - m.alloc.base < m.alloc.len)
                .ok_or_else(|| Error::InvalidArgument {
                    what: "peer pool buffer",
                    reason: format!("buffer {b} at {addr:#x} is in no exported allocation"),
                })?;
            let off = addr - m.alloc.base;
            mapped.push(PoolBuffer {
                addr: m.local + off,
                len: m.alloc.len - off,
                item_len,
            });
        }
        pools.layout = StagingLayout::new(mapped)?;
        Ok(pools)
    }

    /// The peer's pool buffers at their mapped addresses.
    pub fn layout(&self) -> &StagingLayout {
        &self.layout
    }
}

impl Drop for PeerPools {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // No launch may still write into a mapping when it closes.
            let _ = self.ctx.synchronize();
            for m in &self.mappings {
                cuda_ipc_close(m.local);
            }
        }
    }
}

impl std::fmt::Debug for PeerPools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerPools")
            .field("allocations", &self.mappings.len())
            .field("buffers", &self.layout.buffers().len())
            .finish()
    }
}
