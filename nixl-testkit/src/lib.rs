//! Test support for the nixl workspace (not published).
//!
//! - [`LoopbackPair`]: two real NIXL agents with UCX backends in one process, a registered host
//!   buffer on each side and the target's metadata loaded by the initiator.
//! - [`ChildPeer`]: the same across two processes; the target runs in a child process
//!   (`nixl-testkit-peer`) driven over its stdin/stdout.
//! - [`pattern`]: deterministic fill/verify helpers.
//! - [`S3Server`]: a local S3 endpoint (moto) on 127.0.0.1 with a bucket, stopped on drop.
//! - [`sglang`]: SGLang 0.5.20–0.5.23's own NIXL classes as a peer process, and its workload.
//! - [`tempdir`]: temporary directories, removed on drop.
//!
//! Everything here uses the real NIXL runtime that `cargo xtask runtime` provisions; nothing is
//! mocked.
#![forbid(unsafe_code)]

mod child;
mod loopback;
pub mod pattern;
mod s3;
pub mod sglang;

pub use child::ChildPeer;
pub use loopback::{LoopbackPair, unique_name, wait_for_notification};
pub use s3::{MOTO_VENV_ENV, S3Server};
pub use tempfile::{TempDir, tempdir};

/// Errors of the test kit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A NIXL call failed.
    #[error(transparent)]
    Core(#[from] nixl_core::Error),
    /// A helper process or file failed.
    #[error("{0}")]
    Setup(String),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

/// Result alias of the test kit.
pub type Result<T> = std::result::Result<T, Error>;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    child::hex_encode(bytes)
}

/// Bytes of a hex string, or `None` if it is not hex of even length.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    child::hex_decode(s)
}
