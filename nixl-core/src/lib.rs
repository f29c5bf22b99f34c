//! Safe Rust over NVIDIA NIXL: agents, backends, memory registration, descriptor lists,
//! transfers and notifications.
//!
//! `nixl-core` is the only crate of the workspace allowed raw FFI and memory code, all of it in
//! one private module. It wraps the [`nixl-sys`](https://docs.rs/nixl-sys) bindings, built with their
//! `stub-api` feature so that no NIXL headers or libraries are needed to compile: the real
//! runtime (`libnixl_capi.so`, its plugins and UCX) is found and loaded at run time by
//! [`runtime`], which returns a typed error instead of letting nixl-sys abort the process.
//!
//! It does **not** speak any SGLang protocol (that is `nixl-kv` and `nixl-wire`), open sockets, or
//! start threads of its own. No `nixl_sys` type appears in its public API.
//!
//! # Example
//!
//! A WRITE between two agents of one process, with a notification:
//!
//! ```no_run
//! use nixl_core::{Agent, AgentConfig, BackendKind, BackendParams, HostBuffer, MemType, XferDescs, XferOp};
//!
//! # fn main() -> Result<(), nixl_core::Error> {
//! let a = Agent::new("a", &AgentConfig::default())?;
//! let b = Agent::new("b", &AgentConfig::default())?;
//! for agent in [&a, &b] {
//!     agent.create_backend(BackendKind::Ucx, &BackendParams::new())?;
//! }
//! let mut src = a.register(HostBuffer::new(4096)?)?;
//! let dst = b.register(HostBuffer::new(4096)?)?;
//! src.buffer_mut().as_mut_slice().fill(7);
//! a.load_remote(b.local_metadata()?.as_bytes())?;
//!
//! let mut local = XferDescs::new(MemType::Dram);
//! local.push_in(&src.region(), 0, 4096);
//! let mut remote = XferDescs::new(MemType::Dram);
//! remote.push_in(&dst.region(), 0, 4096);
//! let req = a.create_request(XferOp::Write, &local, &remote, b.name(), Some(b"done"))?;
//! req.post()?;
//! // Without a progress thread, the target is progressed by draining its notifications.
//! let mut seen = Vec::new();
//! req.wait(std::time::Duration::from_secs(5), || b.drain_notifications(&mut seen).unwrap())?;
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `cuda`: [`cuda::DeviceBuffer`], GPU memory on cudarc, loaded at run time (no toolkit needed to
//!   build).
//! - `nixl-runtime-tests`, `gpu-tests`: enable this crate's tests that need the NIXL runtime or a GPU.
//!
//! # Threads
//!
//! [`Agent`], [`XferRequest`], [`Registered`] and [`PreparedDescs`] are `Send + Sync`
//! (checked at compile time in `tests/send_sync.rs`). The default [`AgentConfig`] runs no progress
//! thread: whoever waits on an agent progresses it.

// The one module allowed raw FFI and memory code; see its docs.
mod sys;

mod agent;
mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
mod desc;
pub mod emulation;
mod error;
mod mem;
mod metadata;
mod notif;
pub mod runtime;
mod shared;
pub mod staging;
/// Benchmark support (feature `__bench`, not covered by semver).
#[cfg(feature = "__bench")]
#[doc(hidden)]
pub mod __bench {
    pub use crate::mem::RawHostRegion;
}
mod storage;
mod xfer;

pub use agent::{Agent, AgentConfig, ThreadSync};
pub use backend::{Backend, BackendKind, BackendParams, UCX_SGL_ENV, UcxErrorMode, UcxTuning};
pub use desc::{Desc, XferDescs};
pub use error::{Error, NixlCode, Op};
pub use mem::{
    BorrowedRegistration, HOST_ALIGN, HostBuffer, MemRegion, MemType, NixlBuffer, Registered,
    Registration,
};
pub use metadata::{AgentMetadata, MetadataSummary, inspect as inspect_metadata};
pub use notif::Notification;
pub use shared::SharedHostBuffer;
pub use storage::{FileRegion, ObjectRegion};
pub use xfer::{PreparedDescs, XferOp, XferRequest, XferStatus};
