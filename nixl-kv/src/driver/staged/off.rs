//! Built without the `cuda` feature: no staging buffer can be made, so a manager configured to
//! stage refuses to start and the cores never emit a staged command.

use std::convert::Infallible;

use nixl_core::Agent;
use nixl_wire::RoomId;

use nixl_wire::ext::IpcPools;

use super::{ScatterEnd, StageEnd, WorkEnded};
use crate::driver::config::StagingConfig;
use crate::error::Error;
use crate::proto::Layout;
use crate::proto::decode::DecodeStaging;
use crate::proto::prefill::StagedWrite;

fn refused() -> Error {
    Error::Staging("nixl-kv was built without its `cuda` feature".into())
}

/// Never made.
pub(crate) struct PrefillGpu(Infallible);

impl PrefillGpu {
    pub(crate) fn new(_: &Agent, _: &Layout, _: StagingConfig) -> Result<Self, Error> {
        Err(refused())
    }

    pub(crate) fn stage(&mut self, _: StagedWrite) -> Result<(), StageEnd> {
        match self.0 {}
    }

    pub(crate) fn progress(&mut self, _: &Agent, _: &mut Vec<StageEnd>, _: &mut Vec<WorkEnded>) {
        match self.0 {}
    }

    pub(crate) fn open_direct(
        &mut self,
        _: &str,
        _: &IpcPools,
        _: &[u64],
        _: u64,
    ) -> Result<(), String> {
        match self.0 {}
    }

    pub(crate) fn pack(
        &mut self,
        _: &Agent,
        _: RoomId,
        _: &str,
        _: &crate::proto::lower::Work,
        _: Vec<u8>,
    ) -> Result<(), String> {
        match self.0 {}
    }

    pub(crate) fn forget(&mut self, _: &str) {
        match self.0 {}
    }

    pub(crate) fn direct(
        &mut self,
        _: RoomId,
        _: &str,
        _: &[u32],
        _: &[u32],
        _: Option<nixl_core::staging::TokenSlice>,
        _: Vec<u8>,
    ) -> Result<(), String> {
        match self.0 {}
    }
}

/// Never made.
pub(crate) struct DecodeGpu(Infallible);

impl DecodeGpu {
    pub(crate) fn new(
        _: &Agent,
        _: &Layout,
        _: StagingConfig,
    ) -> Result<(Self, DecodeStaging, Option<IpcPools>), Error> {
        Err(refused())
    }

    pub(crate) fn scatter(
        &mut self,
        _: RoomId,
        _: u32,
        _: &[u32],
        _: Option<&nixl_wire::ext::StagedSlice>,
    ) -> Result<(), ScatterEnd> {
        match self.0 {}
    }

    pub(crate) fn progress(&mut self, _: &mut Vec<ScatterEnd>) {
        match self.0 {}
    }
}
