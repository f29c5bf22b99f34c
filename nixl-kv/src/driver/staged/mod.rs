//! The staged path's GPU half in the driver (docs/runtime.md §12): the prefill's staging buffer
//! with its gathers and WRITEs, the decode's ring with its scatters. The cores decide which
//! piece goes where; this only launches, posts and reports what came of it.
//!
//! Built with the `cuda` feature; without it a manager asked to stage refuses to start
//! ([`Error::Staging`]), and nothing here can be reached.

#[cfg(feature = "cuda")]
mod gpu;
#[cfg(not(feature = "cuda"))]
mod off;
#[cfg(feature = "cuda")]
mod packed;

#[cfg(feature = "cuda")]
pub(crate) use gpu::{DecodeGpu, PrefillGpu};
#[cfg(not(feature = "cuda"))]
pub(crate) use off::{DecodeGpu, PrefillGpu};

use nixl_wire::RoomId;

use crate::proto::FailureReason;

/// A staged WRITE that ended: its room, our staging slot, and how.
#[derive(Debug)]
pub(crate) struct StageEnd {
    pub(crate) room: RoomId,
    pub(crate) slot: u32,
    pub(crate) result: Result<(), FailureReason>,
}

/// A scatter that ended: its room, the ring slot, and how.
#[derive(Debug)]
pub(crate) struct ScatterEnd {
    pub(crate) room: RoomId,
    pub(crate) slot: u32,
    pub(crate) result: Result<(), String>,
}

/// Work that ended outside NIXL's request table: a direct copy (its kernels done and its
/// notification sent, or not), or a packed chunk (its last WRITE done, or not).
#[derive(Debug)]
pub(crate) struct WorkEnded {
    pub(crate) room: RoomId,
    pub(crate) result: Result<(), FailureReason>,
}

/// This node's identity for the direct path: its boot id (the same for every process of one
/// boot of one machine, different across machines).
pub(crate) fn node_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b',' && b != b';'))
    .then(|| id.to_owned())
}
