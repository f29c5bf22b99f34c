//! HiCache KV-page storage over NIXL file and object backends, compatible with SGLang's
//! `HiCacheNixl` (0.5.1.x, and 0.5.23's file layout with [`Naming::Bucketed`]).
//!
//! - [`page_key`] / [`page_keys`]: SGLang's SHA-256 key chain over token pages.
//! - [`HiCache`]: `get`, `set`, their batch forms and address-mode (`*_raw`) variants, `exists`,
//!   `batch_exists`, `delete`, `clear`, over POSIX/GDS/GDS_MT/3FS files (`<dir>/<key>`, the same
//!   files SGLang writes) or S3 objects (OBJ).
//! - [`HiCache::batch_set_objects`] / [`HiCache::batch_get_objects`]: pages of a host pool
//!   moved without a copy, as objects per KV buffer or gathered from several ranges
//!   ([`PageObject`], SGLang 0.5.23's zero-copy interface).
//! - [`create_file`], [`open_files`], [`HiCache::register_files`]: SGLang's file-manager calls
//!   on caller-given paths; the final component of a path is never followed, reads open
//!   read-only and only [`FileAccess::Write`] opens for writing.
//! - [`HiCacheConfig`]: directory (default `/tmp/hicache_storage`, overridden by
//!   `SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR`), plugin (`auto`: 3FS, POSIX, GDS_MT, GDS, then
//!   OBJ), an optional model/rank [`KeySuffix`], backend parameters.
//!
//! See [`HiCache`] for what differs from SGLang on purpose (no leaks, atomic writes, per-key
//! batch results, safe keys). The key chain and the file and object layout are specified in the
//! repository's `docs/protocol.md` §9.
//!
//! # Example
//!
//! ```no_run
//! use nixl_hicache::{HiCache, HiCacheConfig, Plugin, page_keys};
//!
//! # fn main() -> Result<(), nixl_hicache::Error> {
//! let cache = HiCache::new(HiCacheConfig::new(Some("/tmp/kv".into()), Plugin::Auto))?;
//! let tokens: Vec<u32> = (0..128).collect();
//! let keys = page_keys(&tokens, 64, None);
//! let page = vec![7u8; 4096];
//! cache.set(&keys[0], &page)?;
//! let mut back = vec![0u8; 4096];
//! assert!(cache.get(&keys[0], &mut back)?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod config;
mod connector;
#[cfg(feature = "cuda")]
mod device;
mod error;
mod files;
mod gather;
mod key;
mod object;
mod paths;

pub use config::{
    DEFAULT_DIR, DEFAULT_MAX_OPEN, DIR_ENV, FILE_PLUGINS, HiCacheConfig, Plugin, WriteMode,
};
pub use connector::{HiCache, RawTarget};
#[cfg(feature = "cuda")]
pub use device::{DevicePage, DeviceStaging};
pub use error::{Error, Result};
pub use gather::PageObject;
pub use key::{
    KeySuffix, MAX_KEY_COMPONENT_LEN, MAX_KEY_LEN, Naming, PagePart, bucket_of, page_key, page_keys,
};
pub use paths::{FileAccess, create_file, open_files};
