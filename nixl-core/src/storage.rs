//! Storage regions: files (FILE) and objects (OBJ) as NIXL registers them.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::mem::{MemRegion, MemType};

/// An open file to register with a file backend (POSIX, GDS, 3FS).
///
/// NIXL addresses a FILE by its descriptor: the region is `(offset 0, length 0, fd)` and covers
/// the whole file. The file stays open for as long as this value lives.
#[derive(Debug)]
pub struct FileRegion {
    file: File,
    path: PathBuf,
}

impl FileRegion {
    /// Opens `path` read-write, creating it if `create`.
    pub fn open(path: &Path, create: bool) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::Io {
                op: "open",
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Wraps an already open file.
    pub fn from_file(file: File, path: PathBuf) -> Self {
        Self { file, path }
    }

    /// The descriptor NIXL addresses the file by.
    pub fn fd(&self) -> u64 {
        // A live File's descriptor is non-negative.
        u64::try_from(self.file.as_raw_fd()).unwrap_or(u64::MAX)
    }

    /// The path the file was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn file_region(&self) -> MemRegion {
        MemRegion {
            addr: 0,
            len: 0,
            dev: self.fd(),
            mem: MemType::File,
        }
    }
}

/// An object to register with the OBJ backend.
///
/// The NIXL OBJ plugin names the object by the registration's device id: the S3 key is the id
/// in decimal (a key chosen freely needs registration metadata, which nixl-sys cannot pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ObjectRegion {
    id: u64,
}

impl ObjectRegion {
    /// The object stored under the key `id.to_string()`.
    pub fn new(id: u64) -> Self {
        Self { id }
    }

    /// The object's id (its key, in decimal).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn object_region(&self) -> MemRegion {
        MemRegion {
            addr: 0,
            len: 0,
            dev: self.id,
            mem: MemType::Object,
        }
    }
}
