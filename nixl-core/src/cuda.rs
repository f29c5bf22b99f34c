//! GPU memory on cudarc (feature `cuda`).
//!
//! The CUDA driver is loaded at run time; without one, [`DeviceBuffer::new`] returns
//! [`Error::Cuda`] instead of panicking as cudarc would.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use crate::error::Error;
use crate::mem::{MemRegion, MemType};

/// Whether the CUDA driver library (`libcuda.so.1`) can be loaded.
pub fn driver_present() -> bool {
    crate::sys::cuda_driver_present()
}

/// An owned device allocation on one GPU, registrable as VRAM.
#[derive(Debug)]
pub struct DeviceBuffer {
    slice: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    ordinal: u32,
    ptr: u64,
}

impl DeviceBuffer {
    /// Allocates `len` zeroed bytes on GPU `ordinal`.
    pub fn new(ordinal: u32, len: usize) -> Result<Self, Error> {
        if !driver_present() {
            return Err(Error::Cuda {
                reason: "CUDA driver library (libcuda.so.1) not found".into(),
            });
        }
        let ctx = CudaContext::new(ordinal as usize).map_err(cuda_err)?;
        let stream = ctx.default_stream();
        let slice = stream.alloc_zeros::<u8>(len.max(1)).map_err(cuda_err)?;
        let ptr = {
            let (p, _sync) = slice.device_ptr(&stream);
            p
        };
        stream.synchronize().map_err(cuda_err)?;
        Ok(Self {
            slice,
            stream,
            ordinal,
            ptr,
        })
    }

    /// The CUDA ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The device address.
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.slice.len()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }

    /// Copies `src` to the start of the buffer and waits for the copy.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), Error> {
        if src.len() > self.len() {
            return Err(Error::InvalidArgument {
                what: "host slice",
                reason: format!(
                    "{} bytes into a {}-byte device buffer",
                    src.len(),
                    self.len()
                ),
            });
        }
        let mut view = self.slice.slice_mut(0..src.len());
        self.stream.memcpy_htod(src, &mut view).map_err(cuda_err)?;
        self.stream.synchronize().map_err(cuda_err)
    }

    /// Copies the whole buffer to host memory.
    pub fn to_host(&self) -> Result<Vec<u8>, Error> {
        let v = self.stream.clone_dtoh(&self.slice).map_err(cuda_err)?;
        self.stream.synchronize().map_err(cuda_err)?;
        Ok(v)
    }

    pub(crate) fn device_region(&self) -> MemRegion {
        MemRegion {
            addr: self.ptr,
            len: self.len() as u64,
            dev: u64::from(self.ordinal),
            mem: MemType::Vram,
        }
    }
}

fn cuda_err(e: cudarc::driver::DriverError) -> Error {
    Error::Cuda {
        reason: e.to_string(),
    }
}
