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
pub(crate) use gpu::{DecodeGpu, PrefillGpu};
#[cfg(not(feature = "cuda"))]
pub(crate) use off::{DecodeGpu, PrefillGpu};

use nixl_wire::RoomId;

use crate::proto::FailureReason;

/// A staged WRITE that ended: the room, our staging slot, and how.
pub(crate) type StageEnd = (RoomId, u32, Result<(), FailureReason>);

/// A scatter that ended: the room, the ring slot, and how.
pub(crate) type ScatterEnd = (RoomId, u32, Result<(), String>);
