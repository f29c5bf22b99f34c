//! The error type of `nixl-hicache`.

use std::path::PathBuf;

/// What can go wrong in the storage connector.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A NIXL call failed.
    #[error(transparent)]
    Core(#[from] nixl_core::Error),
    /// A key cannot be stored safely (empty, absolute, `..`, ...).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// No usable storage plugin, or a misconfigured one.
    #[error("storage backend: {0}")]
    Backend(String),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A raw target lies outside memory registered with this connector's agent.
    #[error("target {addr:#x}+{len} is not inside registered memory")]
    Unregistered {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Arguments of a batch call do not line up.
    #[error("{0}")]
    Mismatch(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
