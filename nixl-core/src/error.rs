//! The error type of `nixl-core`.

use std::path::PathBuf;

/// Everything that can go wrong in `nixl-core`.
///
/// NIXL status codes are carried as [`NixlCode`], never as `nixl_sys` types, so that a nixl-sys
/// upgrade is not a breaking change of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No NIXL runtime (`libnixl_capi.so`) was found; nothing was loaded.
    #[error(
        "no NIXL runtime found (searched: {searched}); install it with `pip install nixl-cu12==1.5.1` (nixl-cu13 for CUDA 13) into the active virtualenv or with `pip install --user`, or set NIXL_RUNTIME_DIR to a directory holding libnixl_capi.so"
    )]
    RuntimeNotFound {
        /// The places that were searched, in order.
        searched: String,
    },
    /// A runtime library was found but could not be loaded.
    #[error("failed to load the NIXL runtime at {path}: {reason}")]
    RuntimeLoad {
        /// The library that failed to load.
        path: PathBuf,
        /// What the dynamic loader or the library said.
        reason: String,
    },
    /// An argument was rejected before anything was passed to NIXL.
    #[error("invalid {what}: {reason}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A host allocation failed.
    #[error("out of memory allocating {bytes} bytes")]
    OutOfMemory {
        /// The requested size.
        bytes: usize,
    },
    /// NIXL returned an error status.
    #[error("nixl {op} failed: {code}")]
    Nixl {
        /// The operation that failed.
        op: Op,
        /// The status NIXL reported.
        code: NixlCode,
    },
    /// A posted transfer ended in an error state.
    #[error("transfer to {peer} failed: {code}")]
    TransferFailed {
        /// The remote agent of the transfer.
        peer: String,
        /// The status NIXL reported.
        code: NixlCode,
    },
    /// A CUDA driver call failed, or no CUDA driver is present.
    #[error("cuda: {reason}")]
    Cuda {
        /// What the driver said.
        reason: String,
    },
    /// A file operation needed for a FILE registration failed.
    #[error("{op} {path}: {reason}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error text.
        reason: String,
    },
}

/// The NIXL operation an [`Error::Nixl`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// Creating an agent.
    CreateAgent,
    /// Creating a backend from a plugin.
    CreateBackend,
    /// Listing plugins or reading their parameters.
    QueryPlugins,
    /// Registering memory.
    RegisterMemory,
    /// Reading the local agent metadata.
    LocalMetadata,
    /// Loading a remote agent's metadata.
    LoadRemoteMetadata,
    /// Invalidating a remote agent's metadata.
    InvalidateRemote,
    /// Building a descriptor list.
    BuildDescriptors,
    /// Creating a transfer request.
    CreateRequest,
    /// Preparing a descriptor list.
    PrepareDescriptors,
    /// Making a request from prepared lists.
    MakeRequest,
    /// Posting a transfer request.
    PostRequest,
    /// Reading a transfer's status.
    RequestStatus,
    /// Reading notifications.
    Notifications,
    /// Sending a notification.
    SendNotification,
    /// Querying storage.
    QueryMemory,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::CreateAgent => "create agent",
            Self::CreateBackend => "create backend",
            Self::QueryPlugins => "query plugins",
            Self::RegisterMemory => "register memory",
            Self::LocalMetadata => "get local metadata",
            Self::LoadRemoteMetadata => "load remote metadata",
            Self::InvalidateRemote => "invalidate remote metadata",
            Self::BuildDescriptors => "build descriptor list",
            Self::CreateRequest => "create transfer request",
            Self::PrepareDescriptors => "prepare descriptor list",
            Self::MakeRequest => "make transfer request",
            Self::PostRequest => "post transfer request",
            Self::RequestStatus => "transfer status",
            Self::Notifications => "get notifications",
            Self::SendNotification => "send notification",
            Self::QueryMemory => "query memory",
        };
        f.write_str(s)
    }
}

/// A NIXL status, in our own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NixlCode {
    /// NIXL rejected a parameter (unknown agent, unregistered memory, bad descriptor...).
    InvalidParam,
    /// Something NIXL looked up was not there.
    NotFound,
    /// The backend (UCX, POSIX, OBJ...) reported an error.
    Backend,
    /// No backend could serve the request (typically memory outside every registration).
    CreateRequest,
    /// The plugin could not create a backend.
    CreateBackend,
    /// Any other error, with NIXL's text.
    Other(String),
}

impl std::fmt::Display for NixlCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidParam => f.write_str("invalid parameter"),
            Self::NotFound => f.write_str("not found"),
            Self::Backend => f.write_str("backend error"),
            Self::CreateRequest => {
                f.write_str("no backend had the required registrations for the request")
            }
            Self::CreateBackend => f.write_str("backend creation failed"),
            Self::Other(s) => f.write_str(s),
        }
    }
}
