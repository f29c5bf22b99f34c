//! Transfer requests and prepared descriptor lists.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::desc::XferDescs;
use crate::error::{Error, Op};
use crate::mem::MemType;
use crate::sys;

/// The direction of a transfer, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::exhaustive_enums)] // NIXL has exactly these two operations.
pub enum XferOp {
    /// Pull remote (or storage) contents into local memory.
    Read,
    /// Push local memory to the remote (or storage).
    Write,
}

impl XferOp {
    pub(crate) fn to_sys(self) -> nixl_sys::XferOp {
        match self {
            Self::Read => nixl_sys::XferOp::Read,
            Self::Write => nixl_sys::XferOp::Write,
        }
    }
}

/// Where a posted transfer stands. Errors are returned as `Err`, not as a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::exhaustive_enums)] // Everything else is an error.
pub enum XferStatus {
    /// Complete: the data is in place (and the notification, if any, is on its way).
    Done,
    /// Still moving.
    InProgress,
}

/// A transfer request. Released (and, if still running, cancelled) when dropped.
///
/// `Send + Sync`; it keeps its agent alive.
#[must_use = "a request does nothing until posted, and is released when dropped"]
pub struct XferRequest {
    // Dropped before `agent`.
    inner: nixl_sys::XferRequest,
    agent: Agent,
    peer: Arc<str>,
}

impl XferRequest {
    pub(crate) fn new(inner: nixl_sys::XferRequest, agent: Agent, peer: &str) -> Self {
        Self {
            inner,
            agent,
            peer: peer.into(),
        }
    }

    /// The remote agent of the transfer.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Posts the transfer. It may complete within the call ([`XferStatus::Done`]).
    ///
    /// A request can be posted again once it is done, moving the same data again.
    pub fn post(&self) -> Result<XferStatus, Error> {
        match self.agent.inner.post_xfer_req(&self.inner, None) {
            Ok(true) => Ok(XferStatus::InProgress),
            Ok(false) => Ok(XferStatus::Done),
            Err(e) => Err(self.failed(Op::PostRequest, e)),
        }
    }

    /// Reads the status, progressing the initiator's agent.
    pub fn status(&self) -> Result<XferStatus, Error> {
        match self.agent.inner.get_xfer_status(&self.inner) {
            Ok(nixl_sys::XferStatus::Success) => Ok(XferStatus::Done),
            Ok(nixl_sys::XferStatus::InProgress) => Ok(XferStatus::InProgress),
            Err(e) => Err(self.failed(Op::RequestStatus, e)),
        }
    }

    /// Polls [`XferRequest::status`] until done, calling `between` after each unfinished poll
    /// (to progress another agent, or to back off), and failing after `timeout`.
    pub fn wait(&self, timeout: Duration, mut between: impl FnMut()) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            if self.status()? == XferStatus::Done {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(Error::TransferFailed {
                    peer: self.peer.to_string(),
                    code: crate::NixlCode::Other(format!("timed out after {timeout:?}")),
                });
            }
            between();
        }
    }

    fn failed(&self, op: Op, e: nixl_sys::NixlError) -> Error {
        match sys::nixl_error(op, e) {
            Error::Nixl { code, .. } => Error::TransferFailed {
                peer: self.peer.to_string(),
                code,
            },
            other => other,
        }
    }
}

impl std::fmt::Debug for XferRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XferRequest")
            .field("agent", &self.agent.name())
            .field("peer", &self.peer)
            .finish()
    }
}

/// A descriptor list prepared once on an agent (NIXL's `prepXferDlist`), from which requests are
/// made by index with [`Agent::make_request`]: the hot path for repeated transfers to one peer.
#[derive(Debug)]
pub struct PreparedDescs {
    pub(crate) handle: sys::PreparedHandle,
    len: usize,
    lens: Vec<u64>,
    peer: Option<Arc<str>>,
    mem: MemType,
}

impl PreparedDescs {
    pub(crate) fn new(handle: sys::PreparedHandle, descs: &XferDescs, peer: Option<&str>) -> Self {
        Self {
            handle,
            len: descs.len(),
            lens: descs.as_slice().iter().map(|d| d.len).collect(),
            peer: peer.map(Into::into),
            mem: descs.mem_type(),
        }
    }

    /// The memory type of the prepared descriptors.
    pub fn mem_type(&self) -> MemType {
        self.mem
    }

    /// Number of prepared descriptors.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no descriptor was prepared.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The remote agent these descriptors belong to (`None`: local).
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Rejects index lists NIXL would choke on, before calling it.
    pub(crate) fn check_indices(
        &self,
        idx: &[i32],
        remote: &Self,
        remote_idx: &[i32],
    ) -> Result<(), Error> {
        if idx.len() != remote_idx.len() {
            return Err(Error::InvalidArgument {
                what: "prepared indices",
                reason: format!("{} local vs {} remote", idx.len(), remote_idx.len()),
            });
        }
        for (&l, &r) in idx.iter().zip(remote_idx) {
            let (Some(ll), Some(rl)) = (self.desc_len(l), remote.desc_len(r)) else {
                return Err(Error::InvalidArgument {
                    what: "prepared index",
                    reason: format!(
                        "pair ({l}, {r}) outside {} local / {} remote",
                        self.len, remote.len
                    ),
                });
            };
            if ll != rl {
                return Err(Error::InvalidArgument {
                    what: "prepared index",
                    reason: format!("pair ({l}, {r}) has lengths {ll} and {rl}"),
                });
            }
        }
        Ok(())
    }

    fn desc_len(&self, i: i32) -> Option<u64> {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.lens.get(i).copied())
    }
}
