//! The one module of the workspace that contains `unsafe` code.
//!
//! Everything here is small and audited on its own: loading the NIXL runtime library by absolute
//! path, page-aligned host allocations, the [`nixl_sys::MemoryRegion`] impls that hand raw
//! addresses to NIXL, and the `Send`/`Sync` impls of wrappers around NIXL handles. The status code
//! to [`Error`] mapping also lives here, so that `nixl_sys` error values are translated in exactly
//! one function.
#![allow(unsafe_code, reason = "the one module allowed to")]
#![deny(unsafe_op_in_unsafe_fn)]

use std::alloc::{self, Layout};
use std::path::Path;
use std::ptr::NonNull;

use crate::error::{Error, NixlCode, Op};
use crate::mem::{MemRegion, MemType};

/// Maps a `nixl_sys` error into ours. The only place where `NixlError` is inspected.
pub(crate) fn nixl_error(op: Op, err: nixl_sys::NixlError) -> Error {
    let code = match err {
        nixl_sys::NixlError::InvalidParam => NixlCode::InvalidParam,
        nixl_sys::NixlError::NotFound => NixlCode::NotFound,
        nixl_sys::NixlError::BackendError => NixlCode::Backend,
        nixl_sys::NixlError::FailedToCreateXferRequest => NixlCode::CreateRequest,
        nixl_sys::NixlError::FailedToCreateBackend => NixlCode::CreateBackend,
        nixl_sys::NixlError::StringConversionError(_) => NixlCode::InvalidParam,
        other => NixlCode::Other(other.to_string()),
    };
    Error::Nixl { op, code }
}

/// Converts a `nixl_sys` result, attaching the operation.
pub(crate) fn check<T>(op: Op, res: Result<T, nixl_sys::NixlError>) -> Result<T, Error> {
    res.map_err(|e| nixl_error(op, e))
}

/// Loads `libnixl_capi.so` from `path` with `RTLD_NOW | RTLD_GLOBAL` and keeps it loaded for the
/// life of the process.
///
/// nixl-sys's stub build later calls `dlopen("libnixl_capi.so")` by bare name; the dynamic linker
/// then finds this object by its SONAME, so the absolute path wins over `LD_LIBRARY_PATH`.
pub(crate) fn load_library(path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading libnixl_capi.so runs its static initialisers (C++ runtime, plugin manager
    // set-up). They have no preconditions on our side; the library is never unloaded because the
    // handle is leaked below, so no symbol from it can dangle.
    let lib =
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    std::mem::forget(lib);
    Ok(())
}

/// An owned, zero-initialised, page-aligned host allocation.
///
/// Page alignment keeps NIXL and UCX on their fast paths and lets the kernel back large buffers
/// with transparent huge pages.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

/// The alignment of every [`HostBuffer`].
pub const HOST_ALIGN: usize = 4096;

impl HostBuffer {
    /// Allocates `len` zeroed bytes aligned to 4096. A zero length allocates one page, so that
    /// every buffer has a distinct, registrable address.
    pub fn new(len: usize) -> Result<Self, Error> {
        let layout = Layout::from_size_align(len.max(1), HOST_ALIGN).map_err(|e| {
            Error::InvalidArgument {
                what: "host buffer length",
                reason: e.to_string(),
            }
        })?;
        // SAFETY: the layout has a non-zero size (len.max(1)).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| Error::OutOfMemory {
            bytes: layout.size(),
        })?;
        advise_huge_pages(ptr, layout.size());
        Ok(Self { ptr, len, layout })
    }

    /// The number of usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no usable bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start address, as NIXL descriptors take it.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of at least `len` initialised (zeroed) bytes owned by
        // self; the shared borrow of self prevents concurrent mutation through `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("addr", &self.addr())
            .field("len", &self.len)
            .finish()
    }
}

// SAFETY: HostBuffer uniquely owns its allocation (like Box<[u8]>); moving it to another thread
// moves that ownership, and shared references only allow reads.
unsafe impl Send for HostBuffer {}
// SAFETY: &HostBuffer only exposes `&[u8]` and the address; no interior mutability.
unsafe impl Sync for HostBuffer {}

/// Asks the kernel for transparent huge pages on large buffers (RUNTIME.md: 64 MiB copies go from
/// 5.5 to 6.8 GB/s). Purely advisory; a failure changes nothing.
fn advise_huge_pages(ptr: NonNull<u8>, len: usize) {
    const HUGE: usize = 2 << 20;
    if len >= HUGE {
        // SAFETY: madvise only reads the range's page-table state; the range is our own live,
        // page-aligned allocation. MADV_HUGEPAGE never changes the contents.
        let _ = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    }
}

/// A memory region as NIXL's registration and descriptor builders take it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SysRegion(pub(crate) MemRegion);

impl nixl_sys::MemoryRegion for SysRegion {
    // SAFETY (trait contract): the pointer is only an address handed to NIXL; we never
    // dereference it here. Whoever built the MemRegion vouched for it (see `Agent::register_raw`).
    unsafe fn as_ptr(&self) -> *const u8 {
        self.0.addr as usize as *const u8
    }

    fn size(&self) -> usize {
        usize::try_from(self.0.len).unwrap_or(usize::MAX)
    }
}

impl nixl_sys::NixlDescriptor for SysRegion {
    fn mem_type(&self) -> nixl_sys::MemType {
        sys_mem_type(self.0.mem)
    }

    fn device_id(&self) -> u64 {
        self.0.dev
    }
}

/// Our memory type as nixl-sys spells it.
pub(crate) fn sys_mem_type(mem: MemType) -> nixl_sys::MemType {
    match mem {
        MemType::Dram => nixl_sys::MemType::Dram,
        MemType::Vram => nixl_sys::MemType::Vram,
        MemType::Block => nixl_sys::MemType::Block,
        MemType::Object => nixl_sys::MemType::Object,
        MemType::File => nixl_sys::MemType::File,
    }
}

/// A prepared descriptor-list handle, owned by one agent.
pub(crate) struct PreparedHandle(pub(crate) nixl_sys::XferDlistHandle);

impl std::fmt::Debug for PreparedHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedHandle")
    }
}

// SAFETY: the handle is an opaque pointer to an immutable nixlDlistH owned by the agent. It is only
// read by makeXferReq and released once on drop, both through the agent, whose own thread-sync
// mode (Rw by default in AgentConfig) serialises those calls; the Rust wrapper also takes the
// agent's lock for both. No thread-local state is involved.
unsafe impl Send for PreparedHandle {}
// SAFETY: see Send; shared use only passes the pointer to makeXferReq under the agent's locks.
unsafe impl Sync for PreparedHandle {}

// SAFETY: a FILE registration refers to the descriptor, which stays open as long as the owned
// File inside the FileRegion lives; NIXL never touches our address space through it.
unsafe impl NixlBuffer for crate::storage::FileRegion {
    fn region(&self) -> MemRegion {
        self.file_region()
    }
}

// SAFETY: an OBJ registration names a remote object by id; no local memory is involved.
unsafe impl NixlBuffer for crate::storage::ObjectRegion {
    fn region(&self) -> MemRegion {
        self.object_region()
    }
}

impl crate::Agent {
    /// Registers memory that the caller owns and keeps alive.
    ///
    /// # Safety
    ///
    /// Until the returned [`crate::Registration`] is dropped:
    /// - `[region.addr, region.addr + region.len)` must stay allocated and must not move;
    /// - for [`MemType::Dram`] it must be host memory of this process, for [`MemType::Vram`] device
    ///   memory of the CUDA device `region.dev`;
    /// - nothing else may rely on the contents staying unchanged: peers may write into the region
    ///   at any time, outside Rust's aliasing rules.
    pub unsafe fn register_raw(&self, region: MemRegion) -> Result<crate::Registration, Error> {
        let handle = check(
            Op::RegisterMemory,
            self.inner.register_memory(&SysRegion(region), None),
        )?;
        self.check_exportable(region);
        Ok(crate::Registration { handle, region })
    }
}

/// Memory that can be registered with NIXL and stays valid and unmoved while it is owned.
///
/// This trait is `unsafe` to implement: NIXL peers write into registered memory at any time
/// until the registration is dropped, so `region()` must describe memory owned by `self` that
/// is neither freed nor moved while `self` lives, and must return the same value every time.
///
/// # Safety
///
/// Implementors guarantee the above for as long as the value exists.
pub unsafe trait NixlBuffer: Send + Sync {
    /// The region this buffer covers.
    fn region(&self) -> MemRegion;
}

// SAFETY: a HostBuffer owns its heap allocation, which never moves or shrinks while it lives,
// and `addr()`/`len()` are fixed at construction.
unsafe impl NixlBuffer for HostBuffer {
    fn region(&self) -> MemRegion {
        MemRegion::dram(self.addr(), self.len() as u64)
    }
}

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

/// Benchmark support (feature `__bench`, not covered by semver): lets a benchmark register a
/// [`HostBuffer`] with a raw `nixl_sys::Agent`, so raw and wrapped paths move identical memory.
#[cfg(feature = "__bench")]
#[doc(hidden)]
pub mod bench {
    /// A host buffer's region as a raw nixl-sys descriptor.
    #[derive(Debug)]
    pub struct RawHostRegion(pub(crate) super::SysRegion);

    impl RawHostRegion {
        /// The region of `buf`.
        pub fn new(buf: &super::HostBuffer) -> Self {
            Self(super::SysRegion(crate::MemRegion::dram(
                buf.addr(),
                buf.len() as u64,
            )))
        }
    }

    impl nixl_sys::MemoryRegion for RawHostRegion {
        // SAFETY (trait contract): only an address handed to NIXL, never dereferenced here;
        // the benchmark keeps the HostBuffer alive while registered.
        unsafe fn as_ptr(&self) -> *const u8 {
            self.0.0.addr as usize as *const u8
        }

        fn size(&self) -> usize {
            nixl_sys::MemoryRegion::size(&self.0)
        }
    }

    impl nixl_sys::NixlDescriptor for RawHostRegion {
        fn mem_type(&self) -> nixl_sys::MemType {
            nixl_sys::MemType::Dram
        }

        fn device_id(&self) -> u64 {
            0
        }
    }
}

/// A registration of a borrowed, exclusively held slice; deregistered when dropped, which the
/// borrow forces to happen before the slice can be used, moved or freed again.
#[derive(Debug)]
#[must_use = "dropping it deregisters the slice at once"]
pub struct BorrowedRegistration<'a> {
    registration: crate::Registration,
    _slice: std::marker::PhantomData<&'a mut [u8]>,
}

impl BorrowedRegistration<'_> {
    /// The registered region.
    pub fn region(&self) -> MemRegion {
        self.registration.region()
    }
}

impl crate::Agent {
    /// Registers `buf` (host memory) for as long as the returned guard lives.
    ///
    /// Safe because the guard holds the exclusive borrow: nothing else can read, write, move or
    /// free the slice until the registration is gone, so transfers may write into it freely.
    pub fn register_slice_mut<'a>(
        &self,
        buf: &'a mut [u8],
    ) -> Result<BorrowedRegistration<'a>, Error> {
        let region = MemRegion::dram(buf.as_mut_ptr() as u64, buf.len() as u64);
        // SAFETY: the slice stays allocated and unmoved for 'a, and the exclusive borrow held by
        // the guard means no Rust code observes it while NIXL may write into it (register_raw's
        // obligations). The guard deregisters before 'a ends.
        let registration = unsafe { self.register_raw(region) }?;
        Ok(BorrowedRegistration {
            registration,
            _slice: std::marker::PhantomData,
        })
    }
}
