//! The one module of the workspace that contains `unsafe` code.
//!
//! It holds only `unsafe` declarations and impls (the [`NixlBuffer`] trait and its impls, the
//! `Send`/`Sync` impls of wrappers around raw pointers and NIXL handles, the
//! [`nixl_sys::MemoryRegion`] impls that hand raw addresses to NIXL) and `pub(crate)` primitives
//! that contain the `unsafe` blocks: loading the NIXL runtime library by absolute path, the raw
//! half of host and pinned allocations, registration, and CUDA driver calls. The safe public types
//! built on them live beside their kin (`mem.rs`, `cuda.rs`, `agent.rs`). The status code to
//! [`Error`] mapping also lives here, so that `nixl_sys` error values are translated in exactly
//! one function.
//!
//! The rule, enforced by `cargo xtask tidy`: `unsafe` blocks, `unsafe impl` and `unsafe trait`
//! appear only under `nixl-core/src/sys`, each block and impl with a `// SAFETY:` comment; an
//! `unsafe fn` elsewhere in nixl-core is a public wrapper whose body is one call into `sys`.
#![allow(unsafe_code, reason = "the one module allowed to")]
#![deny(unsafe_op_in_unsafe_fn)]

use std::alloc::{self, Layout};
use std::path::Path;
use std::ptr::NonNull;

use crate::Agent;
use crate::error::{Error, NixlCode, Op};
use crate::mem::{BorrowedRegistration, MemRegion, MemType, Registered, Registration};

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

/// Runs a nixl-sys call that can panic on what a peer sent (nixl-sys 1.5.2 unwraps C strings as
/// UTF-8, for one), turning the panic into an error instead of unwinding through our thread.
/// nixl-sys takes its locks only inside the FFI expression, so none is held, or poisoned, when
/// such a panic unwinds.
pub(crate) fn contain<T>(op: Op, f: impl FnOnce() -> T) -> Result<T, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!(%op, panic = %what, "nixl-sys panicked; contained");
        Error::Nixl {
            op,
            code: NixlCode::Other(format!("nixl-sys panicked: {what}")),
        }
    })
}

/// Serialises [`with_env`]: NIXL reads the variables it sets while `f` runs.
static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` (a NIXL call that reads `key` from the process environment, such as creating a
/// UCX backend) with `key` set to `value`, setting it only if it differs.
pub(crate) fn with_env<T>(key: &str, value: &str, f: impl FnOnce() -> T) -> T {
    let _guard = ENV_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if std::env::var_os(key).is_none_or(|v| v != value) {
        tracing::debug!(key, value, "setting a NIXL environment variable");
        // SAFETY: setenv races only with getenv in other threads. Rust's own environment
        // accessors take std's lock; NIXL reads this variable only in the call `f` makes, which
        // runs after this under ENV_LOCK, as every other `with_env` does. What remains is a C
        // library reading the environment in another thread at this instant; the variable is
        // therefore set only when it differs, so a process that exports it before starting
        // threads never reaches this (documented on `BackendParams::ucx_sgl`).
        unsafe { std::env::set_var(key, value) };
    }
    f()
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

/// An owned, zero-initialised host allocation: the raw half of [`crate::HostBuffer`].
pub(crate) struct HostAlloc {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

impl HostAlloc {
    /// Allocates `layout` zeroed, of which the first `len` bytes are usable. `None` if the
    /// allocator fails, the layout is zero-sized, or `len` exceeds the layout.
    pub(crate) fn zeroed(layout: Layout, len: usize) -> Option<Self> {
        if layout.size() == 0 || len > layout.size() {
            return None;
        }
        // SAFETY: the layout has a non-zero size (checked above).
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        advise_huge_pages(ptr, layout.size());
        Some(Self { ptr, len, layout })
    }

    /// The start address.
    pub(crate) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The usable bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of at least `len` initialised (zeroed) bytes owned by
        // self; the shared borrow of self prevents concurrent mutation through `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The usable bytes, mutably.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of self makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostAlloc {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: HostAlloc uniquely owns its allocation (like Box<[u8]>); moving it to another thread
// moves that ownership, and shared references only allow reads.
unsafe impl Send for HostAlloc {}
// SAFETY: &HostAlloc only exposes `&[u8]` and the address; no interior mutability. The one
// wrapper that writes through a shared HostAlloc, `shared::SharedAlloc`, never calls
// `as_slice`/`as_mut_slice`, so no reference to its bytes exists to be invalidated.
unsafe impl Sync for HostAlloc {}

/// Asks the kernel for transparent huge pages on large buffers (docs/runtime.md §4: 64 MiB
/// copies go from 5.5 to 6.8 GB/s). Purely advisory; a failure changes nothing.
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

/// Registers `region` with every backend of `agent` that supports its memory type, then checks
/// that registered GPU memory is exportable.
///
/// # Safety
///
/// The caller upholds [`crate::Agent::register_raw`]'s contract for `region` until the returned
/// registration is dropped.
pub(crate) unsafe fn register_raw(agent: &Agent, region: MemRegion) -> Result<Registration, Error> {
    let handle = check(
        Op::RegisterMemory,
        agent.inner.register_memory(&SysRegion(region), None),
    )?;
    agent.check_exportable(region);
    Ok(Registration { handle, region })
}

/// Registers an owned buffer; the registration drops before the buffer (see [`Registered`]).
pub(crate) fn register_owned<B: NixlBuffer>(
    agent: &Agent,
    buffer: B,
) -> Result<Registered<B>, Error> {
    // SAFETY: NixlBuffer's contract: the region is owned by `buffer` and neither freed nor moved
    // while it lives; Registered keeps the buffer and drops the registration first.
    let registration = unsafe { register_raw(agent, buffer.region()) }?;
    Ok(Registered::new(registration, buffer))
}

/// Registers an exclusively borrowed host slice for as long as the returned guard lives.
pub(crate) fn register_borrowed<'a>(
    agent: &Agent,
    buf: &'a mut [u8],
) -> Result<BorrowedRegistration<'a>, Error> {
    let region = MemRegion::dram(buf.as_mut_ptr() as u64, buf.len() as u64);
    // SAFETY: the slice stays allocated and unmoved for 'a, and the exclusive borrow held by
    // the guard means no Rust code observes it while NIXL may write into it (register_raw's
    // obligations). The guard deregisters before 'a ends.
    let registration = unsafe { register_raw(agent, region) }?;
    Ok(BorrowedRegistration::new(registration))
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
unsafe impl NixlBuffer for crate::HostBuffer {
    fn region(&self) -> MemRegion {
        MemRegion::dram(self.addr(), self.len() as u64)
    }
}

pub(crate) mod shared;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cuda")]
pub(crate) mod staging;

// Benchmark support (feature `__bench`): a host buffer's region as a raw nixl-sys descriptor.
#[cfg(feature = "__bench")]
impl nixl_sys::MemoryRegion for crate::mem::RawHostRegion {
    // SAFETY (trait contract): only an address handed to NIXL, never dereferenced here;
    // the benchmark keeps the HostBuffer alive while registered.
    unsafe fn as_ptr(&self) -> *const u8 {
        self.0.addr as usize as *const u8
    }

    fn size(&self) -> usize {
        usize::try_from(self.0.len).unwrap_or(usize::MAX)
    }
}

#[cfg(feature = "__bench")]
impl nixl_sys::NixlDescriptor for crate::mem::RawHostRegion {
    fn mem_type(&self) -> nixl_sys::MemType {
        nixl_sys::MemType::Dram
    }

    fn device_id(&self) -> u64 {
        0
    }
}
