//! `HiCache`: nixl-hicache's connector behind SGLang's `HiCacheNixl` (the Python class in
//! `nixl_rs.sglang.hicache` wraps this one).
//!
//! Memory arrives as `(address, length)` pairs. A batch whose ranges lie inside memory
//! registered with [`PyHiCache::register`] moves zero-copy at once; otherwise the ranges are
//! registered for that call only (coalesced into spans) and deregistered when it returns, so
//! nothing leaks, unlike SGLang's fallback that registers on every miss and never deregisters.

use std::sync::Mutex;

use nixl_core::{MemRegion, Registration};
use nixl_hicache::{
    Error, HiCache, HiCacheConfig, KeySuffix, Naming, PageObject, PagePart, Plugin, RawTarget,
    WriteMode,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::ffi;

/// Adds the classes of this module to `m`.
pub(crate) fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyHiCache>()
}

/// The connector. Methods that take addresses follow the contract of the crate's FFI boundary:
/// each `(address, length)` is host memory of this process that stays allocated, and is not
/// used by anything else, until the call returns (for [`PyHiCache::register`]: until
/// [`PyHiCache::unregister_all`] or the object's end).
#[pyclass(name = "HiCache", module = "nixl_rs._native", frozen)]
pub(crate) struct PyHiCache {
    inner: HiCache,
    /// Long-lived registrations (SGLang's `register_buffers`).
    pinned: Mutex<Vec<Registration>>,
}

#[pymethods]
impl PyHiCache {
    /// A connector over `dir` (overridden by `SGLANG_HICACHE_NIXL_BACKEND_STORAGE_DIR`) with
    /// SGLang's plugin names (`auto`, `POSIX`, `GDS`, `GDS_MT`, `3FS`, `OBJ`). `write_mode`:
    /// `"atomic"` (a temp file renamed over the key once written) or `"in-place"` (the key's
    /// file written directly, as SGLang does).
    ///
    /// SGLang 0.5.23's layout: `naming="bucketed"` (files under a bucket directory per name)
    /// and the storage-name suffix of its ranks, `_{model}_{tp_rank}_{tp_size}` or, with
    /// `mla`, `_{model}` (given `model`; `None` keeps 0.5.1's suffix-less names). `direct_io`:
    /// atomic writes of 4 KiB-aligned pages bypass the page cache where the file system allows.
    #[new]
    #[pyo3(signature = (
        dir=None, plugin="auto", write_mode="atomic", model=None, tp_rank=0, tp_size=1,
        mla=false, naming="flat", direct_io=false
    ))]
    #[allow(
        clippy::too_many_arguments,
        reason = "mirrors SGLang's storage config fields"
    )]
    fn new(
        py: Python<'_>,
        dir: Option<String>,
        plugin: &str,
        write_mode: &str,
        model: Option<String>,
        tp_rank: u32,
        tp_size: u32,
        mla: bool,
        naming: &str,
        direct_io: bool,
    ) -> PyResult<Self> {
        let mode = match write_mode.to_ascii_lowercase().as_str() {
            "atomic" => WriteMode::Atomic,
            "in-place" | "inplace" | "in_place" => WriteMode::InPlace,
            other => {
                return Err(PyValueError::new_err(format!(
                    "write_mode must be \"atomic\" or \"in-place\", not {other:?}"
                )));
            }
        };
        let naming = match naming {
            "flat" => Naming::Flat,
            "bucketed" => Naming::Bucketed,
            other => {
                return Err(PyValueError::new_err(format!(
                    "naming must be \"flat\" or \"bucketed\", not {other:?}"
                )));
            }
        };
        let suffix = model.map(|model| {
            if mla {
                KeySuffix::Mla { model }
            } else {
                KeySuffix::Mha {
                    model,
                    tp_rank,
                    tp_size,
                }
            }
        });
        let config = HiCacheConfig::new(dir.map(Into::into), Plugin::parse(plugin))
            .write_mode(mode)
            .suffix(suffix)
            .naming(naming)
            .direct_io(direct_io);
        let inner = py.detach(|| HiCache::new(config)).map_err(to_py)?;
        Ok(Self {
            inner,
            pinned: Mutex::new(Vec::new()),
        })
    }

    /// The NIXL plugin in use (`POSIX`, `OBJ`, ...).
    #[getter]
    fn backend(&self) -> String {
        self.inner.backend().plugin_name().to_owned()
    }

    /// SGLang's memory type for the plugin: `FILE` or `OBJ`.
    #[getter]
    fn mem_type(&self) -> &'static str {
        if self.inner.dir().is_some() {
            "FILE"
        } else {
            "OBJ"
        }
    }

    /// The storage directory (file plugins), else `None`.
    #[getter]
    fn dir(&self) -> Option<String> {
        self.inner.dir().map(|d| d.display().to_string())
    }

    /// The path of `key` (file plugins), else `None`.
    fn path_of(&self, key: &str) -> PyResult<Option<String>> {
        let p = self.inner.path_of(key).map_err(to_py)?;
        Ok(p.map(|p| p.display().to_string()))
    }

    /// Stores the bytes at each `(addrs[i], lens[i])` under `keys[i]`; each key appears complete
    /// or not at all. Raises on a transfer or storage error.
    fn batch_set(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        addrs: Vec<u64>,
        lens: Vec<u64>,
    ) -> PyResult<()> {
        let targets = zip_targets(&keys, &addrs, &lens)?;
        py.detach(|| self.with_registered(&targets, |t| self.inner.batch_set_raw(t)))
            .map_err(to_py)
    }

    /// Reads each key into `(addrs[i], lens[i])`; per-key hit (`True`) or miss (`False`).
    fn batch_get(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        addrs: Vec<u64>,
        lens: Vec<u64>,
    ) -> PyResult<Vec<bool>> {
        let targets = zip_targets(&keys, &addrs, &lens)?;
        py.detach(|| self.with_registered(&targets, |t| self.inner.batch_get_raw(t)))
            .map_err(to_py)
    }

    /// Stores page objects (SGLang 0.5.23's zero-copy `batch_set_v1`): object `i` is `keys[i]`'s
    /// part `parts[i]` (`""`, `"_k"`, `"_v"`), made of the next `counts[i]` ranges of
    /// `(addrs, lens)` in object order. Raises on a transfer or storage error.
    fn batch_set_objects(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        parts: Vec<String>,
        counts: Vec<usize>,
        addrs: Vec<u64>,
        lens: Vec<u64>,
    ) -> PyResult<()> {
        let ranges = ranges(&addrs, &lens)?;
        let objects = page_objects(&keys, &parts, &counts, &ranges)?;
        self.on_objects(py, &ranges, &objects, HiCache::batch_set_objects)
    }

    /// Reads page objects into their ranges (see [`PyHiCache::batch_set_objects`]); per-object
    /// hit or miss.
    fn batch_get_objects(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        parts: Vec<String>,
        counts: Vec<usize>,
        addrs: Vec<u64>,
        lens: Vec<u64>,
    ) -> PyResult<Vec<bool>> {
        let ranges = ranges(&addrs, &lens)?;
        let objects = page_objects(&keys, &parts, &counts, &ranges)?;
        self.on_objects(py, &ranges, &objects, HiCache::batch_get_objects)
    }

    /// The number of leading keys whose every part in `parts` is stored.
    fn batch_exists_parts(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        parts: Vec<String>,
    ) -> PyResult<usize> {
        let parts = parts
            .iter()
            .map(|p| part(p))
            .collect::<PyResult<Vec<_>>>()?;
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        py.detach(|| self.inner.batch_exists_parts(&keys, &parts))
            .map_err(to_py)
    }

    /// The storage path of `key`'s part (file plugins), else `None`.
    fn part_path(&self, key: &str, part: &str) -> PyResult<Option<String>> {
        let name = self
            .inner
            .part_name(key, self::part(part)?)
            .map_err(to_py)?;
        Ok(self.inner.dir().map(|d| d.join(name).display().to_string()))
    }

    /// Whether `key` is stored.
    fn exists(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        py.detach(|| self.inner.exists(key)).map_err(to_py)
    }

    /// The number of leading keys that exist (SGLang's `batch_exists`).
    fn batch_exists(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<usize> {
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        py.detach(|| self.inner.batch_exists(&keys)).map_err(to_py)
    }

    /// Deletes `key`; `False` if it was not stored.
    fn delete(&self, py: Python<'_>, key: &str) -> PyResult<bool> {
        py.detach(|| self.inner.delete(key)).map_err(to_py)
    }

    /// Deletes every key of this connector; returns how many were removed.
    fn clear(&self, py: Python<'_>) -> PyResult<usize> {
        py.detach(|| self.inner.clear()).map_err(to_py)
    }

    /// Registers host ranges for zero-copy transfers until [`PyHiCache::unregister_all`] or the
    /// end of this object (SGLang's `register_buffers`). Returns how many regions are held.
    fn register(&self, py: Python<'_>, addrs: Vec<u64>, lens: Vec<u64>) -> PyResult<usize> {
        if addrs.len() != lens.len() {
            return Err(PyValueError::new_err(format!(
                "{} addresses but {} lengths",
                addrs.len(),
                lens.len()
            )));
        }
        let spans = coalesce(addrs.iter().copied().zip(lens.iter().copied()));
        let regs = py
            .detach(|| {
                spans
                    .iter()
                    .map(|&(a, l)| ffi::register_foreign(self.inner.agent(), MemRegion::dram(a, l)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|e| to_py(Error::Core(e)))?;
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.extend(regs);
        Ok(pinned.len())
    }

    /// Drops every registration made with [`PyHiCache::register`].
    fn unregister_all(&self) {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Files held open and registered for reads (bounded).
    fn open_files(&self) -> usize {
        self.inner.open_files()
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

impl PyHiCache {
    /// Runs `op` on `objects` without the GIL, their `ranges` registered.
    fn on_objects<T: Send>(
        &self,
        py: Python<'_>,
        ranges: &[RawTarget],
        objects: &[PageObject<'_>],
        op: impl Fn(&HiCache, &[PageObject<'_>]) -> nixl_hicache::Result<T> + Send + Sync,
    ) -> PyResult<T> {
        py.detach(|| self.with_ranges_registered(ranges, || op(&self.inner, objects)))
            .map_err(to_py)
    }

    /// Runs `op` after registering, for this call only, the spans of `ranges` that lie outside
    /// memory held by [`PyHiCache::register`].
    fn with_ranges_registered<T>(
        &self,
        ranges: &[RawTarget],
        op: impl FnOnce() -> nixl_hicache::Result<T>,
    ) -> nixl_hicache::Result<T> {
        let outside: Vec<(u64, u64)> = {
            let pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
            ranges
                .iter()
                .map(|t| (t.addr, t.len))
                .filter(|&(a, l)| l > 0 && !pinned.iter().any(|r| r.region().contains(a, l)))
                .collect()
        };
        let _regs = coalesce(outside.into_iter())
            .into_iter()
            .map(|(a, l)| ffi::register_foreign(self.inner.agent(), MemRegion::dram(a, l)))
            .collect::<Result<Vec<_>, _>>()?;
        op()
    }

    /// Runs `op` on `targets`, first registering, for this call only, the spans of those
    /// that lie outside memory held by [`PyHiCache::register`].
    fn with_registered<T>(
        &self,
        targets: &[(&str, RawTarget)],
        op: impl Fn(&[(&str, RawTarget)]) -> nixl_hicache::Result<T>,
    ) -> nixl_hicache::Result<T> {
        let ranges: Vec<RawTarget> = targets.iter().map(|&(_, t)| t).collect();
        self.with_ranges_registered(&ranges, || op(targets))
    }
}

/// Pairs keys with targets; refuses lists of different lengths.
fn zip_targets<'a>(
    keys: &'a [String],
    addrs: &[u64],
    lens: &[u64],
) -> PyResult<Vec<(&'a str, RawTarget)>> {
    if keys.len() != addrs.len() || keys.len() != lens.len() {
        return Err(PyValueError::new_err(format!(
            "{} keys, {} addresses, {} lengths",
            keys.len(),
            addrs.len(),
            lens.len()
        )));
    }
    Ok(keys
        .iter()
        .zip(addrs.iter().zip(lens))
        .map(|(k, (&addr, &len))| (k.as_str(), RawTarget { addr, len }))
        .collect())
}

/// Host ranges from two lists of the same length.
fn ranges(addrs: &[u64], lens: &[u64]) -> PyResult<Vec<RawTarget>> {
    if addrs.len() != lens.len() {
        return Err(PyValueError::new_err(format!(
            "{} addresses but {} lengths",
            addrs.len(),
            lens.len()
        )));
    }
    Ok(addrs
        .iter()
        .zip(lens)
        .map(|(&addr, &len)| RawTarget { addr, len })
        .collect())
}

/// A page part from its storage-name suffix.
fn part(p: &str) -> PyResult<PagePart> {
    match p {
        "" => Ok(PagePart::Whole),
        "_k" => Ok(PagePart::K),
        "_v" => Ok(PagePart::V),
        other => Err(PyValueError::new_err(format!(
            "page part must be \"\", \"_k\" or \"_v\", not {other:?}"
        ))),
    }
}

/// Objects from keys, parts and per-object range counts over `ranges`; every range used once.
fn page_objects<'a>(
    keys: &'a [String],
    parts: &[String],
    counts: &[usize],
    ranges: &'a [RawTarget],
) -> PyResult<Vec<PageObject<'a>>> {
    if keys.len() != parts.len() || keys.len() != counts.len() {
        return Err(PyValueError::new_err(format!(
            "{} keys, {} parts, {} range counts",
            keys.len(),
            parts.len(),
            counts.len()
        )));
    }
    let mut rest = ranges;
    let mut out = Vec::with_capacity(keys.len());
    for ((key, p), &n) in keys.iter().zip(parts).zip(counts) {
        if n > rest.len() {
            return Err(PyValueError::new_err(format!(
                "range counts add up to more than the {} ranges given",
                ranges.len()
            )));
        }
        let (these, tail) = rest.split_at(n);
        rest = tail;
        out.push(PageObject {
            key,
            part: part(p)?,
            ranges: these,
        });
    }
    if !rest.is_empty() {
        return Err(PyValueError::new_err(format!(
            "{} ranges left over after the objects' counts",
            rest.len()
        )));
    }
    Ok(out)
}

/// Merges overlapping and adjacent ranges (zero-length ones dropped), sorted by address.
pub(crate) fn coalesce(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .filter(|&(_, l)| l > 0)
        .map(|(a, l)| (a, a.saturating_add(l)))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (start, end) in v {
        match out.last_mut() {
            Some((_, e)) if start <= *e => *e = (*e).max(end),
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// A connector error as a Python exception: bad arguments are `ValueError`, the rest
/// `RuntimeError`.
fn to_py(e: Error) -> PyErr {
    match e {
        Error::InvalidKey { .. } | Error::Mismatch(_) => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}
