//! Prefill→decode KV-cache transfer over NIXL, wire-compatible with SGLang 0.5.1's NIXL
//! connector (the contract is in `docs/protocol.md` of the repository).
//!
//! - [`proto`]: the sans-IO core. One core per role owns every decision (rooms, the max-merge
//!   status rule, chunk bookkeeping, failures, timeouts, heartbeats, bootstrap caches) and the
//!   one plan → lowering path (`group_concurrent_contiguous`, per-buffer address arithmetic,
//!   indices into prepared descriptor lists); each emits one ordered queue of commands. No
//!   sockets, no threads, no clock.
//! - [`net`]: everything that touches a socket: SGLang's bootstrap HTTP server (`/route` PUT and
//!   GET, plus `/health`) and its client, our bounded ZMTP, the threads they run on.
//! - `driver` (private): the IO shell that carries the commands out: [`KvManager`] per engine rank,
//!   [`KvSender`] per request on prefill, [`KvReceiver`] per request on decode; ZeroMQ sockets
//!   and the NIXL agent.
//!
//! # Example
//!
//! A prefill and a decode in one process, over UCX, with a bootstrap server on 127.0.0.1
//! (`examples/loopback.rs`; it needs the NIXL runtime, see nixl-core):
//!
//! ```no_run
#![doc = include_str!("../examples/loopback.rs")]
//! ```
#![forbid(unsafe_code)]

mod driver;
mod error;
pub mod net;
pub mod proto;

pub use driver::{
    HostPacking, KvArgs, KvManager, KvReceiver, KvSender, ManagerConfig, Mode,
    RECOMMENDED_BUSY_POLL, RECOMMENDED_SLOT_MIB, RECOMMENDED_SLOTS, RequestPaths, StagingConfig,
    TOKEN_ENV, TableSizes,
};
pub use error::{ArgsError, Error};
pub use net::bootstrap::BootstrapServer;
pub use nixl_wire::{AUX_LAYOUT_0520, Profile, RoomId, UnknownProfile};
pub use proto::prefill::UnclaimedRoom;
pub use proto::{BootstrapAddr, FailureReason, KvPoll};
