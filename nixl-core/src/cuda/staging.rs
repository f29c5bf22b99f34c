//! The staged path's GPU half: gather a chunk of pages of every pool buffer into a contiguous
//! staging range with one kernel launch, or scatter such a range into pages (docs/runtime.md
//! §12). The tables come from [`crate::staging`]; the kernels are `kernels/staging.cu`, loaded
//! from the committed PTX through the driver.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::ipc::PeerPools;
use super::{DeviceBuffer, cuda_err, require_driver};
use crate::error::Error;
use crate::staging::{CopyTable, SlicedTable, StagingLayout, TokenSlice};
use crate::sys::staging::{DeviceTable, StagingKernels, check_device_range};

/// Gathers and scatters pages of one side's pools on one GPU, on a stream of its own.
///
/// Created once per pool set: it checks that every pool buffer is plain device memory of that
/// GPU (not host, not managed), loads the kernels, and allocates a device table for chunks of
/// up to `max_pages` pages. Launches are asynchronous; each returns a [`StagingEvent`] that says
/// when the copy is done. Launches of one `Staging` run in order on its stream.
pub struct Staging {
    layout: StagingLayout,
    kernels: StagingKernels,
    table: DeviceTable,
    max_pages: usize,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    ordinal: u32,
}

impl Staging {
    /// Prepares gathers and scatters over `layout`'s buffers, which must be device memory of
    /// GPU `ordinal`, for chunks of up to `max_pages` pages.
    ///
    /// Fails with [`Error::Cuda`] when the driver cannot load the kernels (a driver older than
    /// CUDA 13.0 / r580): callers then fall back to per-page NIXL descriptors.
    pub fn new(ordinal: u32, layout: StagingLayout, max_pages: usize) -> Result<Self, Error> {
        require_driver()?;
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
        ctx.bind_to_thread().map_err(cuda_err)?;
        for b in layout.buffers() {
            check_device_range(b.addr, b.len)?;
        }
        let kernels = StagingKernels::load(Arc::clone(&ctx))?;
        let words = 4 * layout.buffers().len() + 2 * max_pages.div_ceil(2);
        let table = DeviceTable::new(Arc::clone(&ctx), words)?;
        let stream = ctx.new_stream().map_err(cuda_err)?;
        Ok(Self {
            layout,
            kernels,
            table,
            max_pages: max_pages.max(1),
            stream,
            ctx,
            ordinal,
        })
    }

    /// The pools.
    pub fn layout(&self) -> &StagingLayout {
        &self.layout
    }

    /// The GPU.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The most pages one launch moves.
    pub fn max_pages(&self) -> usize {
        self.max_pages
    }

    /// Copies `pages` of every buffer into `staging` from byte `offset` on (buffer-major, see
    /// [`crate::staging`]), in one launch.
    pub fn gather(
        &mut self,
        pages: &[u32],
        staging: &mut DeviceBuffer,
        offset: u64,
    ) -> Result<StagingEvent, Error> {
        self.launch(true, pages, staging, offset)
    }

    /// Copies `staging` from byte `offset` on into `pages` of every buffer, in one launch.
    pub fn scatter(
        &mut self,
        pages: &[u32],
        staging: &DeviceBuffer,
        offset: u64,
    ) -> Result<StagingEvent, Error> {
        self.launch(false, pages, staging, offset)
    }

    /// Copies `src_pages` of every buffer straight into `dst_pages` of a same-node peer's
    /// mapped pools (pair by pair), in one launch. The peer's pools must have our item lengths.
    pub fn copy_direct(
        &mut self,
        src_pages: &[u32],
        peer: &PeerPools,
        dst_pages: &[u32],
    ) -> Result<StagingEvent, Error> {
        self.check_pages(src_pages.len())?;
        let table = self
            .layout
            .direct_table(src_pages, peer.layout(), dst_pages)?;
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        self.table.upload(&self.stream, table.words())?;
        self.kernels.launch_direct(
            &self.stream,
            self.table.addr(),
            table.grid(),
            (table.buffers(), table.pages()),
        )?;
        self.record()
    }

    /// Copies `slice` of every token of `src_pages` of every buffer straight into `dst_pages`
    /// of a same-node peer's mapped pools (pair by pair), in one launch: heterogeneous TP on
    /// the direct path.
    pub fn copy_sliced(
        &mut self,
        src_pages: &[u32],
        peer: &PeerPools,
        dst_pages: &[u32],
        slice: &TokenSlice,
    ) -> Result<StagingEvent, Error> {
        self.sliced_into(src_pages, peer.layout(), dst_pages, slice)
    }

    /// Copies `slice` of every token of `src_pages` of every buffer into `out` from byte
    /// `offset` on, as pages of `item_len` bytes packed buffer-major
    /// ([`StagingLayout::packed`]), in one launch: the packed path's gather, after which every
    /// destination page is one contiguous run. The slice must fill those pages' token slots.
    pub fn pack_sliced(
        &mut self,
        src_pages: &[u32],
        out: &mut DeviceBuffer,
        offset: u64,
        item_len: u64,
        slice: &TokenSlice,
    ) -> Result<StagingEvent, Error> {
        self.check_on_gpu(out)?;
        // Every byte of a packed page must come from the slice: a gap would carry stale
        // staging bytes into the decode's page.
        if !slice.fills_pages(item_len) {
            return Err(Error::InvalidArgument {
                what: "packed slice",
                reason: format!("{slice:?} does not fill pages of {item_len} bytes"),
            });
        }
        let area = self.packed_area(out, offset, src_pages.len(), item_len)?;
        let dst: Vec<u32> = (0..u32::try_from(src_pages.len()).unwrap_or(u32::MAX)).collect();
        self.sliced_into(src_pages, &area, &dst, slice)
    }

    /// The reverse of a packed gather by a larger peer: `staging` from byte `offset` on holds
    /// `dst_pages.len()` of the peer's pages of `item_len` bytes per buffer, packed
    /// buffer-major ([`StagingLayout::packed`]); `slice` of each of their tokens goes into
    /// `dst_pages` of our buffers, in one launch (heterogeneous TP with several prefill ranks
    /// per decode token slot, on the staged path).
    pub fn unpack_sliced(
        &mut self,
        staging: &DeviceBuffer,
        offset: u64,
        item_len: u64,
        dst_pages: &[u32],
        slice: &TokenSlice,
    ) -> Result<StagingEvent, Error> {
        self.check_pages(dst_pages.len())?;
        let area = self.packed_area(staging, offset, dst_pages.len(), item_len)?;
        let src: Vec<u32> = (0..u32::try_from(dst_pages.len()).unwrap_or(u32::MAX)).collect();
        let table = area.sliced_table(&src, &self.layout, dst_pages, slice)?;
        self.launch_sliced(&table)
    }

    /// `pages` pages of `item_len` bytes in each of our buffers, packed buffer-major in `buf`
    /// from byte `offset` on: refused unless it lies inside `buf`, on our GPU.
    fn packed_area(
        &self,
        buf: &DeviceBuffer,
        offset: u64,
        pages: usize,
        item_len: u64,
    ) -> Result<StagingLayout, Error> {
        self.check_on_gpu(buf)?;
        let nb = self.layout.buffers().len();
        let need = self.layout.packed_bytes(pages, item_len);
        let room = (buf.len() as u64).checked_sub(offset);
        if need.zip(room).is_none_or(|(n, r)| n > r) {
            return Err(Error::InvalidArgument {
                what: "packed area",
                reason: format!(
                    "{pages} pages of {item_len} bytes in {nb} buffers from byte {offset} of a {}-byte buffer",
                    buf.len()
                ),
            });
        }
        StagingLayout::packed(buf.addr() + offset, nb, pages, item_len)
    }

    fn sliced_into(
        &mut self,
        src_pages: &[u32],
        dst: &StagingLayout,
        dst_pages: &[u32],
        slice: &TokenSlice,
    ) -> Result<StagingEvent, Error> {
        self.check_pages(src_pages.len())?;
        let table = self.layout.sliced_table(src_pages, dst, dst_pages, slice)?;
        self.launch_sliced(&table)
    }

    fn launch_sliced(&mut self, table: &SlicedTable) -> Result<StagingEvent, Error> {
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        self.table.upload(&self.stream, table.words())?;
        self.kernels.launch_sliced(
            &self.stream,
            self.table.addr(),
            table.grid(),
            (table.buffers(), table.pages()),
            table.slice(),
        )?;
        self.record()
    }

    /// Refuses a launch of more than `max_pages` pages (the device table's size).
    fn check_pages(&self, n: usize) -> Result<(), Error> {
        if n > self.max_pages {
            return Err(Error::InvalidArgument {
                what: "staging pages",
                reason: format!("{n} pages in one launch (at most {})", self.max_pages),
            });
        }
        Ok(())
    }

    /// Refuses a staging buffer on another GPU than the pools.
    fn check_on_gpu(&self, staging: &DeviceBuffer) -> Result<(), Error> {
        if staging.ordinal() != self.ordinal {
            return Err(Error::InvalidArgument {
                what: "staging buffer",
                reason: format!(
                    "on GPU {}, pools on GPU {}",
                    staging.ordinal(),
                    self.ordinal
                ),
            });
        }
        Ok(())
    }

    /// An event recorded on the stream after the launches so far.
    fn record(&self) -> Result<StagingEvent, Error> {
        let event = self.ctx.new_event(None).map_err(cuda_err)?;
        event.record(&self.stream).map_err(cuda_err)?;
        Ok(StagingEvent(event))
    }

    /// Waits until every launch so far has finished.
    pub fn synchronize(&self) -> Result<(), Error> {
        self.stream.synchronize().map_err(cuda_err)
    }

    fn launch(
        &mut self,
        to_staging: bool,
        pages: &[u32],
        staging: &DeviceBuffer,
        offset: u64,
    ) -> Result<StagingEvent, Error> {
        self.check_pages(pages.len())?;
        self.check_on_gpu(staging)?;
        let room = (staging.len() as u64).saturating_sub(offset);
        let table: CopyTable = self.layout.table(pages, room)?;
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        self.table.upload(&self.stream, table.words())?;
        self.kernels.launch(
            &self.stream,
            to_staging,
            self.table.addr(),
            staging.addr() + offset,
            table.grid(),
            (table.buffers(), table.pages()),
        )?;
        self.record()
    }
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staging")
            .field("ordinal", &self.ordinal)
            .field("buffers", &self.layout.buffers().len())
            .field("bytes_per_page", &self.layout.bytes_per_page())
            .field("max_pages", &self.max_pages)
            .finish()
    }
}

/// The completion of one gather or scatter launch.
#[derive(Debug)]
pub struct StagingEvent(CudaEvent);

impl StagingEvent {
    /// Whether the launch has finished (an error if it, or earlier work, failed).
    pub fn is_done(&self) -> Result<bool, Error> {
        self.0.try_is_complete().map_err(cuda_err)
    }

    /// Waits for the launch to finish.
    pub fn wait(&self) -> Result<(), Error> {
        self.0.synchronize().map_err(cuda_err)
    }
}
