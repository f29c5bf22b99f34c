//! Prefill→decode KV-cache transfer over NIXL, wire-compatible with SGLang 0.5.1's NIXL
//! connector.
//!
//! - [`proto`]: the sans-IO core. The prefill and decode state machines (rooms, the max-merge
//!   status rule, chunk bookkeeping, failure, timeouts) and the descriptor planner
//!   (`group_concurrent_contiguous`, per-buffer address arithmetic). No sockets, no threads, no
//!   clock.
//! - [`bootstrap`]: SGLang's bootstrap HTTP server (`/route` PUT and GET, plus `/health`) and
//!   its client.
//! - [`driver`]: the IO shell: [`KvManager`] per engine rank, [`KvSender`] per request on
//!   prefill, [`KvReceiver`] per request on decode; ZeroMQ sockets and the NIXL agent.

pub mod bootstrap;
pub mod driver;
pub mod proto;

pub use driver::{KvArgs, KvManager, KvReceiver, KvSender, ManagerConfig, Mode};
pub use proto::KvPoll;
