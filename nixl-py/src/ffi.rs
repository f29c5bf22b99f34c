//! The FFI boundary: the one module of this crate with `unsafe`.
//!
//! Python hands the engine memory as integers (a tensor's `data_ptr()`, a numpy array's
//! `__array_interface__` address, SGLang's raw KV-pool pointers), exactly as SGLang hands them
//! to NIXL's own Python API. Turning such an integer into a NIXL registration is the unsafe step:
//! nothing on this side can check that the address is live memory of the right kind. The
//! contract is the Python API's, documented on every method that takes addresses: the memory
//! belongs to this process, stays allocated and unmoved while it is registered (for the call,
//! or for the life of the object that took it), and may be written by transfers at any time.

use nixl_core::{Agent, MemRegion, Registration};

/// Registers memory that Python code handed over as an address, for as long as the returned
/// registration lives.
///
/// The caller (a method of this crate) keeps the registration no longer than the Python API's
/// contract promises the memory (see the module docs); zero-length and wrapping regions are
/// refused before NIXL sees them.
pub(crate) fn register_foreign(
    agent: &Agent,
    region: MemRegion,
) -> Result<Registration, nixl_core::Error> {
    if region.len == 0 || region.addr == 0 || region.addr.checked_add(region.len).is_none() {
        return Err(nixl_core::Error::InvalidArgument {
            what: "memory region",
            reason: format!("{:#x}+{} is empty, null or wraps", region.addr, region.len),
        });
    }
    // SAFETY: the Python API's documented contract (module docs) makes the caller vouch that
    // the region is live memory of this process of kind `region.mem`, unmoved and allocated
    // until the registration drops, and open to writes by transfers; this crate drops every
    // registration within the lifetime that contract names.
    unsafe { agent.register_raw(region) }
}
