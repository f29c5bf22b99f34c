//! Support code shared by the `nixl-pd` and `nixl-hicache` programs of this crate.
//!
//! This library exists so that the binaries can share a few helpers; it is not a stable API.
//! It never prints: the binaries decide what to tell the user.
//!
//! - [`runtime`]: loading the NIXL runtime, falling back to a pip-installed wheel, and the
//!   instructions for a user who has none;
//! - [`init_logging`]: the libraries' `tracing` events on stderr;
//! - [`take_page_runs`]: pages handed out as an inference server's KV allocator does;
//! - [`pattern`]: deterministic byte patterns.
#![forbid(unsafe_code)]

mod pages;
pub mod pattern;
pub mod runtime;

pub use pages::take_page_runs;

/// Prints the libraries' `tracing` events on stderr, at the level named by `RUST_LOG` (`error`,
/// `warn`, `info`, `debug`, `trace`; default `warn`, so that warnings such as UCX's software
/// emulation of a GPU transfer are seen). Later calls do nothing.
pub fn init_logging() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(tracing::Level::WARN);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
}
